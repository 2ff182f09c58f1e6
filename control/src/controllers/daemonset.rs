//! DaemonSet controller: one pod per eligible node, and none elsewhere.
//!
//! A node is eligible when it matches the pod template's `nodeSelector` and required node
//! affinity and every NoSchedule/NoExecute taint on it is tolerated, counting the
//! tolerations upstream adds to every daemon pod (not-ready, unreachable, pressure,
//! unschedulable): a node need not be Ready, and a cordoned node still runs its daemons.
//!
//! Unlike upstream, which creates pods with a node affinity for the scheduler to honor, this
//! controller sets `spec.nodeName` directly: the pod is bound on creation and never waits
//! for the scheduler. Pods carry `controller-revision-hash` (a hash of the template);
//! RollingUpdate replaces old-hash pods at most `maxUnavailable` at a time; OnDelete waits.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    self as core, Node, NodeSelectorRequirement, PodSpec, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt as _};
use serde_json::json;

use super::deployment::{scaled_value, template_hash};
use super::pod::Pod;
use super::runtime::{
    Cache, Queue, adopt, controller_of, controller_reference, feed, is_not_found, key_of,
    pod_availability, pod_is_active, pod_is_ready, seed_and_run_workers, selector_matches,
    split_key,
};

pub const REVISION_HASH_LABEL: &str = "controller-revision-hash";

/// How long a created pod that the cache has not shown yet stands in for its node.
const CREATION_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);

/// Per node, the name of the pod created for it and when.
type PendingByNode = HashMap<String, (String, Instant)>;

pub struct DaemonSetController {
    client: Client,
    daemonsets: Cache<DaemonSet>,
    nodes: Cache<Node>,
    pods: Cache<Pod>,
    /// Per DaemonSet, pods created per node that the cache has not shown yet.
    pending_creations: Mutex<HashMap<String, PendingByNode>>,
}

