//! Root test of the agent's host-gw routes (`skiff_agent::routes`): the reconciler runs in
//! this process, fed by a real `skiff-control` through kube-rs, and writes routes into a
//! network namespace the test makes (`ip netns add`) with a veth link holding
//! 192.0.2.1/24. Nodes are created, changed and deleted with the real kubectl, and the
//! routes are read back with `ip -n <ns> route`. The host's routes are never touched; the
//! [`Netns`] guard deletes the namespace (and its link and routes) on drop, failed
//! assertion or not.

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::ControlPlane;
use serde_json::Value;
use skiff_agent::routes::{ROUTE_PROTOCOL, Routes, RoutesConfig};

fn require_root() {
    integration::require_root("this test creates a network namespace");
    integration::require_tool("ip", "apt-get install -y iproute2");
}

fn random_u32() -> u32 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.write_u32(std::process::id());
    hasher.finish() as u32
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("spawn");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of the test's own, `ip netns add`ed, with `veth0` up holding
/// 192.0.2.1/24; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let netns = Netns {
            name: format!("skiff-routes-{:08x}", random_u32()),
        };
        run(Command::new("ip").args(["netns", "add", &netns.name]));
        // The machine's kernel has no dummy links; a veth pair with both ends in the
        // namespace gives the same connected /24.
        netns.ip(&[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
        ]);
        netns.ip(&["addr", "add", "192.0.2.1/24", "dev", "veth0"]);
        netns.ip(&["link", "set", "veth1", "up"]);
        netns.ip(&["link", "set", "veth0", "up"]);
        netns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Every IPv4 route of the main table but the link's own, as `dst via gw proto p`.
    fn routes(&self) -> BTreeSet<String> {
        let text = self.ip(&["-j", "-4", "route", "show", "table", "main"]);
        let routes: Value = serde_json::from_str(&text).expect("ip -j prints JSON");
        routes
            .as_array()
            .expect("a list of routes")
            .iter()
            .filter(|r| r["protocol"] != "kernel")
            .map(|r| {
                format!(
                    "{} via {} proto {}",
                    r["dst"].as_str().unwrap_or("?"),
                    r["gateway"].as_str().unwrap_or("-"),
                    // `ip -j` leaves out the default protocol, boot.
                    r["protocol"].as_str().unwrap_or("boot")
                )
            })
            .collect()
    }

    /// Waits up to 10 s for the routes to be exactly `expected`.
    fn wait_routes(&self, what: &str, expected: &[&str]) {
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let routes = self.routes();
            if routes == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: routes in {} are\n{routes:#?}\nexpected\n{expected:#?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The route reconciler running in this process on its own runtime, against the test's
/// namespace; stopped (its task and netlink socket dropped) on drop.
struct Reconciler {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Reconciler {
    fn start(plane: &ControlPlane, netns: &Netns) -> Reconciler {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("reconciler runtime");
        let kubeconfig = plane.kubeconfig.clone();
        let path = netns.path();
        let (client, routes) = runtime.block_on(async move {
            let file = kube::config::Kubeconfig::read_from(&kubeconfig).expect("read kubeconfig");
            let config = kube::Config::from_custom_kubeconfig(
                file,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .expect("load kubeconfig");
            let client = kube::Client::try_from(config).expect("kube client");
            let routes = Routes::in_namespace(&path).expect("netlink socket in the namespace");
            (client, routes)
        });
        let config = RoutesConfig {
            node_name: "self-node".into(),
            own_pod_cidrs: Vec::new(),
            // Far away: every change below must be driven by the Node watch alone.
            resync: Duration::from_secs(600),
        };
        runtime.spawn(skiff_agent::routes::run(client, routes, config));
        Reconciler {
            runtime: Some(runtime),
        }
    }
}

impl Drop for Reconciler {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn node(name: &str, pod_cidr: &str, internal_ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Node
metadata:
  name: {name}
spec:
  podCIDR: {pod_cidr}
  podCIDRs: [{pod_cidr}]
status:
  addresses:
  - {{type: InternalIP, address: {internal_ip}}}
  - {{type: Hostname, address: {name}}}
"
    )
}

fn apply(plane: &ControlPlane, manifest: &str) {
    let output = plane.kubectl_stdin(&["apply", "-f", "-"], manifest);
    assert!(
        output.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Changes a Node's InternalIP through the status subresource (a write to the Node itself
/// keeps the stored status, as kube-apiserver does).
fn set_internal_ip(plane: &ControlPlane, name: &str, internal_ip: &str) {
    let patch = format!(
        r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"{internal_ip}"}},{{"type":"Hostname","address":"{name}"}}]}}}}"#
    );
    plane.kubectl(&[
        "patch",
        "node",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch,
    ]);
}

