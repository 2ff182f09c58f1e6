//! ReplicaSet controller: keeps `spec.replicas` pods that match the selector, owned by the
//! ReplicaSet, and reports how many exist, are labeled, ready and available.
//!
//! Like upstream's, it creates at most [`BURST_REPLICAS`] pods per pass, in slow-start
//! batches, and then waits until its own creations and deletions show up in the pod cache
//! (its "expectations") before it counts again, so that a cache that lags behind the API
//! server never makes it create the same pods twice.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt as _};
use serde_json::json;

use super::expectations::PodExpectations;
use super::pod::Pod;
use super::runtime::{
    Cache, Queue, adopt, controller_of, controller_reference, feed, is_not_found, key_of,
    pod_availability, pod_is_active, pod_is_ready, release, seed_and_run_workers, selector_matches,
    slow_start_batch, split_key,
};

/// At most this many pods are created or deleted in one pass, as upstream's burstReplicas.
pub const BURST_REPLICAS: usize = 500;

pub struct ReplicaSetController {
    client: Client,
    replicasets: Cache<ReplicaSet>,
    pods: Cache<Pod>,
    expectations: PodExpectations,
}

impl ReplicaSetController {
    pub fn new(client: Client, replicasets: Cache<ReplicaSet>, pods: Cache<Pod>) -> Arc<Self> {
        Arc::new(Self {
            client,
            replicasets,
            pods,
            expectations: PodExpectations::default(),
        })
    }

    /// Runs until the caches close.
    pub async fn run(self: Arc<Self>, workers: usize) {
        let queue = Queue::new();
        let from_replicasets = self.replicasets.feed_own_keys(queue.clone());
        let owners = self.replicasets.clone();
        let replicasets = self.replicasets.clone();
        let from_pods = feed(
            queue.clone(),
            self.pods.subscribe(),
            move |pod: &Pod| replicasets_for_pod(&owners, pod),
            move || replicasets.keys(),
        );
        let _ = self.replicasets.store.wait_until_ready().await;
        let _ = self.pods.store.wait_until_ready().await;
        let workers = seed_and_run_workers(
            "replicaset",
            queue,
            &self.replicasets,
            workers,
            self.clone(),
            |this, key| async move { this.reconcile(&key).await },
        );
        tokio::join!(from_replicasets, from_pods, workers);
    }

    async fn reconcile(&self, key: &str) -> anyhow::Result<Option<Duration>> {
        let (namespace, name) = split_key(key);
        let namespace = namespace.unwrap_or("default");
        let Some(rs) = self.replicasets.get(Some(namespace), name) else {
            self.expectations.forget(key);
            return Ok(None);
        };
        let rs_uid = rs.metadata.uid.clone().unwrap_or_default();
        let selector = rs
            .spec
            .as_ref()
            .map(|s| s.selector.clone())
            .unwrap_or_default();
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        // Expectations are judged before the pods are counted: judged after, a cache that
        // caught up in between would satisfy them while the count still missed the pods
        // just created, and the ReplicaSet would create them again.
        let may_manage = rs.metadata.deletion_timestamp.is_none()
            && self.expectations.satisfied(key, namespace, &self.pods);

        // Claim: owned pods that still match, plus orphans that match (adopted).
        let mut owned = Vec::new();
        for pod in self.pods.in_namespace(namespace) {
            if !pod_is_active(&pod) {
                continue;
            }
            let matches = selector_matches(&selector, pod.labels());
            match controller_of(&*pod) {
                Some(owner) if owner.uid == rs_uid => {
                    if matches {
                        owned.push(pod);
                    } else if rs.metadata.deletion_timestamp.is_none() {
                        release(&pods_api, &pod, &rs_uid).await?;
                    }
                }
                Some(_) => {}
                None if matches && rs.metadata.deletion_timestamp.is_none() => {
                    let adopted = adopt(&pods_api, &*pod, &*rs).await?;
                    if adopted {
                        owned.push(pod);
                    }
                }
                None => {}
            }
        }

        let desired = rs
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1)
            .max(0) as usize;
        let mut manage_error = None;
        if may_manage && let Err(error) = self.manage_replicas(key, &rs, &owned, desired).await {
            manage_error = Some(error);
        }

