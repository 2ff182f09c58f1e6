//! NodePorts, externalIPs and LoadBalancer ingress IPs reached from outside the node,
//! through the tc programs (`tc.o`) that
//! `skiff_agent::lb::tc` attaches to the node's external interface. Root only.
//!
//! Each test builds its own lab of network namespaces with unique names, and mounts its
//! own bpffs at a temporary directory; a guard removes both even when the test fails:
//!
//! ```text
//!   client 10.99.0.100 ─┐
//!   node1 ext0 10.99.0.1 ┼─ bridge in "lan"          node1: cbr0 10.244.1.1/24
//!   node2 ext0 10.99.0.2 ┘                             ├─ pod-a 10.244.1.2
//!                                                      └─ pod-b 10.244.1.3
//!   node1 routes 10.244.2.0/24 via node2 (host-gw)   node2: cbr0 10.244.2.1/24
//!                                                      └─ pod-c 10.244.2.2
//! ```
//!
//! Only node1 runs the tc programs. The map entries are written here directly, in the
//! layout of `skiff_ebpf::lb`, as the agent's programmer would.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use integration::netns::Netns;
use integration::{require_root, require_tool};
use skiff_agent::lb::tc::{self, TcDatapath};
use skiff_ebpf::lb::{
    BACKEND_LOCAL, BACKEND_STATS_MAP, BACKENDS_MAP, CT_DIR_ORIGINAL, CT_F_SNAT, CT_MAP, Ct4Key,
    Ct4Value, IPPROTO_TCP, IPPROTO_UDP, Lb4Backend, Lb4Key, Lb4Service, LbBackendStats,
    SCOPE_EXTERNAL, SERVICES_MAP, SVC_EXTERNAL_IP, SVC_LOCAL, SVC_NODEPORT,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
/// A second address of the client, for two flows with the same source port.
const CLIENT2: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 101);
const NODE1: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const POD_PORT: u16 = 8080;
/// An externalIP and a LoadBalancer ingress IP: addresses of no interface, which the
/// client reaches through a route via node1, as a router or cloud LB would send them.
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 10);
const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 20);
const EXTERNAL_INTERFACE: &str = "ext0";
const TIMEOUT: Duration = Duration::from_secs(5);

