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

use super::model::{ContainerRecord, Kind, RunState, Waiting, latest, long_running, sidecars};
use super::plan::{Action, Backoffs, plan};
use super::pod_ref;
use super::probe::{ProbeKind, Prober, check_network};
use super::runtime::{PodRuntime, RuntimeError, SandboxInfo, StartError};
use super::status::{Observed, pod_status};
use crate::events::{EventRecorder, EventType};

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
    /// Where the workers record what they do (Killing, BackOff, Unhealthy ...).
    pub events: EventRecorder,
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
    /// The sandbox failure last recorded as an event, so a failure retried every pass is
    /// recorded once.
    sandbox_failure: Option<String>,
    /// The end of the crash-loop back-off last recorded as an event, per container: one
    /// BackOff event per back-off, however often the worker wakes during it.
    backoff_recorded: BTreeMap<String, Timestamp>,
    /// The same for image pull back-offs.
    pull_backoff_recorded: BTreeMap<String, Timestamp>,
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
        record_stopping(&shared.events, pod, &records);
        stop_in_order(runtime, pod, &records, super::eviction::EVICTION_GRACE).await?;
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
            Ok(sandbox) => {
                state.sandbox = Some(sandbox);
                state.sandbox_failure = None;
            }
            Err(error) => {
                tracing::warn!(pod = %uid, error = %error, "pod sandbox");
                if state.sandbox_failure.as_ref() != Some(&error.message) {
                    record_sandbox_failure(&shared.events, pod, &error);
                    state.sandbox_failure = Some(error.message.clone());
                }
                report(shared, pod, &records, state, &Default::default()).await;
                return Ok(Some(now + RETRY));
            }
        }
    }

    let running = running_instances(pod, &records);
    let planned_on = state.prober.verdicts(pod, &running);
    let mut decision = plan(pod, &records, &state.backoffs, &planned_on, now);
    if let Some(at) = decision.wake_at {
        earliest(at);
    }
    // Back-off waits replace older waiting reasons, except the error that made the
    // container fail to start (CreateContainerConfigError...), which stays the reason.
    for (name, waiting) in decision.waiting.drain(..) {
        // A container that never ran (its config or image is wrong) backs off too, but
        // its Failed events already say why; a crash back-off is an event of its own.
        let never_ran = state.start_failed.contains(&name)
            && state
                .waiting
                .get(&name)
                .is_none_or(|w| w.reason != "RunContainerError");
        if !never_ran
            && let Some((until, _)) = state.backoffs.until(&name, now)
            && state.backoff_recorded.get(&name) != Some(&until)
        {
            state.backoff_recorded.insert(name.clone(), until);
            shared.events.container(
                pod,
                container_kind(pod, &name),
                &name,
                EventType::Warning,
                "BackOff",
                format!(
                    "Back-off restarting failed container {name} in pod {}",
                    pod_ref(pod)
                ),
            );
        }
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
                shared.events.container(
                    pod,
                    record.kind,
                    &name,
                    EventType::Normal,
                    "Killing",
                    reason,
                );
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
                    if state.pull_backoff_recorded.get(&name) != Some(&until) {
                        state.pull_backoff_recorded.insert(name.clone(), until);
                        // The kubelet records a pull back-off as Normal: the Failed
                        // events of the pull itself are the warnings.
                        shared.events.container(
                            pod,
                            kind,
                            &name,
                            EventType::Normal,
                            "BackOff",
                            format!("Back-off pulling image \"{image}\""),
                        );
                    }
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
                *kind,
                name,
                *attempt,
                runtime.start(pod, *kind, name, *attempt).await,
            )
        }))
        .await;
    for (kind, name, attempt, result) in results {
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
                record_start_failure(&shared.events, pod, kind, name, &error);
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
    let running = running_instances(pod, &records);
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
        let Some(container) = long_running(pod).find(|c| c.name == probe.container) else {
            continue;
        };
        let failure = match check_network(&probe.probe, container, &pod_ip).await {
            Some(result) => result.err(),
            None => {
                let command = probe
                    .probe
                    .exec
                    .as_ref()
                    .and_then(|e| e.command.clone())
                    .unwrap_or_default();
                let timeout =
                    Duration::from_secs(probe.probe.timeout_seconds.unwrap_or(1).max(1) as u64);
                match running
                    .get(&probe.container)
                    .and_then(|(id, _)| records.iter().find(|r| &r.id == id))
                {
                    Some(record) => match runtime.exec(record, &command, timeout).await {
                        Ok(0) => None,
                        Ok(code) => Some(format!("command {command:?} exited with code {code}")),
                        Err(error) => {
                            tracing::warn!(container = %record.name, error = %error, "exec probe");
                            Some(format!("command {command:?} failed: {error}"))
                        }
                    },
                    None => Some("the container is not running".to_string()),
                }
            }
        };
        if let Some(failure) = &failure {
            // Every failed probe is an event, as the kubelet records it; repeats of one
            // failure are folded into one event's count.
            shared.events.container(
                pod,
                container_kind(pod, &probe.container),
                &probe.container,
                EventType::Warning,
                "Unhealthy",
                format!("{} probe failed: {failure}", probe_name(probe.kind)),
            );
        }
        state.prober.record(
            &probe.container,
            probe.kind,
            &probe.probe,
            failure.is_none(),
        );
    }
    let verdicts = state.prober.verdicts(pod, &running);
    if !verdicts.unhealthy.is_empty() || verdicts.started != planned_on.started {
        // Act on a failed liveness probe right away, and plan again when a container
        // started since this pass planned: a started sidecar lets the next one start.
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

/// Whether `name` is an init container or an app container of the pod.
fn container_kind(pod: &Pod, name: &str) -> Kind {
    let init = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    if init.iter().any(|c| c.name == name) {
        Kind::Init
    } else {
        Kind::App
    }
}

fn probe_name(kind: ProbeKind) -> &'static str {
    match kind {
        ProbeKind::Startup => "Startup",
        ProbeKind::Liveness => "Liveness",
        ProbeKind::Readiness => "Readiness",
    }
}

