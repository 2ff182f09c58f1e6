//! Helpers shared by the root-only integration tests: namespaces with random names removed
//! on drop, running a CNI plugin inside a "host" namespace the test made, and snapshots of
//! what a plugin left in a namespace (read with `ip -j`).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

pub const REFERENCE_DIR: &str = "/usr/lib/cni";

pub fn skiff_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_skiff-cni"))
}

/// The reference bridge plugin; fails the test with instructions when it is missing.
pub fn reference_bridge() -> PathBuf {
    for plugin in ["bridge", "host-local"] {
        let path = Path::new(REFERENCE_DIR).join(plugin);
        assert!(
            path.exists(),
            "reference CNI plugin {} is missing: install Debian's containernetworking-plugins \
             (apt-get install -y containernetworking-plugins)",
            path.display()
        );
    }
    Path::new(REFERENCE_DIR).join("bridge")
}

pub fn require_root_tools() {
    let ok = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "these tests need iproute2's `ip` (apt-get install -y iproute2)"
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and need root"
    );
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:08x}", rand::random::<u32>())
}

/// A network namespace under /run/netns with a random name, deleted on drop (taking every
/// link, bridge and route inside it along).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `ip -n <ns> args...` and returns stdout; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let text = self.ip(&full);
        if text.trim().is_empty() {
            return Value::Array(vec![]);
        }
        serde_json::from_str(&text).unwrap()
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-qw"])
            .arg(format!("{key}={value}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "sysctl {key} in {}", self.name);
    }
}

impl Netns {
    /// IPv4 and IPv6 forwarding switches of the namespace, as "v4/v6".
    pub fn forwarding(&self) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "cat",
                "/proc/sys/net/ipv4/ip_forward",
            ])
            .arg("/proc/sys/net/ipv6/conf/all/forwarding")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("/")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// One plugin run's outcome.
