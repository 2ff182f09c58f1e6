//! Garbage collector: deletes objects whose owners are gone (background propagation),
//! deletes the dependents of an owner marked `foregroundDeletion` before letting it go,
//! and strips the ownerReferences of an owner marked `orphan` before letting it go.
//!
//! It keeps its own graph of ownership (uid → object, owner uid → dependents), fed by the
//! caches of the kinds the controllers watch. An owner missing from the graph is looked up
//! live before anything is deleted, because the owner's cache may simply be behind the
//! dependent's. Owners of kinds it does not know (not in [`KNOWN_KINDS`]) are never judged
//! absent: such dependents are left alone.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
    Preconditions, PropagationPolicy,
};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;

use super::runtime::{Cache, Change, Queue, is_not_found, run_workers};

pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";
pub const ORPHAN_FINALIZER: &str = "orphan";

/// Kinds whose objects the collector can look up and act on: (apiVersion, kind, plural,
/// namespaced).
pub const KNOWN_KINDS: &[(&str, &str, &str, bool)] = &[
    ("v1", "Pod", "pods", true),
    ("v1", "Service", "services", true),
    ("v1", "Endpoints", "endpoints", true),
    ("v1", "ConfigMap", "configmaps", true),
    ("v1", "Secret", "secrets", true),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    ("v1", "Node", "nodes", false),
    ("v1", "Namespace", "namespaces", false),
    ("apps/v1", "Deployment", "deployments", true),
    ("apps/v1", "ReplicaSet", "replicasets", true),
    ("apps/v1", "DaemonSet", "daemonsets", true),
    ("batch/v1", "Job", "jobs", true),
    (
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "endpointslices",
        true,
    ),
    ("coordination.k8s.io/v1", "Lease", "leases", true),
];

/// What the collector knows of one object.
#[derive(Clone, Debug)]
pub struct GraphNode {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
    pub resource_version: Option<String>,
    pub owners: Vec<OwnerReference>,
    pub finalizers: Vec<String>,
    pub deleting: bool,
}

impl GraphNode {
    pub fn of<K: Resource<DynamicType = ()>>(object: &K) -> Option<Self> {
        let meta = object.meta();
        Some(Self {
            api_version: K::api_version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone()?,
            uid: meta.uid.clone()?,
            resource_version: meta.resource_version.clone(),
            owners: meta.owner_references.clone().unwrap_or_default(),
            finalizers: meta.finalizers.clone().unwrap_or_default(),
            deleting: meta.deletion_timestamp.is_some(),
        })
    }
}

enum GraphEvent {
    Upsert(GraphNode),
    Remove(GraphNode),
    /// Every object of `kind` is now this list.
    Replace(String, Vec<GraphNode>),
}

/// Ownership as last seen: objects by uid and dependents by owner uid.
#[derive(Default)]
pub struct Graph {
    nodes: HashMap<String, GraphNode>,
    dependents: HashMap<String, HashSet<String>>,
}

impl Graph {
    fn insert(&mut self, node: GraphNode) {
        self.remove(&node.uid);
        for owner in &node.owners {
            self.dependents
                .entry(owner.uid.clone())
                .or_default()
                .insert(node.uid.clone());
        }
        self.nodes.insert(node.uid.clone(), node);
    }

    fn remove(&mut self, uid: &str) -> Option<GraphNode> {
        let node = self.nodes.remove(uid)?;
        for owner in &node.owners {
            if let Some(set) = self.dependents.get_mut(&owner.uid) {
                set.remove(uid);
                if set.is_empty() {
                    self.dependents.remove(&owner.uid);
                }
            }
        }
        Some(node)
    }

    fn dependents_of(&self, uid: &str) -> Vec<GraphNode> {
        self.dependents
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|d| self.nodes.get(d).cloned())
            .collect()
    }
}

pub struct GarbageCollector {
    client: Client,
    graph: Mutex<Graph>,
}

