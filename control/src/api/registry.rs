//! The resource registry: every resource the API server serves, described once.
//!
//! Request handling is one generic path; what differs between kinds (scope, subresources,
//! field selectors, the typed decoder) is data in this table. Defaulting, validation and
//! table printing are looked up by kind in their own modules.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::{
    apps::v1 as apps, batch::v1 as batch, coordination::v1 as coordination, core::v1 as core,
};

/// Decodes a request body into the kind's typed struct and back, which is what
/// kube-apiserver's decoding does to a body: wrong types fail, unknown fields vanish. It
/// reads the body in place: the caller keeps it to name the fields that vanished.
pub type Decoder = fn(&Value) -> Result<Value, serde_json::Error>;

pub type SchemaRegistrar = fn(&mut schemars::SchemaGenerator) -> schemars::Schema;

#[derive(Debug)]
pub struct ResourceInfo {
    /// API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural resource name, as in URLs.
    pub resource: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Subresources served for this resource (`status`, `scale`, `binding`).
    pub subresources: &'static [&'static str],
    /// Field selector paths beyond `metadata.name` and `metadata.namespace`.
    pub field_selectors: &'static [&'static str],
    /// Whether a PUT of a missing object creates it, as kube-apiserver allows for a few kinds.
    pub allow_create_on_update: bool,
    pub decode: Decoder,
    /// Registers the kind's OpenAPI schema (and those it refers to) with a generator.
    pub schema: SchemaRegistrar,
}

impl ResourceInfo {
    /// `v1` or `apps/v1`, as written in `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The store key prefix under which all objects of this resource live.
    pub fn key_prefix(&self) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/registry/{group}/{}/", self.resource)
    }

    /// The store key prefix of one namespace (or of all, for `None`).
    pub fn list_prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(namespace) if self.namespaced => format!("{}{namespace}/", self.key_prefix()),
            _ => self.key_prefix(),
        }
    }

    pub fn object_key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.list_prefix(namespace))
    }

    pub fn has_subresource(&self, subresource: &str) -> bool {
        self.subresources.contains(&subresource)
    }

    pub fn has_status(&self) -> bool {
        self.has_subresource("status")
    }

    /// The verbs discovery advertises.
    pub fn verbs(&self) -> &'static [&'static str] {
        &[
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }
}

fn schema_of<T: schemars::JsonSchema>(
    generator: &mut schemars::SchemaGenerator,
) -> schemars::Schema {
    generator.subschema_for::<T>()
}

fn typed_round_trip<T: DeserializeOwned + Serialize>(
    value: &Value,
) -> Result<Value, serde_json::Error> {
    let typed = T::deserialize(value)?;
    serde_json::to_value(typed)
}

