//! The agent's [`PodRuntime`]: pod sandboxes from the sandbox, CNI and cgroup managers,
//! containers as containerd containers and tasks (native API), images from the image
//! service, logs through the `log-driver`, exits from containerd's event stream.
//!
//! Everything a worker needs after a restart is in containerd (container labels hold the
//! pod, the container name, the attempt, the start and exit) or on disk (sandbox bind
//! mounts, the CNI result cache, cgroups), so the agent keeps no state of its own.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use containerd_client::services::v1::{
    Container as CtrContainer, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteTaskRequest, GetContainerRequest, GetRequest, KillRequest, ListContainersRequest,
    StartRequest, SubscribeRequest, UpdateContainerRequest, WaitRequest,
    container::Runtime as CtrRuntime,
};
use futures::StreamExt as _;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container, Pod, Secret, ServiceAccount};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Code;

use super::env::{Objects, container_env};
use super::model::labels::{EXIT_CODE, EXIT_REASON, FINISHED_AT, STARTED_AT};
use super::model::{ContainerRecord, Kind, RunState, labels};
use super::rootfs_view;
use super::runtime::{PodRuntime, RuntimeError, SandboxInfo, StartError};
use super::spec::{BindMount, ContainerSpecInput, ImageDefaults, PodNamespaces, container_spec};
use super::user::UserRequest;
use super::volumes;
use crate::cgroups::{CgroupConfig, CgroupManager, PodCgroup};
use crate::cni::{self, Attachment, NetworkConfigList};
use crate::config::AgentConfig;
use crate::containerd::{self, Client, runtime_spec_any};
use crate::events::{EventRecorder, EventType};
use crate::image::keyring::Keyring;
use crate::image::{
    Credentials, ImageError, ImageInfo, ImageService, PullPolicy, Reference, RegistryConfig,
};
use crate::logs;
use crate::sandbox::{self, Namespace, files::DnsSettings, files::NodeFiles, files::PodFiles};

/// The OCI runtime containerd runs containers with.
const RUNTIME: &str = "io.containerd.runc.v2";
/// How long to wait for a container to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// The node's hosts file, which `hostNetwork` pods get (the kubelet's `etcHostsPath`).
const NODE_HOSTS_FILE: &str = "/etc/hosts";

/// Whether the pod shares the node's network (and UTS) namespace.
fn host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

/// The namespaces a pod's sandbox owns: a `hostNetwork` pod shares the node's network and
/// UTS namespaces, as the kubelet's pods do, and keeps an IPC namespace of its own.
fn sandbox_namespaces(pod: &Pod) -> &'static [Namespace] {
    if host_network(pod) {
        &[Namespace::Ipc]
    } else {
        &Namespace::ALL
    }
}

pub struct NodeRuntime {
    config: AgentConfig,
    client: kube::Client,
    containerd: Client,
    images: ImageService,
    cgroups: CgroupManager,
    cni: cni::Runtime,
    network: Mutex<Option<NetworkConfigList>>,
    dns: DnsSettings,
    agent_binary: PathBuf,
    host_ip: String,
    /// containerd container ID → pod UID, to route exits to workers.
    owners: Arc<Mutex<HashMap<String, String>>>,
    allocatable: BTreeMap<String, String>,
    /// Pulling, Pulled, Created, Started: what happens inside a container's start.
    events: EventRecorder,
    executor: crate::exec::Executor,
    /// The machine's memory in bytes, for containers' `oom_score_adj`.
    memory_capacity: u64,
}

fn runtime_error(error: impl Into<anyhow::Error>) -> RuntimeError {
    RuntimeError(error.into())
}

fn timestamp_from_proto(time: Option<&prost_types::Timestamp>) -> Option<Timestamp> {
    let time = time?;
    Timestamp::new(time.seconds, time.nanos)
        .ok()
        .filter(|t| t.as_second() > 0)
}

/// A duration as Go prints one truncated to milliseconds (`523ms`, `2.538s`, `1m4.5s`), as
/// the kubelet's pull events show it.
fn go_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_string();
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let minutes = millis / 60_000;
    let seconds = (millis % 60_000) / 1000;
    let fraction = format!("{:03}", millis % 1000);
    let fraction = fraction.trim_end_matches('0');
    let seconds = if fraction.is_empty() {
        format!("{seconds}s")
    } else {
        format!("{seconds}.{fraction}s")
    };
    if minutes > 0 {
        format!("{minutes}m{seconds}")
    } else {
        seconds
    }
}

fn container_of<'a>(pod: &'a Pod, kind: Kind, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    match kind {
        Kind::Init => spec
            .init_containers
            .as_ref()?
            .iter()
            .find(|c| c.name == name),
        Kind::App => spec.containers.iter().find(|c| c.name == name),
    }
}

