//! What this node's datapath should hold for one Service: its frontends (ClusterIPs,
//! NodePorts on the node's addresses, externalIPs, LoadBalancer ingress IPs) for each
//! TCP/UDP port, each with the backends kube-proxy would pick for it. Pure: no I/O.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// A frontend's transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number the maps use.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => skiff_ebpf::lb::IPPROTO_TCP,
            Proto::Udp => skiff_ebpf::lb::IPPROTO_UDP,
        }
    }
}

/// Who reaches a frontend: this node and its pods (socket hooks) or clients outside the
/// node (tc). NodePorts and external IPs have both, with different backend sets when the
/// external traffic policy is Local.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Internal,
    External,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Scope::Internal => skiff_ebpf::lb::SCOPE_INTERNAL,
            Scope::External => skiff_ebpf::lb::SCOPE_EXTERNAL,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// The identity of a frontend in the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub scope: Scope,
}

/// The Service port a frontend belongs to (`namespace/name:port_name`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortRef {
    pub namespace: String,
    pub name: String,
    /// The Service port's name, empty for a single unnamed port.
    pub port_name: String,
}

/// One backend of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub address: Ipv4Addr,
    pub port: u16,
    /// Serving but terminating: chosen only because no ready endpoint exists.
    pub terminating: bool,
    /// The endpoint's nodeName is this node.
    pub local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    pub kind: FrontendKind,
    pub service: ServicePortRef,
    /// `sessionAffinity: ClientIP` with its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// A traffic policy restricted the backends to this node.
    pub local_only: bool,
    /// Sorted by address and port, no duplicates; empty when the Service has no usable
    /// endpoint (connections are then refused, as kube-proxy's REJECT does).
    pub backends: Vec<Backend>,
}

/// What the desired state depends on besides the Service and its slices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub node_name: String,
    /// The node's own IPv4 addresses that NodePorts listen on.
    pub node_addresses: Vec<Ipv4Addr>,
}

/// The label that ties an EndpointSlice to the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The `sessionAffinityConfig.clientIP.timeoutSeconds` the API defaults to: three hours.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

impl Proto {
    /// The protocol of a Service or EndpointSlice port. An unset protocol is TCP, as the API
    /// defaults it; SCTP and anything unknown have no frontend here.
    fn from_api(protocol: Option<&str>) -> Option<Proto> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// The Service a slice belongs to, from its kubernetes.io/service-name label.
pub fn slice_service_name(slice: &EndpointSlice) -> Option<&str> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    // kube-proxy ignores a slice whose label is empty just as one without the label.
    (!name.is_empty()).then_some(name.as_str())
}

/// The frontends this node serves for `service`, from the EndpointSlices that belong to it
/// (the caller passes the slices labelled kubernetes.io/service-name=<name> in its namespace).
///
/// The result is sorted by key and holds each key once.
pub fn service_frontends(
    service: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
) -> Vec<Frontend> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    // kube-proxy's ShouldSkipService: ExternalName Services are DNS only, headless ones have
    // no virtual IP; an IPv6-only Service is the other family's business.
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let cluster_ips = cluster_ipv4s(spec);
    if cluster_ips.is_empty() {
        return Vec::new();
    }
    let Some(service_ports) = spec.ports.as_deref() else {
        return Vec::new();
    };

    // NodePorts exist only on these types; a stale nodePort on another type is not served.
    let has_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let external_ips: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|address| parse_ipv4(address))
        .collect();
    let load_balancer_ips = load_balancer_ipv4s(service);
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_policy_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout = affinity_timeout(spec);
    let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
    let name = service.metadata.name.as_deref().unwrap_or_default();

    let mut frontends = Vec::new();
    for service_port in service_ports {
        let Some(proto) = Proto::from_api(service_port.protocol.as_deref()) else {
            continue;
        };
        let Some(port) = valid_port(service_port.port) else {
            continue;
        };
        let node_port = service_port
            .node_port
            .filter(|_| has_node_ports)
            .and_then(valid_port);
        let externally_accessible =
            node_port.is_some() || !external_ips.is_empty() || !load_balancer_ips.is_empty();

        let candidates = port_candidates(service_port, proto, slices, &node.node_name);
        let cluster_backends = choose_backends(&candidates, |_| true);
        let uses_local = internal_policy_local || (external_policy_local && externally_accessible);
        let local_backends = if uses_local {
            choose_backends(&candidates, |candidate| candidate.local)
        } else {
            Vec::new()
        };

        let service_ref = ServicePortRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port_name: service_port.name.clone().unwrap_or_default(),
        };
        let mut add = |address: Ipv4Addr, port: u16, scope, kind, local_only: bool| {
            let backends = if local_only {
                &local_backends
            } else {
                &cluster_backends
            };
            frontends.push(Frontend {
                key: FrontendKey {
                    address,
                    port,
                    proto,
                    scope,
                },
                kind,
                service: service_ref.clone(),
                affinity_timeout,
                local_only,
                backends: backends.clone(),
            });
        };

        for &address in &cluster_ips {
            add(
                address,
                port,
                Scope::Internal,
                FrontendKind::ClusterIp,
                internal_policy_local,
            );
        }
        let node_port_frontends = node_port.into_iter().flat_map(|node_port| {
            node.node_addresses
                .iter()
                .map(move |&address| (address, node_port, FrontendKind::NodePort))
        });
        let external_ip_frontends = external_ips
            .iter()
            .map(|&address| (address, port, FrontendKind::ExternalIp));
        let load_balancer_frontends = load_balancer_ips
            .iter()
            .map(|&address| (address, port, FrontendKind::LoadBalancer));
        for (address, frontend_port, kind) in node_port_frontends
            .chain(external_ip_frontends)
            .chain(load_balancer_frontends)
        {
            // Traffic from this node or its pods to an external destination is short-circuited
            // to the cluster-wide endpoints, as kube-proxy does: it simulates going out to the
            // load balancer and coming back in, so no traffic policy applies to it.
            add(address, frontend_port, Scope::Internal, kind, false);
            add(
                address,
                frontend_port,
                Scope::External,
                kind,
                external_policy_local,
            );
        }
    }

    // The same key can come twice from one Service (an externalIP that is also its
    // LoadBalancer ingress IP, a node address listed twice); the maps hold a key once, so the
    // first kind in `FrontendKind` order wins, which keeps the result independent of input
    // order.
    frontends.sort_unstable_by_key(|frontend| (frontend.key, frontend.kind));
    frontends.dedup_by_key(|frontend| frontend.key);
    frontends
}

