//! What the node API serves, read off the agent's own pods: the pod list, and for
//! `kubectl logs` the log file of a container's current or previous run and whether that
//! run still goes on.
//!
//! Which run a request means follows the kubelet (`validateContainerLogStatus`), read from
//! the status the pod's worker last wrote, or, until it wrote one (right after the agent
//! starts), from the API's copy in the [`PodTable`]. The worker's status is the newer: the
//! API's only catches up when the write comes back through the pod watch. A run is named by
//! its restartCount, which also names its log file ([`logs::container_log_path`]).
//!
//! A follower's `running` flag is one watch channel per container run. The worker's status
//! writes reach this module through [`ReportingPodApi`], and the first one that shows the
//! run no longer running turns the flag false; the flags of a pod that goes away are
//! dropped. Nothing polls.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use tokio::sync::watch;

use super::manager::PodTable;
use super::worker::PodApi;
use crate::logs;
use crate::node_api::{ContainerLogSource, LogLookupError, NodeState};

/// The [`NodeState`] of the agent: its pod table, its pods' reported statuses and the
/// running flags of followed logs.
pub struct AgentNodeState {
    pods: PodTable,
    pod_log_dir: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The container statuses (init and app) each worker last reported, by pod UID.
    reported: HashMap<String, Arc<Vec<RunStatus>>>,
    /// The running flag of every run a follower reads.
    followed: HashMap<RunKey, watch::Sender<bool>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RunKey {
    uid: String,
    container: String,
    restart_count: u32,
}

/// The run of a container a log request reads, by restartCount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LogRun {
    Running(u32),
    Finished(u32),
}

/// What a log lookup needs of one containerStatus, read leniently from the status JSON: a
/// field that is missing or odd reads as absent, so no report is ever thrown away whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RunStatus {
    name: String,
    restart_count: u32,
    container_id: Option<String>,
    running: bool,
    /// `state.terminated`, with its container ID (empty when that run was never created).
    terminated: Option<String>,
    waiting_reason: Option<String>,
    /// The container ID of `lastState.terminated`, when it names one.
    last_terminated: Option<String>,
}

/// The init and app container statuses of a pod status (`status` as JSON).
fn run_statuses(status: &Value) -> Vec<RunStatus> {
    let text = |value: &Value| {
        value
            .as_str()
            .filter(|text| !text.is_empty())
            .map(str::to_string)
    };
    ["initContainerStatuses", "containerStatuses"]
        .iter()
        .flat_map(|list| status[*list].as_array().into_iter().flatten())
        .filter_map(|container| {
            let state = &container["state"];
            Some(RunStatus {
                name: container["name"].as_str()?.to_string(),
                restart_count: container["restartCount"]
                    .as_u64()
                    .and_then(|count| u32::try_from(count).ok())
                    .unwrap_or(0),
                container_id: text(&container["containerID"]),
                running: state["running"].is_object(),
                terminated: state["terminated"]
                    .is_object()
                    .then(|| text(&state["terminated"]["containerID"]).unwrap_or_default()),
                waiting_reason: state["waiting"]
                    .is_object()
                    .then(|| text(&state["waiting"]["reason"]).unwrap_or_default()),
                last_terminated: text(&container["lastState"]["terminated"]["containerID"]),
            })
        })
        .collect()
}

/// The run the last state describes, if it is a terminated one with a container. While a
/// container waits to be started again (back-off), the worker reports its newest run as
/// the last state under the status's own container ID; otherwise the last state is the
/// run before the current one.
fn last_terminated_run(status: &RunStatus) -> Option<u32> {
    let id = status.last_terminated.as_deref()?;
    if status.container_id.as_deref() == Some(id) {
        Some(status.restart_count)
    } else {
        Some(status.restart_count.saturating_sub(1))
    }
}

