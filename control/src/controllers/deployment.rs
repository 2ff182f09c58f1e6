//! Deployment controller: one ReplicaSet per pod template (named `<deployment>-<hash>`,
//! labeled `pod-template-hash`), rolled from old to new by the RollingUpdate or Recreate
//! strategy, with revisions, history cleanup, and the status and conditions that
//! `kubectl rollout status` waits on.
//!
//! The arithmetic follows upstream's `pkg/controller/deployment` (`rolling.go`,
//! `sync.go`, `util/deployment_util.go`) so that surge and unavailability bounds round the
//! same way. Every ReplicaSet write carries the resourceVersion the decision was made on,
//! so a decision taken on a stale cache fails with a conflict instead of overshooting.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt as _};
use serde_json::json;

use super::pod::Pod;
use super::runtime::{
    Cache, Queue, adopt, controller_of, controller_reference, feed, is_not_found, key_of, release,
    seed_and_run_workers, selector_matches, split_key,
};

pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
pub const DESIRED_REPLICAS_ANNOTATION: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS_ANNOTATION: &str = "deployment.kubernetes.io/max-replicas";
pub const REVISION_HISTORY_ANNOTATION: &str = "deployment.kubernetes.io/revision-history";
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// Annotations of a Deployment that are not copied to its ReplicaSets (upstream's
/// annotationsToSkip).
const ANNOTATIONS_NOT_COPIED: [&str; 5] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION_ANNOTATION,
    REVISION_HISTORY_ANNOTATION,
    DESIRED_REPLICAS_ANNOTATION,
    MAX_REPLICAS_ANNOTATION,
];

pub struct DeploymentController {
    client: Client,
    deployments: Cache<Deployment>,
    replicasets: Cache<ReplicaSet>,
    pods: Cache<Pod>,
}

