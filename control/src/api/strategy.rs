//! What the API server does to an object of a given kind on create and update beyond
//! defaulting and validation: resetting status, generations, pod QoS, Service addresses.

use std::net::Ipv4Addr;

use serde_json::{Map, Value, json};

use super::allocator::{AllocationError, ServiceAllocator};
use super::registry::ResourceInfo;
use super::status::{ApiError, Cause};

/// Kinds whose `metadata.generation` counts changes to their spec.
fn tracks_generation(kind: &str) -> bool {
    matches!(kind, "Deployment" | "ReplicaSet" | "DaemonSet" | "Job")
}

pub(crate) fn prepare_for_create(info: &ResourceInfo, object: &mut Value) {
    if tracks_generation(info.kind) {
        object["metadata"]["generation"] = json!(1);
    }
    match info.kind {
        "Pod" => {
            let qos = qos_class(object);
            object["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        "Namespace" => {
            object["status"] = json!({"phase": "Active"});
        }
        "Service" => {
            object["status"] = json!({"loadBalancer": {}});
        }
        "Deployment" | "ReplicaSet" | "DaemonSet" | "Job" => {
            object["status"] = json!({});
        }
        _ => {}
    }
}

/// What a create does once the object has its name, before validation: a Job's generated
/// selector and pod labels, which carry its name and uid.
pub(crate) fn prepare_named_for_create(info: &ResourceInfo, object: &mut Value) {
    if info.kind == "Job" {
        super::defaults::generate_job_selector(object);
    }
}

/// Folds write-only convenience fields into their stored form, on create and on update:
/// a Secret's `stringData` becomes base64 `data`, as kube-apiserver converts it.
pub(crate) fn normalize(info: &ResourceInfo, object: &mut Value) {
    if info.kind == "Secret"
        && let Some(Value::Object(strings)) =
            object.as_object_mut().and_then(|o| o.remove("stringData"))
    {
        use base64::Engine as _;
        for (key, value) in strings {
            let text = value.as_str().unwrap_or_default();
            object["data"][key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
        }
    }
}

/// Carries over from `old` what a write to the main resource may not change.
pub(crate) fn prepare_for_update(info: &ResourceInfo, new: &mut Value, old: &Value) {
    if info.has_status() {
        match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                if let Some(map) = new.as_object_mut() {
                    map.remove("status");
                }
            }
        }
    }
    if tracks_generation(info.kind) {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let changed = new.get("spec") != old.get("spec");
        new["metadata"]["generation"] = json!(if changed { generation + 1 } else { generation });
    }
}

/// A status write changes only `status`: everything else is the stored object's.
pub(crate) fn prepare_for_status_update(new: &mut Value, old: &Value) {
    let status = new.as_object_mut().and_then(|map| map.remove("status"));
    // The stored object but its status, which is about to be replaced: no copy of it.
    let mut kept = match old {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .filter(|(key, _)| *key != "status")
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        ),
        other => other.clone(),
    };
    if let Some(status) = status {
        kept["status"] = status;
    }
    *new = kept;
}

/// Metadata that only the server sets: a client's copy of these is replaced by the stored
/// object's on update.
pub(crate) fn carry_server_metadata(new: &mut Value, old: &Value) {
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match old["metadata"].get(field) {
            Some(value) => new["metadata"][field] = value.clone(),
            None => {
                if let Some(map) = new["metadata"].as_object_mut() {
                    map.remove(field);
                }
            }
        }
    }
}

/// The pod's QoS class as the kubelet and kube-apiserver compute it.
pub(crate) fn qos_class(pod: &Value) -> &'static str {
    let spec = &pod["spec"];
    let containers = spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten();
    let mut any_set = false;
    let mut guaranteed = true;
    for container in containers {
        let resources = &container["resources"];
        let requests = resources["requests"].as_object();
        let limits = resources["limits"].as_object();
        let relevant =
            |map: Option<&Map<String, Value>>, name: &str| map.and_then(|m| m.get(name)).cloned();
        for resource in ["cpu", "memory"] {
            let request = relevant(requests, resource);
            let limit = relevant(limits, resource);
            if request.is_some() || limit.is_some() {
                any_set = true;
            }
            match (&request, &limit) {
                (_, None) => guaranteed = false,
                (Some(request), Some(limit)) if request != limit => guaranteed = false,
                _ => {}
            }
        }
    }
    if !any_set {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// Service addresses taken for one write; dropped uncommitted, they go back to the pool.
pub(crate) struct ServiceAllocations<'a> {
    allocator: &'a ServiceAllocator,
    ips: Vec<Ipv4Addr>,
    ports: Vec<u16>,
    /// Addresses of the old object that the write gives up, released on commit.
    released_ips: Vec<Ipv4Addr>,
    released_ports: Vec<u16>,
    committed: bool,
}

