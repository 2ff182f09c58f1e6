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
pub mod tc;

use std::path::PathBuf;

/// What can go wrong between the agent and the kernel's load balancer state.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("{call} {path}: {source}")]
    Io {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("load the {object} BPF object (maps pinned under {bpffs_dir}): {source}")]
    Load {
        object: &'static str,
        bpffs_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map}: {operation}: {source}")]
    Map {
        map: &'static str,
        operation: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A map has no room for an entry; the frontend named is left as it was.
    #[error(
        "map {map} is full ({max_entries} entries): {frontend} not programmed; raise --lb-max-{flag}"
    )]
    MapFull {
        map: &'static str,
        max_entries: u32,
        frontend: String,
        flag: &'static str,
    },
    #[error("{0}")]
    Datapath(String),
}
