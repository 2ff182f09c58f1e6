//! What the scheduler's pod watch decodes: the fields scheduling reads, and nothing of a
//! pod's status but its phase.
//!
//! Every pod event reaches the scheduler: the pod's creation, its binding and each status
//! write of its kubelet. Decoding a whole `Pod` for each built every container status,
//! condition and timestamp only to drop them in [`super::cache::PodInfo::from_pod`]. These
//! types keep the k8s-openapi field names and types of the fields they keep, so the scheduler
//! reads them as it would a `Pod`; serde skips every other field without building it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ContainerPort, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::IgnoredAny;

/// A pod as the scheduler decodes it from its watch.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<WatchedPodSpec>,
    pub status: Option<WatchedPodStatus>,
}

/// The fields of a `PodSpec` that placement depends on.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedPodSpec {
    #[serde(default)]
    pub containers: Vec<WatchedContainer>,
    pub init_containers: Option<Vec<WatchedContainer>>,
    pub overhead: Option<BTreeMap<String, Quantity>>,
    pub node_selector: Option<BTreeMap<String, String>>,
    pub affinity: Option<Affinity>,
    pub tolerations: Option<Vec<Toleration>>,
    pub node_name: Option<String>,
    pub scheduler_name: Option<String>,
    /// Only whether there are any matters.
    pub scheduling_gates: Option<Vec<IgnoredAny>>,
}

/// The fields of a `Container` that placement depends on.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedContainer {
    pub resources: Option<ResourceRequirements>,
    pub ports: Option<Vec<ContainerPort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedPodStatus {
    pub phase: Option<String>,
}

slim_pod_resource!(WatchedPod);

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    /// A pod as the hollow nodes report it Running: the slim decoding keeps what the full
    /// one has of the fields the scheduler reads.
    #[test]
    fn keeps_what_scheduling_reads_of_a_full_pod() {
        let value = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default", "uid": "u", "resourceVersion": "7",
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "o", "controller": true}]},
            "spec": {
                "containers": [{"name": "app", "image": "i", "resources": {"requests": {"cpu": "10m"}},
                                "ports": [{"containerPort": 80, "hostPort": 8080}]}],
                "initContainers": [{"name": "init", "image": "i"}],
                "nodeName": "n1",
                "nodeSelector": {"disk": "ssd"},
                "tolerations": [{"key": "k", "operator": "Exists"}],
                "schedulingGates": [{"name": "g"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
            },
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "app", "image": "i", "imageID": "", "ready": true, "restartCount": 0}]}
        });
        let slim: WatchedPod = serde_json::from_value(value.clone()).unwrap();
        let full: Pod = serde_json::from_value(value).unwrap();
        let spec = slim.spec.as_ref().unwrap();
        let full_spec = full.spec.as_ref().unwrap();
        assert_eq!(slim.metadata, full.metadata);
        assert_eq!(spec.node_name, full_spec.node_name);
        assert_eq!(spec.node_selector, full_spec.node_selector);
        assert_eq!(spec.tolerations, full_spec.tolerations);
        assert_eq!(spec.affinity, full_spec.affinity);
        assert_eq!(spec.scheduling_gates.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            spec.containers[0].resources,
            full_spec.containers[0].resources
        );
        assert_eq!(spec.containers[0].ports, full_spec.containers[0].ports);
        assert_eq!(spec.init_containers.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            slim.status.and_then(|s| s.phase).as_deref(),
            Some("Running")
        );
    }
}
