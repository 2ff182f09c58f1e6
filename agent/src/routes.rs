//! Host-gw routes between nodes: for every other Node, a route to its podCIDR via its
//! InternalIP in the node's network namespace, kept in step with the Nodes by a
//! level-triggered reconciler.
//!
//! The reconciler watches Nodes into a reflector store. Once the store holds a complete
//! list, and after every change or resync tick, it computes the routes the Nodes ask for
//! ([`desired_routes`]), lists the routes it made earlier from the kernel, and applies the
//! difference ([`plan`], [`reconcile`]). The kernel side sits behind the [`RouteTable`]
//! seam: [`Routes`] talks rtnetlink, the unit tests below use a fake.
//!
//! **Architecture invariant:** routes the agent makes carry the route protocol
//! [`ROUTE_PROTOCOL`] (193, printed as `proto 193` by `ip route`); that is how the
//! reconciler recognises its own routes, and it never changes or removes a route of any
//! other protocol. A route to this node's own podCIDR is never made.
//!
//! **Architecture invariant:** no tokio worker thread changes network namespace. A netlink
//! socket belongs to the namespace it was created in, so [`Routes::in_namespace`] creates
//! its socket on a short-lived thread that entered the namespace, and every request then
//! runs on the runtime.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector;
use kube::runtime::watcher::{self, Event};
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};

/// The route protocol (`rtm_protocol`) of every route the agent makes. 193 (0xc1) is not
/// assigned in the kernel's `rtnetlink.h` nor in iproute2's `rt_protos`, so no routing
/// daemon on the node uses it.
pub const ROUTE_PROTOCOL: u8 = 0xc1;

/// How often the reconciler compares the kernel's routes with the Nodes even when no Node
/// changed: this repairs routes someone removed by hand and retries failed adds.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);

/// How the route reconciler is configured.
#[derive(Debug, Clone)]
pub struct RoutesConfig {
    /// This node's name: its own Node gets no route.
    pub node_name: String,
    /// Pod CIDRs of this node known outside its Node object (the agent's `--pod-cidr`);
    /// never routed to another node, even when some Node claims them.
    pub own_pod_cidrs: Vec<String>,
    /// Period of the full comparison with the kernel ([`DEFAULT_RESYNC`]).
    pub resync: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("open a netlink socket: not inside a tokio runtime")]
    NoRuntime,
    #[error("open network namespace {path}: {error}")]
    OpenNamespace { path: PathBuf, error: io::Error },
    #[error("enter network namespace {path}: {error}")]
    EnterNamespace {
        path: PathBuf,
        error: nix::errno::Errno,
    },
    #[error("spawn the netlink socket thread: {0}")]
    Thread(io::Error),
    #[error("open a netlink socket in {place}: {error}")]
    Socket { place: String, error: io::Error },
    #[error("build route to {dst}: {reason}")]
    BuildRoute { dst: PodCidr, reason: String },
    #[error("{what}: {error}")]
    Kernel { what: String, error: io::Error },
}

impl RoutesError {
    /// The errno the kernel answered with, when that is what the error is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RoutesError::Kernel { error, .. } => error.raw_os_error(),
            _ => None,
        }
    }
}

/// An IP prefix, held in canonical form (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodCidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl PodCidr {
    /// `addr/len` with the host bits cleared; `None` when `prefix_len` is too long.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<PodCidr> {
        let addr = match addr {
            IpAddr::V4(v4) if prefix_len <= 32 => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) if prefix_len <= 128 => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
            _ => return None,
        };
        Some(PodCidr { addr, prefix_len })
    }

    /// Parses `a.b.c.d/len` or `x::/len`, as a Node's podCIDR holds it.
    pub fn parse(text: &str) -> Option<PodCidr> {
        let (addr, len) = text.trim().split_once('/')?;
        PodCidr::new(addr.parse().ok()?, len.parse().ok()?)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
}

impl fmt::Display for PodCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A route a Node asks for: its podCIDR via its InternalIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRoute {
    pub node: String,
    pub dst: PodCidr,
    pub gateway: IpAddr,
}

/// A route found in the kernel with the agent's protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledRoute {
    pub dst: PodCidr,
    pub gateway: Option<IpAddr>,
}

/// The routes the Nodes ask for, keyed by destination, and why some Nodes get none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: BTreeMap<PodCidr, NodeRoute>,
    /// One sentence per podCIDR that is not routed for a reason worth a warning.
    pub problems: Vec<String>,
}

