//! What a pod's cgroups should hold, computed from the Pod with the kubelet's semantics:
//! the QoS class (`GetPodQOS`), pod-level limits (`ResourceConfigForPod`), container
//! limits (kuberuntime's `calculateLinuxResources` and MemoryQoS), and the conversions
//! between Kubernetes CPU, CFS shares and cgroup v2 `cpu.weight`. Pure functions only.
//!
//! Pod-level `spec.resources` (the PodLevelResources feature, off by default in 1.33) is
//! ignored, as a kubelet with default feature gates ignores it.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::CgroupError;
use crate::quantity::{self, Nanos};

/// The fewest CFS shares a cgroup gets (the kernel's minimum).
pub const MIN_SHARES: u64 = 2;
/// The most CFS shares a cgroup gets (the kernel's maximum).
pub const MAX_SHARES: u64 = 262_144;
const SHARES_PER_CPU: i64 = 1024;
const MILLI_CPU_PER_CPU: i64 = 1000;
/// The CFS period the kubelet uses unless its CPUCFSQuotaPeriod gate says otherwise, in µs.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest CFS quota the kubelet writes (1 ms), in µs.
pub const MIN_QUOTA_US: i64 = 1000;

/// A cgroup v2 controller the manager enables and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    Cpu,
    Memory,
    Pids,
}

impl Controller {
    /// Every controller the manager asks for, in the order it enables them.
    pub const ALL: [Controller; 3] = [Controller::Cpu, Controller::Memory, Controller::Pids];

    /// The controller's name in `cgroup.controllers`.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
        }
    }

    /// The files of this controller the manager writes.
    pub fn settings(self) -> &'static [&'static str] {
        match self {
            Controller::Cpu => &["cpu.weight", "cpu.max"],
            Controller::Memory => &["memory.max", "memory.high"],
            Controller::Pids => &["pids.max"],
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A pod's quality-of-service class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// The name the API uses in `status.qosClass`.
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }

    /// The class named by `status.qosClass`, if it is one.
    pub fn from_api(name: &str) -> Option<Self> {
        match name {
            "Guaranteed" => Some(QosClass::Guaranteed),
            "Burstable" => Some(QosClass::Burstable),
            "BestEffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }

    /// The tier directory under `kubepods` (Guaranteed pods sit in `kubepods` itself).
    pub fn tier_dir(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One value for one cgroup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub controller: Controller,
    /// The file name, e.g. `cpu.max`.
    pub file: &'static str,
    /// What is written, e.g. `20000 100000`.
    pub value: String,
}

impl Setting {
    fn new(controller: Controller, file: &'static str, value: String) -> Self {
        Setting {
            controller,
            file,
            value,
        }
    }

    /// Whether the value is the kernel's default, so that leaving it unwritten loses
    /// nothing (`max`, `max 100000`).
    pub fn is_default(&self) -> bool {
        self.value == "max" || self.value.starts_with("max ")
    }
}

/// The node-wide knobs of the computation, the kubelet's flags of the same meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceOptions {
    /// Enforce CPU limits with CFS quota (`--cpu-cfs-quota`, default true).
    pub cpu_cfs_quota: bool,
    /// The CFS period in µs.
    pub cpu_period_us: u64,
    /// MemoryQoS' throttling factor (`memoryThrottlingFactor`, default 0.9); `None`
    /// writes no `memory.high`.
    pub memory_throttling_factor: Option<f64>,
    /// The machine's page size in bytes; `memory.high` is a whole number of pages.
    pub page_size: u64,
    /// `pids.max` of every pod cgroup (`--pod-max-pids`); `None` is `max`.
    pub pod_pids_limit: Option<u64>,
}

impl Default for ResourceOptions {
    fn default() -> Self {
        ResourceOptions {
            cpu_cfs_quota: true,
            cpu_period_us: CPU_PERIOD_US,
            memory_throttling_factor: Some(0.9),
            page_size: 4096,
            pod_pids_limit: None,
        }
    }
}

/// The limits of a pod cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodResources {
    pub qos: QosClass,
    pub cpu_shares: u64,
    /// CFS quota in µs per period; `None` is no quota (`max`).
    pub cpu_quota_us: Option<i64>,
    pub cpu_period_us: u64,
    /// `None` is no limit (`max`).
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
}

impl PodResources {
    /// The files and values of the pod cgroup.
    pub fn settings(&self) -> Vec<Setting> {
        vec![
            cpu_weight(self.cpu_shares),
            cpu_max(self.cpu_quota_us, self.cpu_period_us),
            Setting::new(Controller::Memory, "memory.max", max_or(self.memory_max)),
            Setting::new(Controller::Pids, "pids.max", max_or(self.pids_max)),
        ]
    }
}

/// The limits of a container cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerResources {
    pub cpu_shares: u64,
    /// CFS quota in µs per period; `None` is no quota (`max`).
    pub cpu_quota_us: Option<i64>,
    pub cpu_period_us: u64,
    /// `None` is no limit (`max`).
    pub memory_max: Option<u64>,
    /// `None` is no throttling (`max`).
    pub memory_high: Option<u64>,
}

