//! The service load balancer that replaces kube-proxy: Services and EndpointSlices from
//! the API become entries in pinned BPF maps read by the socket hooks (`cgroup/connect4`
//! and friends, for traffic from this node and its pods) and the tc programs (for NodePort
//! and external IPs reached from outside).
//!
//! - [`desired`]: pure; a Service with its EndpointSlices → the frontends this node serves.
//! - [`datapath`]: loads the programs with aya, pins maps and links under the bpffs
//!   directory, reuses them after a restart.
//! - [`programmer`]: keeps the maps equal to the desired frontends with incremental,
//!   make-before-break writes; adopts what the maps already hold.
//! - [`sync`]: the watch loop (Services, EndpointSlices) that feeds the programmer.
//! - [`inspect`]: reads the pinned maps, for agentctl, without the agent.
//!
//! **Architecture invariant:** the maps are the only state. A restarted agent reads them
//! back, computes the same desired state, and writes nothing when nothing changed.

pub mod datapath;
pub mod desired;
pub mod inspect;
pub mod programmer;
pub mod sync;
