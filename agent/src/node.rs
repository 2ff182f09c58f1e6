//! The agent's Node: registration with capacity and allocatable read off the machine, the
//! Lease in `kube-node-lease` renewed every few seconds, and the conditions
//! (Ready, MemoryPressure, DiskPressure, PIDPressure) reported when they change.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::cgroups::Unenforced;
use crate::config::AgentConfig;
use crate::events::{EventRecorder, EventType};
use crate::quantity;

/// The namespace node Leases live in.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// How long a Lease is valid without renewal, as the kubelet sets it.
const LEASE_DURATION_SECONDS: i32 = 40;
/// The kubelet's default hard eviction thresholds.
pub const DEFAULT_EVICTION_HARD: &str =
    "memory.available<100Mi,nodefs.available<10%,pid.available<5%";

/// One eviction threshold: an absolute amount or a share of the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    Bytes(u64),
    Percent(u64),
}

impl Threshold {
    /// Whether `available` out of `capacity` is below the threshold.
    pub fn crossed(self, available: u64, capacity: u64) -> bool {
        match self {
            Threshold::Bytes(bytes) => available < bytes,
            Threshold::Percent(percent) => {
                u128::from(available) * 100 < u128::from(capacity) * u128::from(percent)
            }
        }
    }

    /// The amount this threshold keeps back of `capacity`.
    pub fn of(self, capacity: u64) -> u64 {
        match self {
            Threshold::Bytes(bytes) => bytes.min(capacity),
            Threshold::Percent(percent) => capacity / 100 * percent,
        }
    }
}

/// Hard eviction thresholds in the kubelet's `--eviction-hard` syntax
/// (`memory.available<100Mi,nodefs.available<10%,pid.available<5%`). Below them the node
/// reports pressure and the eviction manager evicts pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub memory_available: Option<Threshold>,
    pub nodefs_available: Option<Threshold>,
    pub pid_available: Option<Threshold>,
}

impl Thresholds {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut thresholds = Thresholds {
            memory_available: None,
            nodefs_available: None,
            pid_available: None,
        };
        for item in text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let (signal, value) = item
                .split_once('<')
                .ok_or_else(|| format!("eviction threshold {item:?}: expected signal<value"))?;
            let threshold =
                match value.strip_suffix('%') {
                    Some(percent) => {
                        Threshold::Percent(percent.parse().ok().filter(|p| *p <= 100).ok_or_else(
                            || format!("eviction threshold {item:?}: bad percentage"),
                        )?)
                    }
                    None => Threshold::Bytes(
                        quantity::units(value)
                            .and_then(|v| u64::try_from(v).ok())
                            .ok_or_else(|| format!("eviction threshold {item:?}: bad quantity"))?,
                    ),
                };
            match signal {
                "memory.available" => thresholds.memory_available = Some(threshold),
                "nodefs.available" => thresholds.nodefs_available = Some(threshold),
                "pid.available" => thresholds.pid_available = Some(threshold),
                other => {
                    return Err(format!(
                        "eviction threshold {item:?}: signal {other:?} is not one of memory.available, nodefs.available, pid.available"
                    ));
                }
            }
        }
        Ok(thresholds)
    }
}

/// The kubelet version the node reports; kubectl and the scheduler only read it.
pub const KUBELET_VERSION: &str = "v1.33.0-skiff";

/// What the machine has, read once at start.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpus: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub boot_id: String,
    pub machine_id: String,
    pub kernel_version: String,
    pub os_image: String,
    pub hostname: String,
}

impl Machine {
    /// Reads the machine's CPUs, memory, the disk holding `state_dir`, and its identity.
    pub fn read(state_dir: &Path) -> anyhow::Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let meminfo = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
        let memory_bytes =
            meminfo_field(&meminfo, "MemTotal").context("MemTotal missing from /proc/meminfo")?;
        let disk = nix::sys::statvfs::statvfs(state_dir)
            .with_context(|| format!("statvfs {}", state_dir.display()))?;
        let uname = nix::sys::utsname::uname().context("uname")?;
        let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        let os_image = os_release
            .lines()
            .find_map(|line| line.strip_prefix("PRETTY_NAME="))
            .map(|value| value.trim_matches('"').to_string())
            .unwrap_or_else(|| "Linux".to_string());
        let read_id = |path: &str| {
            std::fs::read_to_string(path)
                .map(|text| text.trim().to_string())
                .unwrap_or_default()
        };
        Ok(Self {
            cpus,
            memory_bytes,
            disk_bytes: disk.blocks() * disk.fragment_size(),
            boot_id: read_id("/proc/sys/kernel/random/boot_id"),
            machine_id: read_id("/etc/machine-id"),
            kernel_version: uname.release().to_string_lossy().into_owned(),
            os_image,
            hostname: uname.nodename().to_string_lossy().into_owned(),
        })
    }
}

