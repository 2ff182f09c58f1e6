//! The pod manager: the kubelet's core. Watches the pods bound to this node and runs one
//! level-triggered worker per pod that makes the machine match the pod's spec.

pub mod env;
pub mod eviction;
pub mod grpc_probe;
pub mod manager;
pub mod model;
pub mod node_runtime;
pub mod node_state;
pub mod plan;
pub mod probe;
pub mod rootfs_view;
pub mod runtime;
pub mod spec;
pub mod status;
pub mod user;
pub mod volumes;
pub mod worker;

use k8s_openapi::api::core::v1::Pod;

/// The pod as the kubelet names it in messages (`format.Pod`): `name_namespace(uid)`.
pub(crate) fn pod_ref(pod: &Pod) -> String {
    format!(
        "{}_{}({})",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    )
}