impl DeploymentController {
    pub fn new(
        client: Client,
        deployments: Cache<Deployment>,
        replicasets: Cache<ReplicaSet>,
        pods: Cache<Pod>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            deployments,
            replicasets,
            pods,
        })
    }

    /// Runs until the caches close.
    pub async fn run(self: Arc<Self>, workers: usize) {
        let queue = Queue::new();
        let deployments = self.deployments.clone();
        let all = move || deployments.keys();
        let from_deployments = self.deployments.feed_own_keys(queue.clone());
        let owners = self.deployments.clone();
        let from_replicasets = feed(
            queue.clone(),
            self.replicasets.subscribe(),
            move |rs: &ReplicaSet| deployments_for_replicaset(&owners, rs),
            all.clone(),
        );
        // Recreate waits for old pods to be gone: their deletion must wake the Deployment.
        // Only Recreate Deployments listen to pods; the others see their pods through the
        // ReplicaSets' status.
        let replicasets = self.replicasets.clone();
        let owners = self.deployments.clone();
        let from_pods = feed(
            queue.clone(),
            self.pods.subscribe(),
            move |pod: &Pod| {
                let Some(owner) = controller_of(pod).filter(|o| o.kind == "ReplicaSet") else {
                    return Vec::new();
                };
                let namespace = pod.namespace().unwrap_or_default();
                replicasets
                    .get(Some(&namespace), &owner.name)
                    .and_then(|rs| {
                        controller_of(&*rs)
                            .filter(|o| o.kind == "Deployment")
                            .cloned()
                    })
                    .filter(|d| {
                        owners.get(Some(&namespace), &d.name).is_some_and(|d| {
                            d.spec
                                .as_ref()
                                .and_then(|s| s.strategy.as_ref())
                                .and_then(|s| s.type_.as_deref())
                                == Some("Recreate")
                        })
                    })
                    .map(|d| vec![format!("{namespace}/{}", d.name)])
                    .unwrap_or_default()
            },
            all,
        );
        let _ = self.deployments.store.wait_until_ready().await;
        let _ = self.replicasets.store.wait_until_ready().await;
        let _ = self.pods.store.wait_until_ready().await;
        let workers = seed_and_run_workers(
            "deployment",
            queue,
            &self.deployments,
            workers,
            self.clone(),
            |this, key| async move { this.reconcile(&key).await },
        );
        tokio::join!(from_deployments, from_replicasets, from_pods, workers);
    }

    async fn reconcile(&self, key: &str) -> anyhow::Result<Option<Duration>> {
        let (namespace, name) = split_key(key);
        let namespace = namespace.unwrap_or("default");
        let Some(deployment) = self.deployments.get(Some(namespace), name) else {
            return Ok(None);
        };
        let mut sync = Sync {
            client: self.client.clone(),
            deployment: (*deployment).clone(),
            replicasets: self.claim_replicasets(&deployment).await?,
            progress: None,
        };
        if deployment.metadata.deletion_timestamp.is_some() {
            return sync.write_status().await;
        }
        let paused = sync.spec().paused.unwrap_or(false);
        if paused || sync.is_scaling_event() {
            sync.sync_revision(false).await?;
            sync.scale().await?;
            if !paused {
                sync.cleanup().await?;
            }
            return sync.write_status().await;
        }
        let recreate = sync
            .spec()
            .strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref())
            == Some("Recreate");
        if recreate {
            self.rollout_recreate(&mut sync).await?;
        } else {
            sync.rollout_rolling().await?;
        }
        sync.write_status().await
    }

    async fn rollout_recreate(&self, sync: &mut Sync) -> anyhow::Result<()> {
        sync.sync_revision(false).await?;
        let new_index = sync.new_index();
        let mut scaled_down = false;
        for index in 0..sync.replicasets.len() {
            if Some(index) != new_index && replicas_of(&sync.replicasets[index]) > 0 {
                sync.scale_replicaset(index, 0).await?;
                scaled_down = true;
            }
        }
        if scaled_down {
            return Ok(());
        }
        // Recreate guarantees old pods are gone before new ones start.
        let old_uids: Vec<String> = sync
            .replicasets
            .iter()
            .enumerate()
            .filter(|(index, _)| Some(*index) != new_index)
            .filter_map(|(_, rs)| rs.metadata.uid.clone())
            .collect();
        let namespace = sync.deployment.namespace().unwrap_or_default();
        let old_pods_running = self.pods.in_namespace(&namespace).iter().any(|pod| {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            controller_of(&**pod).is_some_and(|o| old_uids.contains(&o.uid))
                && !matches!(phase, Some("Succeeded" | "Failed"))
        });
        if old_pods_running {
            return Ok(());
        }
        let new_index = match sync.new_index() {
            Some(index) => index,
            None => sync.sync_revision(true).await?.context("new replicaset")?,
        };
        let desired = sync.desired_replicas();
        if replicas_of(&sync.replicasets[new_index]) != desired {
            sync.scale_replicaset(new_index, desired).await?;
        }
        if sync.is_complete() {
            sync.cleanup().await?;
        }
        Ok(())
    }

    /// The ReplicaSets this Deployment controls, adopting orphans that match its selector
    /// and releasing owned ones that no longer do.
    async fn claim_replicasets(&self, deployment: &Deployment) -> anyhow::Result<Vec<ReplicaSet>> {
        let namespace = deployment.namespace().unwrap_or_default();
        let uid = deployment.metadata.uid.clone().unwrap_or_default();
        let selector = deployment
            .spec
            .as_ref()
            .map(|s| s.selector.clone())
            .unwrap_or_default();
        let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &namespace);
        let mut owned = Vec::new();
        for rs in self.replicasets.in_namespace(&namespace) {
            let matches = selector_matches(&selector, rs.labels());
            match controller_of(&*rs) {
                Some(owner) if owner.uid == uid => {
                    if matches {
                        owned.push((*rs).clone());
                    } else if deployment.metadata.deletion_timestamp.is_none() {
                        release(&api, &*rs, &uid).await?;
                    }
                }
                None if matches
                    && deployment.metadata.deletion_timestamp.is_none()
                    && rs.metadata.deletion_timestamp.is_none() =>
                {
                    let adopted = adopt(&api, &*rs, deployment).await?;
                    if adopted {
                        owned.push((*rs).clone());
                    }
                }
                _ => {}
            }
        }
        owned.sort_by_key(|rs| (rs.metadata.creation_timestamp.clone(), rs.name_any()));
        Ok(owned)
    }
}

/// The Deployments a ReplicaSet change concerns.
fn deployments_for_replicaset(deployments: &Cache<Deployment>, rs: &ReplicaSet) -> Vec<String> {
    let namespace = rs.namespace().unwrap_or_default();
    match controller_of(rs) {
        Some(owner) if owner.kind == "Deployment" => vec![format!("{namespace}/{}", owner.name)],
        Some(_) => Vec::new(),
        None => deployments
            .in_namespace(&namespace)
            .iter()
            .filter(|d| {
                d.spec
                    .as_ref()
                    .is_some_and(|s| selector_matches(&s.selector, rs.labels()))
            })
            .map(|d| key_of(&**d))
            .collect(),
    }
}

/// What happened to the rollout in this pass, for the Progressing condition.
enum Progress {
    Created(String),
    Found(String),
}

/// One pass over one Deployment and its ReplicaSets. ReplicaSets written in the pass are
/// replaced by what the API server returned, so later steps see the new values.
struct Sync {
    client: Client,
    deployment: Deployment,
    replicasets: Vec<ReplicaSet>,
    progress: Option<Progress>,
}

