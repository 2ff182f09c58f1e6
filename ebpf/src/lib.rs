//! skiff's kernel programs: C sources under `src/bpf/`, compiled by clang in `build.rs` and
//! embedded here as ELF objects with BTF, and the Rust mirrors of their map layouts.
//!
//! **Architecture invariant:** this crate loads nothing and touches no kernel state; the
//! agent loads, pins and attaches (`skiff_agent::lb`), and agentctl reads the pins.

pub mod lb;

/// The socket-level load balancer: `cgroup/connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`.
pub static SOCK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock.o"));
