//! Node lifecycle controller: a node whose Lease in `kube-node-lease` has not been renewed
//! within the grace period gets Ready=Unknown and the `node.kubernetes.io/unreachable`
//! NoExecute taint (a node reporting Ready=False gets `node.kubernetes.io/not-ready`), and
//! the pods on a tainted node are deleted once their toleration runs out, so that their
//! controllers replace them elsewhere.
//!
//! Pods without a toleration for these taints get the default eviction timeout, which is
//! what kube-apiserver's DefaultTolerationSeconds admission would have given them. The
//! grace period is counted from the later of the last renewal and the moment this
//! controller first saw the node, so a controller that just took over does not judge
//! nodes on a Lease it has not watched for long.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt as _};
use serde_json::json;

use super::daemonset::tolerates;
use super::pod::Pod;
use super::runtime::{Cache, is_not_found};

pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

#[derive(Clone, Debug)]
pub struct NodeLifecycleOptions {
    /// How long a node may go without renewing its Lease before it is Unknown (upstream's
    /// --node-monitor-grace-period).
    pub grace_period: Duration,
    /// How long pods without their own toleration stay on a tainted node (upstream's
    /// --default-unreachable-toleration-seconds).
    pub default_toleration: Duration,
    /// How often nodes are looked at.
    pub monitor_period: Duration,
}

impl Default for NodeLifecycleOptions {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(40),
            default_toleration: Duration::from_secs(300),
            monitor_period: Duration::from_secs(5),
        }
    }
}

pub struct NodeLifecycleController {
    client: Client,
    nodes: Cache<Node>,
    leases: Cache<Lease>,
    pods: Cache<Pod>,
    options: NodeLifecycleOptions,
    /// When this controller first saw each node and each renewal time.
    observed: Mutex<HashMap<String, (Option<jiff::Timestamp>, Instant)>>,
}

impl NodeLifecycleController {
    pub fn new(
        client: Client,
        nodes: Cache<Node>,
        leases: Cache<Lease>,
        pods: Cache<Pod>,
        options: NodeLifecycleOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            nodes,
            leases,
            pods,
            options,
            observed: Mutex::default(),
        })
    }

    pub async fn run(self: Arc<Self>) {
        let _ = self.nodes.store.wait_until_ready().await;
        let _ = self.leases.store.wait_until_ready().await;
        let _ = self.pods.store.wait_until_ready().await;
        let mut ticker = tokio::time::interval(self.options.monitor_period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Err(error) = self.monitor().await {
                tracing::warn!(error = format!("{error:#}"), "node lifecycle pass failed");
            }
        }
    }

    /// How long since the node last showed life, as this controller observed it.
    fn silence(&self, node: &Node) -> Duration {
        let name = node.name_any();
        let renewed = self
            .leases
            .get(Some(NODE_LEASE_NAMESPACE), &name)
            .and_then(|lease| lease.spec.as_ref()?.renew_time.as_ref().map(|t| t.0))
            .or_else(|| {
                let conditions = node.status.as_ref()?.conditions.as_ref()?;
                let ready = conditions.iter().find(|c| c.type_ == "Ready")?;
                ready.last_heartbeat_time.as_ref().map(|t| t.0)
            });
        let mut observed = self.observed.lock().expect("observed lock");
        let entry = observed.entry(name).or_insert((renewed, Instant::now()));
        if entry.0 != renewed {
            *entry = (renewed, Instant::now());
        }
        entry.1.elapsed()
    }

    async fn monitor(&self) -> anyhow::Result<()> {
        let nodes = self.nodes.store.state();
        {
            let names: std::collections::HashSet<String> =
                nodes.iter().map(|n| n.name_any()).collect();
            self.observed
                .lock()
                .expect("observed lock")
                .retain(|name, _| names.contains(name));
        }
        for node in nodes {
            let stale = self.silence(&node) > self.options.grace_period;
            let ready = ready_status(&node);
            let node = if stale && ready.as_deref() != Some("Unknown") {
                tracing::warn!(node = %node.name_any(), "node lease expired: marking Ready=Unknown");
                self.mark_unknown(&node).await?;
                continue;
            } else {
                node
            };
            let wanted = match ready.as_deref() {
                Some("Unknown") => Some(UNREACHABLE_TAINT),
                Some("False") => Some(NOT_READY_TAINT),
                _ => None,
            };
            if self.sync_taints(&node, wanted).await? {
                continue;
            }
            if wanted.is_some() {
                self.evict_pods(&node).await?;
            }
        }
        Ok(())
    }

    async fn mark_unknown(&self, node: &Node) -> anyhow::Result<()> {
        let now = jiff::Timestamp::now();
        let existing = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let mut types: Vec<String> = existing.iter().map(|c| c.type_.clone()).collect();
        if !types.iter().any(|t| t == "Ready") {
            types.push("Ready".into());
        }
        let conditions: Vec<_> = types
            .iter()
            .map(|type_| {
                let heartbeat = existing
                    .iter()
                    .find(|c| &c.type_ == type_)
                    .and_then(|c| c.last_heartbeat_time.clone());
                json!({
                    "type": type_,
                    "status": "Unknown",
                    "reason": "NodeStatusUnknown",
                    "message": "Kubelet stopped posting node status.",
                    "lastTransitionTime": Time(now),
                    "lastHeartbeatTime": heartbeat,
                })
            })
            .collect();
        let api: Api<Node> = Api::all(self.client.clone());
        match api
            .patch_status(
                &node.name_any(),
                &PatchParams::default(),
                &Patch::Strategic(&json!({"status": {"conditions": conditions}})),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            Err(error) => Err(error).context(format!("mark node {} Unknown", node.name_any())),
        }
    }

    /// Puts the taint the Ready condition calls for on the node and removes the other.
    /// Returns whether the node was changed (its next state comes with the next pass).
    async fn sync_taints(&self, node: &Node, wanted: Option<&str>) -> anyhow::Result<bool> {
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let ours = |t: &Taint| {
            t.effect == "NoExecute" && (t.key == UNREACHABLE_TAINT || t.key == NOT_READY_TAINT)
        };
        let has_wanted = taints
            .iter()
            .any(|t| ours(t) && Some(t.key.as_str()) == wanted);
        let has_other = taints
            .iter()
            .any(|t| ours(t) && Some(t.key.as_str()) != wanted);
        if (wanted.is_none() || has_wanted) && !has_other {
            return Ok(false);
        }
        let mut new_taints: Vec<Taint> = taints
            .into_iter()
            .filter(|t| !ours(t) || Some(t.key.as_str()) == wanted)
            .collect();
        if let Some(key) = wanted
            && !has_wanted
        {
            new_taints.push(Taint {
                key: key.into(),
                effect: "NoExecute".into(),
                time_added: Some(Time(jiff::Timestamp::now())),
                value: None,
            });
        }
        let patch = json!({
            "metadata": {"resourceVersion": node.metadata.resource_version},
            "spec": {"taints": new_taints},
        });
        let api: Api<Node> = Api::all(self.client.clone());
        match api
            .patch(
                &node.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(node = %node.name_any(), taint = ?wanted, "node taints updated");
                Ok(true)
            }
            Err(error) if is_not_found(&error) => Ok(true),
            Err(kube::Error::Api(response)) if response.code == 409 => Ok(true),
            Err(error) => Err(error).context(format!("taint node {}", node.name_any())),
        }
    }

    /// Deletes the pods on a NoExecute-tainted node whose tolerations have run out.
    async fn evict_pods(&self, node: &Node) -> anyhow::Result<()> {
        let name = node.name_any();
        let taints: Vec<Taint> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.effect == "NoExecute")
            .collect();
        if taints.is_empty() {
            return Ok(());
        }
        let now = jiff::Timestamp::now();
        let pods = self.pods.store.state_filter(|pod| {
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                && pod.metadata.deletion_timestamp.is_none()
        });
        for pod in pods {
            let tolerations = pod
                .spec
                .as_ref()
                .and_then(|s| s.tolerations.clone())
                .unwrap_or_default();
            let Some(evict_at) =
                eviction_time(&taints, &tolerations, self.options.default_toleration)
            else {
                continue;
            };
            if evict_at > now {
                continue;
            }
            let namespace = pod.namespace().unwrap_or_default();
            tracing::info!(node = %name, pod = %format!("{namespace}/{}", pod.name_any()), "evicting pod from tainted node");
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: pod.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&pod.name_any(), &params).await {
                Ok(_) => {}
                Err(error) if is_not_found(&error) => {}
                Err(kube::Error::Api(response)) if response.code == 409 => {}
                Err(error) => return Err(error).context(format!("evict pod {}", pod.name_any())),
            }
        }
        Ok(())
    }
}