/// The IPv4 cluster IPs of a Service, empty when it is headless or IPv6-only.
fn cluster_ipv4s(spec: &ServiceSpec) -> Vec<Ipv4Addr> {
    let cluster_ips = spec.cluster_ips.as_deref().unwrap_or_default();
    let headless = spec.cluster_ip.as_deref() == Some("None")
        || cluster_ips.iter().any(|address| address == "None");
    if headless {
        return Vec::new();
    }
    // `clusterIP` is `clusterIPs[0]` when both are set; objects written before dual-stack
    // may carry only `clusterIP`.
    if cluster_ips.is_empty() {
        return spec
            .cluster_ip
            .as_deref()
            .and_then(parse_ipv4)
            .into_iter()
            .collect();
    }
    cluster_ips
        .iter()
        .filter_map(|address| parse_ipv4(address))
        .collect()
}

/// The IPv4 ingress IPs of a LoadBalancer Service's status. An ingress in `ipMode: Proxy`
/// is skipped, as kube-proxy does: the load balancer rewrites the destination to the node
/// itself, so capturing its IP here would short-circuit the load balancer's own processing.
fn load_balancer_ipv4s(service: &Service) -> Vec<Ipv4Addr> {
    let ingresses = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_deref())
        .unwrap_or_default();
    ingresses
        .iter()
        .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|ingress| parse_ipv4(ingress.ip.as_deref()?))
        .collect()
}

/// `sessionAffinity: ClientIP`'s timeout, None without affinity.
fn affinity_timeout(spec: &ServiceSpec) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let seconds = spec
        .session_affinity_config
        .as_ref()
        .and_then(|config| config.client_ip.as_ref())
        .and_then(|client_ip| client_ip.timeout_seconds)
        .and_then(|seconds| u32::try_from(seconds).ok())
        .filter(|&seconds| seconds > 0)
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
    Some(seconds)
}

/// One endpoint address of one Service port, with what decides whether it is chosen.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    address: Ipv4Addr,
    port: u16,
    ready: bool,
    serving_terminating: bool,
    local: bool,
}

/// Every IPv4 endpoint address the slices give for `service_port`, duplicates included.
fn port_candidates(
    service_port: &ServicePort,
    proto: Proto,
    slices: &[&EndpointSlice],
    node_name: &str,
) -> Vec<Candidate> {
    let port_name = service_port.name.as_deref().unwrap_or_default();
    let mut candidates = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        // A slice port belongs to the Service port of the same name and protocol; its number
        // is the target port resolved for the endpoints of this slice.
        let backend_port = slice
            .ports
            .iter()
            .flatten()
            .find(|slice_port| {
                slice_port.name.as_deref().unwrap_or_default() == port_name
                    && Proto::from_api(slice_port.protocol.as_deref()) == Some(proto)
            })
            .and_then(|slice_port| slice_port.port)
            .and_then(valid_port);
        let Some(backend_port) = backend_port else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            // The API says an unset serving condition defers to ready.
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let local = !node_name.is_empty() && endpoint.node_name.as_deref() == Some(node_name);
            let addresses = endpoint
                .addresses
                .iter()
                .filter_map(|address| parse_ipv4(address));
            candidates.extend(addresses.map(|address| Candidate {
                address,
                port: backend_port,
                ready,
                serving_terminating: serving && terminating,
                local,
            }));
        }
    }
    candidates
}