impl ContainerResources {
    /// The files and values of the container cgroup.
    pub fn settings(&self) -> Vec<Setting> {
        vec![
            cpu_weight(self.cpu_shares),
            cpu_max(self.cpu_quota_us, self.cpu_period_us),
            Setting::new(Controller::Memory, "memory.max", max_or(self.memory_max)),
            Setting::new(Controller::Memory, "memory.high", max_or(self.memory_high)),
        ]
    }
}

fn cpu_weight(shares: u64) -> Setting {
    Setting::new(
        Controller::Cpu,
        "cpu.weight",
        shares_to_weight(shares).to_string(),
    )
}

/// `cpu.max` as runc writes it from a quota and period: `max <period>` without a quota.
fn cpu_max(quota_us: Option<i64>, period_us: u64) -> Setting {
    let value = match quota_us {
        Some(quota) if quota > 0 => format!("{quota} {period_us}"),
        _ => format!("max {period_us}"),
    };
    Setting::new(Controller::Cpu, "cpu.max", value)
}

fn max_or(value: Option<u64>) -> String {
    value.map_or_else(|| "max".to_string(), |v| v.to_string())
}

/// The kubelet's `MilliCPUToShares`: 1024 shares per CPU, at least 2, at most 262144.
pub fn milli_cpu_to_shares(milli_cpu: i64) -> u64 {
    if milli_cpu == 0 {
        // The kernel's default for "unset" would be 1024; 2 matches "no request".
        return MIN_SHARES;
    }
    let shares = milli_cpu.saturating_mul(SHARES_PER_CPU) / MILLI_CPU_PER_CPU;
    shares.clamp(MIN_SHARES as i64, MAX_SHARES as i64) as u64
}

/// runc's conversion of CFS shares to cgroup v2 `cpu.weight` (1..10000), which the
/// kubelet relies on: `1 + ((shares - 2) * 9999) / 262142`.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(MIN_SHARES, MAX_SHARES);
    1 + ((shares - MIN_SHARES) * 9999) / (MAX_SHARES - MIN_SHARES)
}

/// The kubelet's `MilliCPUToQuota`: the share of `period_us` the CPUs allow, at least
/// 1 ms; 0 (no quota) for no CPU.
pub fn milli_cpu_to_quota(milli_cpu: i64, period_us: i64) -> i64 {
    if milli_cpu == 0 {
        return 0;
    }
    (milli_cpu.saturating_mul(period_us) / MILLI_CPU_PER_CPU).max(MIN_QUOTA_US)
}

/// `memory.high` of a container as the kubelet's MemoryQoS sets it, for a container whose
/// memory limit is above its request (never a Guaranteed one, whose limits equal their
/// requests):
///
/// `memory.high = floor[(requests.memory + factor × (limits.memory − requests.memory)) /
/// pageSize] × pageSize`
///
/// computed in float64 as the kubelet does. `None` when the container has no limit or a
/// limit equal to its request, or when the result would not be above the request.
pub fn memory_high(request: i64, limit: i64, factor: f64, page_size: i64) -> Option<i64> {
    if limit == 0 || request == limit || page_size <= 0 {
        return None;
    }
    let (request_f, limit_f) = (request as f64, limit as f64);
    let floored = (request_f + (limit_f - request_f) * factor).floor();
    let high = (floored / page_size as f64) as i64 * page_size;
    (high != 0 && high > request).then_some(high)
}

/// The kubelet's `oom_score_adj` of a guaranteed (or critical) pod's containers.
const GUARANTEED_OOM_SCORE_ADJ: i32 = -997;
/// The kubelet's `oom_score_adj` of a best-effort pod's containers.
const BEST_EFFORT_OOM_SCORE_ADJ: i32 = 1000;
/// `system-cluster-critical`'s priority; a pod at or above it is critical.
const SYSTEM_CRITICAL_PRIORITY: i32 = 2_000_000_000;

/// The `oom_score_adj` the kubelet gives a container (`GetContainerOOMScoreAdjust`), so the
/// kernel's OOM killer takes best-effort containers first, then burstable ones by how little
/// memory they asked for, and guaranteed and critical ones last: critical or Guaranteed
/// −997; BestEffort 1000; Burstable `1000 − 1000 × request / capacity`, kept within 3..=999.
pub fn container_oom_score_adj(pod: &Pod, container: &Container, memory_capacity: u64) -> i32 {
    let priority = spec_of(pod).priority.unwrap_or(0);
    if priority >= SYSTEM_CRITICAL_PRIORITY {
        return GUARANTEED_OOM_SCORE_ADJ;
    }
    match compute_pod_qos(pod) {
        Ok(QosClass::Guaranteed) => GUARANTEED_OOM_SCORE_ADJ,
        Ok(QosClass::BestEffort) => BEST_EFFORT_OOM_SCORE_ADJ,
        // An unparsable quantity never reaches here (the pod's cgroup refused it first);
        // burstable is the neutral answer.
        Ok(QosClass::Burstable) | Err(_) => {
            let request = container_list(container, Kind::Requests)
                .map_or(0, |list| quantity::value(list.memory));
            let capacity = i128::from(memory_capacity.max(1));
            let adj = 1000 - (1000 * i128::from(request)) / capacity;
            let adj = i32::try_from(adj).unwrap_or(i32::MIN);
            if adj < 1000 + GUARANTEED_OOM_SCORE_ADJ {
                1000 + GUARANTEED_OOM_SCORE_ADJ
            } else if adj == BEST_EFFORT_OOM_SCORE_ADJ {
                BEST_EFFORT_OOM_SCORE_ADJ - 1
            } else {
                adj
            }
        }
    }
}

