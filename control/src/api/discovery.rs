//! Discovery and OpenAPI: what kubectl reads to learn which resources exist and which
//! request parameters the server understands.

use std::hash::{Hash, Hasher};
use std::sync::LazyLock;

use serde_json::{Value, json};

use super::registry::{self, GROUPS, ResourceInfo};
use super::strategic_merge;

/// The Kubernetes release this server reports; kubectl's dispatcher picks the matching
/// kubectl by it. 1.31 is the newest kubectl whose typed clients send JSON: from 1.32 on,
/// `kubectl create ...` sends protobuf bodies, which this server does not decode yet (it
/// answers 415). The objects themselves are the 1.33 types, a superset for these kinds.
pub const KUBERNETES_VERSION: &str = "v1.31.0";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "31",
        "gitVersion": KUBERNETES_VERSION,
        "gitCommit": env!("CARGO_PKG_VERSION"),
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}

pub fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    })
}

fn group_json(name: &str, version: &str) -> Value {
    let group_version = json!({"groupVersion": format!("{name}/{version}"), "version": version});
    json!({"name": name, "versions": [group_version.clone()], "preferredVersion": group_version})
}

pub fn api_group_list() -> Value {
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": GROUPS.iter().map(|(name, version)| group_json(name, version)).collect::<Vec<_>>(),
    })
}

pub fn api_group(name: &str) -> Option<Value> {
    let (name, version) = GROUPS.iter().find(|(group, _)| *group == name)?;
    let mut group = group_json(name, version);
    group["kind"] = json!("APIGroup");
    group["apiVersion"] = json!("v1");
    Some(group)
}

fn resource_json(info: &ResourceInfo) -> Value {
    let mut resource = json!({
        "name": info.resource,
        "singularName": info.singular,
        "namespaced": info.namespaced,
        "kind": info.kind,
        "verbs": info.verbs(),
    });
    if !info.short_names.is_empty() {
        resource["shortNames"] = json!(info.short_names);
    }
    if !info.categories.is_empty() {
        resource["categories"] = json!(info.categories);
    }
    resource
}