/// `field` of /proc/meminfo in bytes.
pub(crate) fn meminfo_field(meminfo: &str, field: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find(|line| line.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The eviction signals, as the kubelet names them, read from the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signals {
    pub memory_available: u64,
    pub memory_capacity: u64,
    pub nodefs_available: u64,
    pub nodefs_capacity: u64,
    pub pid_available: u64,
    pub pid_max: u64,
}

impl Signals {
    pub fn read(state_dir: &Path) -> anyhow::Result<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
        let memory_available = meminfo_field(&meminfo, "MemAvailable").unwrap_or(0);
        let memory_capacity = meminfo_field(&meminfo, "MemTotal").unwrap_or(0);
        let disk = nix::sys::statvfs::statvfs(state_dir)
            .with_context(|| format!("statvfs {}", state_dir.display()))?;
        let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(32768);
        // The fourth field of loadavg is "running/total" scheduling entities.
        let tasks: u64 = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|text| {
                let field = text.split_whitespace().nth(3)?;
                field.split('/').nth(1)?.parse().ok()
            })
            .unwrap_or(0);
        Ok(Self {
            memory_available,
            memory_capacity,
            nodefs_available: disk.blocks_available() * disk.fragment_size(),
            nodefs_capacity: disk.blocks() * disk.fragment_size(),
            pid_available: pid_max.saturating_sub(tasks),
            pid_max,
        })
    }

    pub fn memory_pressure(&self, thresholds: &Thresholds) -> bool {
        thresholds
            .memory_available
            .is_some_and(|t| t.crossed(self.memory_available, self.memory_capacity))
    }

    pub fn disk_pressure(&self, thresholds: &Thresholds) -> bool {
        thresholds
            .nodefs_available
            .is_some_and(|t| t.crossed(self.nodefs_available, self.nodefs_capacity))
    }

    pub fn pid_pressure(&self, thresholds: &Thresholds) -> bool {
        thresholds
            .pid_available
            .is_some_and(|t| t.crossed(self.pid_available, self.pid_max))
    }
}

/// What the Node reports besides its machine: the pieces that change while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub memory_pressure: bool,
    pub disk_pressure: bool,
    pub pid_pressure: bool,
    /// Limits the node cannot enforce (from the cgroup manager), named in Ready's message.
    pub unenforced: Vec<String>,
    /// Why the node is not ready, if it is not (e.g. the runtime is down).
    pub not_ready: Option<String>,
}

/// Everything the Node object is built from.
pub struct NodeInfo<'a> {
    pub name: &'a str,
    pub config: &'a AgentConfig,
    pub machine: &'a Machine,
    pub node_ip: IpAddr,
    pub runtime_version: &'a str,
    pub node_api_port: u16,
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|now| now.to_string())
        .unwrap_or_default()
}

fn now_micro() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Microsecond)
        .map(|now| now.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_default()
}