/// `externalTrafficPolicy: Local` with two local backends: no SNAT, the pods see the
/// client, both get connections, UDP works, open flows outlive their backend's removal,
/// and detaching restores the node's own behaviour.
#[test]
fn nodeport_with_local_backends_keeps_the_client_address() {
    require_root("the NodePort test creates network namespaces and mounts a bpffs");
    let mut lab = Lab::build();
    let mut maps = LbMaps::open(lab.bpffs.path());
    let frontend_port = 30080;
    let local = |address| Lb4Backend::new(address, POD_PORT, IPPROTO_TCP, BACKEND_LOCAL);
    let local_udp = |address| Lb4Backend::new(address, POD_PORT, IPPROTO_UDP, BACKEND_LOCAL);
    maps.add_frontend(
        Lb4Key::new(NODE1, frontend_port, IPPROTO_TCP, SCOPE_EXTERNAL, 0),
        SVC_NODEPORT | SVC_LOCAL,
        1,
        &[(1, local(POD_A)), (2, local(POD_B))],
    );
    maps.add_frontend(
        Lb4Key::new(NODE1, frontend_port, IPPROTO_UDP, SCOPE_EXTERNAL, 0),
        SVC_NODEPORT | SVC_LOCAL,
        2,
        &[(3, local_udp(POD_A)), (4, local_udp(POD_B))],
    );
    for (pod, name) in [(&lab.pod_a, "pod-a"), (&lab.pod_b, "pod-b")] {
        let servers = [tcp_server(pod, name), udp_server(pod, name)];
        lab.servers.extend(servers);
    }
    let frontend = SocketAddrV4::new(NODE1, frontend_port);

    let connections = 40;
    let mut seen = std::collections::BTreeSet::new();
    for n in 0..connections {
        let reply = Conversation::open(&lab.client, frontend).say(&format!("hello {n}"));
        assert_eq!(
            reply.peer, CLIENT,
            "the backend must see the client's address: {reply:?}"
        );
        assert_eq!(reply.echo, format!("hello {n}"));
        seen.insert(reply.backend);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["pod-a", "pod-b"],
        "{connections} connections should reach both backends"
    );
    assert_eq!(
        maps.connections(1) + maps.connections(2),
        connections,
        "lb_be_stats counts every new flow once"
    );

    // UDP: the reply comes from the frontend, and later datagrams follow the first.
    let socket = in_netns(&lab.client, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)));
    let first = udp_exchange(&socket, frontend, "datagram 1");
    let second = udp_exchange(&socket, frontend, "datagram 2");
    assert_eq!(first.peer, CLIENT, "{first:?}");
    assert_eq!(
        second.backend, first.backend,
        "a UDP flow stays on its backend"
    );
    let client_port = socket.local_addr().expect("UDP socket address").port();
    let flow = maps.ct_original((CLIENT, client_port), (NODE1, frontend_port), IPPROTO_UDP);
    let backend = if first.backend == "pod-a" {
        POD_A
    } else {
        POD_B
    };
    assert_eq!(flow.destination(), (backend, POD_PORT), "{flow:?}");
    assert_eq!(
        flow.source(),
        (CLIENT, client_port),
        "no SNAT for a local backend"
    );
    assert_eq!(flow.flags & CT_F_SNAT, 0);

    // An open connection stays on its backend after the backend leaves the service.
    let mut open = Conversation::open(&lab.client, frontend);
    let before = open.say("before");
    let (removed_id, kept) = if before.backend == "pod-a" {
        (1, "pod-b")
    } else {
        (2, "pod-a")
    };
    maps.remove_backend(
        Lb4Key::new(NODE1, frontend_port, IPPROTO_TCP, SCOPE_EXTERNAL, 0),
        removed_id,
    );
    let after = open.say("after");
    assert_eq!(
        after.backend, before.backend,
        "removing a backend must not break its flows"
    );
    for n in 0..10 {
        let reply = Conversation::open(&lab.client, frontend).say(&format!("new {n}"));
        assert_eq!(reply.backend, kept, "new flows avoid the removed backend");
    }
    drop(open);

    // Detached, the node answers for itself: nothing listens on the NodePort there.
    lab.datapath = None;
    tc::detach(
        lab.bpffs.path(),
        Some(&lab.node1.path()),
        &[EXTERNAL_INTERFACE],
    )
    .expect("detach tc programs");
    assert_eq!(
        integration::files_under(&lab.bpffs.path().join("tc")),
        Vec::<PathBuf>::new(),
        "detach removes the link pins"
    );
    let refused = tc::in_netns(Some(&lab.client.path()), || {
        TcpStream::connect_timeout(&frontend.into(), TIMEOUT)
    })
    .expect("enter the client namespace");
    assert_eq!(
        refused.map(drop).map_err(|error| error.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "without the tc programs node1 has nothing on {frontend}"
    );
}

