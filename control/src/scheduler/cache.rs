//! The scheduler's picture of the cluster: every node with what is already placed on it,
//! kept current from the node and pod watches and from the scheduler's own assumptions.
//!
//! Pods and nodes are reduced on arrival to the few fields scheduling reads
//! ([`PodInfo`], [`NodeInfo`]), so a scheduling decision never touches JSON or clones a
//! node list. Usage is kept per node *name*, apart from the node object, so a pod that is
//! seen bound before its node (or after it is deleted) is still counted once the node is
//! there.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::quantity;
use super::watched::WatchedPod;

/// The scheduler name pods get by default; pods naming another scheduler are left alone.
pub const DEFAULT_SCHEDULER: &str = "default-scheduler";

/// Requests upstream assumes for scoring when a container asks for nothing, so that
/// best-effort pods still spread (`pkg/scheduler/util/pod_resources.go`).
const DEFAULT_MILLI_CPU_REQUEST: i64 = 100;
const DEFAULT_MEMORY_REQUEST: i64 = 200 * 1024 * 1024;

/// The resources the scheduler accounts: CPU in millicores, memory in bytes, pod slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
    pub pods: i64,
}

impl Resources {
    fn add(&mut self, other: &Resources) {
        self.milli_cpu += other.milli_cpu;
        self.memory += other.memory;
        self.pods += other.pods;
    }

    fn subtract(&mut self, other: &Resources) {
        self.milli_cpu -= other.milli_cpu;
        self.memory -= other.memory;
        self.pods -= other.pods;
    }

    fn max_with(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.max(other.milli_cpu);
        self.memory = self.memory.max(other.memory);
    }

    fn from_list(list: Option<&BTreeMap<String, Quantity>>) -> Self {
        let mut resources = Resources::default();
        let Some(list) = list else {
            return resources;
        };
        if let Some(cpu) = list.get("cpu").and_then(|q| quantity::milli_cpu(&q.0)) {
            resources.milli_cpu = cpu;
        }
        if let Some(memory) = list.get("memory").and_then(|q| quantity::units(&q.0)) {
            resources.memory = memory;
        }
        if let Some(pods) = list.get("pods").and_then(|q| quantity::units(&q.0)) {
            resources.pods = pods;
        }
        resources
    }
}

/// A port a pod claims on its node's addresses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub protocol: String,
    /// Empty or `0.0.0.0` means every address of the node.
    pub host_ip: String,
    pub port: i32,
}

impl HostPort {
    fn is_wildcard(&self) -> bool {
        self.host_ip.is_empty() || self.host_ip == "0.0.0.0" || self.host_ip == "::"
    }

    /// Two claims collide when protocol and port agree and their addresses overlap.
    pub fn conflicts_with(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.protocol == other.protocol
            && (self.is_wildcard() || other.is_wildcard() || self.host_ip == other.host_ip)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Toleration {
    pub key: String,
    /// `Exists` or `Equal` (the default).
    pub exists: bool,
    pub value: String,
    /// Empty tolerates every effect.
    pub effect: String,
}

impl Toleration {
    /// Upstream's `Toleration.ToleratesTaint`.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if !self.effect.is_empty() && self.effect != taint.effect {
            return false;
        }
        if !self.key.is_empty() && self.key != taint.key {
            return false;
        }
        if self.exists {
            return true;
        }
        // An empty key with operator Equal is invalid and tolerates nothing.
        !self.key.is_empty() && self.value == taint.value
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
    /// An operator this scheduler does not know; it matches nothing.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: SelectorOperator,
    pub values: Vec<String>,
}

/// One term of a required node affinity: all its requirements must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorTerm {
    pub match_expressions: Vec<Requirement>,
    /// Requirements on node fields; only `metadata.name` exists upstream.
    pub match_fields: Vec<Requirement>,
}

/// `namespace/name`: how the cache and the queues name a pod.
pub type PodKey = String;

/// What scheduling reads of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node_name: Option<String>,
    pub scheduler_name: String,
    /// The requests that must fit, with `pods: 1`.
    pub requests: Resources,
    /// The requests with upstream's defaults for containers that ask for nothing, for scoring.
    pub nonzero_requests: Resources,
    pub node_selector: Vec<(String, String)>,
    /// Required node affinity; `None` when the pod has none (an empty list matches nothing).
    pub affinity_terms: Option<Vec<SelectorTerm>>,
    pub tolerations: Vec<Toleration>,
    pub host_ports: Vec<HostPort>,
    /// The controller (or first) owner's uid, for spreading siblings.
    pub owner_uid: Option<String>,
    pub deleting: bool,
    /// Phase Succeeded or Failed: the pod holds no resources any more.
    pub finished: bool,
    /// `spec.schedulingGates` is not empty: the pod must not be scheduled yet.
    pub gated: bool,
}

