//! The runtime's verbs against scripted plugins: small shell scripts that record each
//! invocation (command, environment, stdin) and answer from files the test writes. The
//! real plugins are exercised by the root tests in `integration/tests/sandbox.rs`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};
use serde_json::{Value, json};

use super::*;

const SCRIPT: &str = r#"#!/bin/sh
# A scripted CNI plugin: records the call, then answers from <name>.<COMMAND>.{sleep,out,exit}.
dir=$(dirname "$0")
me=$(basename "$0")
n=$(ls "$dir/log" | wc -l)
seq=$(printf %04d $((n)))
env | grep '^CNI_' | sort > "$dir/log/$seq-$me-$CNI_COMMAND.env"
cat > "$dir/log/$seq-$me-$CNI_COMMAND.stdin"
[ -f "$dir/$me.$CNI_COMMAND.sleep" ] && sleep "$(cat "$dir/$me.$CNI_COMMAND.sleep")"
[ -f "$dir/$me.$CNI_COMMAND.out" ] && cat "$dir/$me.$CNI_COMMAND.out"
[ -f "$dir/$me.$CNI_COMMAND.exit" ] && exit "$(cat "$dir/$me.$CNI_COMMAND.exit")"
exit 0
"#;

/// A bin directory of scripted plugins and a cache directory.
struct Fixture {
    bin: tempfile::TempDir,
    cache: tempfile::TempDir,
    netns: tempfile::TempDir,
}

/// One recorded invocation.
#[derive(Debug)]
struct Call {
    plugin: String,
    command: String,
    env: BTreeMap<String, String>,
    stdin: Value,
}

impl Fixture {
    fn new(plugins: &[&str]) -> Fixture {
        let fixture = Fixture {
            bin: tempfile::tempdir().unwrap(),
            cache: tempfile::tempdir().unwrap(),
            netns: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(fixture.bin.path().join("log")).unwrap();
        for plugin in plugins {
            let path = fixture.bin.path().join(plugin);
            std::fs::write(&path, SCRIPT).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        fixture
    }

    fn runtime(&self) -> Runtime {
        Runtime::new(vec![self.bin.path().to_path_buf()], self.cache.path())
    }

    /// What `plugin` does for `command`: print `out`, exit with `exit`.
    fn answer(&self, plugin: &str, command: &str, out: &str, exit: i32) {
        let file = |suffix: &str| self.bin.path().join(format!("{plugin}.{command}.{suffix}"));
        std::fs::write(file("out"), out).unwrap();
        std::fs::write(file("exit"), exit.to_string()).unwrap();
    }

    fn sleep(&self, plugin: &str, command: &str, seconds: u32) {
        let path = self.bin.path().join(format!("{plugin}.{command}.sleep"));
        std::fs::write(path, seconds.to_string()).unwrap();
    }

    /// A netns path that is not a namespace: ADD passes it on, DEL treats it as gone.
    fn netns(&self) -> PathBuf {
        self.netns.path().join("net")
    }

    fn attachment(&self) -> Attachment {
        Attachment::for_pod("shop", "web-0", "uid-1", &self.netns())
    }

    /// The invocations so far, in order, and forgets them.
    fn calls(&self) -> Vec<Call> {
        let log = self.bin.path().join("log");
        let mut names: Vec<String> = std::fs::read_dir(&log)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".stdin"))
            .collect();
        names.sort();
        let calls = names
            .iter()
            .map(|name| {
                let stem = name.trim_end_matches(".stdin");
                let mut parts = stem.splitn(2, '-');
                let _seq = parts.next();
                let rest = parts.next().unwrap();
                let (plugin, command) = rest.rsplit_once('-').unwrap();
                let env = std::fs::read_to_string(log.join(format!("{stem}.env")))
                    .unwrap()
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                let text = std::fs::read_to_string(log.join(name)).unwrap();
                Call {
                    plugin: plugin.to_owned(),
                    command: command.to_owned(),
                    env,
                    stdin: serde_json::from_str(&text).unwrap_or(Value::Null),
                }
            })
            .collect();
        for entry in std::fs::read_dir(&log).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        calls
    }
}

