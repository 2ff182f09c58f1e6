//! The seam between a pod worker's decisions and the machine: sandbox, containers and
//! teardown. The agent's implementation composes containerd, CNI, cgroups and the sandbox
//! (`pods::node_runtime`); tests of the worker's logic drive it through a recording fake.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use super::model::{ContainerRecord, Kind};

/// The pod's network as the sandbox reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxInfo {
    pub pod_ips: Vec<String>,
}

/// Why a container could not start, in the words the kubelet reports it in
/// `state.waiting.reason` (ErrImagePull, ErrImageNeverPull, CreateContainerConfigError,
/// CreateContainerError, RunContainerError).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct StartError {
    pub reason: &'static str,
    pub message: String,
}

impl StartError {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    pub fn is_image_pull(&self) -> bool {
        self.reason == "ErrImagePull"
    }
}

/// A failure of the machine under the worker (containerd down, a syscall failed); the
/// worker retries it.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct RuntimeError(#[from] pub anyhow::Error);

pub trait PodRuntime: Send + Sync + 'static {
    /// Makes the pod's cgroup, namespaces, network and files exist (idempotent; adopts
    /// what an earlier run of the agent made).
    fn ensure_sandbox(
        &self,
        pod: &Pod,
    ) -> impl Future<Output = Result<SandboxInfo, StartError>> + Send;

    /// Every instance of the pod's containers that containerd holds.
    fn containers(
        &self,
        pod_uid: &str,
    ) -> impl Future<Output = Result<Vec<ContainerRecord>, RuntimeError>> + Send;

    /// Pulls the image as the pull policy says, creates the container and starts it.
    fn start(
        &self,
        pod: &Pod,
        kind: Kind,
        name: &str,
        attempt: u32,
    ) -> impl Future<Output = Result<(), StartError>> + Send;

    /// Runs the preStop hook, sends SIGTERM, waits up to `grace`, then SIGKILL; returns when
    /// the container has exited.
    fn stop(
        &self,
        pod: &Pod,
        record: &ContainerRecord,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Deletes an exited instance (task, container, rootfs snapshot).
    fn remove(
        &self,
        record: &ContainerRecord,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Runs `command` in a running container (exec probes), returning its exit code.
    fn exec(
        &self,
        record: &ContainerRecord,
        command: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<i32, RuntimeError>> + Send;

    /// Releases the pod's network, namespaces, cgroup and volumes; idempotent. Containers
    /// are stopped and removed before.
    fn release(
        &self,
        pod_uid: &str,
        pod: Option<&Pod>,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Pod UIDs that have anything on this machine (containers, sandboxes, cgroups).
    fn known_pods(&self) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;
}
