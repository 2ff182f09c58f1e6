//! Everything that talks to the kernel's routing stack: the bridge, veth pairs, addresses
//! and routes through rtnetlink, and the pod's network namespace through a netlink socket
//! opened on a short-lived dedicated thread.
//!
//! **Architecture invariant:** the thread that runs the plugin (and its single-threaded
//! runtime) never changes network namespace. A netlink socket belongs to the namespace it
//! was created in, so a dedicated helper thread enters the pod's namespace only to create
//! the socket and then exits; every request afterwards runs on the main thread.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAttribute, RouteProtocol, RouteScope};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use crate::error::{CniError, CniResult, ErrorCode};
use crate::result::Route;

/// The plugin's netlink connections and the runtime that drives them.
pub struct Kernel {
    runtime: tokio::runtime::Runtime,
    pub host: Handle,
}

fn kernel_error(what: impl std::fmt::Display, err: impl std::fmt::Display) -> CniError {
    CniError::new(ErrorCode::Datapath, format!("{what}: {err}"))
}

/// The errno of a netlink NACK, if that is what the error is.
pub fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Kernel {
    pub fn new() -> CniResult<Kernel> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| kernel_error("start netlink runtime", e))?;
        let host = {
            let _entered = runtime.enter();
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(|e| kernel_error("open netlink socket", e))?;
            runtime.spawn(connection);
            handle
        };
        Ok(Kernel { runtime, host })
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// A netlink handle whose requests act inside the namespace `netns`.
    pub fn handle_in(&self, netns: &File, netns_path: &Path) -> CniResult<Handle> {
        self.start_handle_in(netns, netns_path)?.wait(self)
    }

    /// Starts opening a netlink socket inside `netns` on a helper thread and returns at
    /// once, so the caller can do host-side work meanwhile (thread hand-offs cost
    /// milliseconds on a loaded node). The helper sends the socket back and exits on its
    /// own; nobody waits for its exit.
    pub fn start_handle_in(&self, netns: &File, netns_path: &Path) -> CniResult<PendingHandle> {
        let runtime = self.runtime.handle().clone();
        let netns = netns
            .try_clone()
            .map_err(|e| kernel_error(format!("duplicate {}", netns_path.display()), e))?;
        let path = netns_path.display().to_string();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("netns-socket".into())
            .spawn(move || {
                let opened = nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| {
                        CniError::new(
                            ErrorCode::UnknownContainer,
                            format!("enter network namespace {path}: {e}"),
                        )
                    })
                    .and_then(|()| {
                        let _entered = runtime.enter();
                        rtnetlink::new_connection()
                            .map_err(|e| kernel_error(format!("open netlink socket in {path}"), e))
                    });
                let _ = tx.send(opened);
            })
            .map_err(|e| kernel_error("spawn namespace helper thread", e))?;
        Ok(PendingHandle { rx })
    }
}

type Opened = CniResult<(
    rtnetlink::proto::Connection<netlink_packet_route::RouteNetlinkMessage>,
    Handle,
    futures::channel::mpsc::UnboundedReceiver<(
        netlink_packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>,
        netlink_sys::SocketAddr,
    )>,
)>;

/// A pod-namespace handle being opened by the helper thread.
pub struct PendingHandle {
    rx: std::sync::mpsc::Receiver<Opened>,
}

impl PendingHandle {
    pub fn wait(self, kernel: &Kernel) -> CniResult<Handle> {
        let (connection, handle, _) = self
            .rx
            .recv()
            .map_err(|_| CniError::new(ErrorCode::Datapath, "namespace helper thread died"))??;
        kernel.runtime.spawn(connection);
        Ok(handle)
    }
}

/// Opens a namespace path; a missing one means the container is gone (code 3).
/// A file that is not a namespace (nsfs) is not a container either.
pub fn open_netns(path: &Path) -> CniResult<File> {
    let file = File::open(path).map_err(|e| {
        CniError::new(
            ErrorCode::UnknownContainer,
            format!("open network namespace {}: {e}", path.display()),
        )
    })?;
    let is_nsfs = nix::sys::statfs::fstatfs(&file)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC);
    if !is_nsfs {
        return Err(CniError::new(
            ErrorCode::UnknownContainer,
            format!(
                "enter network namespace {}: not a namespace file",
                path.display()
            ),
        ));
    }
    Ok(file)
}