fn sequence(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .map(|c| format!("{} {}", c.command, c.plugin))
        .collect()
}

fn network(version: &str, plugins: Value) -> NetworkConfigList {
    NetworkConfigList::from_list_value(
        json!({"cniVersion": version, "name": "pods", "plugins": plugins}),
        "test",
    )
    .unwrap()
}

fn result_json(version: &str, address: &str, netns: &Path) -> String {
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": "veth0", "mac": "02:00:00:00:00:01"},
            {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": netns},
        ],
        "ips": [{"address": address, "gateway": "10.1.0.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}],
    })
    .to_string()
}

#[tokio::test]
async fn add_check_del_through_a_chain() {
    let f = Fixture::new(&["first", "second"]);
    let net = network(
        "1.0.0",
        json!([
            {"type": "first", "bridge": "br0"},
            {"type": "second", "capabilities": {"portMappings": true}},
        ]),
    );
    let first_result = result_json("1.0.0", "10.1.0.5/24", &f.netns());
    // The second plugin answers in an older version: the runtime converts it.
    let second_result = result_json("0.4.0", "10.1.0.5/24", &f.netns());
    f.answer("first", "ADD", &first_result, 0);
    f.answer("second", "ADD", &second_result, 0);
    let attachment = f.attachment().with_port_mappings(&[PortMapping {
        host_port: 8080,
        container_port: 80,
        protocol: "tcp".into(),
        host_ip: String::new(),
    }]);
    let runtime = f.runtime();

    let result = runtime.add(&net, &attachment).await.unwrap();
    assert_eq!(result.cni_version, "1.0.0");
    assert!(result.raw()["ips"][0].get("version").is_none());
    assert_eq!(
        result.sandbox_ips("eth0"),
        ["10.1.0.5".parse::<std::net::IpAddr>().unwrap()]
    );
    let calls = f.calls();
    assert_eq!(sequence(&calls), ["ADD first", "ADD second"]);
    let netns = f.netns().display().to_string();
    assert_eq!(
        calls[0].env,
        BTreeMap::from(
            [
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "uid-1"),
                ("CNI_NETNS", netns.as_str()),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
                     K8S_POD_INFRA_CONTAINER_ID=uid-1;K8S_POD_UID=uid-1"
                ),
                ("CNI_PATH", f.bin.path().to_str().unwrap()),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        )
    );
    assert_eq!(
        calls[0].stdin,
        json!({"type": "first", "bridge": "br0", "name": "pods", "cniVersion": "1.0.0"})
    );
    assert_eq!(
        calls[1].stdin["prevResult"],
        serde_json::from_str::<Value>(&first_result).unwrap()
    );
    assert_eq!(
        calls[1].stdin["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
    );
    let cached = runtime.cached("pods", "uid-1", "eth0").unwrap().unwrap();
    assert_eq!(cached.result, result);
    assert_eq!(cached.attachment, attachment);

    runtime.check(&net, &attachment).await.unwrap();
    let calls = f.calls();
    assert_eq!(sequence(&calls), ["CHECK first", "CHECK second"]);
    assert!(calls.iter().all(|c| c.stdin["prevResult"] == *result.raw()));

    runtime.del(&net, &attachment).await.unwrap();
    let calls = f.calls();
    assert_eq!(sequence(&calls), ["DEL second", "DEL first"]);
    assert!(calls.iter().all(|c| c.stdin["prevResult"] == *result.raw()));
    // The path is no namespace (as after the sandbox is removed): DEL says so.
    assert!(calls.iter().all(|c| c.env["CNI_NETNS"].is_empty()));
    assert!(runtime.cached("pods", "uid-1", "eth0").unwrap().is_none());

    // Again: no cache, no prevResult, still success.
    runtime.del(&net, &attachment).await.unwrap();
    let calls = f.calls();
    assert_eq!(sequence(&calls), ["DEL second", "DEL first"]);
    assert!(calls.iter().all(|c| c.stdin.get("prevResult").is_none()));
    let err = runtime.check(&net, &attachment).await.unwrap_err();
    assert!(matches!(err, CniError::NotAdded { .. }), "{err}");
    assert!(f.calls().is_empty());
}

