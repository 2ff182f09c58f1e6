//! skiff's control plane: the Kubernetes-compatible API server and the store under it.
//!
//! Newcomers start with [`api`], the generic request path that serves every resource from
//! one registry, and [`store`], the revisioned key-value contract beneath it. [`server`]
//! is the HTTPS front door and [`pki`] makes the credentials it uses.

#![forbid(unsafe_code)]

/// Makes `$ty`, a pod type of our own that declares only the fields its reader decodes
/// (with a `metadata: ObjectMeta`), a `kube::Resource` served at the pods' URL, so kube-rs
/// watches and caches it as it would a `k8s-openapi` Pod.
macro_rules! slim_pod_resource {
    ($ty:ty) => {
        impl k8s_openapi::Resource for $ty {
            const API_VERSION: &'static str =
                <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str =
                <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str =
                <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str =
                <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str =
                <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }

        impl k8s_openapi::Metadata for $ty {
            type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }
    };
}

pub mod api;
pub mod controllers;
pub mod pki;
pub mod scheduler;
pub mod server;
pub mod sim;
pub mod store;
