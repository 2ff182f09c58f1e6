//! A pod's sandbox without a pause container: the network, IPC and UTS namespaces the agent
//! creates itself and keeps alive with bind mounts under its run directory (as `ip netns
//! add` does), and the pod files containers get as `/etc/hosts`, `/etc/resolv.conf` and
//! `/etc/hostname` ([`files`]). A `hostNetwork` pod's sandbox holds only the IPC namespace:
//! its containers share the node's network and UTS namespaces ([`create_with`]).
//!
//! Layout under the run directory, one directory per pod:
//!
//! ```text
//! <run_dir>/pods/<pod uid>/namespaces         the kinds the sandbox owns, one a line
//! <run_dir>/pods/<pod uid>/ns/{net,ipc,uts}   nsfs bind mounts; `ns/` is its own mount point
//! <run_dir>/pods/<pod uid>/{hosts,resolv.conf,hostname}
//! ```
//!
//! A sandbox directory without a `namespaces` file (made before the file existed) owns all
//! three.
//!
//! The bind mounts outlive the agent, so after a restart [`open`] adopts a sandbox and
//! [`list`] finds every one, complete or left half-made by a crash, for garbage collection.
//!
//! **Architecture invariant:** no thread of the agent's tokio runtime ever changes namespace.
//! Namespaces are made by `unshare` on a dedicated, short-lived thread that pins them with
//! bind mounts and exits; [`run_in_namespace`] enters one on a dedicated thread too.

pub mod files;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType};

/// The namespaces a sandbox holds for all of a pod's containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Namespace {
    Net,
    Ipc,
    Uts,
}

impl Namespace {
    pub const ALL: [Namespace; 3] = [Namespace::Net, Namespace::Ipc, Namespace::Uts];

