//! The node of a local skiff: a private containerd and one `skiff-agent`, started in the
//! background with pid files and logs ([`start`]), and everything they made (pods'
//! processes, shims, mounts, the bridge, cgroups) removed again ([`stop`]). `up`/`down` use
//! [`Layout::system`]; the pod bench uses a layout of unique names under a temp dir.
//!
//! On a hybrid cgroup host runc would create cgroup v1 directories, so containerd runs in a
//! private mount namespace that sees only cgroup2 at `/sys/fs/cgroup`, with its own tmpfs at
//! `/run/containerd` for the shims' sockets and runc's state. The agent runs on the host; the
//! namespaces and volumes it mounts must reach runc, so its run and state directories are
//! shared bind mounts of which containerd's namespace holds slave copies. On a pure cgroup
//! v2 host the same arrangement works unchanged. This is `integration::containerd` and
//! `integration::node` for a long-lived node, written against files and pids instead of
//! in-memory handles so that `down` in a later process finds everything.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::cluster::{self, Kubeconfig};

/// The containerd namespace the agent keeps its containers and images in.
pub const CONTAINERD_NAMESPACE: &str = "skiff";

/// How long containerd may take to answer on its socket.
const CONTAINERD_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent may take to register a Ready Node.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The release binaries a node runs.
pub struct Binaries {
    pub control: PathBuf,
    pub agent: PathBuf,
    pub cni: PathBuf,
}

/// Builds `skiff-control`, `skiff-agent` and `skiff-cni` in release and returns the paths
/// of the three executables.
///
/// Two cargo invocations, not one: cargo unifies dependency features over the packages it
/// is asked for, so `-p skiff-agent -p skiff-cni -p skiff-control` builds the control
/// plane's dependencies with other features than `-p skiff-control` alone (what the API
/// and scheduler benches build), and each alternation rebuilds rustls, kube and the
/// control plane (minutes). Apart, each set stays cached.
pub fn build_release() -> anyhow::Result<Binaries> {
    let control = cluster::build_control_release()?;
    let packages = ["skiff-agent", "skiff-cni"];
    let mut command = cluster::cargo();
    command.args(["build", "--release", "--bins"]);
    for package in packages {
        command.args(["--package", package]);
    }
    let mut child = command
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .spawn()
        .context("run cargo build --release")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut executables = HashMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read cargo's messages")?;
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && let (Some(name), Some(path)) = (
                message["target"]["name"].as_str(),
                message["executable"].as_str(),
            )
        {
            executables.insert(name.to_string(), PathBuf::from(path));
        }
    }
    let status = child.wait().context("wait for cargo build")?;
    anyhow::ensure!(
        status.success(),
        "cargo build --release -p skiff-agent -p skiff-cni failed: {status}"
    );
    let mut take = |name: &str| {
        executables
            .remove(name)
            .with_context(|| format!("cargo built no {name} executable"))
    };
    Ok(Binaries {
        control,
        agent: take("skiff-agent")?,
        cni: take("skiff-cni")?,
    })
}

/// Where a node keeps everything, and the names it creates.
#[derive(Clone, Debug)]
pub struct Layout {
    pub node_name: String,
    /// containerd's config, root (content, snapshots, metadata) and `opt`. Kept by [`stop`],
    /// so images survive a `down`.
    pub containerd_dir: PathBuf,
    /// A shared mount holding the agent's run directory (pod namespaces, CNI results),
    /// containerd's state and socket, the IPAM reservations and the pid files. Volatile:
    /// [`stop`] unmounts and empties it, as a reboot would.
    pub run_dir: PathBuf,
    /// A shared mount holding the agent's state (pod volumes). Kept by [`stop`].
    pub state_dir: PathBuf,
    /// Container logs (`<namespace>_<pod>_<uid>/<container>/<n>.log`).
    pub pod_log_dir: PathBuf,
    /// The daemons' own logs.
    pub log_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// The agent's cgroup subtree, relative to the cgroup2 mount.
    pub cgroup_subtree: String,
    pub bridge: String,
    /// The pod subnet, a /24.
    pub pod_cidr: (Ipv4Addr, u8),
    /// The admin kubeconfig of the control plane the agent registers with.
    pub kubeconfig: PathBuf,
    /// The control plane's CA: the agent's node API accepts client certificates it signed,
    /// which is how the API server's `pods/log` proxy authenticates.
    pub client_ca: Option<PathBuf>,
    /// The agent's `RUST_LOG`.
    pub agent_log_filter: String,
    /// The agent's `--eviction-hard`.
    pub eviction_hard: String,
}