        let requeue = self.update_status(&rs, &owned).await?;
        match manage_error {
            Some(error) => Err(error),
            None => Ok(requeue),
        }
    }

    async fn manage_replicas(
        &self,
        key: &str,
        rs: &ReplicaSet,
        owned: &[Arc<Pod>],
        desired: usize,
    ) -> anyhow::Result<()> {
        let namespace = rs.namespace().unwrap_or_default();
        let name = rs.name_any();
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        if owned.len() < desired {
            let count = (desired - owned.len()).min(BURST_REPLICAS);
            let pod = pod_from_template(rs).context("build pod from template")?;
            let created = Mutex::new(Vec::new());
            let create_api: Api<core::Pod> = Api::namespaced(self.client.clone(), &namespace);
            let (_, error) = slow_start_batch(count, 1, |_| {
                let pods_api = create_api.clone();
                let pod = pod.clone();
                let created = &created;
                async move {
                    let pod = pods_api.create(&PostParams::default(), &pod).await?;
                    created.lock().expect("created lock").push(pod.name_any());
                    anyhow::Ok(())
                }
            })
            .await;
            let created = created.into_inner().expect("created lock");
            tracing::debug!(replicaset = %key, created = created.len(), "created pods");
            self.expectations.expect(key, created, Vec::new());
            if let Some(error) = error {
                return Err(error.context(format!("create pods for replicaset {namespace}/{name}")));
            }
        } else if owned.len() > desired {
            let count = (owned.len() - desired).min(BURST_REPLICAS);
            let victims = pods_to_delete(owned, count);
            let mut deleted = Vec::new();
            let results = futures::future::join_all(victims.iter().map(|pod| {
                let pods_api = pods_api.clone();
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: pod.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                async move { pods_api.delete(&pod.name_any(), &params).await }
            }))
            .await;
            let mut first_error = None;
            for (pod, result) in victims.iter().zip(results) {
                match result {
                    Ok(_) => {
                        deleted.push((pod.name_any(), pod.metadata.uid.clone().unwrap_or_default()))
                    }
                    Err(error) if is_not_found(&error) => {}
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                }
            }
            self.expectations.expect(key, Vec::new(), deleted);
            if let Some(error) = first_error {
                return Err(anyhow::Error::new(error)
                    .context(format!("delete pods of replicaset {namespace}/{name}")));
            }
        }
        Ok(())
    }

    /// Writes the status the pods show; returns when to look again for pods that will
    /// become available after minReadySeconds.
    async fn update_status(
        &self,
        rs: &ReplicaSet,
        owned: &[Arc<Pod>],
    ) -> anyhow::Result<Option<Duration>> {
        let min_ready_seconds = rs
            .spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0);
        let template_labels = rs
            .spec
            .as_ref()
            .and_then(|s| s.template.as_ref())
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let now = jiff::Timestamp::now();
        let mut fully_labeled = 0;
        let mut ready = 0;
        let mut available = 0;
        let mut requeue: Option<Duration> = None;
        for pod in owned {
            if template_labels
                .iter()
                .all(|(k, v)| pod.labels().get(k) == Some(v))
            {
                fully_labeled += 1;
            }
            if pod_is_ready(pod) {
                ready += 1;
            }
            let (is_available, wait) = pod_availability(pod, min_ready_seconds, now);
            if is_available {
                available += 1;
            }
            if let Some(wait) = wait {
                requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
            }
        }
        let status = rs.status.clone().unwrap_or_default();
        let observed_generation = rs.metadata.generation;
        let changed = status.replicas != owned.len() as i32
            || status.fully_labeled_replicas.unwrap_or(0) != fully_labeled
            || status.ready_replicas.unwrap_or(0) != ready
            || status.available_replicas.unwrap_or(0) != available
            || status.observed_generation != observed_generation;
        if changed {
            let api: Api<ReplicaSet> =
                Api::namespaced(self.client.clone(), &rs.namespace().unwrap_or_default());
            let patch = json!({"status": {
                "replicas": owned.len(),
                "fullyLabeledReplicas": fully_labeled,
                "readyReplicas": ready,
                "availableReplicas": available,
                "observedGeneration": observed_generation,
            }});
            match api
                .patch_status(
                    &rs.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {}
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error).context("update replicaset status"),
            }
        }
        Ok(requeue)
    }
}