#[derive(Debug, Clone)]
pub struct PluginRun {
    pub exit_ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl PluginRun {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}): {:?}", self.stdout))
    }

    pub fn expect_ok(self, what: &str) -> PluginRun {
        assert!(
            self.exit_ok,
            "{what} failed: stdout {} stderr {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// The CNI environment of one call.
pub struct Call<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: Option<&'a str>,
    pub ifname: &'a str,
}

/// Runs a plugin binary inside `host` (the test's stand-in for the node's namespace), so
/// that bridges, sysctls and firewall rules stay inside namespaces the test made.
pub fn run_plugin(bin: &Path, host: &Netns, call: &Call, config: &Value) -> PluginRun {
    run_plugin_with_args(bin, host, call, config, "")
}

/// `run_plugin` with `CNI_ARGS`.
pub fn run_plugin_with_args(
    bin: &Path,
    host: &Netns,
    call: &Call,
    config: &Value,
    cni_args: &str,
) -> PluginRun {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host.name])
        .arg(bin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_PATH", REFERENCE_DIR)
        .env("CNI_ARGS", cni_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(netns) = call.netns {
        cmd.env("CNI_NETNS", netns);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    PluginRun {
        exit_ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Host veth names are random; they are compared as "veth*".
fn norm_name(name: &str) -> String {
    if name.starts_with("veth") {
        "veth*".to_owned()
    } else {
        name.to_owned()
    }
}

/// What a plugin left in a namespace, in a form that does not depend on random names,
/// MACs or interface indexes: links (name, kind, mtu, up, master, hairpin, promisc),
/// IPv4 and global IPv6 addresses, and the main table's routes (less IPv6 link-local and
/// multicast ones).
pub fn snapshot(ns: &Netns) -> Value {
    let mut links: Vec<Value> = ns
        .ip_json(&["-d", "link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let slave = &l["linkinfo"]["info_slave_data"];
            serde_json::json!({
                "name": norm_name(l["ifname"].as_str().unwrap_or("")),
                "kind": l["linkinfo"]["info_kind"],
                "mtu": l["mtu"],
                "up": l["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "UP")),
                "master": l.get("master").map(|m| m.as_str().unwrap_or("").to_owned()),
                "hairpin": slave.get("hairpin"),
                "promisc": l["promiscuity"].as_u64().unwrap_or(0) > 0,
            })
        })
        .collect();
    links.sort_by_key(|v| v.to_string());
    let mut addrs: Vec<String> = Vec::new();
    let mut listed = ns
        .ip_json(&["-4", "addr", "show"])
        .as_array()
        .unwrap()
        .clone();
    listed.extend(
        ns.ip_json(&["-6", "addr", "show", "scope", "global"])
            .as_array()
            .unwrap()
            .clone(),
    );
    for l in &listed {
        for a in l["addr_info"].as_array().into_iter().flatten() {
            addrs.push(format!(
                "{} {}/{}",
                norm_name(l["ifname"].as_str().unwrap_or("")),
                a["local"].as_str().unwrap_or(""),
                a["prefixlen"]
            ));
        }
    }
    addrs.sort();
    let mut route_list = ns
        .ip_json(&["-4", "route", "show"])
        .as_array()
        .unwrap()
        .clone();
    // IPv6: everything but link-local and multicast, which the kernel adds by itself.
    route_list.extend(
        ns.ip_json(&["-6", "route", "show"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                let dst = r["dst"].as_str().unwrap_or("");
                !dst.starts_with("fe80") && !dst.starts_with("ff00")
            })
            .cloned(),
    );
    let mut routes: Vec<String> = route_list
        .iter()
        .map(|r| {
            format!(
                "{} via {} dev {} proto {} scope {} src {}",
                r["dst"].as_str().unwrap_or(""),
                r["gateway"].as_str().unwrap_or("-"),
                norm_name(r["dev"].as_str().unwrap_or("")),
                r["protocol"].as_str().unwrap_or("-"),
                r["scope"].as_str().unwrap_or("-"),
                r["prefsrc"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    routes.sort();
    serde_json::json!({ "links": links, "addresses": addrs, "routes": routes })
}

/// A result with random parts (MACs, host veth names) taken out, and keys put in order.
pub fn normalize_result(result: &Value) -> Value {
    let mut r = result.clone();
    if let Some(ifaces) = r.get_mut("interfaces").and_then(Value::as_array_mut) {
        for i in ifaces {
            if let Some(obj) = i.as_object_mut() {
                let had_mac = obj
                    .remove("mac")
                    .is_some_and(|m| m.as_str().is_some_and(|s| s.len() == 17));
                obj.insert("mac".into(), Value::Bool(had_mac));
                let name = obj["name"].as_str().unwrap_or("").to_owned();
                obj.insert("name".into(), Value::String(norm_name(&name)));
            }
        }
    }
    // serde_json's map is ordered by key, so the round trip canonicalizes.
    serde_json::from_str(&r.to_string()).unwrap()
}

/// The reservation files left in an IPAM data directory (everything but the lock and
/// the last-reserved hints).
pub fn reservations(network_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(network_dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
        .collect();
    out.sort();
    out
}

/// Runs `f` on a thread that has entered `netns`, so sockets it opens live there. The
/// test process's own threads never change namespace.
pub fn in_netns<T: Send>(netns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(netns.path()).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// True when a TCP connection from `from` reaches a listener the test opens in `to` on
/// `addr` (the listener binds the unspecified address of `addr`'s family, the client
/// dials `addr`).
pub fn tcp_reaches(from: &Netns, to: &Netns, addr: std::net::IpAddr) -> bool {
    tcp_peer_seen(from, to, addr).is_some()
}

/// Connects from `from` to a listener in `to` at `addr`, exchanges a few bytes, and
/// returns the client address the listener saw (None when the connection failed).
pub fn tcp_peer_seen(from: &Netns, to: &Netns, addr: std::net::IpAddr) -> Option<std::net::IpAddr> {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;
    let any = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let listener = in_netns(to, || TcpListener::bind(any).unwrap());
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().ok()?;
        let mut buf = [0u8; 4];
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.read_exact(&mut buf).ok()?;
        s.write_all(&buf).ok()?;
        Some(peer.ip())
    });
    let ok = in_netns(from, || {
        let Ok(mut s) =
            TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(3))
        else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
    });
    if !ok {
        // Unblock the accept so the server thread ends.
        let _ = in_netns(to, || {
            TcpStream::connect_timeout(
                &SocketAddr::new([127, 0, 0, 1].into(), port),
                Duration::from_secs(1),
            )
        });
    }
    let seen = server.join().unwrap();
    if ok { seen } else { None }
}

/// The paths at which two JSON values differ, with both sides, for readable failures.
pub fn json_diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                json_diff(
                    &format!("{path}.{k}"),
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                json_diff(&format!("{path}[{i}]"), p, q, out);
            }
        }
        _ if a != b => out.push(format!("{path}: ours {a} / reference {b}")),
        _ => {}
    }
}
