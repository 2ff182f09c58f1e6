//! `agentctl` against a real node: it imports an image a pod then runs, shows that pod as
//! the machine holds it (IP, network namespace, cgroup, container) and keeps doing so
//! once the agent is killed, shows a leaked sandbox with what it is missing, and names an
//! unreachable containerd with exit code 1.
//!
//! Root only for the node test: it starts the control plane, a private containerd and a
//! `skiff-agent`, all removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use integration::ControlPlane;
use integration::containerd::Containerd;
use integration::node::Node;
use integration::oci_image::ImageBuilder;
use serde_json::Value;

/// The repository the archive is imported into; the archive's own name is the tag `1`.
const REPOSITORY: &str = "skiff.test/agentctl";
const IMAGE: &str = "skiff.test/agentctl:1";

fn require_root() {
    integration::require_root("this test runs containers, namespaces and cgroups");
}

/// The node's location flags, as the agent was started with them.
fn node_flags(node: &Node, containerd: &Containerd) -> Vec<String> {
    let flag = |name: &str, value: &Path| [format!("--{name}"), value.display().to_string()];
    let mut flags = Vec::new();
    flags.extend(flag("containerd-socket", &containerd.socket));
    flags.extend(flag(
        "containerd-namespace",
        Path::new(containerd.namespace()),
    ));
    flags.extend(flag("run-dir", &node.run_dir));
    flags.extend(flag("state-dir", &node.state_dir));
    flags.extend(flag("cgroup-root", &node.cgroup_subtree));
    flags.extend(flag("cni-conf-dir", &node.cni_dir));
    flags
}

fn run_agentctl(flags: &[String], args: &[&str]) -> Output {
    Command::new(integration::binary("agentctl"))
        .args(args)
        .args(flags)
        .output()
        .expect("run agentctl")
}

/// Runs agentctl, failing the test unless it succeeds; returns stdout.
fn agentctl_ok(flags: &[String], args: &[&str]) -> String {
    let output = run_agentctl(flags, args);
    assert!(
        output.status.success(),
        "agentctl {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("agentctl prints UTF-8")
}

fn agentctl_json(flags: &[String], args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let text = agentctl_ok(flags, &args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("agentctl JSON ({e}):\n{text}"))
}

fn pod_by_uid<'a>(report: &'a Value, uid: &str) -> &'a Value {
    report["pods"]
        .as_array()
        .expect("pods array")
        .iter()
        .find(|pod| pod["uid"] == uid)
        .unwrap_or_else(|| panic!("pod {uid} not in agentctl pods:\n{report:#}"))
}

