//! A container's environment as the kubelet builds it: `envFrom` (ConfigMaps and Secrets,
//! with prefixes), then `env` in order with `$(VAR)` expansion and `valueFrom` (fieldRef,
//! resourceFieldRef, configMapKeyRef, secretKeyRef).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::Api;

use super::runtime::StartError;
use super::spec::expand;
use crate::quantity;

/// Reads the ConfigMaps and Secrets a pod refers to (one API read per object per start).
pub struct Objects<'a> {
    pub client: &'a kube::Client,
    pub namespace: &'a str,
}

fn config_error(message: String) -> StartError {
    StartError::new("CreateContainerConfigError", message)
}

impl Objects<'_> {
    pub async fn config_map(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<Option<BTreeMap<String, String>>, StartError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), self.namespace);
        match api.get_opt(name).await {
            Ok(Some(map)) => {
                let mut data = map.data.unwrap_or_default();
                for (key, value) in map.binary_data.unwrap_or_default() {
                    data.insert(key, String::from_utf8_lossy(&value.0).into_owned());
                }
                Ok(Some(data))
            }
            Ok(None) if optional => Ok(None),
            Ok(None) => Err(config_error(format!("configmap \"{name}\" not found"))),
            Err(error) => Err(config_error(format!("get configmap \"{name}\": {error}"))),
        }
    }

    pub async fn secret(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, StartError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), self.namespace);
        match api.get_opt(name).await {
            Ok(Some(secret)) => {
                let mut data: BTreeMap<String, Vec<u8>> = secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(key, value)| (key, value.0))
                    .collect();
                for (key, value) in secret.string_data.unwrap_or_default() {
                    data.insert(key, value.into_bytes());
                }
                Ok(Some(data))
            }
            Ok(None) if optional => Ok(None),
            Ok(None) => Err(config_error(format!("secret \"{name}\" not found"))),
            Err(error) => Err(config_error(format!("get secret \"{name}\": {error}"))),
        }
    }
}

/// The value of a downward-API field path (`metadata.name`, `metadata.labels['app']`...).
pub fn field_value(pod: &Pod, path: &str, host_ip: &str, pod_ips: &[String]) -> Option<String> {
    let meta = &pod.metadata;
    let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    let spec = pod.spec.as_ref();
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "metadata.labels" => Some(format_map(meta.labels.as_ref())),
        "metadata.annotations" => Some(format_map(meta.annotations.as_ref())),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.hostIP" | "status.hostIPs" => Some(host_ip.to_string()),
        "status.podIP" => Some(pod_ips.first().cloned().unwrap_or_default()),
        "status.podIPs" => Some(pod_ips.join(",")),
        _ => keyed("metadata.labels['", meta.labels.as_ref())
            .or_else(|| keyed("metadata.annotations['", meta.annotations.as_ref())),
    }
}

/// `key="value"` lines, sorted, as the downward API writes label and annotation files.
pub fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(key, value)| format!("{key}={value:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of a resourceFieldRef (`limits.cpu`, `requests.memory`...) with its divisor,
/// rounded up as the kubelet does; a missing limit falls back to the node's allocatable.
pub fn resource_value(
    container: &Container,
    resource: &str,
    divisor: Option<&str>,
    node_allocatable: &BTreeMap<String, String>,
) -> Option<String> {
    let (kind, name) = resource.split_once('.')?;
    let resources = container.resources.as_ref();
    let set = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => return None,
    };
    let text = set
        .and_then(|s| s.get(name))
        .map(|q| q.0.clone())
        .or_else(|| {
            (kind == "limits")
                .then(|| node_allocatable.get(name).cloned())
                .flatten()
        })
        .unwrap_or_else(|| "0".to_string());
    // Both default divisors are "1": one core, one byte.
    let value = quantity::parse(&text).ok()?;
    let divisor = divisor
        .filter(|d| !d.is_empty())
        .and_then(|d| quantity::parse(d).ok())
        .unwrap_or(1_000_000_000);
    Some(quantity::divide_ceil(value, divisor).to_string())
}

