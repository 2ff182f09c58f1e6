//! `hostNetwork: true` pods end to end: the control plane, a private containerd with runc
//! and a real `skiff-agent`. Such a pod shares the node's network and UTS namespaces (the
//! agent's, which are this test process's), keeps an IPC namespace of its own, has the
//! node's IP as its own, is never attached to the CNI network, survives an agent restart,
//! and leaves nothing behind when deleted; a pod-network pod beside it is unaffected.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration::pod_cluster::{IMAGE, PodCluster};
use serde_json::Value;

integration::pod_cluster_wrapper!(
    /// The shared one-node cluster, with this file's own checks.
    Cluster
);

fn cluster() -> Cluster {
    Cluster(PodCluster::start(&[]))
}

impl Cluster {
    /// The lines the pod's container `app` printed in its first run, once one starting
    /// with `last` is among them.
    fn output(&self, pod: &Value, last: &str) -> Vec<String> {
        self.wait_for_output(pod, "app", 0, last, |line| line.starts_with(last))
    }

    /// The pod's cgroup directory, if it has one.
    fn pod_cgroup(&self, uid: &str) -> Option<PathBuf> {
        self.node
            .pod_cgroups()
            .into_iter()
            .find(|dir| dir.file_name().is_some_and(|n| *n == *format!("pod{uid}")))
    }

    /// The namespace of kind `kind` the container `app` of the pod runs in, as the host
    /// sees its first process.
    fn container_namespace(&self, uid: &str, kind: &str) -> String {
        let cgroup = self
            .pod_cgroup(uid)
            .unwrap_or_else(|| panic!("no cgroup for pod {uid}"));
        let procs = std::fs::read_to_string(cgroup.join("app").join("cgroup.procs"))
            .expect("read the container's cgroup.procs");
        let pid = procs
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no process in the cgroup of pod {uid}"));
        namespace_of(&format!("/proc/{pid}/ns/{kind}"))
    }

    /// The IPAM reservations of the node's subnet: (address file, the container ID in it).
    fn ip_reservations(&self) -> Vec<(PathBuf, String)> {
        integration::files_under(&self.node.state_dir.join("ipam"))
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&self.node.subnet))
            })
            .map(|p| {
                let owner = std::fs::read_to_string(&p).unwrap_or_default();
                (p, owner)
            })
            .collect()
    }

    /// The files of the CNI result cache that name `uid`.
    fn cni_cache_entries(&self, uid: &str) -> Vec<PathBuf> {
        integration::files_under(&skiff_agent::cni::cni_cache_dir(&self.node.run_dir))
            .into_iter()
            .filter(|p| {
                p.to_string_lossy().contains(uid)
                    || std::fs::read_to_string(p).is_ok_and(|text| text.contains(uid))
            })
            .collect()
    }

    fn agentctl_pods(&self) -> Value {
        let output = Command::new(integration::binary("agentctl"))
            .args(["pods", "-o", "json"])
            .arg("--containerd-socket")
            .arg(&self.containerd.socket)
            .args(["--containerd-namespace", self.containerd.namespace()])
            .arg("--run-dir")
            .arg(&self.node.run_dir)
            .arg("--state-dir")
            .arg(&self.node.state_dir)
            .arg("--cgroup-root")
            .arg(&self.node.cgroup_subtree)
            .arg("--cni-conf-dir")
            .arg(&self.node.cni_dir)
            .output()
            .expect("run agentctl");
        assert!(
            output.status.success(),
            "agentctl pods failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("agentctl JSON")
    }
}

/// `net:[4026531840]` for a `/proc/<pid>/ns/<kind>` path.
fn namespace_of(path: &str) -> String {
    std::fs::read_link(path)
        .unwrap_or_else(|e| panic!("readlink {path}: {e}"))
        .to_string_lossy()
        .into_owned()
}

fn running(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running"
        && pod["status"]["containerStatuses"][0]["state"]["running"].is_object()
}

fn uid(pod: &Value) -> String {
    pod["metadata"]["uid"].as_str().expect("uid").to_string()
}

/// Prints what the container sees of its names, then waits for SIGTERM.
const REPORT: &str = r#"hostname=`hostname`; echo "hostname=$hostname"; echo "etc-hostname=`cat /etc/hostname`"; echo "env-hostname=$HOSTNAME"; echo "hosts=`head -n 1 /etc/hosts`"; trap 'exit 0' TERM; while true; do sleep 0.2; done"#;