/// The ReplicaSets a pod change concerns: its controller if that is a ReplicaSet, else the
/// ReplicaSets of its namespace that would adopt it.
fn replicasets_for_pod(replicasets: &Cache<ReplicaSet>, pod: &Pod) -> Vec<String> {
    let namespace = pod.namespace().unwrap_or_default();
    match controller_of(pod) {
        Some(owner) if owner.kind == "ReplicaSet" => vec![format!("{namespace}/{}", owner.name)],
        Some(_) => Vec::new(),
        None => replicasets
            .in_namespace(&namespace)
            .iter()
            .filter(|rs| {
                rs.spec
                    .as_ref()
                    .is_some_and(|s| selector_matches(&s.selector, pod.labels()))
            })
            .map(|rs| key_of(&**rs))
            .collect(),
    }
}

/// A new pod for `rs`, from its template (the API server picks the name).
pub fn pod_from_template(rs: &ReplicaSet) -> anyhow::Result<core::Pod> {
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .context("replicaset has no pod template")?;
    let template_meta = template.metadata.unwrap_or_default();
    Ok(core::Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", rs.name_any())),
            namespace: rs.namespace(),
            labels: template_meta.labels,
            annotations: template_meta.annotations,
            finalizers: template_meta.finalizers,
            owner_references: Some(vec![controller_reference(rs)]),
            ..ObjectMeta::default()
        },
        spec: template.spec,
        status: None,
    })
}

/// Upstream's deletion preference (ActivePods ordering): unscheduled before scheduled,
/// Pending before Unknown before Running, not ready before ready, ready for less time
/// before longer, more restarts before fewer, newer before older.
pub fn pods_to_delete(pods: &[Arc<Pod>], count: usize) -> Vec<Arc<Pod>> {
    fn rank(
        pod: &Pod,
    ) -> (
        u8,
        u8,
        u8,
        std::cmp::Reverse<i64>,
        std::cmp::Reverse<i32>,
        std::cmp::Reverse<i64>,
    ) {
        let scheduled = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| !n.is_empty());
        let phase = match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Pending") | None => 0,
            Some("Unknown") => 1,
            _ => 2,
        };
        let ready_since = super::runtime::ready_since(pod);
        let restarts = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|c| c.iter().map(|c| c.restart_count).sum())
            .unwrap_or(0);
        let created = pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0);
        (
            u8::from(scheduled),
            phase,
            u8::from(ready_since.is_some()),
            std::cmp::Reverse(ready_since.map(|t| t.as_second()).unwrap_or(0)),
            std::cmp::Reverse(restarts),
            std::cmp::Reverse(created),
        )
    }
    let mut ranked: Vec<_> = pods.to_vec();
    ranked.sort_by_key(|pod| rank(pod));
    ranked.truncate(count);
    ranked
}

/// The labels of a pod template, for callers that compare them.
pub fn template_labels(rs: &ReplicaSet) -> BTreeMap<String, String> {
    rs.spec
        .as_ref()
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::pod::{PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pod(name: &str, node: Option<&str>, phase: &str, ready: bool, created: i64) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(jiff::Timestamp::from_second(created).unwrap())),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_string),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        })
    }

    #[test]
    fn deletion_prefers_unscheduled_then_not_ready_then_newest() {
        let pods = vec![
            pod("running-old", Some("n1"), "Running", true, 100),
            pod("running-new", Some("n1"), "Running", true, 200),
            pod("not-ready", Some("n1"), "Running", false, 50),
            pod("unscheduled", None, "Pending", false, 10),
        ];
        let names: Vec<_> = pods_to_delete(&pods, 4)
            .iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(
            names,
            ["unscheduled", "not-ready", "running-new", "running-old"]
        );
    }
}
