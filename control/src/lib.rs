//! skiff's control plane: the Kubernetes-compatible API server and the store under it.
//!
//! Newcomers start with [`api`], the generic request path that serves every resource from
//! one registry, and [`store`], the revisioned key-value contract beneath it. [`server`]
//! is the HTTPS front door and [`pki`] makes the credentials it uses.

#![forbid(unsafe_code)]

pub mod api;
pub mod controllers;
pub mod pki;
pub mod scheduler;
pub mod server;
pub mod sim;
pub mod store;