impl NodeRuntime {
    /// Connects to containerd, opens the cgroup subtree, loads the CNI configuration and
    /// starts routing container exits to `exits` (as pod UIDs). Containers' image pulls,
    /// creations and starts are recorded in `events`.
    pub async fn start(
        config: &AgentConfig,
        node_name: &str,
        client: kube::Client,
        host_ip: String,
        exits: mpsc::UnboundedSender<String>,
        events: EventRecorder,
    ) -> anyhow::Result<Self> {
        let containerd = Client::connect(&config.containerd_socket, &config.containerd_namespace)
            .await
            .with_context(|| {
                format!(
                    "connect to containerd at {}",
                    config.containerd_socket.display()
                )
            })?;
        let mount =
            crate::cgroups::find_cgroup2_mount(std::path::Path::new("/proc/self/mountinfo"))
                .context("find the cgroup2 mount")?;
        let subtree = match &config.cgroup_root {
            Some(root) => root.clone(),
            None => crate::cgroups::own_cgroup_v2(std::path::Path::new("/proc/self/cgroup"))
                .context("find the agent's own cgroup")?,
        };
        let mut cgroup_config = CgroupConfig::new(mount.mount_point.clone(), subtree);
        cgroup_config.resources.pod_pids_limit = config.pod_pids_limit;
        let cgroups =
            CgroupManager::open(cgroup_config).context("open the agent's cgroup subtree")?;
        let registry = RegistryConfig {
            plain_http: config.insecure_registries.clone(),
            ..RegistryConfig::default()
        };
        let images = ImageService::new(containerd.clone(), registry);
        let cni = cni::Runtime::new(
            config.cni_bin_dirs.clone(),
            cni::cni_cache_dir(&config.run_dir),
        );
        let network = cni::load_config_dir(&config.cni_conf_dir).ok();
        let dns = DnsSettings {
            cluster_dns: config.cluster_dns.clone(),
            cluster_domain: config.cluster_domain.clone(),
            resolv_conf: Some(config.resolv_conf.clone()),
            node_ips: vec![host_ip.parse().context("node IP")?],
        };
        let machine_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // The machine's memory, as the Node's capacity reports it: what the kubelet divides a
        // burstable container's memory request by for its oom_score_adj.
        let meminfo = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
        let memory_capacity = crate::node::meminfo_field(&meminfo, "MemTotal")
            .context("MemTotal missing from /proc/meminfo")?;
        let executor = crate::exec::Executor::new(containerd.clone(), config.run_dir.join("exec"));
        let runtime = Self {
            config: config.clone(),
            client,
            containerd,
            images,
            cgroups,
            cni,
            network: Mutex::new(network),
            dns,
            agent_binary: std::env::current_exe().context("find the agent's own binary")?,
            host_ip,
            owners: Arc::default(),
            allocatable: BTreeMap::from([("cpu".to_string(), machine_cpus.to_string())]),
            events,
            executor,
            memory_capacity,
        };
        runtime.follow_exits(exits);
        tracing::debug!(node = node_name, "container runtime ready");
        Ok(runtime)
    }

    /// Runs exec processes in containers: exec probes here, `kubectl exec` in the node API.
    pub fn executor(&self) -> &crate::exec::Executor {
        &self.executor
    }

    /// "containerd://<version>" for the Node's nodeInfo.
    /// The pods' cgroup directory (`<mount>/<subtree>/kubepods`).
    pub fn pods_cgroup_dir(&self) -> std::path::PathBuf {
        self.cgroups.kubepods_dir()
    }

    pub async fn version(&self) -> String {
        match self.containerd.server_version().await {
            Ok(version) => format!("containerd://{version}"),
            Err(_) => "containerd://unknown".to_string(),
        }
    }

    /// The pod's memory use from its cgroup, when the memory controller is there.
    pub fn pod_memory(&self, pod: &Pod) -> Option<u64> {
        let cgroup = PodCgroup::of(pod).ok()?;
        self.cgroups.pod_usage(&cgroup).ok()?.memory_current
    }