/// A Node's pod CIDRs: `spec.podCIDRs`, or `spec.podCIDR` when the list is empty.
fn node_pod_cidrs(node: &Node) -> Vec<&str> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    match &spec.pod_cidrs {
        Some(cidrs) if !cidrs.is_empty() => cidrs.iter().map(String::as_str).collect(),
        _ => spec.pod_cidr.as_deref().into_iter().collect(),
    }
}

/// A Node's InternalIP addresses that parse, in the order the Node lists them.
fn node_internal_ips(node: &Node) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|status| status.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|address| address.type_ == "InternalIP")
        .filter_map(|address| address.address.parse().ok())
        .collect()
}

/// The routes `nodes` ask for on the node `own_node`: each other Node's podCIDRs via its
/// first InternalIP of the same family. Never a route to a podCIDR of this node (its Node's
/// or one of `own_pod_cidrs`). When two Nodes claim one podCIDR, the first by name wins.
pub fn desired_routes(own_node: &str, own_pod_cidrs: &[PodCidr], nodes: &[Arc<Node>]) -> Desired {
    let mut nodes: Vec<&Node> = nodes.iter().map(Arc::as_ref).collect();
    let name = |node: &Node| node.metadata.name.clone().unwrap_or_default();
    nodes.sort_by_key(|node| name(node));
    let mut own: Vec<PodCidr> = own_pod_cidrs.to_vec();
    if let Some(node) = nodes.iter().find(|node| name(node) == own_node) {
        own.extend(node_pod_cidrs(node).into_iter().filter_map(PodCidr::parse));
    }

    let mut desired = Desired::default();
    for node in nodes {
        let node_name = name(node);
        if node_name == own_node {
            continue;
        }
        let ips = node_internal_ips(node);
        for text in node_pod_cidrs(node) {
            let Some(dst) = PodCidr::parse(text) else {
                desired.problems.push(format!(
                    "node {node_name}: podCIDR {text:?} is not a CIDR; not routed"
                ));
                continue;
            };
            if own.contains(&dst) {
                desired.problems.push(format!(
                    "node {node_name}: podCIDR {dst} belongs to this node; not routed"
                ));
                continue;
            }
            let Some(gateway) = ips
                .iter()
                .find(|ip| ip.is_ipv4() == dst.addr().is_ipv4())
                .copied()
            else {
                let family = if dst.addr().is_ipv4() { "IPv4" } else { "IPv6" };
                desired.problems.push(format!(
                    "node {node_name}: no {family} InternalIP for podCIDR {dst}; not routed"
                ));
                continue;
            };
            if let Some(first) = desired.routes.get(&dst) {
                desired.problems.push(format!(
                    "node {node_name}: podCIDR {dst} is also node {}'s; routed to {}",
                    first.node, first.node
                ));
                continue;
            }
            desired.routes.insert(
                dst,
                NodeRoute {
                    node: node_name.clone(),
                    dst,
                    gateway,
                },
            );
        }
    }
    desired
}

/// One kernel change the reconciler makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// No route of the agent's goes to the destination: add one (refused by the kernel when
    /// a route of another protocol already goes there, which is left alone).
    Add(NodeRoute),
    /// The agent's route to the destination has another gateway: replace it in place.
    Replace(NodeRoute),
    /// The agent's route serves no Node any more.
    Remove(InstalledRoute),
}

/// The changes that turn the agent's `installed` routes into `desired`: removals first, then
/// additions and replacements, each in destination order.
pub fn plan(desired: &BTreeMap<PodCidr, NodeRoute>, installed: &[InstalledRoute]) -> Vec<Change> {
    let mut by_dst: BTreeMap<PodCidr, Vec<&InstalledRoute>> = BTreeMap::new();
    for route in installed {
        by_dst.entry(route.dst).or_default().push(route);
    }
    let mut removals = Vec::new();
    let mut writes = Vec::new();
    for (dst, routes) in &by_dst {
        let Some(want) = desired.get(dst) else {
            removals.extend(routes.iter().map(|r| Change::Remove((*r).clone())));
            continue;
        };
        // Keep one route with the right gateway, or replace the first; drop duplicates
        // (routes of ours at one destination that differ only in metric).
        let keep = routes.iter().position(|r| r.gateway == Some(want.gateway));
        if keep.is_none() {
            writes.push(Change::Replace(want.clone()));
        }
        let keep = keep.unwrap_or(0);
        removals.extend(
            routes
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != keep)
                .map(|(_, r)| Change::Remove((*r).clone())),
        );
    }
    for (dst, want) in desired {
        if !by_dst.contains_key(dst) {
            writes.push(Change::Add(want.clone()));
        }
    }
    removals.extend(writes);
    removals
}

