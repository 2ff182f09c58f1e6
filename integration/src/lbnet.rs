//! What the load balancer tests stand on, all of their own making and removed on drop even
//! when a test fails: network namespaces on a bridge (a client and backend "pods"), TCP and
//! UDP servers inside the backends that answer with their name, a cgroup v2 directory for
//! the socket hooks, and a private bpffs instance for the pins.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::netns::Netns;
use crate::unique_suffix;

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("run {program} {args:?}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The address of the `index`th pod (0: the client, 1..: backends) on the test bridge.
pub fn pod_address(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, 0, 10 + index)
}

/// A bridge in a "node" namespace with the client and backend namespaces attached; every
/// namespace is deleted on drop.
pub struct Topology {
    /// The client and backends: `pods[0]` is the client, the rest are backends.
    pub pods: Vec<Netns>,
    pub node: Netns,
}

impl Topology {
    /// The client and `n_backends` backends at [`pod_address`], servers not yet started.
    pub fn new(n_backends: u8) -> Self {
        let suffix = unique_suffix();
        let node = Netns::add(format!("lbn-{suffix}"));
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&["link", "set", "br0", "up"]);
        let mut topology = Self {
            pods: Vec::new(),
            node,
        };
        for index in 0..=n_backends {
            let pod = Netns::add(format!("lbp{index}-{suffix}"));
            let host_end = format!("v{index}");
            topology.node.add_veth(&host_end, &pod, "eth0");
            topology
                .node
                .ip(&["link", "set", &host_end, "master", "br0", "up"]);
            let address = format!("{}/24", pod_address(index));
            pod.ip(&["addr", "add", &address, "dev", "eth0"]);
            pod.ip(&["link", "set", "eth0", "up"]);
            // Service addresses are translated before routing, but a socket needs a route
            // to the address it asked for to get that far.
            pod.ip(&["route", "add", "default", "dev", "eth0"]);
            topology.pods.push(pod);
        }
        topology
    }

    pub fn client_netns(&self) -> PathBuf {
        self.pods[0].path()
    }

    pub fn backend_count(&self) -> u8 {
        u8::try_from(self.pods.len() - 1).expect("fewer than 256 pods")
    }

    /// Starts, in every backend, a TCP and a UDP server on `port` that answer each request
    /// line (each datagram) with `b<index>`. They live as long as the test process.
    pub fn serve(&self, port: u16) {
        for index in 1..=self.backend_count() {
            let netns = self.pods[usize::from(index)].path();
            let name = format!("b{index}");
            let (listener, socket) = skiff_agent::sandbox::run_in_namespace(
                &netns,
                skiff_agent::sandbox::Namespace::Net,
                || {
                    let tcp =
                        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind tcp server");
                    let udp =
                        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind udp server");
                    (tcp, udp)
                },
            )
            .expect("enter the backend's network namespace");
            let tcp_name = name.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let name = tcp_name.clone();
                    std::thread::spawn(move || {
                        let mut reader = BufReader::new(&stream);
                        let mut writer = &stream;
                        let mut line = String::new();
                        while reader.read_line(&mut line).is_ok_and(|read| read > 0) {
                            if writer.write_all(format!("{name}\n").as_bytes()).is_err() {
                                break;
                            }
                            line.clear();
                        }
                    });
                }
            });
            std::thread::spawn(move || {
                let mut buffer = [0; 256];
                while let Ok((_, from)) = socket.recv_from(&mut buffer) {
                    let _ = socket.send_to(name.as_bytes(), from);
                }
            });
        }
    }
}

/// A cgroup v2 directory of the test's own under the cgroup2 mount.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Self {
        let mount = skiff_agent::cgroups::find_cgroup2_mount(Path::new("/proc/self/mountinfo"))
            .expect("a cgroup2 mount (the socket load balancer attaches there)");
        let path = mount
            .mount_point
            .join(format!("skiff-lb-test-{}", unique_suffix()));
        std::fs::create_dir(&path)
            .unwrap_or_else(|error| panic!("create {}: {error}", path.display()));
        Self { path }
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Clients are gone by now; a cgroup with no process can be removed.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A private bpffs instance mounted at a temp dir.
pub struct TestBpffs {
    dir: tempfile::TempDir,
}

impl TestBpffs {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skiff-bpffs-")
            .tempdir()
            .expect("temp dir for bpffs");
        run(
            "mount",
            &["-t", "bpf", "bpf", &dir.path().display().to_string()],
        );
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TestBpffs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestBpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// One exchange as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exchange {
    Reply { peer: SocketAddr, backend: String },
    Error(String),
}

/// Runs `lb-client` in `cgroup` and `netns` (`mode`: `tcp` or `udp`) and parses its lines.
pub fn client(
    cgroup: &Path,
    netns: &Path,
    to: SocketAddr,
    mode: &str,
    count: usize,
) -> Vec<Exchange> {
    let output = Command::new(crate::binary("lb-client"))
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--netns")
        .arg(netns)
        .args(["--to", &to.to_string(), mode, "--count", &count.to_string()])
        .output()
        .expect("run lb-client");
    assert!(
        output.status.success(),
        "lb-client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(parse_exchange)
        .collect()
}

fn parse_exchange(line: &str) -> Exchange {
    if let Some(error) = line.strip_prefix("error=") {
        return Exchange::Error(error.to_owned());
    }
    let mut peer = None;
    let mut backend = String::new();
    for field in line.split(' ') {
        if let Some(value) = field.strip_prefix("peer=") {
            peer = value.parse().ok();
        } else if let Some(value) = field.strip_prefix("reply=") {
            value.clone_into(&mut backend);
        }
    }
    match peer {
        Some(peer) => Exchange::Reply { peer, backend },
        None => Exchange::Error(format!("unparsed client line {line:?}")),
    }
}

/// A client holding one TCP connection (or with `udp-hold`, one UDP socket) open, sending a
/// request per [`HeldConnection::ask`].
pub struct HeldConnection {
    child: std::process::Child,
    reader: BufReader<std::process::ChildStdout>,
    pub first_line: String,
}

impl HeldConnection {
    pub fn open(cgroup: &Path, netns: &Path, to: SocketAddr) -> Self {
        Self::open_mode(cgroup, netns, to, "hold")
    }

    pub fn open_mode(cgroup: &Path, netns: &Path, to: SocketAddr, mode: &str) -> Self {
        let mut child = Command::new(crate::binary("lb-client"))
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--netns")
            .arg(netns)
            .args(["--to", &to.to_string(), mode])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run lb-client hold");
        let mut reader = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut first_line = String::new();
        reader.read_line(&mut first_line).expect("read lb-client");
        Self {
            child,
            reader,
            first_line,
        }
    }

    pub fn ask(&mut self) -> Exchange {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"again\n").expect("write to lb-client");
        stdin.flush().expect("flush lb-client stdin");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read lb-client");
        parse_exchange(line.trim())
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut rest = String::new();
        let _ = self.reader.read_to_string(&mut rest);
    }
}