/// The hard eviction thresholds of a development node: the kubelet's, except disk space as
/// an absolute 2 GiB instead of 10 %. Development machines share their disk with cargo's
/// target directories and run well below 10 % free (this kind: about 8 % of 250 GB, 20 GB
/// free), where the kubelet's default evicts every pod at once.
pub const DEV_EVICTION_HARD: &str = "memory.available<100Mi,nodefs.available<2Gi,pid.available<5%";

impl Layout {
    /// The node `cargo xtask up` starts: this machine, under the usual system paths.
    pub fn system(control_data_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            node_name: hostname()?,
            containerd_dir: "/var/lib/skiff/containerd".into(),
            run_dir: "/run/skiff".into(),
            state_dir: "/var/lib/skiff/agent".into(),
            pod_log_dir: "/var/log/pods".into(),
            log_dir: "/var/log/skiff".into(),
            cni_conf_dir: "/etc/skiff/net.d".into(),
            cgroup_subtree: "skiff".into(),
            bridge: "skiff0".into(),
            pod_cidr: (Ipv4Addr::new(10, 244, 0, 0), 24),
            kubeconfig: control_data_dir.join("admin.kubeconfig"),
            client_ca: Some(control_data_dir.join("pki").join("ca.crt")),
            agent_log_filter: "info".into(),
            eviction_hard: DEV_EVICTION_HARD.into(),
        })
    }

    pub fn containerd_socket(&self) -> PathBuf {
        self.run_dir.join("containerd").join("containerd.sock")
    }

    fn containerd_config(&self) -> PathBuf {
        self.containerd_dir.join("config.toml")
    }

    pub fn containerd_log(&self) -> PathBuf {
        self.log_dir.join("containerd.log")
    }

    pub fn agent_log(&self) -> PathBuf {
        self.log_dir.join("skiff-agent.log")
    }

    /// The agent's `--run-dir`.
    pub fn agent_run_dir(&self) -> PathBuf {
        self.run_dir.join("agent")
    }

    fn ipam_dir(&self) -> PathBuf {
        self.run_dir.join("ipam")
    }

    fn containerd_pid_file(&self) -> PathBuf {
        self.run_dir.join("containerd.pid")
    }

    fn agent_pid_file(&self) -> PathBuf {
        self.run_dir.join("skiff-agent.pid")
    }

    pub fn conflist(&self) -> PathBuf {
        self.cni_conf_dir.join("10-skiff.conflist")
    }

    fn pod_cidr_text(&self) -> String {
        format!("{}/{}", self.pod_cidr.0, self.pod_cidr.1)
    }

    /// The pid of the running agent, if any.
    pub fn agent_pid(&self) -> Option<u32> {
        read_pid(&self.agent_pid_file()).filter(|pid| is_process(*pid, "skiff-agent"))
    }

    /// The pid of the running containerd, if any.
    pub fn containerd_pid(&self) -> Option<u32> {
        read_pid(&self.containerd_pid_file()).filter(|pid| {
            is_process(*pid, "containerd")
                && cmdline(*pid).contains(&self.containerd_config().display().to_string())
        })
    }
}

/// The machine's hostname, lowercased, as the agent names its Node by default.
fn hostname() -> anyhow::Result<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").context("read the hostname")?;
    Ok(name.trim().to_lowercase())
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `/proc/PID/stat`'s command name and state, and the parent pid.
fn stat(pid: u32) -> Option<(String, char, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

/// Whether `pid` is a live (not zombie) process named `comm`; the name guards against a
/// reused pid.
fn is_process(pid: u32, comm: &str) -> bool {
    stat(pid).is_some_and(|(name, state, _)| name == comm && !matches!(state, 'Z' | 'X'))
}

fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(_, state, _)| !matches!(state, 'Z' | 'X'))
}