    /// The name of the namespace's file, under `/proc/<tid>/ns/` and under the sandbox.
    pub fn file_name(self) -> &'static str {
        match self {
            Namespace::Net => "net",
            Namespace::Ipc => "ipc",
            Namespace::Uts => "uts",
        }
    }

    pub fn oci_type(self) -> LinuxNamespaceType {
        match self {
            Namespace::Net => LinuxNamespaceType::Network,
            Namespace::Ipc => LinuxNamespaceType::Ipc,
            Namespace::Uts => LinuxNamespaceType::Uts,
        }
    }

    fn from_file_name(name: &str) -> Option<Namespace> {
        Namespace::ALL.into_iter().find(|ns| ns.file_name() == name)
    }

    fn clone_flag(self) -> CloneFlags {
        match self {
            Namespace::Net => CloneFlags::CLONE_NEWNET,
            Namespace::Ipc => CloneFlags::CLONE_NEWIPC,
            Namespace::Uts => CloneFlags::CLONE_NEWUTS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid pod uid {0:?}: it must be one path component")]
    InvalidPodUid(String),
    #[error("invalid pod hostname {hostname:?}: {reason}")]
    InvalidHostname { hostname: String, reason: String },
    #[error("invalid pod {pod}: {reason}")]
    InvalidPod { pod: String, reason: String },
    #[error("sandbox of pod {pod_uid} already exists at {}", dir.display())]
    AlreadyExists { pod_uid: String, dir: PathBuf },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{what}: {errno}")]
    Sys { what: String, errno: Errno },
    #[error("bring lo up in the network namespace of pod {pod_uid}: {reason}")]
    Loopback { pod_uid: String, reason: String },
    #[error("mounts remain under {} after unmounting: {}", dir.display(), mounts.join(", "))]
    MountsRemain { dir: PathBuf, mounts: Vec<String> },
    #[error("spawn namespace thread: {0}")]
    Thread(io::Error),
    #[error("sandbox of pod {pod_uid}: it must own at least one namespace")]
    NoNamespaces { pod_uid: String },
    #[error("sandbox of pod {pod_uid}: {} names unknown namespace {name:?}", path.display())]
    UnknownNamespace {
        pod_uid: String,
        path: PathBuf,
        name: String,
    },
    #[error("sandbox of pod {pod_uid} has no {} namespace of its own", ns.file_name())]
    NotOwned { pod_uid: String, ns: Namespace },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

fn sys_error(what: impl Into<String>) -> impl FnOnce(Errno) -> SandboxError {
    let what = what.into();
    move |errno| SandboxError::Sys { what, errno }
}

/// A pod's namespaces, pinned under the run directory. Holding one keeps nothing open: the
/// bind mounts keep the namespaces alive until [`remove`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pod_uid: String,
    dir: PathBuf,
    /// The kinds this sandbox owns, in [`Namespace::ALL`] order; the containers share the
    /// node's namespace of every other kind.
    namespaces: Vec<Namespace>,
}

impl Sandbox {
    fn at(run_dir: &Path, pod_uid: &str) -> Sandbox {
        Sandbox {
            pod_uid: pod_uid.to_owned(),
            dir: run_dir.join("pods").join(pod_uid),
            namespaces: Namespace::ALL.to_vec(),
        }
    }

    fn with_namespaces(mut self, namespaces: &[Namespace]) -> Sandbox {
        self.namespaces = Namespace::ALL
            .into_iter()
            .filter(|ns| namespaces.contains(ns))
            .collect();
        self
    }

    pub fn pod_uid(&self) -> &str {
        &self.pod_uid
    }

    /// The kinds of namespace the sandbox owns, in [`Namespace::ALL`] order.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// Whether the pod has a namespace of kind `ns` of its own (else it shares the node's).
    pub fn owns(&self, ns: Namespace) -> bool {
        self.namespaces.contains(&ns)
    }

    /// The bind mount of the pod's own namespace of kind `ns`; `None` when the pod shares
    /// the node's.
    pub fn own_namespace_path(&self, ns: Namespace) -> Option<PathBuf> {
        self.owns(ns).then(|| self.namespace_path(ns))
    }

    /// The pod's own network namespace, `None` for a `hostNetwork` pod.
    pub fn own_netns_path(&self) -> Option<PathBuf> {
        self.own_namespace_path(Namespace::Net)
    }

    fn namespaces_file(&self) -> PathBuf {
        self.dir.join("namespaces")
    }

    /// The pod's directory, `<run_dir>/pods/<uid>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ns_dir(&self) -> PathBuf {
        self.dir.join("ns")
    }

    /// The bind mount that holds the namespace `ns`; `linux.namespaces[].path` in the OCI
    /// spec of every container of the pod.
    pub fn namespace_path(&self, ns: Namespace) -> PathBuf {
        self.ns_dir().join(ns.file_name())
    }

    /// The network namespace path, the CNI runtime's `CNI_NETNS`. Nothing is there when the
    /// sandbox does not own its network namespace ([`Sandbox::own_netns_path`]).
    pub fn netns_path(&self) -> PathBuf {
        self.namespace_path(Namespace::Net)
    }

    /// The `linux.namespaces` entries that make a container join the pod's namespaces; a
    /// kind the sandbox does not own has no entry, so the runtime shares its own (the
    /// node's).
    pub fn oci_namespaces(&self) -> Vec<LinuxNamespace> {
        self.namespaces
            .iter()
            .map(|&ns| {
                let mut entry = LinuxNamespace::default();
                entry.set_typ(ns.oci_type());
                entry.set_path(Some(self.namespace_path(ns)));
                entry
            })
            .collect()
    }

    /// The file bind-mounted at a container's `/etc/hosts`.
    pub fn hosts_path(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    /// The file bind-mounted at a container's `/etc/resolv.conf`.
    pub fn resolv_conf_path(&self) -> PathBuf {
        self.dir.join("resolv.conf")
    }

    /// The file bind-mounted at a container's `/etc/hostname`.
    pub fn hostname_path(&self) -> PathBuf {
        self.dir.join("hostname")
    }

    /// The hostname as the pod's UTS namespace holds it; the node's (the agent's own) when
    /// the pod shares the node's UTS namespace.
    pub fn hostname(&self) -> Result<String, SandboxError> {
        if !self.owns(Namespace::Uts) {
            return node_hostname();
        }
        let path = self.namespace_path(Namespace::Uts);
        run_in_namespace(&path, Namespace::Uts, nix::unistd::gethostname)?
            .map_err(sys_error(format!("read hostname in {}", path.display())))
            .map(|name| name.to_string_lossy().into_owned())
    }

    /// Writes the pod files, each atomically (a container started meanwhile sees the old
    /// file or the new one, never half of one).
    pub fn write_files(&self, pod_files: &files::PodFiles) -> Result<(), SandboxError> {
        fs::create_dir_all(&self.dir)
            .map_err(io_error(format!("create directory {}", self.dir.display())))?;
        for (path, text) in [
            (self.hosts_path(), &pod_files.hosts),
            (self.resolv_conf_path(), &pod_files.resolv_conf),
            (self.hostname_path(), &pod_files.hostname),
        ] {
            write_atomically(&path, text.as_bytes())?;
        }
        Ok(())
    }
}

/// The hostname of the UTS namespace the agent runs in: the node's.
pub fn node_hostname() -> Result<String, SandboxError> {
    nix::unistd::gethostname()
        .map_err(sys_error("read the node's hostname"))
        .map(|name| name.to_string_lossy().into_owned())
}

/// The text of a sandbox's `namespaces` file.
fn render_namespaces(namespaces: &[Namespace]) -> String {
    namespaces
        .iter()
        .map(|ns| format!("{}\n", ns.file_name()))
        .collect()
}

/// The kinds a sandbox's `namespaces` file names; all three when there is no file (a
/// sandbox made before the file existed).
fn read_namespaces(sandbox: &Sandbox) -> Result<Vec<Namespace>, SandboxError> {
    let path = sandbox.namespaces_file();
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Namespace::ALL.to_vec()),
        Err(e) => return Err(io_error(format!("read {}", path.display()))(e)),
    };
    let mut namespaces = Vec::new();
    for name in text.split_whitespace() {
        let ns = Namespace::from_file_name(name).ok_or_else(|| SandboxError::UnknownNamespace {
            pod_uid: sandbox.pod_uid.clone(),
            path: path.clone(),
            name: name.to_owned(),
        })?;
        namespaces.push(ns);
    }
    Ok(namespaces)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SandboxError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&temp, bytes).map_err(io_error(format!("write {}", temp.display())))?;
    fs::rename(&temp, path).map_err(io_error(format!(
        "rename {} to {}",
        temp.display(),
        path.display()
    )))
}

