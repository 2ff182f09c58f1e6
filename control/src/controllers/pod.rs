//! The pod as the controllers' shared cache holds it: only the fields a controller reads.
//!
//! `k8s-openapi`'s `Pod` spends about 6 kB of fixed-size structs per pod (a `Container` is
//! 3 kB even when empty) before any of its strings, and decoding one allocates every field
//! of the body. The controllers read a few dozen fields, so their cache decodes straight into
//! these types: serde skips what is not declared here without allocating it. Field names and
//! types mirror `k8s-openapi`'s, so reading code looks the same for either type; pods the
//! controllers create or delete through the API stay `k8s-openapi` Pods.
//!
//! A controller that comes to read another field of a cached pod declares it here.

use k8s_openapi::api::core::v1::{ContainerPort, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;

/// A pod, as far as the controllers read it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<PodSpec>,
    pub status: Option<PodStatus>,
}

slim_pod_resource!(Pod);

/// `spec`: where the pod runs, how it restarts, what it tolerates, its DNS name parts, and
/// its containers' ports (for a Service's named `targetPort`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
    pub node_name: Option<String>,
    pub tolerations: Option<Vec<Toleration>>,
    pub restart_policy: Option<String>,
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
}

/// A container's name and ports.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    pub ports: Option<Vec<ContainerPort>>,
}

/// `status`: phase, address, conditions and the containers' outcomes.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    pub conditions: Option<Vec<PodCondition>>,
    pub container_statuses: Option<Vec<ContainerStatus>>,
    pub init_container_statuses: Option<Vec<ContainerStatus>>,
}

/// A condition's type, status and when it last changed (messages are not kept).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub last_transition_time: Option<Time>,
}

/// A container's readiness, restarts and, once it ended, how.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    pub name: String,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub restart_count: i32,
    pub state: Option<ContainerState>,
}

/// Of a container's state only `terminated` is read.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct ContainerState {
    pub terminated: Option<ContainerStateTerminated>,
}

/// How a container ended.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStateTerminated {
    #[serde(default)]
    pub exit_code: i32,
    pub finished_at: Option<Time>,
}

/// The one pod annotation a controller reads: an Indexed Job pod's completion index.
const KEPT_ANNOTATION: &str = super::job::COMPLETION_INDEX_ANNOTATION;

/// Drops what the metadata decoder had to take whole and no controller reads (the cache's
/// transform): `managedFields` and every annotation but [`KEPT_ANNOTATION`] (`kubectl
/// apply`'s copy of the object among them; an annotation map costs a B-tree node and two
/// strings per entry even when nobody reads it).
pub fn slim(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    if let Some(annotations) = &mut pod.metadata.annotations {
        annotations.retain(|key, _| key == KEPT_ANNOTATION);
        if annotations.is_empty() {
            pod.metadata.annotations = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_controllers_read_and_skips_the_rest() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-1",
                "namespace": "default",
                "labels": {"app": "web"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"big\":true}",
                    "batch.kubernetes.io/job-completion-index": "3",
                    "other": "dropped",
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
            "spec": {
                "nodeName": "node-1",
                "restartPolicy": "Always",
                "hostname": "web-1",
                "subdomain": "web",
                "tolerations": [{"key": "k", "operator": "Exists"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "containers": [{
                    "name": "web",
                    "image": "nginx",
                    "env": [{"name": "A", "value": "b"}],
                    "ports": [{"name": "http", "containerPort": 80}],
                }],
            },
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.1",
                "podIPs": [{"ip": "10.0.0.1"}],
                "conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "lastTransitionTime": "2024-01-01T00:00:00Z",
                    "message": "dropped",
                }],
                "containerStatuses": [{
                    "name": "web",
                    "ready": true,
                    "restartCount": 2,
                    "image": "nginx",
                    "imageID": "sha256:x",
                    "state": {"terminated": {"exitCode": 1, "finishedAt": "2024-01-01T00:00:01Z"}},
                    "lastState": {},
                }],
            },
        }))
        .unwrap();
        slim(&mut pod);
        assert_eq!(pod.metadata.managed_fields, None);
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations.len(), 1);
        assert_eq!(annotations[KEPT_ANNOTATION], "3");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.hostname.as_deref(), Some("web-1"));
        assert_eq!(spec.subdomain.as_deref(), Some("web"));
        assert_eq!(spec.tolerations.as_ref().unwrap().len(), 1);
        assert_eq!(spec.containers[0].name, "web");
        let ports = spec.containers[0].ports.as_ref().unwrap();
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].container_port),
            (Some("http"), 80)
        );
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        let condition = &status.conditions.as_ref().unwrap()[0];
        assert_eq!(
            (condition.type_.as_str(), condition.status.as_str()),
            ("Ready", "True")
        );
        assert!(condition.last_transition_time.is_some());
        let container = &status.container_statuses.as_ref().unwrap()[0];
        assert!(container.ready);
        assert_eq!(container.restart_count, 2);
        let terminated = container
            .state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap();
        assert_eq!(terminated.exit_code, 1);
        assert!(terminated.finished_at.is_some());
    }

    #[test]
    fn a_pod_without_kept_annotations_keeps_none() {
        let mut pod: Pod =
            serde_json::from_str(r#"{"metadata":{"name":"p","annotations":{"a":"b"}}}"#).unwrap();
        slim(&mut pod);
        assert_eq!(pod.metadata.annotations, None);
    }

    #[test]
    fn a_pod_without_spec_or_status_decodes() {
        let pod: Pod = serde_json::from_str(r#"{"metadata":{"name":"p"}}"#).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("p"));
        assert!(pod.spec.is_none() && pod.status.is_none());
    }
}
