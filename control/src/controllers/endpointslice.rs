//! EndpointSlice controller: turns each Service with a selector and the pods it selects into
//! EndpointSlices (at most [`MAX_ENDPOINTS_PER_SLICE`] endpoints each, one group of slices
//! per distinct set of resolved ports) and into the legacy Endpoints object that
//! `kubectl describe service` shows.
//!
//! Each endpoint carries the pod's address with upstream's conditions: `serving` is the
//! pod's readiness, `terminating` its deletion mark, and `ready` is serving and not
//! terminating (or always, with `publishNotReadyAddresses`). Named target ports are
//! resolved against each pod's container ports, so pods of one Service may land in
//! different slices.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CoreEndpointPort, EndpointSubset, Endpoints, ObjectReference,
    Service,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt as _};

use super::pod::Pod;
use super::runtime::{
    Cache, Queue, controller_reference, feed, is_not_found, key_of, map_selector_matches,
    pod_is_ready, seed_and_run_workers, split_key,
};

pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

/// How long writes that the slice cache has not shown yet hold back the next pass.
const WRITE_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(10);

/// When the writes happened, and each slice's name with the resourceVersion the cache must
/// reach (None: deleted, must disappear).
type PendingWrites = (Instant, Vec<(String, Option<u64>)>);

/// Endpoints of one address type and port set, by pod name.
type SliceGroups = BTreeMap<(String, String), (Vec<EndpointPort>, Vec<(String, Endpoint)>)>;

/// Ready and not-ready addresses of one port set.
type SubsetGroups = BTreeMap<
    String,
    (
        Vec<CoreEndpointPort>,
        Vec<EndpointAddress>,
        Vec<EndpointAddress>,
    ),
>;

pub struct EndpointSliceController {
    client: Client,
    services: Cache<Service>,
    pods: Cache<Pod>,
    slices: Cache<EndpointSlice>,
    endpoints: Cache<Endpoints>,
    /// Per Service, slices it wrote and the resourceVersion the cache must reach (None:
    /// deleted, must disappear), so a lagging cache never makes it create a slice twice.
    pending_writes: Mutex<HashMap<String, PendingWrites>>,
}