impl Sync {
    fn spec(&self) -> &k8s_openapi::api::apps::v1::DeploymentSpec {
        self.deployment
            .spec
            .as_ref()
            .expect("deployments have a spec")
    }

    fn namespace(&self) -> String {
        self.deployment.namespace().unwrap_or_default()
    }

    fn desired_replicas(&self) -> i32 {
        self.spec().replicas.unwrap_or(1)
    }

    fn template(&self) -> &PodTemplateSpec {
        &self.spec().template
    }

    fn rs_api(&self) -> Api<ReplicaSet> {
        Api::namespaced(self.client.clone(), &self.namespace())
    }

    /// The ReplicaSet whose template is the Deployment's (the oldest if several).
    fn new_index(&self) -> Option<usize> {
        self.replicasets.iter().position(|rs| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|t| equal_ignore_hash(t, self.template()))
        })
    }

    fn old_indices(&self) -> Vec<usize> {
        let new_index = self.new_index();
        (0..self.replicasets.len())
            .filter(|i| Some(*i) != new_index)
            .collect()
    }

    fn max_surge_and_unavailable(&self) -> (i32, i32) {
        let rolling = self
            .spec()
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref());
        let recreate = self
            .spec()
            .strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref())
            == Some("Recreate");
        if recreate {
            return (0, 0);
        }
        let default = IntOrString::String("25%".into());
        let surge = rolling
            .and_then(|r| r.max_surge.clone())
            .unwrap_or(default.clone());
        let unavailable = rolling
            .and_then(|r| r.max_unavailable.clone())
            .unwrap_or(default);
        resolve_fenceposts(&surge, &unavailable, self.desired_replicas())
    }

    fn is_scaling_event(&self) -> bool {
        let desired = self.desired_replicas().to_string();
        self.replicasets.iter().any(|rs| {
            replicas_of(rs) > 0
                && rs.metadata.deletion_timestamp.is_none()
                && rs.annotations().get(DESIRED_REPLICAS_ANNOTATION) != Some(&desired)
        })
    }

    /// Makes sure the new ReplicaSet (if any, or created when `create`) carries the next
    /// revision, and the Deployment the same revision. Returns the new ReplicaSet's index.
    async fn sync_revision(&mut self, create: bool) -> anyhow::Result<Option<usize>> {
        let old = self.old_indices();
        let max_old_revision = old
            .iter()
            .map(|&i| revision_of(&self.replicasets[i]))
            .max()
            .unwrap_or(0);
        let new_revision = max_old_revision + 1;
        let index = match self.new_index() {
            Some(index) => {
                let rs = &self.replicasets[index];
                let current = revision_of(rs);
                let min_ready = self.spec().min_ready_seconds;
                let rs_min_ready = rs.spec.as_ref().and_then(|s| s.min_ready_seconds);
                if current < new_revision || min_ready.unwrap_or(0) != rs_min_ready.unwrap_or(0) {
                    let mut annotations = BTreeMap::new();
                    annotations.insert(
                        REVISION_ANNOTATION.to_string(),
                        new_revision.max(current).to_string(),
                    );
                    for (key, value) in self.deployment.annotations() {
                        if !ANNOTATIONS_NOT_COPIED.contains(&key.as_str()) {
                            annotations.insert(key.clone(), value.clone());
                        }
                    }
                    let patch = json!({
                        "metadata": {"annotations": annotations, "resourceVersion": rs.metadata.resource_version},
                        "spec": {"minReadySeconds": min_ready.unwrap_or(0)},
                    });
                    let updated = self
                        .rs_api()
                        .patch(
                            &rs.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        )
                        .await
                        .with_context(|| format!("set revision of replicaset {}", rs.name_any()))?;
                    self.replicasets[index] = updated;
                }
                if self.progress.is_none() {
                    self.progress = Some(Progress::Found(self.replicasets[index].name_any()));
                }
                Some(index)
            }
            None if create => Some(self.create_new_replicaset(new_revision).await?),
            None => None,
        };
        if let Some(index) = index {
            let revision = revision_of(&self.replicasets[index]).to_string();
            if self.deployment.annotations().get(REVISION_ANNOTATION) != Some(&revision) {
                let patch = json!({"metadata": {"annotations": {REVISION_ANNOTATION: revision}}});
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace());
                self.deployment = api
                    .patch(
                        &self.deployment.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .context("set deployment revision")?;
            }
        }
        Ok(index)
    }

    async fn create_new_replicaset(&mut self, revision: i64) -> anyhow::Result<usize> {
        let collision_count = self
            .deployment
            .status
            .as_ref()
            .and_then(|s| s.collision_count);
        let hash = template_hash(self.template(), collision_count);
        let name = format!("{}-{hash}", self.deployment.name_any());
        let mut template = self.template().clone();
        let template_meta = template.metadata.get_or_insert_with(ObjectMeta::default);
        template_meta
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(POD_TEMPLATE_HASH_LABEL.into(), hash.clone());
        let mut selector: LabelSelector = self.spec().selector.clone();
        selector
            .match_labels
            .get_or_insert_with(BTreeMap::new)
            .insert(POD_TEMPLATE_HASH_LABEL.into(), hash.clone());
        let desired = self.desired_replicas();
        let (surge, _) = self.max_surge_and_unavailable();
        let replicas = new_rs_new_replicas(
            self.is_recreate(),
            desired,
            surge,
            self.replicasets.iter().map(replicas_of).sum(),
            0,
        );
        let mut annotations = BTreeMap::new();
        for (key, value) in self.deployment.annotations() {
            if !ANNOTATIONS_NOT_COPIED.contains(&key.as_str()) {
                annotations.insert(key.clone(), value.clone());
            }
        }
        annotations.insert(REVISION_ANNOTATION.into(), revision.to_string());
        annotations.insert(DESIRED_REPLICAS_ANNOTATION.into(), desired.to_string());
        annotations.insert(
            MAX_REPLICAS_ANNOTATION.into(),
            (desired + surge).to_string(),
        );
        let mut labels = template_meta.labels.clone().unwrap_or_default();
        labels.insert(POD_TEMPLATE_HASH_LABEL.into(), hash);
        let rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace()),
                labels: Some(labels),
                annotations: Some(annotations),
                owner_references: Some(vec![controller_reference(&self.deployment)]),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
                replicas: Some(replicas),
                min_ready_seconds: self.spec().min_ready_seconds,
                selector,
                template: Some(template),
            }),
            status: None,
        };
        let created = match self.rs_api().create(&PostParams::default(), &rs).await {
            Ok(created) => created,
            Err(kube::Error::Api(response)) if response.code == 409 => {
                // A ReplicaSet of that name exists: ours with our template (the cache was
                // behind), or a hash collision, resolved as upstream by a new collisionCount.
                let existing = self
                    .rs_api()
                    .get(&name)
                    .await
                    .context("get existing replicaset")?;
                let ours = controller_of(&existing)
                    .is_some_and(|o| Some(&o.uid) == self.deployment.metadata.uid.as_ref());
                let same = existing
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.as_ref())
                    .is_some_and(|t| equal_ignore_hash(t, self.template()));
                if ours && same {
                    existing
                } else {
                    let next = collision_count.unwrap_or(0).wrapping_add(1);
                    let api: Api<Deployment> =
                        Api::namespaced(self.client.clone(), &self.namespace());
                    api.patch_status(
                        &self.deployment.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"status": {"collisionCount": next}})),
                    )
                    .await
                    .context("bump collisionCount")?;
                    anyhow::bail!(
                        "replicaset {name} exists with another template: collisionCount is now {next}"
                    );
                }
            }
            Err(error) => return Err(error).context(format!("create replicaset {name}")),
        };
        self.progress = Some(Progress::Created(created.name_any()));
        self.replicasets.push(created);
        Ok(self.replicasets.len() - 1)
    }

    fn is_recreate(&self) -> bool {
        self.spec()
            .strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref())
            == Some("Recreate")
    }

    /// Sets a ReplicaSet's replicas (and the annotations that record why), conditional on
    /// the resourceVersion it was read at.
    async fn scale_replicaset(&mut self, index: usize, replicas: i32) -> anyhow::Result<()> {
        let desired = self.desired_replicas();
        let (surge, _) = self.max_surge_and_unavailable();
        let rs = &self.replicasets[index];
        let patch = json!({
            "metadata": {
                "resourceVersion": rs.metadata.resource_version,
                "annotations": {
                    DESIRED_REPLICAS_ANNOTATION: desired.to_string(),
                    MAX_REPLICAS_ANNOTATION: (desired + surge).to_string(),
                },
            },
            "spec": {"replicas": replicas},
        });
        tracing::debug!(replicaset = %rs.name_any(), from = replicas_of(rs), to = replicas, "scale");
        let updated = self
            .rs_api()
            .patch(
                &rs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .with_context(|| format!("scale replicaset {} to {replicas}", rs.name_any()))?;
        self.replicasets[index] = updated;
        Ok(())
    }

    /// A change of `spec.replicas` outside a rollout: the single active ReplicaSet takes
    /// it; during a rollout, new replicas go to the new ReplicaSet and removed ones come
    /// from the largest old ReplicaSets first (a simplification of upstream's proportional
    /// scaling, which splits both ways by size).
    async fn scale(&mut self) -> anyhow::Result<()> {
        let desired = self.desired_replicas();
        let new_index = self.new_index();
        let active: Vec<usize> = (0..self.replicasets.len())
            .filter(|&i| replicas_of(&self.replicasets[i]) > 0)
            .collect();
        let single = match active.len() {
            0 => new_index.or_else(|| self.replicasets.len().checked_sub(1)),
            1 => Some(active[0]),
            _ => None,
        };
        if let Some(index) = single {
            if replicas_of(&self.replicasets[index]) != desired
                || self.replicasets[index]
                    .annotations()
                    .get(DESIRED_REPLICAS_ANNOTATION)
                    != Some(&desired.to_string())
            {
                self.scale_replicaset(index, desired).await?;
            }
            return Ok(());
        }
        // The new ReplicaSet is saturated: the old ones go away.
        if let Some(new) = new_index
            && replicas_of(&self.replicasets[new]) == desired
            && self.replicasets[new]
                .status
                .as_ref()
                .and_then(|s| s.available_replicas)
                .unwrap_or(0)
                == desired
        {
            for index in self.old_indices() {
                if replicas_of(&self.replicasets[index]) > 0 {
                    self.scale_replicaset(index, 0).await?;
                }
            }
            return Ok(());
        }
        let (surge, _) = self.max_surge_and_unavailable();
        let allowed = desired + surge;
        let current: i32 = self.replicasets.iter().map(replicas_of).sum();
        let mut to_add = allowed - current;
        let mut order: Vec<usize> = active.clone();
        if to_add > 0 {
            if let Some(new) = new_index {
                let target = replicas_of(&self.replicasets[new]) + to_add;
                self.scale_replicaset(new, target).await?;
                to_add = 0;
            }
        } else if to_add < 0 {
            order.retain(|&i| Some(i) != new_index);
            order.sort_by_key(|&i| std::cmp::Reverse(replicas_of(&self.replicasets[i])));
            if let Some(new) = new_index {
                order.push(new);
            }
            for index in order {
                if to_add == 0 {
                    break;
                }
                let current = replicas_of(&self.replicasets[index]);
                let remove = current.min(-to_add);
                self.scale_replicaset(index, current - remove).await?;
                to_add += remove;
            }
        }
        // Record the new desired count on every active ReplicaSet so the scaling event ends.
        for index in active {
            if self.replicasets[index]
                .annotations()
                .get(DESIRED_REPLICAS_ANNOTATION)
                != Some(&desired.to_string())
            {
                let replicas = replicas_of(&self.replicasets[index]);
                self.scale_replicaset(index, replicas).await?;
            }
        }
        let _ = to_add;
        Ok(())
    }

    async fn rollout_rolling(&mut self) -> anyhow::Result<()> {
        let new_index = self
            .sync_revision(true)
            .await?
            .context("rolling update has a new replicaset")?;
        let desired = self.desired_replicas();
        let (surge, unavailable) = self.max_surge_and_unavailable();

        // Scale up the new ReplicaSet within the surge.
        let total: i32 = self.replicasets.iter().map(replicas_of).sum();
        let new_replicas = replicas_of(&self.replicasets[new_index]);
        let target = new_rs_new_replicas(false, desired, surge, total, new_replicas);
        if target != new_replicas {
            self.scale_replicaset(new_index, target).await?;
            return Ok(());
        }

        // Scale down old ReplicaSets within the availability budget.
        let old = self.old_indices();
        let old_count: i32 = old.iter().map(|&i| replicas_of(&self.replicasets[i])).sum();
        if old_count > 0 {
            let all_count: i32 = self.replicasets.iter().map(replicas_of).sum();
            let new_rs = &self.replicasets[new_index];
            let new_unavailable = (replicas_of(new_rs) - available_of(new_rs)).max(0);
            let min_available = desired - unavailable;
            let max_scaled_down = all_count - min_available - new_unavailable;
            if max_scaled_down > 0 {
                let mut old_sorted = old.clone();
                old_sorted.sort_by_key(|&i| {
                    (
                        self.replicasets[i].metadata.creation_timestamp.clone(),
                        self.replicasets[i].name_any(),
                    )
                });
                // First old replicas that are not available anyway.
                let mut cleaned = 0;
                for &index in &old_sorted {
                    if cleaned >= max_scaled_down {
                        break;
                    }
                    let rs = &self.replicasets[index];
                    let (replicas, available) = (replicas_of(rs), available_of(rs));
                    if replicas == available {
                        continue;
                    }
                    let count = (max_scaled_down - cleaned).min(replicas - available);
                    if count > 0 {
                        self.scale_replicaset(index, replicas - count).await?;
                        cleaned += count;
                    }
                }
                // Then available old replicas, keeping minAvailable.
                // An old ReplicaSet just scaled down may still report the pods it is about
                // to delete as available: count at most its replicas.
                let available_total: i32 = self
                    .replicasets
                    .iter()
                    .map(|rs| available_of(rs).min(replicas_of(rs)))
                    .sum();
                let mut budget = available_total - min_available;
                let mut scaled = cleaned;
                for &index in &old_sorted {
                    if budget <= 0 {
                        break;
                    }
                    let replicas = replicas_of(&self.replicasets[index]);
                    if replicas == 0 {
                        continue;
                    }
                    let count = replicas.min(budget);
                    self.scale_replicaset(index, replicas - count).await?;
                    budget -= count;
                    scaled += count;
                }
                if scaled > 0 {
                    return Ok(());
                }
            }
        }
        if self.is_complete() {
            self.cleanup().await?;
        }
        Ok(())
    }

    /// Whether the rollout is done: every replica updated and available, no old ones.
    fn is_complete(&self) -> bool {
        let status = self.compute_status_counts();
        let desired = self.desired_replicas();
        status.updated_replicas == Some(desired)
            && status.replicas == Some(desired)
            && status.available_replicas == Some(desired)
            && self.deployment.metadata.generation <= Some(self.observed_generation())
    }

    fn observed_generation(&self) -> i64 {
        self.deployment.metadata.generation.unwrap_or(0)
    }

    /// Deletes old, empty ReplicaSets beyond `revisionHistoryLimit`, oldest revision first.
    async fn cleanup(&mut self) -> anyhow::Result<()> {
        let limit = self.spec().revision_history_limit.unwrap_or(10).max(0) as usize;
        let mut empty_old: Vec<usize> = self
            .old_indices()
            .into_iter()
            .filter(|&i| {
                let rs = &self.replicasets[i];
                replicas_of(rs) == 0
                    && rs.status.as_ref().map(|s| s.replicas).unwrap_or(0) == 0
                    && rs.metadata.deletion_timestamp.is_none()
            })
            .collect();
        if empty_old.len() <= limit {
            return Ok(());
        }
        empty_old.sort_by_key(|&i| revision_of(&self.replicasets[i]));
        let excess = empty_old.len() - limit;
        let mut removed = Vec::new();
        for &index in &empty_old[..excess] {
            let rs = &self.replicasets[index];
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: rs.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match self.rs_api().delete(&rs.name_any(), &params).await {
                Ok(_) => removed.push(index),
                Err(error) if is_not_found(&error) => removed.push(index),
                Err(error) => {
                    return Err(error).context(format!("delete old replicaset {}", rs.name_any()));
                }
            }
        }
        removed.sort_unstable();
        for index in removed.into_iter().rev() {
            self.replicasets.remove(index);
        }
        Ok(())
    }

    fn compute_status_counts(&self) -> DeploymentStatus {
        let new_index = self.new_index();
        let live: Vec<&ReplicaSet> = self.replicasets.iter().collect();
        let status_of = |rs: &ReplicaSet| rs.status.clone().unwrap_or_default();
        let total_spec: i32 = live.iter().map(|rs| replicas_of(rs)).sum();
        let available: i32 = live.iter().map(|rs| available_of(rs)).sum();
        DeploymentStatus {
            replicas: Some(live.iter().map(|rs| status_of(rs).replicas).sum()),
            updated_replicas: Some(
                new_index
                    .map(|i| status_of(&self.replicasets[i]).replicas)
                    .unwrap_or(0),
            ),
            ready_replicas: Some(
                live.iter()
                    .map(|rs| status_of(rs).ready_replicas.unwrap_or(0))
                    .sum(),
            ),
            available_replicas: Some(available),
            unavailable_replicas: Some((total_spec - available).max(0)),
            observed_generation: Some(self.observed_generation()),
            collision_count: self
                .deployment
                .status
                .as_ref()
                .and_then(|s| s.collision_count),
            ..DeploymentStatus::default()
        }
    }

    /// Writes status and conditions; returns when to look again for the progress deadline.
    async fn write_status(&self) -> anyhow::Result<Option<Duration>> {
        let old = self.deployment.status.clone().unwrap_or_default();
        let mut status = self.compute_status_counts();
        let desired = self.desired_replicas();
        let (_, unavailable) = self.max_surge_and_unavailable();
        let now = jiff::Timestamp::now();
        let mut conditions = old.conditions.clone().unwrap_or_default();
        let available_ok = status.available_replicas.unwrap_or(0) >= desired - unavailable;
        set_condition(
            &mut conditions,
            "Available",
            available_ok,
            if available_ok {
                "MinimumReplicasAvailable"
            } else {
                "MinimumReplicasUnavailable"
            },
            if available_ok {
                "Deployment has minimum availability."
            } else {
                "Deployment does not have minimum availability."
            },
            now,
        );
        let mut requeue = None;
        let paused = self.spec().paused.unwrap_or(false);
        let new_name = self.new_index().map(|i| self.replicasets[i].name_any());
        let complete = status.updated_replicas == Some(desired)
            && status.replicas == Some(desired)
            && status.available_replicas == Some(desired);
        let deadline = self.spec().progress_deadline_seconds.unwrap_or(600);
        if paused {
            set_condition(
                &mut conditions,
                "Progressing",
                false,
                "DeploymentPaused",
                "Deployment is paused",
                now,
            );
        } else if complete && let Some(new_name) = &new_name {
            set_condition(
                &mut conditions,
                "Progressing",
                true,
                "NewReplicaSetAvailable",
                &format!("ReplicaSet \"{new_name}\" has successfully progressed."),
                now,
            );
        } else {
            let progressed = match &self.progress {
                Some(Progress::Created(name)) => Some((
                    "NewReplicaSetCreated",
                    format!("Created new replica set \"{name}\""),
                )),
                _ if status_progressed(&old, &status)
                    || old
                        .conditions
                        .as_ref()
                        .is_none_or(|c| !c.iter().any(|c| c.type_ == "Progressing")) =>
                {
                    new_name.as_ref().map(|name| {
                        (
                            "ReplicaSetUpdated",
                            format!("ReplicaSet \"{name}\" is progressing."),
                        )
                    })
                }
                Some(Progress::Found(name))
                    if conditions.iter().all(|c| {
                        c.type_ != "Progressing"
                            || c.reason.as_deref() == Some("NewReplicaSetAvailable")
                    }) =>
                {
                    Some((
                        "FoundNewReplicaSet",
                        format!("Found new replica set \"{name}\""),
                    ))
                }
                _ => None,
            };
            if let Some((reason, message)) = progressed {
                set_condition(&mut conditions, "Progressing", true, reason, &message, now);
                if let Some(condition) = conditions.iter_mut().find(|c| c.type_ == "Progressing") {
                    condition.last_update_time = Some(Time(now));
                }
            }
            let last_update = conditions
                .iter()
                .find(|c| c.type_ == "Progressing" && c.status == "True")
                .and_then(|c| c.last_update_time.as_ref().map(|t| t.0));
            if let Some(last_update) = last_update {
                let deadline_at =
                    last_update + jiff::SignedDuration::from_secs(i64::from(deadline));
                if deadline_at <= now {
                    let name = new_name.clone().unwrap_or_default();
                    set_condition(
                        &mut conditions,
                        "Progressing",
                        false,
                        "ProgressDeadlineExceeded",
                        &format!("ReplicaSet \"{name}\" has timed out progressing."),
                        now,
                    );
                } else {
                    let wait = (deadline_at - now).get_seconds().max(0) as u64 + 1;
                    requeue = Some(Duration::from_secs(wait));
                }
            }
        }
        status.conditions = Some(conditions);
        if status == old {
            return Ok(requeue);
        }
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace());
        let patch = json!({"status": status});
        match api
            .patch_status(
                &self.deployment.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(requeue),
            Err(error) if is_not_found(&error) => Ok(None),
            Err(error) => Err(error).context("update deployment status"),
        }
    }
}

