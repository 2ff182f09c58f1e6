//! The cgroup tree the agent owns: opening it (tiers and controllers), pod and container
//! cgroups with their limits, process placement, usage, removal and listing.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use nix::errno::Errno;

use super::CgroupError;
use super::error::describe_io;
use super::fs::{self, CgroupFs, HostFs, is_errno, read_optional};
use super::resources::{
    Controller, MIN_SHARES, QosClass, ResourceOptions, Setting, burstable_tier_shares,
    container_resources, milli_cpu_to_shares, pod_qos, pod_resources, shares_to_weight,
};
use super::usage::{Usage, read_usage};

const KUBEPODS: &str = "kubepods";
const TIERS: [QosClass; 2] = [QosClass::Burstable, QosClass::BestEffort];

/// Where the agent's cgroups go and how their limits are computed.
#[derive(Debug, Clone, PartialEq)]
pub struct CgroupConfig {
    /// The cgroup2 mount point (from [`super::find_cgroup2_mount`]).
    pub mount: PathBuf,
    /// The agent's subtree, relative to the mount (`skiff`, or under systemd the unit's
    /// delegated cgroup such as `system.slice/skiff-agent.service`); empty is the root.
    pub subtree: PathBuf,
    /// The kubelet flags the limits depend on, the pod pids limit among them.
    pub resources: ResourceOptions,
    /// How long removing a cgroup waits for its killed processes to be gone.
    pub kill_timeout: Duration,
}

impl CgroupConfig {
    /// The kubelet's defaults (CFS quota on, 100 ms period, MemoryQoS factor 0.9, no pod
    /// pids limit) with this machine's page size and a 10 s kill timeout.
    pub fn new(mount: impl Into<PathBuf>, subtree: impl Into<PathBuf>) -> Self {
        CgroupConfig {
            mount: mount.into(),
            subtree: subtree.into(),
            resources: ResourceOptions {
                page_size: host_page_size(),
                ..ResourceOptions::default()
            },
            kill_timeout: Duration::from_secs(10),
        }
    }
}

/// A setting the manager could not enforce, and why. Displays as
/// `memory.max: the memory controller is not available in the cgroup v2 hierarchy at
/// /sys/fs/cgroup/unified`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unenforced {
    pub controller: Controller,
    /// The cgroup file that was not written, e.g. `memory.max`.
    pub setting: &'static str,
    /// The value it would have had (none in the node-wide list).
    pub value: Option<String>,
    pub reason: String,
}

impl fmt::Display for Unenforced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.reason)
    }
}

/// What one create-or-update of a cgroup did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The cgroup's directory.
    pub cgroup: PathBuf,
    /// Files written, in order.
    pub written: Vec<Setting>,
    /// Non-default settings whose controller is not enabled (an event for the pod).
    pub unenforced: Vec<Unenforced>,
}

/// A pod's cgroup: `kubepods[/<tier>]/pod<uid>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodCgroup {
    qos: QosClass,
    uid: String,
}

impl PodCgroup {
    /// The cgroup of a pod of class `qos` with UID `uid`.
    pub fn new(qos: QosClass, uid: impl Into<String>) -> Result<Self, CgroupError> {
        let uid = uid.into();
        validate_name("pod uid", &uid)?;
        Ok(PodCgroup { qos, uid })
    }

    /// The cgroup of `pod`, from its UID and QoS class.
    pub fn of(pod: &Pod) -> Result<Self, CgroupError> {
        let uid = pod
            .metadata
            .uid
            .as_deref()
            .ok_or_else(|| CgroupError::PodWithoutUid {
                name: pod.metadata.name.clone().unwrap_or_default(),
            })?;
        PodCgroup::new(pod_qos(pod)?, uid)
    }

    pub fn qos(&self) -> QosClass {
        self.qos
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The path below the agent's subtree, e.g. `kubepods/burstable/pod1234`.
    pub fn relative_path(&self) -> PathBuf {
        let mut path = PathBuf::from(KUBEPODS);
        if let Some(tier) = self.qos.tier_dir() {
            path.push(tier);
        }
        path.push(format!("pod{}", self.uid));
        path
    }
}

/// The node's allocatable resources, which the kubelet writes on `kubepods` when it
/// enforces node allocatable for pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAllocatable {
    pub cpu_milli: i64,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// The agent's cgroup subtree. Calls block; see the module documentation.
#[derive(Debug)]
pub struct CgroupManager {
    mount: PathBuf,
    subtree: PathBuf,
    resources: ResourceOptions,
    kill_timeout: Duration,
    fs: Box<dyn CgroupFs>,
    /// Controllers not enabled down to the pods, with the reason.
    missing: BTreeMap<Controller, String>,
    unenforced: Vec<Unenforced>,
}

impl CgroupManager {
    /// Creates the subtree, `kubepods` and its tiers where missing and enables `cpu`,
    /// `memory` and `pids` from the mount's root down to the tiers wherever the hierarchy
    /// allows; what it cannot enable is in [`CgroupManager::unenforced`].
    pub fn open(config: CgroupConfig) -> Result<Self, CgroupError> {
        Self::open_with(config, Box::new(HostFs), OpenMode::Create)
    }

    /// Opens the tree the agent made, read only, for tools that inspect the node
    /// (`agentctl`): no cgroup is created and no `cgroup.subtree_control` written; the
    /// controllers not enabled down to the tiers are in [`CgroupManager::unenforced`].
    /// Fails, naming the directory, when `<mount>/<subtree>/kubepods` does not exist.
    /// Whatever would change the node (`apply_pod`, `add_process`, `remove_pod` ...)
    /// fails with "read-only file system".
    pub fn open_existing(config: CgroupConfig) -> Result<Self, CgroupError> {
        Self::open_with(config, Box::new(HostFs), OpenMode::Existing)
    }