/// A pod uid names a directory: one non-empty path component.
fn validate_pod_uid(pod_uid: &str) -> Result<(), SandboxError> {
    let valid =
        !pod_uid.is_empty() && pod_uid != "." && pod_uid != ".." && !pod_uid.contains(['/', '\0']);
    if valid {
        Ok(())
    } else {
        Err(SandboxError::InvalidPodUid(pod_uid.to_owned()))
    }
}

/// The kernel keeps at most 64 bytes of a hostname (`HOST_NAME_MAX`).
fn validate_hostname(hostname: &str) -> Result<(), SandboxError> {
    let reason = if hostname.is_empty() {
        "it is empty"
    } else if hostname.len() > 64 {
        "it is longer than 64 bytes"
    } else if hostname.contains('\0') {
        "it contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(SandboxError::InvalidHostname {
        hostname: hostname.to_owned(),
        reason: reason.to_owned(),
    })
}

/// The run directory as the kernel's mount table spells it (absolute, symlinks resolved),
/// so the paths handed to runc and CNI plugins and the ones read back from
/// `/proc/self/mountinfo` agree.
fn resolve_run_dir(run_dir: &Path) -> PathBuf {
    fs::canonicalize(run_dir).unwrap_or_else(|_| run_dir.to_path_buf())
}

