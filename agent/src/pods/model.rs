//! What the agent knows about a pod's containers: one record per container instance, read
//! back from containerd (labels and task state) so that it survives the agent's restarts.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container, Pod};

/// The labels the agent puts on every containerd container, so that after a restart it can
/// tell which pod and which Kubernetes container each one is.
pub mod labels {
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
    /// "init" or "app".
    pub const CONTAINER_KIND: &str = "io.skiff.container.kind";
    /// The restart count this instance was created for.
    pub const ATTEMPT: &str = "io.skiff.container.attempt";
    pub const IMAGE: &str = "io.skiff.container.image";
    pub const IMAGE_ID: &str = "io.skiff.container.image-id";
    /// The CRI log file of this instance.
    pub const LOG_PATH: &str = "io.skiff.container.log-path";

    // An instance's life, written by the agent (`pods/node_runtime.rs`) as it happens so
    // that a restarted agent, and `agentctl`, read it back from containerd.
    /// When the task started (RFC 3339).
    pub const STARTED_AT: &str = "io.skiff.container.started-at";
    /// The exit status; its presence marks the instance as exited.
    pub const EXIT_CODE: &str = "io.skiff.container.exit-code";
    /// "Completed", "Error", "OOMKilled", "ContainerCannotRun", ...
    pub const EXIT_REASON: &str = "io.skiff.container.exit-reason";
    /// When the task exited (RFC 3339).
    pub const FINISHED_AT: &str = "io.skiff.container.finished-at";
}

/// Whether a container is one of the pod's init containers or a regular one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Init,
    App,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Init => "init",
            Kind::App => "app",
        }
    }

    pub fn from_label(text: &str) -> Self {
        if text == "init" {
            Kind::Init
        } else {
            Kind::App
        }
    }
}

/// The state of one container instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// Created in containerd, its task not started (or not yet known to have started).
    Created,
    Running {
        started_at: Timestamp,
    },
    Exited {
        exit_code: i32,
        /// "Completed", "Error", "OOMKilled", ...
        reason: String,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
    },
}

/// One container instance as containerd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRecord {
    /// The containerd container ID.
    pub id: String,
    pub name: String,
    pub kind: Kind,
    /// The restart count this instance stands for (0 for the first).
    pub attempt: u32,
    pub image: String,
    pub image_id: String,
    pub state: RunState,
}

impl ContainerRecord {
    pub fn is_running(&self) -> bool {
        matches!(self.state, RunState::Running { .. } | RunState::Created)
    }

    pub fn exit_code(&self) -> Option<i32> {
        match self.state {
            RunState::Exited { exit_code, .. } => Some(exit_code),
            _ => None,
        }
    }
}

/// Why a container is waiting, as `containerStatuses[].state.waiting` says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// Whether an init container is a sidecar: a restartable init container (`restartPolicy:
/// Always`, Kubernetes 1.29+) that starts in init order, then runs beside the app
/// containers for the pod's whole life, restarted whatever the pod's restartPolicy.
pub fn is_sidecar(container: &Container) -> bool {
    container.restart_policy.as_deref() == Some("Always")
}

/// The pod's sidecars, in their order of declaration.
pub fn sidecars(pod: &Pod) -> impl Iterator<Item = &Container> {
    pod.spec
        .iter()
        .flat_map(|spec| spec.init_containers.iter().flatten())
        .filter(|container| is_sidecar(container))
}

/// The containers that run beside each other once the pod is initialized and that probes
/// watch: the sidecars, then the app containers.
pub fn long_running(pod: &Pod) -> impl Iterator<Item = &Container> {
    sidecars(pod).chain(pod.spec.iter().flat_map(|spec| spec.containers.iter()))
}

/// The latest and the previous instance of each container name, newest first.
pub fn latest<'a>(
    records: &'a [ContainerRecord],
    name: &str,
    kind: Kind,
) -> Option<&'a ContainerRecord> {
    records
        .iter()
        .filter(|record| record.name == name && record.kind == kind)
        .max_by_key(|record| record.attempt)
}

pub fn previous<'a>(
    records: &'a [ContainerRecord],
    name: &str,
    kind: Kind,
) -> Option<&'a ContainerRecord> {
    let newest = latest(records, name, kind)?;
    records
        .iter()
        .filter(|record| {
            record.name == name && record.kind == kind && record.attempt < newest.attempt
        })
        .max_by_key(|record| record.attempt)
}

/// Pods and records for the unit tests of the pure pod logic.
#[cfg(test)]
pub mod fixtures {
    use super::*;
    use serde_json::json;

    /// Pod `default/web` (uid `u1`) with busybox containers of these names.
    pub fn pod(policy: &str, init: &[&str], apps: &[&str]) -> Pod {
        let containers = |names: &[&str]| {
            names
                .iter()
                .map(|name| json!({"name": name, "image": "busybox"}))
                .collect::<Vec<_>>()
        };
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u1"},
            "spec": {"restartPolicy": policy, "initContainers": containers(init), "containers": containers(apps)},
        }))
        .unwrap()
    }

    /// The same pod with the init containers `names` made sidecars (`restartPolicy: Always`).
    pub fn with_sidecars(mut pod: Pod, names: &[&str]) -> Pod {
        let spec = pod.spec.as_mut().expect("pod spec");
        for init in spec.init_containers.iter_mut().flatten() {
            if names.contains(&init.name.as_str()) {
                init.restart_policy = Some("Always".into());
            }
        }
        pod
    }

    /// Instance `attempt` of container `name`, with ID `<name>-<attempt>`.
    pub fn record(name: &str, kind: Kind, attempt: u32, state: RunState) -> ContainerRecord {
        ContainerRecord {
            id: format!("{name}-{attempt}"),
            name: name.into(),
            kind,
            attempt,
            image: "busybox".into(),
            image_id: "sha256:abc".into(),
            state,
        }
    }

    pub fn exited(code: i32) -> RunState {
        RunState::Exited {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            started_at: Some(Timestamp::UNIX_EPOCH),
            finished_at: Timestamp::UNIX_EPOCH,
        }
    }

    pub fn running() -> RunState {
        RunState::Running {
            started_at: Timestamp::UNIX_EPOCH,
        }
    }
}
