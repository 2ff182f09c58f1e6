//! skiff's node agent: the kubelet (pods through containerd, cgroups v2, a pause-less
//! sandbox), and the pieces `agentctl` shares with it.

pub mod agent;
pub mod agentctl;
pub mod cgroups;
pub mod cni;
pub mod config;
pub mod containerd;
pub mod events;
pub mod exec;
pub mod image;
pub mod lb;
pub mod logs;
pub mod mountinfo;
pub mod node;
pub mod node_api;
pub mod pods;
pub mod quantity;
pub mod routes;
pub mod sandbox;
