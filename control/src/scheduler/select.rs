//! One scheduling decision: which node a pod goes to, or upstream's message saying why
//! none fits.
//!
//! As upstream does, a decision looks at only as many nodes as it needs: it filters from
//! a rotating start until it has found `feasible_nodes_to_find` fitting nodes (all of them
//! in clusters under 100 nodes, 10 % at 5 000), scores those, and picks the best, breaking
//! ties at random so that equal nodes share the load.

use std::collections::HashMap;

use super::cache::{Cache, PodInfo};
use super::filters;
use super::scores;

/// Upstream's `minFeasibleNodesToFind`.
const MIN_FEASIBLE_NODES_TO_FIND: usize = 100;
/// Upstream's floor for the adaptive `percentageOfNodesToScore`.
const MIN_FEASIBLE_NODES_PERCENTAGE: usize = 5;

/// How many fitting nodes to find before scoring: upstream's adaptive
/// `numFeasibleNodesToFind` (50 % minus 1 % per 125 nodes, at least 5 %, at least 100).
pub fn feasible_nodes_to_find(n_nodes: usize) -> usize {
    if n_nodes < MIN_FEASIBLE_NODES_TO_FIND {
        return n_nodes;
    }
    let percentage = 50usize
        .saturating_sub(n_nodes / 125)
        .max(MIN_FEASIBLE_NODES_PERCENTAGE);
    (n_nodes * percentage / 100).max(MIN_FEASIBLE_NODES_TO_FIND)
}

/// The outcome of one decision.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The index of the chosen node in [`Cache::nodes`].
    Node(usize),
    /// No node fits; upstream's FitError message.
    Unschedulable(String),
}

/// A candidate that passed the filters.
struct Candidate {
    node_idx: usize,
    base_score: i64,
    siblings: u32,
}

/// Decides for one pod at a time, keeping what carries from one decision to the next.
pub struct Selector {
    /// Where the next decision starts filtering, so sampled decisions visit every node.
    next_start_idx: usize,
    candidates: Vec<Candidate>,
    random: u64,
}

impl Default for Selector {
    fn default() -> Self {
        Self::new(0x9e37_79b9_7f4a_7c15)
    }
}

impl Selector {
    pub fn new(seed: u64) -> Self {
        Self {
            next_start_idx: 0,
            candidates: Vec::new(),
            random: seed | 1,
        }
    }

    /// xorshift64: tie-breaking needs speed, not quality.
    fn next_random(&mut self) -> u64 {
        let mut x = self.random;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random = x;
        x
    }

    pub fn decide(&mut self, cache: &Cache, pod: &PodInfo) -> Decision {
        let nodes = cache.nodes();
        let n_nodes = nodes.len();
        if n_nodes == 0 {
            return Decision::Unschedulable(unschedulable_message(0, &HashMap::new()));
        }
        let wanted = feasible_nodes_to_find(n_nodes);
        self.candidates.clear();
        let start = self.next_start_idx % n_nodes;
        let mut visited = 0;
        while visited < n_nodes && self.candidates.len() < wanted {
            let node_idx = (start + visited) % n_nodes;
            visited += 1;
            let node = &nodes[node_idx];
            if filters::check(node, pod).is_ok() {
                self.candidates.push(Candidate {
                    node_idx,
                    base_score: scores::least_allocated(node, pod) * scores::LEAST_ALLOCATED_WEIGHT
                        + scores::balanced_allocation(node, pod)
                            * scores::BALANCED_ALLOCATION_WEIGHT,
                    siblings: scores::siblings_on(node, pod),
                });
            }
        }
        self.next_start_idx = (start + visited) % n_nodes;
        if self.candidates.is_empty() {
            // Every node was visited and failed: count the reasons for the message.
            let mut histogram: HashMap<String, usize> = HashMap::new();
            for node in nodes {
                if let Err(failure) = filters::check(node, pod) {
                    failure.reasons(|reason| *histogram.entry(reason).or_default() += 1);
                }
            }
            return Decision::Unschedulable(unschedulable_message(n_nodes, &histogram));
        }
        let fewest = self
            .candidates
            .iter()
            .map(|c| c.siblings)
            .min()
            .unwrap_or(0);
        let most = self
            .candidates
            .iter()
            .map(|c| c.siblings)
            .max()
            .unwrap_or(0);
        let mut best_idx = 0;
        let mut best_score = i64::MIN;
        let mut ties = 0u64;
        for i in 0..self.candidates.len() {
            let candidate = &self.candidates[i];
            let score = candidate.base_score
                + scores::spread(candidate.siblings, fewest, most) * scores::SPREAD_WEIGHT;
            if score > best_score {
                best_score = score;
                best_idx = candidate.node_idx;
                ties = 1;
            } else if score == best_score {
                // Reservoir sampling: each of the tied nodes is kept with equal chance.
                ties += 1;
                let node_idx = candidate.node_idx;
                if self.next_random().is_multiple_of(ties) {
                    best_idx = node_idx;
                }
            }
        }
        Decision::Node(best_idx)
    }
}

