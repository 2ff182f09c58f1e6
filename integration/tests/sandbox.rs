//! Root tests of the agent's pause-less sandbox and its CNI runtime with real plugins: the
//! reference `bridge` + `host-local` (+ `portmap`, `tuning`) from containernetworking-plugins,
//! and skiff's own `skiff-cni`, through the same runtime code.
//!
//! Each test makes a "node" network namespace of its own (`ip netns add`) and runs the CNI
//! runtime on a thread inside it, so the plugins' bridges, iptables rules and sysctls stay in
//! namespaces the test made. Run directory, IPAM data, configuration and results cache are
//! temp dirs. The [`Node`] guard removes every sandbox, then the namespace and the dirs, on
//! drop, failed assertion or not.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};
use skiff_agent::cni::{self, Attachment, AttachmentId, CniError, PortMapping, Runtime};
use skiff_agent::sandbox::{self, Namespace, Sandbox, files};

const REFERENCE_DIR: &str = "/usr/lib/cni";

fn require_root() {
    integration::require_root("these tests create namespaces and mounts");
    integration::require_tool("ip", "apt-get install -y iproute2");
}

/// The reference plugins' directory; fails with an install hint when one is missing.
fn reference_plugins() -> PathBuf {
    for plugin in ["bridge", "host-local", "portmap", "tuning"] {
        let path = Path::new(REFERENCE_DIR).join(plugin);
        assert!(
            path.exists(),
            "reference CNI plugin {} is missing: apt-get install -y containernetworking-plugins",
            path.display()
        );
    }
    integration::require_tool("iptables", "apt-get install -y iptables (portmap needs it)");
    PathBuf::from(REFERENCE_DIR)
}

/// The directory of the built `skiff-cni`.
fn skiff_cni_dir() -> PathBuf {
    integration::binary("skiff-cni")
        .parent()
        .expect("binary directory")
        .to_path_buf()
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

fn unique(prefix: &str) -> String {
    format!("{prefix}{:08x}", random_u32())
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

fn json_of(text: &str) -> Value {
    if text.trim().is_empty() {
        return json!([]);
    }
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `ip -j <args>` run inside the namespace at `netns` (from a thread that entered it).
fn ip_in(netns: &Path, args: &[&str]) -> Value {
    let text = sandbox::run_in_namespace(netns, Namespace::Net, || {
        run(Command::new("ip").arg("-j").args(args))
    })
    .expect("enter the namespace");
    json_of(&text)
}

fn link_names(links: &Value) -> Vec<String> {
    links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_owned())
        .collect()
}

/// The IPv4 addresses of `ifname` in `netns`, as `a.b.c.d/len`.
fn addresses(netns: &Path, ifname: &str) -> Vec<String> {
    ip_in(netns, &["-4", "addr", "show", "dev", ifname])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// The mount points under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

/// A test's node: its network namespace, a bridge name and subnet of its own, and temp
/// dirs for the run directory, the CNI configuration, IPAM data and the results cache.
/// Dropping it removes every sandbox under the run directory, then the namespace (and so
/// every bridge, veth and rule in it), then the dirs.
struct Node {
    netns_name: String,
    bridge: String,
    /// The first three octets of the test's /24.
    subnet: String,
    run_dir: tempfile::TempDir,
    conf_dir: tempfile::TempDir,
    ipam_dir: tempfile::TempDir,
    cache_dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        require_root();
        let temp = |prefix: &str| {
            tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .expect("temp dir")
        };
        let netns_name = unique("sksbx-node-");
        run(Command::new("ip").args(["netns", "add", &netns_name]));
        let node = Node {
            bridge: unique("sksb"),
            subnet: format!("10.{}.{}", 100 + random_u32() % 100, random_u32() % 250),
            run_dir: temp("skiff-sandbox-run-"),
            conf_dir: temp("skiff-sandbox-conf-"),
            ipam_dir: temp("skiff-sandbox-ipam-"),
            cache_dir: temp("skiff-sandbox-cache-"),
            netns_name,
        };
        node.ip(&["link", "set", "lo", "up"]);
        node
    }

    fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns_name)
    }

    fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// `ip -n <node> -j <args>`.
    fn ip(&self, args: &[&str]) -> Value {
        json_of(&run(Command::new("ip")
            .args(["-n", &self.netns_name, "-j"])
            .args(args)))
    }

    /// The ports of the test's bridge.
    fn bridge_ports(&self) -> Vec<String> {
        link_names(&self.ip(&["link", "show", "master", &self.bridge]))
    }

    /// Reservations in the IPAM data directory of `network` (host-local's layout, which
    /// skiff-cni keeps too).
    fn reservations(&self, network: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.ipam_dir.path().join(network)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
            .collect();
        names.sort();
        names
    }

    /// Runs `future` on a thread inside the node namespace, so the plugins the runtime
    /// spawns run there.
    fn block_on<F>(&self, future: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        sandbox::run_in_namespace(&self.netns_path(), Namespace::Net, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(future)
        })
        .expect("enter the node namespace")
    }

    fn write_config(&self, file: &str, config: &Value) -> cni::NetworkConfigList {
        std::fs::write(self.conf_dir.path().join(file), config.to_string()).unwrap();
        cni::load_config_dir(self.conf_dir.path()).expect("load the test's configuration")
    }

    fn iptables_nat(&self) -> String {
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.netns_name,
            "iptables",
            "-t",
            "nat",
            "-S",
        ]))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for uid in sandbox::list(self.run_dir.path()).unwrap_or_default() {
            if let Err(err) = sandbox::remove(self.run_dir.path(), &uid) {
                eprintln!("cleanup: remove sandbox {uid}: {err}");
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns_name])
            .output();
    }
}

