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

    /// Applies a Pod `name` bound to this node, `spec` being the YAML under `spec:`
    /// (indented by two spaces).
    pub fn apply_pod(&self, name: &str, spec: &str) {
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {node}\n{spec}",
            node = self.node.name
        );
        let output = self.plane.kubectl_stdin(&["apply", "-f", "-"], &manifest);
        assert!(
            output.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn pod(&self, name: &str) -> Value {
        let text = self.plane.kubectl(&["get", "pod", name, "-o", "json"]);
        serde_json::from_str(&text).expect("pod JSON")
    }

    /// Waits until `check` holds for the pod, failing with the pod and the agent's log.
    pub fn wait_for_pod(&self, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pod = self.pod(name);
            if check(&pod) {
                return pod;
            }
            assert!(
                Instant::now() < deadline,
                "pod {name}: {what} not reached within 60 s\nstatus: {:#}\nagent log:\n{}",
                pod["status"],
                self.node.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
