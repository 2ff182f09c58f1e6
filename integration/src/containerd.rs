//! A private containerd per test: its own root, state and socket under a temp dir, started
//! in a private mount namespace that sees only cgroup v2, so that runc never touches the
//! host's cgroup v1 hierarchies. Everything it started (shims, containers) is killed and
//! the temp dir removed on drop.
//!
//! On a hybrid host the private namespace mounts a fresh cgroup2 at `/sys/fs/cgroup`; runc
//! then creates container cgroups in the host's v2 hierarchy (`/sys/fs/cgroup/unified` on
//! these machines). Tests place containers under [`Containerd::cgroup_parent`], which is
//! removed on drop. A tmpfs on `/run/containerd` keeps the shims' sockets and runc's state
//! inside the namespace too, so they vanish with it.

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require_tool;

/// The containerd namespace tests use, the agent's own.
pub const NAMESPACE: &str = "skiff";

/// How long containerd may take to answer on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running private containerd; stopped, with all it started, on drop.
pub struct Containerd {
    child: Option<Child>,
    temp: Option<tempfile::TempDir>,
    /// The directory holding the config, root, state, socket and log.
    pub dir: PathBuf,
    pub socket: PathBuf,
    log: PathBuf,
    /// The mount namespace containerd runs in (`/proc/<pid>/ns/mnt`'s target).
    mount_ns: String,
    cgroup_parent: String,
    /// A directory whose mounts, made on the host, containerd sees too: the agent's run
    /// directory (pod namespaces) and state directory (tmpfs volumes) go under it.
    pub shared_dir: PathBuf,
}