/// kube-proxy's choice among the candidates that pass `eligible`: the ready ones, or the
/// serving and terminating ones when none is ready (CategorizeEndpoints in
/// pkg/proxy/topology.go). Sorted, each address and port once.
fn choose_backends(
    candidates: &[Candidate],
    eligible: impl Fn(&Candidate) -> bool,
) -> Vec<Backend> {
    let any_ready = candidates
        .iter()
        .any(|candidate| candidate.ready && eligible(candidate));
    let mut backends: Vec<Backend> = candidates
        .iter()
        .filter(|candidate| {
            let usable = if any_ready {
                candidate.ready
            } else {
                candidate.serving_terminating
            };
            usable && eligible(candidate)
        })
        .map(|candidate| Backend {
            address: candidate.address,
            port: candidate.port,
            terminating: !any_ready,
            local: candidate.local,
        })
        .collect();
    backends.sort_unstable();
    // An endpoint shows up in two slices while the controller moves it between them. Keep
    // it once; if the copies disagree about the node, prefer local as kube-proxy does.
    backends.dedup_by(|later, kept| {
        let same = later.address == kept.address && later.port == kept.port;
        if same {
            kept.local |= later.local;
        }
        same
    });
    backends
}

/// A port number from the API, None when it is 0 or out of range.
fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&port| port != 0)
}