/// The CPU and memory of one resource list, in nano-units; an absent resource is zero,
/// which is how every kubelet computation used here treats it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct CpuMemory {
    cpu: Nanos,
    memory: Nanos,
}

impl CpuMemory {
    fn add(self, other: Self) -> Self {
        CpuMemory {
            cpu: self.cpu + other.cpu,
            memory: self.memory + other.memory,
        }
    }

    fn max(self, other: Self) -> Self {
        CpuMemory {
            cpu: self.cpu.max(other.cpu),
            memory: self.memory.max(other.memory),
        }
    }
}

type ResourceList = BTreeMap<String, Quantity>;

fn parse_quantity(
    list: Option<&ResourceList>,
    resource: &str,
    field: impl Fn() -> String,
) -> Result<Option<Nanos>, CgroupError> {
    let Some(quantity) = list.and_then(|list| list.get(resource)) else {
        return Ok(None);
    };
    quantity::parse(&quantity.0)
        .map(Some)
        .map_err(|reason| CgroupError::Quantity {
            field: field(),
            value: quantity.0.clone(),
            reason,
        })
}

fn parse_cpu_memory(
    list: Option<&ResourceList>,
    field: impl Fn(&str) -> String,
) -> Result<CpuMemory, CgroupError> {
    Ok(CpuMemory {
        cpu: parse_quantity(list, "cpu", || field("cpu"))?.unwrap_or(0),
        memory: parse_quantity(list, "memory", || field("memory"))?.unwrap_or(0),
    })
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Requests,
    Limits,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Limits => "limits",
        }
    }
}

fn container_list(container: &Container, kind: Kind) -> Result<CpuMemory, CgroupError> {
    let resources = container.resources.as_ref();
    let list = match kind {
        Kind::Requests => resources.and_then(|r| r.requests.as_ref()),
        Kind::Limits => resources.and_then(|r| r.limits.as_ref()),
    };
    parse_cpu_memory(list, |resource| {
        format!("container {} {}.{resource}", container.name, kind.name())
    })
}

fn is_restartable_init_container(container: &Container) -> bool {
    container.restart_policy.as_deref() == Some("Always")
}

/// The pod's effective requests or limits from its containers, as component-helpers'
/// `AggregateContainerRequests`/`AggregateContainerLimits` compute them: the sum of the
/// containers and sidecars (restartable init containers), or the largest init-time use
/// if that is more, where an init container's use is its own plus the sidecars started
/// before it. `each` sees every container's and init-time use, as the kubelet's
/// `ContainerFn` does.
fn aggregate(
    spec: &PodSpec,
    kind: Kind,
    each: &mut dyn FnMut(CpuMemory),
) -> Result<CpuMemory, CgroupError> {
    let mut total = CpuMemory::default();
    for container in &spec.containers {
        let list = container_list(container, kind)?;
        each(list);
        total = total.add(list);
    }
    let mut sidecars = CpuMemory::default();
    let mut init_peak = CpuMemory::default();
    for container in spec.init_containers.iter().flatten() {
        let list = container_list(container, kind)?;
        let in_use = if is_restartable_init_container(container) {
            total = total.add(list);
            sidecars = sidecars.add(list);
            sidecars
        } else {
            list.add(sidecars)
        };
        each(in_use);
        init_peak = init_peak.max(in_use);
    }
    Ok(total.max(init_peak))
}

fn overhead(spec: &PodSpec) -> Result<CpuMemory, CgroupError> {
    parse_cpu_memory(spec.overhead.as_ref(), |resource| {
        format!("pod overhead.{resource}")
    })
}

/// The pod's requests with its overhead, as `resource.PodRequests`.
fn pod_requests(spec: &PodSpec) -> Result<CpuMemory, CgroupError> {
    Ok(aggregate(spec, Kind::Requests, &mut |_| {})?.add(overhead(spec)?))
}

fn empty_spec() -> &'static PodSpec {
    static EMPTY: std::sync::OnceLock<PodSpec> = std::sync::OnceLock::new();
    EMPTY.get_or_init(PodSpec::default)
}

fn spec_of(pod: &Pod) -> &PodSpec {
    pod.spec.as_ref().unwrap_or_else(|| empty_spec())
}

/// The pod's QoS class as the kubelet's `GetPodQOS`: `status.qosClass` when the API server
/// has set it, else computed from the spec.
pub fn pod_qos(pod: &Pod) -> Result<QosClass, CgroupError> {
    let persisted = pod.status.as_ref().and_then(|s| s.qos_class.as_deref());
    match persisted.and_then(QosClass::from_api) {
        Some(qos) => Ok(qos),
        None => compute_pod_qos(pod),
    }
}

