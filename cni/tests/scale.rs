//! Bursts and crashes: 200 concurrent ADDs into one range set of a /24 and a /25 get
//! distinct addresses and DEL gives every one back; an ADD killed half-way leaves nothing
//! after GC. Root only.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::{Value, json};

fn spawn_plugin(host: &Netns, env: &[(&str, &str)], config: &Value) -> Child {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host.name])
        .arg(skiff_bin())
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    child
}

#[test]
fn two_hundred_concurrent_adds_get_distinct_addresses() {
    require_root_tools();
    const PODS: usize = 200;
    let host = Netns::new("skh");
    let data = tempfile::tempdir().unwrap();
    // The /24 offers 10.61.0.150-254 (105 addresses; its gateway .1 is outside the range),
    // so the burst has to spill into the /25.
    let config = json!({
        "cniVersion": "1.0.0", "name": "burst", "type": "skiff-cni", "bridge": "skbr0",
        "isGateway": true,
        "ipam": {"type": "host-local", "dataDir": data.path(), "ranges": [[
            {"subnet": "10.61.0.0/24", "rangeStart": "10.61.0.150"},
            {"subnet": "10.61.1.0/25"}]]},
    });
    let pods: Vec<Netns> = (0..PODS).map(|_| Netns::new("skp")).collect();
    let ids: Vec<String> = (0..PODS).map(|i| format!("burst-{i}")).collect();
    let children: Vec<Child> = pods
        .iter()
        .zip(&ids)
        .map(|(pod, id)| {
            let netns = pod.path();
            spawn_plugin(
                &host,
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", id),
                    ("CNI_NETNS", &netns),
                    ("CNI_IFNAME", "eth0"),
                ],
                &config,
            )
        })
        .collect();
    let mut addresses = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ADD {i} failed: {stdout}");
        let result: Value = serde_json::from_str(&stdout).unwrap();
        let address = result["ips"][0]["address"].as_str().unwrap().to_owned();
        // The address is really on the pod's interface.
        let shown = pods[i].ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(
            shown.contains(&address),
            "pod {i}: {address} not in {shown}"
        );
        addresses.push(address);
    }
    let distinct: HashSet<&String> = addresses.iter().collect();
    assert_eq!(distinct.len(), PODS, "duplicate addresses handed out");
    assert!(addresses.iter().any(|a| a.starts_with("10.61.0.")));
    assert!(addresses.iter().any(|a| a.starts_with("10.61.1.")));
    let network_dir = data.path().join("burst");
    assert_eq!(reservations(&network_dir).len(), PODS);
    let ports = host
        .ip(&["-o", "link", "show", "master", "skbr0"])
        .lines()
        .count();
    assert_eq!(ports, PODS);

    let children: Vec<Child> = pods
        .iter()
        .zip(&ids)
        .map(|(pod, id)| {
            let netns = pod.path();
            spawn_plugin(
                &host,
                &[
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", id),
                    ("CNI_NETNS", &netns),
                    ("CNI_IFNAME", "eth0"),
                ],
                &config,
            )
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "DEL {i} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(
        reservations(&network_dir),
        Vec::<String>::new(),
        "allocation directory not empty"
    );
    let ports = host
        .ip(&["-o", "link", "show", "master", "skbr0"])
        .lines()
        .count();
    assert_eq!(ports, 0, "veths left on the bridge");
}

#[test]
fn add_killed_half_way_leaves_nothing_after_gc() {
    require_root_tools();
    let host = Netns::new("skh");
    let data = tempfile::tempdir().unwrap();
    let config = json!({
        "cniVersion": "1.1.0", "name": "crashy", "type": "skiff-cni", "bridge": "skbr0",
        "isGateway": true,
        "ipam": {"type": "host-local", "dataDir": data.path(), "subnet": "10.62.0.0/24"},
    });
    let network_dir = data.path().join("crashy");
    let mut survivors = Vec::new();
    let mut keep = Vec::new();
    for failpoint in ["after-ipam", "after-veth"] {
        // An ADD that dies at the failpoint, as under kill -9 or a node crash.
        let crashed_pod = Netns::new("skc");
        let crashed_id = format!("crashed-{failpoint}");
        let out = spawn_plugin(
            &host,
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", &crashed_id),
                ("CNI_NETNS", &crashed_pod.path()),
                ("CNI_IFNAME", "eth0"),
                ("SKIFF_CNI_FAILPOINT", failpoint),
            ],
            &config,
        )
        .wait_with_output()
        .unwrap();
        assert!(
            !out.status.success(),
            "the failpoint {failpoint} did not fire"
        );
        // The crash left its reservation behind (and, after the veth, the pair).
        assert_eq!(
            reservations(&network_dir).len(),
            survivors.len() + 1,
            "{failpoint}"
        );

        // Life goes on: the next ADD gets another address.
        let pod = Netns::new("skp");
        let id = format!("alive-{failpoint}");
        let out = run_plugin(
            &skiff_bin(),
            &host,
            &Call {
                command: "ADD",
                container_id: &id,
                netns: Some(&pod.path()),
                ifname: "eth0",
            },
            &config,
        )
        .expect_ok("ADD after the crash");
        survivors.push((
            id,
            out.json()["ips"][0]["address"].as_str().unwrap().to_owned(),
        ));
        keep.push((pod, crashed_pod));

        // GC with the runtime's list of live attachments reclaims the crashed one.
        let mut gc = config.clone();
        gc["cni.dev/valid-attachments"] = Value::Array(
            survivors
                .iter()
                .map(|(id, _)| json!({"containerID": id, "ifname": "eth0"}))
                .collect(),
        );
        run_plugin(
            &skiff_bin(),
            &host,
            &Call {
                command: "GC",
                container_id: "",
                netns: None,
                ifname: "",
            },
            &gc,
        )
        .expect_ok("GC");
        let left = reservations(&network_dir);
        let want: Vec<String> = {
            let mut w: Vec<String> = survivors
                .iter()
                .map(|(_, a)| a.split('/').next().unwrap().to_owned())
                .collect();
            w.sort();
            w
        };
        assert_eq!(left, want, "after GC ({failpoint})");
        let ports = host
            .ip(&["-o", "link", "show", "master", "skbr0"])
            .lines()
            .count();
        assert_eq!(ports, survivors.len(), "veths after GC ({failpoint})");
        let (_, crashed_pod) = keep.last().unwrap();
        assert_eq!(
            crashed_pod.ip(&["-o", "link", "show"]).lines().count(),
            1,
            "crashed pod still has eth0"
        );
        // STATUS is ready again.
        run_plugin(
            &skiff_bin(),
            &host,
            &Call {
                command: "STATUS",
                container_id: "",
                netns: None,
                ifname: "",
            },
            &config,
        )
        .expect_ok("STATUS");
    }
}