impl DaemonSetController {
    pub fn new(
        client: Client,
        daemonsets: Cache<DaemonSet>,
        nodes: Cache<Node>,
        pods: Cache<Pod>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            daemonsets,
            nodes,
            pods,
            pending_creations: Mutex::default(),
        })
    }

    pub async fn run(self: Arc<Self>, workers: usize) {
        let queue = Queue::new();
        let daemonsets = self.daemonsets.clone();
        let all = move || daemonsets.keys();
        let from_daemonsets = self.daemonsets.feed_own_keys(queue.clone());
        let every = all.clone();
        let from_nodes = feed(
            queue.clone(),
            self.nodes.subscribe(),
            move |_: &Node| every(),
            all.clone(),
        );
        let owners = self.daemonsets.clone();
        let from_pods = feed(
            queue.clone(),
            self.pods.subscribe(),
            move |pod: &Pod| {
                let namespace = pod.namespace().unwrap_or_default();
                match controller_of(pod) {
                    Some(owner) if owner.kind == "DaemonSet" => {
                        vec![format!("{namespace}/{}", owner.name)]
                    }
                    Some(_) => Vec::new(),
                    None => owners
                        .in_namespace(&namespace)
                        .iter()
                        .filter(|ds| {
                            ds.spec
                                .as_ref()
                                .is_some_and(|s| selector_matches(&s.selector, pod.labels()))
                        })
                        .map(|ds| key_of(&**ds))
                        .collect(),
                }
            },
            all,
        );
        let _ = self.daemonsets.store.wait_until_ready().await;
        let _ = self.nodes.store.wait_until_ready().await;
        let _ = self.pods.store.wait_until_ready().await;
        let workers = seed_and_run_workers(
            "daemonset",
            queue,
            &self.daemonsets,
            workers,
            self.clone(),
            |this, key| async move { this.reconcile(&key).await },
        );
        tokio::join!(from_daemonsets, from_nodes, from_pods, workers);
    }

    async fn reconcile(&self, key: &str) -> anyhow::Result<Option<Duration>> {
        let (namespace, name) = split_key(key);
        let namespace = namespace.unwrap_or("default");
        let Some(ds) = self.daemonsets.get(Some(namespace), name) else {
            self.pending_creations
                .lock()
                .expect("pending lock")
                .remove(key);
            return Ok(None);
        };
        let spec = ds.spec.clone().unwrap_or_default();
        let uid = ds.metadata.uid.clone().unwrap_or_default();
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let deleting = ds.metadata.deletion_timestamp.is_some();

        // Creations still unseen are judged before the pods are read: judged after, a cache
        // that caught up in between would drop a creation from both, and it would be made
        // twice.
        let pending = {
            let mut all = self.pending_creations.lock().expect("pending lock");
            let entry = all.entry(key.to_string()).or_default();
            entry.retain(|_, (pod_name, since)| {
                self.pods.get(Some(namespace), pod_name).is_none()
                    && since.elapsed() < CREATION_VISIBILITY_TIMEOUT
            });
            entry.clone()
        };

        // Owned pods by node, adopting matching orphans.
        let mut by_node: BTreeMap<String, Vec<Arc<Pod>>> = BTreeMap::new();
        let mut terminating_on = std::collections::HashSet::new();
        let mut failed = Vec::new();
        for pod in self.pods.in_namespace(namespace) {
            let owned = match controller_of(&*pod) {
                Some(owner) => owner.uid == uid,
                None => {
                    !deleting
                        && pod_is_active(&pod)
                        && selector_matches(&spec.selector, pod.labels())
                        && adopt(&pods_api, &*pod, &*ds).await?
                }
            };
            if !owned {
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some() {
                // A replacement waits until the old pod is gone (host ports, volumes).
                if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
                    terminating_on.insert(node);
                }
                continue;
            }
            if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed") {
                failed.push(pod);
                continue;
            }
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            by_node.entry(node).or_default().push(pod);
        }

        let hash = template_hash(
            &spec.template,
            ds.status.as_ref().and_then(|s| s.collision_count),
        );
        let nodes = self.nodes.store.state();
        let mut to_create = Vec::new();
        let mut to_delete: Vec<Arc<Pod>> = failed;
        let mut desired = 0;
        let mut misscheduled = 0;
        let mut current = 0;
        let mut ready = 0;
        let mut available = 0;
        let mut updated = 0;
        let mut old_pods = Vec::new();
        let mut unavailable_now = 0;
        let min_ready_seconds = spec.min_ready_seconds.unwrap_or(0);
        let now = jiff::Timestamp::now();
        let mut requeue: Option<Duration> = None;
        for node in &nodes {
            let node_name = node.name_any();
            let should_run = should_run_on(&spec.template.spec, node);
            let mut pods = by_node.remove(&node_name).unwrap_or_default();
            if should_run {
                desired += 1;
                if pods.is_empty() {
                    if !pending.contains_key(&node_name) && !terminating_on.contains(&node_name) {
                        to_create.push(node_name.clone());
                    }
                    unavailable_now += 1;
                    continue;
                }
                current += 1;
                // Keep the oldest pod; extras go.
                pods.sort_by_key(|p| (p.metadata.creation_timestamp.clone(), p.name_any()));
                to_delete.extend(pods.drain(1..));
                let pod = &pods[0];
                if pod_is_ready(pod) {
                    ready += 1;
                }
                let (is_available, wait) = pod_availability(pod, min_ready_seconds, now);
                if is_available {
                    available += 1;
                } else {
                    unavailable_now += 1;
                }
                if let Some(wait) = wait {
                    requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
                }
                if pod.labels().get(REVISION_HASH_LABEL) == Some(&hash) {
                    updated += 1;
                } else {
                    old_pods.push((pod.clone(), is_available));
                }
            } else if !pods.is_empty() {
                misscheduled += 1;
                to_delete.extend(pods);
            }
        }
        // Pods on nodes that no longer exist.
        for (_, pods) in by_node {
            to_delete.extend(pods);
        }

        if !deleting {
            // Rolling update: old pods go, unavailable ones first, within maxUnavailable.
            let rolling = spec
                .update_strategy
                .as_ref()
                .and_then(|s| s.type_.as_deref())
                != Some("OnDelete");
            if rolling {
                let max_unavailable = spec
                    .update_strategy
                    .as_ref()
                    .and_then(|s| s.rolling_update.as_ref())
                    .and_then(|r| r.max_unavailable.clone())
                    .map(|v| scaled_value(&v, desired, true))
                    .unwrap_or(1)
                    .max(1);
                old_pods.sort_by_key(|(_, is_available)| *is_available);
                let mut budget = max_unavailable - unavailable_now;
                for (pod, is_available) in old_pods {
                    if !is_available {
                        to_delete.push(pod);
                    } else if budget > 0 {
                        budget -= 1;
                        to_delete.push(pod);
                    }
                }
            }
            self.create_pods(key, &ds, &hash, &to_create).await?;
            for pod in &to_delete {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: pod.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match pods_api.delete(&pod.name_any(), &params).await {
                    Ok(_) => {}
                    Err(error) if is_not_found(&error) => {}
                    Err(error) => {
                        return Err(error).context(format!("delete daemon pod {}", pod.name_any()));
                    }
                }
            }
        }

        let status = ds.status.clone().unwrap_or_default();
        let new_status = json!({
            "desiredNumberScheduled": desired,
            "currentNumberScheduled": current,
            "numberMisscheduled": misscheduled,
            "numberReady": ready,
            "numberAvailable": available,
            "numberUnavailable": desired - available,
            "updatedNumberScheduled": updated,
            "observedGeneration": ds.metadata.generation,
        });
        let changed = status.desired_number_scheduled != desired
            || status.current_number_scheduled != current
            || status.number_misscheduled != misscheduled
            || status.number_ready != ready
            || status.number_available.unwrap_or(0) != available
            || status.number_unavailable.unwrap_or(0) != desired - available
            || status.updated_number_scheduled.unwrap_or(0) != updated
            || status.observed_generation != ds.metadata.generation;
        if changed {
            let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), namespace);
            match api
                .patch_status(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"status": new_status})),
                )
                .await
            {
                Ok(_) => {}
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error).context("update daemonset status"),
            }
        }
        Ok(requeue)
    }

    async fn create_pods(
        &self,
        key: &str,
        ds: &DaemonSet,
        hash: &str,
        nodes: &[String],
    ) -> anyhow::Result<()> {
        if nodes.is_empty() {
            return Ok(());
        }
        let namespace = ds.namespace().unwrap_or_default();
        let pods_api: Api<core::Pod> = Api::namespaced(self.client.clone(), &namespace);
        let results = futures::future::join_all(nodes.iter().map(|node| {
            let pod = daemon_pod(ds, hash, node);
            let pods_api = pods_api.clone();
            async move {
                (
                    node.clone(),
                    pods_api.create(&PostParams::default(), &pod).await,
                )
            }
        }))
        .await;
        let mut first_error = None;
        let mut all = self.pending_creations.lock().expect("pending lock");
        let pending = all.entry(key.to_string()).or_default();
        for (node, result) in results {
            match result {
                Ok(pod) => {
                    pending.insert(node, (pod.name_any(), Instant::now()));
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => {
                Err(anyhow::Error::new(error).context(format!("create daemon pods for {key}")))
            }
            None => Ok(()),
        }
    }
}

/// The tolerations upstream adds to every daemon pod, so that daemons run on nodes that
/// are not ready, unreachable, under pressure or cordoned.
pub fn daemon_tolerations() -> Vec<Toleration> {
    let exists = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Toleration::default()
    };
    vec![
        exists("node.kubernetes.io/not-ready", "NoExecute"),
        exists("node.kubernetes.io/unreachable", "NoExecute"),
        exists("node.kubernetes.io/disk-pressure", "NoSchedule"),
        exists("node.kubernetes.io/memory-pressure", "NoSchedule"),
        exists("node.kubernetes.io/pid-pressure", "NoSchedule"),
        exists("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

fn daemon_pod(ds: &DaemonSet, hash: &str, node: &str) -> core::Pod {
    let template = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let meta = template.metadata.unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    labels.insert(REVISION_HASH_LABEL.into(), hash.into());
    let mut spec = template.spec.unwrap_or_default();
    spec.node_name = Some(node.into());
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    for toleration in daemon_tolerations() {
        if !tolerations
            .iter()
            .any(|t| t.key == toleration.key && t.effect == toleration.effect)
        {
            tolerations.push(toleration);
        }
    }
    core::Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", ds.name_any())),
            namespace: ds.namespace(),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: Some(vec![controller_reference(ds)]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// Whether a toleration tolerates a taint (upstream's ToleratesTaint).
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = toleration.effect.as_deref().filter(|e| !e.is_empty())
        && effect != taint.effect
    {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => toleration
            .key
            .as_deref()
            .is_none_or(|k| k.is_empty() || k == taint.key),
        _ => {
            toleration.key.as_deref() == Some(taint.key.as_str())
                && toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
    }
}

fn requirement_matches(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.clone().unwrap_or_default();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(value), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|v| v.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if requirement.operator == "Gt" {
                value > bound
            } else {
                value < bound
            }
        }
        _ => false,
    }
}

/// Whether a daemon pod with this spec belongs on `node`: nodeSelector, required node
/// affinity, and taints (with the daemon tolerations added).
pub fn should_run_on(spec: &Option<PodSpec>, node: &Node) -> bool {
    let empty = PodSpec::default();
    let spec = spec.as_ref().unwrap_or(&empty);
    let labels = node.labels();
    if let Some(selector) = &spec.node_selector
        && !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    if let Some(required) = required {
        let name = node.name_any();
        let any_term = required.node_selector_terms.iter().any(|term| {
            let expressions_ok = term
                .match_expressions
                .iter()
                .flatten()
                .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)));
            let fields_ok = term.match_fields.iter().flatten().all(|r| {
                let value = (r.key == "metadata.name").then_some(name.as_str());
                requirement_matches(r, value)
            });
            let empty_term = term.match_expressions.as_ref().is_none_or(Vec::is_empty)
                && term.match_fields.as_ref().is_none_or(Vec::is_empty);
            !empty_term && expressions_ok && fields_ok
        });
        if !any_term {
            return false;
        }
    }
    let mut tolerations = spec.tolerations.clone().unwrap_or_default();
    tolerations.extend(daemon_tolerations());
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_ref());
    taints.into_iter().flatten().all(|taint| {
        taint.effect == "PreferNoSchedule" || tolerations.iter().any(|t| tolerates(t, taint))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;

    fn node(labels: &[(&str, &str)], taints: Vec<Taint>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: Some(taints),
                ..NodeSpec::default()
            }),
            status: None,
        }
    }

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            ..Taint::default()
        }
    }

    #[test]
    fn eligibility_follows_selectors_and_taints() {
        let spec = Some(PodSpec {
            node_selector: Some(BTreeMap::from([("role".into(), "edge".into())])),
            ..PodSpec::default()
        });
        assert!(should_run_on(&spec, &node(&[("role", "edge")], vec![])));
        assert!(!should_run_on(&spec, &node(&[("role", "core")], vec![])));
        // A NoSchedule taint needs a toleration; not-ready and cordoned nodes are fine.
        assert!(!should_run_on(
            &spec,
            &node(&[("role", "edge")], vec![taint("dedicated", "NoSchedule")])
        ));
        assert!(should_run_on(
            &spec,
            &node(
                &[("role", "edge")],
                vec![taint("dedicated", "PreferNoSchedule")]
            )
        ));
        assert!(should_run_on(
            &spec,
            &node(
                &[("role", "edge")],
                vec![taint("node.kubernetes.io/unreachable", "NoExecute")]
            )
        ));
        assert!(should_run_on(
            &spec,
            &node(
                &[("role", "edge")],
                vec![taint("node.kubernetes.io/unschedulable", "NoSchedule")]
            )
        ));
        let tolerant = Some(PodSpec {
            tolerations: Some(vec![Toleration {
                key: Some("dedicated".into()),
                operator: Some("Exists".into()),
                ..Toleration::default()
            }]),
            ..PodSpec::default()
        });
        assert!(should_run_on(
            &tolerant,
            &node(&[], vec![taint("dedicated", "NoSchedule")])
        ));
    }
}