/// Builds the container's environment.
pub async fn container_env(
    objects: &Objects<'_>,
    pod: &Pod,
    container: &Container,
    host_ip: &str,
    pod_ips: &[String],
    node_allocatable: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, StartError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, key: String, value: String| {
        if let Some(entry) = env.iter_mut().find(|(k, _)| *k == key) {
            entry.1 = value;
        } else {
            env.push((key, value));
        }
    };
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        if let Some(reference) = &source.config_map_ref
            && let Some(data) = objects
                .config_map(&reference.name, reference.optional.unwrap_or(false))
                .await?
        {
            for (key, value) in data {
                set(&mut env, format!("{prefix}{key}"), value);
            }
        }
        if let Some(reference) = &source.secret_ref
            && let Some(data) = objects
                .secret(&reference.name, reference.optional.unwrap_or(false))
                .await?
        {
            for (key, value) in data {
                set(
                    &mut env,
                    format!("{prefix}{key}"),
                    String::from_utf8_lossy(&value).into_owned(),
                );
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(source) = &var.value_from {
            if let Some(field) = &source.field_ref {
                field_value(pod, &field.field_path, host_ip, pod_ips).ok_or_else(|| {
                    config_error(format!(
                        "env {}: unsupported fieldPath {:?}",
                        var.name, field.field_path
                    ))
                })?
            } else if let Some(resource) = &source.resource_field_ref {
                resource_value(
                    container,
                    &resource.resource,
                    resource.divisor.as_ref().map(|d| d.0.as_str()),
                    node_allocatable,
                )
                .ok_or_else(|| {
                    config_error(format!(
                        "env {}: unsupported resource {:?}",
                        var.name, resource.resource
                    ))
                })?
            } else if let Some(key) = &source.config_map_key_ref {
                let optional = key.optional.unwrap_or(false);
                match objects.config_map(&key.name, optional).await? {
                    Some(data) => match data.get(&key.key) {
                        Some(value) => value.clone(),
                        None if optional => continue,
                        None => {
                            return Err(config_error(format!(
                                "couldn't find key {} in ConfigMap {}/{}",
                                key.key, objects.namespace, key.name
                            )));
                        }
                    },
                    None => continue,
                }
            } else if let Some(key) = &source.secret_key_ref {
                let optional = key.optional.unwrap_or(false);
                match objects.secret(&key.name, optional).await? {
                    Some(data) => match data.get(&key.key) {
                        Some(value) => String::from_utf8_lossy(value).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(config_error(format!(
                                "couldn't find key {} in Secret {}/{}",
                                key.key, objects.namespace, key.name
                            )));
                        }
                    },
                    None => continue,
                }
            } else {
                String::new()
            }
        } else {
            let known: BTreeMap<&str, &str> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            expand(var.value.as_deref().unwrap_or_default(), &known)
        };
        set(&mut env, var.name.clone(), value);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn downward_fields_resolve() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "labels": {"app": "web", "tier": "front"}},
            "spec": {"nodeName": "n1", "containers": []},
        }))
        .unwrap();
        assert_eq!(
            field_value(&pod, "metadata.name", "h", &[]).as_deref(),
            Some("web")
        );
        assert_eq!(
            field_value(&pod, "metadata.labels['app']", "h", &[]).as_deref(),
            Some("web")
        );
        assert_eq!(
            field_value(&pod, "metadata.labels", "h", &[]).as_deref(),
            Some("app=\"web\"\ntier=\"front\"")
        );
        assert_eq!(
            field_value(&pod, "status.podIP", "h", &["10.0.0.1".into()]).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            field_value(&pod, "spec.nodeName", "h", &[]).as_deref(),
            Some("n1")
        );
        assert_eq!(field_value(&pod, "spec.bogus", "h", &[]), None);
    }

    #[test]
    fn resource_fields_divide_and_round_up() {
        let container: Container = serde_json::from_value(json!({"name": "c",
            "resources": {"limits": {"cpu": "1500m", "memory": "64Mi"}, "requests": {"cpu": "250m"}}})).unwrap();
        let node = BTreeMap::from([("cpu".to_string(), "4".to_string())]);
        assert_eq!(
            resource_value(&container, "limits.cpu", None, &node).as_deref(),
            Some("2")
        );
        assert_eq!(
            resource_value(&container, "requests.cpu", Some("1m"), &node).as_deref(),
            Some("250")
        );
        assert_eq!(
            resource_value(&container, "limits.memory", Some("1Mi"), &node).as_deref(),
            Some("64")
        );
        let bare: Container = serde_json::from_value(json!({"name": "c"})).unwrap();
        assert_eq!(
            resource_value(&bare, "limits.cpu", None, &node).as_deref(),
            Some("4")
        );
    }
}
