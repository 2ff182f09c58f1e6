//! Filters: whether a pod may go on a node at all, and if not, the reason in upstream's
//! words (the strings `kube-scheduler` puts into "0/3 nodes are available: ...").
//!
//! They run in upstream's plugin order (NodeUnschedulable, TaintToleration, NodeAffinity,
//! NodePorts, NodeResourcesFit) and stop at the first that fails, as upstream does, so a
//! node contributes the same reasons to the message as it would upstream.

use super::cache::{
    NodeInfo, PodInfo, Requirement, SelectorOperator, SelectorTerm, TAINT_UNSCHEDULABLE, Taint,
};

/// Why a node cannot take a pod.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure<'a> {
    Unschedulable,
    UntoleratedTaint(&'a Taint),
    Affinity,
    Ports,
    /// At least one of the three is true.
    Insufficient {
        cpu: bool,
        memory: bool,
        pods: bool,
    },
}

impl Failure<'_> {
    /// Hands each of upstream's reason strings for this failure to `reason`.
    pub fn reasons(&self, mut reason: impl FnMut(String)) {
        match self {
            Failure::Unschedulable => reason("node(s) were unschedulable".into()),
            Failure::UntoleratedTaint(taint) => reason(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                taint.key, taint.value
            )),
            Failure::Affinity => reason("node(s) didn't match Pod's node affinity/selector".into()),
            Failure::Ports => {
                reason("node(s) didn't have free ports for the requested pod ports".into())
            }
            Failure::Insufficient { cpu, memory, pods } => {
                if *pods {
                    reason("Too many pods".into());
                }
                if *cpu {
                    reason("Insufficient cpu".into());
                }
                if *memory {
                    reason("Insufficient memory".into());
                }
            }
        }
    }
}

/// Runs every filter; `Ok` when `pod` may go on `node`.
pub fn check<'a>(node: &'a NodeInfo, pod: &PodInfo) -> Result<(), Failure<'a>> {
    if node.unschedulable && !tolerates_unschedulable(pod) {
        return Err(Failure::Unschedulable);
    }
    if let Some(taint) = untolerated_taint(node, pod) {
        return Err(Failure::UntoleratedTaint(taint));
    }
    if !matches_node_selector(node, pod) || !matches_required_affinity(node, pod) {
        return Err(Failure::Affinity);
    }
    if has_port_conflict(node, pod) {
        return Err(Failure::Ports);
    }
    fits_resources(node, pod)
}

fn tolerates_unschedulable(pod: &PodInfo) -> bool {
    let taint = Taint {
        key: TAINT_UNSCHEDULABLE.into(),
        value: String::new(),
        effect: "NoSchedule".into(),
    };
    pod.tolerations.iter().any(|t| t.tolerates(&taint))
}

/// The first NoSchedule or NoExecute taint the pod does not tolerate; PreferNoSchedule
/// only weighs in scoring upstream, so it never filters.
pub fn untolerated_taint<'a>(node: &'a NodeInfo, pod: &PodInfo) -> Option<&'a Taint> {
    node.taints.iter().find(|taint| {
        matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute")
            && !pod.tolerations.iter().any(|t| t.tolerates(taint))
    })
}

pub fn matches_node_selector(node: &NodeInfo, pod: &PodInfo) -> bool {
    pod.node_selector
        .iter()
        .all(|(key, value)| node.labels.get(key) == Some(value))
}

/// Required node affinity: any one term must match (an empty term matches nothing).
pub fn matches_required_affinity(node: &NodeInfo, pod: &PodInfo) -> bool {
    match &pod.affinity_terms {
        None => true,
        Some(terms) => terms.iter().any(|term| term_matches(node, term)),
    }
}

fn term_matches(node: &NodeInfo, term: &SelectorTerm) -> bool {
    if term.match_expressions.is_empty() && term.match_fields.is_empty() {
        return false;
    }
    term.match_expressions
        .iter()
        .all(|r| requirement_matches(r, node.labels.get(&r.key).map(String::as_str)))
        && term.match_fields.iter().all(|r| {
            let value = (r.key == "metadata.name").then_some(node.name.as_str());
            requirement_matches(r, value)
        })
}

