//! The service load balancer end to end: Services and EndpointSlices created with the real
//! kubectl, programmed by a real `skiff-agent` into maps pinned under its bpffs, used by a
//! client process in the pods' cgroup, inspected with `agentctl`, and surviving `kill -9`
//! of the agent. Backends are network namespaces the test makes (a Service without a
//! selector with hand-written EndpointSlices, as for any external backend). Root only.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use integration::ControlPlane;
use integration::containerd::Containerd;
use integration::lbnet::{self, Exchange, Topology};
use integration::netns::Netns;
use integration::node::Node;
use integration::oci_image::ImageBuilder;
use serde_json::Value;

/// A cgroup for the client inside the agent's pods cgroup, where the socket hooks are.
struct ClientCgroup(PathBuf);

impl Drop for ClientCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn agentctl(node: &Node, plane: &ControlPlane, args: &[&str]) -> Output {
    Command::new(integration::binary("agentctl"))
        .args(args)
        .arg("--bpffs-dir")
        .arg(&node.bpffs_dir)
        .arg("--kubeconfig")
        .arg(&plane.kubeconfig)
        .args(["--node-name", &node.name])
        .output()
        .expect("run agentctl")
}

fn agentctl_ok(node: &Node, plane: &ControlPlane, args: &[&str]) -> String {
    let output = agentctl(node, plane, args);
    assert!(
        output.status.success(),
        "agentctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn dump(bpffs: &Path, map: &str) -> String {
    let output = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(bpffs.join(map))
        .output()
        .expect("run bpftool");
    assert!(
        output.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // bpftool prints in hash order, which is stable for the same contents.
    let mut lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines.join("\n")
}

fn slice_manifest(addresses: &[Ipv4Addr]) -> String {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|address| serde_json::json!({"addresses": [address.to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 8080, "protocol": "UDP"}
        ]
    })
    .to_string()
}

fn backends_seen(
    exchanges: &[Exchange],
    service: SocketAddr,
) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for exchange in exchanges {
        match exchange {
            Exchange::Reply { peer, backend } => {
                assert_eq!(*peer, service);
                *counts.entry(backend.clone()).or_insert(0) += 1;
            }
            Exchange::Error(error) => panic!("exchange with {service} failed: {error}"),
        }
    }
    counts
}