impl PodInfo {
    pub fn key(&self) -> PodKey {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether this scheduler should place the pod now.
    pub fn wants_scheduling(&self) -> bool {
        self.node_name.is_none()
            && !self.deleting
            && !self.finished
            && !self.gated
            && self.scheduler_name == DEFAULT_SCHEDULER
    }

    pub fn from_pod(pod: &WatchedPod) -> Self {
        let metadata = &pod.metadata;
        let spec = pod.spec.as_ref();
        let mut requests = Resources::default();
        let mut nonzero = Resources::default();
        let mut host_ports = Vec::new();
        if let Some(spec) = spec {
            for container in &spec.containers {
                let resources = container.resources.as_ref();
                let mut asked = Resources::from_list(resources.and_then(|r| r.requests.as_ref()));
                // Limits without requests are the requests, as defaulting makes them.
                let limits = Resources::from_list(resources.and_then(|r| r.limits.as_ref()));
                if asked.milli_cpu == 0 {
                    asked.milli_cpu = limits.milli_cpu;
                }
                if asked.memory == 0 {
                    asked.memory = limits.memory;
                }
                requests.add(&Resources { pods: 0, ..asked });
                nonzero.add(&Resources {
                    milli_cpu: if asked.milli_cpu == 0 {
                        DEFAULT_MILLI_CPU_REQUEST
                    } else {
                        asked.milli_cpu
                    },
                    memory: if asked.memory == 0 {
                        DEFAULT_MEMORY_REQUEST
                    } else {
                        asked.memory
                    },
                    pods: 0,
                });
                for port in container.ports.iter().flatten() {
                    if let Some(host_port) = port.host_port.filter(|p| *p > 0) {
                        host_ports.push(HostPort {
                            protocol: port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                            host_ip: port.host_ip.clone().unwrap_or_default(),
                            port: host_port,
                        });
                    }
                }
            }
            // Init containers run one at a time before the others: the pod needs the
            // larger of their largest request and the sum of the app containers.
            for container in spec.init_containers.iter().flatten() {
                let init = Resources::from_list(
                    container
                        .resources
                        .as_ref()
                        .and_then(|r| r.requests.as_ref()),
                );
                requests.max_with(&init);
                nonzero.max_with(&init);
            }
            let overhead = Resources::from_list(spec.overhead.as_ref());
            requests.add(&Resources {
                pods: 0,
                ..overhead
            });
            nonzero.add(&Resources {
                pods: 0,
                ..overhead
            });
        }
        requests.pods = 1;
        nonzero.pods = 1;
        let node_selector = spec
            .and_then(|s| s.node_selector.as_ref())
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let affinity_terms = spec
            .and_then(|s| s.affinity.as_ref())
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .map(|selector| {
                selector
                    .node_selector_terms
                    .iter()
                    .map(|term| SelectorTerm {
                        match_expressions: requirements(term.match_expressions.as_deref()),
                        match_fields: requirements(term.match_fields.as_deref()),
                    })
                    .collect()
            });
        let tolerations = spec
            .and_then(|s| s.tolerations.as_ref())
            .map(|list| {
                list.iter()
                    .map(|t| Toleration {
                        key: t.key.clone().unwrap_or_default(),
                        exists: t.operator.as_deref() == Some("Exists"),
                        value: t.value.clone().unwrap_or_default(),
                        effect: t.effect.clone().unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let owners = metadata.owner_references.as_deref().unwrap_or_default();
        let owner_uid = owners
            .iter()
            .find(|o| o.controller == Some(true))
            .or(owners.first())
            .map(|o| o.uid.clone());
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        PodInfo {
            namespace: metadata.namespace.clone().unwrap_or_default(),
            name: metadata.name.clone().unwrap_or_default(),
            uid: metadata.uid.clone().unwrap_or_default(),
            node_name: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            scheduler_name: spec
                .and_then(|s| s.scheduler_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| DEFAULT_SCHEDULER.into()),
            requests,
            nonzero_requests: nonzero,
            node_selector,
            affinity_terms,
            tolerations,
            host_ports,
            owner_uid,
            deleting: metadata.deletion_timestamp.is_some(),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
            gated: spec
                .and_then(|s| s.scheduling_gates.as_ref())
                .is_some_and(|g| !g.is_empty()),
        }
    }
}

fn requirements(
    list: Option<&[k8s_openapi::api::core::v1::NodeSelectorRequirement]>,
) -> Vec<Requirement> {
    list.unwrap_or_default()
        .iter()
        .map(|r| Requirement {
            key: r.key.clone(),
            operator: match r.operator.as_str() {
                "In" => SelectorOperator::In,
                "NotIn" => SelectorOperator::NotIn,
                "Exists" => SelectorOperator::Exists,
                "DoesNotExist" => SelectorOperator::DoesNotExist,
                "Gt" => SelectorOperator::Gt,
                "Lt" => SelectorOperator::Lt,
                _ => SelectorOperator::Unknown,
            },
            values: r.values.clone().unwrap_or_default(),
        })
        .collect()
}

/// What is placed on one node: the sums the filters and scores compare against.
#[derive(Clone, Debug, Default)]
pub struct NodeUsage {
    pub requested: Resources,
    pub nonzero_requested: Resources,
    pub host_ports: Vec<HostPort>,
    /// Pods per owner uid, for spreading.
    pub owners: HashMap<String, u32>,
}

impl NodeUsage {
    fn add(&mut self, pod: &PodInfo) {
        self.requested.add(&pod.requests);
        self.nonzero_requested.add(&pod.nonzero_requests);
        self.host_ports.extend(pod.host_ports.iter().cloned());
        if let Some(owner) = &pod.owner_uid {
            *self.owners.entry(owner.clone()).or_default() += 1;
        }
    }

    fn remove(&mut self, pod: &PodInfo) {
        self.requested.subtract(&pod.requests);
        self.nonzero_requested.subtract(&pod.nonzero_requests);
        for port in &pod.host_ports {
            if let Some(at) = self.host_ports.iter().position(|p| p == port) {
                self.host_ports.swap_remove(at);
            }
        }
        if let Some(owner) = &pod.owner_uid
            && let Some(count) = self.owners.get_mut(owner)
        {
            *count -= 1;
            if *count == 0 {
                self.owners.remove(owner);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.requested.pods == 0 && self.host_ports.is_empty()
    }
}

/// What scheduling reads of a node, and what is placed on it.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The node's taints plus the implicit `not-ready`/`unreachable` taint of a node whose
    /// Ready condition is not True, as the node lifecycle controller would add.
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    pub allocatable: Resources,
    pub usage: NodeUsage,
}

pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

impl NodeInfo {
    pub fn from_node(node: &Node) -> Self {
        let spec = node.spec.as_ref();
        let status = node.status.as_ref();
        let mut taints: Vec<Taint> = spec
            .and_then(|s| s.taints.as_ref())
            .map(|list| {
                list.iter()
                    .map(|t| Taint {
                        key: t.key.clone(),
                        value: t.value.clone().unwrap_or_default(),
                        effect: t.effect.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.as_str());
        let implicit = match ready {
            Some("True") => None,
            Some("False") | None => Some(TAINT_NOT_READY),
            Some(_) => Some(TAINT_UNREACHABLE),
        };
        if let Some(key) = implicit
            && !taints
                .iter()
                .any(|t| t.key == key && t.effect == "NoSchedule")
        {
            taints.push(Taint {
                key: key.into(),
                value: String::new(),
                effect: "NoSchedule".into(),
            });
        }
        let allocatable = status
            .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()))
            .map(|list| Resources::from_list(Some(list)))
            .unwrap_or_default();
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            taints,
            unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
            allocatable,
            usage: NodeUsage::default(),
        }
    }

    /// Whether scheduling could decide differently about this node than about `other`.
    fn same_for_scheduling(&self, other: &NodeInfo) -> bool {
        self.labels == other.labels
            && self.taints == other.taints
            && self.unschedulable == other.unschedulable
            && self.allocatable == other.allocatable
    }
}

/// A pod the cache counts on a node.
#[derive(Clone, Debug)]
struct PlacedPod {
    info: PodInfo,
    node: String,
    /// Placed by this scheduler before the watch confirmed the binding.
    assumed: bool,
}

/// Nodes with their usage, and the pods that make that usage up.
#[derive(Default)]
pub struct Cache {
    nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    /// Usage of nodes the cache does not have (yet, or any more).
    detached: HashMap<String, NodeUsage>,
    pods: HashMap<PodKey, PlacedPod>,
}

/// What changed in the cache, so the scheduler knows whether waiting pods may now fit.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// Something that can make a pod fit where it did not.
    MayHelp,
}

impl Cache {
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.index.get(name).map(|i| &self.nodes[*i])
    }

    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|n| n.name.as_str())
    }

    fn usage_mut(&mut self, node: &str) -> &mut NodeUsage {
        match self.index.get(node) {
            Some(i) => &mut self.nodes[*i].usage,
            None => self.detached.entry(node.to_string()).or_default(),
        }
    }

    pub fn apply_node(&mut self, mut info: NodeInfo) -> Change {
        match self.index.get(&info.name) {
            Some(i) => {
                let current = &mut self.nodes[*i];
                if current.same_for_scheduling(&info) {
                    return Change::None;
                }
                info.usage = std::mem::take(&mut current.usage);
                *current = info;
            }
            None => {
                info.usage = self.detached.remove(&info.name).unwrap_or_default();
                self.index.insert(info.name.clone(), self.nodes.len());
                self.nodes.push(info);
            }
        }
        Change::MayHelp
    }

    pub fn remove_node(&mut self, name: &str) {
        let Some(at) = self.index.remove(name) else {
            return;
        };
        let removed = self.nodes.swap_remove(at);
        if let Some(moved) = self.nodes.get(at) {
            self.index.insert(moved.name.clone(), at);
        }
        if !removed.usage.is_empty() {
            self.detached.insert(removed.name, removed.usage);
        }
    }

    /// Whether the cache counts this pod (bound or assumed) on some node.
    pub fn holds(&self, key: &str, uid: &str) -> bool {
        self.pods.get(key).is_some_and(|p| p.info.uid == uid)
    }

    /// Counts `pod` on `node` before its binding is confirmed.
    pub fn assume(&mut self, pod: &PodInfo, node: &str) {
        self.place(pod.clone(), node.to_string(), true);
    }

    /// Takes back an assumption whose binding failed; a confirmed pod stays.
    pub fn forget(&mut self, key: &str, uid: &str) {
        if self
            .pods
            .get(key)
            .is_some_and(|p| p.assumed && p.info.uid == uid)
        {
            self.remove_pod(key);
        }
    }

    /// Applies what a pod watch says about a pod.
    pub fn apply_pod(&mut self, pod: &PodInfo) -> Change {
        let key = pod.key();
        match (&pod.node_name, pod.finished) {
            (Some(node), false) => {
                if let Some(placed) = self.pods.get_mut(&key)
                    && placed.info.uid == pod.uid
                    && &placed.node == node
                    && placed.info.requests == pod.requests
                    && placed.info.host_ports == pod.host_ports
                {
                    placed.assumed = false;
                    return Change::None;
                }
                let freed = self.remove_pod(&key);
                self.place(pod.clone(), node.clone(), false);
                freed
            }
            (Some(_), true) => self.remove_pod(&key),
            (None, _) => {
                // The watch may still show a pod as unbound while its binding is in flight;
                // only a different pod under the same name replaces the assumption.
                match self.pods.get(&key) {
                    Some(placed) if placed.info.uid != pod.uid => self.remove_pod(&key),
                    _ => Change::None,
                }
            }
        }
    }

    pub fn remove_pod(&mut self, key: &str) -> Change {
        match self.pods.remove(key) {
            Some(placed) => {
                self.usage_mut(&placed.node).remove(&placed.info);
                if let Some(usage) = self.detached.get(&placed.node)
                    && usage.is_empty()
                {
                    self.detached.remove(&placed.node);
                }
                Change::MayHelp
            }
            None => Change::None,
        }
    }

    fn place(&mut self, info: PodInfo, node: String, assumed: bool) {
        self.usage_mut(&node).add(&info);
        self.pods.insert(
            info.key(),
            PlacedPod {
                info,
                node,
                assumed,
            },
        );
    }

    /// Forgets confirmed pods that are not in `alive` (after a watch relist); assumed pods
    /// stay until their binding answers.
    pub fn retain_pods(&mut self, alive: &std::collections::HashSet<PodKey>) {
        let gone: Vec<PodKey> = self
            .pods
            .iter()
            .filter(|(key, placed)| !placed.assumed && !alive.contains(*key))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            self.remove_pod(&key);
        }
    }

    /// Forgets nodes that are not in `alive` (after a watch relist).
    pub fn retain_nodes(&mut self, alive: &std::collections::HashSet<String>) {
        let gone: Vec<String> = self
            .node_names()
            .filter(|name| !alive.contains(*name))
            .map(str::to_string)
            .collect();
        for name in gone {
            self.remove_node(&name);
        }
    }

    #[cfg(test)]
    pub fn placed_on(&self, key: &str) -> Option<&str> {
        self.pods.get(key).map(|p| p.node.as_str())
    }
}

/// Nodes and pods for the scheduler's unit tests.
#[cfg(test)]
pub mod fixtures {
    use super::*;
    use serde_json::{Value, json};