/// `externalTrafficPolicy: Cluster` with a backend on node2: node1 SNATs to its own
/// address, routes to the pod over the host-gw route, and sends the replies back out to
/// the client. The datapath keeps running while no agent holds it (pinned tcx links), and
/// a restarted agent takes the links over.
#[test]
fn nodeport_to_a_remote_backend_is_snated_to_the_node() {
    require_root("the NodePort test creates network namespaces and mounts a bpffs");
    let mut lab = Lab::build();
    let mut maps = LbMaps::open(lab.bpffs.path());
    let frontend_port = 30081;
    maps.add_frontend(
        Lb4Key::new(NODE1, frontend_port, IPPROTO_TCP, SCOPE_EXTERNAL, 0),
        SVC_NODEPORT,
        1,
        &[(10, Lb4Backend::new(POD_C, POD_PORT, IPPROTO_TCP, 0))],
    );
    maps.add_frontend(
        Lb4Key::new(NODE1, frontend_port, IPPROTO_UDP, SCOPE_EXTERNAL, 0),
        SVC_NODEPORT,
        2,
        &[(11, Lb4Backend::new(POD_C, POD_PORT, IPPROTO_UDP, 0))],
    );
    let servers = [
        tcp_server(&lab.pod_c, "pod-c"),
        udp_server(&lab.pod_c, "pod-c"),
    ];
    lab.servers.extend(servers);
    let frontend = SocketAddrV4::new(NODE1, frontend_port);

    // The agent goes away; its pinned links keep the programs attached.
    lab.datapath = None;
    for n in 0..5 {
        let mut conversation = Conversation::open(&lab.client, frontend);
        for line in [format!("one {n}"), format!("two {n}")] {
            let reply = conversation.say(&line);
            assert_eq!(reply.backend, "pod-c");
            assert_eq!(
                reply.peer, NODE1,
                "the remote pod sees node1's address: {reply:?}"
            );
            assert_eq!(reply.echo, line);
        }
    }
    assert_eq!(maps.connections(10), 5);

    let socket = in_netns(&lab.client, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)));
    let reply = udp_exchange(&socket, frontend, "datagram");
    assert_eq!(
        (reply.backend.as_str(), reply.peer),
        ("pod-c", NODE1),
        "{reply:?}"
    );
    let client_port = socket.local_addr().expect("UDP socket address").port();
    let flow = maps.ct_original((CLIENT, client_port), (NODE1, frontend_port), IPPROTO_UDP);
    assert_eq!(flow.flags & CT_F_SNAT, CT_F_SNAT, "{flow:?}");
    assert_eq!(
        flow.source().0,
        NODE1,
        "SNAT to the address the client targeted"
    );
    assert_eq!(flow.destination(), (POD_C, POD_PORT));

    // Two clients on one source port would share a SNAT tuple: the second flow gets
    // another port from the SNAT range, and its replies find their way back all the same.
    let first = in_netns(&lab.client, || UdpSocket::bind((CLIENT, 0)));
    let port = first.local_addr().expect("UDP socket address").port();
    let second = in_netns(&lab.client, || UdpSocket::bind((CLIENT2, port)));
    for (socket, client) in [(&first, CLIENT), (&second, CLIENT2)] {
        let reply = udp_exchange(socket, frontend, &format!("from {client}"));
        assert_eq!(
            (reply.backend.as_str(), reply.peer),
            ("pod-c", NODE1),
            "{reply:?}"
        );
    }
    let first_flow = maps.ct_original((CLIENT, port), (NODE1, frontend_port), IPPROTO_UDP);
    let second_flow = maps.ct_original((CLIENT2, port), (NODE1, frontend_port), IPPROTO_UDP);
    assert_eq!(
        first_flow.source(),
        (NODE1, port),
        "the client's own port comes first"
    );
    assert_eq!(second_flow.source().0, NODE1);
    assert_ne!(second_flow.source().1, port, "{second_flow:?}");
    assert!(second_flow.source().1 >= 32768, "{second_flow:?}");

    // A restarted agent swaps its programs into the pinned links.
    let mut restarted = TcDatapath::load(lab.bpffs.path(), 4096).expect("load tc.o again");
    restarted
        .attach(Some(&lab.node1.path()), &[EXTERNAL_INTERFACE])
        .expect("attach over the pinned links");
    assert_eq!(
        integration::files_under(&lab.bpffs.path().join("tc")).len(),
        2,
        "one link per direction"
    );
    let reply = Conversation::open(&lab.client, frontend).say("after restart");
    assert_eq!(
        (reply.backend.as_str(), reply.peer),
        ("pod-c", NODE1),
        "{reply:?}"
    );
    lab.datapath = Some(restarted);
}

