//! Root tests of the agent's host-gw routes (`skiff_agent::routes`): the reconciler runs in
//! this process, fed by a real `skiff-control` through kube-rs, and writes routes into a
//! network namespace the test makes (`ip netns add`). Nodes are created, changed and
//! deleted with the real kubectl, and the routes are read back with `ip -n <ns> route`.
//!
//! The first test has one namespace with a veth link holding 192.0.2.1/24. The second
//! builds two "nodes" (namespaces on a bridge in a third, "lan" namespace), attaches a pod
//! to each with the real `skiff-cni`, runs one reconciler per node and sends TCP between
//! the pods and the nodes through the routes the reconcilers made.
//!
//! The host's interfaces and routes are never touched; the [`Netns`] guard deletes each
//! namespace (and its links, bridges and routes) on drop, failed assertion or not, and
//! IPAM data lives in temp dirs.

use std::collections::BTreeSet;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use integration::ControlPlane;
use integration::netns::Netns;
use serde_json::{Value, json};
use skiff_agent::routes::{ROUTE_PROTOCOL, Routes, RoutesConfig};

fn require_root() {
    integration::require_root("this test creates a network namespace");
    integration::require_tool("ip", "apt-get install -y iproute2");
}

/// A namespace named `skiff-routes-<role>-<unique suffix>`, with only `lo`, up.
fn empty_netns(role: &str) -> Netns {
    Netns::new(&format!("skiff-routes-{role}"))
}

/// A namespace with `veth0` up holding 192.0.2.1/24.
fn node_netns() -> Netns {
    let netns = empty_netns("node");
    // The machine's kernel has no dummy links; a veth pair with both ends in the
    // namespace gives the same connected /24.
    netns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ]);
    netns.ip(&["addr", "add", "192.0.2.1/24", "dev", "veth0"]);
    netns.ip(&["link", "set", "veth1", "up"]);
    netns.ip(&["link", "set", "veth0", "up"]);
    netns
}

/// What these tests read from their namespaces.
trait NetnsRoutes {
    fn link_names(&self) -> BTreeSet<String>;
    fn ipv4_forwarding(&self) -> String;
    fn routes(&self) -> BTreeSet<String>;
    fn wait_routes(&self, what: &str, expected: &[&str]);
}

impl NetnsRoutes for Netns {
    /// The names of the namespace's links.
    fn link_names(&self) -> BTreeSet<String> {
        let text = self.ip(&["-j", "link", "show"]);
        let links: Value = serde_json::from_str(&text).expect("ip -j prints JSON");
        links
            .as_array()
            .expect("a list of links")
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
            .collect()
    }

    /// The IPv4 forwarding switch of the namespace, read from inside it.
    fn ipv4_forwarding(&self) -> String {
        self.shell("cat /proc/sys/net/ipv4/ip_forward")
            .trim()
            .to_owned()
    }

    /// Every IPv4 route of the main table but the link's own, as `dst via gw proto p`.
    fn routes(&self) -> BTreeSet<String> {
        let text = self.ip(&["-j", "-4", "route", "show", "table", "main"]);
        let routes: Value = serde_json::from_str(&text).expect("ip -j prints JSON");
        routes
            .as_array()
            .expect("a list of routes")
            .iter()
            .filter(|r| r["protocol"] != "kernel")
            .map(|r| {
                format!(
                    "{} via {} proto {}",
                    r["dst"].as_str().unwrap_or("?"),
                    r["gateway"].as_str().unwrap_or("-"),
                    // `ip -j` leaves out the default protocol, boot.
                    r["protocol"].as_str().unwrap_or("boot")
                )
            })
            .collect()
    }