    /// A Ready node with `cpu`/`memory` allocatable and room for 110 pods.
    pub fn node(name: &str, cpu: &str, memory: &str) -> NodeInfo {
        node_from(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {
                "allocatable": {"cpu": cpu, "memory": memory, "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }))
    }

    pub fn node_from(value: Value) -> NodeInfo {
        NodeInfo::from_node(&serde_json::from_value(value).unwrap())
    }

    /// A pod in `default` named `name` with `spec` (JSON) and a uid of `uid-{name}`.
    pub fn pod_with(name: &str, spec: Value) -> PodInfo {
        PodInfo::from_pod(
            &serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
                "spec": spec
            }))
            .unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::node;
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: Option<&str>) -> PodInfo {
        let pod: WatchedPod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "c", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}]
            }
        }))
        .unwrap();
        PodInfo::from_pod(&pod)
    }

    #[test]
    fn usage_follows_bound_pods_and_survives_node_arrival_order() {
        let mut cache = Cache::default();
        assert_eq!(cache.apply_pod(&pod("a", Some("n1"))), Change::None);
        cache.apply_node(node("n1", "4", "8Gi"));
        let usage = &cache.node("n1").unwrap().usage;
        assert_eq!(usage.requested.milli_cpu, 500);
        assert_eq!(usage.requested.memory, 1 << 30);
        assert_eq!(usage.requested.pods, 1);
        assert_eq!(cache.remove_pod("default/a"), Change::MayHelp);
        assert_eq!(
            cache.node("n1").unwrap().usage.requested,
            Resources::default()
        );
    }

    #[test]
    fn assumptions_are_confirmed_or_forgotten() {
        let mut cache = Cache::default();
        cache.apply_node(node("n1", "4", "8Gi"));
        let unbound = pod("a", None);
        cache.assume(&unbound, "n1");
        // A stale unbound event does not drop the assumption.
        cache.apply_pod(&unbound);
        assert_eq!(cache.placed_on("default/a"), Some("n1"));
        cache.apply_pod(&pod("a", Some("n1")));
        // Once confirmed, a failed bind answer does not remove it.
        cache.forget("default/a", "uid-a");
        assert_eq!(cache.node("n1").unwrap().usage.requested.pods, 1);

        cache.assume(&pod("b", None), "n1");
        cache.forget("default/b", "uid-b");
        assert_eq!(cache.node("n1").unwrap().usage.requested.pods, 1);
    }

    #[test]
    fn node_removal_keeps_the_index_consistent() {
        let mut cache = Cache::default();
        for name in ["n1", "n2", "n3"] {
            cache.apply_node(node(name, "1", "1Gi"));
        }
        cache.remove_node("n1");
        assert_eq!(cache.node("n3").unwrap().name, "n3");
        assert_eq!(cache.node("n2").unwrap().name, "n2");
        assert!(cache.node("n1").is_none());
        assert_eq!(cache.node_count(), 2);
    }

    #[test]
    fn not_ready_nodes_carry_the_implicit_taint() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n"},
            "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}
        }))
        .unwrap();
        let info = NodeInfo::from_node(&node);
        assert_eq!(info.taints[0].key, TAINT_UNREACHABLE);
    }

    #[test]
    fn requests_add_containers_and_take_the_largest_init_container() {
        let pod: WatchedPod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {
                "containers": [
                    {"name": "a", "resources": {"requests": {"cpu": "100m"}}},
                    {"name": "b", "resources": {"limits": {"cpu": "200m", "memory": "64Mi"}}},
                    {"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}
                ],
                "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "1"}}}]
            }
        }))
        .unwrap();
        let info = PodInfo::from_pod(&pod);
        assert_eq!(info.requests.milli_cpu, 1000);
        assert_eq!(info.requests.memory, 64 << 20);
        assert_eq!(info.nonzero_requests.milli_cpu, 1000);
        assert_eq!(info.nonzero_requests.memory, (64 << 20) + 2 * (200 << 20));
        assert_eq!(info.host_ports[0].port, 8080);
        assert_eq!(info.host_ports[0].protocol, "TCP");
        assert_eq!(info.scheduler_name, DEFAULT_SCHEDULER);
    }
}