    /// Limits this node cannot enforce, one line each.
    pub fn unenforced(&self) -> Vec<String> {
        self.cgroups
            .unenforced()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Limits this node cannot enforce, with their controllers (for the Node's event).
    pub fn unenforced_limits(&self) -> &[crate::cgroups::Unenforced] {
        self.cgroups.unenforced()
    }

    /// Subscribes to task exits and wakes the owning pod's worker; resubscribes when
    /// containerd restarts.
    fn follow_exits(&self, exits: mpsc::UnboundedSender<String>) {
        let containerd = self.containerd.clone();
        let owners = self.owners.clone();
        tokio::spawn(async move {
            loop {
                let request = SubscribeRequest {
                    filters: vec!["topic==\"/tasks/exit\"".to_string()],
                };
                match containerd.events().subscribe(request).await {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        while let Some(Ok(envelope)) = stream.next().await {
                            if envelope.namespace != containerd.namespace() {
                                continue;
                            }
                            let Some(event) = envelope.event else {
                                continue;
                            };
                            let Ok(exit) =
                                containerd_client::events::TaskExit::decode(event.value.as_slice())
                            else {
                                continue;
                            };
                            let owner = owners
                                .lock()
                                .expect("owners lock")
                                .get(&exit.container_id)
                                .cloned();
                            if let Some(uid) = owner
                                && exits.send(uid).is_err()
                            {
                                return;
                            }
                        }
                    }
                    Err(status) => {
                        tracing::debug!(error = %status.message(), "subscribe to containerd events")
                    }
                }
                // containerd went away; the workers' own retries cover the gap.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    fn network(&self) -> Result<NetworkConfigList, StartError> {
        let mut network = self.network.lock().expect("network lock");
        if network.is_none() {
            *network = cni::load_config_dir(&self.config.cni_conf_dir).ok();
        }
        network.clone().ok_or_else(|| {
            StartError::new(
                "NetworkNotReady",
                format!(
                    "network is not ready: no CNI configuration in {}",
                    self.config.cni_conf_dir.display()
                ),
            )
        })
    }

    fn sandbox_error(message: impl std::fmt::Display) -> StartError {
        StartError::new("CreatePodSandboxError", message.to_string())
    }

    /// The containerd containers of a pod, or of every pod when `pod_uid` is `None`.
    async fn list(&self, pod_uid: Option<&str>) -> Result<Vec<CtrContainer>, RuntimeError> {
        let filter = match pod_uid {
            Some(uid) => format!("labels.\"{}\"=={uid}", labels::POD_UID),
            None => format!("labels.\"{}\"", labels::POD_UID),
        };
        let request = ListContainersRequest {
            filters: vec![filter],
        };
        let response = self
            .containerd
            .containers()
            .list(request)
            .await
            .map_err(|status| runtime_error(containerd::call_error("Containers.List")(status)))?;
        Ok(response.into_inner().containers)
    }

    async fn set_labels(&self, id: &str, new: &[(&str, String)]) -> Result<(), RuntimeError> {
        let mut container = CtrContainer {
            id: id.to_string(),
            ..Default::default()
        };
        let mut paths = Vec::new();
        for (key, value) in new {
            container.labels.insert(key.to_string(), value.clone());
            paths.push(format!("labels.{key}"));
        }
        let request = UpdateContainerRequest {
            container: Some(container),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        self.containerd
            .containers()
            .update(request)
            .await
            .map_err(|status| runtime_error(containerd::call_error("Containers.Update")(status)))?;
        Ok(())
    }

    /// Why an instance exited: OOMKilled when its cgroup saw an OOM kill, else by code.
    fn exit_reason(&self, container: &CtrContainer, exit_code: i32) -> String {
        let oom = (|| {
            let uid = container.labels.get(labels::POD_UID)?;
            let name = container.labels.get(labels::CONTAINER_NAME)?;
            let pods = self.cgroups.list_pods().ok()?;
            let pod = pods.iter().find(|p| p.uid() == uid)?;
            let usage = self.cgroups.container_usage(pod, name).ok()?;
            Some(
                usage
                    .memory_events
                    .is_some_and(|events| events.oom_kill > 0),
            )
        })()
        .unwrap_or(false);
        if oom {
            "OOMKilled".to_string()
        } else if exit_code == 0 {
            "Completed".to_string()
        } else {
            "Error".to_string()
        }
    }

    /// Reads one instance's state; an exited task is recorded in the container's labels
    /// and deleted, so that its shim goes away and the exit survives anything.
    async fn record(&self, container: &CtrContainer) -> Result<ContainerRecord, RuntimeError> {
        let label = |key: &str| container.labels.get(key).cloned().unwrap_or_default();
        let parse_time = |key: &str| {
            container
                .labels
                .get(key)
                .and_then(|t| t.parse::<Timestamp>().ok())
        };
        let mut record = ContainerRecord {
            id: container.id.clone(),
            name: label(labels::CONTAINER_NAME),
            kind: Kind::from_label(&label(labels::CONTAINER_KIND)),
            attempt: label(labels::ATTEMPT).parse().unwrap_or(0),
            image: label(labels::IMAGE),
            image_id: label(labels::IMAGE_ID),
            state: RunState::Created,
        };
        if let Some(code) = container.labels.get(EXIT_CODE).and_then(|c| c.parse().ok()) {
            record.state = RunState::Exited {
                exit_code: code,
                reason: label(EXIT_REASON),
                started_at: parse_time(STARTED_AT),
                finished_at: parse_time(FINISHED_AT).unwrap_or(Timestamp::UNIX_EPOCH),
            };
            return Ok(record);
        }
        let request = GetRequest {
            container_id: container.id.clone(),
            exec_id: String::new(),
        };
        let process = match self.containerd.tasks().get(request).await {
            Ok(response) => response.into_inner().process,
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => return Err(runtime_error(containerd::call_error("Tasks.Get")(status))),
        };
        let status = process.as_ref().map(|p| p.status);
        match status {
            Some(2) => {
                record.state = RunState::Running {
                    started_at: parse_time(STARTED_AT).unwrap_or_else(Timestamp::now),
                };
            }
            Some(1) => record.state = RunState::Created,
            Some(3) | None => {
                // Stopped, or no task at all (the agent died between create and start):
                // record the exit and let the shim go.
                let process = process.unwrap_or_default();
                let (code, finished) = if status.is_some() {
                    (
                        process.exit_status as i32,
                        timestamp_from_proto(process.exited_at.as_ref())
                            .unwrap_or_else(Timestamp::now),
                    )
                } else {
                    (128, Timestamp::now())
                };
                let reason = if status.is_some() {
                    self.exit_reason(container, code)
                } else {
                    "ContainerCannotRun".to_string()
                };
                self.set_labels(
                    &container.id,
                    &[
                        (EXIT_CODE, code.to_string()),
                        (EXIT_REASON, reason.clone()),
                        (FINISHED_AT, finished.to_string()),
                    ],
                )
                .await?;
                if status.is_some() {
                    self.delete_task(&container.id).await?;
                }
                record.state = RunState::Exited {
                    exit_code: code,
                    reason,
                    started_at: parse_time(STARTED_AT),
                    finished_at: finished,
                };
            }
            Some(_) => {
                record.state = RunState::Running {
                    started_at: parse_time(STARTED_AT).unwrap_or_else(Timestamp::now),
                };
            }
        }
        Ok(record)
    }

    async fn delete_task(&self, id: &str) -> Result<(), RuntimeError> {
        let request = DeleteTaskRequest {
            container_id: id.to_string(),
        };
        match self.containerd.tasks().delete(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(runtime_error(containerd::call_error("Tasks.Delete")(
                status,
            ))),
        }
    }

    async fn kill(&self, id: &str, signal: u32) -> Result<(), RuntimeError> {
        let request = KillRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
            signal,
            all: signal == nix::sys::signal::Signal::SIGKILL as u32,
        };
        match self.containerd.tasks().kill(request).await {
            Ok(_) => Ok(()),
            Err(status) if matches!(status.code(), Code::NotFound | Code::FailedPrecondition) => {
                Ok(())
            }
            Err(status) => Err(runtime_error(containerd::call_error("Tasks.Kill")(status))),
        }
    }

    /// Waits for the task to exit, up to `timeout`; true if it did.
    async fn wait(&self, id: &str, timeout: Duration) -> bool {
        let request = WaitRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        };
        let mut tasks = self.containerd.tasks();
        match tokio::time::timeout(timeout, tasks.wait(request)).await {
            Ok(Ok(_)) => true,
            Ok(Err(status)) => status.code() == Code::NotFound,
            Err(_) => false,
        }
    }

    async fn run_pre_stop(&self, pod: &Pod, record: &ContainerRecord, timeout: Duration) {
        let Some(container) = container_of(pod, record.kind, &record.name) else {
            return;
        };
        let Some(hook) = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
        else {
            return;
        };
        if let Some(exec) = &hook.exec {
            let command = exec.command.clone().unwrap_or_default();
            if let Err(error) = self.exec(record, &command, timeout).await {
                tracing::warn!(container = %record.name, error = %error, "preStop hook");
            }
        } else if let Some(http) = &hook.http_get {
            let probe = k8s_openapi::api::core::v1::Probe {
                http_get: Some(http.clone()),
                timeout_seconds: Some(timeout.as_secs().max(1) as i32),
                ..Default::default()
            };
            let ip = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default();
            super::probe::check_network(&probe, container, &ip).await;
        } else if let Some(sleep) = &hook.sleep {
            tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64).min(timeout)).await;
        }
    }

    /// The credentials the pod's image pull secrets, and its ServiceAccount's, hold for
    /// `image` ([`Keyring::lookup`]). A secret that cannot be read or parsed is left out
    /// with a warning, as the kubelet leaves it out.
    async fn pull_credentials(&self, pod: &Pod, image: &str) -> Vec<Credentials> {
        let Ok(reference) = Reference::parse(image) else {
            return Vec::new();
        };
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let spec = pod.spec.as_ref();
        let mut names: Vec<String> = spec
            .and_then(|s| s.image_pull_secrets.as_ref())
            .into_iter()
            .flatten()
            .map(|secret| secret.name.clone())
            .collect();
        let account = spec
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|name| !name.is_empty())
            .unwrap_or("default");
        let accounts: kube::Api<ServiceAccount> =
            kube::Api::namespaced(self.client.clone(), namespace);
        match accounts.get_opt(account).await {
            Ok(Some(account)) => names.extend(
                account
                    .image_pull_secrets
                    .into_iter()
                    .flatten()
                    .map(|secret| secret.name),
            ),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(namespace, account, error = %error, "read service account for its image pull secrets")
            }
        }
        let secrets: kube::Api<Secret> = kube::Api::namespaced(self.client.clone(), namespace);
        let mut keyring = Keyring::default();
        let mut seen = std::collections::HashSet::new();
        for name in names.into_iter().filter(|name| seen.insert(name.clone())) {
            let secret = match secrets.get(&name).await {
                Ok(secret) => secret,
                Err(error) => {
                    tracing::warn!(namespace, secret = %name, error = %error, "read image pull secret; the pull may not succeed");
                    continue;
                }
            };
            let data = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(key, value)| (key, value.0))
                .collect();
            let secret_type = secret.type_.as_deref().unwrap_or_default();
            if let Err(reason) = keyring.add_secret(secret_type, &data) {
                tracing::warn!(namespace, secret = %name, reason, "image pull secret");
            }
        }
        keyring.lookup(&reference)
    }

    /// Makes the container's image present as its pull policy says, recording the
    /// kubelet's events: Pulled (already present), or Pulling then Pulled or Failed.
    async fn ensure_image(
        &self,
        pod: &Pod,
        kind: Kind,
        container: &Container,
        image_name: &str,
        policy: PullPolicy,
    ) -> Result<ImageInfo, ImageError> {
        let record = |event_type, reason: &str, message: String| {
            self.events
                .container(pod, kind, &container.name, event_type, reason, message)
        };
        if policy != PullPolicy::Always
            && let Some(image) = self.images.get(image_name).await?
        {
            record(
                EventType::Normal,
                "Pulled",
                format!("Container image \"{image_name}\" already present on machine"),
            );
            return Ok(image);
        }
        if policy == PullPolicy::Never {
            let error = ImageError::NeverPull {
                reference: Reference::parse(image_name)?.to_string(),
            };
            record(
                EventType::Warning,
                "ErrImageNeverPull",
                format!(
                    "Container image \"{image_name}\" is not present with pull policy of Never"
                ),
            );
            return Err(error);
        }
        record(
            EventType::Normal,
            "Pulling",
            format!("Pulling image \"{image_name}\""),
        );
        let started = std::time::Instant::now();
        let credentials = self.pull_credentials(pod, image_name).await;
        match self
            .images
            .pull_with_credentials(image_name, &credentials)
            .await
        {
            Ok(image) => {
                let took = go_duration(started.elapsed());
                record(
                    EventType::Normal,
                    "Pulled",
                    format!(
                        "Successfully pulled image \"{image_name}\" in {took} ({took} including \
                         waiting). Image size: {} bytes.",
                        image.size
                    ),
                );
                Ok(image)
            }
            Err(error) => {
                record(
                    EventType::Warning,
                    "Failed",
                    format!("Failed to pull image \"{image_name}\": {error}"),
                );
                Err(error)
            }
        }
    }

    fn pod_cgroup(pod: &Pod) -> Result<PodCgroup, StartError> {
        PodCgroup::of(pod).map_err(|e| StartError::new("CreateContainerConfigError", e.to_string()))
    }

    /// Creates and starts one container; on failure removes what it made.
    async fn create_and_start(
        &self,
        pod: &Pod,
        kind: Kind,
        container: &Container,
        attempt: u32,
    ) -> Result<(), StartError> {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
        let image_name = container.image.as_deref().unwrap_or_default();
        let reference = Reference::parse(image_name)
            .map_err(|e| StartError::new("InvalidImageName", e.to_string()))?;
        let policy = PullPolicy::for_container(container.image_pull_policy.as_deref(), &reference)
            .map_err(|e| StartError::new("CreateContainerConfigError", e))?;
        let image = self
            .ensure_image(pod, kind, container, image_name, policy)
            .await
            .map_err(|e| StartError::new(e.kubelet_reason(), e.to_string()))?;

        let sandbox = sandbox::open(&self.config.run_dir, uid)
            .map_err(Self::sandbox_error)?
            .ok_or_else(|| Self::sandbox_error(format!("the sandbox of pod {uid} is gone")))?;
        let pod_ips: Vec<String> = self
            .cached_ips(pod)
            .into_iter()
            .map(|ip| ip.to_string())
            .collect();
        let objects = Objects {
            client: &self.client,
            namespace,
        };
        let env = container_env(
            &objects,
            pod,
            container,
            &self.host_ip,
            &pod_ips,
            &self.allocatable,
        )
        .await?;
        let volume_paths = volumes::prepare(
            &self.config.state_dir,
            pod,
            &objects,
            &self.host_ip,
            &pod_ips,
        )
        .await?;
        let mut mounts = volumes::container_mounts(container, &volume_paths)?;
        let mut etc = Vec::new();
        for (path, source) in [
            ("/etc/hosts", sandbox.hosts_path()),
            ("/etc/resolv.conf", sandbox.resolv_conf_path()),
            ("/etc/hostname", sandbox.hostname_path()),
        ] {
            if !mounts.iter().any(|m| m.destination == path) {
                etc.push(BindMount {
                    source,
                    destination: path.to_string(),
                    read_only: false,
                });
            }
        }
        let termination_path = container
            .termination_message_path
            .clone()
            .unwrap_or_else(|| "/dev/termination-log".to_string());
        let termination_file = sandbox
            .dir()
            .join("containers")
            .join(&container.name)
            .join("termination-log");
        if let Some(parent) = termination_file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                StartError::new(
                    "CreateContainerError",
                    format!("create {}: {e}", parent.display()),
                )
            })?;
        }
        std::fs::write(&termination_file, b"").map_err(|e| {
            StartError::new(
                "CreateContainerError",
                format!("create {}: {e}", termination_file.display()),
            )
        })?;
        etc.push(BindMount {
            source: termination_file,
            destination: termination_path,
            read_only: false,
        });
        mounts.extend(etc);

        let pod_cgroup = Self::pod_cgroup(pod)?;
        self.cgroups
            .apply_container(pod, &container.name)
            .map_err(|e| StartError::new("CreateContainerError", e.to_string()))?;
        let cgroups_path = self
            .cgroups
            .container_cgroups_path(&pod_cgroup, &container.name)
            .map_err(|e| StartError::new("CreateContainerError", e.to_string()))?;
        let hostname = sandbox.hostname().map_err(Self::sandbox_error)?;
        let namespaces = PodNamespaces {
            net: sandbox.own_namespace_path(Namespace::Net),
            ipc: sandbox.own_namespace_path(Namespace::Ipc),
            uts: sandbox.own_namespace_path(Namespace::Uts),
        };
        let defaults = ImageDefaults {
            entrypoint: image.config.entrypoint.clone(),
            cmd: image.config.cmd.clone(),
            env: image.config.env.clone(),
            working_dir: Some(image.config.working_dir.clone()).filter(|d| !d.is_empty()),
            user: Some(image.config.user.clone()).filter(|u| !u.is_empty()),
        };
        let log_path = logs::container_log_path(
            &self.config.pod_log_dir,
            namespace,
            pod_name,
            uid,
            &container.name,
            attempt,
        );
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                StartError::new(
                    "CreateContainerError",
                    format!("create {}: {e}", parent.display()),
                )
            })?;
        }
        // A restarted pod of the same attempt number (agent state lost) starts a fresh log.
        let _ = std::fs::remove_file(&log_path);
        let log_uri = logs::driver_uri(
            &self.agent_binary,
            &log_path,
            self.config.container_log_max_size,
            self.config.container_log_max_files,
        );

        let user_request = UserRequest::new(pod, container, defaults.user.as_deref())
            .map_err(|e| StartError::new("CreateContainerConfigError", e.to_string()))?;

        // The root filesystem comes first: who the process runs as is read from its
        // /etc/passwd and /etc/group. Whatever fails from here on removes it.
        let id = uuid::Uuid::new_v4().simple().to_string();
        let rootfs = self
            .images
            .prepare_rootfs(&image.chain_id, &id)
            .await
            .map_err(|e| StartError::new("CreateContainerError", e.to_string()))?;
        let spec_any = async {
            let scratch = self.config.run_dir.join("rootfs-views");
            let identity = rootfs_view::read_rootfs(&scratch, &id, rootfs.clone(), move |root| {
                user_request.resolve(root)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|resolved| resolved.map_err(|e| e.to_string()))
            .map_err(|message| StartError::new("CreateContainerError", message))?;
            let spec = container_spec(&ContainerSpecInput {
                container,
                image: &defaults,
                env: &env,
                namespaces: &namespaces,
                cgroups_path: &cgroups_path.to_string_lossy(),
                mounts: &mounts,
                hostname: &hostname,
                user: &identity,
                oom_score_adj: crate::cgroups::container_oom_score_adj(
                    pod,
                    container,
                    self.memory_capacity,
                ),
            })
            .map_err(|e| StartError::new("CreateContainerConfigError", e.to_string()))?;
            runtime_spec_any(&spec)
                .map_err(|e| StartError::new("CreateContainerError", e.to_string()))
        }
        .await;
        let spec_any = match spec_any {
            Ok(spec_any) => spec_any,
            Err(error) => {
                let _ = self.images.remove_rootfs(&id).await;
                return Err(error);
            }
        };

        let container_labels = [
            (labels::POD_UID, uid.to_string()),
            (labels::POD_NAME, pod_name.to_string()),
            (labels::POD_NAMESPACE, namespace.to_string()),
            (labels::CONTAINER_NAME, container.name.clone()),
            (labels::CONTAINER_KIND, kind.label().to_string()),
            (labels::ATTEMPT, attempt.to_string()),
            (labels::IMAGE, image_name.to_string()),
            (labels::IMAGE_ID, image.id.clone()),
            (labels::LOG_PATH, log_path.to_string_lossy().into_owned()),
        ];
        let request = CreateContainerRequest {
            container: Some(CtrContainer {
                id: id.clone(),
                labels: container_labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                image: image.name.clone(),
                runtime: Some(CtrRuntime {
                    name: RUNTIME.to_string(),
                    options: None,
                }),
                spec: Some(spec_any),
                snapshotter: self.images.snapshotter().to_string(),
                snapshot_key: id.clone(),
                ..Default::default()
            }),
        };
        if let Err(status) = self.containerd.containers().create(request).await {
            let _ = self.images.remove_rootfs(&id).await;
            return Err(StartError::new(
                "CreateContainerError",
                status.message().to_string(),
            ));
        }
        self.events.container(
            pod,
            kind,
            &container.name,
            EventType::Normal,
            "Created",
            format!("Created container: {}", container.name),
        );
        self.owners
            .lock()
            .expect("owners lock")
            .insert(id.clone(), uid.to_string());
        let started = async {
            let request = CreateTaskRequest {
                container_id: id.clone(),
                rootfs,
                stdout: log_uri.clone(),
                stderr: log_uri.clone(),
                ..Default::default()
            };
            self.containerd
                .tasks()
                .create(request)
                .await
                .map_err(|status| {
                    StartError::new("CreateContainerError", status.message().to_string())
                })?;
            let request = StartRequest {
                container_id: id.clone(),
                exec_id: String::new(),
            };
            self.containerd
                .tasks()
                .start(request)
                .await
                .map_err(|status| {
                    StartError::new("RunContainerError", status.message().to_string())
                })?;
            Ok::<(), StartError>(())
        }
        .await;
        let now = Timestamp::now();
        match started {
            Ok(()) => {
                self.events.container(
                    pod,
                    kind,
                    &container.name,
                    EventType::Normal,
                    "Started",
                    format!("Started container {}", container.name),
                );
                // The start time lives on the container so a restarted agent reports it.
                if let Err(error) = self.set_labels(&id, &[(STARTED_AT, now.to_string())]).await {
                    tracing::warn!(container = %id, error = %error, "record start time");
                }
                Ok(())
            }
            Err(error) => {
                // Keep the container as an exited instance so restarts count and back off.
                let _ = self.delete_task(&id).await;
                let _ = self
                    .set_labels(
                        &id,
                        &[
                            (EXIT_CODE, "128".to_string()),
                            (EXIT_REASON, "ContainerCannotRun".to_string()),
                            (FINISHED_AT, now.to_string()),
                        ],
                    )
                    .await;
                Err(error)
            }
        }
    }

    /// The pod's IPs from the CNI result cache; the node's for a `hostNetwork` pod.
    fn cached_ips(&self, pod: &Pod) -> Vec<std::net::IpAddr> {
        if host_network(pod) {
            return self.dns.node_ips.clone();
        }
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let Ok(network) = self.network() else {
            return Vec::new();
        };
        match self.cni.cached(&network.name, uid, cni::POD_IFNAME) {
            Ok(Some(cached)) => cached.result.sandbox_ips(cni::POD_IFNAME),
            _ => Vec::new(),
        }
    }
}