    /// Waits up to 10 s for the routes to be exactly `expected`.
    fn wait_routes(&self, what: &str, expected: &[&str]) {
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let routes = self.routes();
            if routes == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: routes in {} are\n{routes:#?}\nexpected\n{expected:#?}",
                self.name()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The route reconciler running in this process on its own runtime, against the test's
/// namespace; stopped (its task and netlink socket dropped) on drop.
struct Reconciler {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Reconciler {
    /// The reconciler of the node `node_name`, writing routes into the network namespace at
    /// `netns`.
    fn start(plane: &ControlPlane, node_name: &str, netns: &Path) -> Reconciler {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("reconciler runtime");
        let kubeconfig = plane.kubeconfig.clone();
        let path = netns.to_path_buf();
        let (client, routes) = runtime.block_on(async move {
            let file = kube::config::Kubeconfig::read_from(&kubeconfig).expect("read kubeconfig");
            let config = kube::Config::from_custom_kubeconfig(
                file,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .expect("load kubeconfig");
            let client = kube::Client::try_from(config).expect("kube client");
            let routes = Routes::in_namespace(&path).expect("netlink socket in the namespace");
            (client, routes)
        });
        let config = RoutesConfig {
            node_name: node_name.into(),
            own_pod_cidrs: Vec::new(),
            // Far away: every change below must be driven by the Node watch alone.
            resync: Duration::from_secs(600),
        };
        runtime.spawn(skiff_agent::routes::run(client, routes, config));
        Reconciler {
            runtime: Some(runtime),
        }
    }
}

impl Drop for Reconciler {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn node(name: &str, pod_cidr: &str, internal_ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Node
metadata:
  name: {name}
spec:
  podCIDR: {pod_cidr}
  podCIDRs: [{pod_cidr}]
status:
  addresses:
  - {{type: InternalIP, address: {internal_ip}}}
  - {{type: Hostname, address: {name}}}
"
    )
}

fn apply(plane: &ControlPlane, manifest: &str) {
    let output = plane.kubectl_stdin(&["apply", "-f", "-"], manifest);
    assert!(
        output.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Changes a Node's InternalIP through the status subresource (a write to the Node itself
/// keeps the stored status, as kube-apiserver does).
fn set_internal_ip(plane: &ControlPlane, name: &str, internal_ip: &str) {
    let patch = format!(
        r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"{internal_ip}"}},{{"type":"Hostname","address":"{name}"}}]}}}}"#
    );
    plane.kubectl(&[
        "patch",
        "node",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch,
    ]);
}

#[test]
fn routes_follow_nodes_and_only_the_agents_own_are_touched() {
    require_root();
    let p = ROUTE_PROTOCOL;
    let netns = node_netns();
    // A route the agent did not make, and one to a podCIDR a Node will claim: both stay.
    netns.ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.254"]);
    netns.ip(&[
        "route",
        "add",
        "10.77.5.0/24",
        "via",
        "192.0.2.254",
        "proto",
        "static",
    ]);
    let plane = ControlPlane::start();

    let mut manifest = String::new();
    for (name, cidr, ip) in [
        ("self-node", "10.77.1.0/24", "192.0.2.1"),
        ("node-b", "10.77.2.0/24", "192.0.2.2"),
        ("node-c", "10.77.3.0/24", "192.0.2.3"),
        // Its gateway is not on the namespace's link: the kernel refuses the route.
        ("node-d", "10.77.4.0/24", "203.0.113.4"),
        ("node-e", "10.77.5.0/24", "192.0.2.5"),
    ] {
        manifest.push_str("---\n");
        manifest.push_str(&node(name, cidr, ip));
    }
    apply(&plane, &manifest);

    let reconciler = Reconciler::start(&plane, "self-node", &netns.path());
    netns.wait_routes(
        "first reconcile",
        &[
            &format!("10.77.2.0/24 via 192.0.2.2 proto {p}"),
            &format!("10.77.3.0/24 via 192.0.2.3 proto {p}"),
            "10.77.5.0/24 via 192.0.2.254 proto static",
            "198.51.100.0/24 via 192.0.2.254 proto boot",
        ],
    );

    // A changed InternalIP moves the route; a refused Node is retried when it changes.
    set_internal_ip(&plane, "node-b", "192.0.2.22");
    set_internal_ip(&plane, "node-d", "192.0.2.4");
    netns.wait_routes(
        "after InternalIP changes",
        &[
            &format!("10.77.2.0/24 via 192.0.2.22 proto {p}"),
            &format!("10.77.3.0/24 via 192.0.2.3 proto {p}"),
            &format!("10.77.4.0/24 via 192.0.2.4 proto {p}"),
            "10.77.5.0/24 via 192.0.2.254 proto static",
            "198.51.100.0/24 via 192.0.2.254 proto boot",
        ],
    );

    plane.kubectl(&["delete", "node", "node-c"]);
    netns.wait_routes(
        "after node-c is deleted",
        &[
            &format!("10.77.2.0/24 via 192.0.2.22 proto {p}"),
            &format!("10.77.4.0/24 via 192.0.2.4 proto {p}"),
            "10.77.5.0/24 via 192.0.2.254 proto static",
            "198.51.100.0/24 via 192.0.2.254 proto boot",
        ],
    );

    // While the agent is down, node-b goes away and a route of the agent's for a Node that
    // never existed is left behind: the restarted reconciler removes both.
    drop(reconciler);
    plane.kubectl(&["delete", "node", "node-b"]);
    netns.ip(&[
        "route",
        "add",
        "10.77.9.0/24",
        "via",
        "192.0.2.9",
        "proto",
        &p.to_string(),
    ]);
    let _reconciler = Reconciler::start(&plane, "self-node", &netns.path());
    netns.wait_routes(
        "after a restart",
        &[
            &format!("10.77.4.0/24 via 192.0.2.4 proto {p}"),
            "10.77.5.0/24 via 192.0.2.254 proto static",
            "198.51.100.0/24 via 192.0.2.254 proto boot",
        ],
    );
}

