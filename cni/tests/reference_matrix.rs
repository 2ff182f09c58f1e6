//! The same cases against skiff-cni and the reference `bridge` + `host-local` plugins:
//! what each leaves in the pod's and the host's namespaces, and the result JSON, must
//! match wherever the spec says they must. Root only.

mod common;

use common::*;
use serde_json::{Value, json};

/// One side of the comparison: a host namespace, a pod namespace and an IPAM directory.
struct Side {
    host: Netns,
    pod: Netns,
    pod2: Netns,
    data: tempfile::TempDir,
}

impl Side {
    fn new() -> Side {
        Side {
            host: Netns::new("skh"),
            pod: Netns::new("skp"),
            pod2: Netns::new("skq"),
            data: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self, version: &str, plugin_type: &str, case: &Value) -> Value {
        let mut c = case.clone();
        c["cniVersion"] = json!(version);
        c["name"] = json!("matrix");
        c["type"] = json!(plugin_type);
        c["bridge"] = json!("skbr0");
        c["ipam"]["type"] = json!("host-local");
        c["ipam"]["dataDir"] = json!(self.data.path());
        c
    }
}

fn call<'a>(command: &'a str, id: &'a str, netns: &'a str) -> Call<'a> {
    Call {
        command,
        container_id: id,
        netns: Some(netns),
        ifname: "eth0",
    }
}

/// Runs ADD (two pods), CHECK, DEL (both) with one plugin and records everything.
fn exercise(bin: &std::path::Path, side: &Side, config: &Value) -> Value {
    let add1 = run_plugin(
        bin,
        &side.host,
        &call("ADD", "ctr-one", &side.pod.path()),
        config,
    )
    .expect_ok("ADD 1");
    let add2 = run_plugin(
        bin,
        &side.host,
        &call("ADD", "ctr-two", &side.pod2.path()),
        config,
    )
    .expect_ok("ADD 2");
    let result1 = add1.json();
    let pod_mac = config
        .get("runtimeConfig")
        .map(|_| side.pod.ip_json(&["link", "show", "eth0"])[0]["address"].clone());
    let after_add = json!({
        "host": snapshot(&side.host),
        "host_forwarding": side.host.forwarding(),
        "requested_pod_mac": pod_mac,
        "pod": snapshot(&side.pod),
        "pod2": snapshot(&side.pod2),
        "reservations": reservations(&side.data.path().join("matrix")),
    });
    let mut check_msg = String::new();
    let check = if config["cniVersion"] != "0.3.1" {
        let mut with_prev = config.clone();
        with_prev["prevResult"] = result1.clone();
        let out = run_plugin(
            bin,
            &side.host,
            &call("CHECK", "ctr-one", &side.pod.path()),
            &with_prev,
        );
        if !out.exit_ok {
            eprintln!("CHECK with {} failed: {}", bin.display(), out.stdout);
            check_msg = out.stdout.clone();
        }
        json!(out.exit_ok)
    } else {
        Value::Null
    };
    let mut with_prev = config.clone();
    with_prev["prevResult"] = result1.clone();
    run_plugin(
        bin,
        &side.host,
        &call("DEL", "ctr-one", &side.pod.path()),
        &with_prev,
    )
    .expect_ok("DEL 1");
    run_plugin(
        bin,
        &side.host,
        &call("DEL", "ctr-two", &side.pod2.path()),
        config,
    )
    .expect_ok("DEL 2");
    // DEL again, and DEL with the namespace gone: both succeed.
    let again = run_plugin(
        bin,
        &side.host,
        &call("DEL", "ctr-one", &side.pod.path()),
        config,
    );
    let gone = run_plugin(
        bin,
        &side.host,
        &call("DEL", "ctr-one", "/run/netns/skiff-gone"),
        config,
    );
    let mut result = normalize_result(&result1);
    for iface in result["interfaces"].as_array_mut().into_iter().flatten() {
        if iface["sandbox"] == json!(side.pod.path()) {
            iface["sandbox"] = json!("<pod netns>");
        }
    }
    json!({
        "result": result,
        "result2_ips": normalize_result(&add2.json())["ips"],
        "after_add": after_add,
        "check_ok": check,
        "check_msg": check_msg,
        "after_del": {
            "host": snapshot(&side.host),
            "pod": snapshot(&side.pod),
            "reservations": reservations(&side.data.path().join("matrix")),
        },
        "del_again_ok": again.exit_ok,
        "del_gone_ok": gone.exit_ok,
    })
}