/// An IPv4 address from the API; IPv6 and malformed strings are None.
fn parse_ipv4(address: &str) -> Option<Ipv4Addr> {
    address.parse().ok()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const NODE: &str = "node-a";

    fn node() -> NodeContext {
        NodeContext {
            node_name: NODE.to_owned(),
            node_addresses: vec![ip("192.168.0.10"), ip("10.10.0.10")],
        }
    }

    fn ip(address: &str) -> Ipv4Addr {
        address.parse().unwrap()
    }

    /// Service `shop/web` with this spec and an empty status.
    fn service(spec: Value) -> Service {
        service_with_status(spec, json!({}))
    }

    fn service_with_status(spec: Value, status: Value) -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "namespace": "shop", "name": "web" },
            "spec": spec,
            "status": status,
        }))
        .expect("valid Service")
    }

    /// An IPv4 EndpointSlice of `shop/web`; `fields` adds or overrides top-level fields
    /// (`ports`, `endpoints`, `addressType`).
    fn slice(name: &str, fields: Value) -> EndpointSlice {
        let mut object = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "shop",
                "name": name,
                "labels": { SERVICE_NAME_LABEL: "web" },
            },
            "addressType": "IPv4",
            "endpoints": [],
        });
        let Value::Object(fields) = fields else {
            panic!("slice fields must be an object");
        };
        object.as_object_mut().unwrap().extend(fields);
        serde_json::from_value(object).expect("valid EndpointSlice")
    }

    /// A one-port Service spec: `http` 80/TCP on cluster IP 10.96.0.10.
    fn http_spec() -> Value {
        json!({
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }],
        })
    }

    /// `http_spec` with more fields.
    fn http_spec_with(fields: Value) -> Value {
        let mut spec = http_spec();
        let Value::Object(fields) = fields else {
            panic!("spec fields must be an object");
        };
        spec.as_object_mut().unwrap().extend(fields);
        spec
    }

    /// A slice for `http_spec` with the port `http` 8080/TCP.
    fn http_slice(name: &str, endpoints: Value) -> EndpointSlice {
        slice(
            name,
            json!({
                "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
                "endpoints": endpoints,
            }),
        )
    }

    fn ready(address: &str, node: &str) -> Value {
        json!({ "addresses": [address], "nodeName": node, "conditions": { "ready": true } })
    }

    fn backend(address: &str, port: u16, local: bool) -> Backend {
        Backend {
            address: ip(address),
            port,
            terminating: false,
            local,
        }
    }

    fn terminating_backend(address: &str, port: u16, local: bool) -> Backend {
        Backend {
            terminating: true,
            ..backend(address, port, local)
        }
    }

    fn frontends(service: &Service, slices: &[EndpointSlice]) -> Vec<Frontend> {
        let slices: Vec<&EndpointSlice> = slices.iter().collect();
        service_frontends(service, &slices, &node())
    }

    fn of_kind(frontends: &[Frontend], kind: FrontendKind) -> Vec<&Frontend> {
        frontends.iter().filter(|f| f.kind == kind).collect()
    }

    fn keys(frontends: &[&Frontend]) -> Vec<(Ipv4Addr, u16, Scope)> {
        frontends
            .iter()
            .map(|f| (f.key.address, f.key.port, f.key.scope))
            .collect()
    }

    fn frontend_at<'a>(
        frontends: &'a [Frontend],
        address: &str,
        port: u16,
        scope: Scope,
    ) -> &'a Frontend {
        frontends
            .iter()
            .find(|f| f.key.address == ip(address) && f.key.port == port && f.key.scope == scope)
            .unwrap_or_else(|| panic!("no frontend {address}:{port} {scope:?} in {frontends:#?}"))
    }

    #[test]
    fn cluster_ip_service_has_one_internal_frontend_per_port() {
        let service = service(http_spec());
        let slices = [http_slice(
            "web-1",
            json!([ready("10.0.2.7", "node-b"), ready("10.0.1.5", NODE)]),
        )];

        let frontends = frontends(&service, &slices);

        assert_eq!(
            frontends,
            vec![Frontend {
                key: FrontendKey {
                    address: ip("10.96.0.10"),
                    port: 80,
                    proto: Proto::Tcp,
                    scope: Scope::Internal,
                },
                kind: FrontendKind::ClusterIp,
                service: ServicePortRef {
                    namespace: "shop".to_owned(),
                    name: "web".to_owned(),
                    port_name: "http".to_owned(),
                },
                affinity_timeout: None,
                local_only: false,
                backends: vec![
                    backend("10.0.1.5", 8080, true),
                    backend("10.0.2.7", 8080, false),
                ],
            }]
        );
    }

    #[test]
    fn cluster_ips_are_the_ipv4_entries_with_cluster_ip_as_fallback() {
        let dual_stack = service(json!({
            "clusterIP": "fd00::10",
            "clusterIPs": ["fd00::10", "10.96.0.10"],
            "ports": [{ "port": 80 }],
        }));
        let legacy = service(json!({ "clusterIP": "10.96.0.11", "ports": [{ "port": 80 }] }));

        let dual_stack = frontends(&dual_stack, &[]);
        let legacy = frontends(&legacy, &[]);

        assert_eq!(
            keys(&dual_stack.iter().collect::<Vec<_>>()),
            vec![(ip("10.96.0.10"), 80, Scope::Internal)]
        );
        assert_eq!(
            keys(&legacy.iter().collect::<Vec<_>>()),
            vec![(ip("10.96.0.11"), 80, Scope::Internal)]
        );
        // An unnamed port has an empty port name and, unset, is TCP.
        assert_eq!(legacy[0].service.port_name, "");
        assert_eq!(legacy[0].key.proto, Proto::Tcp);
    }

    #[test]
    fn services_without_an_ipv4_virtual_ip_have_no_frontends() {
        let headless = service(json!({
            "clusterIP": "None",
            "clusterIPs": ["None"],
            "externalIPs": ["203.0.113.7"],
            "ports": [{ "port": 80 }],
        }));
        let external_name = service(json!({
            "type": "ExternalName",
            "externalName": "db.example.com",
            "clusterIP": "10.96.0.12",
            "ports": [{ "port": 80 }],
        }));
        let ipv6_only = service(json!({
            "clusterIP": "fd00::10",
            "clusterIPs": ["fd00::10"],
            "externalIPs": ["203.0.113.7"],
            "ports": [{ "port": 80 }],
        }));
        let no_spec: Service = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "namespace": "shop", "name": "web" },
        }))
        .unwrap();
        let slices = [http_slice("web-1", json!([ready("10.0.1.5", NODE)]))];

        for service in [headless, external_name, ipv6_only, no_spec] {
            assert_eq!(frontends(&service, &slices), vec![], "{service:?}");
        }
    }

    #[test]
    fn node_port_is_served_on_every_node_address_in_both_scopes() {
        let service = service(http_spec_with(json!({
            "type": "NodePort",
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        })));
        let slices = [http_slice("web-1", json!([ready("10.0.2.7", "node-b")]))];

        let frontends = frontends(&service, &slices);

        assert_eq!(
            keys(&of_kind(&frontends, FrontendKind::ClusterIp)),
            vec![(ip("10.96.0.10"), 80, Scope::Internal)]
        );
        assert_eq!(
            keys(&of_kind(&frontends, FrontendKind::NodePort)),
            vec![
                (ip("10.10.0.10"), 30080, Scope::Internal),
                (ip("10.10.0.10"), 30080, Scope::External),
                (ip("192.168.0.10"), 30080, Scope::Internal),
                (ip("192.168.0.10"), 30080, Scope::External),
            ]
        );
        for frontend in &frontends {
            assert_eq!(frontend.backends, vec![backend("10.0.2.7", 8080, false)]);
            assert!(!frontend.local_only);
        }
    }

    #[test]
    fn node_ports_only_for_node_port_and_load_balancer_types() {
        // A nodePort left behind on a ClusterIP Service, and a LoadBalancer without one.
        let cluster_ip = service(http_spec_with(json!({
            "type": "ClusterIP",
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        })));
        let load_balancer = service(http_spec_with(json!({
            "type": "LoadBalancer",
            "allocateLoadBalancerNodePorts": false,
        })));
        let load_balancer_with_node_port = service(http_spec_with(json!({
            "type": "LoadBalancer",
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        })));

        for service in [cluster_ip, load_balancer] {
            let frontends = frontends(&service, &[]);
            assert!(
                of_kind(&frontends, FrontendKind::NodePort).is_empty(),
                "{frontends:#?}"
            );
        }
        let frontends = frontends(&load_balancer_with_node_port, &[]);
        assert_eq!(of_kind(&frontends, FrontendKind::NodePort).len(), 4);
    }

    #[test]
    fn external_ips_are_served_in_both_scopes() {
        let service = service(http_spec_with(json!({
            "externalIPs": ["203.0.113.7", "2001:db8::7", "203.0.113.300"],
        })));
        let slices = [http_slice("web-1", json!([ready("10.0.2.7", "node-b")]))];

        let frontends = frontends(&service, &slices);

        let external = of_kind(&frontends, FrontendKind::ExternalIp);
        assert_eq!(
            keys(&external),
            vec![
                (ip("203.0.113.7"), 80, Scope::Internal),
                (ip("203.0.113.7"), 80, Scope::External),
            ]
        );
        for frontend in external {
            assert_eq!(frontend.backends, vec![backend("10.0.2.7", 8080, false)]);
            assert!(!frontend.local_only);
        }
        assert_eq!(of_kind(&frontends, FrontendKind::ClusterIp).len(), 1);
    }

    #[test]
    fn load_balancer_ingress_ips_are_served_in_both_scopes() {
        let service = service_with_status(
            http_spec_with(json!({
                "type": "LoadBalancer",
                "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
            })),
            json!({ "loadBalancer": { "ingress": [
                { "ip": "198.51.100.9", "ipMode": "VIP" },
                { "hostname": "web.lb.example.com" },
                // The load balancer rewrites the destination itself; kube-proxy skips it.
                { "ip": "198.51.100.10", "ipMode": "Proxy" },
                { "ip": "2001:db8::9" },
                { "ip": "198.51.100.11" },
            ] } }),
        );
        let slices = [http_slice("web-1", json!([ready("10.0.2.7", "node-b")]))];

        let frontends = frontends(&service, &slices);

        let load_balancer = of_kind(&frontends, FrontendKind::LoadBalancer);
        assert_eq!(
            keys(&load_balancer),
            vec![
                (ip("198.51.100.9"), 80, Scope::Internal),
                (ip("198.51.100.9"), 80, Scope::External),
                (ip("198.51.100.11"), 80, Scope::Internal),
                (ip("198.51.100.11"), 80, Scope::External),
            ]
        );
        for frontend in load_balancer {
            assert_eq!(frontend.backends, vec![backend("10.0.2.7", 8080, false)]);
        }
        assert_eq!(of_kind(&frontends, FrontendKind::NodePort).len(), 4);
        assert_eq!(frontends.len(), 1 + 4 + 4);
    }

    #[test]
    fn service_ports_take_the_slice_port_of_the_same_name() {
        let service = service(json!({
            "clusterIP": "10.96.0.10",
            "ports": [
                { "name": "http", "port": 80, "targetPort": "web" },
                { "name": "metrics", "port": 9090, "targetPort": 9100 },
            ],
        }));
        let slices = [slice(
            "web-1",
            json!({
                "ports": [
                    { "name": "metrics", "port": 9100, "protocol": "TCP" },
                    { "name": "http", "port": 8080, "protocol": "TCP" },
                ],
                "endpoints": [ready("10.0.1.5", NODE)],
            }),
        )];

        let frontends = frontends(&service, &slices);

        let http = frontend_at(&frontends, "10.96.0.10", 80, Scope::Internal);
        assert_eq!(http.service.port_name, "http");
        assert_eq!(http.backends, vec![backend("10.0.1.5", 8080, true)]);
        let metrics = frontend_at(&frontends, "10.96.0.10", 9090, Scope::Internal);
        assert_eq!(metrics.service.port_name, "metrics");
        assert_eq!(metrics.backends, vec![backend("10.0.1.5", 9100, true)]);
    }

    #[test]
    fn unnamed_service_port_takes_unnamed_and_empty_named_slice_ports() {
        let service = service(json!({ "clusterIP": "10.96.0.10", "ports": [{ "port": 80 }] }));
        // Different slices may resolve a named targetPort to different numbers.
        let slices = [
            slice(
                "web-1",
                json!({ "ports": [{ "port": 8080 }], "endpoints": [ready("10.0.1.5", NODE)] }),
            ),
            slice(
                "web-2",
                json!({
                    "ports": [{ "name": "", "port": 8081, "protocol": "TCP" }],
                    "endpoints": [ready("10.0.2.7", "node-b")],
                }),
            ),
            slice(
                "web-3",
                json!({
                    "ports": [{ "name": "other", "port": 8082 }],
                    "endpoints": [ready("10.0.3.9", "node-c")],
                }),
            ),
        ];

        let frontends = frontends(&service, &slices);

        assert_eq!(
            frontend_at(&frontends, "10.96.0.10", 80, Scope::Internal).backends,
            vec![
                backend("10.0.1.5", 8080, true),
                backend("10.0.2.7", 8081, false),
            ]
        );
    }

    #[test]
    fn udp_ports_match_udp_slice_ports_only() {
        let service = service(json!({
            "clusterIP": "10.96.0.53",
            "ports": [
                { "name": "dns", "port": 53, "protocol": "UDP" },
                { "name": "dns-tcp", "port": 53, "protocol": "TCP" },
                { "name": "mismatch", "port": 54, "protocol": "UDP" },
            ],
        }));
        let slices = [slice(
            "dns-1",
            json!({
                "ports": [
                    { "name": "dns", "port": 5353, "protocol": "UDP" },
                    { "name": "dns-tcp", "port": 5354, "protocol": "TCP" },
                    { "name": "mismatch", "port": 5355, "protocol": "TCP" },
                ],
                "endpoints": [ready("10.0.1.5", NODE)],
            }),
        )];

        let frontends = frontends(&service, &slices);

        let summary: Vec<_> = frontends
            .iter()
            .map(|f| (f.key.port, f.key.proto, f.backends.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (53, Proto::Tcp, vec![backend("10.0.1.5", 5354, true)]),
                (53, Proto::Udp, vec![backend("10.0.1.5", 5353, true)]),
                (54, Proto::Udp, vec![]),
            ]
        );
    }

    #[test]
    fn sctp_ports_are_skipped() {
        let service = service(json!({
            "clusterIP": "10.96.0.10",
            "type": "NodePort",
            "externalIPs": ["203.0.113.7"],
            "ports": [
                { "name": "sctp", "port": 3868, "protocol": "SCTP", "nodePort": 30868 },
                { "name": "http", "port": 80, "nodePort": 30080 },
            ],
        }));
        let slices = [slice(
            "web-1",
            json!({
                "ports": [
                    { "name": "sctp", "port": 3868, "protocol": "SCTP" },
                    { "name": "http", "port": 8080 },
                ],
                "endpoints": [ready("10.0.1.5", NODE)],
            }),
        )];

        let frontends = frontends(&service, &slices);

        assert!(frontends.iter().all(|f| f.service.port_name == "http"));
        assert_eq!(frontends.len(), 1 + 4 + 2);
    }

    #[test]
    fn not_ready_endpoints_are_excluded() {
        let service = service(http_spec());
        let slices = [http_slice(
            "web-1",
            json!([
                { "addresses": ["10.0.1.5"], "nodeName": NODE, "conditions": { "ready": false } },
                // No conditions at all: ready.
                { "addresses": ["10.0.2.7"], "nodeName": "node-b" },
                { "addresses": ["10.0.2.8"], "nodeName": "node-b", "conditions": {} },
                { "addresses": ["10.0.2.9"], "nodeName": "node-b",
                  "conditions": { "ready": false, "serving": false } },
            ]),
        )];

        let frontends = frontends(&service, &slices);

        assert_eq!(
            frontends[0].backends,
            vec![
                backend("10.0.2.7", 8080, false),
                backend("10.0.2.8", 8080, false),
            ]
        );
    }

    #[test]
    fn terminating_endpoints_are_used_only_when_none_is_ready() {
        let serving_terminating = |address: &str| {
            json!({ "addresses": [address], "nodeName": "node-b",
                    "conditions": { "ready": false, "serving": true, "terminating": true } })
        };
        let endpoints = json!([
            serving_terminating("10.0.2.7"),
            // Terminating but no longer serving.
            { "addresses": ["10.0.2.8"], "nodeName": "node-b",
              "conditions": { "ready": false, "serving": false, "terminating": true } },
            // Serving unset defers to ready, which is false.
            { "addresses": ["10.0.2.9"], "nodeName": "node-b",
              "conditions": { "ready": false, "terminating": true } },
            // Serving but not terminating: merely not ready.
            { "addresses": ["10.0.2.10"], "nodeName": "node-b",
              "conditions": { "ready": false, "serving": true } },
        ]);
        let service = service(http_spec());

        let all_terminating = frontends(&service, &[http_slice("web-1", endpoints.clone())]);
        let mut with_ready = endpoints;
        with_ready
            .as_array_mut()
            .unwrap()
            .push(ready("10.0.1.5", NODE));
        let with_ready = frontends(&service, &[http_slice("web-1", with_ready)]);

        assert_eq!(
            all_terminating[0].backends,
            vec![terminating_backend("10.0.2.7", 8080, false)]
        );
        assert_eq!(
            with_ready[0].backends,
            vec![backend("10.0.1.5", 8080, true)]
        );
    }

    #[test]
    fn internal_traffic_policy_local_keeps_cluster_ips_on_this_node() {
        let service = service(http_spec_with(json!({
            "type": "NodePort",
            "internalTrafficPolicy": "Local",
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        })));
        let slices = [http_slice(
            "web-1",
            json!([ready("10.0.1.5", NODE), ready("10.0.2.7", "node-b")]),
        )];

        let frontends = frontends(&service, &slices);

        let cluster_ip = frontend_at(&frontends, "10.96.0.10", 80, Scope::Internal);
        assert!(cluster_ip.local_only);
        assert_eq!(cluster_ip.backends, vec![backend("10.0.1.5", 8080, true)]);
        // The internal policy is about ClusterIPs only; NodePorts follow the external one.
        let all = vec![
            backend("10.0.1.5", 8080, true),
            backend("10.0.2.7", 8080, false),
        ];
        for frontend in of_kind(&frontends, FrontendKind::NodePort) {
            assert!(!frontend.local_only);
            assert_eq!(frontend.backends, all);
        }
    }

    #[test]
    fn local_policy_falls_back_to_local_terminating_endpoints() {
        let service = service(http_spec_with(json!({ "internalTrafficPolicy": "Local" })));
        let slices = [http_slice(
            "web-1",
            json!([
                { "addresses": ["10.0.1.5"], "nodeName": NODE,
                  "conditions": { "ready": false, "serving": true, "terminating": true } },
                ready("10.0.2.7", "node-b"),
            ]),
        )];

        let frontends = frontends(&service, &slices);

        assert_eq!(
            frontends[0].backends,
            vec![terminating_backend("10.0.1.5", 8080, true)]
        );
    }

    #[test]
    fn local_policy_without_local_endpoints_has_no_backends() {
        let service = service(http_spec_with(json!({ "internalTrafficPolicy": "Local" })));
        let slices = [http_slice("web-1", json!([ready("10.0.2.7", "node-b")]))];

        let frontends = frontends(&service, &slices);

        assert!(frontends[0].local_only);
        assert_eq!(frontends[0].backends, vec![]);
    }

    #[test]
    fn external_traffic_policy_local_restricts_the_external_scope_only() {
        let service = service_with_status(
            http_spec_with(json!({
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Local",
                "externalIPs": ["203.0.113.7"],
                "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
            })),
            json!({ "loadBalancer": { "ingress": [{ "ip": "198.51.100.9" }] } }),
        );
        let slices = [http_slice(
            "web-1",
            json!([ready("10.0.1.5", NODE), ready("10.0.2.7", "node-b")]),
        )];

        let frontends = frontends(&service, &slices);

        let all = vec![
            backend("10.0.1.5", 8080, true),
            backend("10.0.2.7", 8080, false),
        ];
        let local = vec![backend("10.0.1.5", 8080, true)];
        assert_eq!(frontends.len(), 1 + 4 + 2 + 2);
        for frontend in &frontends {
            match (frontend.kind, frontend.key.scope) {
                (FrontendKind::ClusterIp, _) | (_, Scope::Internal) => {
                    assert!(!frontend.local_only, "{frontend:?}");
                    assert_eq!(frontend.backends, all, "{frontend:?}");
                }
                (_, Scope::External) => {
                    assert!(frontend.local_only, "{frontend:?}");
                    assert_eq!(frontend.backends, local, "{frontend:?}");
                }
            }
        }
    }

    #[test]
    fn external_traffic_policy_local_without_local_endpoints_drops_external_traffic_only() {
        let service = service(http_spec_with(json!({
            "type": "NodePort",
            "externalTrafficPolicy": "Local",
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        })));
        let slices = [http_slice("web-1", json!([ready("10.0.2.7", "node-b")]))];

        let frontends = frontends(&service, &slices);

        let external = frontend_at(&frontends, "192.168.0.10", 30080, Scope::External);
        assert!(external.local_only);
        assert_eq!(external.backends, vec![]);
        let internal = frontend_at(&frontends, "192.168.0.10", 30080, Scope::Internal);
        assert_eq!(internal.backends, vec![backend("10.0.2.7", 8080, false)]);
    }

    #[test]
    fn client_ip_affinity_defaults_to_three_hours() {
        let default = service(http_spec_with(json!({ "sessionAffinity": "ClientIP" })));
        let explicit = service(http_spec_with(json!({
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 60 } },
        })));
        let none = service(http_spec_with(json!({
            "sessionAffinity": "None",
            "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 60 } },
        })));

        assert_eq!(frontends(&default, &[])[0].affinity_timeout, Some(10_800));
        assert_eq!(frontends(&explicit, &[])[0].affinity_timeout, Some(60));
        assert_eq!(frontends(&none, &[])[0].affinity_timeout, None);
    }

    #[test]
    fn client_ip_affinity_applies_to_every_frontend() {
        let service = service(http_spec_with(json!({
            "type": "NodePort",
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 300 } },
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        })));

        let frontends = frontends(&service, &[]);

        assert_eq!(frontends.len(), 5);
        assert!(frontends.iter().all(|f| f.affinity_timeout == Some(300)));
    }

    #[test]
    fn endpoints_in_several_slices_are_backends_once() {
        let service = service(http_spec());
        // The controller moving an endpoint between slices briefly lists it in both, and
        // the copies may disagree on readiness.
        let slices = [
            http_slice(
                "web-1",
                json!([ready("10.0.2.7", "node-b"), ready("10.0.1.5", NODE)]),
            ),
            http_slice(
                "web-2",
                json!([
                    ready("10.0.2.7", "node-b"),
                    { "addresses": ["10.0.1.5"], "nodeName": NODE, "conditions": { "ready": false } },
                    ready("10.0.3.9", "node-c"),
                ]),
            ),
        ];

        let frontends = frontends(&service, &slices);

        assert_eq!(
            frontends[0].backends,
            vec![
                backend("10.0.1.5", 8080, true),
                backend("10.0.2.7", 8080, false),
                backend("10.0.3.9", 8080, false),
            ]
        );
    }

    #[test]
    fn copies_that_disagree_about_the_node_count_as_local() {
        let service = service(http_spec());
        let slices = [
            http_slice("web-1", json!([ready("10.0.1.5", NODE)])),
            http_slice("web-2", json!([ready("10.0.1.5", "node-b")])),
        ];

        for order in [[&slices[0], &slices[1]], [&slices[1], &slices[0]]] {
            let frontends = service_frontends(&service, &order, &node());
            assert_eq!(frontends[0].backends, vec![backend("10.0.1.5", 8080, true)]);
        }
    }

    #[test]
    fn slices_of_other_address_types_are_ignored() {
        let service = service(http_spec());
        let ipv6 = slice(
            "web-v6",
            json!({
                "addressType": "IPv6",
                "ports": [{ "name": "http", "port": 8080 }],
                // A mislabelled IPv4 address in an IPv6 slice is not taken either.
                "endpoints": [ready("fd00::5", NODE), ready("10.0.9.9", NODE)],
            }),
        );
        let fqdn = slice(
            "web-fqdn",
            json!({
                "addressType": "FQDN",
                "ports": [{ "name": "http", "port": 8080 }],
                "endpoints": [ready("web.example.com", NODE)],
            }),
        );
        let ipv4 = http_slice("web-v4", json!([ready("10.0.1.5", NODE)]));

        let frontends = frontends(&service, &[ipv6, fqdn, ipv4]);

        assert_eq!(frontends[0].backends, vec![backend("10.0.1.5", 8080, true)]);
    }

    #[test]
    fn every_ipv4_address_of_an_endpoint_is_a_backend() {
        let service = service(http_spec());
        let slices = [http_slice(
            "web-1",
            json!([{ "addresses": ["10.0.1.6", "10.0.1.5"], "nodeName": NODE }]),
        )];

        let frontends = frontends(&service, &slices);

        assert_eq!(
            frontends[0].backends,
            vec![
                backend("10.0.1.5", 8080, true),
                backend("10.0.1.6", 8080, true),
            ]
        );
    }

    #[test]
    fn malformed_addresses_and_ports_are_skipped() {
        let bad_cluster_ip = service(json!({
            "clusterIP": "10.96.0.300",
            "clusterIPs": ["10.96.0.300"],
            "ports": [{ "port": 80 }],
        }));
        assert_eq!(frontends(&bad_cluster_ip, &[]), vec![]);

        let service = service(json!({
            "clusterIP": "10.96.0.10",
            "type": "NodePort",
            "ports": [
                { "name": "http", "port": 80, "nodePort": 70000 },
                { "name": "zero", "port": 0 },
                { "name": "huge", "port": 65536 },
            ],
        }));
        let slices = [
            http_slice(
                "web-1",
                json!([
                    { "addresses": ["10.0.1.999", "", "web-0", "10.0.1.5/32", " 10.0.1.7", "10.0.1.5"] },
                    { "addresses": [] },
                ]),
            ),
            // A slice port without a number, or out of range, gives no backends.
            slice(
                "web-2",
                json!({ "ports": [{ "name": "http" }], "endpoints": [ready("10.0.2.7", "node-b")] }),
            ),
            slice(
                "web-3",
                json!({
                    "ports": [{ "name": "http", "port": -1 }],
                    "endpoints": [ready("10.0.2.8", "node-b")],
                }),
            ),
        ];

        let frontends = frontends(&service, &slices);

        assert_eq!(
            keys(&frontends.iter().collect::<Vec<_>>()),
            vec![(ip("10.96.0.10"), 80, Scope::Internal)]
        );
        assert_eq!(
            frontends[0].backends,
            vec![backend("10.0.1.5", 8080, false)]
        );
    }

    #[test]
    fn nothing_is_local_on_a_node_without_a_name() {
        let service = service(http_spec());
        let slices = [http_slice(
            "web-1",
            json!([{ "addresses": ["10.0.1.5"], "nodeName": "" }]),
        )];
        let node = NodeContext::default();

        let frontends = service_frontends(&service, &[&slices[0]], &node);

        assert_eq!(
            frontends[0].backends,
            vec![backend("10.0.1.5", 8080, false)]
        );
    }

    #[test]
    fn frontends_are_sorted_by_key_and_unique() {
        // The externalIP is also the ingress IP, and a node address is listed twice.
        let service = service_with_status(
            json!({
                "type": "LoadBalancer",
                "clusterIPs": ["10.96.0.10"],
                "externalIPs": ["198.51.100.9"],
                "ports": [
                    { "name": "https", "port": 443, "nodePort": 30443 },
                    { "name": "http", "port": 80, "nodePort": 30080 },
                ],
            }),
            json!({ "loadBalancer": { "ingress": [{ "ip": "198.51.100.9" }] } }),
        );
        let node = NodeContext {
            node_name: NODE.to_owned(),
            node_addresses: vec![ip("192.168.0.10"), ip("192.168.0.10")],
        };

        let frontends = service_frontends(&service, &[], &node);

        let mut sorted_keys: Vec<FrontendKey> = frontends.iter().map(|f| f.key).collect();
        sorted_keys.sort();
        sorted_keys.dedup();
        assert_eq!(
            frontends.iter().map(|f| f.key).collect::<Vec<_>>(),
            sorted_keys
        );
        // Two ports: one ClusterIP, two NodePort scopes, two external IP scopes each.
        assert_eq!(frontends.len(), 2 * (1 + 2 + 2));
        let shared = frontend_at(&frontends, "198.51.100.9", 443, Scope::External);
        assert_eq!(shared.kind, FrontendKind::ExternalIp);
    }

    #[test]
    fn result_does_not_depend_on_slice_order() {
        let service = service(http_spec_with(json!({
            "type": "NodePort",
            "externalTrafficPolicy": "Local",
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        })));
        let first = http_slice(
            "web-1",
            json!([ready("10.0.2.7", "node-b"), ready("10.0.1.5", NODE)]),
        );
        let second = http_slice(
            "web-2",
            json!([ready("10.0.3.9", "node-c"), ready("10.0.1.5", NODE)]),
        );

        assert_eq!(
            service_frontends(&service, &[&first, &second], &node()),
            service_frontends(&service, &[&second, &first], &node()),
        );
    }

    #[test]
    fn slice_service_name_reads_the_label() {
        let labelled = http_slice("web-1", json!([]));
        let mut unlabelled = labelled.clone();
        unlabelled.metadata.labels = None;
        let mut empty = labelled.clone();
        empty
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(SERVICE_NAME_LABEL.to_owned(), String::new());

        assert_eq!(slice_service_name(&labelled), Some("web"));
        assert_eq!(slice_service_name(&unlabelled), None);
        assert_eq!(slice_service_name(&empty), None);
    }
}