impl NodeInfo<'_> {
    /// Capacity, and allocatable = capacity - reservations - the hard eviction threshold,
    /// as the kubelet computes it.
    fn resources(&self) -> anyhow::Result<(Value, Value)> {
        let reserved_milli = quantity::milli_cpu(&self.config.reserved_cpu)
            .with_context(|| format!("--reserved-cpu {:?}", self.config.reserved_cpu))?;
        let reserved_memory = quantity::units(&self.config.reserved_memory)
            .with_context(|| format!("--reserved-memory {:?}", self.config.reserved_memory))?;
        let thresholds = Thresholds::parse(&self.config.eviction_hard)
            .map_err(|e| anyhow::anyhow!("--eviction-hard: {e}"))?;
        let machine = self.machine;
        let capacity = json!({
            "cpu": machine.cpus.to_string(),
            "memory": format!("{}Ki", machine.memory_bytes / 1024),
            "ephemeral-storage": format!("{}Ki", machine.disk_bytes / 1024),
            "pods": self.config.max_pods.to_string(),
            "hugepages-2Mi": "0",
            "hugepages-1Gi": "0",
        });
        let cpu_milli = (machine.cpus as i64 * 1000 - reserved_milli).max(0);
        let memory_kept = thresholds
            .memory_available
            .map_or(0, |t| t.of(machine.memory_bytes));
        let memory = (machine.memory_bytes as i64 - reserved_memory - memory_kept as i64).max(0);
        let disk = machine.disk_bytes
            - thresholds
                .nodefs_available
                .map_or(0, |t| t.of(machine.disk_bytes));
        let allocatable = json!({
            "cpu": if cpu_milli % 1000 == 0 { (cpu_milli / 1000).to_string() } else { format!("{cpu_milli}m") },
            "memory": format!("{}Ki", memory / 1024),
            "ephemeral-storage": disk.to_string(),
            "pods": self.config.max_pods.to_string(),
            "hugepages-2Mi": "0",
            "hugepages-1Gi": "0",
        });
        Ok((capacity, allocatable))
    }

    /// The Node's status as this agent reports it.
    pub fn status(&self, health: &Health) -> anyhow::Result<Value> {
        let (capacity, allocatable) = self.resources()?;
        let now = now_rfc3339();
        let condition = |kind: &str, on: bool, reason_on: &str, reason_off: &str, message: &str| {
            json!({
                "type": kind,
                "status": if on { "True" } else { "False" },
                "reason": if on { reason_on } else { reason_off },
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            })
        };
        let mut ready_message = match &health.not_ready {
            Some(reason) => reason.clone(),
            None => "kubelet is posting ready status".to_string(),
        };
        if !health.unenforced.is_empty() {
            ready_message.push_str("; limits not enforced on this node: ");
            ready_message.push_str(&health.unenforced.join("; "));
        }
        let machine = self.machine;
        Ok(json!({
            "capacity": capacity,
            "allocatable": allocatable,
            "conditions": [
                condition("MemoryPressure", health.memory_pressure, "KubeletHasInsufficientMemory",
                    "KubeletHasSufficientMemory",
                    if health.memory_pressure { "kubelet has insufficient memory available" } else { "kubelet has sufficient memory available" }),
                condition("DiskPressure", health.disk_pressure, "KubeletHasDiskPressure",
                    "KubeletHasNoDiskPressure",
                    if health.disk_pressure { "kubelet has disk pressure" } else { "kubelet has no disk pressure" }),
                condition("PIDPressure", health.pid_pressure, "KubeletHasInsufficientPID",
                    "KubeletHasSufficientPID",
                    if health.pid_pressure { "kubelet has insufficient PID available" } else { "kubelet has sufficient PID available" }),
                condition("Ready", health.not_ready.is_none(), "KubeletReady", "KubeletNotReady",
                    &ready_message),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.node_ip.to_string()},
                {"type": "Hostname", "address": machine.hostname},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.node_api_port}},
            "nodeInfo": {
                "machineID": machine.machine_id,
                "systemUUID": machine.machine_id,
                "bootID": machine.boot_id,
                "kernelVersion": machine.kernel_version,
                "osImage": machine.os_image,
                "containerRuntimeVersion": self.runtime_version,
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            },
        }))
    }

    fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), self.name.to_string()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            (
                "kubernetes.io/arch".to_string(),
                std::env::consts::ARCH.replace("x86_64", "amd64"),
            ),
        ]);
        labels.extend(self.config.node_labels.iter().cloned());
        labels
    }
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

