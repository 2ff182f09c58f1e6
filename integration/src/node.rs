//! A real node for end-to-end tests: `skiff-agent run` against a [`ControlPlane`] and a
//! private [`Containerd`], with its own run/state/log directories, a cgroup subtree under
//! the host's cgroup2 mount, a CNI network on a bridge of its own (skiff-cni), all made
//! with unique names and removed on drop, pods' processes included.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::containerd::{Containerd, cgroup2_root};
use crate::{ControlPlane, binary};

/// A running agent and everything it was given; cleaned up on drop.
pub struct Node {
    child: Option<Child>,
    pub name: String,
    temp: tempfile::TempDir,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    pub cni_dir: PathBuf,
    /// The agent's cgroup subtree, relative to the cgroup2 mount.
    pub cgroup_subtree: PathBuf,
    /// The same, as a host path.
    pub cgroup_dir: PathBuf,
    pub bridge: String,
    /// The load balancer's bpffs (the agent mounts it; removed on drop).
    pub bpffs_dir: PathBuf,
    /// The pod subnet's first three octets ("10.77.3").
    pub subnet: String,
    args: Vec<String>,
    agent_log: PathBuf,
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:x}{:x}", std::process::id() % 0xffff, nanos % 0xfffff)
}

impl Node {
    /// Starts an agent registered as a fresh node and waits until its Node is Ready.
    pub fn start(plane: &ControlPlane, containerd: &Containerd, extra_args: &[&str]) -> Node {
        let temp = tempfile::Builder::new()
            .prefix("skiff-node-")
            .tempdir()
            .expect("temp dir for the node");
        let suffix = unique_suffix();
        let name = format!("node-{suffix}");
        let root = temp.path();
        // The run and state directories hold mounts (pod namespaces, tmpfs volumes) that
        // runc, in containerd's mount namespace, must see.
        let (run_dir, state_dir, log_dir, cni_dir) = (
            containerd.shared_dir.join(&name),
            containerd.shared_dir.join(format!("{name}-state")),
            root.join("logs"),
            root.join("cni"),
        );
        for dir in [&run_dir, &state_dir, &log_dir, &cni_dir] {
            std::fs::create_dir_all(dir).expect("create node dir");
        }
        let cgroup_root =
            cgroup2_root().expect("no cgroup2 mount on this host: the agent needs one");
        let cgroup_subtree = PathBuf::from(format!("skiff-test-{suffix}"));
        let cgroup_dir = cgroup_root.join(&cgroup_subtree);
        let bridge = format!("skb{}", &suffix[suffix.len().saturating_sub(8)..]);
        let seed = std::process::id() as u64 * 7919
            + u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos()),
            );
        let subnet = format!("10.{}.{}", 150 + seed % 80, (seed / 80) % 250);
        let conflist = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": format!("skiff-{suffix}"),
            "plugins": [{
                "type": "skiff-cni",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "subnet": format!("{subnet}.0/24"),
                    "dataDir": state_dir.join("ipam"),
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }],
        });
        std::fs::write(
            cni_dir.join("10-skiff.conflist"),
            serde_json::to_vec_pretty(&conflist).expect("conflist"),
        )
        .expect("write conflist");
        let cni_bin = binary("skiff-cni")
            .parent()
            .expect("binary dir")
            .to_path_buf();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--node-name".into(),
            name.clone(),
            "--kubeconfig".into(),
            plane.kubeconfig.display().to_string(),
            "--pod-cidr".into(),
            format!("{subnet}.0/24"),
            "--containerd-socket".into(),
            containerd.socket.display().to_string(),
            "--containerd-namespace".into(),
            containerd.namespace().to_string(),
            "--cgroup-root".into(),
            cgroup_subtree.display().to_string(),
            "--run-dir".into(),
            run_dir.display().to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--pod-log-dir".into(),
            log_dir.display().to_string(),
            "--cni-conf-dir".into(),
            cni_dir.display().to_string(),
            "--cni-bin-dir".into(),
            cni_bin.display().to_string(),
            "--node-api-listen".into(),
            "127.0.0.1:0".into(),
            "--status-report-seconds".into(),
            "5".into(),
            // The node API trusts the control plane's CA, so `kubectl logs` works.
            "--bpffs-dir".into(),
            root.join("bpf").display().to_string(),
            "--client-ca-file".into(),
            plane
                .data_dir
                .join("pki")
                .join("ca.crt")
                .display()
                .to_string(),
        ];
        // A development machine's disk may well be below the kubelet's nodefs threshold;
        // tests must not depend on it, so only memory pressure evicts unless a test says.
        if !extra_args.contains(&"--node-ip") {
            args.extend(["--node-ip".into(), "127.0.0.1".into()]);
        }
        if !extra_args.contains(&"--eviction-hard") {
            args.extend(["--eviction-hard".into(), "memory.available<1Mi".into()]);
        }
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let agent_log = root.join("agent.log");
        let bpffs_dir = root.join("bpf");
        let mut node = Node {
            bpffs_dir,
            child: None,
            name,
            run_dir,
            state_dir,
            log_dir,
            cni_dir,
            cgroup_subtree,
            cgroup_dir,
            bridge,
            subnet,
            args,
            agent_log,
            temp,
        };
        node.spawn();
        node.wait_ready(plane);
        node
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.agent_log)
            .expect("agent log");
        let child = Command::new(binary("skiff-agent"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn skiff-agent");
        self.child = Some(child);
    }

    /// Waits until the Node reports Ready (and fails with the agent's log if it does not).
    pub fn wait_ready(&mut self, plane: &ControlPlane) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let output = plane.kubectl_output(&[
                "get",
                "node",
                &self.name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            if output.status.success() && String::from_utf8_lossy(&output.stdout) == "True" {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("skiff-agent exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "node {} not Ready within 30 s:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.agent_log).unwrap_or_default()
    }

    /// `kill -9` of the agent: pods keep running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again with the same settings.
    pub fn restart(&mut self, plane: &ControlPlane) {
        self.kill();
        self.spawn();
        self.wait_ready(plane);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Imports an OCI archive into containerd's namespace for this node's agent.
    pub fn import_image(&self, containerd: &Containerd, archive: &Path, name: &str) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let client = skiff_agent::containerd::Client::connect(
                &containerd.socket,
                containerd.namespace(),
            )
            .await
            .expect("connect to containerd");
            let images = skiff_agent::image::ImageService::new(client, Default::default());
            images
                .import_archive(archive, Some(name))
                .await
                .expect("import the test image");
        });
    }

    /// The cgroup directories of the pods on this node (host paths).
    pub fn pod_cgroups(&self) -> Vec<PathBuf> {
        let kubepods = self.cgroup_dir.join("kubepods");
        let mut found = Vec::new();
        for dir in [
            kubepods.clone(),
            kubepods.join("burstable"),
            kubepods.join("besteffort"),
        ] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with("pod") {
                    found.push(entry.path());
                }
            }
        }
        found
    }

    pub fn temp_dir(&self) -> &Path {
        self.temp.path()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        // Every process of every pod lives under the subtree: kill them all at once.
        let kill = self.cgroup_dir.join("cgroup.kill");
        if kill.exists() {
            let _ = std::fs::write(&kill, "1");
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(self.cgroup_dir.join("cgroup.events"))
                .is_ok_and(|events| events.contains("populated 1"))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Pod namespaces and volume mounts.
        if let Ok(uids) = skiff_agent::sandbox::list(&self.run_dir) {
            for uid in uids {
                let _ = skiff_agent::sandbox::remove(&self.run_dir, &uid);
            }
        }
        let pods = self.state_dir.join("pods");
        for pod in std::fs::read_dir(&pods).into_iter().flatten().flatten() {
            let _ = skiff_agent::pods::volumes::remove(
                &self.state_dir,
                &pod.file_name().to_string_lossy(),
            );
        }
        // Unpinning the load balancer's links detaches its programs from the subtree.
        if skiff_agent::mountinfo::is_mount_point(&self.bpffs_dir) {
            let _ = Command::new("umount").arg(&self.bpffs_dir).status();
        }
        remove_tree(&self.cgroup_dir);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes a cgroup directory tree, deepest first.
fn remove_tree(path: &Path) {
    for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(path);
}