/// Runs `f` on a new thread that has entered the network namespace at `netns`, so the
/// sockets it opens live there (a socket stays in the namespace it was created in). The
/// test's own threads never change namespace.
fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> T {
    skiff_agent::sandbox::run_in_namespace(netns, skiff_agent::sandbox::Namespace::Net, f)
        .unwrap_or_else(|error| panic!("{error}"))
}

/// A TCP server for one connection, listening in a namespace: it answers its name and
/// reports the client address it saw.
struct Server {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: JoinHandle<Option<IpAddr>>,
}

impl Server {
    fn start(netns: &Path, ip: IpAddr, name: &'static str) -> Server {
        let listener = in_netns(netns, || TcpListener::bind((ip, 0)))
            .unwrap_or_else(|e| panic!("listen on {ip} in {}: {e}", netns.display()));
        let address = listener.local_addr().expect("listener address");
        // Non-blocking, so that a server no client reaches can be stopped.
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let accepted = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        stream.set_nonblocking(false).ok()?;
                        stream.write_all(name.as_bytes()).ok()?;
                        return Some(peer.ip());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => return None,
                }
            }
            None
        });
        Server {
            address,
            stop,
            accepted,
        }
    }

    /// Stops waiting and returns the client address of the connection served, if any.
    fn finish(self) -> Option<IpAddr> {
        self.stop.store(true, Ordering::Relaxed);
        self.accepted.join().expect("server thread")
    }
}

/// Connects from the namespace at `netns` to `address` and reads the server's answer.
fn ask(netns: &Path, address: SocketAddr) -> io::Result<String> {
    in_netns(netns, || {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })
}

/// A client in `from` asks a server named `server_name` listening in `to` on `ip`; asserts
/// the answer and returns the client address the server saw.
fn exchange(what: &str, from: &Path, to: &Path, ip: IpAddr, server_name: &'static str) -> IpAddr {
    let server = Server::start(to, ip, server_name);
    let address = server.address;
    let answer = ask(from, address);
    let seen = server.finish();
    let answer = answer.unwrap_or_else(|e| panic!("{what}: connect to {address}: {e}"));
    assert_eq!(answer, server_name, "{what}: the answer from {address}");
    seen.unwrap_or_else(|| panic!("{what}: the server on {address} saw no client"))
}

/// The network name of the pods' CNI configuration, also their IPAM directory's name.
const POD_NETWORK: &str = "skiff-pods";

/// A "node": a namespace with `eth0` on the lan bridge, a pod CIDR for skiff-cni and an
/// IPAM data directory of its own.
struct Node {
    name: &'static str,
    internal_ip: &'static str,
    pod_cidr: &'static str,
    netns: Netns,
    ipam_data: tempfile::TempDir,
}