impl EndpointSliceController {
    pub fn new(
        client: Client,
        services: Cache<Service>,
        pods: Cache<Pod>,
        slices: Cache<EndpointSlice>,
        endpoints: Cache<Endpoints>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            services,
            pods,
            slices,
            endpoints,
            pending_writes: Mutex::default(),
        })
    }

    pub async fn run(self: Arc<Self>, workers: usize) {
        let queue = Queue::new();
        let services = self.services.clone();
        let all = move || services.keys();
        let from_services = self.services.feed_own_keys(queue.clone());
        // A pod whose labels change leaves the Services it matched before: remember them.
        let last_services: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
        let services = self.services.clone();
        let from_pods = feed(
            queue.clone(),
            self.pods.subscribe(),
            move |pod: &Pod| {
                let namespace = pod.namespace().unwrap_or_default();
                let now: Vec<String> = services
                    .in_namespace(&namespace)
                    .iter()
                    .filter(|service| {
                        selector_of(service).is_some_and(|s| map_selector_matches(s, pod.labels()))
                    })
                    .map(|service| key_of(&**service))
                    .collect();
                let mut last = last_services.lock().expect("last services lock");
                let mut keys = last.remove(&key_of(pod)).unwrap_or_default();
                keys.extend(now.iter().cloned());
                keys.sort();
                keys.dedup();
                if pod.metadata.deletion_timestamp.is_none() || !now.is_empty() {
                    last.insert(key_of(pod), now);
                }
                keys
            },
            all.clone(),
        );
        let from_slices = feed(
            queue.clone(),
            self.slices.subscribe(),
            |slice: &EndpointSlice| {
                slice
                    .labels()
                    .get(SERVICE_NAME_LABEL)
                    .filter(|_| {
                        slice.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
                    })
                    .map(|service| {
                        vec![format!(
                            "{}/{service}",
                            slice.namespace().unwrap_or_default()
                        )]
                    })
                    .unwrap_or_default()
            },
            all,
        );
        let _ = self.services.store.wait_until_ready().await;
        let _ = self.pods.store.wait_until_ready().await;
        let _ = self.slices.store.wait_until_ready().await;
        let _ = self.endpoints.store.wait_until_ready().await;
        let workers = seed_and_run_workers(
            "endpointslice",
            queue,
            &self.services,
            workers,
            self.clone(),
            |this, key| async move { this.reconcile(&key).await },
        );
        tokio::join!(from_services, from_pods, from_slices, workers);
    }

    /// Whether the slice cache shows every write of the last pass for `key`.
    fn writes_visible(&self, key: &str, namespace: &str) -> bool {
        let mut pending = self.pending_writes.lock().expect("pending lock");
        let Some((since, writes)) = pending.get_mut(key) else {
            return true;
        };
        writes.retain(|(name, version)| {
            let cached = self.slices.get(Some(namespace), name);
            match version {
                None => cached.is_some(),
                Some(version) => cached
                    .and_then(|s| s.metadata.resource_version.as_deref()?.parse::<u64>().ok())
                    .is_none_or(|cached| cached < *version),
            }
        });
        if writes.is_empty() || since.elapsed() > WRITE_VISIBILITY_TIMEOUT {
            pending.remove(key);
            return true;
        }
        false
    }

    async fn reconcile(&self, key: &str) -> anyhow::Result<Option<Duration>> {
        let (namespace, name) = split_key(key);
        let namespace = namespace.unwrap_or("default");
        let service = self.services.get(Some(namespace), name);
        let Some(service) = service.filter(|s| s.metadata.deletion_timestamp.is_none()) else {
            // The slices go with the Service's ownerReferences; Endpoints have none.
            self.delete_endpoints(namespace, name).await?;
            return Ok(None);
        };
        let Some(selector) = selector_of(&service) else {
            // Without a selector the user manages the endpoints.
            return Ok(None);
        };
        if service.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            return Ok(None);
        }
        if !self.writes_visible(key, namespace) {
            return Ok(Some(Duration::from_millis(200)));
        }
        let pods: Vec<Arc<Pod>> = self
            .pods
            .in_namespace(namespace)
            .into_iter()
            .filter(|pod| map_selector_matches(selector, pod.labels()))
            .collect();
        self.sync_slices(key, &service, &pods).await?;
        self.sync_endpoints(&service, &pods).await
    }

    async fn sync_slices(
        &self,
        key: &str,
        service: &Service,
        pods: &[Arc<Pod>],
    ) -> anyhow::Result<()> {
        let namespace = service.namespace().unwrap_or_default();
        let name = service.name_any();
        let desired = desired_slices(service, pods);
        let mut existing: Vec<Arc<EndpointSlice>> = self
            .slices
            .in_namespace(&namespace)
            .into_iter()
            .filter(|s| {
                s.labels().get(SERVICE_NAME_LABEL) == Some(&name)
                    && s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
                    && s.metadata.deletion_timestamp.is_none()
            })
            .collect();
        existing.sort_by_key(|s| s.name_any());
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &namespace);
        let mut labels = service.labels().clone();
        labels.insert(SERVICE_NAME_LABEL.into(), name.clone());
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        let mut writes = Vec::new();
        let mut used = HashSet::new();
        let mut to_create = Vec::new();
        // Reuse a slice with the same ports and address type: first one with exactly the
        // wanted endpoints, else any.
        for want in &desired {
            let same_shape = |s: &&Arc<EndpointSlice>| {
                !used.contains(&s.name_any())
                    && s.address_type == want.address_type
                    && normalized_ports(&s.ports) == normalized_ports(&want.ports)
            };
            let chosen = existing
                .iter()
                .filter(same_shape)
                .find(|s| s.endpoints == want.endpoints)
                .or_else(|| existing.iter().find(same_shape))
                .cloned();
            match chosen {
                Some(slice) => {
                    used.insert(slice.name_any());
                    let owner_ok = slice
                        .metadata
                        .owner_references
                        .as_ref()
                        .is_some_and(|refs| {
                            refs.iter()
                                .any(|r| Some(&r.uid) == service.metadata.uid.as_ref())
                        });
                    let labels_ok = labels.iter().all(|(k, v)| slice.labels().get(k) == Some(v));
                    if slice.endpoints != want.endpoints || !owner_ok || !labels_ok {
                        let mut updated = (*slice).clone();
                        updated.endpoints = want.endpoints.clone();
                        updated.ports = want.ports.clone();
                        updated.metadata.labels = Some(labels.clone());
                        updated.metadata.owner_references =
                            Some(vec![controller_reference(service)]);
                        let written = api
                            .replace(&slice.name_any(), &PostParams::default(), &updated)
                            .await
                            .with_context(|| {
                                format!("update endpointslice {}", slice.name_any())
                            })?;
                        writes.push((written.name_any(), resource_version_of(&written)));
                    }
                }
                None => to_create.push(want),
            }
        }
        for want in to_create {
            let slice = EndpointSlice {
                metadata: ObjectMeta {
                    generate_name: Some(format!("{name}-")),
                    namespace: Some(namespace.clone()),
                    labels: Some(labels.clone()),
                    owner_references: Some(vec![controller_reference(service)]),
                    ..ObjectMeta::default()
                },
                address_type: want.address_type.clone(),
                endpoints: want.endpoints.clone(),
                ports: want.ports.clone(),
            };
            let written = api
                .create(&PostParams::default(), &slice)
                .await
                .with_context(|| format!("create endpointslice for service {namespace}/{name}"))?;
            writes.push((written.name_any(), resource_version_of(&written)));
        }
        for slice in existing.iter().filter(|s| !used.contains(&s.name_any())) {
            match api
                .delete(&slice.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => writes.push((slice.name_any(), None)),
                Err(error) if is_not_found(&error) => {}
                Err(error) => {
                    return Err(error)
                        .context(format!("delete endpointslice {}", slice.name_any()));
                }
            }
        }
        if !writes.is_empty() {
            self.pending_writes
                .lock()
                .expect("pending lock")
                .insert(key.to_string(), (Instant::now(), writes));
        }
        Ok(())
    }

    /// Writes the legacy Endpoints; asks to be called again when the cache is behind.
    async fn sync_endpoints(
        &self,
        service: &Service,
        pods: &[Arc<Pod>],
    ) -> anyhow::Result<Option<Duration>> {
        let namespace = service.namespace().unwrap_or_default();
        let name = service.name_any();
        let subsets = endpoints_subsets(service, pods);
        let api: Api<Endpoints> = Api::namespaced(self.client.clone(), &namespace);
        let wanted_subsets = (!subsets.is_empty()).then_some(subsets);
        match self.endpoints.get(Some(&namespace), &name) {
            Some(current) => {
                let labels_ok = service
                    .labels()
                    .iter()
                    .all(|(k, v)| current.labels().get(k) == Some(v));
                if current.subsets == wanted_subsets && labels_ok {
                    return Ok(None);
                }
                let mut updated = (*current).clone();
                updated.subsets = wanted_subsets;
                let mut labels = current.labels().clone();
                labels.extend(service.labels().clone());
                updated.metadata.labels = Some(labels);
                api.replace(&name, &PostParams::default(), &updated)
                    .await
                    .with_context(|| format!("update endpoints {namespace}/{name}"))?;
            }
            None => {
                let endpoints = Endpoints {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        labels: Some(service.labels().clone()),
                        ..ObjectMeta::default()
                    },
                    subsets: wanted_subsets,
                };
                match api.create(&PostParams::default(), &endpoints).await {
                    Ok(_) => {}
                    // The cache is behind our own earlier write: look again shortly.
                    Err(kube::Error::Api(response)) if response.code == 409 => {
                        return Ok(Some(Duration::from_millis(500)));
                    }
                    Err(error) => {
                        return Err(error).context(format!("create endpoints {namespace}/{name}"));
                    }
                }
            }
        }
        Ok(None)
    }

    async fn delete_endpoints(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        if self.endpoints.get(Some(namespace), name).is_none() {
            return Ok(());
        }
        let api: Api<Endpoints> = Api::namespaced(self.client.clone(), namespace);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            Err(error) => Err(error).context(format!("delete endpoints {namespace}/{name}")),
        }
    }
}