pub fn random_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = rand::random();
    // Locally administered, unicast.
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What the plugin reads from a link message.
#[derive(Debug, Clone, Default)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
    pub kind: Option<InfoKind>,
    /// The bridge this link is a port of.
    pub controller: Option<u32>,
    /// For a veth: the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    pub alias: Option<String>,
}

pub fn link_facts(msg: &LinkMessage) -> LinkFacts {
    let mut facts = LinkFacts {
        index: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => facts.name = n.clone(),
            LinkAttribute::Address(a) => facts.mac = format_mac(a),
            LinkAttribute::Mtu(m) => facts.mtu = *m,
            LinkAttribute::Controller(c) => facts.controller = Some(*c),
            LinkAttribute::Link(l) => facts.peer_index = Some(*l),
            LinkAttribute::IfAlias(a) => facts.alias = Some(a.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        facts.kind = Some(kind.clone());
                    }
                }
            }
            _ => {}
        }
    }
    facts
}

/// Looks a link up by name; `None` when there is no such link.
pub async fn link_by_name(handle: &Handle, name: &str) -> CniResult<Option<LinkFacts>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(link_facts(&msg))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(kernel_error(format!("get link {name}"), e)),
    }
}

pub async fn link_by_index(handle: &Handle, index: u32) -> CniResult<Option<LinkFacts>> {
    let mut links = handle.link().get().match_index(index).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(link_facts(&msg))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(kernel_error(format!("get link {index}"), e)),
    }
}

/// Bridge settings from the network configuration.
pub struct BridgeSpec<'a> {
    pub name: &'a str,
    pub mtu: u32,
    pub promisc: bool,
}

/// Finds or creates the bridge and brings it up. Concurrent plugin runs may race to create
/// it; the loser finds the winner's bridge.
pub async fn ensure_bridge(handle: &Handle, spec: &BridgeSpec<'_>) -> CniResult<LinkFacts> {
    for _ in 0..3 {
        if let Some(facts) = link_by_name(handle, spec.name).await? {
            if facts.kind != Some(InfoKind::Bridge) {
                return Err(kernel_error(
                    format!("bridge {}", spec.name),
                    "a link of that name exists and is not a bridge",
                ));
            }
            if !facts.up {
                let msg = LinkUnspec::new_with_index(facts.index).up().build();
                handle
                    .link()
                    .change(msg)
                    .execute()
                    .await
                    .map_err(|e| kernel_error(format!("set bridge {} up", spec.name), e))?;
            }
            if spec.promisc {
                let msg = LinkUnspec::new_with_index(facts.index)
                    .promiscuous(true)
                    .build();
                handle
                    .link()
                    .change(msg)
                    .execute()
                    .await
                    .map_err(|e| kernel_error(format!("set bridge {} promisc", spec.name), e))?;
            }
            return Ok(facts);
        }
        // A fixed MAC keeps the bridge's address (and neighbours' ARP caches) stable as
        // ports come and go; by default a bridge takes its lowest port's MAC.
        let msg = LinkBridge::new(spec.name)
            .mtu(spec.mtu)
            .address(random_mac().to_vec())
            .promiscuous(spec.promisc)
            .append_info_data(InfoBridge::StpState(
                netlink_packet_route::link::BridgeStpState::Disabled,
            ))
            .up()
            .build();
        match handle.link().add(msg).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(kernel_error(format!("create bridge {}", spec.name), e)),
        }
    }
    Err(kernel_error(
        format!("bridge {}", spec.name),
        "created but not found",
    ))
}