impl Node {
    /// Joins the lan: a veth pair whose `eth0` end is in the node, holding `internal_ip`/24,
    /// and whose other end (named after the node) is a port of `lan0`.
    fn new(
        lan: &Netns,
        name: &'static str,
        internal_ip: &'static str,
        pod_cidr: &'static str,
    ) -> Node {
        let netns = empty_netns(name);
        lan.add_veth(name, &netns, "eth0");
        lan.ip(&["link", "set", name, "master", "lan0", "up"]);
        netns.ip(&["addr", "add", &format!("{internal_ip}/24"), "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        Node {
            name,
            internal_ip,
            pod_cidr,
            netns,
            ipam_data: tempfile::Builder::new()
                .prefix("skiff-routes-ipam-")
                .tempdir()
                .expect("IPAM temp dir"),
        }
    }

    fn internal_ip(&self) -> IpAddr {
        self.internal_ip.parse().expect("an IP address")
    }

    /// The bridge's address: the first of the pod CIDR, as host-local's gateway.
    fn gateway(&self) -> IpAddr {
        let network = self.pod_cidr.split('/').next().expect("a CIDR");
        let network: std::net::Ipv4Addr = network.parse().expect("an IPv4 network");
        IpAddr::V4((u32::from(network) + 1).into())
    }

    /// The node's pod network as a kubelet-style configuration would give it: a bridge
    /// that is the pods' gateway and default route, no masquerade, host-local IPAM.
    fn cni_config(&self) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": POD_NETWORK,
            "type": "skiff-cni",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": self.pod_cidr,
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.ipam_data.path(),
            },
        })
    }

    /// Runs skiff-cni for one verb as a container runtime would, inside the node's
    /// namespace (the plugin makes its bridge in the namespace it runs in). Returns the
    /// plugin's JSON answer (null when it prints nothing).
    fn cni(&self, command: &str, container_id: &str, pod: &Netns) -> Value {
        let plugin = integration::binary("skiff-cni");
        let plugin_dir = plugin.parent().expect("binary directory");
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.netns.name()])
            .arg(&plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", plugin_dir)
            .env_remove("CNI_ARGS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip netns exec skiff-cni");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(self.cni_config().to_string().as_bytes())
            .expect("write the network configuration");
        let out = child.wait_with_output().expect("wait for skiff-cni");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "skiff-cni {command} {container_id} on {}: {stdout} {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        if stdout.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("skiff-cni {command} printed no JSON ({e}): {stdout}"))
    }

    /// Attaches a new pod with CNI ADD and returns it with the address the plugin gave it.
    fn add_pod(&self, id: &'static str) -> Pod {
        let netns = empty_netns(id);
        let result = self.cni("ADD", id, &netns);
        let address = result["ips"][0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("ADD {id}: no address in {result}"));
        let ip = address
            .split('/')
            .next()
            .and_then(|ip| ip.parse().ok())
            .unwrap_or_else(|| panic!("ADD {id}: bad address {address}"));
        Pod { id, netns, ip }
    }

    /// The reservations left in the IPAM directory (everything but the lock and the
    /// last-reserved hints, which host-local keeps too).
    fn reservations(&self) -> Vec<String> {
        let dir = self.ipam_data.path().join(POD_NETWORK);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read IPAM directory {}: {e}", dir.display()));
        let mut names: Vec<String> = entries
            .map(|e| e.expect("IPAM directory entry").file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip."))
            .collect();
        names.sort();
        names
    }
}

/// A pod: its network namespace (the runtime's sandbox) and the address skiff-cni gave it.
struct Pod {
    id: &'static str,
    netns: Netns,
    ip: IpAddr,
}

