//! A one-node cluster for pod tests: a control plane, a private containerd and a real
//! agent, with a busybox image imported as [`IMAGE`]. Pods are applied by name and spec
//! and waited for; a wait that fails prints the pod's status and the agent's log. Test
//! files wrap it ([`pod_cluster_wrapper!`](crate::pod_cluster_wrapper)) to add their own
//! checks.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ControlPlane;
use crate::containerd::Containerd;
use crate::node::Node;
use crate::oci_image::ImageBuilder;

/// The image every pod of a [`PodCluster`] can run.
pub const IMAGE: &str = "skiff.test/busybox:1";

/// Declares `struct $name(PodCluster)` with `Deref` and `DerefMut` to it: a test file's own
/// checks are methods of a type of its own, since a file may not add them to [`PodCluster`].
#[macro_export]
macro_rules! pod_cluster_wrapper {
    ($(#[$attribute:meta])* $name:ident) => {
        $(#[$attribute])*
        struct $name($crate::pod_cluster::PodCluster);

        impl ::std::ops::Deref for $name {
            type Target = $crate::pod_cluster::PodCluster;

            fn deref(&self) -> &$crate::pod_cluster::PodCluster {
                &self.0
            }
        }

        impl ::std::ops::DerefMut for $name {
            fn deref_mut(&mut self) -> &mut $crate::pod_cluster::PodCluster {
                &mut self.0
            }
        }
    };
}

/// The pod's `status.phase`, or "" before it has one.
pub fn phase(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or("")
}

/// The status of the pod's condition `kind` ("True", "False", ...), or "" if it has none.
pub fn condition(pod: &Value, kind: &str) -> String {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

pub struct PodCluster {
    // Dropped in this order: the agent and its pods, then containerd, then the API.
    pub node: Node,
    pub containerd: Containerd,
    pub plane: ControlPlane,
    _images: tempfile::TempDir,
}

impl PodCluster {
    /// Starts everything (root only), the agent with `agent_args` added to the harness's.
    pub fn start(agent_args: &[&str]) -> Self {
        crate::require_root("these tests run containers, namespaces and cgroups");
        let plane = ControlPlane::start();
        let containerd = Containerd::start();
        let images = tempfile::Builder::new()
            .prefix("skiff-pod-cluster-")
            .tempdir()
            .expect("temp dir");
        let archive = images.path().join("busybox.tar");
        ImageBuilder::busybox().write_archive(&archive, "1");
        let node = Node::start(&plane, &containerd, agent_args);
        node.import_image(&containerd, &archive, IMAGE);
        Self {
            node,
            containerd,
            plane,
            _images: images,
        }
    }

    /// A Pod manifest `name` bound to this node, `spec` being the YAML under `spec:`
    /// (indented by two spaces).
    pub fn pod_manifest(&self, name: &str, spec: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {node}\n{spec}",
            node = self.node.name
        )
    }

    /// `kubectl apply` of any manifest.
    pub fn apply(&self, manifest: &str) {
        let output = self.plane.kubectl_stdin(&["apply", "-f", "-"], manifest);
        assert!(
            output.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Applies [`PodCluster::pod_manifest`].
    pub fn apply_pod(&self, name: &str, spec: &str) {
        self.apply(&self.pod_manifest(name, spec));
    }

    pub fn pod(&self, name: &str) -> Value {
        let text = self.plane.kubectl(&["get", "pod", name, "-o", "json"]);
        serde_json::from_str(&text).expect("pod JSON")
    }

    /// Waits up to 60 s until `check` holds for the pod.
    pub fn wait_for_pod(&self, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_pod_within(name, what, Duration::from_secs(60), check)
    }

    /// Waits until `check` holds for the pod, failing after `timeout` with the pod and the
    /// agent's log.
    pub fn wait_for_pod_within(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let pod = self.pod(name);
            if check(&pod) {
                return pod;
            }
            assert!(
                Instant::now() < deadline,
                "pod {name}: {what} not reached within {timeout:?}\nstatus: {:#}\nagent log:\n{}",
                pod["status"],
                self.node.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The CRI log file of container `container` of the pod in its run `attempt`.
    pub fn log_file(&self, pod: &Value, container: &str, attempt: u32) -> PathBuf {
        let meta = &pod["metadata"];
        self.node
            .log_dir
            .join(format!(
                "{}_{}_{}",
                meta["namespace"].as_str().unwrap(),
                meta["name"].as_str().unwrap(),
                meta["uid"].as_str().unwrap()
            ))
            .join(container)
            .join(format!("{attempt}.log"))
    }

    /// The lines container `container` of the pod printed in its run `attempt`, once `found`
    /// holds for one of them; after 20 s the test fails with `what` it looked for, the
    /// lines and the agent's log.
    pub fn wait_for_output(
        &self,
        pod: &Value,
        container: &str,
        attempt: u32,
        what: &str,
        found: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let path = self.log_file(pod, container, attempt);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // CRI log lines: `<time> <stream> <tag> <text>`.
            let lines: Vec<String> = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter_map(|line| line.splitn(4, ' ').nth(3).map(str::to_owned))
                .collect();
            if lines.iter().any(|line| found(line)) {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} in {} within 20 s: {lines:?}\nagent log:\n{}",
                path.display(),
                self.node.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the pod is gone from the API.
    pub fn wait_gone(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self
            .plane
            .kubectl_output(&["get", "pod", name, "-o", "name"])
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "pod {name} still exists after {timeout:?}\nagent log:\n{}",
                self.node.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