fn requirement_matches(requirement: &Requirement, value: Option<&str>) -> bool {
    let values = &requirement.values;
    match requirement.operator {
        SelectorOperator::In => value.is_some_and(|v| values.iter().any(|w| w == v)),
        SelectorOperator::NotIn => value.is_none_or(|v| !values.iter().any(|w| w == v)),
        SelectorOperator::Exists => value.is_some(),
        SelectorOperator::DoesNotExist => value.is_none(),
        SelectorOperator::Gt | SelectorOperator::Lt => {
            let (Some(value), [bound]) = (value, values.as_slice()) else {
                return false;
            };
            let (Ok(value), Ok(bound)) = (value.parse::<i64>(), bound.parse::<i64>()) else {
                return false;
            };
            if requirement.operator == SelectorOperator::Gt {
                value > bound
            } else {
                value < bound
            }
        }
        SelectorOperator::Unknown => false,
    }
}

pub fn has_port_conflict(node: &NodeInfo, pod: &PodInfo) -> bool {
    pod.host_ports.iter().any(|wanted| {
        node.usage
            .host_ports
            .iter()
            .any(|used| used.conflicts_with(wanted))
    })
}

/// NodeResourcesFit: the pod's requests fit in what the node's allocatable leaves.
pub fn fits_resources<'a>(node: &NodeInfo, pod: &PodInfo) -> Result<(), Failure<'a>> {
    let used = &node.usage.requested;
    let free = &node.allocatable;
    let wanted = &pod.requests;
    let pods = used.pods + 1 > free.pods;
    let cpu = wanted.milli_cpu > 0 && used.milli_cpu + wanted.milli_cpu > free.milli_cpu;
    let memory = wanted.memory > 0 && used.memory + wanted.memory > free.memory;
    if pods || cpu || memory {
        return Err(Failure::Insufficient { cpu, memory, pods });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::cache::Cache;
    use super::super::cache::fixtures::{node, node_from, pod_with};
    use super::*;
    use serde_json::json;

    fn reasons(failure: Failure<'_>) -> Vec<String> {
        let mut all = Vec::new();
        failure.reasons(|r| all.push(r));
        all
    }

    fn small_pod(name: &str) -> PodInfo {
        pod_with(
            name,
            json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]}),
        )
    }

    #[test]
    fn resources_fit_until_allocatable_is_used() {
        let mut cache = Cache::default();
        cache.apply_node(node("n", "2", "8Gi"));
        assert_eq!(check(cache.node("n").unwrap(), &small_pod("a")), Ok(()));
        cache.assume(&small_pod("a"), "n");
        cache.assume(&small_pod("b"), "n");
        let failure = check(cache.node("n").unwrap(), &small_pod("c")).unwrap_err();
        assert_eq!(reasons(failure), ["Insufficient cpu"]);

        let big = pod_with(
            "big",
            json!({"containers": [{"name": "c", "resources": {"requests": {"memory": "7Gi"}}}]}),
        );
        let failure = check(cache.node("n").unwrap(), &big).unwrap_err();
        assert_eq!(reasons(failure), ["Insufficient memory"]);
    }

    #[test]
    fn pod_slots_count() {
        let mut cache = Cache::default();
        cache.apply_node(node_from(json!({
            "metadata": {"name": "n"},
            "status": {"allocatable": {"cpu": "8", "memory": "8Gi", "pods": "1"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        })));
        cache.assume(&small_pod("a"), "n");
        let failure = check(cache.node("n").unwrap(), &small_pod("b")).unwrap_err();
        assert_eq!(reasons(failure), ["Too many pods"]);
    }

    #[test]
    fn cordoned_nodes_take_only_pods_that_tolerate_it() {
        let cordoned = node_from(json!({
            "metadata": {"name": "n"},
            "spec": {"unschedulable": true},
            "status": {"allocatable": {"cpu": "8", "memory": "8Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }));
        assert_eq!(
            check(&cordoned, &small_pod("a")),
            Err(Failure::Unschedulable)
        );
        let tolerant = pod_with(
            "t",
            json!({"containers": [{"name": "c"}], "tolerations": [
                {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}
            ]}),
        );
        assert_eq!(check(&cordoned, &tolerant), Ok(()));
    }

    #[test]
    fn taints_filter_unless_tolerated() {
        let tainted = node_from(json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [
                {"key": "soft", "value": "x", "effect": "PreferNoSchedule"},
                {"key": "dedicated", "value": "db", "effect": "NoSchedule"}
            ]},
            "status": {"allocatable": {"cpu": "8", "memory": "8Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }));
        let failure = check(&tainted, &small_pod("a")).unwrap_err();
        assert_eq!(
            reasons(failure),
            ["node(s) had untolerated taint {dedicated: db}"]
        );
        let equal = pod_with(
            "e",
            json!({"containers": [{"name": "c"}], "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}
            ]}),
        );
        assert_eq!(check(&tainted, &equal), Ok(()));
        let wrong_value = pod_with(
            "w",
            json!({"containers": [{"name": "c"}], "tolerations": [
                {"key": "dedicated", "value": "web"}
            ]}),
        );
        assert!(check(&tainted, &wrong_value).is_err());
        let everything = pod_with(
            "all",
            json!({"containers": [{"name": "c"}], "tolerations": [{"operator": "Exists"}]}),
        );
        assert_eq!(check(&tainted, &everything), Ok(()));
    }

    #[test]
    fn not_ready_nodes_are_filtered_by_their_implicit_taint() {
        let not_ready = node_from(json!({
            "metadata": {"name": "n"},
            "status": {"allocatable": {"cpu": "8", "memory": "8Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "False"}]}
        }));
        let failure = check(&not_ready, &small_pod("a")).unwrap_err();
        assert_eq!(
            reasons(failure),
            ["node(s) had untolerated taint {node.kubernetes.io/not-ready: }"]
        );
    }

    #[test]
    fn node_selector_and_required_affinity() {
        let labeled = node_from(json!({
            "metadata": {"name": "n", "labels": {"disk": "ssd", "generation": "5"}},
            "status": {"allocatable": {"cpu": "8", "memory": "8Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }));
        let selecting = |selector: serde_json::Value| {
            pod_with(
                "p",
                json!({"containers": [{"name": "c"}], "nodeSelector": selector}),
            )
        };
        assert_eq!(check(&labeled, &selecting(json!({"disk": "ssd"}))), Ok(()));
        assert_eq!(
            check(&labeled, &selecting(json!({"disk": "hdd"}))),
            Err(Failure::Affinity)
        );

        let affinity = |expressions: serde_json::Value| {
            pod_with(
                "p",
                json!({"containers": [{"name": "c"}], "affinity": {"nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                        {"matchExpressions": expressions}
                    ]}
                }}}),
            )
        };
        let cases = [
            (
                json!([{"key": "disk", "operator": "In", "values": ["ssd", "nvme"]}]),
                true,
            ),
            (
                json!([{"key": "disk", "operator": "NotIn", "values": ["ssd"]}]),
                false,
            ),
            (
                json!([{"key": "gpu", "operator": "NotIn", "values": ["a100"]}]),
                true,
            ),
            (json!([{"key": "disk", "operator": "Exists"}]), true),
            (json!([{"key": "gpu", "operator": "Exists"}]), false),
            (json!([{"key": "gpu", "operator": "DoesNotExist"}]), true),
            (
                json!([{"key": "generation", "operator": "Gt", "values": ["4"]}]),
                true,
            ),
            (
                json!([{"key": "generation", "operator": "Lt", "values": ["5"]}]),
                false,
            ),
            (
                json!([{"key": "disk", "operator": "In", "values": ["ssd"]},
                       {"key": "generation", "operator": "Gt", "values": ["9"]}]),
                false,
            ),
        ];
        for (expressions, expected) in cases {
            let pod = affinity(expressions.clone());
            assert_eq!(
                check(&labeled, &pod).is_ok(),
                expected,
                "expressions {expressions}"
            );
        }
        let by_name = pod_with(
            "p",
            json!({"containers": [{"name": "c"}], "affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["other"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}]}
                ]}
            }}}),
        );
        assert_eq!(check(&labeled, &by_name), Ok(()));
    }

    #[test]
    fn host_ports_conflict_on_overlapping_addresses() {
        let mut cache = Cache::default();
        cache.apply_node(node("n", "8", "8Gi"));
        let with_port = |name: &str, port: serde_json::Value| {
            pod_with(
                name,
                json!({"containers": [{"name": "c", "ports": [port]}]}),
            )
        };
        cache.assume(
            &with_port("a", json!({"containerPort": 80, "hostPort": 8080})),
            "n",
        );
        let node = cache.node("n").unwrap();
        assert_eq!(
            check(
                node,
                &with_port("b", json!({"containerPort": 80, "hostPort": 8080}))
            ),
            Err(Failure::Ports)
        );
        assert_eq!(
            check(
                node,
                &with_port(
                    "c",
                    json!({"containerPort": 80, "hostPort": 8080, "hostIP": "10.0.0.1"})
                )
            ),
            Err(Failure::Ports)
        );
        assert_eq!(
            check(
                node,
                &with_port(
                    "d",
                    json!({"containerPort": 80, "hostPort": 8080, "protocol": "UDP"})
                )
            ),
            Ok(())
        );
        assert_eq!(
            check(
                node,
                &with_port("e", json!({"containerPort": 80, "hostPort": 8081}))
            ),
            Ok(())
        );
    }
}
