//! The agent's cgroup v2 manager: finds the cgroup2 mount, keeps the kubelet's layout of
//! QoS tiers, pod and container cgroups under the agent's subtree, writes their limits
//! with the kubelet's arithmetic, reads their usage, and removes them.
//!
//! Layout under `<mount>/<subtree>` (the kubelet's cgroupfs driver):
//!
//! ```text
//! kubepods/                      Guaranteed pods live directly here
//! kubepods/pod<uid>/<container>
//! kubepods/burstable/pod<uid>/<container>
//! kubepods/besteffort/pod<uid>/<container>
//! ```
//!
//! Under systemd the subtree is a cgroup systemd delegated (`systemd.rs`): the pods unit's,
//! `system.slice/skiff-pods.service`, whose own process waits in its `holder` leaf.
//!
//! The manager enables `cpu`, `memory` and `pids` along that tree where the hierarchy
//! offers them. Whatever it cannot enable (a hybrid host whose v1 hierarchies hold those
//! controllers, a parent that keeps them to itself) becomes a list of [`Unenforced`]
//! settings instead of an error: pods still get their cgroups, processes are still placed
//! and the usage files that exist are still read. `io` and `cpuset` are left alone: the
//! agent writes no `io.*` file and has no CPU manager that would need `cpuset.cpus`.
//!
//! **Architecture invariant:** every kernel access goes through the `CgroupFs` seam
//! (`fs.rs`) on paths built from the configured mount and subtree; nothing here assumes
//! `/sys/fs/cgroup`. The arithmetic (`resources.rs`, with `crate::quantity`) is pure.
//!
//! All calls block on cgroupfs reads and writes (and [`CgroupManager::remove_pod`] waits
//! for the kernel to empty the cgroup), so async callers run them on a blocking thread.

mod error;
mod fs;
mod manager;
mod mount;
mod resources;
mod systemd;
mod usage;

pub use error::CgroupError;
pub use manager::{
    Applied, CgroupConfig, CgroupManager, NodeAllocatable, PodCgroup, Unenforced,
    remove_cgroup_tree,
};
pub use mount::{
    Cgroup2Mount, find_cgroup2_mount, own_cgroup_v2, parse_mountinfo_cgroup2, parse_own_cgroup_v2,
};
pub use resources::{
    CPU_PERIOD_US, ContainerResources, Controller, MAX_SHARES, MIN_QUOTA_US, MIN_SHARES,
    PodResources, QosClass, ResourceOptions, Setting, burstable_tier_shares, compute_pod_qos,
    container_oom_score_adj, container_resources, memory_high, milli_cpu_to_quota,
    milli_cpu_to_shares, pod_qos, pod_resources, shares_to_weight,
};
pub use systemd::{
    AGENT_LEAF, DelegatedSubtree, HOLDER_LEAF, PODS_UNIT, enter_leaf, find_delegated_subtree,
    own_delegated_cgroup,
};
pub use usage::{CpuStat, MemoryEvents, Usage, parse_cpu_stat, parse_memory_events};
