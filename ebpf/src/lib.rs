//! skiff's kernel programs: C sources under `src/bpf/`, compiled by clang in `build.rs` and
//! embedded here as ELF objects with BTF, and the Rust mirrors of their map layouts.
//!
//! **Architecture invariant:** this crate decides nothing: the agent loads, pins and
//! attaches (`skiff_agent::lb`) and agentctl reads the pins. Besides the objects and their
//! layouts it holds only [`sys`], the few `bpf()` commands aya cannot make, so that the one
//! place with raw syscalls and `unsafe` is small and here.

pub mod lb;
pub mod sys;

/// The socket-level load balancer: `cgroup/connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`.
pub static SOCK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock.o"));

/// The load balancer for clients outside the node: tc (tcx) ingress and egress programs for
/// the node's external interfaces, NAT with connection tracking in `ct4`.
pub static TC_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tc.o"));