impl PodRuntime for NodeRuntime {
    async fn ensure_sandbox(&self, pod: &Pod) -> Result<SandboxInfo, StartError> {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        if pod.spec.as_ref().and_then(|s| s.host_ipc).unwrap_or(false) {
            return Err(Self::sandbox_error("hostIPC pods are not supported yet"));
        }
        self.cgroups
            .apply_pod(pod)
            .map_err(|e| Self::sandbox_error(format!("pod cgroup: {e}")))?;
        let names = sandbox::files::pod_hostname(pod, &self.dns.cluster_domain)
            .map_err(Self::sandbox_error)?;
        let sandbox = match sandbox::open(&self.config.run_dir, uid).map_err(Self::sandbox_error)? {
            Some(sandbox) => sandbox,
            None => sandbox::create_with(
                &self.config.run_dir,
                uid,
                &names.kernel_hostname,
                sandbox_namespaces(pod),
            )
            .map_err(Self::sandbox_error)?,
        };
        // A host-network pod has the node's addresses and no CNI attachment, so it runs
        // while the pod network is not ready, as the kubelet's do.
        let ips = match sandbox.own_netns_path() {
            None => self.dns.node_ips.clone(),
            Some(netns) => {
                let network = self.network()?;
                match self.cni.cached(&network.name, uid, cni::POD_IFNAME) {
                    Ok(Some(cached)) => cached.result.sandbox_ips(cni::POD_IFNAME),
                    _ => {
                        let attachment = Attachment::for_pod(namespace, name, uid, &netns)
                            .with_port_mappings(&cni::port_mappings(pod));
                        let result = self.cni.add(&network, &attachment).await.map_err(|e| {
                            Self::sandbox_error(format!(
                                "plugin type={:?} failed (add): {e}",
                                e.plugin().unwrap_or("?")
                            ))
                        })?;
                        result.sandbox_ips(cni::POD_IFNAME)
                    }
                }
            }
        };
        let node_resolv = self
            .dns
            .read_node_resolv_conf()
            .map_err(Self::sandbox_error)?;
        let files = if sandbox.owns(Namespace::Net) {
            PodFiles::for_pod(pod, &ips, &self.dns, node_resolv.as_deref())
                .map_err(Self::sandbox_error)?
        } else {
            let node = NodeFiles {
                hosts: std::fs::read_to_string(NODE_HOSTS_FILE).map_err(|e| {
                    Self::sandbox_error(format!("read node hosts file {NODE_HOSTS_FILE}: {e}"))
                })?,
                hostname: sandbox::node_hostname().map_err(Self::sandbox_error)?,
            };
            PodFiles::for_host_network_pod(pod, &self.dns, node_resolv.as_deref(), &node)
        };
        sandbox.write_files(&files).map_err(Self::sandbox_error)?;
        Ok(SandboxInfo {
            pod_ips: ips.iter().map(ToString::to_string).collect(),
        })
    }

