//! A one-node cluster for pod tests: a control plane, a private containerd and a real
//! agent, with a busybox image imported as [`IMAGE`]. Pods are applied by name and spec
//! and waited for; a wait that fails prints the pod's status and the agent's log. Test
//! files wrap it (`struct Cluster(PodCluster)` with `Deref`) to add their own checks.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ControlPlane;
use crate::containerd::Containerd;
use crate::node::Node;
use crate::oci_image::ImageBuilder;

/// The image every pod of a [`PodCluster`] can run.
pub const IMAGE: &str = "skiff.test/busybox:1";

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