/// Forwards a cache's changes into the collector's event stream.
fn forward<K>(
    cache: &Cache<K>,
    sender: mpsc::UnboundedSender<GraphEvent>,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let mut changes = cache.subscribe();
    let cache = cache.clone();
    async move {
        while let Some(change) = changes.recv().await {
            let event = match change {
                Change::Applied(object) => GraphNode::of(&*object).map(GraphEvent::Upsert),
                Change::Deleted(object) => GraphNode::of(&*object).map(GraphEvent::Remove),
                Change::Resynced => Some(GraphEvent::Replace(
                    K::kind(&()).into_owned(),
                    cache
                        .store
                        .state()
                        .iter()
                        .filter_map(|o| GraphNode::of(&**o))
                        .collect(),
                )),
            };
            if let Some(event) = event
                && sender.send(event).is_err()
            {
                return;
            }
        }
    }
}

/// The caches the collector builds its graph from, type-erased.
pub struct Sources {
    sender: mpsc::UnboundedSender<GraphEvent>,
    receiver: mpsc::UnboundedReceiver<GraphEvent>,
    tasks: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    ready: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl Default for Sources {
    fn default() -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        Self {
            sender,
            receiver,
            tasks: Vec::new(),
            ready: Vec::new(),
        }
    }
}

impl Sources {
    pub fn add<K>(&mut self, cache: &Cache<K>)
    where
        K: Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        self.tasks
            .push(Box::pin(forward(cache, self.sender.clone())));
        let store = cache.store.clone();
        self.ready.push(Box::pin(async move {
            let _ = store.wait_until_ready().await;
        }));
    }
}

impl GarbageCollector {
    pub fn new(client: Client) -> Arc<Self> {
        Arc::new(Self {
            client,
            graph: Mutex::default(),
        })
    }

    pub async fn run(self: Arc<Self>, sources: Sources, workers: usize) {
        let Sources {
            sender,
            mut receiver,
            tasks,
            ready,
        } = sources;
        drop(sender);
        futures::future::join_all(ready).await;
        let queue = Queue::new();
        let feeder = {
            let this = self.clone();
            let queue = queue.clone();
            async move {
                while let Some(event) = receiver.recv().await {
                    for uid in this.apply(event) {
                        queue.add(uid);
                    }
                }
            }
        };
        let this = self.clone();
        let workers = run_workers("garbagecollector", queue, workers, move |uid| {
            let this = this.clone();
            async move { this.reconcile(&uid).await }
        });
        tokio::join!(futures::future::join_all(tasks), feeder, workers);
    }

    /// Applies an event to the graph; returns the uids to look at.
    fn apply(&self, event: GraphEvent) -> Vec<String> {
        let mut graph = self.graph.lock().expect("graph lock");
        let mut touched = Vec::new();
        // An object is looked at on its own changes. Its owners (waiting in foreground
        // deletion) and its dependents (judging their owners) only when it goes away or is
        // being deleted: an owner's status updates must not wake its thousands of pods.
        let touch_node =
            |graph: &Graph, node: &GraphNode, gone: bool, touched: &mut Vec<String>| {
                touched.push(node.uid.clone());
                if gone || node.deleting {
                    touched.extend(node.owners.iter().map(|o| o.uid.clone()));
                    touched.extend(graph.dependents_of(&node.uid).into_iter().map(|d| d.uid));
                }
            };
        match event {
            GraphEvent::Upsert(node) => {
                graph.insert(node.clone());
                touch_node(&graph, &node, false, &mut touched);
            }
            GraphEvent::Remove(node) => {
                graph.remove(&node.uid);
                touch_node(&graph, &node, true, &mut touched);
            }
            GraphEvent::Replace(kind, nodes) => {
                let listed: HashSet<&str> = nodes.iter().map(|n| n.uid.as_str()).collect();
                let stale: Vec<String> = graph
                    .nodes
                    .values()
                    .filter(|n| n.kind == kind && !listed.contains(n.uid.as_str()))
                    .map(|n| n.uid.clone())
                    .collect();
                for uid in stale {
                    if let Some(node) = graph.remove(&uid) {
                        touch_node(&graph, &node, true, &mut touched);
                    }
                }
                for node in nodes {
                    graph.insert(node.clone());
                    touch_node(&graph, &node, false, &mut touched);
                }
            }
        }
        // Only objects that can need action: those with owners, or being deleted.
        touched.retain(|uid| {
            graph
                .nodes
                .get(uid)
                .is_some_and(|n| !n.owners.is_empty() || n.deleting)
        });
        touched.sort();
        touched.dedup();
        touched
    }