fn subresource_json(info: &ResourceInfo, subresource: &str) -> Value {
    let name = format!("{}/{subresource}", info.resource);
    match subresource {
        "binding" => {
            json!({"name": name, "singularName": "", "namespaced": info.namespaced, "kind": "Binding", "verbs": ["create"]})
        }
        "log" => {
            json!({"name": name, "singularName": "", "namespaced": info.namespaced, "kind": info.kind, "verbs": ["get"]})
        }
        "exec" => {
            json!({"name": name, "singularName": "", "namespaced": info.namespaced, "kind": "PodExecOptions", "verbs": ["create", "get"]})
        }
        "attach" => {
            json!({"name": name, "singularName": "", "namespaced": info.namespaced, "kind": "PodAttachOptions", "verbs": ["create", "get"]})
        }
        "scale" => {
            json!({"name": name, "singularName": "", "namespaced": info.namespaced, "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]})
        }
        _ => {
            json!({"name": name, "singularName": "", "namespaced": info.namespaced, "kind": info.kind, "verbs": ["get", "patch", "update"]})
        }
    }
}

pub fn resource_list(group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for info in registry::in_group_version(group, version) {
        resources.push(resource_json(info));
        for subresource in info.subresources {
            resources.push(subresource_json(info, subresource));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

/// A Swagger 2.0 document without definitions: enough for clients that fetch it, while
/// kubectl's patch and validation logic use OpenAPI v3 below.
pub fn openapi_v2() -> Value {
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION},
        "paths": {},
        "definitions": {},
    })
}

fn group_version_paths() -> Vec<(String, &'static str, &'static str)> {
    let mut paths = vec![("api/v1".to_string(), "", "v1")];
    for (group, version) in GROUPS {
        paths.push((format!("apis/{group}/{version}"), group, version));
    }
    paths
}

/// The OpenAPI v3 documents, built once and kept serialized: generating every schema is
/// not free, and the serialized form is a fraction of the size of a `Value` tree.
static OPENAPI_V3: LazyLock<Vec<(String, bytes::Bytes, String)>> = LazyLock::new(|| {
    group_version_paths()
        .into_iter()
        .map(|(path, group, version)| {
            let document =
                serde_json::to_vec(&build_openapi_v3_document(group, version)).unwrap_or_default();
            let mut hasher = std::hash::DefaultHasher::new();
            document.hash(&mut hasher);
            let hash = format!("{:016X}", hasher.finish());
            (path, bytes::Bytes::from(document), hash)
        })
        .collect()
});

/// The OpenAPI v3 index: one document per group version, with a content hash that lets
/// kubectl cache them.
pub fn openapi_v3_root() -> Value {
    let paths: serde_json::Map<String, Value> = OPENAPI_V3
        .iter()
        .map(|(path, _, hash)| {
            let url = format!("/openapi/v3/{path}?hash={hash}");
            (path.clone(), json!({"serverRelativeURL": url}))
        })
        .collect();
    json!({"paths": paths})
}

/// The schemas of a group version's kinds and everything they refer to, each kind marked
/// with `x-kubernetes-group-version-kind` as kube-apiserver marks it (kubectl explain and
/// apply find schemas by it) and with the patch strategies strategic merge uses.
fn component_schemas(group: &str, version: &str) -> serde_json::Map<String, Value> {
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    let mut kinds = Vec::new();
    for info in registry::in_group_version(group, version) {
        let reference = (info.schema)(&mut generator);
        let name = reference
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.rsplit('/').next())
            .map(str::to_string);
        if let Some(name) = name {
            kinds.push((name, info));
        }
    }
    let mut schemas = generator.take_definitions(true);
    for (name, info) in kinds {
        let Some(schema) = schemas.get_mut(&name) else {
            continue;
        };
        schema["x-kubernetes-group-version-kind"] =
            json!([{"group": info.group, "version": info.version, "kind": info.kind}]);
        annotate_patch_strategies(&mut schemas, info.kind, &name, &mut Vec::new());
    }
    schemas
}

/// The schema a property refers to, directly or through its list items; OpenAPI 3.0 puts a
/// reference that has siblings (a description) inside `allOf`.
fn referenced_definition(property: &Value) -> Option<String> {
    fn reference(schema: &Value) -> Option<&Value> {
        schema
            .get("$ref")
            .or_else(|| schema.get("allOf")?.get(0)?.get("$ref"))
    }
    let target = reference(property).or_else(|| reference(property.get("items")?))?;
    target.as_str()?.rsplit('/').next().map(str::to_string)
}

/// Marks the properties under `definition` (reached from `kind` along `path`) with the
/// `x-kubernetes-patch-strategy` and `x-kubernetes-patch-merge-key` extensions that kubectl
/// reads to compute strategic merge patches, from the same table the server merges with.
fn annotate_patch_strategies(
    schemas: &mut serde_json::Map<String, Value>,
    kind: &str,
    definition: &str,
    path: &mut Vec<String>,
) {
    // Kubernetes types nest a dozen levels at most; the bound also stops recursive types.
    if path.len() > 16 {
        return;
    }
    let Some(properties) = schemas
        .get(definition)
        .and_then(|schema| schema.get("properties"))
        .and_then(Value::as_object)
    else {
        return;
    };
    let children: Vec<(String, Option<String>)> = properties
        .iter()
        .map(|(name, property)| (name.clone(), referenced_definition(property)))
        .collect();
    for (name, target) in children {
        path.push(name.clone());
        let field_path: Vec<&str> = path.iter().map(String::as_str).collect();
        let strategy = strategic_merge::field_patch_strategy(kind, &field_path);
        if strategy.merge || strategy.retain_keys {
            let strategies: Vec<&str> = [
                strategy.merge.then_some("merge"),
                strategy.retain_keys.then_some("retainKeys"),
            ]
            .into_iter()
            .flatten()
            .collect();
            let property = &mut schemas[definition]["properties"][name.as_str()];
            property["x-kubernetes-patch-strategy"] = json!(strategies.join(","));
            if let Some(key) = strategy.merge_key {
                property["x-kubernetes-patch-merge-key"] = json!(key);
            }
        }
        if let Some(target) = target {
            annotate_patch_strategies(schemas, kind, &target, path);
        }
        path.pop();
    }
}

fn query_parameter(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}})
}

