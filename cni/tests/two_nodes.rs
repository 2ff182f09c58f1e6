//! Two "nodes" (network namespaces on an underlay bridge the test creates), each running
//! skiff-cni for its own pod CIDR, joined by host-gw routes the test installs itself (the
//! agent's job later): pod to pod across nodes, pod to its own node, pod to the other
//! node. Root only.

mod common;

use std::net::IpAddr;

use common::*;
use serde_json::json;

struct Node {
    ns: Netns,
    underlay_ip: &'static str,
    pod_cidr: &'static str,
    data: tempfile::TempDir,
}

fn add_pod(node: &Node, id: &str) -> (Netns, IpAddr) {
    let pod = Netns::new("skp");
    let config = json!({
        "cniVersion": "1.0.0", "name": "podnet", "type": "skiff-cni", "bridge": "skbr0",
        "isDefaultGateway": true,
        "ipam": {"type": "host-local", "subnet": node.pod_cidr, "dataDir": node.data.path()},
    });
    let out = run_plugin(
        &skiff_bin(),
        &node.ns,
        &Call {
            command: "ADD",
            container_id: id,
            netns: Some(&pod.path()),
            ifname: "eth0",
        },
        &config,
    )
    .expect_ok("ADD");
    let address = out.json()["ips"][0]["address"].as_str().unwrap().to_owned();
    let ip: IpAddr = address.split('/').next().unwrap().parse().unwrap();
    (pod, ip)
}

#[test]
fn pods_reach_each_other_across_nodes_through_host_gw_routes() {
    require_root_tools();
    let underlay = Netns::new("sku");
    underlay.ip(&["link", "add", "skul0", "type", "bridge"]);
    underlay.ip(&["link", "set", "skul0", "up"]);
    let nodes: Vec<Node> = [
        ("10.250.0.1", "10.251.1.0/24"),
        ("10.250.0.2", "10.251.2.0/24"),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (underlay_ip, pod_cidr))| {
        let ns = Netns::new("skn");
        // The node's uplink: one end on the underlay bridge, the other in the node.
        let uplink = format!("skup{i}");
        underlay.ip(&[
            "link", "add", &uplink, "type", "veth", "peer", "name", "uplink0", "netns", &ns.name,
        ]);
        underlay.ip(&["link", "set", &uplink, "master", "skul0", "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{underlay_ip}/24"),
            "dev",
            "uplink0",
        ]);
        ns.ip(&["link", "set", "uplink0", "up"]);
        Node {
            ns,
            underlay_ip,
            pod_cidr,
            data: tempfile::tempdir().unwrap(),
        }
    })
    .collect();
    let (pod_a, ip_a) = add_pod(&nodes[0], "pod-a");
    let (pod_a2, ip_a2) = add_pod(&nodes[0], "pod-a2");
    let (pod_b, ip_b) = add_pod(&nodes[1], "pod-b");

    // Without routes between the nodes, the pods cannot reach each other.
    assert!(
        !tcp_reaches(&pod_a, &pod_b, ip_b),
        "pods reached each other before any route"
    );

    // host-gw: each node routes the other's pod CIDR via the other's underlay address.
    nodes[0].ns.ip(&[
        "route",
        "add",
        nodes[1].pod_cidr,
        "via",
        nodes[1].underlay_ip,
    ]);
    nodes[1].ns.ip(&[
        "route",
        "add",
        nodes[0].pod_cidr,
        "via",
        nodes[0].underlay_ip,
    ]);

    assert!(
        tcp_reaches(&pod_a, &pod_b, ip_b),
        "pod a -> pod b across nodes"
    );
    assert!(
        tcp_reaches(&pod_b, &pod_a, ip_a),
        "pod b -> pod a across nodes"
    );
    assert!(
        tcp_reaches(&pod_a, &pod_a2, ip_a2),
        "pod a -> pod a2 on the same node"
    );
    let own_gateway: IpAddr = "10.251.1.1".parse().unwrap();
    assert!(
        tcp_reaches(&pod_a, &nodes[0].ns, own_gateway),
        "pod a -> its own node"
    );
    let other_node: IpAddr = nodes[1].underlay_ip.parse().unwrap();
    assert!(
        tcp_reaches(&pod_a, &nodes[1].ns, other_node),
        "pod a -> the other node"
    );
    let node_to_pod: IpAddr = ip_b;
    assert!(
        tcp_reaches(&nodes[0].ns, &pod_b, node_to_pod),
        "node a -> pod b"
    );
}

/// With `ipMasq`, a pod reaches an outside host that has no route back to the pod CIDR,
/// and that host sees the node's address; traffic between pods keeps its source.
#[test]
fn ip_masq_rewrites_source_of_traffic_leaving_the_pod_cidr() {
    require_root_tools();
    let node = Netns::new("skn");
    let outside = Netns::new("sko");
    node.ip(&[
        "link",
        "add",
        "uplink0",
        "type",
        "veth",
        "peer",
        "name",
        "wan0",
        "netns",
        &outside.name,
    ]);
    node.ip(&["addr", "add", "10.253.0.1/24", "dev", "uplink0"]);
    node.ip(&["link", "set", "uplink0", "up"]);
    outside.ip(&["addr", "add", "10.253.0.2/24", "dev", "wan0"]);
    outside.ip(&["link", "set", "wan0", "up"]);
    let data = tempfile::tempdir().unwrap();
    let config = json!({
        "cniVersion": "1.1.0", "name": "masqnet", "type": "skiff-cni", "bridge": "skbr0",
        "isDefaultGateway": true, "ipMasq": true,
        "ipam": {"type": "host-local", "subnet": "10.254.0.0/24", "dataDir": data.path()},
    });
    let mut pods = Vec::new();
    for id in ["masq-a", "masq-b"] {
        let pod = Netns::new("skp");
        let out = run_plugin(
            &skiff_bin(),
            &node,
            &Call {
                command: "ADD",
                container_id: id,
                netns: Some(&pod.path()),
                ifname: "eth0",
            },
            &config,
        )
        .expect_ok("ADD");
        let ip: IpAddr = out.json()["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        pods.push((pod, ip));
    }
    // The plugin writes nf_tables over netlink; the test reads the result with `nft`.
    let listed = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, "nft", "list", "ruleset"])
        .output()
        .expect("run ip netns exec");
    assert!(
        listed.status.success(),
        "nft list ruleset failed (is nftables installed? apt-get install -y nftables): {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let ruleset = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert_eq!(
        ruleset.matches("masquerade").count(),
        1,
        "one rule per subnet, not per pod:\n{ruleset}"
    );

    let outside_ip: IpAddr = "10.253.0.2".parse().unwrap();
    let seen = tcp_peer_seen(&pods[0].0, &outside, outside_ip);
    assert_eq!(
        seen,
        Some("10.253.0.1".parse().unwrap()),
        "outside should see the node's address"
    );
    let seen = tcp_peer_seen(&pods[0].0, &pods[1].0, pods[1].1);
    assert_eq!(
        seen,
        Some(pods[0].1),
        "pod-to-pod traffic must keep its source"
    );
}