/// externalIPs and LoadBalancer ingress IPs are no address of node1: the programmer marks
/// them `SVC_EXTERNAL_IP` (not `SVC_NODEPORT`), so under policy Cluster the tc program
/// finds the SNAT source with `bpf_fib_lookup` towards the backend instead of reusing the
/// frontend address. Both kinds are tried under both policies, over TCP and UDP: a remote
/// backend sees node1's address (Cluster), a local one sees the client (Local), and the
/// client's replies come from the address it targeted.
#[test]
fn external_and_load_balancer_ips_from_outside_are_snated_or_keep_the_client() {
    require_root("the externalIP test creates network namespaces and mounts a bpffs");
    let mut lab = Lab::build();
    lab.client
        .ip(&["route", "add", "10.98.0.0/24", "via", &NODE1.to_string()]);
    let mut maps = LbMaps::open(lab.bpffs.path());
    // (frontend, policy Local, backend, the backend's name, the address the backend sees)
    let cases = [
        (EXTERNAL_IP, false, POD_C, "pod-c", NODE1),
        (LOAD_BALANCER_IP, false, POD_C, "pod-c", NODE1),
        (EXTERNAL_IP, true, POD_A, "pod-a", CLIENT),
        (LOAD_BALANCER_IP, true, POD_B, "pod-b", CLIENT),
    ];
    for (index, &(address, local_policy, backend, _, _)) in (0u16..).zip(&cases) {
        // Cluster frontends on port 80, Local ones on port 81.
        let port = if local_policy { 81 } else { 80 };
        let (svc_flags, backend_flags) = if local_policy {
            (SVC_EXTERNAL_IP | SVC_LOCAL, BACKEND_LOCAL)
        } else {
            (SVC_EXTERNAL_IP, 0)
        };
        for (proto_index, proto) in (0u16..).zip([IPPROTO_TCP, IPPROTO_UDP]) {
            let rev_nat_index = 1 + index * 2 + proto_index;
            maps.add_frontend(
                Lb4Key::new(address, port, proto, SCOPE_EXTERNAL, 0),
                svc_flags,
                rev_nat_index,
                &[(
                    100 + u32::from(rev_nat_index),
                    Lb4Backend::new(backend, POD_PORT, proto, backend_flags),
                )],
            );
        }
    }
    for (pod, name) in [
        (&lab.pod_a, "pod-a"),
        (&lab.pod_b, "pod-b"),
        (&lab.pod_c, "pod-c"),
    ] {
        let servers = [tcp_server(pod, name), udp_server(pod, name)];
        lab.servers.extend(servers);
    }

    for &(address, local_policy, backend, name, peer) in &cases {
        let port = if local_policy { 81 } else { 80 };
        let frontend = SocketAddrV4::new(address, port);
        let what = format!(
            "{frontend} under policy {}",
            if local_policy { "Local" } else { "Cluster" }
        );
        let mut conversation = Conversation::open(&lab.client, frontend);
        assert_eq!(
            conversation.stream.peer_addr().expect("peer address"),
            frontend.into(),
            "{what}"
        );
        for line in ["one", "two"] {
            let reply = conversation.say(line);
            assert_eq!(
                (reply.backend.as_str(), reply.peer, reply.echo.as_str()),
                (name, peer, line),
                "{what}: {reply:?}"
            );
        }
        let client_port = conversation
            .stream
            .local_addr()
            .expect("TCP socket address")
            .port();
        let flow = maps.ct_original((CLIENT, client_port), (address, port), IPPROTO_TCP);
        assert_eq!(flow.destination(), (backend, POD_PORT), "{what}: {flow:?}");
        if local_policy {
            assert_eq!(flow.flags & CT_F_SNAT, 0, "{what}: {flow:?}");
            assert_eq!(flow.source(), (CLIENT, client_port), "{what}: {flow:?}");
        } else {
            assert_eq!(flow.flags & CT_F_SNAT, CT_F_SNAT, "{what}: {flow:?}");
            assert_eq!(
                flow.source().0,
                NODE1,
                "{what}: the SNAT source is node1's address on the route to the backend"
            );
        }
        drop(conversation);

        // udp_exchange asserts that the reply comes from the frontend address.
        let socket = in_netns(&lab.client, || UdpSocket::bind((CLIENT, 0)));
        let reply = udp_exchange(&socket, frontend, "datagram");
        assert_eq!(
            (reply.backend.as_str(), reply.peer),
            (name, peer),
            "{what}, UDP: {reply:?}"
        );
    }
}