/// Puts each gateway address on the bridge. An address of the same family in the same
/// subnet but different is an error unless `force` (then it is replaced).
pub async fn ensure_bridge_addresses(
    handle: &Handle,
    bridge: &LinkFacts,
    gateways: &[IpNet],
    force: bool,
) -> CniResult<()> {
    let existing: Vec<netlink_packet_route::address::AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(bridge.index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| kernel_error(format!("list addresses of {}", bridge.name), e))?;
    for gw in gateways {
        let mut present = false;
        for msg in &existing {
            let Some(addr) = address_of(msg) else {
                continue;
            };
            if addr == gw.addr() && msg.header.prefix_len == gw.prefix_len() {
                present = true;
            } else if gw.contains(&addr) {
                if !force {
                    return Err(kernel_error(
                        format!("bridge {}", bridge.name),
                        format!(
                            "already has address {addr}/{} in the subnet of gateway {gw}",
                            msg.header.prefix_len
                        ),
                    ));
                }
                handle
                    .address()
                    .del(msg.clone())
                    .execute()
                    .await
                    .map_err(|e| kernel_error(format!("remove {addr} from {}", bridge.name), e))?;
            }
        }
        if present {
            continue;
        }
        let mut request = handle
            .address()
            .add(bridge.index, gw.addr(), gw.prefix_len());
        if gw.addr().is_ipv6() {
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(kernel_error(format!("add {gw} to {}", bridge.name), e));
            }
        }
    }
    Ok(())
}

pub fn address_of(msg: &netlink_packet_route::address::AddressMessage) -> Option<IpAddr> {
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            _ => {}
        }
    }
    local.or(address)
}

/// The veth pair as created.
#[derive(Debug, Clone)]
pub struct VethPair {
    pub host_name: String,
    pub host_mac: String,
    pub pod_mac: String,
}

/// Why a veth pair was not created.
#[derive(Debug)]
pub enum VethError {
    /// EEXIST: the random host name or the pod's interface name is taken.
    NameTaken,
    Other(CniError),
}

/// Creates the veth pair in one request: the host end (a random `veth` name) as an up
/// port of the bridge, the pod end directly inside the pod's namespace (named `ifname`),
/// both with `mtu`. Creating the peer in place avoids a second RTNL-serialized move per pod
/// under bursts. (The kernel refuses to bring the peer up in the same request: ENOTCONN.)
pub async fn create_veth(
    handle: &Handle,
    bridge_index: u32,
    netns: &File,
    ifname: &str,
    mtu: u32,
    pod_mac: Option<[u8; 6]>,
) -> Result<VethPair, VethError> {
    let pod_mac = pod_mac.unwrap_or_else(random_mac);
    let host_name = format!("veth{:08x}", rand::random::<u32>());
    let host_mac = random_mac();
    let peer = LinkUnspec::new_with_name(ifname)
        .mtu(mtu)
        .address(pod_mac.to_vec())
        .setns_by_fd(netns.as_raw_fd())
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.clone())
        .mtu(mtu)
        .address(host_mac.to_vec())
        .controller(bridge_index)
        .up()
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    match handle.link().add(msg).execute().await {
        Ok(()) => Ok(VethPair {
            host_name,
            host_mac: format_mac(&host_mac),
            pod_mac: format_mac(&pod_mac),
        }),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Err(VethError::NameTaken),
        Err(e) => Err(VethError::Other(kernel_error(
            format!("create veth pair {host_name}/{ifname}"),
            e,
        ))),
    }
}

/// Sets the bridge port's hairpin mode and the link's alias in one request, addressing the
/// link by name. (The kernel ignores an alias in the creating request.)
pub async fn set_port_options(
    handle: &Handle,
    host_name: &str,
    hairpin: bool,
    alias: &str,
) -> CniResult<()> {
    let msg = LinkBridgePort::new(0)
        .name(host_name.to_owned())
        .hairpin(hairpin)
        .alias(alias.to_owned())
        .build();
    handle
        .link()
        .change(msg)
        .execute()
        .await
        .map_err(|e| kernel_error(format!("set port options of {host_name}"), e))
}

/// Deletes a link by name; a missing link is success (DEL is idempotent).
pub async fn delete_link(handle: &Handle, name: &str) -> CniResult<()> {
    // Addressed by name: one request, no lookup first.
    let msg = LinkUnspec::new_with_name(name).build();
    match handle.link().del_with_message(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(kernel_error(format!("delete link {name}"), e)),
    }
}

pub async fn delete_link_index(handle: &Handle, index: u32) -> CniResult<()> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(kernel_error(format!("delete link {index}"), e)),
    }
}