/// Whether the counts moved toward the goal since the last status (upstream's
/// DeploymentProgressing).
fn status_progressed(old: &DeploymentStatus, new: &DeploymentStatus) -> bool {
    let old_old_replicas = old.replicas.unwrap_or(0) - old.updated_replicas.unwrap_or(0);
    let new_old_replicas = new.replicas.unwrap_or(0) - new.updated_replicas.unwrap_or(0);
    new.updated_replicas.unwrap_or(0) > old.updated_replicas.unwrap_or(0)
        || new_old_replicas < old_old_replicas
        || new.ready_replicas.unwrap_or(0) > old.ready_replicas.unwrap_or(0)
        || new.available_replicas.unwrap_or(0) > old.available_replicas.unwrap_or(0)
}

/// Sets a condition, keeping lastTransitionTime when the status did not change.
fn set_condition(
    conditions: &mut Vec<DeploymentCondition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    now: jiff::Timestamp,
) {
    let status = if ok { "True" } else { "False" };
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if existing.status == status
            && existing.reason.as_deref() == Some(reason)
            && existing.message.as_deref() == Some(message)
        {
            return;
        }
        if existing.status != status {
            existing.last_transition_time = Some(Time(now));
        }
        existing.status = status.into();
        existing.reason = Some(reason.into());
        existing.message = Some(message.into());
        existing.last_update_time = Some(Time(now));
        return;
    }
    conditions.push(DeploymentCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_transition_time: Some(Time(now)),
        last_update_time: Some(Time(now)),
    });
}

