//! skiff-cni: a CNI 1.1 bridge plugin with built-in host-local IPAM.
//!
//! Newcomers start at [`plugin::run`], which turns the environment and stdin of one
//! invocation into a result or a spec error. [`datapath`] (rtnetlink) and [`masq`]
//! (nf_tables over netlink) are everything that talks to the kernel; [`ipam`] is everything
//! that touches files.

pub mod config;
pub mod datapath;
pub mod error;
pub mod ipam;
pub mod masq;
pub mod plugin;
pub mod result;
pub mod version;