/// Puts the addresses on the pod's interface and installs the routes. A route without a
/// gateway goes via the first address's gateway of its family (as the reference plugins
/// do), or is on-link when there is none.
pub async fn configure_pod(
    handle: &Handle,
    pod_index: u32,
    addresses: &[(IpNet, Option<IpAddr>)],
    routes: &[Route],
) -> CniResult<()> {
    handle
        .link()
        .change(LinkUnspec::new_with_index(pod_index).up().build())
        .execute()
        .await
        .map_err(|e| kernel_error(format!("set link {pod_index} up in pod"), e))?;
    for (address, _) in addresses {
        let mut request = handle
            .address()
            .add(pod_index, address.addr(), address.prefix_len());
        if address.addr().is_ipv6() {
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        request
            .execute()
            .await
            .map_err(|e| kernel_error(format!("add address {address} in pod"), e))?;
    }
    for route in routes {
        let gw = route.gw.or_else(|| {
            addresses
                .iter()
                .filter_map(|(_, gw)| *gw)
                .find(|gw| gw.is_ipv4() == route.dst.addr().is_ipv4())
        });
        let msg = route_message(route.dst, gw, pod_index)?;
        match handle.route().add(msg).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(kernel_error(format!("add route {} in pod", route.dst), e));
            }
        }
    }
    Ok(())
}

pub fn route_message(
    dst: IpNet,
    gw: Option<IpAddr>,
    oif: u32,
) -> CniResult<netlink_packet_route::route::RouteMessage> {
    fn bad<E: std::fmt::Display>(dst: IpNet) -> impl Fn(E) -> CniError {
        move |e| kernel_error(format!("route {dst}"), e)
    }
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .map_err(bad(dst))?
        .output_interface(oif)
        .protocol(RouteProtocol::Boot);
    match gw {
        Some(gw) => builder = builder.gateway(gw).map_err(bad(dst))?,
        None => builder = builder.scope(RouteScope::Link),
    }
    Ok(builder.build())
}

/// Lists the routes of the main table in both families (CHECK).
pub async fn routes_of(handle: &Handle) -> CniResult<Vec<(IpNet, Option<IpAddr>, Option<u32>)>> {
    let mut out = Vec::new();
    for family in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let msgs: Vec<_> = handle
            .route()
            .get(family)
            .execute()
            .try_collect()
            .await
            .map_err(|e| kernel_error("list routes", e))?;
        for msg in msgs {
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Destination(a) => dst = route_addr(a),
                    RouteAttribute::Gateway(a) => gw = route_addr(a),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let v4 = msg.header.address_family == netlink_packet_route::AddressFamily::Inet;
            let dst = dst.unwrap_or(if v4 {
                IpAddr::from([0, 0, 0, 0])
            } else {
                IpAddr::from([0u16; 8])
            });
            if let Ok(net) = IpNet::new(dst, msg.header.destination_prefix_length) {
                out.push((net, gw, oif));
            }
        }
    }
    Ok(out)
}

fn route_addr(a: &netlink_packet_route::route::RouteAddress) -> Option<IpAddr> {
    use netlink_packet_route::route::RouteAddress;
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The addresses on a link (CHECK).
pub async fn addresses_of(handle: &Handle, index: u32) -> CniResult<Vec<IpNet>> {
    let msgs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| kernel_error(format!("list addresses of link {index}"), e))?;
    Ok(msgs
        .iter()
        .filter_map(|m| address_of(m).and_then(|a| IpNet::new(a, m.header.prefix_len).ok()))
        .collect())
}

/// Turns on forwarding for a family (the `/proc/sys` of the plugin's own namespace);
/// reading first keeps the common case free of writes.
pub fn enable_forwarding(v4: bool) -> CniResult<()> {
    let path = if v4 {
        "/proc/sys/net/ipv4/ip_forward"
    } else {
        "/proc/sys/net/ipv6/conf/all/forwarding"
    };
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|e| kernel_error(format!("write {path}"), e))
}

/// Every link of the namespace (GC).
pub async fn all_links(handle: &Handle) -> CniResult<Vec<LinkFacts>> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| kernel_error("list links", e))?;
    Ok(msgs.iter().map(link_facts).collect())
}
