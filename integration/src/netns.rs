//! A network namespace of a test's own: made with `ip netns add` under a unique name, with
//! `lo` up, and deleted (with every link, bridge and route in it) on drop, failed test or
//! not. The topology a test builds in it stays in the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace under `/run/netns`, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A namespace named `<prefix>-<unique suffix>`, unique across processes and within
    /// this one.
    pub fn new(prefix: &str) -> Netns {
        static MADE: AtomicU32 = AtomicU32::new(0);
        let n_made = MADE.fetch_add(1, Ordering::Relaxed);
        Netns::add(format!("{prefix}-{}-{n_made}", crate::unique_suffix()))
    }

    /// A namespace named exactly `name` (the caller makes it unique), with `lo` up.
    pub fn add(name: String) -> Netns {
        run_ip(&["netns", "add", &name]);
        // The guard exists before the next command, so a failure still deletes it.
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, as `setns` and `CNI_NETNS` take it.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <name> <args>`; returns its stdout and fails the test if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ip(&all)
    }

    /// A veth pair: `name` in this namespace, its peer `peer_name` in `peer`.
    pub fn add_veth(&self, name: &str, peer: &Netns, peer_name: &str) {
        self.ip(&[
            "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", &peer.name,
        ]);
    }

    /// Runs `script` with `sh -c` inside the namespace (`ip netns exec`); returns its stdout
    /// and fails the test if it fails.
    pub fn shell(&self, script: &str) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .output()
            .expect("run ip netns exec");
        assert!(
            output.status.success(),
            "{script:?} in {} failed ({}): {}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Turns IPv4 forwarding on in the namespace (it starts off in a new one).
    pub fn enable_forwarding(&self) {
        self.shell("echo 1 > /proc/sys/net/ipv4/ip_forward");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().expect("run ip");
    crate::succeeded("ip", args, &output)
}