    async fn reconcile(&self, uid: &str) -> anyhow::Result<Option<Duration>> {
        let (node, dependents) = {
            let graph = self.graph.lock().expect("graph lock");
            let Some(node) = graph.nodes.get(uid).cloned() else {
                return Ok(None);
            };
            let dependents = graph.dependents_of(uid);
            (node, dependents)
        };
        if node.deleting && node.finalizers.iter().any(|f| f == ORPHAN_FINALIZER) {
            for dependent in &dependents {
                self.remove_owner_references(dependent, &[uid.to_string()])
                    .await?;
            }
            self.remove_finalizer(&node, ORPHAN_FINALIZER).await?;
            return Ok(None);
        }
        if node.deleting && node.finalizers.iter().any(|f| f == FOREGROUND_FINALIZER) {
            let mut blocking = 0;
            for dependent in &dependents {
                let blocks = dependent
                    .owners
                    .iter()
                    .any(|o| o.uid == uid && o.block_owner_deletion == Some(true));
                if blocks {
                    blocking += 1;
                }
                if !dependent.deleting {
                    let policy = if blocks {
                        PropagationPolicy::Foreground
                    } else {
                        PropagationPolicy::Background
                    };
                    self.delete(dependent, policy).await?;
                }
            }
            if blocking == 0 {
                self.remove_finalizer(&node, FOREGROUND_FINALIZER).await?;
                return Ok(None);
            }
            // The dependents' deletions wake this owner again.
            return Ok(None);
        }
        if node.owners.is_empty() {
            return Ok(None);
        }
        // Which owners are gone?
        let mut absent = Vec::new();
        let mut waiting_on_foreground = false;
        for owner in &node.owners {
            let in_graph = self
                .graph
                .lock()
                .expect("graph lock")
                .nodes
                .get(&owner.uid)
                .cloned();
            match in_graph {
                Some(owner_node) => {
                    if owner_node.deleting
                        && owner_node
                            .finalizers
                            .iter()
                            .any(|f| f == FOREGROUND_FINALIZER)
                    {
                        waiting_on_foreground = true;
                    }
                }
                None => match self.owner_exists(&node, owner).await? {
                    Some(true) => {}
                    Some(false) => absent.push(owner.uid.clone()),
                    None => {}
                },
            }
        }
        if absent.is_empty() {
            return Ok(None);
        }
        if absent.len() == node.owners.len() {
            if !node.deleting {
                // Dependents of a foreground-deleted owner that vanished go the same way.
                let policy = if waiting_on_foreground {
                    PropagationPolicy::Foreground
                } else {
                    PropagationPolicy::Background
                };
                tracing::info!(kind = %node.kind, namespace = ?node.namespace, name = %node.name, "owner gone: deleting dependent");
                self.delete(&node, policy).await?;
            }
        } else {
            self.remove_owner_references(&node, &absent).await?;
        }
        Ok(None)
    }

    fn api_for(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
    ) -> Option<Api<DynamicObject>> {
        let (_, _, plural, namespaced) = KNOWN_KINDS
            .iter()
            .find(|(v, k, _, _)| *v == api_version && *k == kind)?;
        let (group, version) = match api_version.split_once('/') {
            Some((group, version)) => (group, version),
            None => ("", api_version),
        };
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        Some(match (namespaced, namespace) {
            (true, Some(namespace)) => {
                Api::namespaced_with(self.client.clone(), namespace, &resource)
            }
            (true, None) => return None,
            (false, _) => Api::all_with(self.client.clone(), &resource),
        })
    }

