//! What this node's datapath should hold for one Service: its frontends (ClusterIPs,
//! NodePorts on the node's addresses, externalIPs, LoadBalancer ingress IPs) for each
//! TCP/UDP port, each with the backends kube-proxy would pick for it. Pure: no I/O.

use std::net::Ipv4Addr;

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
