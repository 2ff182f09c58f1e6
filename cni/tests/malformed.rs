//! Malformed configs and environments: each maps to its spec error code and a clear
//! message, the plugin never panics, and nothing is left behind (no veth, no
//! reservation, nothing new in the pod's namespace). Root only.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};

struct Case {
    name: &'static str,
    env: Vec<(&'static str, String)>,
    stdin: Vec<u8>,
    code: u64,
    msg_contains: &'static str,
}

fn run_raw(host: &Netns, env: &[(&'static str, String)], stdin: &[u8]) -> (bool, String, String) {
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
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn malformed_inputs_map_to_spec_codes_without_leaks() {
    require_root_tools();
    let host = Netns::new("skh");
    let pod = Netns::new("skp");
    let data = tempfile::tempdir().unwrap();
    let not_a_netns = tempfile::NamedTempFile::new().unwrap();
    // A non-bridge link whose name a config then uses as its bridge (no dummy module here).
    host.ip(&[
        "link", "add", "skdummy0", "type", "veth", "peer", "name", "skdummy1",
    ]);

    let conf = |extra: Value| -> Vec<u8> {
        let mut c = json!({
            "cniVersion": "1.0.0", "name": "bad", "type": "skiff-cni", "bridge": "skbr0",
            "isGateway": true,
            "ipam": {"type": "host-local", "subnet": "10.99.0.0/24", "dataDir": data.path()},
        });
        merge(&mut c, extra);
        c.to_string().into_bytes()
    };
    let add_env = |netns: &str, ifname: &str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", "ctr-bad".into()),
            ("CNI_NETNS", netns.into()),
            ("CNI_IFNAME", ifname.into()),
            ("CNI_PATH", "/usr/lib/cni".into()),
        ]
    };
    let with = |mut env: Vec<(&'static str, String)>, key: &'static str, value: Option<&str>| {
        env.retain(|(k, _)| *k != key);
        if let Some(v) = value {
            env.push((key, v.to_owned()));
        }
        env
    };
    let good_env = add_env(&pod.path(), "eth0");
    let prev_040 =
        json!({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.99.0.9/24"}]});

    let cases = vec![
        Case {
            name: "bad json",
            env: good_env.clone(),
            stdin: b"{\"cniVersion\":".to_vec(),
            code: 6,
            msg_contains: "decode network configuration",
        },
        Case {
            name: "binary garbage",
            env: good_env.clone(),
            stdin: vec![0xff, 0xfe, 0x00, 0x13],
            code: 6,
            msg_contains: "decode",
        },
        Case {
            name: "empty stdin",
            env: good_env.clone(),
            stdin: Vec::new(),
            code: 6,
            msg_contains: "decode",
        },
        Case {
            name: "wrong json type",
            env: good_env.clone(),
            stdin: conf(json!({"mtu": "large"})),
            code: 6,
            msg_contains: "decode",
        },
        Case {
            name: "unknown version",
            env: good_env.clone(),
            stdin: conf(json!({"cniVersion": "9.9.9"})),
            code: 1,
            msg_contains: "incompatible CNI version",
        },
        Case {
            name: "no version",
            env: good_env.clone(),
            stdin: conf(json!({"cniVersion": null})),
            code: 1,
            msg_contains: "incompatible CNI version",
        },
        Case {
            name: "missing CNI_COMMAND",
            env: with(good_env.clone(), "CNI_COMMAND", None),
            stdin: conf(json!({})),
            code: 4,
            msg_contains: "CNI_COMMAND",
        },
        Case {
            name: "unknown CNI_COMMAND",
            env: with(good_env.clone(), "CNI_COMMAND", Some("FROB")),
            stdin: conf(json!({})),
            code: 4,
            msg_contains: "unknown CNI_COMMAND",
        },
        Case {
            name: "missing CNI_NETNS",
            env: with(good_env.clone(), "CNI_NETNS", None),
            stdin: conf(json!({})),
            code: 4,
            msg_contains: "CNI_NETNS",
        },
        Case {
            name: "missing CNI_CONTAINERID",
            env: with(good_env.clone(), "CNI_CONTAINERID", None),
            stdin: conf(json!({})),
            code: 4,
            msg_contains: "CNI_CONTAINERID",
        },
        Case {
            name: "bad CNI_CONTAINERID",
            env: with(good_env.clone(), "CNI_CONTAINERID", Some("a/b")),
            stdin: conf(json!({})),
            code: 4,
            msg_contains: "invalid CNI_CONTAINERID",
        },
        Case {
            name: "missing CNI_IFNAME",
            env: with(good_env.clone(), "CNI_IFNAME", None),
            stdin: conf(json!({})),
            code: 4,
            msg_contains: "CNI_IFNAME",
        },
        Case {
            name: "ifname with slash",
            env: add_env(&pod.path(), "eth/0"),
            stdin: conf(json!({})),
            code: 4,
            msg_contains: "invalid CNI_IFNAME",
        },
        Case {
            name: "ifname too long",
            env: add_env(&pod.path(), "eth0123456789abc"),
            stdin: conf(json!({})),
            code: 4,
            msg_contains: "longer than 15",
        },
        Case {
            name: "bad CNI_ARGS",
            env: with(good_env.clone(), "CNI_ARGS", Some("novalue")),
            stdin: conf(json!({})),
            code: 4,
            msg_contains: "CNI_ARGS",
        },
        Case {
            name: "missing netns",
            env: add_env("/run/netns/skiff-missing-netns", "eth0"),
            stdin: conf(json!({})),
            code: 3,
            msg_contains: "open network namespace",
        },
        Case {
            name: "not a netns",
            env: add_env(not_a_netns.path().to_str().unwrap(), "eth0"),
            stdin: conf(json!({})),
            code: 3,
            msg_contains: "enter network namespace",
        },
        Case {
            name: "ifname exists in pod",
            env: add_env(&pod.path(), "lo"),
            stdin: conf(json!({})),
            code: 100,
            msg_contains: "already exists",
        },
        Case {
            name: "missing name",
            env: good_env.clone(),
            stdin: conf(json!({"name": null})),
            code: 7,
            msg_contains: "network name",
        },
        Case {
            name: "name escaping dataDir",
            env: good_env.clone(),
            stdin: conf(json!({"name": "../../etc"})),
            code: 7,
            msg_contains: "invalid network name",
        },
        Case {
            name: "missing ipam",
            env: good_env.clone(),
            stdin: conf(json!({"ipam": null})),
            code: 7,
            msg_contains: "ipam",
        },
        Case {
            name: "foreign ipam type",
            env: good_env.clone(),
            stdin: conf(json!({"ipam": {"type": "dhcp"}})),
            code: 7,
            msg_contains: "not supported",
        },
        Case {
            name: "invalid subnet",
            env: good_env.clone(),
            stdin: conf(json!({"ipam": {"subnet": "10.99.0.0/40"}})),
            code: 7,
            msg_contains: "invalid subnet",
        },
        Case {
            name: "subnet host bits",
            env: good_env.clone(),
            stdin: conf(json!({"ipam": {"subnet": "10.99.0.7/24"}})),
            code: 7,
            msg_contains: "host bits",
        },
        Case {
            name: "overlapping ranges",
            env: good_env.clone(),
            stdin: conf(
                json!({"ipam": {"subnet": null, "ranges": [[{"subnet": "10.99.0.0/24"}, {"subnet": "10.99.0.128/25"}]]}}),
            ),
            code: 7,
            msg_contains: "overlap",
        },
        Case {
            name: "overlapping range sets",
            env: good_env.clone(),
            stdin: conf(
                json!({"ipam": {"subnet": null, "ranges": [[{"subnet": "10.99.0.0/24"}], [{"subnet": "10.99.0.0/16"}]]}}),
            ),
            code: 7,
            msg_contains: "overlap",
        },
        Case {
            name: "rangeStart outside subnet",
            env: good_env.clone(),
            stdin: conf(json!({"ipam": {"rangeStart": "10.98.0.5"}})),
            code: 7,
            msg_contains: "not in subnet",
        },
        Case {
            name: "bad mtu",
            env: good_env.clone(),
            stdin: conf(json!({"mtu": 10})),
            code: 7,
            msg_contains: "mtu",
        },
        Case {
            name: "unsupported vlan",
            env: good_env.clone(),
            stdin: conf(json!({"vlan": 100})),
            code: 2,
            msg_contains: "vlan",
        },
        Case {
            // Fails after the veth exists: the rollback must remove it.
            name: "route via unreachable gateway",
            env: good_env.clone(),
            stdin: conf(
                json!({"ipam": {"routes": [{"dst": "192.0.2.0/24", "gw": "198.51.100.1"}]}}),
            ),
            code: 100,
            msg_contains: "add route 192.0.2.0/24",
        },
        Case {
            name: "bad MAC in CNI_ARGS",
            env: with(
                good_env.clone(),
                "CNI_ARGS",
                Some("IgnoreUnknown=1;MAC=02:00:zz:00:00:01"),
            ),
            stdin: conf(json!({})),
            code: 4,
            msg_contains: "invalid MAC",
        },
        Case {
            name: "bad runtimeConfig mac",
            env: good_env.clone(),
            stdin: conf(json!({"runtimeConfig": {"mac": "not-a-mac"}})),
            code: 7,
            msg_contains: "invalid mac",
        },
        Case {
            name: "requested ip outside the ranges",
            env: with(
                good_env.clone(),
                "CNI_ARGS",
                Some("IgnoreUnknown=1;IP=10.98.0.5"),
            ),
            stdin: conf(json!({})),
            code: 103,
            msg_contains: "not in any range set",
        },
        Case {
            name: "requested ip is the gateway",
            env: good_env.clone(),
            stdin: conf(json!({"runtimeConfig": {"ips": ["10.99.0.1/24"]}})),
            code: 103,
            msg_contains: "gateway",
        },
        Case {
            name: "bad IP in CNI_ARGS",
            env: with(good_env.clone(), "CNI_ARGS", Some("IP=10.99.0.300")),
            stdin: conf(json!({})),
            code: 4,
            msg_contains: "invalid IP",
        },
        Case {
            name: "bad requested ips",
            env: good_env.clone(),
            stdin: conf(json!({"args": {"cni": {"ips": ["nope"]}}})),
            code: 7,
            msg_contains: "invalid requested ip",
        },
        Case {
            name: "bridge name is a dummy",
            env: good_env.clone(),
            stdin: conf(json!({"bridge": "skdummy0"})),
            code: 100,
            msg_contains: "not a bridge",
        },
        Case {
            name: "default gateway conflict",
            env: good_env.clone(),
            stdin: conf(
                json!({"isDefaultGateway": true, "ipam": {"routes": [{"dst": "0.0.0.0/0", "gw": "10.99.0.200"}]}}),
            ),
            code: 7,
            msg_contains: "isDefaultGateway ineffective",
        },
        Case {
            name: "prevResult version mismatch",
            env: good_env.clone(),
            stdin: conf(json!({"prevResult": prev_040})),
            code: 1,
            msg_contains: "prevResult",
        },
        Case {
            name: "prevResult garbage",
            env: good_env.clone(),
            stdin: conf(json!({"prevResult": {"ips": [{"address": "nope"}]}})),
            code: 6,
            msg_contains: "prevResult",
        },
        Case {
            name: "CHECK without prevResult",
            env: with(good_env.clone(), "CNI_COMMAND", Some("CHECK")),
            stdin: conf(json!({})),
            code: 7,
            msg_contains: "prevResult",
        },
        Case {
            name: "CHECK on 0.3.1",
            env: with(good_env.clone(), "CNI_COMMAND", Some("CHECK")),
            stdin: conf(json!({"cniVersion": "0.3.1"})),
            code: 1,
            msg_contains: "CHECK needs",
        },
        Case {
            name: "STATUS on 1.0.0",
            env: with(good_env.clone(), "CNI_COMMAND", Some("STATUS")),
            stdin: conf(json!({})),
            code: 1,
            msg_contains: "STATUS needs",
        },
        Case {
            name: "GC without valid attachments",
            env: with(good_env.clone(), "CNI_COMMAND", Some("GC")),
            stdin: conf(json!({"cniVersion": "1.1.0"})),
            code: 7,
            msg_contains: "valid-attachments",
        },
    ];

    let mut failures = Vec::new();
    for case in &cases {
        let (ok, stdout, stderr) = run_raw(&host, &case.env, &case.stdin);
        let problem = check_error(ok, &stdout, &stderr, case.code, case.msg_contains);
        if let Some(p) = problem {
            failures.push(format!("{}: {p}", case.name));
        }
        if let Some(leak) = leaks(&host, &pod, data.path()) {
            failures.push(format!("{}: left behind {leak}", case.name));
        }
    }

    // Exhausted range: a /30 has exactly one address besides the gateway.
    let small = conf(json!({"name": "tiny", "ipam": {"subnet": "10.99.9.0/30"}}));
    let (ok, stdout, _) = run_raw(&host, &good_env, &small);
    assert!(ok, "first ADD into the /30 failed: {stdout}");
    let pod2 = Netns::new("skq");
    let (ok, stdout, stderr) = run_raw(&host, &add_env(&pod2.path(), "eth0"), &small);
    let second_env = with(
        add_env(&pod2.path(), "eth0"),
        "CNI_CONTAINERID",
        Some("ctr-two"),
    );
    let (ok2, stdout2, stderr2) = run_raw(&host, &second_env, &small);
    // Same container id as the first ADD: duplicate; another id: exhausted.
    if let Some(p) = check_error(ok, &stdout, &stderr, 101, "duplicate allocation") {
        failures.push(format!("duplicate allocation: {p}"));
    }
    if let Some(p) = check_error(ok2, &stdout2, &stderr2, 11, "no IP addresses available") {
        failures.push(format!("exhausted range: {p}"));
    }
    assert_eq!(
        reservations(&data.path().join("tiny")),
        vec!["10.99.9.2".to_string()]
    );
    if pod2.ip(&["link", "show"]).contains("eth0") {
        failures.push("exhausted range: eth0 left in the second pod".into());
    }
    let mut del = good_env.clone();
    del.retain(|(k, _)| *k != "CNI_COMMAND");
    del.push(("CNI_COMMAND", "DEL".into()));
    let (ok, stdout, _) = run_raw(&host, &del, &small);
    assert!(ok, "DEL failed: {stdout}");
    assert!(reservations(&data.path().join("tiny")).is_empty());

    assert!(
        failures.is_empty(),
        "malformed-input table:\n{}",
        failures.join("\n")
    );
}

fn check_error(
    ok: bool,
    stdout: &str,
    stderr: &str,
    code: u64,
    msg_contains: &str,
) -> Option<String> {
    if ok {
        return Some(format!("exited 0, stdout {stdout:?}"));
    }
    if stderr.contains("panicked") {
        return Some(format!("panicked: {stderr}"));
    }
    let Ok(v) = serde_json::from_str::<Value>(stdout) else {
        return Some(format!("stdout is not JSON: {stdout:?}"));
    };
    if v["code"].as_u64() != Some(code) {
        return Some(format!("code {} (want {code}): {stdout}", v["code"]));
    }
    let msg = v["msg"].as_str().unwrap_or("");
    if !msg.contains(msg_contains) {
        return Some(format!("msg {msg:?} does not mention {msg_contains:?}"));
    }
    if v["cniVersion"].as_str().is_none() {
        return Some(format!("error has no cniVersion: {stdout}"));
    }
    None
}

/// Anything a failed ADD could leave: host veths, pod interfaces besides lo, reservations.
fn leaks(host: &Netns, pod: &Netns, data: &std::path::Path) -> Option<String> {
    let host_links = host.ip(&["-o", "link", "show"]);
    if host_links.lines().any(|l| l.contains(": veth")) {
        return Some(format!("host veth: {host_links}"));
    }
    let pod_links = pod.ip(&["-o", "link", "show"]);
    if pod_links.lines().count() != 1 {
        return Some(format!("pod links: {pod_links}"));
    }
    let left = reservations(&data.join("bad"));
    if !left.is_empty() {
        return Some(format!("reservations {left:?}"));
    }
    None
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                if v.is_null() {
                    b.remove(&k);
                } else if let Some(slot) = b.get_mut(&k).filter(|s| s.is_object() && v.is_object())
                {
                    merge(slot, v);
                } else {
                    b.insert(k, v);
                }
            }
        }
        (b, e) => *b = e,
    }
}