impl<'a> ServiceAllocations<'a> {
    pub(crate) fn none(allocator: &'a ServiceAllocator) -> Self {
        Self {
            allocator,
            ips: Vec::new(),
            ports: Vec::new(),
            released_ips: Vec::new(),
            released_ports: Vec::new(),
            committed: false,
        }
    }

    /// The write is durable: keep what it took, free what it gave up.
    pub(crate) fn commit(mut self) {
        self.committed = true;
        for ip in self.released_ips.drain(..) {
            self.allocator.release_ip(ip);
        }
        for port in self.released_ports.drain(..) {
            self.allocator.release_port(port);
        }
    }
}

impl Drop for ServiceAllocations<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for ip in &self.ips {
            self.allocator.release_ip(*ip);
        }
        for port in &self.ports {
            self.allocator.release_port(*port);
        }
    }
}

fn service_type(service: &Value) -> &str {
    service["spec"]["type"].as_str().unwrap_or("ClusterIP")
}

fn wants_node_ports(service: &Value) -> bool {
    matches!(service_type(service), "NodePort" | "LoadBalancer")
}

fn cluster_ip(service: &Value) -> Option<Ipv4Addr> {
    service["spec"]["clusterIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
}

fn node_ports(service: &Value) -> Vec<u16> {
    service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["nodePort"].as_u64())
        .filter_map(|p| u16::try_from(p).ok())
        .collect()
}

fn allocation_error(
    info: &ResourceInfo,
    name: &str,
    field: String,
    value: String,
    error: AllocationError,
) -> ApiError {
    match error {
        AllocationError::IpRangeFull | AllocationError::PortRangeFull => {
            ApiError::internal(format!("Internal error occurred: {error}"))
        }
        _ => ApiError::invalid(
            info,
            name,
            &[Cause {
                reason: "FieldValueInvalid",
                field,
                message: format!("Invalid value: {value}: {error}"),
            }],
        ),
    }
}

/// Gives `new` (a Service being created, or updated from `old`) its ClusterIP and NodePorts.
pub(crate) fn allocate_service<'a>(
    allocator: &'a ServiceAllocator,
    info: &ResourceInfo,
    name: &str,
    new: &mut Value,
    old: Option<&Value>,
) -> Result<ServiceAllocations<'a>, ApiError> {
    let mut allocations = ServiceAllocations::none(allocator);
    let needs_ip =
        service_type(new) != "ExternalName" && new["spec"]["clusterIP"].as_str() != Some("None");
    let old_ip = old.and_then(cluster_ip);
    if needs_ip {
        match old_ip {
            Some(ip) => {
                new["spec"]["clusterIP"] = json!(ip.to_string());
                new["spec"]["clusterIPs"] = json!([ip.to_string()]);
            }
            None => {
                let requested = match new["spec"]["clusterIP"].as_str() {
                    None | Some("") => None,
                    Some(text) => Some(text.parse::<Ipv4Addr>().map_err(|_| {
                        ApiError::invalid(
                            info,
                            name,
                            &[Cause {
                                reason: "FieldValueInvalid",
                                field: "spec.clusterIPs[0]".into(),
                                message: format!("Invalid value: \"{text}\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"),
                            }],
                        )
                    })?),
                };
                let ip = allocator.allocate_ip(requested).map_err(|e| {
                    let shown = requested
                        .map_or_else(|| "\"\"".to_string(), |ip| format!("[]string{{\"{ip}\"}}"));
                    allocation_error(info, name, "spec.clusterIPs".into(), shown, e)
                })?;
                allocations.ips.push(ip);
                new["spec"]["clusterIP"] = json!(ip.to_string());
                new["spec"]["clusterIPs"] = json!([ip.to_string()]);
            }
        }
    } else if let Some(ip) = old_ip {
        allocations.released_ips.push(ip);
    }

    let old_ports = old.map(node_ports).unwrap_or_default();
    let mut kept = Vec::new();
    if wants_node_ports(new) {
        let count = new["spec"]["ports"].as_array().map_or(0, Vec::len);
        for index in 0..count {
            let port = &mut new["spec"]["ports"][index];
            let requested = port["nodePort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0);
            let assigned = match requested {
                Some(p) if old_ports.contains(&p) => p,
                requested => {
                    let p = allocator.allocate_port(requested).map_err(|e| {
                        allocation_error(
                            info,
                            name,
                            format!("spec.ports[{index}].nodePort"),
                            requested.map_or_else(|| "0".to_string(), |p| p.to_string()),
                            e,
                        )
                    })?;
                    allocations.ports.push(p);
                    p
                }
            };
            kept.push(assigned);
            port["nodePort"] = json!(assigned);
        }
    }
    allocations
        .released_ports
        .extend(old_ports.into_iter().filter(|p| !kept.contains(p)));
    Ok(allocations)
}