#[test]
fn pods_reach_each_other_across_nodes_through_the_agents_host_gw_routes() {
    require_root();
    let p = ROUTE_PROTOCOL;
    // The lan between the nodes: a bridge in a namespace of its own.
    let lan = empty_netns("lan");
    lan.ip(&["link", "add", "lan0", "type", "bridge"]);
    lan.ip(&["link", "set", "lan0", "up"]);
    let node_a = Node::new(&lan, "node-a", "192.0.2.1", "10.88.1.0/24");
    let node_b = Node::new(&lan, "node-b", "192.0.2.2", "10.88.2.0/24");
    let pod_a = node_a.add_pod("pod-a");
    let pod_b = node_b.add_pod("pod-b");
    for node in [&node_a, &node_b] {
        // A runtime never writes this sysctl: the plugin does, for a gateway bridge.
        assert_eq!(
            node.netns.ipv4_forwarding(),
            "1",
            "IPv4 forwarding in {} after ADD",
            node.name
        );
    }

    // Before any route between the nodes, the pods cannot reach each other.
    let server = Server::start(&pod_b.netns.path(), pod_b.ip, "pod-b");
    let early = ask(&pod_a.netns.path(), server.address);
    assert_eq!(server.finish(), None, "pod-b was reached before any route");
    assert!(
        early.is_err(),
        "pod-a reached pod-b before any route: {early:?}"
    );

    let plane = ControlPlane::start();
    let mut manifest = String::new();
    for each in [&node_a, &node_b] {
        manifest.push_str("---\n");
        manifest.push_str(&node(each.name, each.pod_cidr, each.internal_ip));
    }
    apply(&plane, &manifest);
    let _reconcilers =
        [&node_a, &node_b].map(|node| Reconciler::start(&plane, node.name, &node.netns.path()));
    node_a.netns.wait_routes(
        "node-a's routes",
        &[&format!("10.88.2.0/24 via 192.0.2.2 proto {p}")],
    );
    node_b.netns.wait_routes(
        "node-b's routes",
        &[&format!("10.88.1.0/24 via 192.0.2.1 proto {p}")],
    );

    // Pod to pod across the nodes, both ways: no masquerade, each side sees the other
    // pod's own address.
    let seen = exchange(
        "pod-a -> pod-b",
        &pod_a.netns.path(),
        &pod_b.netns.path(),
        pod_b.ip,
        "pod-b",
    );
    assert_eq!(seen, pod_a.ip, "pod-b's server saw pod-a as");
    let seen = exchange(
        "pod-b -> pod-a",
        &pod_b.netns.path(),
        &pod_a.netns.path(),
        pod_a.ip,
        "pod-a",
    );
    assert_eq!(seen, pod_b.ip, "pod-a's server saw pod-b as");

    // Pod to its own node, on its lan address and on the bridge (the pods' gateway).
    for (what, ip) in [
        ("pod-a -> node-a's lan address", node_a.internal_ip()),
        ("pod-a -> node-a's bridge", node_a.gateway()),
    ] {
        let seen = exchange(
            what,
            &pod_a.netns.path(),
            &node_a.netns.path(),
            ip,
            "node-a",
        );
        assert_eq!(seen, pod_a.ip, "{what}: node-a's server saw pod-a as");
    }

    // Pod to the other node: node-b answers through its route back to node-a's pods.
    let seen = exchange(
        "pod-a -> node-b",
        &pod_a.netns.path(),
        &node_b.netns.path(),
        node_b.internal_ip(),
        "node-b",
    );
    assert_eq!(seen, pod_a.ip, "node-b's server saw pod-a as");

    // The runtime tears the pods down: DEL frees every address and removes the links.
    for (node, pod) in [(&node_a, &pod_a), (&node_b, &pod_b)] {
        node.cni("DEL", pod.id, &pod.netns);
        assert_eq!(
            node.reservations(),
            Vec::<String>::new(),
            "IPAM reservations left on {} after DEL of {}",
            node.name,
            pod.id
        );
        assert_eq!(
            pod.netns.link_names(),
            BTreeSet::from(["lo".to_owned()]),
            "links left in {} after DEL",
            pod.id
        );
        let host_veths: Vec<String> = node
            .netns
            .link_names()
            .into_iter()
            .filter(|l| l.starts_with("veth"))
            .collect();
        assert_eq!(
            host_veths,
            Vec::<String>::new(),
            "host veths left on {} after DEL of {}",
            node.name,
            pod.id
        );
    }
}