/// A bpffs instance mounted at a temporary directory, unmounted on drop.
struct BpfFs {
    dir: tempfile::TempDir,
}

impl BpfFs {
    fn mount() -> BpfFs {
        let dir = tempfile::Builder::new()
            .prefix("skiff-lb-nodeport-bpffs-")
            .tempdir()
            .expect("temp dir for bpffs");
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount bpffs at {}: {status}",
            dir.path().display()
        );
        BpfFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        // Unmounting drops the pins, and with them the tc links and maps.
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The namespaces, bpffs and datapath of one test; fields drop in order: servers stop,
/// the agent's handles close, the namespaces go, the bpffs is unmounted.
struct Lab {
    servers: Vec<Server>,
    datapath: Option<TcDatapath>,
    client: Netns,
    node1: Netns,
    pod_a: Netns,
    pod_b: Netns,
    pod_c: Netns,
    _others: Vec<Netns>,
    bpffs: BpfFs,
}

impl Lab {
    fn build() -> Lab {
        require_tool("ip", "install iproute2");
        static LABS: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "skiff-lbnp-{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let bpffs = BpfFs::mount();
        let netns = |role: &str| Netns::add(format!("{prefix}-{role}"));
        let lan = netns("lan");
        let client = netns("client");
        let node1 = netns("node1");
        let node2 = netns("node2");
        let pod_a = netns("pod-a");
        let pod_b = netns("pod-b");
        let pod_c = netns("pod-c");

        lan.ip(&["link", "add", "lan", "type", "bridge"]);
        lan.ip(&["link", "set", "lan", "up"]);
        for (netns, address, port) in [
            (&client, CLIENT, "client"),
            (&node1, NODE1, "node1"),
            (&node2, NODE2, "node2"),
        ] {
            let interface = if port == "client" {
                "eth0"
            } else {
                EXTERNAL_INTERFACE
            };
            netns.add_veth(interface, &lan, port);
            lan.ip(&["link", "set", port, "master", "lan", "up"]);
            netns.ip(&["addr", "add", &format!("{address}/24"), "dev", interface]);
            netns.ip(&["link", "set", interface, "up"]);
        }
        client.ip(&["addr", "add", &format!("{CLIENT2}/24"), "dev", "eth0"]);
        for (node, subnet, pods) in [
            (
                &node1,
                1,
                vec![(&pod_a, POD_A, "veth-a"), (&pod_b, POD_B, "veth-b")],
            ),
            (&node2, 2, vec![(&pod_c, POD_C, "veth-c")]),
        ] {
            node.enable_forwarding();
            node.ip(&["link", "add", "cbr0", "type", "bridge"]);
            node.ip(&[
                "addr",
                "add",
                &format!("10.244.{subnet}.1/24"),
                "dev",
                "cbr0",
            ]);
            node.ip(&["link", "set", "cbr0", "up"]);
            for (pod, address, host_side) in pods {
                node.add_veth(host_side, pod, "eth0");
                node.ip(&["link", "set", host_side, "master", "cbr0", "up"]);
                pod.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
                pod.ip(&["link", "set", "eth0", "up"]);
                pod.ip(&[
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.244.{subnet}.1"),
                ]);
            }
        }
        node1.ip(&["route", "add", "10.244.2.0/24", "via", &NODE2.to_string()]);
        node2.ip(&["route", "add", "10.244.1.0/24", "via", &NODE1.to_string()]);

        let mut datapath = TcDatapath::load(bpffs.path(), 4096).expect("load tc.o");
        datapath
            .attach(Some(&node1.path()), &[EXTERNAL_INTERFACE])
            .expect("attach tc programs to node1's external interface");
        Lab {
            servers: Vec::new(),
            datapath: Some(datapath),
            client,
            node1,
            pod_a,
            pod_b,
            pod_c,
            _others: vec![lan, node2],
            bpffs,
        }
    }
}

fn in_netns<T: Send>(netns: &Netns, f: impl FnOnce() -> std::io::Result<T> + Send) -> T {
    tc::in_netns(Some(&netns.path()), f)
        .unwrap_or_else(|error| panic!("enter {}: {error}", netns.name()))
        .unwrap_or_else(|error| panic!("socket in {}: {error}", netns.name()))
}

/// The pinned maps, opened as agentctl or the programmer would.
struct LbMaps {
    services: HashMap<MapData, Lb4Key, Lb4Service>,
    backends: HashMap<MapData, u32, Lb4Backend>,
    stats: PerCpuArray<MapData, LbBackendStats>,
    ct: HashMap<MapData, Ct4Key, Ct4Value>,
}

impl LbMaps {
    fn open(bpffs: &Path) -> LbMaps {
        let pinned = |name: &str| {
            MapData::from_pin(bpffs.join(name))
                .unwrap_or_else(|error| panic!("open pinned {name}: {error}"))
        };
        LbMaps {
            services: HashMap::try_from(Map::HashMap(pinned(SERVICES_MAP)))
                .expect("lb4_services layout"),
            backends: HashMap::try_from(Map::HashMap(pinned(BACKENDS_MAP)))
                .expect("lb4_backends layout"),
            stats: PerCpuArray::try_from(Map::PerCpuArray(pinned(BACKEND_STATS_MAP)))
                .expect("lb_be_stats layout"),
            ct: HashMap::try_from(Map::LruHashMap(pinned(CT_MAP))).expect("ct4 layout"),
        }
    }