#[test]
fn a_host_network_pod_shares_the_node_network_and_hostname_and_leaves_nothing() {
    let cluster = cluster();
    let node_hostname = skiff_agent::sandbox::node_hostname().expect("the node's hostname");
    let spec = |host_network: bool| {
        format!(
            "  hostNetwork: {host_network}\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: app\n    image: {IMAGE}\n    command: [\"sh\", \"-c\", {REPORT:?}]\n"
        )
    };
    cluster.apply_pod("hostnet", &spec(true));
    cluster.apply_pod("podnet", &spec(false));
    let host_pod = cluster.wait_for_pod("hostnet", "Running", running);
    let pod_pod = cluster.wait_for_pod("podnet", "Running", running);
    let (host_uid, pod_uid) = (uid(&host_pod), uid(&pod_pod));

    // The node's addresses are the pod's.
    let status = &host_pod["status"];
    assert_eq!(status["hostIP"], "127.0.0.1", "{status:#}");
    assert_eq!(status["podIP"], status["hostIP"], "{status:#}");
    assert_eq!(status["podIPs"], serde_json::json!([{"ip": "127.0.0.1"}]));
    let pod_ip = pod_pod["status"]["podIP"].as_str().expect("podIP");
    assert!(
        pod_ip.starts_with(&format!("{}.", cluster.node.subnet)),
        "pod IP {pod_ip} outside the node's subnet"
    );

    // The node's network and UTS namespaces (this process's, which the agent and runc
    // share), an IPC namespace of its own; the other pod has its own three.
    let own = |kind: &str| namespace_of(&format!("/proc/self/ns/{kind}"));
    for kind in ["net", "uts"] {
        assert_eq!(
            cluster.container_namespace(&host_uid, kind),
            own(kind),
            "{kind}"
        );
        assert_ne!(
            cluster.container_namespace(&pod_uid, kind),
            own(kind),
            "{kind}"
        );
    }
    assert_ne!(cluster.container_namespace(&host_uid, "ipc"), own("ipc"));
    assert_ne!(
        cluster.container_namespace(&pod_uid, "net"),
        cluster.container_namespace(&host_uid, "net")
    );

    // The node's hostname, everywhere the container can read one; the node's hosts file
    // under the kubelet's host-network header.
    let lines = cluster.output(&host_pod, "hosts=");
    for expected in [
        format!("hostname={node_hostname}"),
        format!("etc-hostname={node_hostname}"),
        format!("env-hostname={node_hostname}"),
        "hosts=# Kubernetes-managed hosts file (host network).".to_string(),
    ] {
        assert!(lines.contains(&expected), "{expected:?} not in {lines:?}");
    }
    let lines = cluster.output(&pod_pod, "hosts=");
    assert!(lines.contains(&"hostname=podnet".to_string()), "{lines:?}");
    assert!(
        lines.contains(&"hosts=# Kubernetes-managed hosts file.".to_string()),
        "{lines:?}"
    );

    // The sandbox holds only the IPC namespace, and the pod is not on the CNI network.
    let sandbox = skiff_agent::sandbox::open(&cluster.node.run_dir, &host_uid)
        .expect("open the sandbox")
        .expect("a complete sandbox");
    assert_eq!(sandbox.namespaces(), [skiff_agent::sandbox::Namespace::Ipc]);
    assert_eq!(sandbox.own_netns_path(), None);
    assert!(cluster.cni_cache_entries(&host_uid).is_empty());
    let reservations = cluster.ip_reservations();
    assert_eq!(reservations.len(), 1, "{reservations:?}");
    assert!(reservations[0].1.contains(&pod_uid), "{reservations:?}");

    // agentctl sees a whole pod, not a leak.
    let report = cluster.agentctl_pods();
    let view = report["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["uid"] == host_uid.as_str())
        .unwrap_or_else(|| panic!("no pod {host_uid} in {report:#}"));
    assert_eq!(view["hostNetwork"], true, "{view:#}");
    assert_eq!(view["missing"], serde_json::json!([]), "{view:#}");
    assert_eq!(view["problems"], serde_json::json!([]), "{view:#}");

    // A restarted agent adopts the sandbox and restarts no container.
    let container_id = status["containerStatuses"][0]["containerID"].clone();
    let mut cluster = cluster;
    let PodCluster { node, plane, .. } = &mut cluster.0;
    node.restart(plane);
    std::thread::sleep(Duration::from_secs(3));
    let after = cluster.wait_for_pod("hostnet", "Running after the restart", running);
    let container = &after["status"]["containerStatuses"][0];
    assert_eq!(
        container["containerID"], container_id,
        "{:#}",
        after["status"]
    );
    assert_eq!(container["restartCount"], 0, "{:#}", after["status"]);
    assert_eq!(after["status"]["podIP"], "127.0.0.1");

    // Deleting it leaves no sandbox, cgroup, CNI cache entry or address behind; the
    // other pod keeps its own.
    cluster
        .plane
        .kubectl(&["delete", "pod", "hostnet", "--wait=false"]);
    cluster.wait_gone("hostnet", Duration::from_secs(30));
    assert!(
        !cluster.node.run_dir.join("pods").join(&host_uid).exists(),
        "sandbox left behind"
    );
    assert_eq!(
        cluster.pod_cgroup(&host_uid),
        None,
        "pod cgroup left behind"
    );
    assert!(cluster.cni_cache_entries(&host_uid).is_empty());
    assert_eq!(cluster.ip_reservations().len(), 1);
    assert!(running(&cluster.pod("podnet")));

    cluster
        .plane
        .kubectl(&["delete", "pod", "podnet", "--wait=false"]);
    cluster.wait_gone("podnet", Duration::from_secs(30));
    assert!(
        skiff_agent::sandbox::list(&cluster.node.run_dir)
            .unwrap()
            .is_empty()
    );
    assert!(cluster.node.pod_cgroups().is_empty());
    assert_eq!(cluster.ip_reservations(), []);
    assert!(cluster.cni_cache_entries(&pod_uid).is_empty());
}
