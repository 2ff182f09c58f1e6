//! CNI 1.1 end to end with skiff-cni alone (the reference plugins stop at 1.0.0): ADD,
//! CHECK (and CHECK noticing drift), STATUS (ready, exhausted, bridge gone), GC, DEL, and
//! ADD inside a chain with a prevResult. Root only.

mod common;

use common::*;
use serde_json::{Value, json};

fn config(data: &std::path::Path, subnet: &str) -> Value {
    json!({
        "cniVersion": "1.1.0", "name": "life", "type": "skiff-cni", "bridge": "skbr0",
        "isDefaultGateway": true, "mtu": 1450,
        "ipam": {"type": "host-local", "subnet": subnet, "dataDir": data},
    })
}

fn call<'a>(command: &'a str, id: &'a str, netns: Option<&'a str>) -> Call<'a> {
    Call {
        command,
        container_id: id,
        netns,
        ifname: "eth0",
    }
}

fn code(run: &PluginRun) -> u64 {
    assert!(!run.exit_ok, "expected a failure, got {}", run.stdout);
    run.json()["code"].as_u64().unwrap()
}

#[test]
fn cni_1_1_lifecycle() {
    require_root_tools();
    let host = Netns::new("skh");
    let pod = Netns::new("skp");
    let data = tempfile::tempdir().unwrap();
    let conf = config(data.path(), "10.70.0.0/24");
    let bin = skiff_bin();
    let path = pod.path();

    run_plugin(&bin, &host, &call("STATUS", "", None), &conf).expect_ok("STATUS before any pod");
    let result = run_plugin(&bin, &host, &call("ADD", "life-1", Some(&path)), &conf)
        .expect_ok("ADD")
        .json();
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["interfaces"][2]["mtu"], 1450);
    assert_eq!(result["interfaces"][2]["sandbox"], json!(path));
    assert_eq!(result["ips"][0]["interface"], 2);
    assert_eq!(
        result["routes"][0],
        json!({"dst": "0.0.0.0/0", "gw": "10.70.0.1"})
    );
    assert!(pod.ip(&["link", "show", "eth0"]).contains("mtu 1450"));

    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result.clone();
    run_plugin(
        &bin,
        &host,
        &call("CHECK", "life-1", Some(&path)),
        &with_prev,
    )
    .expect_ok("CHECK");
    run_plugin(&bin, &host, &call("STATUS", "", None), &conf).expect_ok("STATUS");

    // Drift: the pod's default route disappears; CHECK says so.
    pod.ip(&["route", "del", "default"]);
    let drift = run_plugin(
        &bin,
        &host,
        &call("CHECK", "life-1", Some(&path)),
        &with_prev,
    );
    assert_eq!(code(&drift), 102, "{}", drift.stdout);
    assert!(drift.json()["msg"].as_str().unwrap().contains("0.0.0.0/0"));

    // GC with the attachment listed keeps it.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "life-1", "ifname": "eth0"}]);
    run_plugin(&bin, &host, &call("GC", "", None), &gc).expect_ok("GC");
    assert_eq!(reservations(&data.path().join("life")).len(), 1);
    assert!(
        host.ip(&["-o", "link", "show", "master", "skbr0"])
            .contains("veth")
    );

    // The bridge vanishing under attached pods makes the plugin not ready.
    host.ip(&["link", "del", "skbr0"]);
    let status = run_plugin(&bin, &host, &call("STATUS", "", None), &conf);
    assert_eq!(code(&status), 50, "{}", status.stdout);

    run_plugin(&bin, &host, &call("DEL", "life-1", Some(&path)), &conf).expect_ok("DEL");
    run_plugin(&bin, &host, &call("DEL", "life-1", Some(&path)), &conf).expect_ok("DEL again");
    run_plugin(&bin, &host, &call("DEL", "life-1", None), &conf).expect_ok("DEL without netns");
    assert!(reservations(&data.path().join("life")).is_empty());
    assert_eq!(pod.ip(&["-o", "link", "show"]).lines().count(), 1);
    run_plugin(&bin, &host, &call("STATUS", "", None), &conf).expect_ok("STATUS after DEL");
}