/// The kernel's routing table as the reconciler sees it: only routes with
/// [`ROUTE_PROTOCOL`] in the main table.
pub trait RouteTable: Send + Sync {
    /// The agent's routes (protocol [`ROUTE_PROTOCOL`], main table), both families.
    fn list(&self) -> impl Future<Output = Result<Vec<InstalledRoute>, RoutesError>> + Send;
    /// Adds `route` with the agent's protocol; with `replace`, replaces the route to the
    /// same destination in place (used only when that route is the agent's).
    fn add(
        &self,
        route: &NodeRoute,
        replace: bool,
    ) -> impl Future<Output = Result<(), RoutesError>> + Send;
    /// Removes one of the agent's routes; a route already gone is success.
    fn remove(
        &self,
        route: &InstalledRoute,
    ) -> impl Future<Output = Result<(), RoutesError>> + Send;
}

/// A change the kernel refused.
#[derive(Debug)]
pub struct Failure {
    pub change: Change,
    pub error: RoutesError,
}

/// What one reconcile did.
#[derive(Debug, Default)]
pub struct Report {
    pub applied: Vec<Change>,
    pub failed: Vec<Failure>,
}

/// Lists the agent's routes and applies the difference with `desired`. A refused change is
/// logged with its Node's name and reported in [`Report::failed`]; the others still apply.
/// Fails only when the routes cannot be listed.
pub async fn reconcile<T: RouteTable>(
    table: &T,
    desired: &BTreeMap<PodCidr, NodeRoute>,
) -> Result<Report, RoutesError> {
    let installed = table.list().await?;
    let mut report = Report::default();
    for change in plan(desired, &installed) {
        let result = match &change {
            Change::Add(route) => table.add(route, false).await,
            Change::Replace(route) => table.add(route, true).await,
            Change::Remove(route) => table.remove(route).await,
        };
        match (&change, result) {
            (Change::Add(route) | Change::Replace(route), Ok(())) => {
                tracing::info!(
                    node = %route.node, dst = %route.dst, gateway = %route.gateway,
                    "route to node's pods set"
                );
                report.applied.push(change);
            }
            (Change::Remove(route), Ok(())) => {
                tracing::info!(dst = %route.dst, "route to a gone node's pods removed");
                report.applied.push(change);
            }
            (Change::Add(route) | Change::Replace(route), Err(error)) => {
                let hint = match error.errno() {
                    Some(code) if code == nix::errno::Errno::EEXIST as i32 => {
                        "; a route the agent did not make already goes there"
                    }
                    Some(code) if code == nix::errno::Errno::ENETUNREACH as i32 => {
                        "; the gateway is not on a directly connected network"
                    }
                    _ => "",
                };
                tracing::warn!(
                    node = %route.node, dst = %route.dst, gateway = %route.gateway, error = %error,
                    "route to node's pods not set{hint}; retried on the next change or resync"
                );
                report.failed.push(Failure { change, error });
            }
            (Change::Remove(route), Err(error)) => {
                tracing::warn!(
                    dst = %route.dst, error = %error,
                    "stale route not removed; retried on the next change or resync"
                );
                report.failed.push(Failure { change, error });
            }
        }
    }
    Ok(report)
}

/// Watches Nodes and keeps the routes in `table` in step with them until the task is
/// dropped. Never fails: watch errors are retried with backoff, kernel errors are logged
/// and retried on the next change or resync.
pub async fn run<T: RouteTable>(client: kube::Client, table: T, config: RoutesConfig) {
    let nodes: kube::Api<Node> = kube::Api::all(client);
    let events = watcher::watcher(nodes, watcher::Config::default()).default_backoff();
    drive(events, table, config).await;
}