#[tokio::test]
async fn a_failed_add_deletes_what_the_chain_made() {
    let f = Fixture::new(&["first", "second", "third"]);
    let net = network(
        "1.0.0",
        json!([{"type": "first"}, {"type": "second"}, {"type": "third"}]),
    );
    let first_result = result_json("1.0.0", "10.1.0.5/24", &f.netns());
    f.answer("first", "ADD", &first_result, 0);
    f.answer(
        "second",
        "ADD",
        r#"{"cniVersion": "1.0.0", "code": 11, "msg": "no addresses left", "details": "range 10.1.0.0/30"}"#,
        1,
    );
    let runtime = f.runtime();
    let err = runtime.add(&net, &f.attachment()).await.unwrap_err();
    assert_eq!(err.code(), Some(11));
    assert_eq!(err.plugin(), Some("second"));
    assert_eq!(err.plugin_message(), Some("no addresses left"));
    assert_eq!(
        err.to_string(),
        "ADD network pods plugin second: error 11: no addresses left (range 10.1.0.0/30)"
    );
    let calls = f.calls();
    assert_eq!(
        sequence(&calls),
        ["ADD first", "ADD second", "DEL second", "DEL first"]
    );
    let prev: Value = serde_json::from_str(&first_result).unwrap();
    assert_eq!(calls[2].stdin["prevResult"], prev);
    assert_eq!(calls[3].stdin["prevResult"], prev);
    assert!(runtime.cached_attachments().unwrap().is_empty());

    // Undoing fails too: both errors are told, the code is still the ADD's.
    f.answer("first", "DEL", "", 1);
    let err = runtime.add(&net, &f.attachment()).await.unwrap_err();
    assert!(matches!(err, CniError::RollbackFailed { .. }), "{err}");
    assert_eq!(err.code(), Some(11));
    assert!(
        err.to_string()
            .contains("undoing it with DEL failed too: DEL network pods plugin first: exit status: 1 with no error object: no output"),
        "{err}"
    );
    assert_eq!(
        sequence(&f.calls()),
        ["ADD first", "ADD second", "DEL second", "DEL first"]
    );
}

#[tokio::test]
async fn a_missing_plugin_or_a_bad_result_is_undone_too() {
    let f = Fixture::new(&["first"]);
    f.answer(
        "first",
        "ADD",
        &result_json("1.0.0", "10.1.0.5/24", &f.netns()),
        0,
    );
    let runtime = f.runtime();
    let net = network("1.0.0", json!([{"type": "first"}, {"type": "absent"}]));
    let err = runtime.add(&net, &f.attachment()).await.unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "ADD network pods plugin absent: no executable absent in {}",
            f.bin.path().display()
        )),
        "{err}"
    );
    // DEL of the missing plugin cannot run either; that is reported, the first is undone.
    assert!(matches!(err, CniError::RollbackFailed { .. }), "{err}");
    assert_eq!(sequence(&f.calls()), ["ADD first", "DEL first"]);

    f.answer("first", "ADD", "this is not JSON", 0);
    let single = network("1.0.0", json!([{"type": "first"}]));
    let err = runtime.add(&single, &f.attachment()).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("ADD network pods plugin first: invalid result: not JSON"),
        "{err}"
    );
    assert_eq!(sequence(&f.calls()), ["ADD first", "DEL first"]);
}