fn resource_version_of<K: kube::Resource>(object: &K) -> Option<u64> {
    object
        .meta()
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
}

/// A Service's selector, if it has a non-empty one.
fn selector_of(service: &Service) -> Option<&BTreeMap<String, String>> {
    service
        .spec
        .as_ref()?
        .selector
        .as_ref()
        .filter(|selector| !selector.is_empty())
}

/// Ports compare as sets: order within a slice does not matter.
fn normalized_ports(
    ports: &Option<Vec<EndpointPort>>,
) -> Vec<(Option<String>, Option<i32>, Option<String>)> {
    let mut ports: Vec<_> = ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone(), p.port, p.protocol.clone()))
        .collect();
    ports.sort();
    ports
}

/// Whether a pod's address belongs in the Service's endpoints at all (upstream's
/// ShouldPodBeInEndpoints): it has an IP and has not finished.
fn pod_has_endpoint(pod: &Pod) -> Option<&str> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    status.pod_ip.as_deref().filter(|ip| !ip.is_empty())
}

/// Resolves a Service port's targetPort against a pod: a number is itself, a name is the
/// matching container port's number (None if the pod has no such port).
pub fn resolve_target_port(
    target: Option<&IntOrString>,
    port: i32,
    protocol: &str,
    pod: &Pod,
) -> Option<i32> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(0)) => Some(port),
        Some(IntOrString::Int(number)) => Some(*number),
        Some(IntOrString::String(name)) => {
            let spec = pod.spec.as_ref()?;
            spec.containers.iter().find_map(|container| {
                container.ports.as_ref()?.iter().find_map(|p| {
                    let p_protocol = p.protocol.as_deref().unwrap_or("TCP");
                    (p.name.as_deref() == Some(name.as_str()) && p_protocol == protocol)
                        .then_some(p.container_port)
                })
            })
        }
    }
}