    pub(crate) fn open_with(
        config: CgroupConfig,
        fs: Box<dyn CgroupFs>,
        mode: OpenMode,
    ) -> Result<Self, CgroupError> {
        let fs = match mode {
            OpenMode::Create => fs,
            OpenMode::Existing => Box::new(ReadOnlyFs(fs)),
        };
        let subtree = normalize_subtree(&config.subtree)?;
        let mount = config.mount;
        let subtree_dir = mount.join(&subtree);
        let kubepods = subtree_dir.join(KUBEPODS);
        if mode == OpenMode::Existing && !fs.is_dir(&kubepods) {
            return Err(CgroupError::io(
                "find kubepods under",
                subtree_dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such directory (is it the agent's cgroup subtree? give --cgroup-root \
                     as the agent has it)",
                ),
            ));
        }
        let mut missing = BTreeMap::new();
        let root_controllers = fs::read_controllers(&*fs, &mount.join("cgroup.controllers"))?;
        for controller in Controller::ALL {
            if !root_controllers
                .iter()
                .any(|name| name == controller.name())
            {
                missing.insert(
                    controller,
                    format!(
                        "the {controller} controller is not available in the cgroup v2 \
                         hierarchy at {}",
                        mount.display()
                    ),
                );
            }
        }

        // Each cgroup on the way must enable a controller before its children have it.
        let mut dir = mount.clone();
        for component in subtree.components() {
            enable_for_children(&*fs, &dir, mode, &mut missing)?;
            dir.push(component);
            mode.prepare_dir(&*fs, &dir)?;
        }
        enable_for_children(&*fs, &dir, mode, &mut missing)?;
        mode.prepare_dir(&*fs, &kubepods)?;
        enable_for_children(&*fs, &kubepods, mode, &mut missing)?;
        for tier in TIERS.iter().filter_map(|qos| qos.tier_dir()) {
            let tier = kubepods.join(tier);
            // A tier the agent has not made (yet) holds no pods to read.
            if mode.prepare_dir(&*fs, &tier)? {
                enable_for_children(&*fs, &tier, mode, &mut missing)?;
            }
        }

        let unenforced = missing
            .iter()
            .flat_map(|(controller, reason)| {
                controller.settings().iter().map(|setting| Unenforced {
                    controller: *controller,
                    setting,
                    value: None,
                    reason: reason.clone(),
                })
            })
            .collect();
        Ok(CgroupManager {
            mount,
            subtree,
            resources: config.resources,
            kill_timeout: config.kill_timeout,
            fs,
            missing,
            unenforced,
        })
    }

    /// Every setting this node cannot enforce, one per file, for the node condition.
    pub fn unenforced(&self) -> &[Unenforced] {
        &self.unenforced
    }