/// Creates the pod's network, IPC and UTS namespaces, sets `hostname` in the UTS one,
/// brings `lo` up in the network one, and pins all three under `run_dir`. A failure
/// half-way removes what was made. A sandbox that already exists is an error (adopt it with
/// [`open`]); the pieces of one a crash left half-made are removed first.
pub fn create(run_dir: &Path, pod_uid: &str, hostname: &str) -> Result<Sandbox, SandboxError> {
    create_with(run_dir, pod_uid, hostname, &Namespace::ALL)
}

/// [`create`] with only the `namespaces` kinds: `hostname` is set (and checked) only when
/// the UTS namespace is among them, `lo` brought up only when the network one is. The set
/// is recorded in the sandbox directory before any namespace is made, so [`open`] and
/// [`remove`] know it after a restart. `&[Namespace::Ipc]` is a `hostNetwork` pod's.
pub fn create_with(
    run_dir: &Path,
    pod_uid: &str,
    hostname: &str,
    namespaces: &[Namespace],
) -> Result<Sandbox, SandboxError> {
    validate_pod_uid(pod_uid)?;
    if namespaces.is_empty() {
        return Err(SandboxError::NoNamespaces {
            pod_uid: pod_uid.to_owned(),
        });
    }
    if namespaces.contains(&Namespace::Uts) {
        validate_hostname(hostname)?;
    }
    fs::create_dir_all(run_dir.join("pods")).map_err(io_error(format!(
        "create directory {}",
        run_dir.join("pods").display()
    )))?;
    let run_dir = resolve_run_dir(run_dir);
    let sandbox = Sandbox::at(&run_dir, pod_uid).with_namespaces(namespaces);
    if fs::symlink_metadata(sandbox.ns_dir()).is_ok() {
        if open(&run_dir, pod_uid)?.is_some() {
            return Err(SandboxError::AlreadyExists {
                pod_uid: pod_uid.to_owned(),
                dir: sandbox.dir.clone(),
            });
        }
        tracing::info!(
            pod_uid,
            "removing a half-made sandbox before creating it again"
        );
        remove(&run_dir, pod_uid)?;
    }
    match build(&sandbox, hostname) {
        Ok(()) => Ok(sandbox),
        Err(err) => {
            if let Err(cleanup) = remove(&run_dir, pod_uid) {
                tracing::warn!(pod_uid, error = %cleanup, "cleaning up a failed sandbox");
            }
            Err(err)
        }
    }
}

fn build(sandbox: &Sandbox, hostname: &str) -> Result<(), SandboxError> {
    let ns_dir = sandbox.ns_dir();
    fs::create_dir_all(&sandbox.dir).map_err(io_error(format!(
        "create directory {}",
        sandbox.dir.display()
    )))?;
    // Before `ns/`, so that whatever exists of the sandbox is read with the right set.
    write_atomically(
        &sandbox.namespaces_file(),
        render_namespaces(&sandbox.namespaces).as_bytes(),
    )?;
    fs::create_dir(&ns_dir).map_err(io_error(format!("create directory {}", ns_dir.display())))?;
    make_own_shared_mount(&ns_dir)?;
    let mut targets = Vec::new();
    for &ns in &sandbox.namespaces {
        let path = sandbox.namespace_path(ns);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error(format!("create {}", path.display())))?;
        targets.push((ns, path));
    }
    let pod_uid = sandbox.pod_uid.clone();
    let hostname = hostname.to_owned();
    // unshare() moves the calling thread into the new namespaces for good, so it runs on a
    // thread of its own that pins them and exits; no other thread ever sees them.
    std::thread::Builder::new()
        .name("sandbox-unshare".into())
        .spawn(move || unshare_and_pin(&pod_uid, &hostname, &targets))
        .map_err(SandboxError::Thread)?
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Makes `dir` a mount point with shared propagation, as `ip netns add` does for
/// `/run/netns`. Shared, so that unmounting a namespace here also unmounts the copies that
/// mount namespaces created meanwhile (a container's, a shim's) hold, and the namespace is
/// freed. It stays in the peer group the bind mount got from its parent: when the run
/// directory is shared with a containerd in a mount namespace of its own (as on hosts
/// with hybrid cgroups, where containerd runs with a cgroup2-only view), the namespace
/// mounts must propagate there or runc finds plain files where namespaces should be.
fn make_own_shared_mount(dir: &Path) -> Result<(), SandboxError> {
    let none = None::<&str>;
    nix::mount::mount(Some(dir), dir, none, MsFlags::MS_BIND, none)
        .map_err(sys_error(format!("bind-mount {} on itself", dir.display())))?;
    nix::mount::mount(none, dir, none, MsFlags::MS_SHARED, none)
        .map_err(sys_error(format!("make {} a shared mount", dir.display())))
}