/// The kubelet's events for a sandbox that could not be made.
fn record_sandbox_failure(events: &EventRecorder, pod: &Pod, error: &StartError) {
    if error.reason == "NetworkNotReady" {
        events.pod(pod, EventType::Warning, "NetworkNotReady", &error.message);
    } else {
        events.pod(
            pod,
            EventType::Warning,
            "FailedCreatePodSandBox",
            format!("Failed to create pod sandbox: {}", error.message),
        );
    }
}

/// The kubelet's `Failed` event for a container that could not start: image errors by
/// their reason (the runtime recorded the pull's own error), others by their message.
fn record_start_failure(
    events: &EventRecorder,
    pod: &Pod,
    kind: Kind,
    name: &str,
    error: &StartError,
) {
    let image_error = matches!(
        error.reason,
        "ErrImagePull" | "ErrImageNeverPull" | "InvalidImageName"
    );
    let detail: &str = if image_error {
        error.reason
    } else {
        &error.message
    };
    events.container(
        pod,
        kind,
        name,
        EventType::Warning,
        "Failed",
        format!("Error: {detail}"),
    );
}

/// The running app containers and sidecars, the ones probes watch: name → (instance id,
/// started at).
fn running_instances(
    pod: &Pod,
    records: &[ContainerRecord],
) -> BTreeMap<String, (String, Timestamp)> {
    let sidecars: Vec<&str> = sidecars(pod).map(|c| c.name.as_str()).collect();
    records
        .iter()
        .filter(|r| r.kind == Kind::App || sidecars.contains(&r.name.as_str()))
        .filter_map(|r| match r.state {
            RunState::Running { started_at } => latest(records, &r.name, r.kind)
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
        record_stopping(&shared.events, pod, &records);
        // Errors were logged; what could not be stopped is removed below all the same.
        let _ = stop_in_order(runtime, pod, &records, grace).await;
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

/// The least a sidecar gets to stop after waiting for its turn, as the kubelet's
/// minimumGracePeriodInSeconds (never more than the pod's own grace period).
const MINIMUM_GRACE: Duration = Duration::from_secs(2);

/// Stops a pod's running containers in the kubelet's order: the app containers (and an
/// init container caught running) together, then the sidecars one at a time, last
/// declared first, each within what is left of `grace`. Every container is tried; the
/// first error is returned.
async fn stop_in_order<R: PodRuntime>(
    runtime: &R,
    pod: &Pod,
    records: &[ContainerRecord],
    grace: Duration,
) -> Result<(), RuntimeError> {
    let began = std::time::Instant::now();
    let sidecar_names: Vec<&str> = sidecars(pod).map(|c| c.name.as_str()).collect();
    let is_sidecar =
        |r: &ContainerRecord| r.kind == Kind::Init && sidecar_names.contains(&r.name.as_str());
    let running = || records.iter().filter(|r| r.is_running());
    let mut errors = Vec::new();
    let stops = running()
        .filter(|r| !is_sidecar(r))
        .map(|record| runtime.stop(pod, record, grace));
    for result in futures::future::join_all(stops).await {
        if let Err(error) = result {
            tracing::warn!(pod = ?pod.metadata.uid, error = %error, "stop container");
            errors.push(error);
        }
    }
    for name in sidecar_names.iter().rev() {
        for record in running().filter(|r| is_sidecar(r) && r.name == *name) {
            let remaining = grace
                .saturating_sub(began.elapsed())
                .max(MINIMUM_GRACE.min(grace));
            if let Err(error) = runtime.stop(pod, record, remaining).await {
                tracing::warn!(pod = ?pod.metadata.uid, error = %error, "stop sidecar");
                errors.push(error);
            }
        }
    }
    match errors.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// A Killing event for each running container about to be stopped.
fn record_stopping(events: &EventRecorder, pod: &Pod, records: &[ContainerRecord]) {
    for record in records.iter().filter(|r| r.is_running()) {
        events.container(
            pod,
            record.kind,
            &record.name,
            EventType::Normal,
            "Killing",
            format!("Stopping container {}", record.name),
        );
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::pods::model::fixtures;
    use crate::pods::runtime::{RuntimeError, StartError};

    /// A machine that runs nothing: records what the worker asks of it.
    #[derive(Default)]
    struct FakeRuntime {
        records: Mutex<Vec<ContainerRecord>>,
        calls: Mutex<Vec<String>>,
    }

    impl FakeRuntime {
        fn call(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }

        /// The newest instance of `name` exits with `code`.
        fn exit(&self, name: &str, code: i32) {
            let mut records = self.records.lock().unwrap();
            let newest = records
                .iter_mut()
                .filter(|r| r.name == name)
                .max_by_key(|r| r.attempt)
                .expect("a container to exit");
            newest.state = fixtures::exited(code);
        }
    }

    impl PodRuntime for FakeRuntime {
        async fn ensure_sandbox(&self, _pod: &Pod) -> Result<SandboxInfo, StartError> {
            self.call("sandbox".into());
            Ok(SandboxInfo {
                pod_ips: vec!["10.0.0.7".into()],
            })
        }

        async fn containers(&self, _uid: &str) -> Result<Vec<ContainerRecord>, RuntimeError> {
            Ok(self.records.lock().unwrap().clone())
        }

        async fn start(
            &self,
            _pod: &Pod,
            kind: Kind,
            name: &str,
            attempt: u32,
        ) -> Result<(), StartError> {
            self.call(format!("start {name} {attempt}"));
            self.records.lock().unwrap().push(fixtures::record(
                name,
                kind,
                attempt,
                fixtures::running(),
            ));
            Ok(())
        }

        async fn stop(
            &self,
            _pod: &Pod,
            record: &ContainerRecord,
            grace: Duration,
        ) -> Result<(), RuntimeError> {
            self.call(format!("stop {} {}s", record.id, grace.as_secs()));
            for r in self
                .records
                .lock()
                .unwrap()
                .iter_mut()
                .filter(|r| r.id == record.id)
            {
                r.state = fixtures::exited(143);
            }
            Ok(())
        }

        async fn remove(&self, record: &ContainerRecord) -> Result<(), RuntimeError> {
            self.call(format!("remove {}", record.id));
            self.records.lock().unwrap().retain(|r| r.id != record.id);
            Ok(())
        }

        async fn exec(
            &self,
            _record: &ContainerRecord,
            _command: &[String],
            _timeout: Duration,
        ) -> Result<i32, RuntimeError> {
            Ok(0)
        }

        async fn release(&self, uid: &str, _pod: Option<&Pod>) -> Result<(), RuntimeError> {
            self.call(format!("release {uid}"));
            Ok(())
        }

        async fn known_pods(&self) -> Result<Vec<String>, RuntimeError> {
            Ok(Vec::new())
        }
    }

    /// An API server that keeps every status written, and wakes the test on each.
    #[derive(Default)]
    struct FakeApi {
        statuses: Mutex<Vec<Value>>,
        written: Notify,
        deleted: Mutex<bool>,
    }

    impl PodApi for FakeApi {
        async fn write_status(&self, _pod: &Pod, status: Value) -> anyhow::Result<()> {
            self.statuses.lock().unwrap().push(status);
            self.written.notify_one();
            Ok(())
        }

        async fn finish_deletion(&self, _pod: &Pod) -> anyhow::Result<()> {
            *self.deleted.lock().unwrap() = true;
            self.written.notify_one();
            Ok(())
        }
    }

    async fn until(api: &FakeApi, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let wait = async {
            loop {
                let written = api.written.notified();
                if let Some(status) = api.statuses.lock().unwrap().last().filter(|s| check(s)) {
                    return status.clone();
                }
                written.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no status with {what}: {:#?}",
                    api.statuses.lock().unwrap().last()
                )
            })
    }

    #[tokio::test]
    async fn a_pod_runs_crash_loops_and_is_torn_down_on_deletion() {
        let runtime = Arc::new(FakeRuntime::default());
        let api = Arc::new(FakeApi::default());
        let (events, mut recorded) = EventRecorder::channel("node-1", 100);
        let shared = Arc::new(WorkerShared {
            runtime: runtime.clone(),
            api: api.clone(),
            host_ip: "192.0.2.1".into(),
            events,
        });
        let pod = Arc::new(fixtures::pod("Always", &[], &["app"]));
        let (pods, receiver) = watch::channel(Some(pod.clone()));
        let wake = Arc::new(Notify::new());
        let worker = tokio::spawn(run(shared, "u1".into(), receiver, wake.clone()));

        let status = until(&api, "phase Running", |s| s["phase"] == "Running").await;
        assert_eq!(status["podIP"], "10.0.0.7");
        assert_eq!(status["hostIP"], "192.0.2.1");

        // The first crash restarts at once; the second waits in CrashLoopBackOff.
        runtime.exit("app", 1);
        wake.notify_one();
        until(&api, "restartCount 1", |s| {
            s["containerStatuses"][0]["restartCount"] == 1
        })
        .await;
        runtime.exit("app", 1);
        wake.notify_one();
        let status = until(&api, "CrashLoopBackOff", |s| {
            s["containerStatuses"][0]["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        })
        .await;
        assert_eq!(
            status["containerStatuses"][0]["lastState"]["terminated"]["exitCode"],
            1
        );
        assert_eq!(status["phase"], "Running");
        // However often the worker wakes during the back-off, it is one event.
        for _ in 0..3 {
            wake.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut backoffs = Vec::new();
        while let Ok(event) = recorded.try_recv() {
            if event.reason.as_deref() == Some("BackOff") {
                backoffs.push(event);
            }
        }
        assert_eq!(backoffs.len(), 1, "{backoffs:#?}");
        assert_eq!(backoffs[0].type_.as_deref(), Some("Warning"));
        assert_eq!(
            backoffs[0].message.as_deref(),
            Some("Back-off restarting failed container app in pod web_default(u1)")
        );
        assert_eq!(
            backoffs[0].involved_object.field_path.as_deref(),
            Some("spec.containers{app}")
        );

        // Deletion: whatever runs is stopped with the pod's grace, everything removed and
        // released, then the object deleted for good.
        delete_and_join(&pod, &pods, worker).await;
        assert!(*api.deleted.lock().unwrap());
        let calls = runtime.calls.lock().unwrap().clone();
        assert_eq!(calls[..3], ["sandbox", "start app 0", "start app 1"]);
        assert_eq!(calls.last().unwrap(), "release u1");
        assert!(runtime.records.lock().unwrap().is_empty(), "{calls:?}");
    }

    /// A worker running over a fake machine and API.
    struct Harness {
        runtime: Arc<FakeRuntime>,
        api: Arc<FakeApi>,
        /// Sends the worker new versions of its pod.
        pods: watch::Sender<Option<Arc<Pod>>>,
        wake: Arc<Notify>,
        worker: tokio::task::JoinHandle<()>,
    }

    /// Sends the worker its pod marked deleted with a grace of 7 s, and waits for the
    /// worker to finish.
    async fn delete_and_join(
        pod: &Pod,
        pods: &watch::Sender<Option<Arc<Pod>>>,
        worker: tokio::task::JoinHandle<()>,
    ) {
        let mut deleting = pod.clone();
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        deleting.metadata.deletion_grace_period_seconds = Some(7);
        pods.send_replace(Some(Arc::new(deleting)));
        tokio::time::timeout(Duration::from_secs(5), worker)
            .await
            .unwrap()
            .unwrap();
    }

    fn spawn_worker(pod: &Arc<Pod>) -> Harness {
        let runtime = Arc::new(FakeRuntime::default());
        let api = Arc::new(FakeApi::default());
        let (events, _recorded) = EventRecorder::channel("node-1", 100);
        let shared = Arc::new(WorkerShared {
            runtime: runtime.clone(),
            api: api.clone(),
            host_ip: "192.0.2.1".into(),
            events,
        });
        let (pods, receiver) = watch::channel(Some(pod.clone()));
        let wake = Arc::new(Notify::new());
        let worker = tokio::spawn(run(shared, "u1".into(), receiver, wake.clone()));
        Harness {
            runtime,
            api,
            pods,
            wake,
            worker,
        }
    }

    #[tokio::test]
    async fn a_pod_with_a_sidecar_completes_when_its_app_container_does() {
        let pod = Arc::new(fixtures::with_sidecars(
            fixtures::pod("Never", &["proxy"], &["app"]),
            &["proxy"],
        ));
        // The sender stays alive: a worker whose pod channel closes stops.
        let Harness {
            runtime,
            api,
            pods: _pods,
            wake,
            worker,
        } = spawn_worker(&pod);
        // The sidecar starts first; once it runs (it has no startup probe) the app does,
        // without any other event waking the worker.
        let status = until(&api, "phase Running", |s| s["phase"] == "Running").await;
        assert_eq!(status["initContainerStatuses"][0]["started"], true);
        assert_eq!(
            runtime.calls.lock().unwrap()[..3],
            ["sandbox", "start proxy 0", "start app 0"]
        );

        // The app container exits 0 while the sidecar runs: the sidecar is stopped and
        // the pod succeeds, its resources released.
        runtime.exit("app", 0);
        wake.notify_one();
        let status = until(&api, "phase Succeeded", |s| s["phase"] == "Succeeded").await;
        assert_eq!(
            status["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
            143
        );
        let released = async {
            while !runtime
                .calls
                .lock()
                .unwrap()
                .contains(&"release u1".to_string())
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), released)
            .await
            .expect("the pod released");
        let calls = runtime.calls.lock().unwrap().clone();
        assert!(calls.contains(&"stop proxy-0 30s".to_string()), "{calls:?}");
        assert!(
            !calls.iter().any(|c| c.starts_with("start proxy 1")),
            "{calls:?}"
        );
        worker.abort();
    }

    #[tokio::test]
    async fn deletion_stops_sidecars_after_the_app_containers_last_declared_first() {
        let pod = Arc::new(fixtures::with_sidecars(
            fixtures::pod("Always", &["logs", "setup", "proxy"], &["app", "web"]),
            &["logs", "proxy"],
        ));
        let Harness {
            runtime,
            api,
            pods,
            wake,
            worker,
        } = spawn_worker(&pod);
        until(&api, "setup running", |s| {
            s["initContainerStatuses"][1]["state"]["running"].is_object()
        })
        .await;
        runtime.exit("setup", 0);
        wake.notify_one();
        until(&api, "phase Running", |s| s["phase"] == "Running").await;

        delete_and_join(&pod, &pods, worker).await;
        let calls = runtime.calls.lock().unwrap().clone();
        let starts: Vec<&str> = calls
            .iter()
            .filter(|c| c.starts_with("start"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            starts,
            [
                "start logs 0",
                "start setup 0",
                "start proxy 0",
                "start app 0",
                "start web 0"
            ]
        );
        let stops: Vec<&str> = calls
            .iter()
            .filter_map(|c| c.strip_prefix("stop "))
            .filter_map(|c| c.split(' ').next())
            .collect();
        let app_first = stops[..2].contains(&"app-0") && stops[..2].contains(&"web-0");
        assert!(app_first, "{calls:?}");
        assert_eq!(stops[2..], ["proxy-0", "logs-0"], "{calls:?}");
    }
}