    /// The unenforced settings as one message for a node condition, the settings of one
    /// reason together (`"cpu.weight, cpu.max: the cpu controller is not available ...;
    /// pids.max: ..."`), or `None` when everything is enforced.
    pub fn unenforced_message(&self) -> Option<String> {
        let mut parts: Vec<(Vec<&str>, &str)> = Vec::new();
        for unenforced in &self.unenforced {
            match parts.last_mut() {
                Some((settings, reason)) if *reason == unenforced.reason => {
                    settings.push(unenforced.setting);
                }
                _ => parts.push((vec![unenforced.setting], &unenforced.reason)),
            }
        }
        let parts: Vec<String> = parts
            .into_iter()
            .map(|(settings, reason)| format!("{}: {reason}", settings.join(", ")))
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// Whether `controller` is enabled down to the pod cgroups.
    pub fn is_enforced(&self, controller: Controller) -> bool {
        !self.missing.contains_key(&controller)
    }

    /// The cgroup2 mount point.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// `<mount>/<subtree>/kubepods`.
    pub fn kubepods_dir(&self) -> PathBuf {
        self.mount.join(&self.subtree).join(KUBEPODS)
    }

    /// The pod cgroup's directory.
    pub fn pod_dir(&self, pod: &PodCgroup) -> PathBuf {
        self.mount.join(&self.subtree).join(pod.relative_path())
    }

    /// A container cgroup's directory.
    pub fn container_dir(&self, pod: &PodCgroup, container: &str) -> Result<PathBuf, CgroupError> {
        validate_name("container name", container)?;
        Ok(self.pod_dir(pod).join(container))
    }

    /// A container cgroup as the OCI runtime wants it in `linux.cgroupsPath`: the path
    /// from the mount's root, e.g. `/skiff/kubepods/burstable/pod1234/app`.
    pub fn container_cgroups_path(
        &self,
        pod: &PodCgroup,
        container: &str,
    ) -> Result<PathBuf, CgroupError> {
        validate_name("container name", container)?;
        Ok(Path::new("/")
            .join(&self.subtree)
            .join(pod.relative_path())
            .join(container))
    }

    /// Creates or updates the pod's cgroup with the pod-level limits, and enables the
    /// controllers for its containers. Writing the same values again is harmless; a
    /// resized pod gets its new values.
    pub fn apply_pod(&self, pod: &Pod) -> Result<Applied, CgroupError> {
        let cgroup = PodCgroup::of(pod)?;
        let resources = pod_resources(pod, &self.resources)?;
        let dir = self.pod_dir(&cgroup);
        fs::ensure_dir(&*self.fs, &dir)?;
        let subtree_control = dir.join("cgroup.subtree_control");
        let enabled = fs::read_controllers(&*self.fs, &subtree_control)?;
        for controller in Controller::ALL {
            if self.is_enforced(controller) && !enabled.iter().any(|c| c == controller.name()) {
                fs::write(&*self.fs, &subtree_control, &format!("+{controller}"))?;
            }
        }
        self.write_settings(dir, resources.settings())
    }

    /// Creates or updates the cgroup of `container` (a container or init container of
    /// `pod`) with its limits. The pod's cgroup must exist ([`CgroupManager::apply_pod`]).
    pub fn apply_container(&self, pod: &Pod, container: &str) -> Result<Applied, CgroupError> {
        let cgroup = PodCgroup::of(pod)?;
        let spec = pod.spec.as_ref();
        let found = spec
            .into_iter()
            .flat_map(|spec| {
                spec.containers
                    .iter()
                    .chain(spec.init_containers.iter().flatten())
            })
            .find(|c| c.name == container)
            .ok_or_else(|| CgroupError::NoSuchContainer {
                pod: pod_name(pod),
                container: container.to_string(),
            })?;
        let resources = container_resources(found, &self.resources)?;
        let dir = self.container_dir(&cgroup, container)?;
        fs::ensure_dir(&*self.fs, &dir)?;
        self.write_settings(dir, resources.settings())
    }

    /// Moves process `pid` into the container's cgroup.
    pub fn add_process(
        &self,
        pod: &PodCgroup,
        container: &str,
        pid: u32,
    ) -> Result<(), CgroupError> {
        let procs = self.container_dir(pod, container)?.join("cgroup.procs");
        fs::write(&*self.fs, &procs, &pid.to_string())
    }

    /// Writes the QoS tiers' CPU weights as the kubelet's QoS manager does: the burstable
    /// tier from the CPU requests of the Burstable pods among `pods` (the node's active
    /// pods), the best-effort tier the minimum.
    pub fn update_qos_tiers(&self, pods: &[Pod]) -> Result<Vec<Applied>, CgroupError> {
        let burstable = burstable_tier_shares(pods)?;
        let kubepods = self.kubepods_dir();
        [("burstable", burstable), ("besteffort", MIN_SHARES)]
            .into_iter()
            .map(|(tier, shares)| {
                let weight = shares_to_weight(shares).to_string();
                let setting = Setting {
                    controller: Controller::Cpu,
                    file: "cpu.weight",
                    value: weight,
                };
                self.write_settings(kubepods.join(tier), vec![setting])
            })
            .collect()
    }

    /// Writes the node's allocatable resources on `kubepods`, as the kubelet's
    /// node-allocatable enforcement does.
    pub fn apply_node_allocatable(
        &self,
        allocatable: &NodeAllocatable,
    ) -> Result<Applied, CgroupError> {
        let max_or =
            |value: Option<u64>| value.map_or_else(|| "max".to_string(), |v| v.to_string());
        let settings = vec![
            Setting {
                controller: Controller::Cpu,
                file: "cpu.weight",
                value: shares_to_weight(milli_cpu_to_shares(allocatable.cpu_milli)).to_string(),
            },
            Setting {
                controller: Controller::Memory,
                file: "memory.max",
                value: max_or(allocatable.memory_bytes),
            },
            Setting {
                controller: Controller::Pids,
                file: "pids.max",
                value: max_or(allocatable.pids),
            },
        ];
        self.write_settings(self.kubepods_dir(), settings)
    }

    fn write_settings(&self, dir: PathBuf, settings: Vec<Setting>) -> Result<Applied, CgroupError> {
        let mut applied = Applied {
            cgroup: dir,
            ..Applied::default()
        };
        for setting in settings {
            match self.missing.get(&setting.controller) {
                None => {
                    fs::write(
                        &*self.fs,
                        &applied.cgroup.join(setting.file),
                        &setting.value,
                    )?;
                    applied.written.push(setting);
                }
                Some(reason) if !setting.is_default() => applied.unenforced.push(Unenforced {
                    controller: setting.controller,
                    setting: setting.file,
                    value: Some(setting.value),
                    reason: reason.clone(),
                }),
                Some(_) => {}
            }
        }
        Ok(applied)
    }

    /// The pod cgroup's usage (all its containers together).
    pub fn pod_usage(&self, pod: &PodCgroup) -> Result<Usage, CgroupError> {
        read_usage(&*self.fs, &self.pod_dir(pod))
    }

    /// A container cgroup's usage.
    pub fn container_usage(&self, pod: &PodCgroup, container: &str) -> Result<Usage, CgroupError> {
        read_usage(&*self.fs, &self.container_dir(pod, container)?)
    }

    /// Kills everything in the pod's cgroup and removes it with its container cgroups.
    /// A pod cgroup that is already gone is success.
    pub fn remove_pod(&self, pod: &PodCgroup) -> Result<(), CgroupError> {
        remove_tree(&*self.fs, &self.pod_dir(pod), self.kill_timeout)
    }

    /// Kills everything in a container's cgroup and removes it; already gone is success.
    pub fn remove_container(&self, pod: &PodCgroup, container: &str) -> Result<(), CgroupError> {
        remove_tree(
            &*self.fs,
            &self.container_dir(pod, container)?,
            self.kill_timeout,
        )
    }

    /// Every pod cgroup under the subtree, by tier and UID, so that a restarted agent can
    /// adopt the pods it still runs and remove the others.
    pub fn list_pods(&self) -> Result<Vec<PodCgroup>, CgroupError> {
        let kubepods = self.kubepods_dir();
        let mut pods = Vec::new();
        for qos in [
            QosClass::Guaranteed,
            QosClass::Burstable,
            QosClass::BestEffort,
        ] {
            let dir = match qos.tier_dir() {
                Some(tier) => kubepods.join(tier),
                None => kubepods.clone(),
            };
            for name in self.subdirs(&dir)? {
                if let Some(uid) = name.strip_prefix("pod")
                    && let Ok(pod) = PodCgroup::new(qos, uid)
                {
                    pods.push(pod);
                }
            }
        }
        pods.sort();
        Ok(pods)
    }

    /// The container cgroups of a pod cgroup (none when the pod cgroup is gone).
    pub fn list_containers(&self, pod: &PodCgroup) -> Result<Vec<String>, CgroupError> {
        self.subdirs(&self.pod_dir(pod))
    }

    fn subdirs(&self, dir: &Path) -> Result<Vec<String>, CgroupError> {
        match self.fs.subdirs(dir) {
            Ok(mut names) => {
                names.sort();
                Ok(names)
            }
            Err(error) if is_errno(&error, Errno::ENOENT) => Ok(Vec::new()),
            Err(error) => Err(CgroupError::io("list", dir, error)),
        }
    }
}

/// How [`CgroupManager::open_with`] treats the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenMode {
    /// The agent: create what is missing, enable the controllers.
    Create,
    /// A reader: change nothing; the tree must exist, and every filesystem change is
    /// refused ([`ReadOnlyFs`]).
    Existing,
}

impl OpenMode {
    /// Creates the cgroup `dir` unless it exists (`Create`), or tells whether it exists
    /// (`Existing`). True when `dir` is there afterwards.
    fn prepare_dir(self, fs: &dyn CgroupFs, dir: &Path) -> Result<bool, CgroupError> {
        match self {
            OpenMode::Create => fs::ensure_dir(fs, dir).map(|()| true),
            OpenMode::Existing => Ok(fs.is_dir(dir)),
        }
    }
}

/// A [`CgroupFs`] that reads and refuses every change with EROFS, so that a manager
/// opened with [`CgroupManager::open_existing`] cannot alter the node by mistake.
#[derive(Debug)]
struct ReadOnlyFs(Box<dyn CgroupFs>);

impl ReadOnlyFs {
    fn refuse<T>() -> std::io::Result<T> {
        Err(std::io::Error::from_raw_os_error(Errno::EROFS as i32))
    }
}

impl CgroupFs for ReadOnlyFs {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        self.0.read(path)
    }
    fn write(&self, _path: &Path, _value: &str) -> std::io::Result<()> {
        Self::refuse()
    }
    fn mkdir(&self, _path: &Path) -> std::io::Result<()> {
        Self::refuse()
    }
    fn rmdir(&self, _path: &Path) -> std::io::Result<()> {
        Self::refuse()
    }
    fn subdirs(&self, path: &Path) -> std::io::Result<Vec<String>> {
        self.0.subdirs(path)
    }
    fn is_dir(&self, path: &Path) -> bool {
        self.0.is_dir(path)
    }
    fn exists(&self, path: &Path) -> bool {
        self.0.exists(path)
    }
    fn kill(&self, _pid: i32) -> std::io::Result<()> {
        Self::refuse()
    }
    fn xattr(&self, path: &Path, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        self.0.xattr(path, name)
    }
}