impl Containerd {
    /// Starts containerd and waits until its socket accepts connections (polled every
    /// 5 ms; about 70 ms on the development machines).
    pub fn start() -> Self {
        for (tool, hint) in [
            (
                "containerd",
                "install Debian's containerd (`cargo xtask deps`)",
            ),
            (
                "containerd-shim-runc-v2",
                "install Debian's containerd (`cargo xtask deps`)",
            ),
            ("runc", "install Debian's runc (`cargo xtask deps`)"),
            ("unshare", "install util-linux"),
            ("mount", "install mount"),
        ] {
            require_tool(tool, hint);
        }
        let temp = tempfile::Builder::new()
            .prefix("skiff-containerd-")
            .tempdir()
            .expect("temp dir for containerd");
        let dir = temp.path().to_path_buf();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        let log = dir.join("containerd.log");
        std::fs::write(&config, config_toml(&dir, &socket)).expect("write containerd config");
        let cgroup_parent = format!(
            "skiff-test-{}",
            dir.file_name()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("skiff-containerd-")
        );

        // /run/containerd is created on the host if missing (an empty directory) so that the
        // namespace can mount its own tmpfs there.
        std::fs::create_dir_all("/run/containerd").expect("create /run/containerd");
        // Mounts the agent makes on the host after containerd started (pod network
        // namespaces bound under its run directory) must reach containerd's namespace, or
        // runc finds plain files where namespaces should be: a shared mount on the host,
        // and a slave copy of it inside.
        let shared_dir = dir.join("shared");
        std::fs::create_dir_all(&shared_dir).expect("create the shared directory");
        for args in [
            vec!["--bind", path_str(&shared_dir), path_str(&shared_dir)],
            vec!["--make-shared", path_str(&shared_dir)],
        ] {
            let status = Command::new("mount")
                .args(&args)
                .status()
                .expect("run mount");
            assert!(status.success(), "mount {args:?} failed");
        }
        let script = format!(
            "mount --make-rslave / && \
             mount -t cgroup2 cgroup2 /sys/fs/cgroup && \
             mount -t tmpfs tmpfs /run/containerd && \
             {{ sleep infinity & echo $! > '{}'; }} && \
             exec containerd --config '{}'",
            dir.join("holder.pid").display(),
            config.display()
        );
        let log_file = std::fs::File::create(&log).expect("create containerd log");
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "slave", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("spawn containerd");
        let mut containerd = Self {
            child: Some(child),
            temp: Some(temp),
            dir,
            socket,
            log,
            mount_ns: String::new(),
            cgroup_parent,
            shared_dir,
        };
        containerd.wait_ready();
        containerd
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                break;
            }
            let child = self.child.as_mut().expect("containerd child");
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "containerd exited ({status}) before answering on {}:\n{}",
                    self.socket.display(),
                    self.log_tail()
                );
            }
            if started.elapsed() > START_TIMEOUT {
                panic!(
                    "containerd did not answer on {} within {START_TIMEOUT:?}:\n{}",
                    self.socket.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = self.child.as_ref().expect("containerd child").id();
        let mount_ns = |pid: &str| {
            std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .map(|target| target.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        self.mount_ns = mount_ns(&pid.to_string());
        // Never mistake the host's namespace for containerd's: cleanup kills its members.
        assert_ne!(
            self.mount_ns,
            mount_ns("self"),
            "containerd is not in a private mount namespace"
        );
    }

    /// `kill -9` of containerd alone: shims and containers keep running.
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts containerd again in the same mount namespace (held by a `sleep` started
    /// with it), where its shims' sockets live, as a restarted containerd unit would.
    pub fn restart_daemon(&mut self) {
        self.kill_daemon();
        let holder = std::fs::read_to_string(self.dir.join("holder.pid"))
            .expect("read the namespace holder's pid");
        let _ = std::fs::remove_file(&self.socket);
        let log_file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("open containerd log");
        let child = Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", holder.trim()))
            .args(["containerd", "--config"])
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("spawn containerd again");
        self.child = Some(child);
        self.wait_ready();
    }

    /// The containerd namespace tests use.
    pub fn namespace(&self) -> &'static str {
        NAMESPACE
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A cgroup (relative to the cgroup2 root, without leading '/') under which tests put
    /// their containers: `cgroupsPath = /<cgroup_parent>/<id>`. Removed on drop.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// Runs `ctr` against this containerd in the test namespace; returns stdout, failing the
    /// test if ctr fails. An independent look at containerd's state.
    pub fn ctr(&self, args: &[&str]) -> String {
        require_tool("ctr", "install Debian's containerd");
        let output = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr");
        crate::succeeded("ctr", args, &output)
    }

    /// The last lines of containerd's log.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills containerd, its shims and their containers, and removes the test cgroups.
    pub fn stop(&mut self) {
        // Also after `kill_daemon`: the shims and the namespace holder outlive containerd.
        if self.mount_ns.is_empty() {
            return;
        }
        let child = self.child.take();
        let daemon = child.as_ref().map_or(0, Child::id);
        let socket = self.socket.to_string_lossy().into_owned();
        let mut victims = processes_of(daemon, &self.mount_ns, &socket);
        victims.extend(child.as_ref().map(Child::id));
        kill_all(&victims);
        if let Some(mut child) = child {
            let _ = child.wait();
        }
        // The namespace is gone; never match its (reusable) inode again.
        self.mount_ns.clear();
        let deadline = Instant::now() + Duration::from_secs(10);
        while victims.iter().any(|pid| process_alive(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(root) = cgroup2_root() {
            remove_cgroup_tree(&root.join(&self.cgroup_parent));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "containerd log ({}):\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        self.stop();
        let _ = Command::new("umount")
            .args(["-R", "-l", path_str(&self.shared_dir)])
            .stderr(Stdio::null())
            .status();
        if let Some(temp) = self.temp.take() {
            // Snapshot mounts lived in the private namespace, gone with its processes.
            if let Err(error) = std::fs::remove_dir_all(temp.path()) {
                eprintln!("remove {}: {error}", temp.path().display());
            }
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

fn config_toml(dir: &Path, socket: &Path) -> String {
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
  address = "{ttrpc}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        socket = socket.display(),
        ttrpc = dir.join("containerd.sock.ttrpc").display(),
        opt = dir.join("opt").display(),
    )
}

/// Every process containerd started: those in its mount namespace or started with
/// `-address <socket>` (the shims, which outlive it), and all their descendants (the
/// containers).
fn processes_of(containerd: u32, mount_ns: &str, socket: &str) -> HashSet<u32> {
    let mut parents: HashMap<u32, u32> = HashMap::new();
    let mut roots = HashSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return roots;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(ppid) = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse().ok())
        {
            parents.insert(pid, ppid);
        }
        let in_namespace = !mount_ns.is_empty()
            && std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .is_ok_and(|ns| ns.to_string_lossy() == mount_ns);
        // Shims run as `containerd-shim-runc-v2 ... -address <socket> ...`; other processes
        // naming the socket (an agent under test) are not containerd's to kill.
        let shim_argument = format!("\0-address\0{socket}\0");
        let names_socket = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&shim_argument));
        if pid == containerd || in_namespace || names_socket {
            roots.insert(pid);
        }
    }
    // Add descendants until nothing changes.
    let mut all = roots.clone();
    loop {
        let before = all.len();
        for (pid, ppid) in &parents {
            if all.contains(ppid) {
                all.insert(*pid);
            }
        }
        if all.len() == before {
            return all;
        }
    }
}

/// Whether a process exists and is not a zombie (the shims' reaper may take its time).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// SIGKILL to every pid at once, with the shell's builtin `kill` (no procps needed).
fn kill_all(pids: &HashSet<u32>) {
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -KILL {} 2>/dev/null", list.join(" "))])
        .status();
}

/// Where the host's cgroup v2 hierarchy is mounted (`/sys/fs/cgroup/unified` on a hybrid
/// host, `/sys/fs/cgroup` on a pure v2 one).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Removes a cgroup and its children, deepest first (rmdir only, never a write).
fn remove_cgroup_tree(path: &Path) {
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(error) = std::fs::remove_dir(path) {
        // A cgroup is busy for a moment after its last process died.
        if error.raw_os_error() != Some(16) || Instant::now() > deadline {
            eprintln!("remove cgroup {}: {error}", path.display());
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