/// Runs on the dedicated thread: new namespaces, hostname (with a UTS namespace), `lo` up
/// (with a network namespace), bind mounts.
fn unshare_and_pin(
    pod_uid: &str,
    hostname: &str,
    targets: &[(Namespace, PathBuf)],
) -> Result<(), SandboxError> {
    let flags = targets.iter().fold(CloneFlags::empty(), |flags, (ns, _)| {
        flags | ns.clone_flag()
    });
    let kinds: Vec<&str> = targets.iter().map(|(ns, _)| ns.file_name()).collect();
    nix::sched::unshare(flags).map_err(sys_error(format!(
        "unshare {} namespaces for pod {pod_uid}",
        kinds.join(", ")
    )))?;
    let owns = |kind: Namespace| targets.iter().any(|(ns, _)| *ns == kind);
    if owns(Namespace::Uts) {
        nix::unistd::sethostname(hostname).map_err(sys_error(format!(
            "set hostname {hostname:?} in the UTS namespace of pod {pod_uid}"
        )))?;
    }
    if owns(Namespace::Net) {
        loopback_up().map_err(|reason| SandboxError::Loopback {
            pod_uid: pod_uid.to_owned(),
            reason,
        })?;
    }
    let none = None::<&str>;
    for (ns, target) in targets {
        let source = PathBuf::from("/proc/thread-self/ns").join(ns.file_name());
        nix::mount::mount(Some(&source), target, none, MsFlags::MS_BIND, none).map_err(
            sys_error(format!(
                "bind-mount {} on {}",
                source.display(),
                target.display()
            )),
        )?;
    }
    Ok(())
}

/// Sets `lo` up in the calling thread's network namespace. The netlink socket is opened on
/// this thread, so it belongs to the namespace the thread is in.
fn loopback_up() -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("start netlink runtime: {e}"))?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| format!("open netlink socket: {e}"))?;
        tokio::spawn(connection);
        handle
            .link()
            .set(rtnetlink::LinkUnspec::new_with_name("lo").up().build())
            .execute()
            .await
            .map_err(|e| format!("set link lo up: {e}"))
    })
}

/// True when `path` is a namespace file (an nsfs bind mount), false when it is missing or
/// a plain file (the placeholder a mount was never made on, or was taken off).
pub(crate) fn is_namespace_file(path: &Path) -> Result<bool, SandboxError> {
    match nix::sys::statfs::statfs(path) {
        Ok(stat) => Ok(stat.filesystem_type() == nix::sys::statfs::NSFS_MAGIC),
        Err(Errno::ENOENT) => Ok(false),
        Err(errno) => Err(SandboxError::Sys {
            what: format!("statfs {}", path.display()),
            errno,
        }),
    }
}

/// The sandbox of `pod_uid` when every namespace it owns (its `namespaces` file; all three
/// without one) is pinned, to adopt after an agent restart; `None` when there is none or
/// only pieces of one (which [`list`] still reports, for [`remove`]).
pub fn open(run_dir: &Path, pod_uid: &str) -> Result<Option<Sandbox>, SandboxError> {
    validate_pod_uid(pod_uid)?;
    let sandbox = Sandbox::at(&resolve_run_dir(run_dir), pod_uid);
    if fs::symlink_metadata(sandbox.ns_dir()).is_err() {
        return Ok(None);
    }
    let namespaces = read_namespaces(&sandbox)?;
    if namespaces.is_empty() {
        return Ok(None);
    }
    let sandbox = sandbox.with_namespaces(&namespaces);
    for &ns in &sandbox.namespaces {
        if !is_namespace_file(&sandbox.namespace_path(ns))? {
            return Ok(None);
        }
    }
    Ok(Some(sandbox))
}