/// The resolved ports of a Service for one pod, in the Service's order.
fn ports_for_pod(service: &Service, pod: &Pod) -> Vec<EndpointPort> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|port| {
            let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
            let number = resolve_target_port(port.target_port.as_ref(), port.port, &protocol, pod)?;
            Some(EndpointPort {
                name: Some(port.name.clone().unwrap_or_default()),
                port: Some(number),
                protocol: Some(protocol),
                app_protocol: port.app_protocol.clone(),
            })
        })
        .collect()
}

/// One slice to be.
#[derive(Debug, PartialEq)]
pub struct DesiredSlice {
    pub address_type: String,
    pub ports: Option<Vec<EndpointPort>>,
    pub endpoints: Vec<Endpoint>,
}

/// The slices a Service should have: endpoints grouped by address type and resolved port
/// set, sorted by pod name, cut into slices of at most [`MAX_ENDPOINTS_PER_SLICE`]. A
/// Service without endpoints keeps one empty slice, as upstream does.
pub fn desired_slices(service: &Service, pods: &[Arc<Pod>]) -> Vec<DesiredSlice> {
    let publish_not_ready = service
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut groups = SliceGroups::new();
    for pod in pods {
        let Some(ip) = pod_has_endpoint(pod) else {
            continue;
        };
        let address_type = if ip.contains(':') { "IPv6" } else { "IPv4" };
        let ports = ports_for_pod(service, pod);
        let serving = pod_is_ready(pod);
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let endpoint = Endpoint {
            addresses: vec![ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(publish_not_ready || (serving && !terminating)),
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: pod.namespace(),
                name: Some(pod.name_any()),
                uid: pod.metadata.uid.clone(),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        };
        let ports_key =
            serde_json::to_string(&normalized_ports(&Some(ports.clone()))).unwrap_or_default();
        groups
            .entry((address_type.to_string(), ports_key))
            .or_insert_with(|| (ports, Vec::new()))
            .1
            .push((pod.name_any(), endpoint));
    }
    let mut slices = Vec::new();
    for ((address_type, _), (ports, mut endpoints)) in groups {
        endpoints.sort_by(|a, b| a.0.cmp(&b.0));
        let endpoints: Vec<Endpoint> = endpoints.into_iter().map(|(_, e)| e).collect();
        for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
            slices.push(DesiredSlice {
                address_type: address_type.clone(),
                ports: Some(ports.clone()),
                endpoints: chunk.to_vec(),
            });
        }
    }
    if slices.is_empty() {
        slices.push(DesiredSlice {
            address_type: "IPv4".into(),
            ports: None,
            endpoints: Vec::new(),
        });
    }
    slices
}

