//! Scores: among the nodes that pass the filters, how good each is for a pod, 0 to 100
//! per plugin, weighted as upstream's default profile weighs them.

use super::cache::{NodeInfo, PodInfo};

pub const MAX_SCORE: i64 = 100;

/// Upstream's default weights: NodeResourcesFit 1, NodeResourcesBalancedAllocation 1,
/// PodTopologySpread 2.
pub const LEAST_ALLOCATED_WEIGHT: i64 = 1;
pub const BALANCED_ALLOCATION_WEIGHT: i64 = 1;
pub const SPREAD_WEIGHT: i64 = 2;

/// NodeResourcesFit with the LeastAllocated strategy: the share of CPU and memory left
/// free after placing the pod, averaged, so emptier nodes win.
pub fn least_allocated(node: &NodeInfo, pod: &PodInfo) -> i64 {
    let used = &node.usage.nonzero_requested;
    let wanted = &pod.nonzero_requests;
    let free_share = |capacity: i64, requested: i64| {
        if capacity <= 0 || requested > capacity {
            return 0;
        }
        (capacity - requested) * MAX_SCORE / capacity
    };
    let cpu = free_share(
        node.allocatable.milli_cpu,
        used.milli_cpu + wanted.milli_cpu,
    );
    let memory = free_share(node.allocatable.memory, used.memory + wanted.memory);
    (cpu + memory) / 2
}

/// NodeResourcesBalancedAllocation: nodes whose CPU and memory fill evenly score higher.
/// With two resources the standard deviation of the fractions is half their difference.
pub fn balanced_allocation(node: &NodeInfo, pod: &PodInfo) -> i64 {
    let used = &node.usage.requested;
    let wanted = &pod.requests;
    let fraction = |capacity: i64, requested: i64| {
        if capacity <= 0 {
            return 1.0;
        }
        (requested as f64 / capacity as f64).min(1.0)
    };
    let cpu = fraction(
        node.allocatable.milli_cpu,
        used.milli_cpu + wanted.milli_cpu,
    );
    let memory = fraction(node.allocatable.memory, used.memory + wanted.memory);
    let deviation = (cpu - memory).abs() / 2.0;
    ((1.0 - deviation) * MAX_SCORE as f64) as i64
}

/// How many pods of the pod's owner already run on the node (0 for pods without one).
pub fn siblings_on(node: &NodeInfo, pod: &PodInfo) -> u32 {
    pod.owner_uid
        .as_ref()
        .and_then(|owner| node.usage.owners.get(owner).copied())
        .unwrap_or(0)
}

/// Spreading of siblings, normalized over the candidate nodes as upstream's
/// PodTopologySpread normalizes over the hostname domain: the node with the fewest
/// siblings scores 100, the one with the most scores 0.
pub fn spread(siblings: u32, fewest: u32, most: u32) -> i64 {
    if most == fewest {
        return MAX_SCORE;
    }
    i64::from(most - siblings) * MAX_SCORE / i64::from(most - fewest)
}

#[cfg(test)]
mod tests {
    use super::super::cache::Cache;
    use super::super::cache::fixtures::{node, pod_with};
    use super::*;
    use serde_json::json;

    fn requesting(name: &str, cpu: &str, memory: &str) -> PodInfo {
        pod_with(
            name,
            json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu, "memory": memory}}}]}),
        )
    }

    #[test]
    fn emptier_nodes_score_higher() {
        let mut cache = Cache::default();
        cache.apply_node(node("empty", "4", "8Gi"));
        cache.apply_node(node("busy", "4", "8Gi"));
        cache.assume(&requesting("a", "2", "4Gi"), "busy");
        let pod = requesting("p", "1", "2Gi");
        assert_eq!(least_allocated(cache.node("empty").unwrap(), &pod), 75);
        assert_eq!(least_allocated(cache.node("busy").unwrap(), &pod), 25);
    }

    #[test]
    fn balanced_nodes_score_higher() {
        let mut cache = Cache::default();
        cache.apply_node(node("cpu-heavy", "4", "8Gi"));
        cache.apply_node(node("even", "4", "8Gi"));
        cache.assume(&requesting("a", "3", "0"), "cpu-heavy");
        cache.assume(&requesting("b", "1", "2Gi"), "even");
        let pod = requesting("p", "1", "2Gi");
        assert_eq!(balanced_allocation(cache.node("even").unwrap(), &pod), 100);
        assert_eq!(
            balanced_allocation(cache.node("cpu-heavy").unwrap(), &pod),
            62
        );
    }

    #[test]
    fn spreading_prefers_nodes_with_fewer_siblings() {
        let mut cache = Cache::default();
        cache.apply_node(node("n", "4", "8Gi"));
        let sibling = |name: &str| PodInfo {
            owner_uid: Some("rs-1".into()),
            ..requesting(name, "10m", "16Mi")
        };
        cache.assume(&sibling("a"), "n");
        cache.assume(&sibling("b"), "n");
        assert_eq!(siblings_on(cache.node("n").unwrap(), &sibling("c")), 2);
        assert_eq!(spread(0, 0, 2), 100);
        assert_eq!(spread(1, 0, 2), 50);
        assert_eq!(spread(2, 0, 2), 0);
        assert_eq!(spread(3, 3, 3), 100);
    }
}