#[tokio::test]
async fn a_plugin_that_hangs_is_killed() {
    let f = Fixture::new(&["slow"]);
    f.sleep("slow", "ADD", 30);
    let runtime = f.runtime().with_timeout(Duration::from_millis(500));
    let net = network("1.0.0", json!([{"type": "slow"}]));
    let started = Instant::now();
    let err = runtime.add(&net, &f.attachment()).await.unwrap_err();
    assert!(matches!(err, CniError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(sequence(&f.calls()), ["ADD slow", "DEL slow"]);
}

#[tokio::test]
async fn versions_gate_check_status_and_gc() {
    let f = Fixture::new(&["p"]);
    let runtime = f.runtime();
    f.answer(
        "p",
        "ADD",
        &result_json("0.3.1", "10.1.0.5/24", &f.netns()),
        0,
    );
    let old = network("0.3.1", json!([{"type": "p"}]));
    runtime.add(&old, &f.attachment()).await.unwrap();
    let err = runtime.check(&old, &f.attachment()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "CHECK network pods: cniVersion 0.3.1 does not support CHECK"
    );
    runtime.status(&old).await.unwrap();
    runtime.gc(&old, &[]).await.unwrap();
    // GC still DELs the stale attachment, without prevResult before 0.4.0, and no plugin
    // GC.
    let calls = f.calls();
    assert_eq!(sequence(&calls), ["ADD p", "DEL p"]);
    assert!(calls[1].stdin.get("prevResult").is_none());
    assert!(runtime.cached_attachments().unwrap().is_empty());

    let disabled = NetworkConfigList::from_list_value(
        json!({"cniVersion": "1.0.0", "name": "pods", "disableCheck": true,
               "plugins": [{"type": "p"}]}),
        "test",
    )
    .unwrap();
    runtime.check(&disabled, &f.attachment()).await.unwrap();
    assert!(f.calls().is_empty());
}

#[tokio::test]
async fn status_and_gc_in_1_1() {
    let f = Fixture::new(&["p", "q"]);
    let runtime = f.runtime();
    let net = network("1.1.0", json!([{"type": "p"}, {"type": "q"}]));
    runtime.status(&net).await.unwrap();
    let calls = f.calls();
    assert_eq!(sequence(&calls), ["STATUS p", "STATUS q"]);
    assert_eq!(
        calls[0].env,
        BTreeMap::from([
            ("CNI_COMMAND".to_owned(), "STATUS".to_owned()),
            ("CNI_PATH".to_owned(), f.bin.path().display().to_string()),
        ])
    );
    f.answer(
        "q",
        "STATUS",
        r#"{"code": 50, "msg": "range exhausted"}"#,
        1,
    );
    let err = runtime.status(&net).await.unwrap_err();
    assert_eq!(err.code(), Some(50));
    f.calls();

    for (uid, ip) in [("keep", "10.1.0.5/24"), ("stale", "10.1.0.6/24")] {
        let result = result_json("1.1.0", ip, &f.netns());
        f.answer("p", "ADD", &result, 0);
        f.answer("q", "ADD", &result, 0);
        let attachment = Attachment::for_pod("shop", uid, uid, &f.netns());
        runtime.add(&net, &attachment).await.unwrap();
    }
    f.calls();
    let keep = AttachmentId {
        container_id: "keep".into(),
        ifname: "eth0".into(),
    };
    runtime.gc(&net, std::slice::from_ref(&keep)).await.unwrap();
    let calls = f.calls();
    assert_eq!(sequence(&calls), ["DEL q", "DEL p", "GC p", "GC q"]);
    assert_eq!(calls[0].env["CNI_CONTAINERID"], "stale");
    assert_eq!(
        calls[2].stdin["cni.dev/valid-attachments"],
        json!([{"containerID": "keep", "ifname": "eth0"}])
    );
    let left: Vec<_> = runtime
        .cached_attachments()
        .unwrap()
        .into_iter()
        .map(|c| c.attachment.container_id)
        .collect();
    assert_eq!(left, ["keep"]);

    f.answer("p", "GC", r#"{"code": 5, "msg": "disk"}"#, 1);
    let err = runtime.gc(&net, &[keep]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "GC network pods: GC network pods plugin p: error 5: disk"
    );
    assert_eq!(sequence(&f.calls()), ["GC p", "GC q"]);
}

#[tokio::test]
async fn attachments_are_validated_before_anything_runs() {
    let f = Fixture::new(&["p"]);
    let runtime = f.runtime();
    let net = network("1.0.0", json!([{"type": "p"}]));
    let mut bad_id = f.attachment();
    bad_id.container_id = "-x".into();
    let mut bad_ifname = f.attachment();
    bad_ifname.ifname = "eth0:1".into();
    let mut long_ifname = f.attachment();
    long_ifname.ifname = "a".repeat(16);
    let mut no_netns = f.attachment();
    no_netns.netns = None;
    let mut bad_args = f.attachment();
    bad_args.cni_args.push(("A".into(), "b;c".into()));
    for attachment in [bad_id, bad_ifname, long_ifname, no_netns.clone(), bad_args] {
        let err = runtime.add(&net, &attachment).await.unwrap_err();
        assert!(matches!(err, CniError::InvalidAttachment { .. }), "{err}");
    }
    assert!(f.calls().is_empty());
    // DEL needs no namespace.
    runtime.del(&net, &no_netns).await.unwrap();
    assert_eq!(sequence(&f.calls()), ["DEL p"]);
}

#[tokio::test]
async fn version_and_validate() {
    let f = Fixture::new(&["p"]);
    let runtime = f.runtime();
    f.answer(
        "p",
        "VERSION",
        r#"{"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}"#,
        0,
    );
    let info = runtime.version("p", "1.0.0").await.unwrap();
    assert_eq!(info.supported_versions, ["0.4.0", "1.0.0"]);
    runtime
        .validate(&network("1.0.0", json!([{"type": "p"}])))
        .await
        .unwrap();
    let err = runtime
        .validate(&network("1.1.0", json!([{"type": "p"}])))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("plugin p does not support cniVersion 1.1.0 (it supports 0.4.0, 1.0.0)"),
        "{err}"
    );
    let err = runtime
        .validate(&network("1.0.0", json!([{"type": "absent"}])))
        .await
        .unwrap_err();
    assert!(matches!(err, CniError::PluginNotFound { .. }), "{err}");
}

#[test]
fn pod_arguments_and_port_mappings() {
    let attachment = Attachment::for_pod("shop", "web-0", "uid-1", Path::new("/ns"));
    assert_eq!(attachment.container_id, "uid-1");
    assert_eq!(attachment.ifname, "eth0");
    assert_eq!(
        format_cni_args(&attachment.cni_args).unwrap(),
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
         K8S_POD_INFRA_CONTAINER_ID=uid-1;K8S_POD_UID=uid-1"
    );
    let port = |container_port, host_port: Option<i32>, protocol: Option<&str>| ContainerPort {
        container_port,
        host_port,
        protocol: protocol.map(str::to_owned),
        ..Default::default()
    };
    let pod = Pod {
        spec: Some(PodSpec {
            containers: vec![
                Container {
                    name: "web".into(),
                    ports: Some(vec![
                        port(80, Some(8080), None),
                        port(9090, None, None),
                        port(53, Some(5353), Some("UDP")),
                    ]),
                    ..Default::default()
                },
                Container {
                    name: "side".into(),
                    ports: Some(vec![ContainerPort {
                        host_ip: Some("127.0.0.1".into()),
                        ..port(7000, Some(7000), Some("SCTP"))
                    }]),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mappings = port_mappings(&pod);
    assert_eq!(
        serde_json::to_value(&mappings).unwrap(),
        json!([
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp"},
            {"hostPort": 7000, "containerPort": 7000, "protocol": "sctp", "hostIP": "127.0.0.1"},
        ])
    );
    let with = attachment.clone().with_port_mappings(&mappings);
    assert_eq!(
        with.capability_args["portMappings"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert!(
        attachment
            .with_port_mappings(&[])
            .capability_args
            .is_empty()
    );
}
