//! Hard eviction: when memory.available or nodefs.available falls below its threshold, the
//! agent evicts one pod per pass, as the kubelet's eviction manager does: BestEffort first,
//! then Burstable pods over their requests, Guaranteed pods last. An evicted pod is marked
//! `Failed`/`Evicted` in the API; its worker then stops its containers and releases it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::manager::PodTable;
use crate::cgroups::{QosClass, pod_qos};
use crate::events::{EventRecorder, EventType};
use crate::node::{Signals, Thresholds};
use crate::quantity;

/// How an evicted pod's containers are stopped: the kubelet's immediate eviction grace.
pub const EVICTION_GRACE: Duration = Duration::from_secs(1);

/// Whether a pod was evicted (its containers must stop and never restart).
pub fn is_evicted(pod: &Pod) -> bool {
    pod.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Failed") && s.reason.as_deref() == Some("Evicted")
    })
}

fn memory_request(pod: &Pod) -> i64 {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| c.resources.as_ref()?.requests.as_ref()?.get("memory"))
        .filter_map(|q| quantity::units(&q.0))
        .sum()
}

/// The eviction order under memory pressure: pods whose usage exceeds their requests,
/// then by QoS (BestEffort, Burstable, Guaranteed), then by usage above requests.
/// `usage` is the pod's memory use in bytes, when the node can read it.
pub fn rank<'a>(pods: &[&'a Pod], usage: impl Fn(&Pod) -> Option<u64>) -> Vec<&'a Pod> {
    let mut ranked: Vec<(bool, u8, i64, &Pod)> = pods
        .iter()
        .map(|pod| {
            let used = usage(pod).unwrap_or(0) as i64;
            let over = used - memory_request(pod);
            let qos = match pod_qos(pod) {
                Ok(QosClass::BestEffort) => 0,
                Ok(QosClass::Burstable) => 1,
                _ => 2,
            };
            (over > 0, qos, over, *pod)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)));
    ranked.into_iter().map(|(_, _, _, pod)| pod).collect()
}

/// A pod's memory use in bytes, when the node can read it.
pub type MemoryUsage = Arc<dyn Fn(&Pod) -> Option<u64> + Send + Sync>;

/// Settings of the eviction manager.
pub struct EvictionConfig {
    pub thresholds: Thresholds,
    pub state_dir: PathBuf,
    pub interval: Duration,
}

/// Every `interval`, evicts the first pod in rank order while a threshold is crossed, and
/// records an `Evicted` event for it.
pub async fn run(
    client: kube::Client,
    table: PodTable,
    config: EvictionConfig,
    usage: MemoryUsage,
    events: EventRecorder,
) {
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Ok(signals) = Signals::read(&config.state_dir) else {
            continue;
        };
        let resource = if signals.memory_pressure(&config.thresholds) {
            "memory"
        } else if signals.disk_pressure(&config.thresholds) {
            "ephemeral-storage"
        } else {
            continue;
        };
        let pods: Vec<Arc<Pod>> = table
            .read()
            .expect("pod table lock")
            .values()
            .cloned()
            .collect();
        let candidates: Vec<&Pod> = pods
            .iter()
            .map(|pod| pod.as_ref())
            .filter(|pod| {
                pod.metadata.deletion_timestamp.is_none()
                    && !matches!(
                        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Succeeded" | "Failed")
                    )
            })
            .collect();
        let Some(victim) = rank(&candidates, |pod| usage(pod)).into_iter().next() else {
            continue;
        };
        let name = victim.metadata.name.as_deref().unwrap_or_default();
        let namespace = victim.metadata.namespace.as_deref().unwrap_or("default");
        tracing::warn!(pod = %format!("{namespace}/{name}"), resource, "evicting pod: node is low on {resource}");
        let message = format!("The node was low on resource: {resource}. ");
        let status = json!({"status": {
            "phase": "Failed",
            "reason": "Evicted",
            "message": message,
            "conditions": [{
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "TerminationByKubelet",
                "message": message,
                "lastTransitionTime": jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default(),
            }],
        }});
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await
        {
            Ok(_) => events.pod(victim, EventType::Warning, "Evicted", message),
            Err(error) => {
                tracing::warn!(pod = %format!("{namespace}/{name}"), error = %error, "evict pod")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, resources: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "uid": name},
            "spec": {"containers": [{"name": "c", "image": "x", "resources": resources}]},
        }))
        .unwrap()
    }

    #[test]
    fn best_effort_goes_first_and_guaranteed_last() {
        let guaranteed = pod(
            "g",
            json!({"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}),
        );
        let burstable = pod("b", json!({"requests": {"memory": "100Mi"}}));
        let best_effort = pod("e", json!({}));
        let pods = [&guaranteed, &burstable, &best_effort];
        let names = |ranked: Vec<&Pod>| {
            ranked
                .iter()
                .map(|p| p.metadata.name.clone().unwrap())
                .collect::<Vec<_>>()
        };
        // Without usage figures, QoS decides.
        assert_eq!(names(rank(&pods, |_| None)), ["e", "b", "g"]);
        // A burstable pod far over its request goes before an idle best-effort one.
        let usage = |pod: &Pod| match pod.metadata.name.as_deref() {
            Some("b") => Some(500 << 20),
            Some("g") => Some(512 << 20),
            _ => Some(0),
        };
        assert_eq!(names(rank(&pods, usage)), ["b", "e", "g"]);
    }
}