    async fn containers(&self, pod_uid: &str) -> Result<Vec<ContainerRecord>, RuntimeError> {
        let containers = self.list(Some(pod_uid)).await?;
        let mut records = Vec::with_capacity(containers.len());
        for container in &containers {
            self.owners
                .lock()
                .expect("owners lock")
                .insert(container.id.clone(), pod_uid.to_string());
            records.push(self.record(container).await?);
        }
        Ok(records)
    }

    async fn start(
        &self,
        pod: &Pod,
        kind: Kind,
        name: &str,
        attempt: u32,
    ) -> Result<(), StartError> {
        let container = container_of(pod, kind, name).ok_or_else(|| {
            StartError::new(
                "CreateContainerConfigError",
                format!("pod has no container {name:?}"),
            )
        })?;
        self.create_and_start(pod, kind, container, attempt).await
    }

    async fn stop(
        &self,
        pod: &Pod,
        record: &ContainerRecord,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        let started = std::time::Instant::now();
        self.run_pre_stop(pod, record, grace).await;
        let remaining = grace.saturating_sub(started.elapsed());
        self.kill(&record.id, nix::sys::signal::Signal::SIGTERM as u32)
            .await?;
        if !self.wait(&record.id, remaining).await {
            self.kill(&record.id, nix::sys::signal::Signal::SIGKILL as u32)
                .await?;
            if !self.wait(&record.id, KILL_WAIT).await {
                return Err(runtime_error(anyhow::anyhow!(
                    "container {} ({}) did not exit after SIGKILL",
                    record.name,
                    record.id
                )));
            }
        }
        // Record the exit now rather than on the next pass.
        let request = GetContainerRequest {
            id: record.id.clone(),
        };
        if let Ok(response) = self.containerd.containers().get(request).await
            && let Some(container) = response.into_inner().container
        {
            self.record(&container).await?;
        }
        Ok(())
    }