#[test]
fn services_through_the_agent_follow_endpoint_slices_and_survive_its_kill() {
    integration::require_root("the agent loads BPF programs and the test makes network namespaces");
    integration::require_tool(
        "bpftool",
        "apt-get install bpftool (cargo xtask test installs it)",
    );
    let plane = ControlPlane::start();
    let containerd = Containerd::start();
    let mut node = Node::start(&plane, &containerd, &[]);
    let topology = Topology::new(3);
    topology.serve(8080);
    let cgroup = ClientCgroup(
        node.cgroup_dir
            .join("kubepods")
            .join(format!("lbclient-{}", integration::unique_suffix())),
    );
    std::fs::create_dir(&cgroup.0).expect("create the client's cgroup under the pods' cgroup");
    let client = |to: SocketAddr, mode: &str, count: usize| {
        lbnet::client(&cgroup.0, &topology.client_netns(), to, mode, count)
    };

    let service = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 53, "targetPort": 8080, "protocol": "UDP"}
        ]}
    });
    let applied = plane.kubectl_stdin(&["apply", "-f", "-"], &service.to_string());
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let backends = [
        lbnet::pod_address(1),
        lbnet::pod_address(2),
        lbnet::pod_address(3),
    ];
    let applied = plane.kubectl_stdin(&["apply", "-f", "-"], &slice_manifest(&backends));
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let cluster_ip: Ipv4Addr = plane
        .kubectl(&["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"])
        .trim()
        .parse()
        .expect("a ClusterIP");
    let http = SocketAddr::from((cluster_ip, 80));
    let dns = SocketAddr::from((cluster_ip, 53));

    // The agent programs the Service within moments of its creation.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if matches!(client(http, "tcp", 1).as_slice(), [Exchange::Reply { .. }]) {
            break;
        }
        assert!(Instant::now() < deadline, "the ClusterIP never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let tcp = backends_seen(&client(http, "tcp", 300), http);
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    let udp = backends_seen(&client(dns, "udp", 60), dns);
    assert_eq!(udp.len(), 3, "{udp:?}");

    // agentctl reads the maps; explain finds them equal to the API.
    let listed: Value = serde_json::from_str(&agentctl_ok(
        &node,
        &plane,
        &["lb", "get", "default/web", "-o", "json"],
    ))
    .expect("agentctl lb get JSON");
    let frontends = listed.as_array().expect("a list of frontends");
    assert_eq!(frontends.len(), 2, "{listed:#}");
    let connections: u64 = frontends
        .iter()
        .flat_map(|frontend| frontend["backends"].as_array().expect("backends").iter())
        .map(|backend| backend["connections"].as_u64().expect("a counter"))
        .sum();
    assert!(connections >= 361, "per-backend counters: {connections}");
    let explained = agentctl_ok(&node, &plane, &["explain", "service", "default/web"]);
    assert!(explained.contains("In sync"), "{explained}");
    let table = agentctl_ok(&node, &plane, &["lb", "list"]);
    assert!(
        table.contains("default/web:http") && table.contains(&format!("{cluster_ip}:80/TCP")),
        "{table}"
    );

    // kill -9 of the agent in the middle of a steady stream loses no request, agentctl
    // still reads the maps, and the restarted agent writes nothing when nothing changed.
    let before = (
        dump(&node.bpffs_dir, "lb4_services"),
        dump(&node.bpffs_dir, "lb4_backends"),
    );
    let stream = {
        let cgroup = cgroup.0.clone();
        let netns = topology.client_netns();
        std::thread::spawn(move || lbnet::client(&cgroup, &netns, http, "tcp", 1500))
    };
    std::thread::sleep(Duration::from_millis(150));
    node.kill();
    let while_down = agentctl_ok(&node, &plane, &["lb", "list"]);
    assert!(while_down.contains("default/web"), "{while_down}");
    node.restart(&plane);
    let streamed = backends_seen(&stream.join().expect("stream thread"), http);
    assert_eq!(streamed.values().sum::<usize>(), 1500, "{streamed:?}");
    let log = node.temp_dir().join("agent.log");
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("load balancer maps in step")
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the restarted agent never synced its maps"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = (
        dump(&node.bpffs_dir, "lb4_services"),
        dump(&node.bpffs_dir, "lb4_backends"),
    );
    assert!(
        before == after,
        "a restarted agent changed the maps although nothing changed"
    );

    // An endpoint leaves the slice: new connections stop reaching it.
    let applied = plane.kubectl_stdin(&["apply", "-f", "-"], &slice_manifest(&backends[..2]));
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = backends_seen(&client(http, "tcp", 30), http);
        if !seen.contains_key("b3") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b3 still chosen after leaving the slice: {seen:?}"
        );
    }
    let seen = backends_seen(&client(http, "tcp", 200), http);
    assert!(!seen.contains_key("b3") && seen.len() == 2, "{seen:?}");
    let explained = agentctl_ok(&node, &plane, &["explain", "service", "default/web"]);
    assert!(explained.contains("In sync"), "{explained}");

    // With the agent down, the slice changes (b2 out, b3 back): the maps keep the old
    // backends, and explain names each difference for each frontend of the Service.
    node.kill();
    let applied = plane.kubectl_stdin(
        &["apply", "-f", "-"],
        &slice_manifest(&[backends[0], backends[2]]),
    );
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let explained: Value = serde_json::from_str(&agentctl_ok(
        &node,
        &plane,
        &["explain", "service", "default/web", "-o", "json"],
    ))
    .expect("agentctl explain JSON");
    let differences: Vec<(String, String)> = explained["differences"]
        .as_array()
        .expect("a list of differences")
        .iter()
        .map(|difference| {
            let field = |name: &str| {
                difference[name]
                    .as_str()
                    .unwrap_or_else(|| panic!("difference without {name}: {difference}"))
                    .to_owned()
            };
            (field("frontend"), field("what"))
        })
        .collect();
    let mut expected = Vec::new();
    for frontend in [
        format!("{http}/TCP internal"),
        format!("{dns}/UDP internal"),
    ] {
        expected.push((
            frontend.clone(),
            format!("backend {}:8080 missing from the maps", backends[2]),
        ));
        expected.push((
            frontend,
            format!(
                "backend {}:8080 in the maps but not in the API",
                backends[1]
            ),
        ));
    }
    let mut sorted = differences.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "{explained:#}");
    let listed: Value =
        serde_json::from_str(&agentctl_ok(&node, &plane, &["lb", "list", "-o", "json"]))
            .expect("agentctl lb list JSON");
    let web: Vec<&Value> = listed["frontends"]
        .as_array()
        .expect("a list of frontends")
        .iter()
        .filter(|frontend| frontend["namespace"] == "default" && frontend["service"] == "web")
        .collect();
    assert_eq!(web.len(), 2, "{listed:#}");
    for frontend in web {
        let mut held: Vec<&str> = frontend["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|backend| backend["address"].as_str().expect("an address"))
            .collect();
        held.sort_unstable();
        assert_eq!(
            held,
            [backends[0].to_string(), backends[1].to_string()],
            "the maps are untouched while the agent is down: {frontend:#}"
        );
    }
    assert!(
        listed["services_map"]["max_entries"].as_u64().is_some(),
        "{listed:#}"
    );
    // The restarted agent catches up with the change it missed.
    node.restart(&plane);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let explained = agentctl_ok(&node, &plane, &["explain", "service", "default/web"]);
        if explained.contains("In sync") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted agent never applied the change: {explained}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = backends_seen(&client(http, "tcp", 200), http);
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        ["b1", "b3"],
        "{seen:?}"
    );

    // The Service goes: its frontends go.
    plane.kubectl(&["delete", "service", "web"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while agentctl_ok(&node, &plane, &["lb", "list"]).contains("default/web") {
        assert!(
            Instant::now() < deadline,
            "frontends of a deleted Service stayed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(cgroup);
}

/// A veth pair of the test's own: `host` in the machine's namespace with `host_ip`/24, its
/// peer as `eth0` in a new "outside" namespace with `client_ip`/24. Removed on drop (the
/// link here, then the namespace).
struct OutsideLink {
    host: String,
    netns: Netns,
}

impl OutsideLink {
    fn new(host_ip: Ipv4Addr, client_ip: Ipv4Addr) -> Self {
        let suffix = integration::unique_suffix();
        let link = Self {
            host: format!("skx{}", &suffix[suffix.len().saturating_sub(8)..]),
            netns: Netns::add(format!("lbext-{suffix}")),
        };
        let run = |args: &[&str]| {
            let output = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                output.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        run(&[
            "link",
            "add",
            &link.host,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            link.netns.name(),
        ]);
        run(&["addr", "add", &format!("{host_ip}/24"), "dev", &link.host]);
        run(&["link", "set", &link.host, "up"]);
        link.netns
            .ip(&["addr", "add", &format!("{client_ip}/24"), "dev", "eth0"]);
        link.netns.ip(&["link", "set", "eth0", "up"]);
        link
    }
}

impl Drop for OutsideLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .status();
    }
}

/// One TCP exchange from the outside namespace (no cgroup: the socket hooks are not on the
/// path, only the tc programs on the node's interface).
fn from_outside(netns: &Netns, to: SocketAddr, count: usize) -> Vec<Exchange> {
    let output = Command::new(integration::binary("lb-client"))
        .arg("--netns")
        .arg(netns.path())
        .args([
            "--to",
            &to.to_string(),
            "tcp",
            "--count",
            &count.to_string(),
        ])
        .output()
        .expect("run lb-client");
    assert!(
        output.status.success(),
        "lb-client: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| match line.split_once(" reply=") {
            Some((_, backend)) => Exchange::Reply {
                peer: to,
                backend: backend.to_owned(),
            },
            None => Exchange::Error(line.to_owned()),
        })
        .collect()
}

#[test]
fn node_ports_from_outside_the_node_reach_its_pods_under_both_traffic_policies() {
    integration::require_root(
        "the agent loads BPF programs and the test makes links and namespaces",
    );
    let plane = ControlPlane::start();
    let containerd = Containerd::start();
    // The node's address is on a link of the test's own, towards an "outside" namespace.
    let octet = u8::try_from(std::process::id() % 200).expect("small") + 20;
    let node_ip = Ipv4Addr::new(198, 18, octet, 1);
    let client_ip = Ipv4Addr::new(198, 18, octet, 2);
    let outside = OutsideLink::new(node_ip, client_ip);
    let node_ip_text = node_ip.to_string();
    let node = Node::start(
        &plane,
        &containerd,
        &[
            "--node-ip",
            &node_ip_text,
            "--nodeport-interfaces",
            &outside.host,
        ],
    );
    let temp = tempfile::tempdir().expect("temp dir");
    let archive = temp.path().join("busybox.tar");
    ImageBuilder::busybox().write_archive(&archive, "1");
    node.import_image(&containerd, &archive, "skiff.test/busybox:1");

    // Two pods answering each connection with their name, after reading the request (a
    // socket closed with unread data resets the connection).
    let server = "printf '#!/bin/sh\\nread request\\necho $HOSTNAME\\n' > /tmp/reply; chmod +x /tmp/reply; exec nc -ll -p 8080 -e /tmp/reply";
    for name in ["echo-a", "echo-b"] {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "echo"}},
            "spec": {"nodeName": node.name, "containers": [{
                "name": "echo", "image": "skiff.test/busybox:1",
                "command": ["sh", "-c", server],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
            }]}
        });
        let applied = plane.kubectl_stdin(&["apply", "-f", "-"], &pod.to_string());
        assert!(
            applied.status.success(),
            "{}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }
    for policy in ["Local", "Cluster"] {
        let service = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("echo-{}", policy.to_lowercase())},
            "spec": {"type": "NodePort", "selector": {"app": "echo"}, "externalTrafficPolicy": policy,
                     "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}
        });
        let applied = plane.kubectl_stdin(&["apply", "-f", "-"], &service.to_string());
        assert!(
            applied.status.success(),
            "{}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }
    for policy in ["local", "cluster"] {
        let node_port: u16 = plane
            .kubectl(&[
                "get",
                "service",
                &format!("echo-{policy}"),
                "-o",
                "jsonpath={.spec.ports[0].nodePort}",
            ])
            .trim()
            .parse()
            .expect("a nodePort");
        let frontend = SocketAddr::from((node_ip, node_port));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 2 {
            let mut errors = Vec::new();
            for exchange in from_outside(&outside.netns, frontend, 10) {
                match exchange {
                    Exchange::Reply { backend, .. } if !backend.is_empty() => {
                        seen.insert(backend);
                    }
                    other => errors.push(other),
                }
            }
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(node.temp_dir().join("agent.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "NodePort {frontend} ({policy}) from outside reached only {seen:?}; last errors {errors:?}\npods:\n{}\nmaps:\n{}\nagent log (last lines first):\n{}",
                    plane.kubectl(&["get", "pods", "-o", "wide"]),
                    String::from_utf8_lossy(&agentctl(&node, &plane, &["lb", "list"]).stdout),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            seen,
            ["echo-a".to_owned(), "echo-b".to_owned()].into(),
            "{policy}"
        );
    }
    // The tc programs tracked the flows, without translating the client's address: the
    // backends are on this node, so neither policy needs SNAT.
    let tracked: Value =
        serde_json::from_str(&agentctl_ok(&node, &plane, &["ct", "list", "-o", "json"]))
            .expect("agentctl ct list JSON");
    let flows = tracked.as_array().expect("a list of connections");
    assert!(!flows.is_empty(), "no tracked connection");
    for flow in flows {
        let client = flow["client"]
            .as_str()
            .and_then(|client| client.split(':').next());
        assert_eq!(client, Some(client_ip.to_string().as_str()), "{flow}");
        assert!(flow["snat"].is_null(), "{flow}");
    }
}