/// The reconcile loop over any stream of Node watch events (a real watcher in [`run`], a
/// channel in tests). Nothing is changed before the first complete list (`InitDone`), so
/// routes of Nodes not yet seen are never taken for stale. After a complete list and at
/// every resync tick the kernel is always compared; after a single Node event only when the
/// desired routes changed or the last reconcile left something undone.
pub async fn drive<S, T>(events: S, table: T, config: RoutesConfig)
where
    S: Stream<Item = watcher::Result<Event<Node>>>,
    T: RouteTable,
{
    let mut own = Vec::new();
    for text in &config.own_pod_cidrs {
        match PodCidr::parse(text) {
            Some(cidr) => own.push(cidr),
            None => tracing::warn!(cidr = %text, "own pod CIDR is not a CIDR; ignored"),
        }
    }
    let (reader, writer) = reflector::store::<Node>();
    let mut events = std::pin::pin!(reflector::reflector(writer, events));
    let mut resync = tokio::time::interval(config.resync.max(Duration::from_millis(10)));
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; nothing can be compared before the first list anyway.
    resync.tick().await;
    let mut listed = false;
    // The desired routes of the last reconcile that left nothing undone.
    let mut done: Option<BTreeMap<PodCidr, NodeRoute>> = None;
    let mut problems: Vec<String> = Vec::new();
    loop {
        let compare_kernel = tokio::select! {
            event = events.next() => match event {
                None => {
                    tracing::warn!("node watch ended; routes are no longer kept");
                    return;
                }
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "node watch");
                    continue;
                }
                Some(Ok(Event::Init | Event::InitApply(_))) => continue,
                Some(Ok(Event::InitDone)) => {
                    listed = true;
                    true
                }
                Some(Ok(Event::Apply(_) | Event::Delete(_))) => false,
            },
            _ = resync.tick() => true,
        };
        if !listed {
            continue;
        }
        let desired = desired_routes(&config.node_name, &own, &reader.state());
        if desired.problems != problems {
            for problem in desired.problems.iter().filter(|p| !problems.contains(p)) {
                tracing::warn!("{problem}");
            }
            problems = desired.problems;
        }
        if !compare_kernel && done.as_ref() == Some(&desired.routes) {
            continue;
        }
        done = match reconcile(&table, &desired.routes).await {
            Ok(report) if report.failed.is_empty() => Some(desired.routes),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(error = %error, "route reconcile; retried on the next change or resync");
                None
            }
        };
    }
}

/// The agent's routes in one network namespace, over rtnetlink.
pub struct Routes {
    handle: rtnetlink::Handle,
    /// The namespace, for messages.
    place: String,
}

impl Routes {
    /// Routes in the agent's own network namespace (the node's). Call inside a tokio
    /// runtime, which drives the netlink connection.
    pub fn host() -> Result<Routes, RoutesError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| RoutesError::NoRuntime)?;
        let place = "the agent's network namespace".to_string();
        let (connection, handle, _) = {
            let _entered = runtime.enter();
            rtnetlink::new_connection().map_err(|error| RoutesError::Socket {
                place: place.clone(),
                error,
            })?
        };
        runtime.spawn(connection);
        Ok(Routes { handle, place })
    }

    /// Routes in the network namespace at `netns` (a bind-mounted or `/proc/<pid>/ns/net`
    /// file). The socket is created on a short-lived thread that entered the namespace;
    /// it stays bound to that namespace. Call inside a tokio runtime.
    pub fn in_namespace(netns: &Path) -> Result<Routes, RoutesError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| RoutesError::NoRuntime)?;
        let file = File::open(netns).map_err(|error| RoutesError::OpenNamespace {
            path: netns.to_path_buf(),
            error,
        })?;
        let place = format!("network namespace {}", netns.display());
        let (connection, handle, _) = std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("routes-netns".into())
                .spawn_scoped(scope, || {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                        |error| RoutesError::EnterNamespace {
                            path: netns.to_path_buf(),
                            error,
                        },
                    )?;
                    let _entered = runtime.enter();
                    rtnetlink::new_connection().map_err(|error| RoutesError::Socket {
                        place: place.clone(),
                        error,
                    })
                })
                .map_err(RoutesError::Thread)?;
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        runtime.spawn(connection);
        Ok(Routes { handle, place })
    }

    fn kernel_error(&self, what: String, error: rtnetlink::Error) -> RoutesError {
        let error = match error {
            rtnetlink::Error::NetlinkError(message) => match message.code {
                Some(code) => io::Error::from_raw_os_error(-code.get()),
                None => io::Error::other(rtnetlink::Error::NetlinkError(message).to_string()),
            },
            other => io::Error::other(other.to_string()),
        };
        RoutesError::Kernel {
            what: format!("{what} in {}", self.place),
            error,
        }
    }
}

/// A route message to `dst` via `gateway` with the agent's protocol, in the main table.
fn route_message(dst: PodCidr, gateway: Option<IpAddr>) -> Result<RouteMessage, RoutesError> {
    fn invalid<E: fmt::Display>(dst: PodCidr) -> impl Fn(E) -> RoutesError {
        move |error| RoutesError::BuildRoute {
            dst,
            reason: error.to_string(),
        }
    }
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .map_err(invalid(dst))?
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
    if let Some(gateway) = gateway {
        builder = builder.gateway(gateway).map_err(invalid(dst))?;
    }
    Ok(builder.build())
}