/// Known failures of the reference's CHECK on an attachment its own ADD made; skiff-cni's
/// CHECK must pass there:
/// - it installs an IPAM route without `gw` via the interface's gateway, then looks for
///   that route with no gateway ("Expected Route ... not found in routing table");
/// - it reports the bridge's MAC before adding the first port, after which a bridge
///   without a fixed address may take the port's MAC ("Bridge interface ... Mac doesn't
///   match"); skiff-cni gives the bridge a fixed MAC at creation.
const REFERENCE_CHECK_BUGS: &[&str] = &["not found in routing table", "Mac doesn't match"];

fn compare(case_name: &str, version: &str, case: &Value) {
    require_root_tools();
    let reference = reference_bridge();
    let ours = Side::new();
    let theirs = Side::new();
    let mut got = exercise(
        &skiff_bin(),
        &ours,
        &ours.config(version, "skiff-cni", case),
    );
    let mut want = exercise(&reference, &theirs, &theirs.config(version, "bridge", case));
    let reference_check_msg = want["check_msg"].as_str().unwrap_or("").to_owned();
    if want["check_ok"] == json!(false)
        && REFERENCE_CHECK_BUGS
            .iter()
            .any(|m| reference_check_msg.contains(m))
    {
        want["check_ok"] = json!(true);
    }
    for side in [&mut got, &mut want] {
        side.as_object_mut().unwrap().remove("check_msg");
    }
    let mut diff = Vec::new();
    json_diff("", &got, &want, &mut diff);
    assert!(
        diff.is_empty(),
        "case {case_name} cniVersion {version}: skiff-cni differs from the reference:\n{}",
        diff.join("\n")
    );
    // The comparison would be empty if both did nothing: make sure something was built.
    assert!(got["after_add"]["reservations"].as_array().unwrap().len() >= 2);
    let forwarding = got["after_add"]["host_forwarding"].as_str().unwrap();
    assert!(
        forwarding.len() == 3,
        "forwarding switches not read: {forwarding:?}"
    );
    if case_name == "gateway" {
        assert_eq!(forwarding, "1/0");
    }
}

fn cases() -> Vec<(&'static str, Value)> {
    vec![
        (
            "gateway",
            json!({"isGateway": true, "ipam": {"subnet": "10.88.0.0/24"}}),
        ),
        (
            "default_gateway_mtu_hairpin",
            json!({"isDefaultGateway": true, "mtu": 1400, "hairpinMode": true,
                   "ipam": {"subnet": "10.88.1.0/24"}}),
        ),
        (
            "no_gateway_ipam_routes",
            json!({"ipam": {"subnet": "10.88.2.0/24",
                            "routes": [{"dst": "192.168.0.0/16"}, {"dst": "172.16.0.0/12", "gw": "10.88.2.254"}]}}),
        ),
        (
            "ranges_custom_gateway_two_sets",
            json!({"ipam": {"ranges": [
                [{"subnet": "10.88.3.0/24", "rangeStart": "10.88.3.100", "rangeEnd": "10.88.3.110", "gateway": "10.88.3.1"}],
                [{"subnet": "10.88.4.0/24", "gateway": "10.88.4.254"}]],
                "routes": [{"dst": "0.0.0.0/0"}]}}),
        ),
        (
            "one_set_two_ranges_gateway",
            json!({"isGateway": true, "ipam": {"ranges": [[
                {"subnet": "10.88.7.0/24", "rangeStart": "10.88.7.250", "gateway": "10.88.7.254"},
                {"subnet": "10.88.8.0/25"}]]}}),
        ),
        (
            "dual_stack_default_gateway",
            json!({"isDefaultGateway": true, "ipam": {"ranges": [
                [{"subnet": "10.88.9.0/24"}], [{"subnet": "fd88:9::/64"}]]}}),
        ),
        (
            "requested_mac",
            json!({"isGateway": true, "runtimeConfig": {"mac": "02:42:ac:11:00:99"},
                   "ipam": {"subnet": "10.88.10.0/24"}}),
        ),
        (
            "promisc",
            json!({"isGateway": true, "promiscMode": true, "ipam": {"subnet": "10.88.5.0/24"}}),
        ),
        (
            "dns_passthrough",
            json!({"isGateway": true, "dns": {"nameservers": ["10.88.6.53"], "search": ["svc.local"]},
                   "ipam": {"subnet": "10.88.6.0/24"}}),
        ),
    ]
}