/// The command line of `pid` with its arguments separated by NUL, as the kernel has it.
fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// Sends a signal with the shell's `kill` (xtask forbids unsafe code, so no libc).
fn signal(pids: &[u32], name: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-s")
        .arg(name)
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM, then SIGKILL if `pid` is still there after [`STOP_GRACE`]. Returns whether the
/// SIGKILL was needed.
fn terminate(pid: u32) -> bool {
    signal(&[pid], "TERM");
    let deadline = Instant::now() + STOP_GRACE;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !alive(pid) {
        return false;
    }
    signal(&[pid], "KILL");
    let deadline = Instant::now() + STOP_GRACE;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The pids in `parents` (pid → ppid) that descend from `roots`, the roots included.
fn with_descendants(roots: &HashSet<u32>, parents: &HashMap<u32, u32>) -> HashSet<u32> {
    let mut all = roots.clone();
    loop {
        let before = all.len();
        for (pid, ppid) in parents {
            if all.contains(ppid) {
                all.insert(*pid);
            }
        }
        if all.len() == before {
            return all;
        }
    }
}

/// Every process's parent.
fn process_parents() -> HashMap<u32, u32> {
    let mut parents = HashMap::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok())
            && let Some((_, _, ppid)) = stat(pid)
        {
            parents.insert(pid, ppid);
        }
    }
    parents
}

/// The shims of the containerd at `socket` (they run as `containerd-shim-runc-v2 ...
/// -address <socket> ...` and outlive containerd) and all their descendants: containers
/// and the agent's log drivers.
fn shims_and_descendants(socket: &Path) -> HashSet<u32> {
    let parents = process_parents();
    let shim_argument = format!("\0-address\0{}\0", socket.display());
    let shims: HashSet<u32> = parents
        .keys()
        .copied()
        .filter(|pid| *pid != std::process::id() && cmdline(*pid).contains(&shim_argument))
        .collect();
    with_descendants(&shims, &parents)
}

/// Mount points listed in the text of a `mountinfo` file, unescaped.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|field| PathBuf::from(field.replace("\\040", " ").replace("\\011", "\t")))
        .collect()
}

fn own_mount_points() -> Vec<PathBuf> {
    mount_points(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// Where the cgroup2 hierarchy is mounted (`/sys/fs/cgroup/unified` on a hybrid host,
/// `/sys/fs/cgroup` on a pure v2 one), from the text of a `mountinfo` file.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The host's cgroup2 mount.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    cgroup2_mount(&mountinfo)
        .context("no cgroup2 mount on this host: the agent and runc need cgroup v2")
}

/// Kills every process in the cgroup2 tree at `dir` (`cgroup.kill`, a cgroup v2 file) and
/// waits until it is empty. Returns whether there was a tree.
pub fn kill_cgroup(dir: &Path) -> bool {
    let kill = dir.join("cgroup.kill");
    if !kill.exists() {
        return false;
    }
    let _ = fs::write(&kill, "1");
    let deadline = Instant::now() + STOP_GRACE;
    while fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|events| events.contains("populated 1"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Removes a cgroup directory tree, deepest first (rmdir only, never a write).
pub fn remove_cgroup_tree(path: &Path) {
    for entry in fs::read_dir(path).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            // A cgroup is busy for a moment after its last process died.
            Err(error) if error.raw_os_error() == Some(16) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => {
                eprintln!("remove cgroup {}: {error}", path.display());
                return;
            }
        }
    }
}

/// IPv4 routes of the host as (destination, prefix length, device), from the text of
/// `/proc/net/route`.
fn ipv4_routes(table: &str) -> Vec<(Ipv4Addr, u8, String)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let destination = u32::from_str_radix(fields.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(fields.get(7)?, 16).ok()?;
            // The kernel prints the addresses in host (little-endian) byte order.
            let destination = Ipv4Addr::from(destination.swap_bytes());
            let prefix = mask.count_ones() as u8;
            Some((destination, prefix, fields[0].to_string()))
        })
        .collect()
}

fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    let prefix = a.1.min(b.1);
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    u32::from(a.0) & mask == u32::from(b.0) & mask
}

/// The device of a route, other than `bridge` and the default route, whose destination
/// overlaps `subnet`.
pub fn conflicting_route(subnet: (Ipv4Addr, u8), bridge: &str) -> Option<String> {
    let table = fs::read_to_string("/proc/net/route").unwrap_or_default();
    ipv4_routes(&table)
        .into_iter()
        .find(|(destination, prefix, device)| {
            *prefix > 0 && device != bridge && overlaps((*destination, *prefix), subnet)
        })
        .map(|(destination, prefix, device)| format!("{destination}/{prefix} dev {device}"))
}

/// Makes `dir` a shared bind mount of itself, unless it is a mount point already.
fn make_shared(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if own_mount_points().iter().any(|m| m == dir) {
        return Ok(());
    }
    cluster::run(Command::new("mount").arg("--bind").arg(dir).arg(dir))?;
    cluster::run(Command::new("mount").arg("--make-shared").arg(dir))
}

/// Lazily unmounts `dir` and every mount below it, if there are any. Returns whether it
/// did.
fn unmount_tree(dir: &Path) -> anyhow::Result<bool> {
    if !own_mount_points().iter().any(|m| m.starts_with(dir)) {
        return Ok(false);
    }
    cluster::run(
        Command::new("umount")
            .args(["--recursive", "--lazy"])
            .arg(dir),
    )?;
    Ok(true)
}

fn containerd_config(layout: &Layout) -> String {
    let state = layout.run_dir.join("containerd").join("state");
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
        root = layout.containerd_dir.join("root").display(),
        state = state.display(),
        socket = layout.containerd_socket().display(),
        opt = layout.containerd_dir.join("opt").display(),
    )
}

/// The CNI network: skiff-cni on the layout's bridge with host-local IPAM, no masquerade
/// (so nothing is written into the host's nftables).
fn conflist(layout: &Layout) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": format!("skiff-{}", layout.bridge),
        "plugins": [{
            "type": "skiff-cni",
            "bridge": layout.bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": layout.pod_cidr_text(),
                "dataDir": layout.ipam_dir(),
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }],
    })
}

fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Opens a daemon's log for appending, so that a restart keeps what came before.
fn open_log(path: &Path) -> anyhow::Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// Starts containerd in its private mount namespace and waits until it answers.
fn start_containerd(layout: &Layout) -> anyhow::Result<u32> {
    for tool in ["containerd", "containerd-shim-runc-v2", "runc", "ctr"] {
        anyhow::ensure!(
            cluster::on_path(tool),
            "{tool} is not installed: run `cargo xtask deps`"
        );
    }
    fs::create_dir_all(&layout.containerd_dir)
        .with_context(|| format!("create {}", layout.containerd_dir.display()))?;
    fs::create_dir_all(layout.run_dir.join("containerd"))
        .context("create containerd's state directory")?;
    let config = layout.containerd_config();
    fs::write(&config, containerd_config(layout))
        .with_context(|| format!("write {}", config.display()))?;
    let socket = layout.containerd_socket();
    let _ = fs::remove_file(&socket);
    // The namespace mounts its own tmpfs on /run/containerd, which must exist; it is the
    // standard path and stays (removing it could detach another containerd's tmpfs).
    fs::create_dir_all("/run/containerd").context("create /run/containerd")?;
    let script = format!(
        "mount -t cgroup2 cgroup2 /sys/fs/cgroup && \
         mount -t tmpfs tmpfs /run/containerd && \
         exec containerd --config '{}'",
        config.display()
    );
    let log = layout.containerd_log();
    let log_file = open_log(&log)?;
    // setsid: its own session, so ^C in the terminal that ran `up` does not reach it. Both
    // setsid and unshare exec (no fork), and sh execs containerd: the pid is containerd's.
    let mut child = Command::new("setsid")
        .args(["unshare", "--mount", "--propagation", "slave", "sh", "-c"])
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().context("duplicate the log file")?)
        .stderr(log_file)
        .spawn()
        .context("start containerd")?;
    let pid = child.id();
    fs::write(layout.containerd_pid_file(), format!("{pid}\n"))
        .context("write containerd's pid file")?;
    let started = Instant::now();
    loop {
        if UnixStream::connect(&socket).is_ok() {
            break;
        }
        if let Some(status) = child.try_wait().context("check containerd")? {
            anyhow::bail!(
                "containerd exited during startup ({status}); the end of {}:\n{}",
                log.display(),
                log_tail(&log, 20)
            );
        }
        anyhow::ensure!(
            started.elapsed() < CONTAINERD_START_TIMEOUT,
            "containerd (pid {pid}) did not answer on {} within {} s; the end of {}:\n{}",
            socket.display(),
            CONTAINERD_START_TIMEOUT.as_secs(),
            log.display(),
            log_tail(&log, 20)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let namespace = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    anyhow::ensure!(
        namespace(&pid.to_string()) != namespace("self"),
        "containerd (pid {pid}) is not in a private mount namespace"
    );
    Ok(pid)
}

/// Runs `ctr` against the layout's containerd; returns its stdout.
pub fn ctr(layout: &Layout, namespace: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("ctr")
        .arg("--address")
        .arg(layout.containerd_socket())
        .args(["--namespace", namespace])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ctr")?;
    anyhow::ensure!(
        output.status.success(),
        "ctr {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Imports `archive` (an OCI archive) into `namespace` and unpacks it.
pub fn import_image(layout: &Layout, namespace: &str, archive: &Path) -> anyhow::Result<()> {
    let archive = archive.to_str().context("archive path is not UTF-8")?;
    ctr(layout, namespace, &["images", "import", archive]).map(drop)
}

/// The agent's command line.
fn agent_args(layout: &Layout, cni_bin_dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--node-name",
        &layout.node_name,
        "--kubeconfig",
        &layout.kubeconfig.display().to_string(),
        "--pod-cidr",
        &layout.pod_cidr_text(),
        "--containerd-socket",
        &layout.containerd_socket().display().to_string(),
        "--containerd-namespace",
        CONTAINERD_NAMESPACE,
        "--cgroup-root",
        &layout.cgroup_subtree,
        "--run-dir",
        &layout.agent_run_dir().display().to_string(),
        "--state-dir",
        &layout.state_dir.display().to_string(),
        "--pod-log-dir",
        &layout.pod_log_dir.display().to_string(),
        // The load balancer's pins live under the run directory (the agent mounts a bpffs
        // there), so `down` removes them with the other mounts and /sys/fs/bpf is untouched.
        "--bpffs-dir",
        &layout.run_dir.join("bpf").display().to_string(),
        "--cni-conf-dir",
        &layout.cni_conf_dir.display().to_string(),
        "--cni-bin-dir",
        &cni_bin_dir.display().to_string(),
        // Port 0: several nodes (a bench beside `up`) share the machine. The Node reports
        // the port it got, which is where the API server's log proxy goes.
        "--node-api-listen",
        "127.0.0.1:0",
        "--eviction-hard",
        &layout.eviction_hard,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(ca) = &layout.client_ca {
        args.extend(["--client-ca-file".to_string(), ca.display().to_string()]);
    }
    args
}

/// Starts the agent and waits until its Node is Ready.
fn start_agent(layout: &Layout, binaries: &Binaries) -> anyhow::Result<u32> {
    let cni_bin_dir = binaries
        .cni
        .parent()
        .context("skiff-cni has no directory")?;
    let log = layout.agent_log();
    let log_file = open_log(&log)?;
    let mut child = Command::new("setsid")
        .arg(&binaries.agent)
        .args(agent_args(layout, cni_bin_dir))
        .env("RUST_LOG", &layout.agent_log_filter)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().context("duplicate the log file")?)
        .stderr(log_file)
        .spawn()
        .context("start skiff-agent")?;
    let pid = child.id();
    fs::write(layout.agent_pid_file(), format!("{pid}\n")).context("write the agent's pid file")?;
    let kubeconfig = Kubeconfig::read(&layout.kubeconfig)?;
    let client = kubeconfig.client()?;
    let url = format!("{}/api/v1/nodes/{}", kubeconfig.server, layout.node_name);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build a tokio runtime")?;
    let started = Instant::now();
    loop {
        let node: Option<Value> = runtime.block_on(async {
            let response = client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?;
            response.json().await.ok()
        });
        let ready = node.as_ref().is_some_and(|node| {
            node["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        if ready {
            return Ok(pid);
        }
        if let Some(status) = child.try_wait().context("check skiff-agent")? {
            anyhow::bail!(
                "skiff-agent exited during startup ({status}); the end of {}:\n{}",
                log.display(),
                log_tail(&log, 20)
            );
        }
        anyhow::ensure!(
            started.elapsed() < AGENT_READY_TIMEOUT,
            "node {} was not Ready within {} s; the end of {}:\n{}",
            layout.node_name,
            AGENT_READY_TIMEOUT.as_secs(),
            log.display(),
            log_tail(&log, 20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What [`start`] found or started.
pub struct Started {
    pub containerd_pid: u32,
    pub agent_pid: u32,
    /// Whether both were running already.
    pub already_running: bool,
}

/// Starts containerd and the agent unless they run. A containerd that is not running means
/// the node is down: what an earlier run left (pods' processes, mounts, the bridge) is
/// cleaned up first, and the node comes up as after a reboot.
pub fn start(layout: &Layout, binaries: &Binaries) -> anyhow::Result<Started> {
    if let (Some(containerd_pid), Some(agent_pid)) = (layout.containerd_pid(), layout.agent_pid()) {
        return Ok(Started {
            containerd_pid,
            agent_pid,
            already_running: true,
        });
    }
    let containerd_pid = match layout.containerd_pid() {
        Some(pid) => pid,
        None => {
            stop(layout, false)?;
            if let Some(route) = conflicting_route(layout.pod_cidr, &layout.bridge) {
                anyhow::bail!(
                    "the pod CIDR {} overlaps the host route {route}",
                    layout.pod_cidr_text()
                );
            }
            for dir in [
                &layout.log_dir,
                &layout.pod_log_dir,
                &layout.cni_conf_dir,
                &layout.ipam_dir(),
            ] {
                fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            }
            make_shared(&layout.run_dir)?;
            make_shared(&layout.state_dir)?;
            start_containerd(layout)?
        }
    };
    let conflist_path = layout.conflist();
    fs::write(
        &conflist_path,
        serde_json::to_vec_pretty(&conflist(layout))?,
    )
    .with_context(|| format!("write {}", conflist_path.display()))?;
    let agent_pid = start_agent(layout, binaries)?;
    Ok(Started {
        containerd_pid,
        agent_pid,
        already_running: false,
    })
}

/// Stops the node and removes what it made: the agent; every pod process (`cgroup.kill`
/// on the agent's subtree); containerd, its shims and their children (log drivers); the
/// pod namespace and volume mounts with the shared mounts holding them; the bridge; the
/// cgroup tree; the volatile run directory. Idempotent. With `verbose`, says what it did.
pub fn stop(layout: &Layout, verbose: bool) -> anyhow::Result<()> {
    let say = |message: String| {
        if verbose {
            println!("{message}");
        }
    };
    match layout.agent_pid() {
        Some(pid) => {
            let killed = terminate(pid);
            say(format!(
                "stopped skiff-agent (pid {pid}{})",
                if killed { ", after SIGKILL" } else { "" }
            ));
        }
        None => say("skiff-agent was not running".to_string()),
    }
    let cgroup_dir = cgroup2_root()?.join(&layout.cgroup_subtree);
    if kill_cgroup(&cgroup_dir) {
        say(format!(
            "killed the pods' processes (cgroup.kill on {})",
            cgroup_dir.display()
        ));
    }
    // The shims and their children are found before anything dies: a log driver whose
    // shim died is no longer its descendant.
    let socket = layout.containerd_socket();
    let shims: Vec<u32> = shims_and_descendants(&socket).into_iter().collect();
    match layout.containerd_pid() {
        Some(pid) => {
            let killed = terminate(pid);
            say(format!(
                "stopped containerd (pid {pid}{})",
                if killed { ", after SIGKILL" } else { "" }
            ));
        }
        None => say("containerd was not running".to_string()),
    }
    if !shims.is_empty() {
        signal(&shims, "KILL");
        let deadline = Instant::now() + STOP_GRACE;
        while shims.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        say(format!(
            "killed {} containerd shims and their children",
            shims.len()
        ));
    }
    for dir in [&layout.run_dir, &layout.state_dir] {
        if unmount_tree(dir)? {
            say(format!(
                "unmounted {} and the mounts under it",
                dir.display()
            ));
        }
    }
    if Path::new("/sys/class/net").join(&layout.bridge).exists() {
        cluster::run(
            Command::new("ip")
                .args(["link", "del", &layout.bridge])
                .stderr(Stdio::null()),
        )?;
        say(format!("deleted the bridge {}", layout.bridge));
    }
    if cgroup_dir.exists() {
        remove_cgroup_tree(&cgroup_dir);
        say(format!("removed the cgroup tree {}", cgroup_dir.display()));
    }
    // Pod namespaces, CNI results and IPAM reservations die with the pods, as on a reboot.
    if layout.run_dir.exists() {
        anyhow::ensure!(
            !own_mount_points()
                .iter()
                .any(|m| m.starts_with(&layout.run_dir)),
            "mounts remain under {}; not removing it",
            layout.run_dir.display()
        );
        fs::remove_dir_all(&layout.run_dir)
            .with_context(|| format!("remove {}", layout.run_dir.display()))?;
    }
    Ok(())
}

/// The log drivers of this node's containers (`skiff-agent log-driver
/// max-size=...,path=<pod log dir>/...`, started by the shims through the `binary://` log
/// URI), by pid, each with its parent's command name.
pub fn log_drivers(layout: &Layout) -> BTreeMap<u32, String> {
    let path_argument = format!(",path={}/", layout.pod_log_dir.display());
    process_parents()
        .into_iter()
        .filter(|(pid, _)| {
            let cmdline = cmdline(*pid);
            let args: Vec<&str> = cmdline.split('\0').collect();
            args.len() >= 3
                && args[0].ends_with("skiff-agent")
                && args[1] == "log-driver"
                && args[2].contains(&path_argument)
        })
        .map(|(pid, ppid)| (pid, stat(ppid).map(|(comm, _, _)| comm).unwrap_or_default()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mount_points_and_the_cgroup2_mount() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
90 25 0:26 /skiff /run/skiff\\040x rw shared:9 - tmpfs tmpfs rw
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_points(mountinfo)[2], PathBuf::from("/run/skiff x"));
        assert_eq!(cgroup2_mount("31 23 0:28 / /x rw - tmpfs tmpfs rw\n"), None);
    }

    #[test]
    fn reads_routes_and_finds_overlaps() {
        let table = "\
Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
skiff0\t0000F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";
        let routes = ipv4_routes(table);
        assert_eq!(routes[1], (Ipv4Addr::new(192, 0, 2, 0), 24, "eth0".into()));
        assert_eq!(
            routes[2],
            (Ipv4Addr::new(10, 244, 0, 0), 24, "skiff0".into())
        );
        let pods = (Ipv4Addr::new(10, 244, 0, 0), 24);
        assert!(overlaps(pods, (Ipv4Addr::new(10, 0, 0, 0), 8)));
        assert!(!overlaps(pods, (Ipv4Addr::new(10, 245, 0, 0), 24)));
        assert!(overlaps(pods, (Ipv4Addr::new(0, 0, 0, 0), 0)));
    }

    #[test]
    fn collects_descendants() {
        let parents = HashMap::from([(2, 1), (3, 2), (4, 3), (5, 1), (6, 9)]);
        let all = with_descendants(&HashSet::from([2]), &parents);
        assert_eq!(all, HashSet::from([2, 3, 4]));
    }
}