    /// Whether the owner still exists with the referenced uid, asked of the API server;
    /// None when its kind is unknown.
    async fn owner_exists(
        &self,
        dependent: &GraphNode,
        owner: &OwnerReference,
    ) -> anyhow::Result<Option<bool>> {
        let Some(api) = self.api_for(
            &owner.api_version,
            &owner.kind,
            dependent.namespace.as_deref(),
        ) else {
            return Ok(None);
        };
        match api.get(&owner.name).await {
            Ok(found) => Ok(Some(
                found.metadata.uid.as_deref() == Some(owner.uid.as_str()),
            )),
            Err(error) if is_not_found(&error) => Ok(Some(false)),
            Err(error) => {
                Err(error).context(format!("look up owner {} {}", owner.kind, owner.name))
            }
        }
    }

    async fn delete(&self, node: &GraphNode, policy: PropagationPolicy) -> anyhow::Result<()> {
        let Some(api) = self.api_for(&node.api_version, &node.kind, node.namespace.as_deref())
        else {
            return Ok(());
        };
        let params = DeleteParams {
            propagation_policy: Some(policy),
            preconditions: Some(Preconditions {
                uid: Some(node.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&node.name, &params).await {
            Ok(_) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            // The uid precondition failed: a new object of that name, not ours to delete.
            Err(kube::Error::Api(response)) if response.code == 409 => Ok(()),
            Err(error) => Err(error).context(format!("delete {} {}", node.kind, node.name)),
        }
    }

    async fn remove_owner_references(
        &self,
        node: &GraphNode,
        owner_uids: &[String],
    ) -> anyhow::Result<()> {
        if !node.owners.iter().any(|o| owner_uids.contains(&o.uid)) {
            return Ok(());
        }
        let Some(api) = self.api_for(&node.api_version, &node.kind, node.namespace.as_deref())
        else {
            return Ok(());
        };
        let remaining: Vec<&OwnerReference> = node
            .owners
            .iter()
            .filter(|o| !owner_uids.contains(&o.uid))
            .collect();
        let patch = json!({"metadata": {
            "ownerReferences": remaining,
            "uid": node.uid,
            "resourceVersion": node.resource_version,
        }});
        match api
            .patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            Err(error) => Err(error).context(format!(
                "remove owner references of {} {}",
                node.kind, node.name
            )),
        }
    }

    async fn remove_finalizer(&self, node: &GraphNode, finalizer: &str) -> anyhow::Result<()> {
        let Some(api) = self.api_for(&node.api_version, &node.kind, node.namespace.as_deref())
        else {
            return Ok(());
        };
        let remaining: Vec<&String> = node.finalizers.iter().filter(|f| *f != finalizer).collect();
        let patch = json!({"metadata": {
            "finalizers": remaining,
            "resourceVersion": node.resource_version,
        }});
        match api
            .patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            Err(error) => Err(error).context(format!(
                "remove finalizer {finalizer} of {} {}",
                node.kind, node.name
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(uid: &str, owners: &[&str]) -> GraphNode {
        GraphNode {
            api_version: "v1".into(),
            kind: "Pod".into(),
            namespace: Some("default".into()),
            name: uid.into(),
            uid: uid.into(),
            resource_version: None,
            owners: owners
                .iter()
                .map(|o| OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "ReplicaSet".into(),
                    name: (*o).into(),
                    uid: (*o).into(),
                    ..OwnerReference::default()
                })
                .collect(),
            finalizers: Vec::new(),
            deleting: false,
        }
    }

    #[test]
    fn graph_indexes_dependents_and_forgets_them() {
        let mut graph = Graph::default();
        graph.insert(node("rs", &[]));
        graph.insert(node("a", &["rs"]));
        graph.insert(node("b", &["rs"]));
        let mut names: Vec<_> = graph
            .dependents_of("rs")
            .into_iter()
            .map(|n| n.uid)
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
        // An update that drops the owner moves the object out of the index.
        graph.insert(node("a", &[]));
        assert_eq!(graph.dependents_of("rs").len(), 1);
        graph.remove("b");
        assert!(graph.dependents_of("rs").is_empty());
        assert!(graph.dependents.is_empty());
    }
}