fn run_case(name: &str) {
    let (_, case) = cases().into_iter().find(|(n, _)| *n == name).unwrap();
    for version in ["0.3.1", "0.4.0", "1.0.0"] {
        compare(name, version, &case);
    }
}

#[test]
fn matrix_gateway() {
    run_case("gateway");
}

#[test]
fn matrix_default_gateway_mtu_hairpin() {
    run_case("default_gateway_mtu_hairpin");
}

#[test]
fn matrix_no_gateway_ipam_routes() {
    run_case("no_gateway_ipam_routes");
}

#[test]
fn matrix_ranges_custom_gateway_two_sets() {
    run_case("ranges_custom_gateway_two_sets");
}

#[test]
fn matrix_one_set_two_ranges_gateway() {
    run_case("one_set_two_ranges_gateway");
}

#[test]
fn matrix_dual_stack_default_gateway() {
    run_case("dual_stack_default_gateway");
}

#[test]
fn matrix_requested_mac() {
    run_case("requested_mac");
}

#[test]
fn matrix_promisc() {
    run_case("promisc");
}

#[test]
fn matrix_dns_passthrough() {
    run_case("dns_passthrough");
}

/// Requested addresses (host-local's `CNI_ARGS` `IP=` and the `ips` capability): the same
/// address given, the same refusal when it is taken, the same state left behind.
#[test]
fn requested_ips_match_reference() {
    require_root_tools();
    let reference = reference_bridge();
    let case = json!({"isGateway": true, "ipam": {"subnet": "10.88.11.0/24"}});
    let mut outcomes = Vec::new();
    for (bin, plugin_type) in [(skiff_bin(), "skiff-cni"), (reference, "bridge")] {
        let side = Side::new();
        let config = side.config("1.0.0", plugin_type, &case);
        let by_args = run_plugin_with_args(
            &bin,
            &side.host,
            &call("ADD", "ctr-one", &side.pod.path()),
            &config,
            "IgnoreUnknown=1;IP=10.88.11.50",
        );
        let mut with_capability = config.clone();
        with_capability["runtimeConfig"] = json!({"ips": ["10.88.11.60/24"]});
        let by_capability = run_plugin(
            &bin,
            &side.host,
            &call("ADD", "ctr-two", &side.pod2.path()),
            &with_capability,
        );
        let pod3 = Netns::new("skr");
        let taken = run_plugin_with_args(
            &bin,
            &side.host,
            &call("ADD", "ctr-three", &pod3.path()),
            &config,
            "IgnoreUnknown=1;IP=10.88.11.50",
        );
        outcomes.push(json!({
            "by_args": by_args.exit_ok.then(|| by_args.json()["ips"].clone()),
            "by_capability": by_capability.exit_ok.then(|| by_capability.json()["ips"].clone()),
            "taken_refused": !taken.exit_ok,
            "pod3": snapshot(&pod3),
            "reservations": reservations(&side.data.path().join("matrix")),
        }));
    }
    // The refused ADD: skiff-cni allocates before it builds anything and leaves the pod
    // as it was; the reference builds the veth first and leaves it in the pod (down) when
    // host-local refuses the address. Ours must be clean; theirs is not compared.
    let ours_pod3 = outcomes[0].as_object_mut().unwrap().remove("pod3").unwrap();
    outcomes[1].as_object_mut().unwrap().remove("pod3");
    assert_eq!(
        ours_pod3["links"].as_array().unwrap().len(),
        1,
        "refused ADD left links: {ours_pod3}"
    );
    let mut diff = Vec::new();
    json_diff("", &outcomes[0], &outcomes[1], &mut diff);
    assert!(
        diff.is_empty(),
        "requested IPs: skiff-cni differs from the reference:\n{}",
        diff.join("\n")
    );
    assert_eq!(outcomes[0]["by_args"][0]["address"], "10.88.11.50/24");
    assert_eq!(outcomes[0]["by_capability"][0]["address"], "10.88.11.60/24");
}
