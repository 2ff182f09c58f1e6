//! skiff's control plane: the Kubernetes-compatible API server and the store under it.
//!
//! Newcomers start with [`api`], the generic request path that serves every resource from
//! one registry, and [`store`], the revisioned key-value contract beneath it.

pub mod store;