fn ready_status(node: &Node) -> Option<String> {
    let conditions = node.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

/// When a pod on a node with these NoExecute taints is to be evicted: at once if a taint
/// is not tolerated, never if every taint is tolerated forever, else when the shortest
/// tolerationSeconds since the taint was added runs out. Our own taints, when the pod has
/// no toleration for them, get `default_toleration` (DefaultTolerationSeconds).
pub fn eviction_time(
    taints: &[Taint],
    tolerations: &[Toleration],
    default_toleration: Duration,
) -> Option<jiff::Timestamp> {
    let mut earliest: Option<jiff::Timestamp> = None;
    for taint in taints {
        let added = taint
            .time_added
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(jiff::Timestamp::now);
        let matching: Vec<&Toleration> =
            tolerations.iter().filter(|t| tolerates(t, taint)).collect();
        let seconds = if matching.is_empty() {
            if taint.key == UNREACHABLE_TAINT || taint.key == NOT_READY_TAINT {
                Some(default_toleration.as_secs() as i64)
            } else {
                Some(0)
            }
        } else if matching.iter().any(|t| t.toleration_seconds.is_none()) {
            None
        } else {
            matching.iter().filter_map(|t| t.toleration_seconds).min()
        };
        if let Some(seconds) = seconds {
            let at = added + jiff::SignedDuration::from_secs(seconds.max(0));
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
        }
    }
    earliest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_at(second: i64) -> Taint {
        Taint {
            key: UNREACHABLE_TAINT.into(),
            effect: "NoExecute".into(),
            time_added: Some(Time(jiff::Timestamp::from_second(second).unwrap())),
            value: None,
        }
    }

    #[test]
    fn tolerations_decide_when_pods_leave() {
        let taints = [unreachable_at(1000)];
        let default = Duration::from_secs(300);
        // No toleration: the default.
        assert_eq!(
            eviction_time(&taints, &[], default).unwrap().as_second(),
            1300
        );
        // Its own tolerationSeconds.
        let short = Toleration {
            key: Some(UNREACHABLE_TAINT.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: Some(5),
            ..Toleration::default()
        };
        assert_eq!(
            eviction_time(&taints, std::slice::from_ref(&short), default)
                .unwrap()
                .as_second(),
            1005
        );
        // Tolerated forever.
        let forever = Toleration {
            toleration_seconds: None,
            ..short
        };
        assert_eq!(eviction_time(&taints, &[forever], default), None);
        // Someone else's NoExecute taint, not tolerated: at once.
        let other = Taint {
            key: "example.com/broken".into(),
            ..unreachable_at(2000)
        };
        assert_eq!(
            eviction_time(&[other], &[], default).unwrap().as_second(),
            2000
        );
    }
}