/// The kubelet's choice of run, and its refusals, for a container of `pod`.
fn log_run(
    statuses: &[RunStatus],
    pod: &str,
    container: &str,
    previous: bool,
) -> Result<LogRun, LogLookupError> {
    let Some(status) = statuses.iter().find(|status| status.name == container) else {
        return Err(LogLookupError::not_available(container, pod));
    };
    if previous {
        return last_terminated_run(status)
            .map(LogRun::Finished)
            .ok_or_else(|| LogLookupError::previous_not_found(container, pod));
    }
    if status.running {
        return Ok(LogRun::Running(status.restart_count));
    }
    if let Some(terminated_id) = &status.terminated {
        if !terminated_id.is_empty() {
            return Ok(LogRun::Finished(status.restart_count));
        }
        // The next run was never created: the one before it is the log to show.
        return last_terminated_run(status)
            .map(LogRun::Finished)
            .ok_or_else(|| {
                LogLookupError::Unavailable(format!(
                    "container \"{container}\" in pod \"{pod}\" is terminated"
                ))
            });
    }
    if let Some(run) = last_terminated_run(status) {
        return Ok(LogRun::Finished(run));
    }
    if let Some(reason) = &status.waiting_reason {
        let why = match reason.as_str() {
            "ErrImagePull" => "image can't be pulled",
            "ImagePullBackOff" => "trying and failing to pull image",
            other => other,
        };
        return Err(LogLookupError::waiting(container, pod, why));
    }
    Err(LogLookupError::Unavailable(format!(
        "container \"{container}\" in pod \"{pod}\" is waiting to start - no logs yet"
    )))
}

fn has_container(pod: &Pod, container: &str) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.containers.iter().any(|c| c.name == container)
        || spec
            .init_containers
            .iter()
            .flatten()
            .any(|c| c.name == container)
        || spec
            .ephemeral_containers
            .iter()
            .flatten()
            .any(|c| c.name == container)
}

impl AgentNodeState {
    /// The state over the manager's pod table; logs are under `pod_log_dir`.
    pub fn new(pods: PodTable, pod_log_dir: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            pods,
            pod_log_dir,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pod `namespace/name` this node runs. Of two pods of that name (one being
    /// deleted, its successor already bound here), the one not being deleted.
    fn find_pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
        let mut found: Option<&Arc<Pod>> = None;
        for pod in pods.values() {
            if pod.metadata.namespace.as_deref() == Some(namespace)
                && pod.metadata.name.as_deref() == Some(name)
                && found.is_none_or(|other| other.metadata.deletion_timestamp.is_some())
            {
                found = Some(pod);
            }
        }
        found.cloned()
    }

    /// A status the worker of pod `uid` is writing: the runs it shows stopped stop their
    /// followers.
    pub fn observe_status(&self, uid: &str, status: &Value) {
        let statuses = run_statuses(status);
        let mut inner = self.inner();
        inner.followed.retain(|run, running| {
            if run.uid != uid {
                return true;
            }
            let still = statuses.iter().any(|status| {
                status.name == run.container
                    && status.restart_count == run.restart_count
                    && status.running
            });
            if !still {
                running.send_replace(false);
            }
            still
        });
        inner.reported.insert(uid.to_string(), Arc::new(statuses));
    }

    /// Pod `uid` is gone from this node: its followers stop and its reports are dropped.
    pub fn forget_pod(&self, uid: &str) {
        let mut inner = self.inner();
        inner.reported.remove(uid);
        // A dropped sender ends its followers once they read what is left.
        inner.followed.retain(|run, _| run.uid != uid);
    }

    /// A container of pod `uid` exited. A pod the API no longer has (a forced deletion)
    /// gets no more status writes, so its exits are what ends its followers.
    pub fn container_exited(&self, uid: &str) {
        let known = self
            .pods
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(uid);
        if !known {
            self.forget_pod(uid);
        }
    }
}

impl NodeState for AgentNodeState {
    fn pods(&self) -> Vec<Pod> {
        let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<Pod> = pods.values().map(|pod| Pod::clone(pod)).collect();
        list.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        list
    }