/// Frees a deleted Service's addresses.
pub(crate) fn release_service(allocator: &ServiceAllocator, service: &Value) {
    if let Some(ip) = cluster_ip(service) {
        allocator.release_ip(ip);
    }
    for port in node_ports(service) {
        allocator.release_port(port);
    }
}

/// Re-marks a stored Service's addresses as taken, at start.
pub(crate) fn restore_service(allocator: &ServiceAllocator, service: &Value) {
    if let Some(ip) = cluster_ip(service)
        && allocator.cidr().contains(ip)
    {
        let _ = allocator.allocate_ip(Some(ip));
    }
    for port in node_ports(service) {
        let _ = allocator.allocate_port(Some(port));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::registry::lookup;

    #[test]
    fn secret_string_data_becomes_data() {
        let info = lookup("", "v1", "secrets").unwrap();
        let mut secret = json!({"data": {"a": "eA=="}, "stringData": {"b": "hunter2"}});
        normalize(info, &mut secret);
        assert_eq!(secret, json!({"data": {"a": "eA==", "b": "aHVudGVyMg=="}}));
    }

    #[test]
    fn qos_classes() {
        let pod = |resources: Value| json!({"spec": {"containers": [{"name": "a", "resources": resources}]}});
        assert_eq!(qos_class(&pod(json!({}))), "BestEffort");
        assert_eq!(
            qos_class(&pod(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&pod(
                json!({"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
            )),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&pod(json!({"requests": {"cpu": "100m"}}))),
            "Burstable"
        );
    }

    #[test]
    fn service_allocation_is_returned_unless_committed() {
        let info = lookup("", "v1", "services").unwrap();
        let allocator = ServiceAllocator::new("10.0.0.0/30".parse().unwrap(), 30000..=30000);
        let mut service = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        {
            let _dropped = allocate_service(&allocator, info, "a", &mut service, None).unwrap();
        }
        let mut again = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        let allocations = allocate_service(&allocator, info, "a", &mut again, None).unwrap();
        allocations.commit();
        assert_eq!(again["spec"]["ports"][0]["nodePort"], 30000);
        assert!(
            again["spec"]["clusterIP"]
                .as_str()
                .unwrap()
                .starts_with("10.0.0.")
        );

        let mut third = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        let error = allocate_service(&allocator, info, "b", &mut third, None)
            .err()
            .unwrap();
        assert_eq!(error.code, 500);

        // Switching to ClusterIP frees the node port once the update commits.
        let mut updated = json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80}]}});
        allocate_service(&allocator, info, "a", &mut updated, Some(&again))
            .unwrap()
            .commit();
        assert_eq!(allocator.allocate_port(None), Ok(30000));
    }

    #[test]
    fn requested_cluster_ip_conflicts_are_invalid() {
        let info = lookup("", "v1", "services").unwrap();
        let allocator = ServiceAllocator::new("10.0.0.0/24".parse().unwrap(), 30000..=30010);
        let mut a = json!({"spec": {"clusterIP": "10.0.0.10", "ports": [{"port": 80}]}});
        allocate_service(&allocator, info, "a", &mut a, None)
            .unwrap()
            .commit();
        let mut b = json!({"spec": {"clusterIP": "10.0.0.10", "ports": [{"port": 80}]}});
        let error = allocate_service(&allocator, info, "b", &mut b, None)
            .err()
            .unwrap();
        assert_eq!(error.code, 422);
        assert!(
            error.message.contains("provided IP is already allocated"),
            "{}",
            error.message
        );
    }
}