fn pod(name: &str, uid: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            subdomain: Some("web".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A new sandbox whose namespaces are not the test process's, with its hostname and `lo`
/// up, adopted by `open` and listed.
fn new_sandbox(node: &Node, uid: &str, hostname: &str) -> Sandbox {
    let sb = sandbox::create(node.run_dir(), uid, hostname).expect("create the sandbox");
    assert_eq!(sb.hostname().unwrap(), hostname);
    for ns in Namespace::ALL {
        let ours = std::fs::metadata(format!("/proc/self/ns/{}", ns.file_name())).unwrap();
        let pods = std::fs::metadata(sb.namespace_path(ns)).unwrap();
        assert_ne!(
            (ours.dev(), ours.ino()),
            (pods.dev(), pods.ino()),
            "the pod's {} namespace is the test's own",
            ns.file_name()
        );
    }
    let links = ip_in(&sb.netns_path(), &["link", "show"]);
    assert_eq!(link_names(&links), ["lo"], "a fresh network namespace");
    let flags = links[0]["flags"].as_array().unwrap();
    assert!(flags.contains(&json!("UP")), "lo is up: {flags:?}");
    assert_eq!(
        sandbox::open(node.run_dir(), uid).unwrap().as_ref(),
        Some(&sb)
    );
    assert!(
        sandbox::list(node.run_dir())
            .unwrap()
            .contains(&uid.to_owned())
    );
    sb
}

/// After `remove`: nothing of the sandbox is left, mounted or on disk.
fn assert_sandbox_gone(node: &Node, sb: &Sandbox) {
    assert_eq!(sandbox::open(node.run_dir(), sb.pod_uid()).unwrap(), None);
    assert!(
        !sandbox::list(node.run_dir())
            .unwrap()
            .contains(&sb.pod_uid().to_owned())
    );
    assert!(!sb.netns_path().exists(), "netns file left");
    assert!(!sb.dir().exists(), "pod directory left");
    let pods = node.run_dir().join("pods");
    let dir = std::fs::canonicalize(&pods)
        .unwrap_or(pods)
        .join(sb.pod_uid());
    assert_eq!(mounts_under(&dir), Vec::<String>::new());
}

/// Nothing mounted under the run directory and no pod directory left.
fn assert_run_dir_clean(node: &Node) {
    assert_eq!(mounts_under(node.run_dir()), Vec::<String>::new());
    assert_eq!(sandbox::list(node.run_dir()).unwrap(), Vec::<String>::new());
}

/// The whole life of one pod's network through `runtime` and `network`, whatever the
/// plugins: sandbox, ADD, the address on eth0, pod files, CHECK, adoption from the cache,
/// DEL, sandbox removal, DEL again, nothing left.
fn pod_network_lifecycle(node: &Node, runtime: &Runtime, network: &cni::NetworkConfigList) {
    let uid = unique("pod-");
    let sb = new_sandbox(node, &uid, "web-0");
    let attachment = Attachment::for_pod("shop", "web-0", &uid, &sb.netns_path())
        .with_port_mappings(&[PortMapping {
            host_port: 18080,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }]);

    let result = node
        .block_on(runtime.add(network, &attachment))
        .expect("ADD");
    assert_eq!(result.cni_version, network.cni_version);
    let pod_ips = result.sandbox_ips("eth0");
    assert_eq!(pod_ips.len(), 1, "one pod IP: {:?}", result.raw());
    let pod_ip = pod_ips[0];
    assert!(
        pod_ip.to_string().starts_with(&format!("{}.", node.subnet)),
        "{pod_ip} in {}.0/24",
        node.subnet
    );
    let eth0 = result
        .interfaces
        .iter()
        .find(|i| i.name == "eth0")
        .expect("eth0 in the result");
    assert_eq!(Path::new(&eth0.sandbox), sb.netns_path());
    assert_eq!(
        addresses(&sb.netns_path(), "eth0"),
        [format!("{pod_ip}/24")],
        "the pod IP is on eth0 inside the pod's namespace"
    );
    let routes = ip_in(&sb.netns_path(), &["-4", "route", "show", "default"]);
    assert_eq!(
        routes[0]["gateway"],
        json!(format!("{}.1", node.subnet)),
        "{routes}"
    );
    assert_eq!(node.bridge_ports().len(), 1, "one bridge port");
    assert_eq!(node.reservations(&network.name), [pod_ip.to_string()]);

    // The pod files, with the IP the network gave.
    let settings = files::DnsSettings {
        cluster_dns: vec!["10.96.0.10".parse().unwrap()],
        cluster_domain: "cluster.local".into(),
        ..Default::default()
    };
    let pod_files = files::PodFiles::for_pod(&pod("web-0", &uid), &pod_ips, &settings, None)
        .expect("pod files");
    sb.write_files(&pod_files).unwrap();
    let hosts = std::fs::read_to_string(sb.hosts_path()).unwrap();
    assert!(
        hosts.ends_with(&format!(
            "{pod_ip}\tweb-0.web.shop.svc.cluster.local\tweb-0\n"
        )),
        "{hosts}"
    );

    node.block_on(runtime.check(network, &attachment))
        .expect("CHECK");

    // An agent restart: the sandbox and the attachment are found again.
    let adopted = sandbox::open(node.run_dir(), &uid).unwrap().expect("adopt");
    assert_eq!(adopted, sb);
    let restarted = Runtime::new(runtime.bin_dirs().to_vec(), runtime.cache_dir());
    let cached = restarted
        .cached(&network.name, &uid, "eth0")
        .unwrap()
        .expect("cached attachment");
    assert_eq!(cached.result.sandbox_ips("eth0"), pod_ips);
    assert_eq!(cached.attachment, attachment);

    node.block_on(restarted.del(network, &attachment))
        .expect("DEL");
    assert_eq!(
        link_names(&ip_in(&sb.netns_path(), &["link", "show"])),
        ["lo"]
    );
    assert_eq!(node.bridge_ports(), Vec::<String>::new(), "no bridge port");
    assert_eq!(node.reservations(&network.name), Vec::<String>::new());
    assert!(
        restarted
            .cached(&network.name, &uid, "eth0")
            .unwrap()
            .is_none()
    );
    node.block_on(restarted.del(network, &attachment))
        .expect("DEL again");

    sandbox::remove(node.run_dir(), &uid).expect("remove the sandbox");
    sandbox::remove(node.run_dir(), &uid).expect("remove the sandbox again");
    assert_sandbox_gone(node, &sb);
    // DEL once more, now that the namespace itself is gone.
    node.block_on(restarted.del(network, &attachment))
        .expect("DEL without a namespace");
    assert_eq!(node.reservations(&network.name), Vec::<String>::new());
    assert!(
        !node.iptables_nat().contains(&uid),
        "portmap rules left: {}",
        node.iptables_nat()
    );
}

/// The reference `bridge` with `host-local`, and `portmap` after them when asked.
fn reference_config(node: &Node, network: &str, ipam_range: Value, portmap: bool) -> Value {
    let mut plugins = vec![json!({
        "type": "bridge", "bridge": node.bridge, "isGateway": true, "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "dataDir": node.ipam_dir.path(),
            "ranges": [[ipam_range]],
            "routes": [{"dst": "0.0.0.0/0"}],
        },
    })];
    if portmap {
        plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    json!({"cniVersion": "1.0.0", "name": network, "plugins": plugins})
}

#[test]
fn reference_plugins_run_a_pod_network() {
    let bin = reference_plugins();
    let node = Node::new();
    let network = unique("skt-");
    let range = json!({"subnet": format!("{}.0/24", node.subnet)});
    let config = node.write_config(
        "10-reference.conflist",
        &reference_config(&node, &network, range, false),
    );
    assert_eq!(config.plugins.len(), 1);
    let runtime = Runtime::new(vec![bin], node.cache_dir.path());
    node.block_on(runtime.validate(&config))
        .expect("the reference plugins speak 1.0.0");
    pod_network_lifecycle(&node, &runtime, &config);
    assert_run_dir_clean(&node);
}

/// `portmap` in the chain gets the pod's port mappings as `runtimeConfig` (it declares the
/// capability) and sets up DNAT for them. No CHECK here: the reference portmap 1.1.1 checks
/// the IPv6 table even for an IPv4-only pod and fails ("could not check ipv6 dnat: chain
/// CNI-DN-... not found"), an upstream bug.
#[test]
fn portmap_gets_the_port_mappings() {
    let bin = reference_plugins();
    let node = Node::new();
    let network = unique("skt-");
    let range = json!({"subnet": format!("{}.0/24", node.subnet)});
    let config = node.write_config(
        "10-reference.conflist",
        &reference_config(&node, &network, range, true),
    );
    let runtime = Runtime::new(vec![bin], node.cache_dir.path());
    let uid = unique("pod-");
    let sb = new_sandbox(&node, &uid, "web-0");
    let attachment = Attachment::for_pod("shop", "web-0", &uid, &sb.netns_path())
        .with_port_mappings(&[PortMapping {
            host_port: 18080,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }]);
    let result = node.block_on(runtime.add(&config, &attachment)).unwrap();
    let pod_ip = result.sandbox_ips("eth0")[0];
    let nat = node.iptables_nat();
    assert!(
        nat.contains("--dport 18080") && nat.contains(&format!("{pod_ip}:80")),
        "portmap's DNAT for 18080 -> {pod_ip}:80 (runtimeConfig.portMappings): {nat}"
    );
    node.block_on(runtime.del(&config, &attachment)).unwrap();
    let nat = node.iptables_nat();
    assert!(!nat.contains("--dport 18080"), "{nat}");
    assert_eq!(node.bridge_ports(), Vec::<String>::new());
    assert_eq!(node.reservations(&network), Vec::<String>::new());
    sandbox::remove(node.run_dir(), &uid).unwrap();
    assert_sandbox_gone(&node, &sb);
    assert_run_dir_clean(&node);
}

#[test]
fn skiff_cni_runs_a_pod_network_with_status_and_gc() {
    let node = Node::new();
    let network = unique("skt-");
    // A single-plugin .conf, which the runtime turns into a list of one.
    let config = node.write_config(
        "10-skiff.conf",
        &json!({
            "cniVersion": "1.1.0", "name": network, "type": "skiff-cni",
            "bridge": node.bridge, "isGateway": true,
            "ipam": {
                "type": "host-local", "subnet": format!("{}.0/24", node.subnet),
                "dataDir": node.ipam_dir.path(), "routes": [{"dst": "0.0.0.0/0"}],
            },
        }),
    );
    assert_eq!(config.plugins.len(), 1);
    let runtime = Runtime::new(vec![skiff_cni_dir()], node.cache_dir.path());
    node.block_on(runtime.validate(&config))
        .expect("skiff-cni speaks 1.1.0");
    node.block_on(runtime.status(&config)).expect("STATUS");
    pod_network_lifecycle(&node, &runtime, &config);

    // GC: of two attachments, the one not in the valid list is deleted.
    let mut sandboxes = Vec::new();
    for name in ["keep", "stale"] {
        let uid = unique(&format!("{name}-"));
        let sb = new_sandbox(&node, &uid, name);
        let attachment = Attachment::for_pod("shop", name, &uid, &sb.netns_path());
        node.block_on(runtime.add(&config, &attachment))
            .expect("ADD");
        sandboxes.push((sb, attachment));
    }
    let (keep, stale) = (&sandboxes[0], &sandboxes[1]);
    assert_eq!(node.bridge_ports().len(), 2);
    let valid = [AttachmentId {
        container_id: keep.1.container_id.clone(),
        ifname: "eth0".into(),
    }];
    node.block_on(runtime.gc(&config, &valid)).expect("GC");
    assert_eq!(node.bridge_ports().len(), 1);
    assert_eq!(
        link_names(&ip_in(&stale.0.netns_path(), &["link", "show"])),
        ["lo"]
    );
    assert_eq!(node.reservations(&network).len(), 1);
    let cached: Vec<String> = runtime
        .cached_attachments()
        .unwrap()
        .into_iter()
        .map(|c| c.attachment.container_id)
        .collect();
    assert_eq!(cached, std::slice::from_ref(&keep.1.container_id));
    node.block_on(runtime.check(&config, &keep.1))
        .expect("CHECK of the kept one");
    node.block_on(runtime.del(&config, &keep.1)).expect("DEL");
    for (sb, _) in &sandboxes {
        sandbox::remove(node.run_dir(), sb.pod_uid()).unwrap();
        assert_sandbox_gone(&node, sb);
    }
    assert_eq!(node.reservations(&network), Vec::<String>::new());
    assert_eq!(node.bridge_ports(), Vec::<String>::new());
    assert_run_dir_clean(&node);
}

/// After a failed ADD: the pod's namespace holds only `lo`, the bridge only the ports of
/// the pods that were there before, IPAM only their reservations, the cache nothing new.
fn assert_failed_add_left_nothing(
    node: &Node,
    runtime: &Runtime,
    network: &str,
    sb: &Sandbox,
    ports_before: usize,
    reservations_before: &[String],
) {
    assert_eq!(
        link_names(&ip_in(&sb.netns_path(), &["link", "show"])),
        ["lo"]
    );
    assert_eq!(node.bridge_ports().len(), ports_before);
    assert_eq!(node.reservations(network), reservations_before);
    assert!(
        runtime
            .cached(network, sb.pod_uid(), "eth0")
            .unwrap()
            .is_none()
    );
}

#[test]
fn reference_plugin_errors_surface_and_leave_nothing() {
    let bin = reference_plugins();
    let node = Node::new();
    let runtime = Runtime::new(vec![bin], node.cache_dir.path());

    // A range of one address: the second pod finds it taken. The bridge plugin made the
    // veth before asking IPAM; the runtime's DEL takes it away.
    let network = unique("skt-");
    let only = format!("{}.10", node.subnet);
    let range = json!({
        "subnet": format!("{}.0/24", node.subnet), "rangeStart": only, "rangeEnd": only,
    });
    let one_address = node.write_config(
        "10-one.conflist",
        &reference_config(&node, &network, range, true),
    );
    let first = new_sandbox(&node, &unique("pod-"), "first");
    let first_attachment =
        Attachment::for_pod("shop", "first", first.pod_uid(), &first.netns_path());
    node.block_on(runtime.add(&one_address, &first_attachment))
        .expect("the first pod gets the address");
    let second = new_sandbox(&node, &unique("pod-"), "second");
    let attachment = Attachment::for_pod("shop", "second", second.pod_uid(), &second.netns_path());
    let err = node
        .block_on(runtime.add(&one_address, &attachment))
        .expect_err("the range is exhausted");
    assert_eq!(err.plugin(), Some("bridge"), "{err}");
    assert_eq!(err.code(), Some(999), "the reference answers 999: {err}");
    assert!(
        err.plugin_message()
            .is_some_and(|m| m.contains("no IP addresses available")),
        "{err}"
    );
    assert!(matches!(err, CniError::Plugin { .. }), "{err}");
    assert_failed_add_left_nothing(
        &node,
        &runtime,
        &network,
        &second,
        1,
        std::slice::from_ref(&only),
    );

    // A chain whose second plugin fails after the bridge plugin has attached the pod.
    std::fs::remove_file(node.conf_dir.path().join("10-one.conflist")).unwrap();
    let chain_network = unique("skt-");
    let chain = node.write_config(
        "10-chain.conflist",
        &json!({
            "cniVersion": "1.0.0", "name": chain_network,
            "plugins": [
                {"type": "bridge", "bridge": node.bridge, "isGateway": true,
                 "ipam": {"type": "host-local", "dataDir": node.ipam_dir.path(),
                          "subnet": format!("{}.0/24", node.subnet),
                          "rangeStart": format!("{}.100", node.subnet)}},
                {"type": "tuning", "dataDir": node.ipam_dir.path().join("tuning"),
                 "sysctl": {"net.ipv4.conf.eth0.skiff_no_such_key": "1"}},
            ],
        }),
    );
    let err = node
        .block_on(runtime.add(&chain, &attachment))
        .expect_err("tuning fails");
    assert_eq!(err.plugin(), Some("tuning"), "{err}");
    assert!(err.code().is_some(), "an error object: {err}");
    assert!(
        err.plugin_message()
            .is_some_and(|m| m.contains("skiff_no_such_key")),
        "{err}"
    );
    assert_failed_add_left_nothing(&node, &runtime, &chain_network, &second, 1, &[]);

    node.block_on(runtime.del(&one_address, &first_attachment))
        .expect("DEL of the first pod");
    assert_eq!(node.reservations(&network), Vec::<String>::new());
    assert_eq!(node.bridge_ports(), Vec::<String>::new());
    for sb in [&first, &second] {
        sandbox::remove(node.run_dir(), sb.pod_uid()).unwrap();
        assert_sandbox_gone(&node, sb);
    }
    assert_run_dir_clean(&node);
}

#[test]
fn skiff_cni_errors_carry_spec_codes_and_leave_nothing() {
    let node = Node::new();
    let runtime = Runtime::new(vec![skiff_cni_dir()], node.cache_dir.path());
    let network = unique("skt-");
    let only = format!("{}.10", node.subnet);
    let config = cni::NetworkConfigList::from_value(
        json!({
            "cniVersion": "1.1.0", "name": network,
            "plugins": [{
                "type": "skiff-cni", "bridge": node.bridge, "isGateway": true,
                "ipam": {"type": "host-local", "dataDir": node.ipam_dir.path(), "ranges": [[{
                    "subnet": format!("{}.0/24", node.subnet),
                    "rangeStart": only, "rangeEnd": only,
                }]]},
            }],
        }),
        "<test>",
    )
    .unwrap();
    let first = new_sandbox(&node, &unique("pod-"), "first");
    let first_attachment =
        Attachment::for_pod("shop", "first", first.pod_uid(), &first.netns_path());
    node.block_on(runtime.add(&config, &first_attachment))
        .unwrap();
    let second = new_sandbox(&node, &unique("pod-"), "second");
    let attachment = Attachment::for_pod("shop", "second", second.pod_uid(), &second.netns_path());
    let err = node
        .block_on(runtime.add(&config, &attachment))
        .expect_err("the range is exhausted");
    assert_eq!(err.code(), Some(11), "{err}");
    assert!(err.is_try_again_later());
    assert_eq!(err.plugin(), Some("skiff-cni"));
    assert_failed_add_left_nothing(&node, &runtime, &network, &second, 1, &[only]);
    let status = node
        .block_on(runtime.status(&config))
        .expect_err("STATUS says the range is exhausted");
    assert_eq!(status.code(), Some(50), "{status}");

    // A configuration the plugin cannot decode: code 6 and the plugin's message.
    let mut bad = config.clone();
    bad.plugins[0].raw.insert("mtu".into(), json!("big"));
    let err = node
        .block_on(runtime.add(&bad, &attachment))
        .expect_err("bad mtu");
    assert_eq!(err.code(), Some(6), "{err}");
    assert!(
        err.plugin_message()
            .is_some_and(|m| m.starts_with("decode network configuration")),
        "{err}"
    );
    assert_failed_add_left_nothing(
        &node,
        &runtime,
        &network,
        &second,
        1,
        &[format!("{}.10", node.subnet)],
    );

    node.block_on(runtime.del(&config, &first_attachment))
        .unwrap();
    assert_eq!(node.reservations(&network), Vec::<String>::new());
    for sb in [&first, &second] {
        sandbox::remove(node.run_dir(), sb.pod_uid()).unwrap();
        assert_sandbox_gone(&node, sb);
    }
    assert_run_dir_clean(&node);
}

#[test]
fn a_failed_sandbox_creation_leaves_nothing() {
    let node = Node::new();
    // Too long for the kernel: refused before anything is made.
    let uid = unique("pod-");
    let err = sandbox::create(node.run_dir(), &uid, &"h".repeat(65)).unwrap_err();
    assert!(err.to_string().contains("longer than 64 bytes"), "{err}");
    assert!(sandbox::list(node.run_dir()).unwrap().is_empty());
    // A second create of a live sandbox is refused and leaves the first intact.
    let sb = new_sandbox(&node, &uid, "once");
    let err = sandbox::create(node.run_dir(), &uid, "twice").unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(sb.hostname().unwrap(), "once");
    // A half-made sandbox (a crash after the mount point, before the namespaces) is
    // listed for GC, not opened, and a new create starts over.
    sandbox::remove(node.run_dir(), &uid).unwrap();
    std::fs::create_dir_all(sb.dir().join("ns")).unwrap();
    std::fs::write(sb.dir().join("ns/net"), "").unwrap();
    assert_eq!(
        sandbox::list(node.run_dir()).unwrap(),
        std::slice::from_ref(&uid)
    );
    assert_eq!(sandbox::open(node.run_dir(), &uid).unwrap(), None);
    let again = sandbox::create(node.run_dir(), &uid, "again").unwrap();
    assert_eq!(again.hostname().unwrap(), "again");
    sandbox::remove(node.run_dir(), &uid).unwrap();
    assert_sandbox_gone(&node, &again);
    assert_run_dir_clean(&node);
}

#[test]
fn pod_ips_are_reachable_inside_the_node() {
    // The reference bridge as gateway: the node reaches the pod over the bridge.
    let bin = reference_plugins();
    let node = Node::new();
    let network = unique("skt-");
    let range = json!({"subnet": format!("{}.0/24", node.subnet)});
    let config = node.write_config(
        "10-reference.conflist",
        &reference_config(&node, &network, range, false),
    );
    let runtime = Runtime::new(vec![bin], node.cache_dir.path());
    let uid = unique("pod-");
    let sb = new_sandbox(&node, &uid, "web-0");
    let attachment = Attachment::for_pod("shop", "web-0", &uid, &sb.netns_path());
    let result = node.block_on(runtime.add(&config, &attachment)).unwrap();
    let pod_ip: IpAddr = result.sandbox_ips("eth0")[0];
    let listener = sandbox::run_in_namespace(&sb.netns_path(), Namespace::Net, || {
        std::net::TcpListener::bind("0.0.0.0:0").unwrap()
    })
    .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer.ip()));
    let connected = sandbox::run_in_namespace(&node.netns_path(), Namespace::Net, || {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::new(pod_ip, port),
            std::time::Duration::from_secs(5),
        )
        .is_ok()
    })
    .unwrap();
    assert!(connected, "node -> pod {pod_ip}:{port}");
    let peer = server.join().unwrap().unwrap();
    assert_eq!(
        peer.to_string(),
        format!("{}.1", node.subnet),
        "from the gateway"
    );
    node.block_on(runtime.del(&config, &attachment)).unwrap();
    sandbox::remove(node.run_dir(), &uid).unwrap();
    assert_sandbox_gone(&node, &sb);
    assert_run_dir_clean(&node);
}