/// Enables every wanted controller that `dir` has in `cgroup.controllers` but not in
/// `cgroup.subtree_control`, one at a time; records those it cannot in `missing`. With
/// [`OpenMode::Existing`] nothing is written: a controller not enabled is recorded.
fn enable_for_children(
    fs: &dyn CgroupFs,
    dir: &Path,
    mode: OpenMode,
    missing: &mut BTreeMap<Controller, String>,
) -> Result<(), CgroupError> {
    let available = fs::read_controllers(fs, &dir.join("cgroup.controllers"))?;
    let subtree_control = dir.join("cgroup.subtree_control");
    let enabled = fs::read_controllers(fs, &subtree_control)?;
    for controller in Controller::ALL {
        let name = controller.name();
        if missing.contains_key(&controller) || enabled.iter().any(|c| c == name) {
            continue;
        }
        if !available.iter().any(|c| c == name) {
            missing.insert(
                controller,
                format!(
                    "the {name} controller is not delegated to {} (it is not in its \
                     cgroup.controllers)",
                    dir.display()
                ),
            );
            continue;
        }
        if mode == OpenMode::Existing {
            missing.insert(
                controller,
                format!(
                    "the {name} controller is not enabled in {}",
                    subtree_control.display()
                ),
            );
            continue;
        }
        if let Err(error) = fs.write(&subtree_control, &format!("+{name}")) {
            let hint = if is_errno(&error, Errno::EBUSY) {
                " (the cgroup holds processes of its own; run the agent in a leaf cgroup \
                 outside its subtree)"
            } else {
                ""
            };
            missing.insert(
                controller,
                format!(
                    "the {name} controller could not be enabled in {}: {}{hint}",
                    subtree_control.display(),
                    describe_io(&error)
                ),
            );
        }
    }
    Ok(())
}

/// Kills every process in the cgroup tree at `dir` (with `cgroup.kill`, else SIGKILL to
/// each pid of each `cgroup.procs`), waits up to `timeout` for it to be empty, then
/// removes its cgroups bottom-up. A tree that is already gone is success.
pub fn remove_cgroup_tree(dir: &Path, timeout: Duration) -> Result<(), CgroupError> {
    remove_tree(&HostFs, dir, timeout)
}