    fn container_log(
        &self,
        namespace: &str,
        pod_name: &str,
        container: &str,
        previous: bool,
    ) -> Result<ContainerLogSource, LogLookupError> {
        let pod =
            self.find_pod(namespace, pod_name)
                .ok_or_else(|| LogLookupError::PodNotFound {
                    pod: pod_name.to_string(),
                })?;
        if !has_container(&pod, container) {
            return Err(LogLookupError::container_not_found(container, pod_name));
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        // One lock over the choice of run and the flag's creation, so a status report
        // cannot slip between them and leave a stopped run flagged running.
        let mut inner = self.inner();
        let statuses = match inner.reported.get(&uid) {
            Some(reported) => reported.clone(),
            None => {
                let status = serde_json::to_value(&pod.status).unwrap_or_default();
                Arc::new(run_statuses(&status))
            }
        };
        let run = log_run(&statuses, pod_name, container, previous)?;
        let path = |restart_count| {
            logs::container_log_path(
                &self.pod_log_dir,
                namespace,
                pod_name,
                &uid,
                container,
                restart_count,
            )
        };
        match run {
            LogRun::Finished(restart_count) => {
                Ok(ContainerLogSource::finished(path(restart_count)))
            }
            LogRun::Running(restart_count) => {
                // Flags of followers that went away go with them.
                inner
                    .followed
                    .retain(|_, running| running.receiver_count() > 0);
                let key = RunKey {
                    uid: uid.clone(),
                    container: container.to_string(),
                    restart_count,
                };
                let running = inner
                    .followed
                    .entry(key)
                    .or_insert_with(|| watch::channel(true).0)
                    .subscribe();
                Ok(ContainerLogSource {
                    path: path(restart_count),
                    running,
                })
            }
        }
    }

    fn running_container(
        &self,
        namespace: &str,
        pod_name: &str,
        container: &str,
    ) -> Result<String, LogLookupError> {
        let pod =
            self.find_pod(namespace, pod_name)
                .ok_or_else(|| LogLookupError::PodNotFound {
                    pod: pod_name.to_string(),
                })?;
        let not_found = || LogLookupError::container_not_found(container, pod_name);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let statuses = match self.inner().reported.get(&uid) {
            Some(reported) => reported.clone(),
            None => {
                let status = serde_json::to_value(&pod.status).unwrap_or_default();
                Arc::new(run_statuses(&status))
            }
        };
        let status = statuses
            .iter()
            .find(|status| status.name == container && status.running)
            .ok_or_else(not_found)?;
        let id = status.container_id.as_deref().ok_or_else(not_found)?;
        // `containerd://<id>`: the runtime's scheme, then containerd's container ID.
        Ok(id.split_once("://").map_or(id, |(_, id)| id).to_string())
    }
}

/// The worker's [`PodApi`] with the node state told of every status the worker writes and
/// of every pod it finishes, before the API server is.
pub struct ReportingPodApi<A> {
    api: A,
    state: Arc<AgentNodeState>,
}

impl<A> ReportingPodApi<A> {
    pub fn new(api: A, state: Arc<AgentNodeState>) -> Self {
        Self { api, state }
    }
}

impl<A: PodApi> PodApi for ReportingPodApi<A> {
    async fn write_status(&self, pod: &Pod, status: Value) -> anyhow::Result<()> {
        if let Some(uid) = pod.metadata.uid.as_deref() {
            self.state.observe_status(uid, &status);
        }
        self.api.write_status(pod, status).await
    }