    async fn remove(&self, record: &ContainerRecord) -> Result<(), RuntimeError> {
        self.delete_task(&record.id).await?;
        let request = DeleteContainerRequest {
            id: record.id.clone(),
        };
        match self.containerd.containers().delete(request).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => {
                return Err(runtime_error(containerd::call_error("Containers.Delete")(
                    status,
                )));
            }
        }
        self.images
            .remove_rootfs(&record.id)
            .await
            .map_err(runtime_error)?;
        self.owners.lock().expect("owners lock").remove(&record.id);
        Ok(())
    }

    async fn exec(
        &self,
        record: &ContainerRecord,
        command: &[String],
        timeout: Duration,
    ) -> Result<i32, RuntimeError> {
        let (code, output) = self
            .executor
            .run(&record.id, command, timeout)
            .await
            .map_err(runtime_error)?;
        if code != 0 {
            tracing::debug!(
                container = record.name,
                code,
                output = %String::from_utf8_lossy(&output),
                "exec probe command failed"
            );
        }
        Ok(code as i32)
    }

    async fn release(&self, pod_uid: &str, pod: Option<&Pod>) -> Result<(), RuntimeError> {
        let run_dir = &self.config.run_dir;
        let sandbox = sandbox::open(run_dir, pod_uid).ok().flatten();
        // A host-network pod was never attached: nothing to DEL. Its sandbox (or the pod,
        // once the sandbox is gone) says so.
        let attached = match (&sandbox, pod) {
            (Some(sandbox), _) => sandbox.owns(Namespace::Net),
            (None, Some(pod)) => !host_network(pod),
            (None, None) => true,
        };
        // The network first, while the namespace still exists.
        if attached && let Ok(network) = self.network() {
            let netns = sandbox.as_ref().and_then(sandbox::Sandbox::own_netns_path);
            let mut attachment = Attachment::new(pod_uid, cni::POD_IFNAME, netns);
            if let Some(pod) = pod {
                attachment.cni_args = cni::pod_cni_args(
                    pod.metadata.namespace.as_deref().unwrap_or("default"),
                    pod.metadata.name.as_deref().unwrap_or_default(),
                    pod_uid,
                    pod_uid,
                );
            }
            self.cni
                .del(&network, &attachment)
                .await
                .with_context(|| format!("CNI DEL for pod {pod_uid}"))?;
        }
        sandbox::remove(run_dir, pod_uid)
            .with_context(|| format!("remove the sandbox of pod {pod_uid}"))?;
        let cgroups = self.cgroups.list_pods().map_err(runtime_error)?;
        for cgroup in cgroups.iter().filter(|c| c.uid() == pod_uid) {
            self.cgroups.remove_pod(cgroup).map_err(runtime_error)?;
        }
        volumes::remove(&self.config.state_dir, pod_uid)
            .with_context(|| format!("remove the volumes of pod {pod_uid}"))?;
        // Logs go with the pod object; a finished pod keeps them for `kubectl logs`.
        let deleted = pod.is_none_or(|p| p.metadata.deletion_timestamp.is_some());
        if deleted {
            let containers = self.list(Some(pod_uid)).await?;
            for container in &containers {
                let record = self.record(container).await?;
                self.remove(&record).await?;
            }
            if let Some(pod) = pod {
                let dir = logs::pod_log_dir(
                    &self.config.pod_log_dir,
                    pod.metadata.namespace.as_deref().unwrap_or("default"),
                    pod.metadata.name.as_deref().unwrap_or_default(),
                    pod_uid,
                );
                let _ = std::fs::remove_dir_all(dir);
            } else if let Ok(entries) = std::fs::read_dir(&self.config.pod_log_dir) {
                for entry in entries.flatten() {
                    if entry
                        .file_name()
                        .to_string_lossy()
                        .ends_with(&format!("_{pod_uid}"))
                    {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        Ok(())
    }

    async fn known_pods(&self) -> Result<Vec<String>, RuntimeError> {
        let mut uids: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for container in self.list(None).await? {
            if let Some(uid) = container.labels.get(labels::POD_UID) {
                uids.insert(uid.clone());
            }
        }
        uids.extend(
            sandbox::list(&self.config.run_dir).map_err(|e| runtime_error(anyhow::anyhow!(e)))?,
        );
        for cgroup in self.cgroups.list_pods().map_err(runtime_error)? {
            uids.insert(cgroup.uid().to_string());
        }
        Ok(uids.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_durations_print_as_go_prints_them() {
        assert_eq!(go_duration(Duration::from_micros(900)), "0s");
        assert_eq!(go_duration(Duration::from_micros(523_400)), "523ms");
        assert_eq!(go_duration(Duration::from_millis(2538)), "2.538s");
        assert_eq!(go_duration(Duration::from_millis(2500)), "2.5s");
        assert_eq!(go_duration(Duration::from_secs(3)), "3s");
        assert_eq!(go_duration(Duration::from_millis(64_500)), "1m4.5s");
    }
}