fn remove_tree(fs: &dyn CgroupFs, dir: &Path, timeout: Duration) -> Result<(), CgroupError> {
    if !fs.is_dir(dir) {
        return Ok(());
    }
    let started = Instant::now();
    let kill_file = dir.join("cgroup.kill");
    let has_kill = fs.exists(&kill_file);
    if has_kill {
        match fs.write(&kill_file, "1") {
            Ok(()) => {}
            Err(_) if !fs.is_dir(dir) => return Ok(()),
            Err(cause) => return Err(CgroupError::io("write", kill_file, cause)),
        }
    }
    let mut pause = Duration::from_millis(1);
    while is_populated(fs, dir)? {
        if started.elapsed() >= timeout {
            return Err(CgroupError::NotEmptied {
                cgroup: dir.to_path_buf(),
                waited: timeout,
            });
        }
        if !has_kill {
            // Without cgroup.kill a process may fork between two reads; kill until empty.
            kill_every_process(fs, dir)?;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    remove_dirs(fs, dir, started + timeout)
}

/// `populated` of `cgroup.events`: whether any process is in the cgroup or below.
fn is_populated(fs: &dyn CgroupFs, dir: &Path) -> Result<bool, CgroupError> {
    let path = dir.join("cgroup.events");
    let Some(events) = read_optional(fs, &path)? else {
        return Ok(false);
    };
    for line in events.lines() {
        if let Some(value) = line.strip_prefix("populated ") {
            return Ok(value.trim() != "0");
        }
    }
    Err(CgroupError::Parse {
        path,
        what: "no populated line".to_string(),
    })
}

fn kill_every_process(fs: &dyn CgroupFs, dir: &Path) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    for pid in read_optional(fs, &procs)?
        .unwrap_or_default()
        .split_whitespace()
    {
        let pid: i32 = pid.parse().map_err(|_| CgroupError::Parse {
            path: procs.clone(),
            what: format!("{pid:?} is not a pid"),
        })?;
        match fs.kill(pid) {
            Err(cause) if !is_errno(&cause, Errno::ESRCH) => {
                return Err(CgroupError::Kill {
                    pid,
                    cgroup: dir.to_path_buf(),
                    cause,
                });
            }
            _ => {}
        }
    }
    for child in fs.subdirs(dir).unwrap_or_default() {
        kill_every_process(fs, &dir.join(child))?;
    }
    Ok(())
}

fn remove_dirs(fs: &dyn CgroupFs, dir: &Path, deadline: Instant) -> Result<(), CgroupError> {
    let children = match fs.subdirs(dir) {
        Ok(children) => children,
        Err(error) if is_errno(&error, Errno::ENOENT) => return Ok(()),
        Err(error) => return Err(CgroupError::io("list", dir, error)),
    };
    for child in children {
        remove_dirs(fs, &dir.join(child), deadline)?;
    }
    loop {
        match fs.rmdir(dir) {
            Ok(()) => return Ok(()),
            Err(error) if is_errno(&error, Errno::ENOENT) => return Ok(()),
            // A killed task can linger a moment after `populated` turned 0.
            Err(error) if is_errno(&error, Errno::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(error) => return Err(CgroupError::io("remove", dir, error)),
        }
    }
}

fn pod_name(pod: &Pod) -> String {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    format!("{namespace}/{name}")
}

/// A cgroup name must stay one directory below its parent and not clash with an
/// interface file (`cgroup.procs`, `memory.max`).
fn validate_name(what: &'static str, name: &str) -> Result<(), CgroupError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name == "." || name == ".." {
        Some("it is a relative directory")
    } else if name.contains('/') || name.contains('\0') {
        Some("it contains a slash or a NUL byte")
    } else if name.len() > 200 {
        Some("it is longer than 200 bytes")
    } else if name.split_once('.').is_some_and(|(prefix, _)| {
        matches!(
            prefix,
            "cgroup" | "cpu" | "cpuset" | "io" | "memory" | "pids" | "hugetlb" | "rdma" | "misc"
        )
    }) {
        Some("it would clash with a cgroup interface file")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CgroupError::InvalidName {
            what,
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The subtree as a relative path of plain components (`/skiff/` → `skiff`).
fn normalize_subtree(subtree: &Path) -> Result<PathBuf, CgroupError> {
    let mut normal = PathBuf::new();
    for component in subtree.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => normal.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(CgroupError::InvalidName {
                    what: "subtree",
                    name: subtree.display().to_string(),
                    reason: "it leaves the cgroup2 mount",
                });
            }
        }
    }
    Ok(normal)
}

/// The page size from the auxiliary vector (`AT_PAGESZ`), 4096 if it cannot be read.
fn host_page_size() -> u64 {
    std::fs::read("/proc/self/auxv")
        .ok()
        .and_then(|auxv| page_size_from_auxv(&auxv))
        .unwrap_or(4096)
}

fn page_size_from_auxv(auxv: &[u8]) -> Option<u64> {
    const AT_PAGESZ: usize = 6;
    let word = std::mem::size_of::<usize>();
    auxv.chunks_exact(2 * word).find_map(|pair| {
        let key = usize::from_ne_bytes(pair[..word].try_into().ok()?);
        let value = usize::from_ne_bytes(pair[word..].try_into().ok()?);
        (key == AT_PAGESZ).then_some(value as u64)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::{Container, PodSpec, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::super::fs::FakeCgroupFs;
    use super::*;

    /// A manager on a tempdir laid out as a cgroup2 root offering `controllers`.
    struct Fixture {
        dir: tempfile::TempDir,
        fs: Arc<FakeCgroupFs>,
    }

    /// Lets the fixture keep a handle on the fake while the manager owns it.
    #[derive(Debug)]
    struct Shared(Arc<FakeCgroupFs>);

    impl CgroupFs for Shared {
        fn read(&self, path: &Path) -> std::io::Result<String> {
            self.0.read(path)
        }
        fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
            self.0.write(path, value)
        }
        fn mkdir(&self, path: &Path) -> std::io::Result<()> {
            self.0.mkdir(path)
        }
        fn rmdir(&self, path: &Path) -> std::io::Result<()> {
            self.0.rmdir(path)
        }
        fn subdirs(&self, path: &Path) -> std::io::Result<Vec<String>> {
            self.0.subdirs(path)
        }
        fn is_dir(&self, path: &Path) -> bool {
            self.0.is_dir(path)
        }
        fn exists(&self, path: &Path) -> bool {
            self.0.exists(path)
        }
        fn kill(&self, pid: i32) -> std::io::Result<()> {
            self.0.kill(pid)
        }
        fn xattr(&self, path: &Path, name: &str) -> std::io::Result<Option<Vec<u8>>> {
            self.0.xattr(path, name)
        }
    }

    impl Fixture {
        fn new(controllers: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let fs = Arc::new(FakeCgroupFs::new(dir.path(), controllers));
            Fixture { dir, fs }
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn config(&self, subtree: &str) -> CgroupConfig {
            let mut config = CgroupConfig::new(self.root(), subtree);
            config.resources.page_size = 4096;
            config.resources.pod_pids_limit = Some(1024);
            config.kill_timeout = Duration::from_millis(100);
            config
        }

        fn open(&self, subtree: &str) -> CgroupManager {
            self.open_config(self.config(subtree))
        }

        fn open_config(&self, config: CgroupConfig) -> CgroupManager {
            CgroupManager::open_with(config, Box::new(Shared(self.fs.clone())), OpenMode::Create)
                .unwrap()
        }

        fn read(&self, relative: &str) -> String {
            std::fs::read_to_string(self.root().join(relative))
                .unwrap_or_else(|e| panic!("read {relative}: {e}"))
                .trim_end()
                .to_string()
        }
    }

    fn list(cpu: &str, memory: &str) -> Option<BTreeMap<String, Quantity>> {
        let mut list = BTreeMap::new();
        if !cpu.is_empty() {
            list.insert("cpu".to_string(), Quantity(cpu.into()));
        }
        if !memory.is_empty() {
            list.insert("memory".to_string(), Quantity(memory.into()));
        }
        Some(list)
    }

    /// A container's name, `(cpu, memory)` requests and limits ("" for absent).
    type ContainerSpec<'a> = (&'a str, (&'a str, &'a str), (&'a str, &'a str));

    fn pod(uid: &str, containers: &[ContainerSpec<'_>]) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some("web".into());
        pod.metadata.uid = Some(uid.into());
        pod.spec = Some(PodSpec {
            containers: containers
                .iter()
                .map(|(name, requests, limits)| Container {
                    name: name.to_string(),
                    resources: Some(ResourceRequirements {
                        requests: list(requests.0, requests.1),
                        limits: list(limits.0, limits.1),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        pod
    }

    fn burstable_pod(uid: &str) -> Pod {
        pod(uid, &[("app", ("100m", "128Mi"), ("200m", "256Mi"))])
    }

    #[test]
    fn a_pure_v2_host_gets_every_controller_and_the_kubelet_layout() {
        let fixture = Fixture::new("cpuset cpu io memory hugetlb pids rdma misc");
        let manager = fixture.open("skiff");
        assert!(manager.unenforced().is_empty());
        assert_eq!(manager.unenforced_message(), None);
        for dir in ["", "skiff/", "skiff/kubepods/", "skiff/kubepods/burstable/"] {
            let control = fixture.read(&format!("{dir}cgroup.subtree_control"));
            assert_eq!(control, "cpu memory pids", "{dir}");
        }
        assert_eq!(
            fixture.read("skiff/kubepods/besteffort/cgroup.subtree_control"),
            "cpu memory pids"
        );

        let pod = burstable_pod("1234");
        let applied = manager.apply_pod(&pod).unwrap();
        assert_eq!(
            applied.cgroup,
            fixture.root().join("skiff/kubepods/burstable/pod1234")
        );
        assert!(applied.unenforced.is_empty());
        let pod_dir = "skiff/kubepods/burstable/pod1234";
        assert_eq!(fixture.read(&format!("{pod_dir}/cpu.weight")), "4");
        assert_eq!(fixture.read(&format!("{pod_dir}/cpu.max")), "20000 100000");
        assert_eq!(fixture.read(&format!("{pod_dir}/memory.max")), "268435456");
        assert_eq!(fixture.read(&format!("{pod_dir}/pids.max")), "1024");
        assert_eq!(
            fixture.read(&format!("{pod_dir}/cgroup.subtree_control")),
            "cpu memory pids"
        );

        let applied = manager.apply_container(&pod, "app").unwrap();
        let files: Vec<String> = applied
            .written
            .iter()
            .map(|s| format!("{}={}", s.file, s.value))
            .collect();
        assert_eq!(
            files,
            [
                "cpu.weight=4",
                "cpu.max=20000 100000",
                "memory.max=268435456",
                "memory.high=255012864"
            ]
        );
        assert_eq!(
            fixture.read(&format!("{pod_dir}/app/memory.high")),
            "255012864"
        );
        let cgroup = PodCgroup::of(&pod).unwrap();
        assert_eq!(
            manager.container_cgroups_path(&cgroup, "app").unwrap(),
            Path::new("/skiff/kubepods/burstable/pod1234/app")
        );
    }

    #[test]
    fn guaranteed_and_best_effort_pods_go_to_their_tiers() {
        let fixture = Fixture::new("cpu memory pids");
        let manager = fixture.open("/skiff/");
        let guaranteed = pod("g-1", &[("c", ("1", "64Mi"), ("1", "64Mi"))]);
        let best_effort = pod("b-1", &[("c", ("", ""), ("", ""))]);
        manager.apply_pod(&guaranteed).unwrap();
        manager.apply_pod(&best_effort).unwrap();
        assert_eq!(
            fixture.read("skiff/kubepods/podg-1/cpu.max"),
            "100000 100000"
        );
        assert_eq!(fixture.read("skiff/kubepods/podg-1/memory.max"), "67108864");
        assert_eq!(
            fixture.read("skiff/kubepods/besteffort/podb-1/cpu.weight"),
            "1"
        );
        assert_eq!(
            fixture.read("skiff/kubepods/besteffort/podb-1/memory.max"),
            "max"
        );
        manager.apply_pod(&burstable_pod("u-1")).unwrap();
        assert_eq!(
            manager.list_pods().unwrap(),
            [
                PodCgroup::new(QosClass::Guaranteed, "g-1").unwrap(),
                PodCgroup::new(QosClass::Burstable, "u-1").unwrap(),
                PodCgroup::new(QosClass::BestEffort, "b-1").unwrap(),
            ]
        );
    }

    #[test]
    fn a_hybrid_host_reports_every_setting_and_still_creates_the_cgroups() {
        let fixture = Fixture::new("hugetlb");
        let manager = fixture.open("skiff");
        let root = fixture.root().display().to_string();
        let expected: Vec<String> = [
            "cpu.weight",
            "cpu.max",
            "memory.max",
            "memory.high",
            "pids.max",
        ]
        .iter()
        .map(|setting| {
            let controller = setting.split('.').next().unwrap();
            format!(
                "{setting}: the {controller} controller is not available in the cgroup v2 \
                     hierarchy at {root}"
            )
        })
        .collect();
        let got: Vec<String> = manager
            .unenforced()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, expected);
        assert_eq!(
            manager.unenforced_message().unwrap(),
            format!(
                "cpu.weight, cpu.max: the cpu controller is not available in the cgroup v2 \
                 hierarchy at {root}; memory.max, memory.high: the memory controller is not \
                 available in the cgroup v2 hierarchy at {root}; pids.max: the pids controller \
                 is not available in the cgroup v2 hierarchy at {root}"
            )
        );
        assert_eq!(fixture.read("cgroup.subtree_control"), "");

        let pod = burstable_pod("1234");
        let applied = manager.apply_pod(&pod).unwrap();
        assert!(applied.written.is_empty());
        let unenforced: Vec<String> = applied
            .unenforced
            .iter()
            .map(|u| format!("{}={}", u.setting, u.value.as_deref().unwrap()))
            .collect();
        // pids.max is written only with a limit; defaults ("max") are not reported.
        assert_eq!(
            unenforced,
            [
                "cpu.weight=4",
                "cpu.max=20000 100000",
                "memory.max=268435456",
                "pids.max=1024"
            ]
        );
        let applied = manager.apply_container(&pod, "app").unwrap();
        assert!(applied.written.is_empty());
        assert_eq!(applied.unenforced.len(), 4);
        assert!(
            fixture
                .root()
                .join("skiff/kubepods/burstable/pod1234/app")
                .is_dir()
        );
        assert!(
            !fixture
                .root()
                .join("skiff/kubepods/burstable/pod1234/app/cpu.weight")
                .exists()
        );

        let cgroup = PodCgroup::of(&pod).unwrap();
        manager.add_process(&cgroup, "app", 4242).unwrap();
        assert_eq!(
            fixture.read("skiff/kubepods/burstable/pod1234/app/cgroup.procs"),
            "4242"
        );
        let usage = manager.container_usage(&cgroup, "app").unwrap();
        assert_eq!(usage.cpu.unwrap().nr_throttled, None);
        assert_eq!(
            (
                usage.memory_current,
                usage.memory_events,
                usage.pids_current
            ),
            (None, None, None)
        );
    }

    #[test]
    fn an_ancestor_that_cannot_pass_a_controller_on_is_named() {
        // systemd's slice passes cpu and pids to its children but not memory, and holds
        // processes, so memory cannot be enabled there.
        let fixture = Fixture::new("cpu memory pids");
        std::fs::write(fixture.root().join("cgroup.subtree_control"), "cpu pids\n").unwrap();
        let slice = fixture.root().join("system.slice");
        fixture.fs.mkdir(&slice).unwrap();
        std::fs::write(slice.join("cgroup.subtree_control"), "cpu pids\n").unwrap();
        std::fs::write(slice.join("cgroup.procs"), "77\n").unwrap();
        let manager = fixture.open("system.slice/skiff.service");
        assert!(manager.is_enforced(Controller::Cpu));
        assert!(manager.is_enforced(Controller::Pids));
        assert!(!manager.is_enforced(Controller::Memory));
        assert_eq!(fixture.read("cgroup.subtree_control"), "cpu memory pids");
        let memory: Vec<String> = manager
            .unenforced()
            .iter()
            .filter(|u| u.controller == Controller::Memory)
            .map(ToString::to_string)
            .collect();
        let reason = format!(
            "the memory controller could not be enabled in {}/cgroup.subtree_control: device \
             or resource busy (the cgroup holds processes of its own; run the agent in a leaf \
             cgroup outside its subtree)",
            slice.display()
        );
        assert_eq!(
            memory,
            [
                format!("memory.max: {reason}"),
                format!("memory.high: {reason}")
            ]
        );
        assert_eq!(
            fixture.read("system.slice/skiff.service/kubepods/burstable/cgroup.subtree_control"),
            "cpu pids"
        );
    }

    #[test]
    fn a_subtree_with_processes_of_its_own_cannot_enable_and_says_why() {
        let fixture = Fixture::new("cpu memory pids");
        fixture.fs.mkdir(&fixture.root().join("agent")).unwrap();
        std::fs::write(fixture.root().join("agent/cgroup.procs"), "4321\n").unwrap();
        let manager = fixture.open("agent");
        let first = &manager.unenforced()[0];
        assert_eq!(
            first.to_string(),
            format!(
                "cpu.weight: the cpu controller could not be enabled in \
                 {}/agent/cgroup.subtree_control: device or resource busy (the cgroup holds \
                 processes of its own; run the agent in a leaf cgroup outside its subtree)",
                fixture.root().display()
            )
        );
        assert_eq!(manager.unenforced().len(), 5);
        // The cgroups are still made, without controllers.
        assert_eq!(fixture.read("agent/kubepods/cgroup.controllers"), "");
    }

    #[test]
    fn applying_again_is_idempotent_and_a_resize_updates_the_files() {
        let fixture = Fixture::new("cpu memory pids");
        let manager = fixture.open("skiff");
        let pod = burstable_pod("1234");
        let first = manager.apply_pod(&pod).unwrap();
        assert_eq!(manager.apply_pod(&pod).unwrap(), first);
        manager.apply_container(&pod, "app").unwrap();
        manager.apply_container(&pod, "app").unwrap();

        let resized = self::pod("1234", &[("app", ("500m", "128Mi"), ("1", "512Mi"))]);
        manager.apply_pod(&resized).unwrap();
        manager.apply_container(&resized, "app").unwrap();
        let dir = "skiff/kubepods/burstable/pod1234";
        assert_eq!(
            fixture.read(&format!("{dir}/cpu.weight")),
            shares_to_weight(512).to_string()
        );
        assert_eq!(fixture.read(&format!("{dir}/cpu.max")), "100000 100000");
        assert_eq!(fixture.read(&format!("{dir}/memory.max")), "536870912");
        assert_eq!(fixture.read(&format!("{dir}/app/memory.max")), "536870912");
    }

    #[test]
    fn a_container_not_in_the_pod_or_a_missing_pod_cgroup_is_an_error() {
        let fixture = Fixture::new("cpu memory pids");
        let manager = fixture.open("skiff");
        let pod = burstable_pod("1234");
        let error = manager
            .apply_container(&pod, "app")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            format!(
                "create {}/skiff/kubepods/burstable/pod1234/app: no such file or directory",
                fixture.root().display()
            )
        );
        manager.apply_pod(&pod).unwrap();
        let error = manager
            .apply_container(&pod, "sidecar")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "find container sidecar in pod default/web: it is not in the pod spec"
        );
        let mut no_uid = pod.clone();
        no_uid.metadata.uid = None;
        assert_eq!(
            manager.apply_pod(&no_uid).unwrap_err().to_string(),
            "find the cgroup of pod web: the pod has no metadata.uid"
        );
    }

    #[test]
    fn names_that_would_escape_or_clash_are_refused() {
        let fixture = Fixture::new("cpu memory pids");
        let manager = fixture.open("skiff");
        let cgroup = PodCgroup::new(QosClass::Burstable, "1234").unwrap();
        for name in ["", "..", "a/b", "cgroup.procs", "memory.max"] {
            assert!(manager.container_dir(&cgroup, name).is_err(), "{name:?}");
        }
        assert_eq!(
            PodCgroup::new(QosClass::BestEffort, "../x")
                .unwrap_err()
                .to_string(),
            "use \"../x\" as the pod uid of a cgroup: it contains a slash or a NUL byte"
        );
        let config = fixture.config("skiff/../../etc");
        let error = CgroupManager::open_with(
            config,
            Box::new(Shared(fixture.fs.clone())),
            OpenMode::Create,
        );
        assert_eq!(
            error.unwrap_err().to_string(),
            "use \"skiff/../../etc\" as the subtree of a cgroup: it leaves the cgroup2 mount"
        );
    }

    #[test]
    fn qos_tiers_and_node_allocatable() {
        let fixture = Fixture::new("cpu memory pids");
        let manager = fixture.open("skiff");
        let pods = [
            burstable_pod("a"),
            burstable_pod("b"),
            pod("c", &[("c", ("", ""), ("", ""))]),
        ];
        manager.update_qos_tiers(&pods).unwrap();
        assert_eq!(
            fixture.read("skiff/kubepods/burstable/cpu.weight"),
            shares_to_weight(milli_cpu_to_shares(200)).to_string()
        );
        assert_eq!(fixture.read("skiff/kubepods/besteffort/cpu.weight"), "1");
        let allocatable = NodeAllocatable {
            cpu_milli: 2000,
            memory_bytes: Some(1 << 30),
            pids: None,
        };
        manager.apply_node_allocatable(&allocatable).unwrap();
        assert_eq!(fixture.read("skiff/kubepods/cpu.weight"), "79");
        assert_eq!(fixture.read("skiff/kubepods/memory.max"), "1073741824");
        assert_eq!(fixture.read("skiff/kubepods/pids.max"), "max");
    }

    #[test]
    fn usage_reads_the_files_that_exist() {
        let fixture = Fixture::new("cpu memory pids");
        let manager = fixture.open("skiff");
        let pod = burstable_pod("1234");
        manager.apply_pod(&pod).unwrap();
        manager.apply_container(&pod, "app").unwrap();
        let dir = fixture.root().join("skiff/kubepods/burstable/pod1234/app");
        std::fs::write(dir.join("memory.current"), "1048576\n").unwrap();
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 3\nmax 9\noom 2\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(dir.join("pids.current"), "3\n").unwrap();
        let cgroup = PodCgroup::of(&pod).unwrap();
        let usage = manager.container_usage(&cgroup, "app").unwrap();
        assert_eq!(usage.memory_current, Some(1_048_576));
        assert_eq!(usage.memory_events.unwrap().oom_kill, 1);
        assert_eq!(usage.pids_current, Some(3));
        assert_eq!(usage.cpu.unwrap().nr_throttled, Some(0));

        std::fs::write(dir.join("memory.current"), "lots\n").unwrap();
        let error = manager
            .container_usage(&cgroup, "app")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            format!(
                "parse {}/memory.current: unexpected content \"lots\"",
                dir.display()
            )
        );
        let gone = PodCgroup::new(QosClass::Burstable, "gone").unwrap();
        assert!(manager.pod_usage(&gone).is_err());
    }

    #[test]
    fn removal_kills_then_removes_bottom_up_and_is_idempotent() {
        let fixture = Fixture::new("cpu memory pids");
        let manager = fixture.open("skiff");
        let pod = burstable_pod("1234");
        manager.apply_pod(&pod).unwrap();
        manager.apply_container(&pod, "app").unwrap();
        manager.apply_container(&pod, "app").unwrap();
        let cgroup = PodCgroup::of(&pod).unwrap();
        assert_eq!(manager.list_containers(&cgroup).unwrap(), ["app"]);
        manager.remove_pod(&cgroup).unwrap();
        let pod_dir = fixture.root().join("skiff/kubepods/burstable/pod1234");
        assert!(!pod_dir.exists());
        assert_eq!(*fixture.fs.killed_cgroups.lock().unwrap(), [pod_dir]);
        manager.remove_pod(&cgroup).unwrap();
        assert!(manager.list_pods().unwrap().is_empty());
        assert!(manager.list_containers(&cgroup).unwrap().is_empty());
    }

    #[test]
    fn without_cgroup_kill_every_pid_is_signalled() {
        let fixture = Fixture::new("cpu memory pids");
        let manager = fixture.open("skiff");
        let pod = burstable_pod("1234");
        manager.apply_pod(&pod).unwrap();
        manager.apply_container(&pod, "app").unwrap();
        let pod_dir = fixture.root().join("skiff/kubepods/burstable/pod1234");
        std::fs::remove_file(pod_dir.join("cgroup.kill")).unwrap();
        // The fake kernel never empties it: the pids are signalled and the wait times out.
        std::fs::write(pod_dir.join("app/cgroup.procs"), "101\n102\n").unwrap();
        std::fs::write(pod_dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let cgroup = PodCgroup::of(&pod).unwrap();
        let error = manager.remove_pod(&cgroup).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "empty cgroup {}: it still holds processes 100ms after they were killed",
                pod_dir.display()
            )
        );
        let killed = fixture.fs.killed_pids.lock().unwrap();
        assert!(killed.starts_with(&[101, 102]), "{killed:?}");
        assert!(pod_dir.is_dir());
    }

    /// Every directory and file under `root`, with its content and modification time.
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, (Option<String>, std::time::SystemTime)> {
        let mut entries = BTreeMap::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let metadata = std::fs::metadata(&path).unwrap();
                let content = if metadata.is_dir() {
                    dirs.push(path.clone());
                    None
                } else {
                    Some(std::fs::read_to_string(&path).unwrap())
                };
                entries.insert(path, (content, metadata.modified().unwrap()));
            }
        }
        entries
    }

    #[test]
    fn open_existing_reads_the_agents_tree_and_creates_or_writes_nothing() {
        let fixture = Fixture::new("cpu memory pids");
        let root = fixture.root().display().to_string();
        let existing = || {
            CgroupManager::open_with(
                fixture.config("skiff"),
                Box::new(Shared(fixture.fs.clone())),
                OpenMode::Existing,
            )
        };

        // Before the agent has run: an error naming the subtree, and nothing made.
        let before = snapshot(fixture.root());
        assert_eq!(
            existing().unwrap_err().to_string(),
            format!(
                "find kubepods under {root}/skiff: no such directory (is it the agent's cgroup \
                 subtree? give --cgroup-root as the agent has it)"
            )
        );
        assert_eq!(snapshot(fixture.root()), before);
        assert!(!fixture.root().join("skiff").exists());

        // A tree without controllers and tiers: they are reported, neither enabled nor made.
        fixture.fs.mkdir(&fixture.root().join("skiff")).unwrap();
        fixture
            .fs
            .mkdir(&fixture.root().join("skiff/kubepods"))
            .unwrap();
        let before = snapshot(fixture.root());
        let manager = existing().unwrap();
        assert_eq!(manager.unenforced().len(), 5);
        assert_eq!(
            manager.unenforced()[0].to_string(),
            format!(
                "cpu.weight: the cpu controller is not enabled in {root}/cgroup.subtree_control"
            )
        );
        assert!(!manager.is_enforced(Controller::Memory));
        assert!(manager.list_pods().unwrap().is_empty());
        assert_eq!(snapshot(fixture.root()), before);
        assert!(!fixture.root().join("skiff/kubepods/burstable").exists());

        // The agent's tree with a pod: the agent's view of it, and still nothing changed.
        let agent = fixture.open("skiff");
        let pod = burstable_pod("1234");
        agent.apply_pod(&pod).unwrap();
        agent.apply_container(&pod, "app").unwrap();
        let cgroup = PodCgroup::of(&pod).unwrap();
        std::fs::write(agent.pod_dir(&cgroup).join("memory.current"), "8192\n").unwrap();
        let before = snapshot(fixture.root());
        let manager = existing().unwrap();
        assert!(manager.unenforced().is_empty());
        assert_eq!(manager.list_pods().unwrap(), std::slice::from_ref(&cgroup));
        assert_eq!(manager.pod_dir(&cgroup), agent.pod_dir(&cgroup));
        assert_eq!(manager.list_containers(&cgroup).unwrap(), ["app"]);
        assert_eq!(
            manager.pod_usage(&cgroup).unwrap().memory_current,
            Some(8192)
        );
        assert_eq!(
            manager.container_usage(&cgroup, "app").unwrap(),
            agent.container_usage(&cgroup, "app").unwrap()
        );
        // Whatever would change the node is refused.
        assert_eq!(
            manager.apply_pod(&pod).unwrap_err().to_string(),
            format!(
                "create {}: read-only file system",
                agent.pod_dir(&cgroup).display()
            )
        );
        assert!(manager.apply_container(&pod, "app").is_err());
        assert!(manager.add_process(&cgroup, "app", 4242).is_err());
        assert!(
            manager
                .update_qos_tiers(std::slice::from_ref(&pod))
                .is_err()
        );
        assert!(manager.remove_pod(&cgroup).is_err());
        assert_eq!(snapshot(fixture.root()), before);
        assert!(fixture.fs.killed_cgroups.lock().unwrap().is_empty());
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_fails_to_open_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let error = CgroupManager::open(CgroupConfig::new(dir.path(), "skiff")).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "read {}/cgroup.controllers: no such file or directory",
                dir.path().display()
            )
        );
    }

    #[test]
    fn page_size_comes_from_the_auxiliary_vector() {
        let word = std::mem::size_of::<usize>();
        let mut auxv = Vec::new();
        for (key, value) in [(33usize, 0x7fffusize), (6, 16384), (0, 0)] {
            auxv.extend_from_slice(&key.to_ne_bytes());
            auxv.extend_from_slice(&value.to_ne_bytes());
        }
        assert_eq!(page_size_from_auxv(&auxv), Some(16384));
        assert_eq!(page_size_from_auxv(&auxv[..2 * word]), None);
        assert!(host_page_size() >= 4096);
    }
}