/// `ComputePodQOS` of Kubernetes 1.33: BestEffort when no container (init containers
/// included) requests or limits CPU or memory; Guaranteed when every container limits
/// both and the summed requests equal the summed limits; Burstable otherwise.
pub fn compute_pod_qos(pod: &Pod) -> Result<QosClass, CgroupError> {
    let spec = spec_of(pod);
    let mut requests = CpuMemory::default();
    let mut limits = CpuMemory::default();
    let mut every_container_limited = true;
    for container in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        requests = requests.add(container_list(container, Kind::Requests)?);
        let container_limits = container_list(container, Kind::Limits)?;
        limits = limits.add(container_limits);
        if container_limits.cpu == 0 || container_limits.memory == 0 {
            every_container_limited = false;
        }
    }
    let named = |list: CpuMemory| usize::from(list.cpu > 0) + usize::from(list.memory > 0);
    if named(requests) == 0 && named(limits) == 0 {
        return Ok(QosClass::BestEffort);
    }
    let requests_met = (requests.cpu == 0 || requests.cpu == limits.cpu)
        && (requests.memory == 0 || requests.memory == limits.memory);
    if every_container_limited && requests_met && named(requests) == named(limits) {
        Ok(QosClass::Guaranteed)
    } else {
        Ok(QosClass::Burstable)
    }
}

/// The pod cgroup's limits, as the kubelet's `ResourceConfigForPod`: CPU shares from the
/// summed requests (init containers counted at their peak); CFS quota only when every
/// container (and every init-time use) has a CPU limit; a memory limit only when every
/// one has a memory limit; Guaranteed pods always get both; BestEffort pods get 2 shares
/// and nothing else. The pod's overhead is added to requests and to non-zero limits.
pub fn pod_resources(pod: &Pod, options: &ResourceOptions) -> Result<PodResources, CgroupError> {
    let spec = spec_of(pod);
    let requests = pod_requests(spec)?;
    let (mut cpu_limits_declared, mut memory_limits_declared) = (true, true);
    let mut limits = aggregate(spec, Kind::Limits, &mut |list| {
        cpu_limits_declared &= list.cpu != 0;
        memory_limits_declared &= list.memory != 0;
    })?;
    let overhead = overhead(spec)?;
    if limits.cpu != 0 {
        limits.cpu += overhead.cpu;
    }
    if limits.memory != 0 {
        limits.memory += overhead.memory;
    }

    let period = i64::try_from(options.cpu_period_us).unwrap_or(i64::MAX);
    let cpu_shares = milli_cpu_to_shares(quantity::milli_value(requests.cpu));
    let cpu_quota = if options.cpu_cfs_quota {
        milli_cpu_to_quota(quantity::milli_value(limits.cpu), period)
    } else {
        -1
    };
    let memory_limit = quantity::value(limits.memory);
    let positive = |value: i64| u64::try_from(value).ok().filter(|v| *v > 0);

    let qos = pod_qos(pod)?;
    let (cpu_shares, cpu_quota_us, memory_max) = match qos {
        QosClass::Guaranteed => (
            cpu_shares,
            Some(cpu_quota).filter(|q| *q > 0),
            positive(memory_limit),
        ),
        QosClass::Burstable => (
            cpu_shares,
            Some(cpu_quota).filter(|q| cpu_limits_declared && *q > 0),
            positive(memory_limit).filter(|_| memory_limits_declared),
        ),
        QosClass::BestEffort => (MIN_SHARES, None, None),
    };
    Ok(PodResources {
        qos,
        cpu_shares,
        cpu_quota_us,
        cpu_period_us: options.cpu_period_us,
        memory_max,
        pids_max: options.pod_pids_limit,
    })
}

/// A container cgroup's limits, as kuberuntime's `calculateLinuxResources` plus MemoryQoS'
/// `memory.high`: shares from the CPU request (from the limit when no request is given),
/// quota from the CPU limit, `memory.max` from the memory limit.
pub fn container_resources(
    container: &Container,
    options: &ResourceOptions,
) -> Result<ContainerResources, CgroupError> {
    let requests = container
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref());
    let field = |resource: &str| format!("container {} requests.{resource}", container.name);
    let cpu_request = parse_quantity(requests, "cpu", || field("cpu"))?;
    let memory_request = parse_quantity(requests, "memory", || field("memory"))?.unwrap_or(0);
    let limits = container_list(container, Kind::Limits)?;

    let cpu_for_shares = cpu_request.unwrap_or(limits.cpu);
    let cpu_shares = milli_cpu_to_shares(quantity::milli_value(cpu_for_shares));
    let period = i64::try_from(options.cpu_period_us).unwrap_or(i64::MAX);
    let cpu_quota_us = Some(milli_cpu_to_quota(
        quantity::milli_value(limits.cpu),
        period,
    ))
    .filter(|quota| options.cpu_cfs_quota && *quota > 0);
    let memory_limit = quantity::value(limits.memory);
    let page_size = i64::try_from(options.page_size).unwrap_or(4096);
    let memory_high = options.memory_throttling_factor.and_then(|factor| {
        memory_high(
            quantity::value(memory_request),
            memory_limit,
            factor,
            page_size,
        )
    });
    Ok(ContainerResources {
        cpu_shares,
        cpu_quota_us,
        cpu_period_us: options.cpu_period_us,
        memory_max: u64::try_from(memory_limit).ok().filter(|v| *v > 0),
        memory_high: memory_high.and_then(|v| u64::try_from(v).ok()),
    })
}