#[test]
fn routes_follow_nodes_and_only_the_agents_own_are_touched() {
    require_root();
    let p = ROUTE_PROTOCOL;
    let netns = Netns::new();
    // A route the agent did not make, and one to a podCIDR a Node will claim: both stay.
    netns.ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.254"]);
    netns.ip(&[
        "route",
        "add",
        "10.77.5.0/24",
        "via",
        "192.0.2.254",
        "proto",
        "static",
    ]);
    let plane = ControlPlane::start();

    let mut manifest = String::new();
    for (name, cidr, ip) in [
        ("self-node", "10.77.1.0/24", "192.0.2.1"),
        ("node-b", "10.77.2.0/24", "192.0.2.2"),
        ("node-c", "10.77.3.0/24", "192.0.2.3"),
        // Its gateway is not on the namespace's link: the kernel refuses the route.
        ("node-d", "10.77.4.0/24", "203.0.113.4"),
        ("node-e", "10.77.5.0/24", "192.0.2.5"),
    ] {
        manifest.push_str("---\n");
        manifest.push_str(&node(name, cidr, ip));
    }
    apply(&plane, &manifest);

    let reconciler = Reconciler::start(&plane, &netns);
    netns.wait_routes(
        "first reconcile",
        &[
            &format!("10.77.2.0/24 via 192.0.2.2 proto {p}"),
            &format!("10.77.3.0/24 via 192.0.2.3 proto {p}"),
            "10.77.5.0/24 via 192.0.2.254 proto static",
            "198.51.100.0/24 via 192.0.2.254 proto boot",
        ],
    );

    // A changed InternalIP moves the route; a refused Node is retried when it changes.
    set_internal_ip(&plane, "node-b", "192.0.2.22");
    set_internal_ip(&plane, "node-d", "192.0.2.4");
    netns.wait_routes(
        "after InternalIP changes",
        &[
            &format!("10.77.2.0/24 via 192.0.2.22 proto {p}"),
            &format!("10.77.3.0/24 via 192.0.2.3 proto {p}"),
            &format!("10.77.4.0/24 via 192.0.2.4 proto {p}"),
            "10.77.5.0/24 via 192.0.2.254 proto static",
            "198.51.100.0/24 via 192.0.2.254 proto boot",
        ],
    );

    plane.kubectl(&["delete", "node", "node-c"]);
    netns.wait_routes(
        "after node-c is deleted",
        &[
            &format!("10.77.2.0/24 via 192.0.2.22 proto {p}"),
            &format!("10.77.4.0/24 via 192.0.2.4 proto {p}"),
            "10.77.5.0/24 via 192.0.2.254 proto static",
            "198.51.100.0/24 via 192.0.2.254 proto boot",
        ],
    );

    // While the agent is down, node-b goes away and a route of the agent's for a Node that
    // never existed is left behind: the restarted reconciler removes both.
    drop(reconciler);
    plane.kubectl(&["delete", "node", "node-b"]);
    netns.ip(&[
        "route",
        "add",
        "10.77.9.0/24",
        "via",
        "192.0.2.9",
        "proto",
        &p.to_string(),
    ]);
    let _reconciler = Reconciler::start(&plane, &netns);
    netns.wait_routes(
        "after a restart",
        &[
            &format!("10.77.4.0/24 via 192.0.2.4 proto {p}"),
            "10.77.5.0/24 via 192.0.2.254 proto static",
            "198.51.100.0/24 via 192.0.2.254 proto boot",
        ],
    );
}
