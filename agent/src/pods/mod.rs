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