const POD_FIELDS: &[&str] = &[
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

const EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

pub static RESOURCES: &[ResourceInfo] = &[
    ResourceInfo {
        group: "",
        version: "v1",
        resource: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        categories: &[],
        subresources: &["status"],
        field_selectors: &["status.phase"],
        allow_create_on_update: false,
        decode: typed_round_trip::<core::Namespace>,
        schema: schema_of::<core::Namespace>,
    },
    ResourceInfo {
        group: "",
        version: "v1",
        resource: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        categories: &["all"],
        // `log`, `exec` and `attach` are passed on to the pod's node (`proxy.rs`).
        subresources: &["status", "binding", "log", "exec", "attach"],
        field_selectors: POD_FIELDS,
        allow_create_on_update: false,
        decode: typed_round_trip::<core::Pod>,
        schema: schema_of::<core::Pod>,
    },
    ResourceInfo {
        group: "",
        version: "v1",
        resource: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        categories: &["all"],
        subresources: &["status"],
        field_selectors: &[],
        allow_create_on_update: false,
        decode: typed_round_trip::<core::Service>,
        schema: schema_of::<core::Service>,
    },
    ResourceInfo {
        group: "",
        version: "v1",
        resource: "endpoints",
        singular: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        short_names: &["ep"],
        categories: &[],
        subresources: &[],
        field_selectors: &[],
        allow_create_on_update: true,
        decode: typed_round_trip::<core::Endpoints>,
        schema: schema_of::<core::Endpoints>,
    },
    ResourceInfo {
        group: "",
        version: "v1",
        resource: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        categories: &[],
        subresources: &["status"],
        field_selectors: &["spec.unschedulable"],
        allow_create_on_update: false,
        decode: typed_round_trip::<core::Node>,
        schema: schema_of::<core::Node>,
    },
    ResourceInfo {
        group: "",
        version: "v1",
        resource: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        categories: &[],
        subresources: &[],
        field_selectors: EVENT_FIELDS,
        allow_create_on_update: true,
        decode: typed_round_trip::<core::Event>,
        schema: schema_of::<core::Event>,
    },
    ResourceInfo {
        group: "",
        version: "v1",
        resource: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        categories: &[],
        subresources: &[],
        field_selectors: &[],
        allow_create_on_update: false,
        decode: typed_round_trip::<core::ConfigMap>,
        schema: schema_of::<core::ConfigMap>,
    },
    ResourceInfo {
        group: "",
        version: "v1",
        resource: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: &[],
        categories: &[],
        subresources: &[],
        field_selectors: &["type"],
        allow_create_on_update: false,
        decode: typed_round_trip::<core::Secret>,
        schema: schema_of::<core::Secret>,
    },
    ResourceInfo {
        group: "",
        version: "v1",
        resource: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short_names: &["sa"],
        categories: &[],
        subresources: &[],
        field_selectors: &[],
        allow_create_on_update: false,
        decode: typed_round_trip::<core::ServiceAccount>,
        schema: schema_of::<core::ServiceAccount>,
    },
    ResourceInfo {
        group: "apps",
        version: "v1",
        resource: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        short_names: &["deploy"],
        categories: &["all"],
        subresources: &["status", "scale"],
        field_selectors: &[],
        allow_create_on_update: false,
        decode: typed_round_trip::<apps::Deployment>,
        schema: schema_of::<apps::Deployment>,
    },
    ResourceInfo {
        group: "apps",
        version: "v1",
        resource: "replicasets",
        singular: "replicaset",
        kind: "ReplicaSet",
        namespaced: true,
        short_names: &["rs"],
        categories: &["all"],
        subresources: &["status", "scale"],
        field_selectors: &["status.replicas"],
        allow_create_on_update: false,
        decode: typed_round_trip::<apps::ReplicaSet>,
        schema: schema_of::<apps::ReplicaSet>,
    },
    ResourceInfo {
        group: "apps",
        version: "v1",
        resource: "daemonsets",
        singular: "daemonset",
        kind: "DaemonSet",
        namespaced: true,
        short_names: &["ds"],
        categories: &["all"],
        subresources: &["status"],
        field_selectors: &[],
        allow_create_on_update: false,
        decode: typed_round_trip::<apps::DaemonSet>,
        schema: schema_of::<apps::DaemonSet>,
    },
    ResourceInfo {
        group: "batch",
        version: "v1",
        resource: "jobs",
        singular: "job",
        kind: "Job",
        namespaced: true,
        short_names: &[],
        categories: &["all"],
        subresources: &["status"],
        field_selectors: &[],
        allow_create_on_update: false,
        decode: typed_round_trip::<batch::Job>,
        schema: schema_of::<batch::Job>,
    },
    ResourceInfo {
        group: "discovery.k8s.io",
        version: "v1",
        resource: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        categories: &[],
        subresources: &[],
        field_selectors: &[],
        allow_create_on_update: false,
        decode: typed_round_trip::<discovery::EndpointSlice>,
        schema: schema_of::<discovery::EndpointSlice>,
    },
    ResourceInfo {
        group: "coordination.k8s.io",
        version: "v1",
        resource: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: &[],
        categories: &[],
        subresources: &[],
        field_selectors: &[],
        allow_create_on_update: true,
        decode: typed_round_trip::<coordination::Lease>,
        schema: schema_of::<coordination::Lease>,
    },
];

/// The groups, in the order discovery lists them; the core group is served under `/api`.
pub const GROUPS: &[(&str, &str)] = &[
    ("apps", "v1"),
    ("batch", "v1"),
    ("discovery.k8s.io", "v1"),
    ("coordination.k8s.io", "v1"),
];

pub fn lookup(group: &str, version: &str, resource: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.resource == resource)
}

pub fn by_kind(kind: &str) -> Option<&'static ResourceInfo> {
    RESOURCES.iter().find(|r| r.kind == kind)
}

pub fn in_group_version<'a>(
    group: &'a str,
    version: &'a str,
) -> impl Iterator<Item = &'static ResourceInfo> + 'a {
    RESOURCES
        .iter()
        .filter(move |r| r.group == group && r.version == version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_namespace_never_match_another() {
        let pods = lookup("", "v1", "pods").unwrap();
        let key = pods.object_key(Some("default2"), "a");
        assert!(!key.starts_with(&pods.list_prefix(Some("default"))));
        assert!(key.starts_with(&pods.list_prefix(None)));
    }

    #[test]
    fn decoding_drops_unknown_fields_and_rejects_wrong_types() {
        let pods = lookup("", "v1", "pods").unwrap();
        let decoded = (pods.decode)(&serde_json::json!({
            "metadata": {"name": "a"}, "spec": {"containers": [{"name": "c", "image": "i"}], "bogus": 1}
        }))
        .unwrap();
        assert!(decoded["spec"].get("bogus").is_none());
        assert!((pods.decode)(&serde_json::json!({"spec": {"containers": "nope"}})).is_err());
    }
}
