//! skiff's node agent: the kubelet (pods through containerd, cgroups v2, a pause-less
//! sandbox), and the pieces `agentctl` shares with it.

pub mod cgroups;
pub mod cni;
pub mod containerd;
pub mod image;
pub mod sandbox;