    async fn finish_deletion(&self, pod: &Pod) -> anyhow::Result<()> {
        if let Some(uid) = pod.metadata.uid.as_deref() {
            self.state.forget_pod(uid);
        }
        self.api.finish_deletion(pod).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;

    use super::*;

    fn statuses(value: Value) -> Vec<RunStatus> {
        run_statuses(&json!({ "containerStatuses": value }))
    }

    fn run(value: Value, previous: bool) -> Result<LogRun, LogLookupError> {
        log_run(&statuses(value), "web", "app", previous)
    }

    #[test]
    fn runs_are_chosen_as_the_kubelet_chooses_them() {
        // First run, running.
        let running = json!([{"name": "app", "image": "x", "imageID": "", "ready": true,
            "restartCount": 0, "containerID": "containerd://a",
            "state": {"running": {}}, "lastState": {}}]);
        assert_eq!(run(running.clone(), false), Ok(LogRun::Running(0)));
        assert_eq!(
            run(running, true),
            Err(LogLookupError::previous_not_found("app", "web"))
        );

        // Third run, running: the previous is the second.
        let restarted = json!([{"name": "app", "image": "x", "imageID": "", "ready": true,
            "restartCount": 2, "containerID": "containerd://c",
            "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 1, "containerID": "containerd://b"}}}]);
        assert_eq!(run(restarted.clone(), false), Ok(LogRun::Running(2)));
        assert_eq!(run(restarted, true), Ok(LogRun::Finished(1)));

        // Back-off after the second run (restartCount 1) exited: both the current log and
        // the previous one are that run's, as the kubelet shows them.
        let backing_off = json!([{"name": "app", "image": "x", "imageID": "", "ready": false,
            "restartCount": 1, "containerID": "containerd://b",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "containerID": "containerd://b"}}}]);
        assert_eq!(run(backing_off.clone(), false), Ok(LogRun::Finished(1)));
        assert_eq!(run(backing_off, true), Ok(LogRun::Finished(1)));

        // Exited for good.
        let exited = json!([{"name": "app", "image": "x", "imageID": "", "ready": false,
            "restartCount": 0, "containerID": "containerd://a",
            "state": {"terminated": {"exitCode": 0, "containerID": "containerd://a"}},
            "lastState": {}}]);
        assert_eq!(run(exited, false), Ok(LogRun::Finished(0)));
    }

    #[test]
    fn containers_without_a_log_are_refused_with_the_kubelets_messages() {
        let waiting = |reason: &str| {
            json!([{"name": "app", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": reason}}, "lastState": {}}])
        };
        assert_eq!(
            run(waiting("ContainerCreating"), false)
                .unwrap_err()
                .to_string(),
            "container \"app\" in pod \"web\" is waiting to start: ContainerCreating"
        );
        assert_eq!(
            run(waiting("ImagePullBackOff"), false)
                .unwrap_err()
                .to_string(),
            "container \"app\" in pod \"web\" is waiting to start: trying and failing to pull image"
        );
        assert_eq!(
            run(waiting("ErrImagePull"), false).unwrap_err().to_string(),
            "container \"app\" in pod \"web\" is waiting to start: image can't be pulled"
        );
        assert_eq!(
            run(json!([]), false).unwrap_err().to_string(),
            "container \"app\" in pod \"web\" is not available"
        );
        let unknown = json!([{"name": "app", "image": "x", "imageID": "", "ready": false,
            "restartCount": 0}]);
        assert_eq!(
            run(unknown, false).unwrap_err().to_string(),
            "container \"app\" in pod \"web\" is waiting to start - no logs yet"
        );
    }

    fn pod(uid: &str, status: Value) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "default", "uid": uid},
                "spec": {
                    "initContainers": [{"name": "setup", "image": "x"}],
                    "containers": [{"name": "app", "image": "x"}],
                },
                "status": status,
            }))
            .unwrap(),
        )
    }

    fn running_status(restart_count: u32) -> Value {
        json!({"containerStatuses": [{"name": "app", "image": "x", "imageID": "",
            "ready": true, "restartCount": restart_count,
            "containerID": format!("containerd://{restart_count}"),
            "state": {"running": {}}, "lastState": {}}]})
    }

    /// The refusal of a lookup (a source has no Debug to unwrap_err with).
    fn refusal(result: Result<ContainerLogSource, LogLookupError>) -> LogLookupError {
        match result {
            Ok(source) => panic!("expected a refusal, got {}", source.path.display()),
            Err(error) => error,
        }
    }

    fn state_with(pods: &[Arc<Pod>]) -> (Arc<AgentNodeState>, PodTable) {
        let table = PodTable::default();
        for pod in pods {
            table
                .write()
                .unwrap()
                .insert(pod.metadata.uid.clone().unwrap(), pod.clone());
        }
        (
            AgentNodeState::new(table.clone(), PathBuf::from("/logs")),
            table,
        )
    }

    #[test]
    fn lookups_name_the_log_file_and_refuse_unknown_pods_and_containers() {
        let (state, _) = state_with(&[pod("u1", running_status(3))]);
        let source = state.container_log("default", "web", "app", false).unwrap();
        assert_eq!(source.path, PathBuf::from("/logs/default_web_u1/app/3.log"));
        assert!(*source.running.borrow());
        assert_eq!(
            refusal(state.container_log("default", "nope", "app", false)),
            LogLookupError::PodNotFound { pod: "nope".into() }
        );
        assert_eq!(
            refusal(state.container_log("other", "web", "app", false)),
            LogLookupError::PodNotFound { pod: "web".into() }
        );
        assert_eq!(
            refusal(state.container_log("default", "web", "db", false)),
            LogLookupError::ContainerNotFound {
                pod: "web".into(),
                container: "db".into()
            }
        );
        // An init container of the spec without a status yet.
        assert_eq!(
            refusal(state.container_log("default", "web", "setup", false)),
            LogLookupError::not_available("setup", "web")
        );
        assert_eq!(state.pods().len(), 1);
    }