/// The legacy Endpoints subsets: ready addresses and not-ready ones per resolved port set.
/// Terminating pods are left out unless the Service publishes not-ready addresses.
pub fn endpoints_subsets(service: &Service, pods: &[Arc<Pod>]) -> Vec<EndpointSubset> {
    let publish_not_ready = service
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut groups = SubsetGroups::new();
    for pod in pods {
        let Some(ip) = pod_has_endpoint(pod) else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() && !publish_not_ready {
            continue;
        }
        let ports: Vec<CoreEndpointPort> = ports_for_pod(service, pod)
            .into_iter()
            .map(|p| CoreEndpointPort {
                name: p.name.filter(|n| !n.is_empty()),
                port: p.port.unwrap_or_default(),
                protocol: p.protocol,
                app_protocol: p.app_protocol,
            })
            .collect();
        let address = EndpointAddress {
            ip: ip.to_string(),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: pod.namespace(),
                name: Some(pod.name_any()),
                uid: pod.metadata.uid.clone(),
                ..ObjectReference::default()
            }),
            ..EndpointAddress::default()
        };
        let key = serde_json::to_string(&ports).unwrap_or_default();
        let group = groups
            .entry(key)
            .or_insert_with(|| (ports, Vec::new(), Vec::new()));
        if publish_not_ready || pod_is_ready(pod) {
            group.1.push(address);
        } else {
            group.2.push(address);
        }
    }
    groups
        .into_values()
        .map(|(ports, mut ready, mut not_ready)| {
            ready.sort_by(|a, b| a.ip.cmp(&b.ip));
            not_ready.sort_by(|a, b| a.ip.cmp(&b.ip));
            EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: (!ports.is_empty()).then_some(ports),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::pod::{Container, PodCondition, PodSpec, PodStatus};
    use k8s_openapi::api::core::v1::{ContainerPort, ServicePort, ServiceSpec};

    fn pod(name: &str, ip: &str, ready: bool, port_name: &str, port: i32) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some(port_name.into()),
                        container_port: port,
                        ..ContainerPort::default()
                    }]),
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                phase: Some("Running".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        })
    }

    fn service() -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([("app".into(), "web".into())])),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::String("web".into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    #[test]
    fn named_ports_resolve_per_pod_and_split_slices() {
        let pods = vec![
            pod("a", "10.0.0.1", true, "web", 8080),
            pod("b", "10.0.0.2", false, "web", 8080),
            pod("c", "10.0.0.3", true, "web", 9090),
            pod("d", "10.0.0.4", true, "other", 7070),
        ];
        let slices = desired_slices(&service(), &pods);
        // 8080 (a, b), 9090 (c), and d with no resolvable port.
        assert_eq!(slices.len(), 3);
        let with_8080 = slices
            .iter()
            .find(|s| s.ports.as_ref().unwrap().first().and_then(|p| p.port) == Some(8080))
            .unwrap();
        assert_eq!(with_8080.endpoints.len(), 2);
        assert_eq!(
            with_8080.endpoints[0].conditions.as_ref().unwrap().ready,
            Some(true)
        );
        assert_eq!(
            with_8080.endpoints[1].conditions.as_ref().unwrap().ready,
            Some(false)
        );
        assert_eq!(
            with_8080.endpoints[1].conditions.as_ref().unwrap().serving,
            Some(false)
        );
        let subsets = endpoints_subsets(&service(), &pods);
        let subset = subsets
            .iter()
            .find(|s| s.ports.as_ref().is_some_and(|p| p[0].port == 8080))
            .unwrap();
        assert_eq!(subset.addresses.as_ref().unwrap().len(), 1);
        assert_eq!(subset.not_ready_addresses.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn slices_hold_at_most_a_hundred_endpoints() {
        let pods: Vec<_> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i:03}"),
                    &format!("10.0.{}.{}", i / 200, i % 200 + 1),
                    true,
                    "web",
                    8080,
                )
            })
            .collect();
        let slices = desired_slices(&service(), &pods);
        let sizes: Vec<_> = slices.iter().map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
    }

    #[test]
    fn terminating_pods_serve_but_are_not_ready() {
        let mut terminating = (*pod("t", "10.0.0.9", true, "web", 8080)).clone();
        terminating.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        );
        let slices = desired_slices(&service(), &[Arc::new(terminating.clone())]);
        let conditions = slices[0].endpoints[0].conditions.clone().unwrap();
        assert_eq!(
            (conditions.ready, conditions.serving, conditions.terminating),
            (Some(false), Some(true), Some(true))
        );
        assert!(endpoints_subsets(&service(), &[Arc::new(terminating)]).is_empty());
        assert_eq!(
            desired_slices(&service(), &[]).len(),
            1,
            "an empty slice stays"
        );
    }
}