fn route_address(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The route as the reconciler sees it, when it is one of the agent's in the main table.
fn installed_route(message: &RouteMessage) -> Option<InstalledRoute> {
    if u8::from(message.header.protocol) != ROUTE_PROTOCOL {
        return None;
    }
    let mut table = u32::from(message.header.table);
    let mut dst = None;
    let mut gateway = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(id) => table = *id,
            RouteAttribute::Destination(address) => dst = route_address(address),
            RouteAttribute::Gateway(address) => gateway = route_address(address),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let dst = match dst {
        Some(dst) => dst,
        None if message.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6 => {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        }
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    Some(InstalledRoute {
        dst: PodCidr::new(dst, message.header.destination_prefix_length)?,
        gateway,
    })
}

impl RouteTable for Routes {
    async fn list(&self) -> Result<Vec<InstalledRoute>, RoutesError> {
        let mut routes = Vec::new();
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let messages: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(|error| self.kernel_error("list routes".into(), error))?;
            routes.extend(messages.iter().filter_map(installed_route));
        }
        Ok(routes)
    }

    async fn add(&self, route: &NodeRoute, replace: bool) -> Result<(), RoutesError> {
        let message = route_message(route.dst, Some(route.gateway))?;
        let request = self.handle.route().add(message);
        let request = if replace { request.replace() } else { request };
        request.execute().await.map_err(|error| {
            let verb = if replace { "replace" } else { "add" };
            self.kernel_error(
                format!(
                    "{verb} route to {} via {} for node {}",
                    route.dst, route.gateway, route.node
                ),
                error,
            )
        })
    }

    async fn remove(&self, route: &InstalledRoute) -> Result<(), RoutesError> {
        // The protocol in the request makes the kernel delete only a route of the agent's.
        let message = route_message(route.dst, route.gateway)?;
        match self.handle.route().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(error) => {
                let error = self.kernel_error(format!("remove route to {}", route.dst), error);
                if error.errno() == Some(nix::errno::Errno::ESRCH as i32) {
                    Ok(())
                } else {
                    Err(error)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;

    fn cidr(text: &str) -> PodCidr {
        PodCidr::parse(text).unwrap_or_else(|| panic!("{text} is a CIDR"))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an IP address")
    }

    fn node(name: &str, pod_cidrs: &[&str], internal_ips: &[&str]) -> Node {
        let addresses: Vec<_> = internal_ips
            .iter()
            .map(|a| json!({"type": "InternalIP", "address": a}))
            .chain([json!({"type": "Hostname", "address": name})])
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs},
            "status": {"addresses": addresses},
        }))
        .expect("a Node")
    }

    fn nodes(list: Vec<Node>) -> Vec<Arc<Node>> {
        list.into_iter().map(Arc::new).collect()
    }

    fn route(node: &str, dst: &str, gateway: &str) -> NodeRoute {
        NodeRoute {
            node: node.into(),
            dst: cidr(dst),
            gateway: ip(gateway),
        }
    }

    fn installed(dst: &str, gateway: &str) -> InstalledRoute {
        InstalledRoute {
            dst: cidr(dst),
            gateway: Some(ip(gateway)),
        }
    }

    #[test]
    fn cidrs_parse_into_canonical_form() {
        assert_eq!(cidr("10.1.2.3/24").to_string(), "10.1.2.0/24");
        assert_eq!(cidr("10.1.2.0/32").to_string(), "10.1.2.0/32");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("fd00:1:2::7/64").to_string(), "fd00:1:2::/64");
        for bad in [
            "10.1.2.0",
            "10.1.2.0/33",
            "fd00::/129",
            "x/24",
            "10.1.2.0/-1",
            "",
        ] {
            assert_eq!(PodCidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_other_node_gets_a_route_via_its_internal_ip() {
        let desired = desired_routes(
            "a",
            &[],
            &nodes(vec![
                node("a", &["10.9.1.0/24"], &["192.0.2.1"]),
                node("b", &["10.9.2.0/24"], &["192.0.2.2"]),
                node(
                    "c",
                    &["10.9.3.0/24", "fd00:3::/64"],
                    &["fd00::3", "192.0.2.3"],
                ),
                // Not yet given a podCIDR: nothing to route, nothing to warn about.
                node("d", &[], &["192.0.2.4"]),
            ]),
        );
        let routes: Vec<_> = desired.routes.into_values().collect();
        assert_eq!(
            routes,
            vec![
                route("b", "10.9.2.0/24", "192.0.2.2"),
                route("c", "10.9.3.0/24", "192.0.2.3"),
                route("c", "fd00:3::/64", "fd00::3"),
            ]
        );
        assert_eq!(desired.problems, Vec::<String>::new());
    }

    #[test]
    fn pod_cidr_alone_counts_when_pod_cidrs_is_empty() {
        let b: Node = serde_json::from_value(json!({
            "metadata": {"name": "b"},
            "spec": {"podCIDR": "10.9.2.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.2"}]},
        }))
        .expect("a Node");
        let desired = desired_routes("a", &[], &nodes(vec![b]));
        assert_eq!(
            desired.routes.into_values().collect::<Vec<_>>(),
            vec![route("b", "10.9.2.0/24", "192.0.2.2")]
        );
    }

    #[test]
    fn own_cidrs_bad_cidrs_missing_addresses_and_conflicts_are_not_routed() {
        let desired = desired_routes(
            "a",
            &[cidr("10.9.100.0/24")],
            &nodes(vec![
                node("a", &["10.9.1.0/24"], &["192.0.2.1"]),
                node("b", &["10.9.1.0/24"], &["192.0.2.2"]),
                node("c", &["10.9.100.0/24"], &["192.0.2.3"]),
                node("d", &["not-a-cidr"], &["192.0.2.4"]),
                node("e", &["fd00:5::/64"], &["192.0.2.5"]),
                node("f", &["10.9.6.0/24"], &["192.0.2.6"]),
                node("g", &["10.9.6.0/24"], &["192.0.2.7"]),
                node("h", &["10.9.8.0/24"], &[]),
            ]),
        );
        assert_eq!(
            desired.routes.into_values().collect::<Vec<_>>(),
            vec![route("f", "10.9.6.0/24", "192.0.2.6")]
        );
        assert_eq!(
            desired.problems,
            vec![
                "node b: podCIDR 10.9.1.0/24 belongs to this node; not routed",
                "node c: podCIDR 10.9.100.0/24 belongs to this node; not routed",
                "node d: podCIDR \"not-a-cidr\" is not a CIDR; not routed",
                "node e: no IPv6 InternalIP for podCIDR fd00:5::/64; not routed",
                "node g: podCIDR 10.9.6.0/24 is also node f's; routed to f",
                "node h: no IPv4 InternalIP for podCIDR 10.9.8.0/24; not routed",
            ]
        );
    }

    #[test]
    fn plan_adds_replaces_and_removes_only_what_differs() {
        let desired: BTreeMap<_, _> = [
            route("b", "10.9.2.0/24", "192.0.2.2"),
            route("c", "10.9.3.0/24", "192.0.2.33"),
            route("d", "10.9.4.0/24", "192.0.2.4"),
        ]
        .into_iter()
        .map(|r| (r.dst, r))
        .collect();
        let changes = plan(
            &desired,
            &[
                installed("10.9.2.0/24", "192.0.2.2"),
                installed("10.9.3.0/24", "192.0.2.3"),
                installed("10.9.9.0/24", "192.0.2.9"),
            ],
        );
        assert_eq!(
            changes,
            vec![
                Change::Remove(installed("10.9.9.0/24", "192.0.2.9")),
                Change::Replace(route("c", "10.9.3.0/24", "192.0.2.33")),
                Change::Add(route("d", "10.9.4.0/24", "192.0.2.4")),
            ]
        );
        assert_eq!(plan(&desired, &[]).len(), 3);
        let all: Vec<_> = desired
            .values()
            .map(|r| InstalledRoute {
                dst: r.dst,
                gateway: Some(r.gateway),
            })
            .collect();
        assert_eq!(plan(&desired, &all), vec![]);
    }

    #[test]
    fn plan_drops_duplicates_of_one_destination() {
        let desired: BTreeMap<_, _> = [route("b", "10.9.2.0/24", "192.0.2.2")]
            .into_iter()
            .map(|r| (r.dst, r))
            .collect();
        let changes = plan(
            &desired,
            &[
                installed("10.9.2.0/24", "192.0.2.7"),
                installed("10.9.2.0/24", "192.0.2.2"),
            ],
        );
        assert_eq!(
            changes,
            vec![Change::Remove(installed("10.9.2.0/24", "192.0.2.7"))]
        );
    }

    /// A routing table in memory that refuses gateways it is told are unreachable, and
    /// counts the lists it answered.
    #[derive(Clone, Default)]
    struct FakeTable {
        state: Arc<Mutex<FakeState>>,
    }

    #[derive(Default)]
    struct FakeState {
        routes: Vec<InstalledRoute>,
        unreachable: BTreeSet<IpAddr>,
        lists: usize,
    }

    impl FakeTable {
        fn routes(&self) -> Vec<(String, String)> {
            let mut routes: Vec<_> = self
                .state
                .lock()
                .unwrap()
                .routes
                .iter()
                .map(|r| {
                    (
                        r.dst.to_string(),
                        r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    )
                })
                .collect();
            routes.sort();
            routes
        }

        fn lists(&self) -> usize {
            self.state.lock().unwrap().lists
        }

        fn set_unreachable(&self, gateway: &str, unreachable: bool) {
            let mut state = self.state.lock().unwrap();
            if unreachable {
                state.unreachable.insert(ip(gateway));
            } else {
                state.unreachable.remove(&ip(gateway));
            }
        }
    }

    impl RouteTable for FakeTable {
        async fn list(&self) -> Result<Vec<InstalledRoute>, RoutesError> {
            let mut state = self.state.lock().unwrap();
            state.lists += 1;
            Ok(state.routes.clone())
        }

        async fn add(&self, route: &NodeRoute, replace: bool) -> Result<(), RoutesError> {
            let mut state = self.state.lock().unwrap();
            if state.unreachable.contains(&route.gateway) {
                return Err(RoutesError::Kernel {
                    what: format!("add route to {}", route.dst),
                    error: io::Error::from_raw_os_error(nix::errno::Errno::ENETUNREACH as i32),
                });
            }
            let existing = state.routes.iter().position(|r| r.dst == route.dst);
            let new = InstalledRoute {
                dst: route.dst,
                gateway: Some(route.gateway),
            };
            match (existing, replace) {
                (Some(i), true) => state.routes[i] = new,
                (Some(_), false) => {
                    return Err(RoutesError::Kernel {
                        what: format!("add route to {}", route.dst),
                        error: io::Error::from_raw_os_error(nix::errno::Errno::EEXIST as i32),
                    });
                }
                (None, _) => state.routes.push(new),
            }
            Ok(())
        }

        async fn remove(&self, route: &InstalledRoute) -> Result<(), RoutesError> {
            self.state.lock().unwrap().routes.retain(|r| r != route);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_refused_add_is_reported_and_the_rest_still_applies() {
        let table = FakeTable::default();
        table.set_unreachable("203.0.113.3", true);
        let desired: BTreeMap<_, _> = [
            route("b", "10.9.2.0/24", "192.0.2.2"),
            route("c", "10.9.3.0/24", "203.0.113.3"),
        ]
        .into_iter()
        .map(|r| (r.dst, r))
        .collect();
        let report = reconcile(&table, &desired).await.expect("listed");
        assert_eq!(report.applied.len(), 1);
        assert_eq!(report.failed.len(), 1);
        assert_eq!(
            report.failed[0].change,
            Change::Add(route("c", "10.9.3.0/24", "203.0.113.3"))
        );
        assert_eq!(
            report.failed[0].error.errno(),
            Some(nix::errno::Errno::ENETUNREACH as i32)
        );
        assert_eq!(
            table.routes(),
            vec![("10.9.2.0/24".into(), "192.0.2.2".into())]
        );
    }

    type Events = futures::channel::mpsc::UnboundedSender<watcher::Result<Event<Node>>>;

    fn start(table: &FakeTable, resync: Duration) -> Events {
        let (sender, receiver) = futures::channel::mpsc::unbounded();
        let config = RoutesConfig {
            node_name: "a".into(),
            own_pod_cidrs: vec!["10.9.100.0/24".into()],
            resync,
        };
        tokio::spawn(drive(receiver, table.clone(), config));
        sender
    }

    fn send(events: &Events, event: Event<Node>) {
        events.unbounded_send(Ok(event)).expect("drive is running");
    }

    /// Gives the spawned loop time to handle what was sent. The agent's tokio has no
    /// `test-util` (paused time), so these tests run on real, short periods.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    type RouteList = Vec<(String, String)>;

    /// Waits up to 5 s for the fake's routes to become `expected`.
    async fn eventually(table: &FakeTable, expected: RouteList) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while table.routes() != expected {
            assert!(
                tokio::time::Instant::now() < deadline,
                "routes are {:?}, expected {expected:?}",
                table.routes()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn routes(list: &[(&str, &str)]) -> RouteList {
        list.iter()
            .map(|(dst, gateway)| (dst.to_string(), gateway.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn the_loop_follows_nodes_after_the_first_complete_list() {
        let table = FakeTable::default();
        // A stale route of the agent's, from a node that is gone.
        table
            .state
            .lock()
            .unwrap()
            .routes
            .push(installed("10.9.9.0/24", "192.0.2.9"));
        // A resync far away: everything below is driven by events alone.
        let events = start(&table, Duration::from_secs(3600));

        send(&events, Event::Init);
        send(
            &events,
            Event::InitApply(node("a", &["10.9.1.0/24"], &["192.0.2.1"])),
        );
        send(
            &events,
            Event::InitApply(node("b", &["10.9.2.0/24"], &["192.0.2.2"])),
        );
        settle().await;
        assert_eq!(
            table.lists(),
            0,
            "nothing is compared before the list is complete"
        );
        send(
            &events,
            Event::InitApply(node("c", &["10.9.3.0/24"], &["192.0.2.3"])),
        );
        send(&events, Event::InitDone);
        eventually(
            &table,
            routes(&[("10.9.2.0/24", "192.0.2.2"), ("10.9.3.0/24", "192.0.2.3")]),
        )
        .await;

        // A heartbeat that changes no route does not reach the kernel.
        settle().await;
        let lists = table.lists();
        send(
            &events,
            Event::Apply(node("b", &["10.9.2.0/24"], &["192.0.2.2"])),
        );
        settle().await;
        assert_eq!(table.lists(), lists);

        send(
            &events,
            Event::Apply(node("b", &["10.9.2.0/24"], &["192.0.2.22"])),
        );
        send(
            &events,
            Event::Delete(node("c", &["10.9.3.0/24"], &["192.0.2.3"])),
        );
        eventually(&table, routes(&[("10.9.2.0/24", "192.0.2.22")])).await;
    }

    #[tokio::test]
    async fn the_resync_repairs_and_retries() {
        let table = FakeTable::default();
        table.set_unreachable("203.0.113.3", true);
        let events = start(&table, Duration::from_millis(200));
        send(&events, Event::Init);
        send(
            &events,
            Event::InitApply(node("b", &["10.9.2.0/24"], &["192.0.2.2"])),
        );
        send(
            &events,
            Event::InitApply(node("c", &["10.9.3.0/24"], &["203.0.113.3"])),
        );
        send(&events, Event::InitDone);
        eventually(&table, routes(&[("10.9.2.0/24", "192.0.2.2")])).await;

        // The gateway becomes reachable (an address on the node's link, say) and someone
        // removes a route by hand; no Node changes.
        table.set_unreachable("203.0.113.3", false);
        table.state.lock().unwrap().routes.clear();
        eventually(
            &table,
            routes(&[("10.9.2.0/24", "192.0.2.2"), ("10.9.3.0/24", "203.0.113.3")]),
        )
        .await;
    }

    #[tokio::test]
    async fn watch_errors_do_not_stop_the_loop() {
        let table = FakeTable::default();
        let events = start(&table, Duration::from_secs(3600));
        events
            .unbounded_send(Err(watcher::Error::NoResourceVersion))
            .expect("drive is running");
        send(&events, Event::Init);
        send(
            &events,
            Event::InitApply(node("b", &["10.9.2.0/24"], &["192.0.2.2"])),
        );
        send(&events, Event::InitDone);
        eventually(&table, routes(&[("10.9.2.0/24", "192.0.2.2")])).await;
    }

    #[test]
    fn only_the_agents_routes_in_the_main_table_are_seen() {
        let ours = route_message(cidr("10.9.2.0/24"), Some(ip("192.0.2.2"))).expect("message");
        assert_eq!(
            installed_route(&ours),
            Some(installed("10.9.2.0/24", "192.0.2.2"))
        );
        let mut foreign = ours.clone();
        foreign.header.protocol = RouteProtocol::Boot;
        assert_eq!(installed_route(&foreign), None);
        let mut other_table = ours.clone();
        other_table.header.table = 100;
        assert_eq!(installed_route(&other_table), None);
        let v6 = route_message(cidr("fd00:2::/64"), Some(ip("fd00::2"))).expect("message");
        assert_eq!(
            installed_route(&v6),
            Some(InstalledRoute {
                dst: cidr("fd00:2::/64"),
                gateway: Some(ip("fd00::2")),
            })
        );
    }
}