/// The burstable tier's CPU shares, as the kubelet's QoS manager sets them: from the sum
/// of the CPU requests of the Burstable pods among `pods` (the BestEffort tier always
/// has [`MIN_SHARES`]).
pub fn burstable_tier_shares(pods: &[Pod]) -> Result<u64, CgroupError> {
    let mut milli_cpu: i64 = 0;
    for pod in pods {
        if pod_qos(pod)? == QosClass::Burstable {
            let requests = pod_requests(spec_of(pod))?;
            milli_cpu = milli_cpu.saturating_add(quantity::milli_value(requests.cpu));
        }
    }
    Ok(milli_cpu_to_shares(milli_cpu))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ResourceRequirements;

    use super::*;

    fn list(cpu: &str, memory: &str) -> Option<ResourceList> {
        let mut list = ResourceList::new();
        if !cpu.is_empty() {
            list.insert("cpu".into(), Quantity(cpu.into()));
        }
        if !memory.is_empty() {
            list.insert("memory".into(), Quantity(memory.into()));
        }
        Some(list)
    }

    /// A container as upstream's tests build them: `(cpu, memory)` requests and limits,
    /// "" for absent.
    fn container(name: &str, requests: (&str, &str), limits: (&str, &str)) -> Container {
        Container {
            name: name.into(),
            resources: Some(ResourceRequirements {
                requests: list(requests.0, requests.1),
                limits: list(limits.0, limits.1),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sidecar(name: &str, requests: (&str, &str), limits: (&str, &str)) -> Container {
        Container {
            restart_policy: Some("Always".into()),
            ..container(name, requests, limits)
        }
    }

    fn pod(containers: Vec<Container>, init_containers: Vec<Container>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers,
                init_containers: Some(init_containers),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const MI: u64 = 1024 * 1024;

    #[test]
    fn oom_score_adj_follows_the_kubelets_policy() {
        // pkg/kubelet/qos/policy_test.go's cases, on an 8 GB machine.
        let capacity = 8_000_000_000;
        let adj =
            |c: Container| container_oom_score_adj(&pod(vec![c.clone()], vec![]), &c, capacity);
        assert_eq!(adj(container("c", ("", ""), ("", ""))), 1000);
        assert_eq!(adj(container("c", ("1", "1G"), ("1", "1G"))), -997);
        assert_eq!(adj(container("c", ("", "4G"), ("", ""))), 500);
        // Asking for the whole machine still ranks above guaranteed.
        assert_eq!(adj(container("c", ("", "8G"), ("", ""))), 3);
        // Burstable without a memory request ranks below best effort.
        assert_eq!(adj(container("c", ("100m", ""), ("", ""))), 999);
        // A critical pod ranks with guaranteed ones whatever its class.
        let best_effort = container("c", ("", ""), ("", ""));
        let mut critical = pod(vec![best_effort.clone()], vec![]);
        critical.spec.as_mut().unwrap().priority = Some(2_000_001_000);
        assert_eq!(
            container_oom_score_adj(&critical, &best_effort, capacity),
            -997
        );
    }

    #[test]
    fn milli_cpu_to_shares_matches_upstream() {
        // pkg/kubelet/cm/helpers_linux_test.go TestMilliCPUToShares.
        let cases = [
            (0, 2),
            (1, 2),
            (2, 2),
            (3, 3),
            (100, 102),
            (500, 512),
            (1000, 1024),
            (255_999, 255_999 * 1024 / 1000),
            (256_000, MAX_SHARES),
            (256_001, MAX_SHARES),
            (1_000_000, MAX_SHARES),
            (-1, MIN_SHARES),
            (-1_000_000, MIN_SHARES),
        ];
        for (milli_cpu, shares) in cases {
            assert_eq!(milli_cpu_to_shares(milli_cpu), shares, "{milli_cpu}m");
        }
    }

    #[test]
    fn milli_cpu_to_quota_matches_upstream() {
        // TestMilliCPUToQuota with the default 100 ms period.
        let cases = [
            (0, 0),
            (5, 1000),
            (9, 1000),
            (10, 1000),
            (200, 20_000),
            (500, 50_000),
            (1000, 100_000),
            (1500, 150_000),
        ];
        for (milli_cpu, quota) in cases {
            assert_eq!(
                milli_cpu_to_quota(milli_cpu, 100_000),
                quota,
                "{milli_cpu}m"
            );
        }
        // The tuned 5 ms period of TestResourceConfigForPod: 200m is 1000 µs.
        assert_eq!(milli_cpu_to_quota(200, 5000), 1000);
    }

    #[test]
    fn shares_to_weight_matches_runc() {
        // Upstream's TestCPUSharesEqualAfterV2RoundTrip: 50m -> 51 shares -> weight 2,
        // 100m -> 102 shares -> weight 4.
        assert_eq!(shares_to_weight(milli_cpu_to_shares(50)), 2);
        assert_eq!(shares_to_weight(milli_cpu_to_shares(100)), 4);
        assert_eq!(shares_to_weight(MIN_SHARES), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(MAX_SHARES), 10_000);
    }

    #[test]
    fn memory_high_follows_the_memory_qos_formula() {
        // kuberuntime's "Request128MBLimit256MB": floor((128Mi + 0.9 * 128Mi) / 4096) * 4096.
        let (request, limit) = (128 * MI as i64, 256 * MI as i64);
        let expected =
            ((request as f64 + (limit - request) as f64 * 0.9).floor() / 4096.0) as i64 * 4096;
        assert_eq!(memory_high(request, limit, 0.9, 4096), Some(expected));
        assert_eq!(expected, 255_012_864);
        // No limit, or a limit equal to the request (Guaranteed): nothing.
        assert_eq!(memory_high(request, 0, 0.9, 4096), None);
        assert_eq!(memory_high(request, request, 0.9, 4096), None);
        // A result not above the request is not written.
        assert_eq!(memory_high(4096, 4097, 0.9, 4096), None);
    }

    #[test]
    fn qos_matches_upstream_compute_pod_qos() {
        use QosClass::*;
        // pkg/apis/core/v1/helper/qos/qos_test.go TestComputePodQOS (container level).
        let cases = [
            (
                vec![container("g", ("100m", "100Mi"), ("100m", "100Mi"))],
                vec![],
                Guaranteed,
            ),
            (
                vec![
                    container("g1", ("100m", "100Mi"), ("100m", "100Mi")),
                    container("g2", ("100m", "100Mi"), ("100m", "100Mi")),
                ],
                vec![],
                Guaranteed,
            ),
            (
                vec![
                    container("b1", ("", ""), ("", "")),
                    container("b2", ("", ""), ("", "")),
                ],
                vec![],
                BestEffort,
            ),
            (vec![container("b", ("", ""), ("", ""))], vec![], BestEffort),
            (
                vec![
                    container("b", ("", ""), ("", "")),
                    container("u", ("1", ""), ("2", "")),
                ],
                vec![],
                Burstable,
            ),
            (
                vec![
                    container("b", ("", ""), ("", "")),
                    container("g", ("10m", "100Mi"), ("10m", "100Mi")),
                ],
                vec![],
                Burstable,
            ),
            (
                vec![container("u", ("", "100Mi"), ("", "100Mi"))],
                vec![],
                Burstable,
            ),
            (
                vec![container("u", ("100m", "100Mi"), ("", ""))],
                vec![],
                Burstable,
            ),
            (
                vec![
                    container("u", ("1", "100Mi"), ("2", "100Mi")),
                    container("g", ("100m", "100Mi"), ("100m", "100Mi")),
                ],
                vec![],
                Burstable,
            ),
            (
                vec![
                    container("u", ("100m", "100Mi"), ("200m", "200Mi")),
                    container("unbounded", ("100m", "100Mi"), ("", "")),
                ],
                vec![],
                Burstable,
            ),
            (
                vec![container("u", ("10m", "100Mi"), ("100m", "200Mi"))],
                vec![],
                Burstable,
            ),
            (
                vec![container("u", ("0", "0"), ("100m", "200Mi"))],
                vec![],
                Burstable,
            ),
            (
                vec![container("b", ("", ""), ("", ""))],
                vec![container("init", ("10m", "100Mi"), ("100m", "200Mi"))],
                Burstable,
            ),
        ];
        for (i, (containers, init, expected)) in cases.into_iter().enumerate() {
            assert_eq!(
                compute_pod_qos(&pod(containers, init)).unwrap(),
                expected,
                "case {i}"
            );
        }
    }

    #[test]
    fn hugepages_and_zero_quantities_leave_a_pod_best_effort() {
        let mut best_effort = container("b", ("0", "0"), ("0", "0"));
        let resources = best_effort.resources.as_mut().unwrap();
        for list in [&mut resources.requests, &mut resources.limits] {
            list.as_mut()
                .unwrap()
                .insert("hugepages-2Mi".into(), Quantity("1Gi".into()));
        }
        let pod = pod(vec![best_effort], vec![]);
        assert_eq!(compute_pod_qos(&pod).unwrap(), QosClass::BestEffort);
    }

    #[test]
    fn persisted_qos_class_wins() {
        let mut pod = pod(vec![container("b", ("", ""), ("", ""))], vec![]);
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            qos_class: Some("Burstable".into()),
            ..Default::default()
        });
        assert_eq!(pod_qos(&pod).unwrap(), QosClass::Burstable);
        assert_eq!(compute_pod_qos(&pod).unwrap(), QosClass::BestEffort);
    }

    fn resources(pod: &Pod, cpu_cfs_quota: bool) -> PodResources {
        let options = ResourceOptions {
            cpu_cfs_quota,
            ..ResourceOptions::default()
        };
        pod_resources(pod, &options).unwrap()
    }

    #[test]
    fn pod_resources_match_upstream_resource_config_for_pod() {
        // TestResourceConfigForPod, default period.
        let burstable_shares = milli_cpu_to_shares(100);
        let burstable_partial_shares = milli_cpu_to_shares(200);
        let burstable_quota = milli_cpu_to_quota(200, 100_000);
        let guaranteed_quota = milli_cpu_to_quota(100, 100_000);

        let best_effort = pod(vec![container("c", ("", ""), ("", ""))], vec![]);
        let got = resources(&best_effort, true);
        assert_eq!(got.qos, QosClass::BestEffort);
        assert_eq!(
            (got.cpu_shares, got.cpu_quota_us, got.memory_max),
            (MIN_SHARES, None, None)
        );

        let no_limits = pod(vec![container("c", ("100m", "100Mi"), ("", ""))], vec![]);
        let got = resources(&no_limits, true);
        assert_eq!(got.qos, QosClass::Burstable);
        assert_eq!(
            (got.cpu_shares, got.cpu_quota_us, got.memory_max),
            (burstable_shares, None, None)
        );

        let with_limits = pod(
            vec![container("c", ("100m", "100Mi"), ("200m", "200Mi"))],
            vec![],
        );
        let got = resources(&with_limits, true);
        assert_eq!(
            (got.cpu_shares, got.cpu_quota_us, got.memory_max),
            (burstable_shares, Some(burstable_quota), Some(200 * MI))
        );
        // Without CFS quota enforcement the quota is -1: no cpu.max limit.
        let got = resources(&with_limits, false);
        assert_eq!(
            (got.cpu_shares, got.cpu_quota_us, got.memory_max),
            (burstable_shares, None, Some(200 * MI))
        );

        let partial = pod(
            vec![
                container("a", ("100m", "100Mi"), ("200m", "200Mi")),
                container("b", ("100m", "100Mi"), ("", "")),
            ],
            vec![],
        );
        let got = resources(&partial, true);
        assert_eq!(
            (got.cpu_shares, got.cpu_quota_us, got.memory_max),
            (burstable_partial_shares, None, None)
        );

        let guaranteed = pod(
            vec![container("c", ("100m", "100Mi"), ("100m", "100Mi"))],
            vec![],
        );
        let got = resources(&guaranteed, true);
        assert_eq!(got.qos, QosClass::Guaranteed);
        assert_eq!(
            (got.cpu_shares, got.cpu_quota_us, got.memory_max),
            (
                milli_cpu_to_shares(100),
                Some(guaranteed_quota),
                Some(100 * MI)
            )
        );
        let got = resources(&guaranteed, false);
        assert_eq!(got.cpu_quota_us, None);
        assert_eq!(got.memory_max, Some(100 * MI));
    }

    #[test]
    fn pod_resources_with_init_containers_match_upstream() {
        // "burstable-partial-limits-with-init-containers": "100m" of memory is one byte.
        let pod = pod(
            vec![
                container("a", ("100m", "100m"), ("100m", "100Mi")),
                container("b", ("100m", "100m"), ("", "")),
            ],
            vec![
                container("i1", ("100m", "100m"), ("100m", "100Mi")),
                container("i2", ("100m", "100m"), ("", "")),
            ],
        );
        let got = resources(&pod, true);
        assert_eq!(got.qos, QosClass::Burstable);
        assert_eq!(
            (got.cpu_shares, got.cpu_quota_us, got.memory_max),
            (milli_cpu_to_shares(200), None, None)
        );
    }

    #[test]
    fn init_containers_count_at_their_peak_and_sidecars_add_up() {
        // Requests: containers 300m; init 1 alone 500m (more); sidecar 100m runs with
        // everything after it, so init 2 uses 700m + 100m and the total is 300m + 100m.
        let pod = pod(
            vec![container("app", ("300m", "64Mi"), ("1", "128Mi"))],
            vec![
                container("init1", ("500m", "32Mi"), ("500m", "32Mi")),
                sidecar("proxy", ("100m", "16Mi"), ("200m", "32Mi")),
                container("init2", ("700m", "16Mi"), ("1", "64Mi")),
            ],
        );
        let got = resources(&pod, true);
        assert_eq!(got.qos, QosClass::Burstable);
        // max(300m + 100m, 500m, 700m + 100m) = 800m.
        assert_eq!(got.cpu_shares, milli_cpu_to_shares(800));
        // Limits: max(1 + 200m, 500m, 1 + 200m) = 1200m; max(128Mi + 32Mi, 32Mi, 64Mi + 32Mi).
        assert_eq!(got.cpu_quota_us, Some(milli_cpu_to_quota(1200, 100_000)));
        assert_eq!(got.memory_max, Some(160 * MI));
    }

    #[test]
    fn an_unlimited_init_container_leaves_the_pod_without_that_limit() {
        let pod = pod(
            vec![container("app", ("100m", "64Mi"), ("1", "128Mi"))],
            vec![container("init", ("100m", "64Mi"), ("", "128Mi"))],
        );
        let got = resources(&pod, true);
        assert_eq!(got.cpu_quota_us, None);
        assert_eq!(got.memory_max, Some(128 * MI));
    }

    #[test]
    fn overhead_adds_to_requests_and_to_non_zero_limits() {
        let mut pod = pod(
            vec![container("app", ("100m", "64Mi"), ("", "128Mi"))],
            vec![],
        );
        pod.spec.as_mut().unwrap().overhead = list("250m", "32Mi");
        let got = resources(&pod, true);
        assert_eq!(got.cpu_shares, milli_cpu_to_shares(350));
        assert_eq!(got.cpu_quota_us, None);
        assert_eq!(got.memory_max, Some(160 * MI));
    }

    #[test]
    fn pod_settings_are_the_cgroup_files() {
        let pod = pod(
            vec![container("c", ("100m", "100Mi"), ("200m", "200Mi"))],
            vec![],
        );
        let options = ResourceOptions {
            pod_pids_limit: Some(1024),
            ..ResourceOptions::default()
        };
        let settings = pod_resources(&pod, &options).unwrap().settings();
        let files: Vec<(&str, &str)> = settings
            .iter()
            .map(|s| (s.file, s.value.as_str()))
            .collect();
        assert_eq!(
            files,
            [
                ("cpu.weight", "4"),
                ("cpu.max", "20000 100000"),
                ("memory.max", "209715200"),
                ("pids.max", "1024"),
            ]
        );
        let best_effort = self::pod(vec![container("c", ("", ""), ("", ""))], vec![]);
        let settings = pod_resources(&best_effort, &ResourceOptions::default())
            .unwrap()
            .settings();
        let values: Vec<&str> = settings.iter().map(|s| s.value.as_str()).collect();
        assert_eq!(values, ["1", "max 100000", "max", "max"]);
    }

    #[test]
    fn container_resources_follow_kuberuntime() {
        let options = ResourceOptions::default();
        let burstable = container("c", ("100m", "128Mi"), ("200m", "256Mi"));
        let got = container_resources(&burstable, &options).unwrap();
        assert_eq!(got.cpu_shares, 102);
        assert_eq!(got.cpu_quota_us, Some(20_000));
        assert_eq!(got.memory_max, Some(256 * MI));
        assert_eq!(got.memory_high, Some(255_012_864));
        let files: Vec<String> = got
            .settings()
            .iter()
            .map(|s| format!("{}={}", s.file, s.value))
            .collect();
        assert_eq!(
            files,
            [
                "cpu.weight=4",
                "cpu.max=20000 100000",
                "memory.max=268435456",
                "memory.high=255012864"
            ]
        );

        // A limit without a request: shares come from the limit.
        let limit_only = container("c", ("", ""), ("500m", "64Mi"));
        let got = container_resources(&limit_only, &options).unwrap();
        assert_eq!(got.cpu_shares, 512);
        // An explicit zero request is kept, as the kubelet keeps it.
        let zero_request = container("c", ("0", ""), ("500m", ""));
        assert_eq!(
            container_resources(&zero_request, &options)
                .unwrap()
                .cpu_shares,
            2
        );

        // Guaranteed: limits equal requests, no memory.high.
        let guaranteed = container("c", ("1", "64Mi"), ("1", "64Mi"));
        let got = container_resources(&guaranteed, &options).unwrap();
        assert_eq!((got.cpu_shares, got.memory_high), (1024, None));

        // Best effort: minimum shares, no quota, no limits.
        let best_effort = container("c", ("", ""), ("", ""));
        let got = container_resources(&best_effort, &options).unwrap();
        assert_eq!(
            got,
            ContainerResources {
                cpu_shares: 2,
                cpu_quota_us: None,
                cpu_period_us: 100_000,
                memory_max: None,
                memory_high: None,
            }
        );

        // MemoryQoS off and CFS quota off.
        let off = ResourceOptions {
            cpu_cfs_quota: false,
            memory_throttling_factor: None,
            ..ResourceOptions::default()
        };
        let got = container_resources(&burstable, &off).unwrap();
        assert_eq!((got.cpu_quota_us, got.memory_high), (None, None));
    }

    #[test]
    fn burstable_tier_shares_sum_burstable_requests_only() {
        let pods = [
            pod(vec![container("c", ("100m", "64Mi"), ("", ""))], vec![]),
            pod(vec![container("c", ("250m", "64Mi"), ("1", "1Gi"))], vec![]),
            pod(vec![container("c", ("1", "64Mi"), ("1", "64Mi"))], vec![]),
            pod(vec![container("c", ("", ""), ("", ""))], vec![]),
        ];
        assert_eq!(
            burstable_tier_shares(&pods).unwrap(),
            milli_cpu_to_shares(350)
        );
        assert_eq!(burstable_tier_shares(&[]).unwrap(), MIN_SHARES);
    }

    #[test]
    fn a_bad_quantity_names_its_container_and_field() {
        let pod = pod(vec![container("app", ("", ""), ("", "12Qi"))], vec![]);
        let error = pod_resources(&pod, &ResourceOptions::default()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "parse quantity \"12Qi\" of container app limits.memory: unknown suffix"
        );
    }
}
