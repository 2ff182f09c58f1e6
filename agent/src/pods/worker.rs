//! One pod's worker: a level-triggered loop that reads the pod's latest spec and what the
//! machine holds, acts (start, restart, kill, probe, tear down), and reports status. It
//! wakes on a spec change, a container exit, a probe or back-off deadline — never polls.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use tokio::sync::{Notify, watch};

use super::model::{ContainerRecord, Kind, RunState, Waiting, latest};
use super::plan::{Action, Backoffs, plan};
use super::probe::{Prober, check_network};
use super::runtime::{PodRuntime, SandboxInfo};
use super::status::{Observed, pod_status};

/// How the worker talks back to the API server (a seam so the loop is testable).
pub trait PodApi: Send + Sync + 'static {
    /// Writes the pod's status subresource.
    fn write_status(
        &self,
        pod: &Pod,
        status: Value,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Deletes the pod object for good (grace 0) once everything of it is gone.
    fn finish_deletion(&self, pod: &Pod) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// What every worker shares.
pub struct WorkerShared<R, A> {
    pub runtime: Arc<R>,
    pub api: Arc<A>,
    pub host_ip: String,
}

/// How long to wait before retrying after the machine failed under us.
const RETRY: Duration = Duration::from_secs(2);
/// The grace period when the pod object vanished without one (a forced deletion).
const FORCED_GRACE: Duration = Duration::from_secs(2);

fn grace_period(pod: &Pod) -> Duration {
    let seconds = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    Duration::from_secs(seconds.max(0) as u64)
}

/// Everything a worker keeps between two passes.
#[derive(Default)]
struct State {
    backoffs: Backoffs,
    pull_backoffs: Backoffs,
    waiting: BTreeMap<String, Waiting>,
    prober: Prober,
    sandbox: Option<SandboxInfo>,
    last_status: Option<Value>,
    start_time: Option<Timestamp>,
    released: bool,
    /// The last image pull error of each container, for the ImagePullBackOff message.
    pull_errors: BTreeMap<String, String>,
    /// Containers whose last start failed; their waiting reason is that failure's.
    start_failed: std::collections::BTreeSet<String>,
    /// Container instances being stopped in the background (liveness kills).
    stopping: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// Runs one pod until it is deleted and everything of it is gone.
pub async fn run<R: PodRuntime, A: PodApi>(
    shared: Arc<WorkerShared<R, A>>,
    uid: String,
    mut pod_rx: watch::Receiver<Option<Arc<Pod>>>,
    wake: Arc<Notify>,
) {
    let mut state = State::default();
    loop {
        let pod = pod_rx.borrow_and_update().clone();
        let next = match pod {
            None => {
                terminate(&shared, &uid, None, &mut state).await;
                return;
            }
            Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                terminate(&shared, &uid, Some(&pod), &mut state).await;
                if let Err(error) = shared.api.finish_deletion(&pod).await {
                    tracing::warn!(pod = %uid, error = format!("{error:#}"), "finish pod deletion");
                }
                return;
            }
            Some(pod) => match sync(&shared, &pod, &wake, &mut state).await {
                Ok(next) => next,
                Err(error) => {
                    tracing::warn!(pod = %uid, error = format!("{error:#}"), "sync pod");
                    Some(Timestamp::now() + RETRY)
                }
            },
        };
        let sleep = async {
            match next {
                Some(at) => {
                    let wait = Timestamp::now().duration_until(at).unsigned_abs();
                    let wait = if at <= Timestamp::now() {
                        Duration::ZERO
                    } else {
                        wait
                    };
                    tokio::time::sleep(wait).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = pod_rx.changed() => {
                if changed.is_err() {
                    // The manager is gone (agent shutting down): leave everything running.
                    return;
                }
            }
            () = wake.notified() => {}
            () = sleep => {}
        }
    }
}

/// One pass over a live pod. Returns when to look again.
async fn sync<R: PodRuntime, A: PodApi>(
    shared: &Arc<WorkerShared<R, A>>,
    pod: &Arc<Pod>,
    wake: &Arc<Notify>,
    state: &mut State,
) -> anyhow::Result<Option<Timestamp>> {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let runtime = &*shared.runtime;
    let now = Timestamp::now();
    state.start_time.get_or_insert_with(|| {
        pod.status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map_or(now, |t| t.0)
    });
    let already_finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    let mut records = runtime.containers(uid).await?;
    if super::eviction::is_evicted(pod) {
        // Evicted: stop everything now and never restart; the status says why.
        let stops = records
            .iter()
            .filter(|r| r.is_running())
            .map(|record| runtime.stop(pod, record, super::eviction::EVICTION_GRACE));
        for result in futures::future::join_all(stops).await {
            result?;
        }
        release(shared, uid, Some(pod), state).await;
        return Ok(None);
    }
    if already_finished && !records.iter().any(ContainerRecord::is_running) {
        release(shared, uid, Some(pod), state).await;
        return Ok(None);
    }

    let mut wake_at: Option<Timestamp> = None;
    let mut earliest = |at: Timestamp| wake_at = Some(wake_at.map_or(at, |w: Timestamp| w.min(at)));

    if state.sandbox.is_none() {
        match runtime.ensure_sandbox(pod).await {
            Ok(sandbox) => state.sandbox = Some(sandbox),
            Err(error) => {
                tracing::warn!(pod = %uid, error = %error, "pod sandbox");
                report(shared, pod, &records, state, &Default::default()).await;
                return Ok(Some(now + RETRY));
            }
        }
    }

    let running = running_instances(&records);
    let verdicts = state.prober.verdicts(pod, &running);
    let mut decision = plan(pod, &records, &mut state.backoffs, &verdicts.unhealthy, now);
    if let Some(at) = decision.wake_at {
        earliest(at);
    }
    // Back-off waits replace older waiting reasons, except the error that made the
    // container fail to start (CreateContainerConfigError...), which stays the reason.
    for (name, waiting) in decision.waiting.drain(..) {
        if !state.start_failed.contains(&name) {
            state.waiting.insert(name, waiting);
        }
    }
    let mut acted = false;
    let grace = grace_period(pod);
    let mut starts = Vec::new();
    for action in decision.actions {
        match action {
            Action::Kill { id, name, reason } => {
                // The kill runs beside the worker (it may wait a whole grace period), so
                // probes and status go on; its end wakes the worker.
                let Some(record) = records.iter().find(|r| r.id == id).cloned() else {
                    continue;
                };
                if !state
                    .stopping
                    .lock()
                    .expect("stopping lock")
                    .insert(id.clone())
                {
                    continue;
                }
                tracing::info!(pod = %uid, container = %name, "{reason}");
                let (shared, pod, wake, stopping) = (
                    shared.clone(),
                    pod.clone(),
                    wake.clone(),
                    state.stopping.clone(),
                );
                tokio::spawn(async move {
                    if let Err(error) = shared.runtime.stop(&pod, &record, grace).await {
                        tracing::warn!(container = %record.name, error = %error, "stop unhealthy container");
                    }
                    stopping.lock().expect("stopping lock").remove(&record.id);
                    wake.notify_one();
                });
            }
            Action::Start {
                kind,
                name,
                attempt,
            } => {
                if let Some((until, delay)) = state.pull_backoffs.until(&name, now) {
                    let image = container_image(pod, kind, &name);
                    state.waiting.insert(
                        name.clone(),
                        Waiting {
                            reason: "ImagePullBackOff".to_string(),
                            // As the kubelet (1.31+) says it: the back-off, then the
                            // error of the last pull.
                            message: format!(
                                "Back-off {}s pulling image \"{image}\": ErrImagePull: {}",
                                delay.as_secs(),
                                state.pull_errors.get(&name).map_or("", String::as_str)
                            ),
                        },
                    );
                    earliest(until);
                    continue;
                }
                starts.push((kind, name, attempt));
            }
        }
    }
    // Containers of one pass start side by side (init containers come one at a time).
    let results =
        futures::future::join_all(starts.iter().map(|(kind, name, attempt)| async move {
            (
                name,
                *attempt,
                runtime.start(pod, *kind, name, *attempt).await,
            )
        }))
        .await;
    for (name, attempt, result) in results {
        acted = true;
        if attempt > 0 {
            state.backoffs.next(name, now);
        }
        match result {
            Ok(()) => {
                state.waiting.remove(name);
                state.start_failed.remove(name);
                state.pull_backoffs.forget(name);
            }
            Err(error) => {
                tracing::warn!(pod = %uid, container = %name, error = %error, "start container");
                // Pulls back off on their own clock (ImagePullBackOff); other failures like
                // a crash, so a broken container does not spin (a restart advanced it
                // already).
                let backoffs = if error.is_image_pull() {
                    &mut state.pull_backoffs
                } else {
                    &mut state.backoffs
                };
                if error.is_image_pull() || attempt == 0 {
                    backoffs.next(name, now);
                }
                if let Some((until, _)) = backoffs.until(name, now) {
                    earliest(until);
                }
                state.start_failed.insert(name.clone());
                if error.is_image_pull() {
                    state
                        .pull_errors
                        .insert(name.clone(), error.message.clone());
                }
                state.waiting.insert(
                    name.clone(),
                    Waiting {
                        reason: error.reason.to_string(),
                        message: error.message.clone(),
                    },
                );
            }
        }
    }
    if acted {
        records = runtime.containers(uid).await?;
        prune(runtime, &records).await;
    }
    // Waiting reasons only describe containers that are not running.
    state
        .waiting
        .retain(|name, _| !records.iter().any(|r| &r.name == name && r.is_running()));

    // Probes of running containers.
    let running = running_instances(&records);
    let (due, next_probe) = state.prober.due(pod, &running, now);
    if let Some(at) = next_probe {
        earliest(at);
    }
    let pod_ip = state
        .sandbox
        .as_ref()
        .and_then(|s| s.pod_ips.first().cloned())
        .unwrap_or_default();
    for probe in due {
        let Some(container) = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == probe.container))
        else {
            continue;
        };
        let success = match check_network(&probe.probe, container, &pod_ip).await {
            Some(success) => success,
            None => {
                let command = probe
                    .probe
                    .exec
                    .as_ref()
                    .and_then(|e| e.command.clone())
                    .unwrap_or_default();
                let timeout =
                    Duration::from_secs(probe.probe.timeout_seconds.unwrap_or(1).max(1) as u64);
                match records
                    .iter()
                    .find(|r| r.name == probe.container && r.kind == Kind::App && r.is_running())
                {
                    Some(record) => match runtime.exec(record, &command, timeout).await {
                        Ok(code) => code == 0,
                        Err(error) => {
                            tracing::warn!(container = %record.name, error = %error, "exec probe");
                            false
                        }
                    },
                    None => false,
                }
            }
        };
        state
            .prober
            .record(&probe.container, probe.kind, &probe.probe, success);
    }
    let verdicts = state.prober.verdicts(pod, &running);
    if !verdicts.unhealthy.is_empty() {
        // Act on a failed liveness probe right away.
        earliest(now);
    }

    let finished = report(shared, pod, &records, state, &verdicts).await;
    if finished && !records.iter().any(ContainerRecord::is_running) {
        release(shared, uid, Some(pod), state).await;
    }
    Ok(wake_at)
}

fn container_image(pod: &Pod, kind: Kind, name: &str) -> String {
    let spec = pod.spec.as_ref();
    let list = match kind {
        Kind::Init => spec
            .and_then(|s| s.init_containers.as_deref())
            .unwrap_or_default(),
        Kind::App => spec.map(|s| s.containers.as_slice()).unwrap_or_default(),
    };
    list.iter()
        .find(|c| c.name == name)
        .and_then(|c| c.image.clone())
        .unwrap_or_default()
}

/// Running app containers: name → (instance id, started at).
fn running_instances(records: &[ContainerRecord]) -> BTreeMap<String, (String, Timestamp)> {
    records
        .iter()
        .filter(|r| r.kind == Kind::App)
        .filter_map(|r| match r.state {
            RunState::Running { started_at } => latest(records, &r.name, Kind::App)
                .filter(|newest| newest.id == r.id)
                .map(|_| (r.name.clone(), (r.id.clone(), started_at))),
            _ => None,
        })
        .collect()
}

/// Removes instances older than the previous one of each container (the previous one is
/// kept for `kubectl logs --previous` and lastState).
async fn prune<R: PodRuntime>(runtime: &R, records: &[ContainerRecord]) {
    for record in records {
        let newer = records
            .iter()
            .filter(|r| {
                r.name == record.name && r.kind == record.kind && r.attempt > record.attempt
            })
            .count();
        if newer >= 2
            && !record.is_running()
            && let Err(error) = runtime.remove(record).await
        {
            tracing::warn!(container = %record.id, error = %error, "remove old container");
        }
    }
}

/// Computes and writes the status when it changed. Returns whether the pod is finished.
async fn report<R, A: PodApi>(
    shared: &WorkerShared<R, A>,
    pod: &Pod,
    records: &[ContainerRecord],
    state: &mut State,
    verdicts: &super::probe::Verdicts,
) -> bool {
    let observed = Observed {
        pod_ips: state
            .sandbox
            .as_ref()
            .map(|s| s.pod_ips.clone())
            .unwrap_or_default(),
        host_ip: Some(shared.host_ip.clone()),
        start_time: state.start_time,
        waiting: state.waiting.clone(),
        ready: verdicts.ready.clone(),
        started: verdicts.started.clone(),
        sandbox_ready: state.sandbox.is_some(),
        terminating: false,
        qos_class: crate::cgroups::pod_qos(pod)
            .map_or("BestEffort", |qos| qos.as_str())
            .to_string(),
    };
    let status = pod_status(pod, records, &observed, Timestamp::now());
    let finished = matches!(status["phase"].as_str(), Some("Succeeded" | "Failed"));
    if state.last_status.as_ref() != Some(&status) {
        match shared.api.write_status(pod, status.clone()).await {
            Ok(()) => state.last_status = Some(status),
            Err(error) => {
                tracing::warn!(pod = ?pod.metadata.name, error = format!("{error:#}"), "write pod status")
            }
        }
    }
    finished
}

/// Stops every container and releases the pod's resources.
async fn terminate<R: PodRuntime, A: PodApi>(
    shared: &WorkerShared<R, A>,
    uid: &str,
    pod: Option<&Pod>,
    state: &mut State,
) {
    let runtime = &*shared.runtime;
    let grace = pod.map_or(FORCED_GRACE, grace_period);
    // Keep trying until containerd answers: a pod's containers must not be left running.
    let records = loop {
        match runtime.containers(uid).await {
            Ok(records) => break records,
            Err(error) => {
                tracing::warn!(pod = %uid, error = %error, "list containers to stop");
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    if let Some(pod) = pod {
        let stops = records
            .iter()
            .filter(|r| r.is_running())
            .map(|record| runtime.stop(pod, record, grace));
        for result in futures::future::join_all(stops).await {
            if let Err(error) = result {
                tracing::warn!(pod = %uid, error = %error, "stop container");
            }
        }
    } else {
        let placeholder = Pod::default();
        let stops = records
            .iter()
            .filter(|r| r.is_running())
            .map(|record| runtime.stop(&placeholder, record, grace));
        futures::future::join_all(stops).await;
    }
    for record in &records {
        if let Err(error) = runtime.remove(record).await {
            tracing::warn!(container = %record.id, error = %error, "remove container");
        }
    }
    state.released = false;
    release(shared, uid, pod, state).await;
}

async fn release<R: PodRuntime, A>(
    shared: &WorkerShared<R, A>,
    uid: &str,
    pod: Option<&Pod>,
    state: &mut State,
) {
    if state.released {
        return;
    }
    match shared.runtime.release(uid, pod).await {
        Ok(()) => {
            state.released = true;
            state.sandbox = None;
        }
        Err(error) => tracing::warn!(pod = %uid, error = %error, "release pod"),
    }
}