#[test]
fn status_reports_an_exhausted_range() {
    require_root_tools();
    let host = Netns::new("skh");
    let pod = Netns::new("skp");
    let data = tempfile::tempdir().unwrap();
    let conf = config(data.path(), "10.71.0.0/30");
    let bin = skiff_bin();
    run_plugin(&bin, &host, &call("ADD", "only", Some(&pod.path())), &conf).expect_ok("ADD");
    let status = run_plugin(&bin, &host, &call("STATUS", "", None), &conf);
    assert_eq!(code(&status), 50);
    assert!(
        status.json()["msg"]
            .as_str()
            .unwrap()
            .contains("no IP addresses available")
    );
    run_plugin(&bin, &host, &call("DEL", "only", Some(&pod.path())), &conf).expect_ok("DEL");
    run_plugin(&bin, &host, &call("STATUS", "", None), &conf).expect_ok("STATUS");
}

/// In a conflist, an earlier plugin's result arrives as prevResult; skiff-cni's result
/// keeps it and appends its own interfaces, pointing its IPs at its own interface.
#[test]
fn add_in_a_chain_keeps_the_previous_result() {
    require_root_tools();
    let host = Netns::new("skh");
    let pod = Netns::new("skp");
    let data = tempfile::tempdir().unwrap();
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let mut conf = config(data.path(), "10.72.0.0/24");
        conf["cniVersion"] = json!(version);
        let mut prev = json!({
            "cniVersion": version,
            "interfaces": [{"name": "dummy0", "sandbox": pod.path()}],
            "ips": [{"interface": 0, "address": "192.0.2.5/24"}],
        });
        if version == "0.4.0" {
            prev["ips"][0]["version"] = json!("4");
        }
        conf["prevResult"] = prev;
        let id = format!("chain-{}", version.replace('.', ""));
        let ifname = format!("eth{}", version.replace('.', ""));
        let result = run_plugin(
            &skiff_bin(),
            &host,
            &Call {
                command: "ADD",
                container_id: &id,
                netns: Some(&pod.path()),
                ifname: &ifname,
            },
            &conf,
        )
        .expect_ok("chained ADD")
        .json();
        assert_eq!(result["cniVersion"], json!(version));
        assert_eq!(result["interfaces"][0]["name"], "dummy0");
        assert_eq!(result["interfaces"][3]["name"], json!(ifname));
        assert_eq!(result["ips"][0]["address"], "192.0.2.5/24");
        assert_eq!(result["ips"][1]["interface"], 3);
        if version == "0.4.0" {
            assert_eq!(result["ips"][1]["version"], "4");
        }
    }
}

/// Dual stack: one address per family from two range sets, default routes for both, and
/// pods reaching each other and their gateway over IPv6 (no DAD delay: addresses are
/// added with NODAD).
#[test]
fn dual_stack_pods_talk_over_both_families() {
    require_root_tools();
    let host = Netns::new("skh");
    let data = tempfile::tempdir().unwrap();
    let conf = json!({
        "cniVersion": "1.0.0", "name": "dual", "type": "skiff-cni", "bridge": "skbr0",
        "isDefaultGateway": true,
        "ipam": {"type": "host-local", "dataDir": data.path(), "ranges": [
            [{"subnet": "10.73.0.0/24"}], [{"subnet": "fd73::/64"}]]},
    });
    let mut pods = Vec::new();
    for id in ["dual-a", "dual-b"] {
        let pod = Netns::new("skp");
        let result = run_plugin(
            &skiff_bin(),
            &host,
            &call("ADD", id, Some(&pod.path())),
            &conf,
        )
        .expect_ok("ADD")
        .json();
        let ips: Vec<std::net::IpAddr> = result["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| {
                ip["address"]
                    .as_str()
                    .unwrap()
                    .split('/')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(ips.len(), 2, "{result}");
        assert!(ips[0].is_ipv4() && ips[1].is_ipv6());
        let routes: Vec<&str> = result["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["dst"].as_str().unwrap())
            .collect();
        assert_eq!(routes, ["0.0.0.0/0", "::/0"]);
        assert!(
            pod.ip(&["-6", "route", "show", "default"])
                .contains("fd73::1")
        );
        pods.push((pod, ips));
    }
    let (a, a_ips) = &pods[0];
    let (b, b_ips) = &pods[1];
    assert!(tcp_reaches(a, b, b_ips[1]), "pod a -> pod b over IPv6");
    assert!(tcp_reaches(b, a, a_ips[0]), "pod b -> pod a over IPv4");
    assert!(
        tcp_reaches(a, &host, "fd73::1".parse().unwrap()),
        "pod a -> its gateway over IPv6"
    );
    for (id, (pod, _)) in ["dual-a", "dual-b"].iter().zip(&pods) {
        run_plugin(
            &skiff_bin(),
            &host,
            &call("DEL", id, Some(&pod.path())),
            &conf,
        )
        .expect_ok("DEL");
    }
    assert!(reservations(&data.path().join("dual")).is_empty());
}