/// The uids of every pod with a sandbox directory under `run_dir`, complete or not, sorted.
pub fn list(run_dir: &Path) -> Result<Vec<String>, SandboxError> {
    let pods = run_dir.join("pods");
    let entries = match fs::read_dir(&pods) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(format!("read directory {}", pods.display()))(e)),
    };
    let mut uids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(format!("read directory {}", pods.display())))?;
        let Ok(uid) = entry.file_name().into_string() else {
            continue;
        };
        if fs::symlink_metadata(entry.path().join("ns")).is_ok() {
            uids.push(uid);
        }
    }
    uids.sort();
    Ok(uids)
}

/// Unmounts the pod's namespaces and deletes its directory. Idempotent: a sandbox that is
/// gone, or half made, is removed without error. Nothing is deleted while anything is
/// still mounted below the pod's directory.
pub fn remove(run_dir: &Path, pod_uid: &str) -> Result<(), SandboxError> {
    validate_pod_uid(pod_uid)?;
    let sandbox = Sandbox::at(&resolve_run_dir(run_dir), pod_uid);
    if fs::symlink_metadata(&sandbox.dir).is_err() {
        return Ok(());
    }
    for ns in Namespace::ALL {
        unmount_all(&sandbox.namespace_path(ns))?;
    }
    unmount_all(&sandbox.ns_dir())?;
    let dir = resolve_run_dir(&sandbox.dir);
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_error("read /proc/self/mountinfo"))?;
    let remaining = mounts_under(&mountinfo, &dir);
    if !remaining.is_empty() {
        return Err(SandboxError::MountsRemain {
            dir,
            mounts: remaining,
        });
    }
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_error(format!("remove directory {}", dir.display()))(e))
        }
        _ => Ok(()),
    }
}

/// Detaches every mount stacked on `path`. Not a mount point (EINVAL) or missing (ENOENT)
/// ends the loop; detaching (MNT_DETACH) succeeds even while a process still has the
/// namespace open, and the namespace lives on until that process lets go.
fn unmount_all(path: &Path) -> Result<(), SandboxError> {
    // A bound on the loop: a mount that comes back every time is an error, not a hang.
    for _ in 0..16 {
        match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(Errno::EINVAL | Errno::ENOENT) => return Ok(()),
            Err(errno) => {
                return Err(SandboxError::Sys {
                    what: format!("unmount {}", path.display()),
                    errno,
                });
            }
        }
    }
    Err(SandboxError::Sys {
        what: format!(
            "unmount {}: still mounted after 16 unmounts",
            path.display()
        ),
        errno: Errno::EBUSY,
    })
}

/// The mount points at or below `dir` in a `/proc/<pid>/mountinfo` text.
fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<String> {
    crate::mountinfo::mounts_under(mountinfo, dir)
        .into_iter()
        .map(|path| path.to_string_lossy().into_owned())
        .collect()
}