/// Creates the Node or, when it exists, brings its labels, podCIDR and status up to date.
/// Returns the registered Node (its spec carries the podCIDR the agent must use).
pub async fn register(
    client: &kube::Client,
    info: &NodeInfo<'_>,
    health: &Health,
) -> anyhow::Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = info.status(health)?;
    let mut spec = json!({});
    if let Some(cidr) = &info.config.pod_cidr {
        spec = json!({"podCIDR": cidr, "podCIDRs": [cidr]});
    }
    let object = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": info.name, "labels": info.labels()},
        "spec": spec,
        "status": status,
    });
    let node: Node = serde_json::from_value(object).context("build the Node object")?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(error) if is_conflict(&error) => {
            let mut patch = json!({"metadata": {"labels": info.labels()}});
            if info.config.pod_cidr.is_some() {
                patch["spec"] = spec;
            }
            nodes
                .patch(info.name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .with_context(|| format!("update node {}", info.name))?;
        }
        Err(error) => return Err(error).with_context(|| format!("register node {}", info.name)),
    }
    // Status is written through its subresource, so a create that ignored it is completed.
    nodes
        .patch_status(
            info.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .with_context(|| format!("report status of node {}", info.name))
}

/// Reports the Node's status (conditions with fresh heartbeats).
pub async fn report(
    client: &kube::Client,
    info: &NodeInfo<'_>,
    health: &Health,
) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    // Conditions keep their lastTransitionTime unless their status changes.
    let mut status = info.status(health)?;
    if let Ok(current) = nodes.get_status(info.name).await {
        keep_transition_times(&mut status, &current);
    }
    nodes
        .patch_status(
            info.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .with_context(|| format!("report status of node {}", info.name))?;
    Ok(())
}

/// Copies each condition's lastTransitionTime from `current` when its status is unchanged.
fn keep_transition_times(status: &mut Value, current: &Node) {
    let Some(previous) = current.status.as_ref().and_then(|s| s.conditions.as_ref()) else {
        return;
    };
    let Some(conditions) = status["conditions"].as_array_mut() else {
        return;
    };
    for condition in conditions {
        let same = previous.iter().find(|old| {
            Some(old.type_.as_str()) == condition["type"].as_str()
                && Some(old.status.as_str()) == condition["status"].as_str()
        });
        if let Some(time) = same.and_then(|old| old.last_transition_time.as_ref()) {
            condition["lastTransitionTime"] = json!(time.0.to_string());
        }
    }
}

/// The reason of the Node's event naming the cgroup controllers it cannot enforce limits
/// with.
pub const CGROUP_CONTROLLERS_UNAVAILABLE: &str = "CgroupControllersUnavailable";

/// Records the Node's events of an agent start: `Starting`, and a warning naming the
/// cgroup controllers this machine does not give the agent (their limits go unenforced).
pub fn record_start(events: &EventRecorder, unenforced: &[Unenforced]) {
    events.node(EventType::Normal, "Starting", "Starting kubelet.");
    if let Some(message) = unenforced_message(unenforced) {
        events.node(EventType::Warning, CGROUP_CONTROLLERS_UNAVAILABLE, message);
    }
}

/// "cgroup controllers not available on this node: cpu, pids; pod limits not enforced:
/// cpu.weight, cpu.max, pids.max (<reason>; <reason>)", or `None` when every limit is
/// enforced.
pub fn unenforced_message(unenforced: &[Unenforced]) -> Option<String> {
    let mut controllers: Vec<String> = Vec::new();
    let mut settings: Vec<&str> = Vec::new();
    let mut reasons: Vec<&str> = Vec::new();
    for limit in unenforced {
        let controller = limit.controller.to_string();
        if !controllers.contains(&controller) {
            controllers.push(controller);
        }
        if !settings.contains(&limit.setting) {
            settings.push(limit.setting);
        }
        if !reasons.contains(&limit.reason.as_str()) {
            reasons.push(&limit.reason);
        }
    }
    (!controllers.is_empty()).then(|| {
        format!(
            "cgroup controllers not available on this node: {}; pod limits not enforced: {} \
             ({})",
            controllers.join(", "),
            settings.join(", "),
            reasons.join("; ")
        )
    })
}

/// Creates the node's Lease or renews it.
pub async fn renew_lease(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let patch = json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_SECONDS, "renewTime": now_micro()}});
    match leases
        .patch(name, &PatchParams::default(), &Patch::Merge(patch.clone()))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            let lease: Lease = serde_json::from_value(json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
                "spec": patch["spec"],
            }))?;
            leases
                .create(&PostParams::default(), &lease)
                .await
                .with_context(|| format!("create lease {LEASE_NAMESPACE}/{name}"))?;
            Ok(())
        }
        Err(error) => Err(error).with_context(|| format!("renew lease {LEASE_NAMESPACE}/{name}")),
    }
}