fn replicas_of(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn available_of(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION_ANNOTATION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Upstream's GetScaledValueFromIntOrPercent: a percentage of `total`, rounded up or down.
pub fn scaled_value(value: &IntOrString, total: i32, round_up: bool) -> i32 {
    match value {
        IntOrString::Int(n) => *n,
        IntOrString::String(text) => {
            let percent: i64 = text.trim_end_matches('%').parse().unwrap_or(0);
            let product = percent * i64::from(total);
            let scaled = if round_up {
                (product + 99) / 100
            } else {
                product / 100
            };
            scaled as i32
        }
    }
}

/// Upstream's ResolveFenceposts: maxSurge rounds up, maxUnavailable down, and both zero
/// means one unavailable so the rollout can move.
pub fn resolve_fenceposts(
    max_surge: &IntOrString,
    max_unavailable: &IntOrString,
    desired: i32,
) -> (i32, i32) {
    let surge = scaled_value(max_surge, desired, true);
    let mut unavailable = scaled_value(max_unavailable, desired, false);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable)
}

/// Upstream's NewRSNewReplicas: how far the new ReplicaSet may grow now.
pub fn new_rs_new_replicas(
    recreate: bool,
    desired: i32,
    max_surge: i32,
    current_total: i32,
    new_replicas: i32,
) -> i32 {
    if recreate {
        return desired;
    }
    let max_total = desired + max_surge;
    if current_total >= max_total {
        return new_replicas;
    }
    let scale_up = (max_total - current_total).min(desired - new_replicas);
    new_replicas + scale_up.max(0)
}

/// Whether two pod templates are the same apart from the `pod-template-hash` label.
pub fn equal_ignore_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    fn strip(template: &PodTemplateSpec) -> PodTemplateSpec {
        let mut template = template.clone();
        if let Some(meta) = template.metadata.as_mut()
            && let Some(labels) = meta.labels.as_mut()
        {
            labels.remove(POD_TEMPLATE_HASH_LABEL);
            if labels.is_empty() {
                meta.labels = None;
            }
        }
        template
    }
    strip(a) == strip(b)
}