/// Runs `f` on a dedicated thread that has entered the namespace at `path` (of kind `ns`),
/// and returns what it returns; a panic in `f` is passed on. Only that thread changes
/// namespace; it ends with `f`. Processes `f` spawns start in the namespace.
pub fn run_in_namespace<T: Send>(
    path: &Path,
    ns: Namespace,
    f: impl FnOnce() -> T + Send,
) -> Result<T, SandboxError> {
    let file = fs::File::open(path).map_err(io_error(format!("open {}", path.display())))?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("sandbox-setns".into())
            .spawn_scoped(scope, move || {
                nix::sched::setns(&file, ns.clone_flag()).map_err(sys_error(format!(
                    "enter {} namespace {}",
                    ns.file_name(),
                    path.display()
                )))?;
                Ok(f())
            })
            .map_err(SandboxError::Thread)?;
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_layout() {
        let sandbox = Sandbox::at(Path::new("/run/skiff"), "1234-abcd");
        assert_eq!(sandbox.dir(), Path::new("/run/skiff/pods/1234-abcd"));
        assert_eq!(
            sandbox.netns_path(),
            Path::new("/run/skiff/pods/1234-abcd/ns/net")
        );
        assert_eq!(
            sandbox.namespace_path(Namespace::Uts),
            Path::new("/run/skiff/pods/1234-abcd/ns/uts")
        );
        assert_eq!(
            sandbox.hosts_path(),
            Path::new("/run/skiff/pods/1234-abcd/hosts")
        );
        let oci = serde_json::to_value(sandbox.oci_namespaces()).unwrap();
        assert_eq!(
            oci,
            serde_json::json!([
                {"type": "network", "path": "/run/skiff/pods/1234-abcd/ns/net"},
                {"type": "ipc", "path": "/run/skiff/pods/1234-abcd/ns/ipc"},
                {"type": "uts", "path": "/run/skiff/pods/1234-abcd/ns/uts"},
            ])
        );
    }

    #[test]
    fn pod_uids_and_hostnames_are_checked() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(validate_pod_uid(bad).is_err(), "{bad:?}");
        }
        validate_pod_uid("0b7f3c1e-9a8d-4c55-8f0e-2d1c6b5a4e3f").unwrap();
        assert!(validate_hostname("").is_err());
        assert!(validate_hostname(&"a".repeat(65)).is_err());
        validate_hostname(&"a".repeat(64)).unwrap();
        let err = create(Path::new("/nonexistent"), "../x", "h").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid pod uid \"../x\": it must be one path component"
        );
    }

    #[test]
    fn mountinfo_mount_points_below_a_directory() {
        let mountinfo = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
42 27 254:0 /tmp/r/pods/p/ns /tmp/r/pods/p/ns rw shared:7 - ext4 /dev/vda rw
43 42 0:4 net:[4026532] /tmp/r/pods/p/ns/net rw - nsfs nsfs rw
44 27 0:4 net:[4026533] /tmp/r/pods/p2/ns/net rw - nsfs nsfs rw
45 27 0:4 net:[4026534] /tmp/r/pods/p\\040x/ns/net rw - nsfs nsfs rw
46 27 0:4 net:[4026535] /tmp/r/pods/pp/ns/net rw - nsfs nsfs rw
";
        assert_eq!(
            mounts_under(mountinfo, Path::new("/tmp/r/pods/p")),
            ["/tmp/r/pods/p/ns", "/tmp/r/pods/p/ns/net"]
        );
        assert_eq!(
            mounts_under(mountinfo, Path::new("/tmp/r/pods/p x")),
            ["/tmp/r/pods/p x/ns/net"]
        );
        assert_eq!(crate::mountinfo::unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(crate::mountinfo::unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn list_and_remove_without_mounts() {
        let run_dir = tempfile::tempdir().unwrap();
        assert!(list(run_dir.path()).unwrap().is_empty());
        // What a crash between mkdir and the first mount leaves: directories and
        // placeholders, no namespace.
        let pieces = run_dir.path().join("pods/half/ns");
        fs::create_dir_all(&pieces).unwrap();
        fs::write(pieces.join("net"), "").unwrap();
        fs::create_dir_all(run_dir.path().join("pods/other-owner")).unwrap();
        assert_eq!(list(run_dir.path()).unwrap(), ["half"]);
        assert_eq!(open(run_dir.path(), "half").unwrap(), None);
        assert_eq!(open(run_dir.path(), "absent").unwrap(), None);
        remove(run_dir.path(), "half").unwrap();
        remove(run_dir.path(), "half").unwrap();
        assert!(list(run_dir.path()).unwrap().is_empty());
        assert!(!run_dir.path().join("pods/half").exists());
    }

    #[test]
    fn pod_files_are_written_under_the_pod_directory() {
        let run_dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::at(run_dir.path(), "uid-1");
        let pod_files = files::PodFiles {
            hosts: "hosts\n".into(),
            resolv_conf: "nameserver 10.96.0.10\n".into(),
            hostname: "web-0\n".into(),
            warnings: Vec::new(),
        };
        sandbox.write_files(&pod_files).unwrap();
        assert_eq!(fs::read_to_string(sandbox.hosts_path()).unwrap(), "hosts\n");
        assert_eq!(
            fs::read_to_string(sandbox.resolv_conf_path()).unwrap(),
            "nameserver 10.96.0.10\n"
        );
        assert_eq!(
            fs::read_to_string(sandbox.hostname_path()).unwrap(),
            "web-0\n"
        );
        let names: Vec<_> = fs::read_dir(sandbox.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 3, "no temporary file left: {names:?}");
    }

    #[test]
    fn a_host_network_sandbox_owns_only_its_ipc_namespace() {
        let sandbox = Sandbox::at(Path::new("/run/skiff"), "u1").with_namespaces(&[Namespace::Ipc]);
        assert!(sandbox.owns(Namespace::Ipc));
        assert!(!sandbox.owns(Namespace::Net));
        assert_eq!(sandbox.own_netns_path(), None);
        assert_eq!(
            sandbox.own_namespace_path(Namespace::Ipc).as_deref(),
            Some(Path::new("/run/skiff/pods/u1/ns/ipc"))
        );
        assert_eq!(
            serde_json::to_value(sandbox.oci_namespaces()).unwrap(),
            serde_json::json!([{"type": "ipc", "path": "/run/skiff/pods/u1/ns/ipc"}])
        );
        // Without a UTS namespace of its own, the pod's hostname is the node's.
        assert_eq!(sandbox.hostname().unwrap(), node_hostname().unwrap());
        // The order is always that of Namespace::ALL.
        let reordered = Sandbox::at(Path::new("/r"), "u").with_namespaces(&[
            Namespace::Uts,
            Namespace::Net,
            Namespace::Uts,
        ]);
        assert_eq!(reordered.namespaces(), [Namespace::Net, Namespace::Uts]);
    }

    #[test]
    fn the_namespace_set_is_read_back_from_the_sandbox_directory() {
        let run_dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::at(run_dir.path(), "u1");
        // A sandbox from before the file existed owns all three.
        assert_eq!(read_namespaces(&sandbox).unwrap(), Namespace::ALL);
        fs::create_dir_all(sandbox.dir()).unwrap();
        let host_network = sandbox.clone().with_namespaces(&[Namespace::Ipc]);
        write_atomically(
            &sandbox.namespaces_file(),
            render_namespaces(host_network.namespaces()).as_bytes(),
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(sandbox.namespaces_file()).unwrap(),
            "ipc\n"
        );
        assert_eq!(read_namespaces(&sandbox).unwrap(), [Namespace::Ipc]);
        // Pieces of a host-network sandbox: listed, not adopted, removed.
        fs::create_dir_all(sandbox.ns_dir()).unwrap();
        fs::write(sandbox.namespace_path(Namespace::Ipc), "").unwrap();
        assert_eq!(list(run_dir.path()).unwrap(), ["u1"]);
        assert_eq!(open(run_dir.path(), "u1").unwrap(), None);
        remove(run_dir.path(), "u1").unwrap();
        assert!(!sandbox.dir().exists());

        fs::create_dir_all(sandbox.dir()).unwrap();
        fs::write(sandbox.namespaces_file(), "ipc\npid\n").unwrap();
        let err = read_namespaces(&sandbox).unwrap_err();
        assert!(
            err.to_string().contains("unknown namespace \"pid\""),
            "{err}"
        );
    }

    #[test]
    fn a_sandbox_needs_a_namespace() {
        let run_dir = tempfile::tempdir().unwrap();
        let err = create_with(run_dir.path(), "u1", "h", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sandbox of pod u1: it must own at least one namespace"
        );
    }
}