/// Renews the Lease every `period` until the task is dropped; failures are logged and
/// retried on the next tick (the node lifecycle controller decides what a stale Lease means).
pub async fn keep_lease(client: kube::Client, name: String, period: Duration) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if let Err(error) = renew_lease(&client, &name).await {
            tracing::warn!(error = format!("{error:#}"), "node lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unenforced_event_names_controllers_settings_and_reasons() {
        use crate::cgroups::Controller;
        let limit = |controller: Controller, setting: &'static str| Unenforced {
            controller,
            setting,
            value: None,
            reason: format!(
                "the {controller} controller is not available in the cgroup v2 hierarchy at /sys/fs/cgroup/unified"
            ),
        };
        assert_eq!(unenforced_message(&[]), None);
        let message = unenforced_message(&[
            limit(Controller::Cpu, "cpu.weight"),
            limit(Controller::Cpu, "cpu.max"),
            limit(Controller::Pids, "pids.max"),
        ])
        .unwrap();
        assert_eq!(
            message,
            "cgroup controllers not available on this node: cpu, pids; pod limits not \
             enforced: cpu.weight, cpu.max, pids.max (the cpu controller is not available in \
             the cgroup v2 hierarchy at /sys/fs/cgroup/unified; the pids controller is not \
             available in the cgroup v2 hierarchy at /sys/fs/cgroup/unified)"
        );
        let (events, mut recorded) = EventRecorder::channel("node-1", 10);
        record_start(&events, &[limit(Controller::Memory, "memory.max")]);
        let starting = recorded.try_recv().unwrap();
        assert_eq!(starting.reason.as_deref(), Some("Starting"));
        assert_eq!(starting.message.as_deref(), Some("Starting kubelet."));
        assert_eq!(starting.involved_object.kind.as_deref(), Some("Node"));
        let warning = recorded.try_recv().unwrap();
        assert_eq!(
            warning.reason.as_deref(),
            Some(CGROUP_CONTROLLERS_UNAVAILABLE)
        );
        assert_eq!(warning.type_.as_deref(), Some("Warning"));
        assert!(
            warning
                .message
                .unwrap()
                .starts_with("cgroup controllers not available on this node: memory;")
        );
    }

    #[test]
    fn meminfo_fields_are_bytes() {
        let text = "MemTotal:       24567124 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(meminfo_field(text, "MemTotal"), Some(24567124 * 1024));
        assert_eq!(meminfo_field(text, "MemAvailable"), Some(2048 * 1024));
        assert_eq!(meminfo_field(text, "Nope"), None);
    }

    #[test]
    fn pressure_follows_the_kubelet_thresholds() {
        let defaults = Thresholds::parse(DEFAULT_EVICTION_HARD).unwrap();
        assert_eq!(defaults.memory_available, Some(Threshold::Bytes(100 << 20)));
        assert_eq!(defaults.nodefs_available, Some(Threshold::Percent(10)));
        let healthy = Signals {
            memory_available: 1 << 30,
            memory_capacity: 4 << 30,
            nodefs_available: 50,
            nodefs_capacity: 100,
            pid_available: 30000,
            pid_max: 32768,
        };
        assert!(
            !healthy.memory_pressure(&defaults)
                && !healthy.disk_pressure(&defaults)
                && !healthy.pid_pressure(&defaults)
        );
        let starved = Signals {
            memory_available: 99 << 20,
            memory_capacity: 4 << 30,
            nodefs_available: 9,
            nodefs_capacity: 100,
            pid_available: 100,
            pid_max: 32768,
        };
        assert!(
            starved.memory_pressure(&defaults)
                && starved.disk_pressure(&defaults)
                && starved.pid_pressure(&defaults)
        );
        assert!(Thresholds::parse("memory.available<1Gi,cpu.idle<1").is_err());
        assert!(Thresholds::parse("memory.available=1Gi").is_err());
        assert!(Thresholds::parse("").unwrap().memory_available.is_none());
    }
}