/// The `pod-template-hash` of a template: FNV-1a over its JSON (and the collision count),
/// written with upstream's SafeEncodeString alphabet so names look as upstream's do.
pub fn template_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u32::from(*byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    };
    feed(&serde_json::to_vec(template).unwrap_or_default());
    if let Some(count) = collision_count {
        feed(&count.to_le_bytes());
    }
    safe_encode(&hash.to_string())
}

/// Upstream's rand.SafeEncodeString: maps each byte onto consonants and digits that cannot
/// spell words.
fn safe_encode(text: &str) -> String {
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    text.bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn percent(text: &str) -> IntOrString {
        IntOrString::String(text.into())
    }

    #[test]
    fn fenceposts_round_surge_up_and_unavailable_down() {
        assert_eq!(
            resolve_fenceposts(&percent("25%"), &percent("25%"), 10),
            (3, 2)
        );
        assert_eq!(
            resolve_fenceposts(&percent("25%"), &percent("25%"), 1),
            (1, 0)
        );
        assert_eq!(
            resolve_fenceposts(&IntOrString::Int(0), &IntOrString::Int(0), 5),
            (0, 1)
        );
        assert_eq!(
            resolve_fenceposts(&IntOrString::Int(2), &percent("50%"), 3),
            (2, 1)
        );
        assert_eq!(scaled_value(&percent("10%"), 15, true), 2);
        assert_eq!(scaled_value(&percent("10%"), 15, false), 1);
    }

    #[test]
    fn new_replicaset_grows_within_the_surge() {
        // 10 desired, surge 3, old RS holds 10: the new one may have 3.
        assert_eq!(new_rs_new_replicas(false, 10, 3, 10, 0), 3);
        // Already at 13 in total: no growth.
        assert_eq!(new_rs_new_replicas(false, 10, 3, 13, 3), 3);
        // Old ones scaled down to 5: grow to 8 total of 13.
        assert_eq!(new_rs_new_replicas(false, 10, 3, 8, 3), 8);
        // Never past desired.
        assert_eq!(new_rs_new_replicas(false, 10, 3, 10, 10), 10);
        assert_eq!(new_rs_new_replicas(true, 10, 0, 10, 0), 10);
    }

    #[test]
    fn hash_depends_on_template_and_collisions_and_ignores_its_label() {
        let mut a = PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                ..ObjectMeta::default()
            }),
            spec: None,
        };
        let hash = template_hash(&a, None);
        assert!(
            hash.len() >= 6
                && hash
                    .bytes()
                    .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
        );
        assert_ne!(hash, template_hash(&a, Some(1)));
        let b = a.clone();
        a.metadata
            .as_mut()
            .unwrap()
            .labels
            .as_mut()
            .unwrap()
            .insert(POD_TEMPLATE_HASH_LABEL.into(), hash.clone());
        assert!(equal_ignore_hash(&a, &b));
        assert_eq!(template_hash(&b, None), hash);
    }
}