    /// Writes a frontend the way the programmer does: backends, then slots, then slot 0.
    fn add_frontend(
        &mut self,
        frontend: Lb4Key,
        flags: u8,
        rev_nat_index: u16,
        backends: &[(u32, Lb4Backend)],
    ) {
        for (slot, (backend_id, backend)) in (1..).zip(backends) {
            self.backends
                .insert(backend_id, backend, 0)
                .expect("write lb4_backends");
            let slot_entry = Lb4Service {
                backend_id: *backend_id,
                ..Lb4Service::default()
            };
            self.services
                .insert(frontend.with_slot(slot), slot_entry, 0)
                .expect("write a backend slot");
        }
        let service = Lb4Service {
            count: u16::try_from(backends.len()).expect("few backends"),
            rev_nat_index,
            flags,
            ..Lb4Service::default()
        };
        self.services
            .insert(frontend.with_slot(0), service, 0)
            .expect("write the service entry");
    }

    /// Removes a backend the way the programmer does: the last slot fills the hole, then
    /// the count drops, then the backend goes.
    fn remove_backend(&mut self, frontend: Lb4Key, backend_id: u32) {
        let mut service = self
            .services
            .get(&frontend.with_slot(0), 0)
            .expect("service entry");
        let last = frontend.with_slot(service.count);
        let last_entry = self.services.get(&last, 0).expect("last slot");
        let hole = (1..=service.count)
            .find(|&slot| {
                self.services
                    .get(&frontend.with_slot(slot), 0)
                    .is_ok_and(|entry| entry.backend_id == backend_id)
            })
            .expect("the backend has a slot");
        self.services
            .insert(frontend.with_slot(hole), last_entry, 0)
            .expect("fill the hole");
        service.count -= 1;
        self.services
            .insert(frontend.with_slot(0), service, 0)
            .expect("lower the count");
        self.services.remove(&last).expect("remove the last slot");
        self.backends
            .remove(&backend_id)
            .expect("remove the backend");
    }