fn wait_running(plane: &ControlPlane, node: &Node, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = plane.kubectl(&["get", "pod", name, "-o", "json"]);
        let pod: Value = serde_json::from_str(&text).expect("pod JSON");
        if pod["status"]["phase"] == "Running" && pod["status"]["podIP"].is_string() {
            return pod;
        }
        assert!(
            Instant::now() < deadline,
            "pod {name} not Running within 60 s\nstatus: {:#}\nagent log:\n{}",
            pod["status"],
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Checks what `agentctl pods -o json` says of the running pod.
fn assert_pod_seen(report: &Value, pod: &Value, node: &Node, container_id: &str) {
    let uid = pod["metadata"]["uid"].as_str().expect("uid");
    let seen = pod_by_uid(report, uid);
    assert_eq!(seen["namespace"], "default", "{seen:#}");
    assert_eq!(seen["name"], "web", "{seen:#}");
    assert_eq!(seen["ips"][0], pod["status"]["podIP"], "{seen:#}");
    assert_eq!(seen["qosClass"], "BestEffort", "{seen:#}");
    assert_eq!(seen["missing"], serde_json::json!([]), "{seen:#}");
    assert_eq!(seen["problems"], serde_json::json!([]), "{seen:#}");

    let netns = PathBuf::from(seen["netns"].as_str().expect("netns"));
    assert!(
        netns.ends_with(format!("pods/{uid}/ns/net")),
        "netns {}",
        netns.display()
    );
    assert_eq!(
        std::fs::canonicalize(netns.parent().unwrap().parent().unwrap()).unwrap(),
        std::fs::canonicalize(node.run_dir.join("pods").join(uid)).unwrap()
    );
    let cgroup = PathBuf::from(seen["cgroup"].as_str().expect("cgroup"));
    assert_eq!(
        cgroup,
        node.cgroup_dir
            .join(format!("kubepods/besteffort/pod{uid}"))
    );
    assert!(cgroup.is_dir(), "{} is not a directory", cgroup.display());

    let containers = seen["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{seen:#}");
    let container = &containers[0];
    assert_eq!(container["name"], "app");
    assert_eq!(container["attempt"], 0);
    assert_eq!(container["state"], "running", "{container:#}");
    assert!(container["pid"].as_u64().is_some_and(|pid| pid > 0));
    assert_eq!(container["containerdId"], container_id);
    assert_eq!(container["image"], IMAGE);
    assert_eq!(
        container["cgroup"].as_str().map(PathBuf::from),
        Some(cgroup.join("app"))
    );
    // cpu.stat exists in every cgroup v2 directory, whatever the controllers.
    assert!(
        container["cpuUsageUsec"].as_u64().is_some(),
        "{container:#}"
    );
}

#[test]
fn agentctl_imports_images_and_shows_pods_while_the_agent_is_down() {
    require_root();
    let plane = ControlPlane::start();
    let containerd = Containerd::start();
    let mut node = Node::start(&plane, &containerd, &[]);
    let flags = node_flags(&node, &containerd);
    let scratch = tempfile::tempdir().expect("temp dir");
    let archive = scratch.path().join("busybox.tar");
    let built = ImageBuilder::busybox().write_archive(&archive, "1");

    // Import: the archive's bare tag joins the repository given with --name.
    let archive_arg = archive.display().to_string();
    let imported = agentctl_json(
        &flags,
        &["image", "import", &archive_arg, "--name", REPOSITORY],
    );
    assert_eq!(imported["images"][0]["name"], IMAGE, "{imported:#}");
    assert_eq!(imported["images"][0]["id"], built.config_digest.as_str());
    let table = agentctl_ok(&flags, &["image", "list"]);
    assert!(
        table.starts_with("NAME") && table.contains(IMAGE),
        "{table}"
    );

    // A pod of that image runs without any pull (the registry does not exist).
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  nodeName: {}\n  \
         terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {IMAGE}\n    \
         imagePullPolicy: IfNotPresent\n    command: [\"sh\", \"-c\", \"while true; do sleep 1; done\"]\n",
        node.name
    );
    let output = plane.kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(
        output.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pod = wait_running(&plane, &node, "web");
    let container_id = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("containerd://"))
        .expect("containerd:// container ID")
        .to_string();
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let ip = pod["status"]["podIP"].as_str().unwrap().to_string();

    let report = agentctl_json(&flags, &["pods"]);
    assert_eq!(report["unreadable"], serde_json::json!([]), "{report:#}");
    assert_pod_seen(&report, &pod, &node, &container_id);

    // The agent is gone; the machine still holds everything and agentctl reads it.
    node.kill();
    let report = agentctl_json(&flags, &["pods"]);
    assert_pod_seen(&report, &pod, &node, &container_id);
    let table = agentctl_ok(&flags, &["pods"]);
    assert!(table.contains("POD default/web"), "{table}");
    assert!(
        table.contains(&ip) && table.contains(&container_id),
        "{table}"
    );

    // A sandbox nobody owns (as a crash between sandbox and containers leaves one) is
    // listed with the sources that know nothing of it.
    let leaked_uid = "0badc0de-0000-4000-8000-000000000001";
    skiff_agent::sandbox::create(&node.run_dir, leaked_uid, "leaked")
        .expect("create a stray sandbox");
    let report = agentctl_json(&flags, &["pods"]);
    let leaked = pod_by_uid(&report, leaked_uid);
    assert_eq!(
        leaked["missing"],
        serde_json::json!(["containers", "cgroup", "network"]),
        "{leaked:#}"
    );
    assert!(leaked["netns"].is_string(), "{leaked:#}");
    assert_eq!(pod_by_uid(&report, &uid)["missing"], serde_json::json!([]));
    let table = agentctl_ok(&flags, &["pods"]);
    assert!(
        table.contains("MISSING: containers, cgroup, network"),
        "{table}"
    );
    skiff_agent::sandbox::remove(&node.run_dir, leaked_uid).expect("remove the stray sandbox");

    // Images, then removing one (the running container keeps its snapshot).
    let images = agentctl_json(&flags, &["image", "list"]);
    let listed = images["images"]
        .as_array()
        .expect("images array")
        .iter()
        .find(|image| image["name"] == IMAGE)
        .unwrap_or_else(|| panic!("{IMAGE} not listed:\n{images:#}"));
    assert_eq!(listed["id"], built.config_digest.as_str());
    assert!(listed["size"].as_i64().is_some_and(|size| size > 0));
    let removed = agentctl_json(&flags, &["image", "rm", IMAGE]);
    assert_eq!(removed["removed"], serde_json::json!([IMAGE]));
    let images = agentctl_json(&flags, &["image", "list"]);
    assert_eq!(images["images"], serde_json::json!([]), "{images:#}");
    let output = run_agentctl(&flags, &["image", "rm", IMAGE]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim_end(),
        format!("agentctl: image {IMAGE}: not found")
    );
    let report = agentctl_json(&flags, &["pods"]);
    assert_eq!(
        pod_by_uid(&report, &uid)["containers"][0]["state"],
        "running"
    );
}

#[test]
fn agentctl_names_what_it_cannot_reach() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let missing = scratch.path().join("missing.sock");
    let stale = scratch.path().join("stale.sock");
    // A socket file whose listener is gone: connecting is refused.
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind a socket"));
    for (socket, reason) in [
        (&missing, "no such file or directory"),
        (&stale, "connection refused"),
    ] {
        let flags = vec![
            "--containerd-socket".to_string(),
            socket.display().to_string(),
        ];
        let output = run_agentctl(&flags, &["image", "list"]);
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stderr).trim_end(),
            format!("agentctl: containerd at {}: {reason}", socket.display())
        );
    }

    // `pods` still prints what the readable sources hold, then fails naming the others.
    let run_dir = scratch.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let flags: Vec<String> = [
        "--containerd-socket",
        &stale.display().to_string(),
        "--run-dir",
        &run_dir.display().to_string(),
        "--state-dir",
        &scratch.path().join("state").display().to_string(),
        "--cgroup-root",
        "skiff-agentctl-test-no-such-subtree",
        "--cni-conf-dir",
        &scratch.path().join("cni").display().to_string(),
        "-o",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let output = run_agentctl(&flags, &["pods"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert_eq!(report["pods"], serde_json::json!([]));
    let sources: Vec<&str> = report["unreadable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["containers", "cgroup"], "{report:#}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(&format!(
            "agentctl: containerd at {}: connection refused; pod cgroups: ",
            stale.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("skiff-agentctl-test-no-such-subtree"),
        "{stderr}"
    );
}