/// Upstream's `FitError.Error()`: reasons counted over nodes, each as "COUNT REASON",
/// sorted as strings, then the preemption verdict (this scheduler does not preempt).
pub fn unschedulable_message(n_nodes: usize, histogram: &HashMap<String, usize>) -> String {
    let mut reasons: Vec<String> = histogram
        .iter()
        .map(|(reason, count)| format!("{count} {reason}"))
        .collect();
    reasons.sort();
    let mut message = format!("0/{n_nodes} nodes are available:");
    if !reasons.is_empty() {
        message.push(' ');
        message.push_str(&reasons.join(", "));
        message.push('.');
    }
    message.push_str(&format!(
        " preemption: 0/{n_nodes} nodes are available: {n_nodes} Preemption is not helpful for scheduling."
    ));
    message
}

#[cfg(test)]
mod tests {
    use super::super::cache::fixtures::{node, node_from, pod_with};
    use super::*;
    use serde_json::json;

    fn requesting(name: &str, cpu: &str, memory: &str) -> PodInfo {
        pod_with(
            name,
            json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu, "memory": memory}}}]}),
        )
    }

    #[test]
    fn sampling_follows_upstream() {
        assert_eq!(feasible_nodes_to_find(3), 3);
        assert_eq!(feasible_nodes_to_find(99), 99);
        assert_eq!(feasible_nodes_to_find(100), 100);
        assert_eq!(feasible_nodes_to_find(500), 230);
        assert_eq!(feasible_nodes_to_find(5_000), 500);
        assert_eq!(feasible_nodes_to_find(100_000), 5_000);
    }

    #[test]
    fn message_counts_and_sorts_reasons_like_upstream() {
        let mut cache = Cache::default();
        cache.apply_node(node("a", "1", "1Gi"));
        cache.apply_node(node("b", "1", "1Gi"));
        cache.apply_node(node_from(json!({
            "metadata": {"name": "c"},
            "spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"cpu": "64", "memory": "64Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        })));
        let decision = Selector::default().decide(&cache, &requesting("p", "100m", "4Gi"));
        assert_eq!(
            decision,
            Decision::Unschedulable(
                "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: db}, \
                 2 Insufficient memory. preemption: 0/3 nodes are available: \
                 3 Preemption is not helpful for scheduling."
                    .into()
            )
        );
    }

    #[test]
    fn no_nodes_at_all() {
        let decision = Selector::default().decide(&Cache::default(), &requesting("p", "1", "1"));
        assert_eq!(
            decision,
            Decision::Unschedulable(
                "0/0 nodes are available: preemption: 0/0 nodes are available: \
                 0 Preemption is not helpful for scheduling."
                    .into()
            )
        );
    }

    #[test]
    fn siblings_spread_over_equal_nodes() {
        let mut cache = Cache::default();
        for i in 0..4 {
            cache.apply_node(node(&format!("n{i}"), "8", "32Gi"));
        }
        let mut selector = Selector::default();
        for i in 0..8 {
            let pod = PodInfo {
                owner_uid: Some("rs".into()),
                ..requesting(&format!("p{i}"), "10m", "16Mi")
            };
            let Decision::Node(idx) = selector.decide(&cache, &pod) else {
                panic!("pod {i} unschedulable");
            };
            let name = cache.nodes()[idx].name.clone();
            cache.assume(&pod, &name);
        }
        for node in cache.nodes() {
            assert_eq!(node.usage.requested.pods, 2, "node {}", node.name);
        }
    }

    #[test]
    fn picks_the_node_with_room() {
        let mut cache = Cache::default();
        cache.apply_node(node("small", "1", "1Gi"));
        cache.apply_node(node("large", "16", "64Gi"));
        let decision = Selector::default().decide(&cache, &requesting("p", "2", "2Gi"));
        assert_eq!(decision, Decision::Node(1));
    }
}