    #[test]
    fn the_workers_report_is_newer_than_the_apis_copy_and_stops_followers() {
        let (state, _) = state_with(&[pod("u1", running_status(0))]);
        let follower = state.container_log("default", "web", "app", false).unwrap();
        let second = state.container_log("default", "web", "app", false).unwrap();
        // A report that the same run still runs changes nothing.
        state.observe_status("u1", &running_status(0));
        assert!(*follower.running.borrow());
        assert!(follower.running.has_changed().is_ok());

        // The run exited and the worker waits to restart it: both followers stop.
        let backing_off = json!({"containerStatuses": [{"name": "app", "image": "x",
            "imageID": "", "ready": false, "restartCount": 0, "containerID": "containerd://0",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "containerID": "containerd://0"}}}]});
        state.observe_status("u1", &backing_off);
        for source in [&follower, &second] {
            assert!(!*source.running.borrow());
        }
        // The report is what later lookups read, while the table still says running.
        let after = state.container_log("default", "web", "app", false).unwrap();
        assert_eq!(after.path, PathBuf::from("/logs/default_web_u1/app/0.log"));
        assert!(!*after.running.borrow());

        // The next run starts: it is followed afresh, the previous is run 0.
        state.observe_status(
            "u1",
            &json!({"containerStatuses": [{"name": "app",
            "image": "x", "imageID": "", "ready": true, "restartCount": 1,
            "containerID": "containerd://1", "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 1, "containerID": "containerd://0"}}}]}),
        );
        let current = state.container_log("default", "web", "app", false).unwrap();
        assert_eq!(
            current.path,
            PathBuf::from("/logs/default_web_u1/app/1.log")
        );
        assert!(*current.running.borrow());
        let previous = state.container_log("default", "web", "app", true).unwrap();
        assert_eq!(
            previous.path,
            PathBuf::from("/logs/default_web_u1/app/0.log")
        );
        assert!(!*previous.running.borrow());
    }

    #[test]
    fn followers_of_a_pod_that_goes_away_stop() {
        let (state, table) = state_with(&[pod("u1", running_status(0))]);
        let follower = state.container_log("default", "web", "app", false).unwrap();
        // An exit of a pod the API still has changes nothing by itself.
        state.container_exited("u1");
        assert!(follower.running.has_changed().is_ok());
        // Forced deletion: the table loses the pod, then its containers exit.
        table.write().unwrap().remove("u1");
        state.container_exited("u1");
        assert!(follower.running.has_changed().is_err());

        let (state, _) = state_with(&[pod("u2", running_status(0))]);
        let follower = state.container_log("default", "web", "app", false).unwrap();
        state.forget_pod("u2");
        assert!(follower.running.has_changed().is_err());
    }

    #[test]
    fn a_pod_being_replaced_gives_way_to_its_successor() {
        let mut old = Pod::clone(&pod("old", running_status(4)));
        old.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2024-01-01T00:00:00Z".parse().unwrap(),
            ));
        let (state, _) = state_with(&[Arc::new(old), pod("new", running_status(0))]);
        let source = state.container_log("default", "web", "app", false).unwrap();
        assert_eq!(
            source.path,
            PathBuf::from("/logs/default_web_new/app/0.log")
        );
    }

    #[derive(Default)]
    struct CountingApi {
        writes: AtomicUsize,
        deletions: AtomicUsize,
    }

    impl PodApi for CountingApi {
        async fn write_status(&self, _: &Pod, _: Value) -> anyhow::Result<()> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        async fn finish_deletion(&self, _: &Pod) -> anyhow::Result<()> {
            self.deletions.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_reporting_api_tells_the_state_then_the_api_server() {
        let web = pod("u1", running_status(0));
        let (state, _) = state_with(std::slice::from_ref(&web));
        let api = ReportingPodApi::new(CountingApi::default(), state.clone());
        let follower = state.container_log("default", "web", "app", false).unwrap();
        // A field the typed PodStatus would refuse does not lose the report.
        api.write_status(
            &web,
            json!({"startTime": "whenever", "containerStatuses": []}),
        )
        .await
        .unwrap();
        assert!(!*follower.running.borrow());
        assert_eq!(api.api.writes.load(Ordering::SeqCst), 1);

        let again = state.container_log("default", "web", "app", false);
        assert_eq!(refusal(again), LogLookupError::not_available("app", "web"));
        api.finish_deletion(&web).await.unwrap();
        assert_eq!(api.api.deletions.load(Ordering::SeqCst), 1);
        assert!(state.inner().reported.is_empty());
    }
}