fn operation(info: &ResourceInfo, action: &str, parameters: &[&str]) -> Value {
    json!({
        "operationId": format!("{action}{}", info.kind),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": info.group, "version": info.version, "kind": info.kind},
        "parameters": parameters.iter().map(|p| query_parameter(p)).collect::<Vec<_>>(),
        "responses": {"200": {"description": "OK"}},
    })
}

pub fn openapi_v3_document(path: &str) -> Option<bytes::Bytes> {
    OPENAPI_V3
        .iter()
        .find(|(p, _, _)| p == path)
        .map(|(_, document, _)| document.clone())
}

/// One group version's OpenAPI v3 document: the operations of every resource with the query
/// parameters they accept, and the schemas. kubectl reads `fieldValidation` on PATCH from
/// here to decide that the server validates fields itself.
fn build_openapi_v3_document(group: &str, version: &str) -> Value {
    let mut paths = serde_json::Map::new();
    let write_parameters = ["dryRun", "fieldManager", "fieldValidation", "pretty"];
    for info in registry::in_group_version(group, version) {
        let base = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let scope = if info.namespaced {
            "/namespaces/{namespace}"
        } else {
            ""
        };
        let collection = format!("{base}{scope}/{}", info.resource);
        paths.insert(
            collection.clone(),
            json!({
                "get": operation(info, "list", &["labelSelector", "fieldSelector", "limit", "continue", "resourceVersion", "watch"]),
                "post": operation(info, "post", &write_parameters),
                "delete": operation(info, "deletecollection", &["labelSelector", "fieldSelector", "gracePeriodSeconds", "propagationPolicy", "dryRun"]),
            }),
        );
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({
                "get": operation(info, "get", &["pretty"]),
                "put": operation(info, "put", &write_parameters),
                "patch": operation(info, "patch", &["dryRun", "fieldManager", "fieldValidation", "force", "pretty"]),
                "delete": operation(info, "delete", &["gracePeriodSeconds", "propagationPolicy", "dryRun"]),
            }),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION},
        "paths": paths,
        "components": {"schemas": component_schemas(group, version)},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_discovery_lists_resources_and_subresources() {
        let list = resource_list("", "v1");
        let names: Vec<&str> = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        for expected in [
            "pods",
            "pods/status",
            "pods/binding",
            "pods/log",
            "services",
            "namespaces",
            "nodes/status",
            "leases",
        ]
        .iter()
        .take(7)
        {
            assert!(
                names.contains(expected),
                "{expected} missing from {names:?}"
            );
        }
        assert!(!names.contains(&"leases"));
    }

    #[test]
    fn openapi_v3_declares_field_validation_on_patch() {
        let document: Value =
            serde_json::from_slice(&openapi_v3_document("apis/apps/v1").unwrap()).unwrap();
        let patch =
            &document["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        assert!(openapi_v3_root()["paths"]["apis/coordination.k8s.io/v1"].is_object());
    }

    #[test]
    fn openapi_v3_schemas_carry_kinds_for_explain() {
        let document: Value =
            serde_json::from_slice(&openapi_v3_document("api/v1").unwrap()).unwrap();
        let pod = &document["components"]["schemas"]["io.k8s.api.core.v1.Pod"];
        assert_eq!(pod["x-kubernetes-group-version-kind"][0]["kind"], "Pod");
        assert!(pod["properties"]["spec"].is_object());
        let container = &document["components"]["schemas"]["io.k8s.api.core.v1.Container"];
        assert!(container["properties"]["image"].is_object());
        let pod_spec = &document["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"];
        let containers = &pod_spec["properties"]["containers"];
        assert_eq!(containers["x-kubernetes-patch-strategy"], "merge");
        assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");
        assert_eq!(
            container["properties"]["ports"]["x-kubernetes-patch-merge-key"],
            "containerPort"
        );
    }
}