    fn connections(&self, backend_id: u32) -> u64 {
        let per_cpu = self.stats.get(&backend_id, 0).expect("read lb_be_stats");
        per_cpu.iter().map(|stats| stats.connections).sum()
    }

    fn ct_original(
        &self,
        client: (Ipv4Addr, u16),
        frontend: (Ipv4Addr, u16),
        proto: u8,
    ) -> Ct4Value {
        let key = Ct4Key::new(client, frontend, proto, CT_DIR_ORIGINAL);
        self.ct
            .get(&key, 0)
            .unwrap_or_else(|error| panic!("no ct4 entry {key:?}: {error}"))
    }
}

/// What a test server answers: `<backend> <peer address> <echoed line>`.
#[derive(Debug)]
struct Reply {
    backend: String,
    peer: Ipv4Addr,
    echo: String,
}

impl Reply {
    fn parse(line: &str) -> Reply {
        let mut parts = line.trim_end().splitn(3, ' ');
        let mut next = || {
            parts
                .next()
                .unwrap_or_else(|| panic!("malformed reply {line:?}"))
        };
        Reply {
            backend: next().to_owned(),
            peer: next()
                .parse()
                .unwrap_or_else(|_| panic!("malformed reply {line:?}")),
            echo: next().to_owned(),
        }
    }
}

/// A TCP connection from the client namespace; one reply line per line said.
struct Conversation {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conversation {
    fn open(client: &Netns, to: SocketAddrV4) -> Conversation {
        let stream = in_netns(client, || TcpStream::connect_timeout(&to.into(), TIMEOUT));
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("set read timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone stream"));
        Conversation { stream, reader }
    }

    fn say(&mut self, line: &str) -> Reply {
        writeln!(self.stream, "{line}").expect("send a line");
        let mut reply = String::new();
        self.reader.read_line(&mut reply).expect("read the reply");
        Reply::parse(&reply)
    }
}

fn udp_exchange(socket: &UdpSocket, to: SocketAddrV4, message: &str) -> Reply {
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("set read timeout");
    let mut buffer = [0; 512];
    for _ in 0..5 {
        socket
            .send_to(message.as_bytes(), to)
            .expect("send a datagram");
        match socket.recv_from(&mut buffer) {
            Ok((length, from)) => {
                assert_eq!(from, to.into(), "the reply must come from the frontend");
                return Reply::parse(std::str::from_utf8(&buffer[..length]).expect("UTF-8 reply"));
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(error) => panic!("receive from {to}: {error}"),
        }
    }
    panic!("no UDP reply from {to} after 5 tries");
}

/// A server thread in a pod namespace, stopped and joined on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers each line of each connection on port 8080 with `<name> <peer> <line>`.
fn tcp_server(pod: &Netns, name: &'static str) -> Server {
    let listener = in_netns(pod, || TcpListener::bind((Ipv4Addr::UNSPECIFIED, POD_PORT)));
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    std::thread::spawn(move || serve_lines(stream, name, peer.ip()));
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(error) => panic!("{name} accept: {error}"),
            }
        }
    });
    Server {
        stop,
        thread: Some(thread),
    }
}

fn serve_lines(stream: TcpStream, name: &str, peer: std::net::IpAddr) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writeln!(writer, "{name} {peer} {line}").is_err() {
            return;
        }
    }
}

/// Answers each datagram on port 8080 with `<name> <peer> <datagram>`.
fn udp_server(pod: &Netns, name: &'static str) -> Server {
    let socket = in_netns(pod, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, POD_PORT)));
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("set read timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        let mut buffer = [0; 512];
        while !stopped.load(Ordering::Relaxed) {
            let Ok((length, peer)) = socket.recv_from(&mut buffer) else {
                continue;
            };
            let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
            let _ = socket.send_to(format!("{name} {} {message}", peer.ip()).as_bytes(), peer);
        }
    });
    Server {
        stop,
        thread: Some(thread),
    }
}
