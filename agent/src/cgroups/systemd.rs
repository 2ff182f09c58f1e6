//! The agent's subtree under systemd: finding the cgroup systemd delegated for the pods
//! (`Delegate=yes`) and moving the processes that start in it into a leaf, so that the QoS
//! tiers beside them can have controllers.
//!
//! The shipped units (`agent/systemd/`) use two cgroups:
//!
//! ```text
//! system.slice/skiff-agent.service/         the agent and what it spawns (CNI plugins)
//! system.slice/skiff-pods.service/holder/   the pods unit's one process (`skiff-agent hold-cgroup`)
//! system.slice/skiff-pods.service/kubepods/ the QoS tiers and pods
//! ```
//!
//! The pods cannot live in the agent's own unit cgroup on systemd before v254: once
//! `cpu`, `memory` and `pids` are enabled there for `kubepods`, cgroup v2 lets no process
//! in ("no internal processes"), and `systemctl restart skiff-agent` fails with
//! `status=219/CGROUP` because systemd starts the new agent in the unit's cgroup itself.
//! `skiff-pods.service` is never restarted with the agent, so its cgroup keeps the pods.
//! On systemd 254 and later one unit suffices: `Delegate=yes` with `DelegateSubgroup=agent`
//! puts the agent into `<unit>/agent`, and the agent, found in that leaf of a delegated
//! cgroup, uses the unit's cgroup.
//!
//! **Architecture invariant:** nothing here writes outside a delegated cgroup: a cgroup
//! without systemd's `trusted.delegate` (or `user.delegate`) mark is never taken, and the
//! hybrid development hosts, which have no such mark, keep the subtree they had.

use std::path::{Component, Path, PathBuf};

use super::CgroupError;
use super::fs::{self, CgroupFs, HostFs};

/// The leaf of a delegated unit cgroup that holds the agent when the pods share its unit.
pub const AGENT_LEAF: &str = "agent";

/// The leaf of the pods unit's cgroup that holds that unit's own process.
pub const HOLDER_LEAF: &str = "holder";

/// The unit whose delegated cgroup holds the pods, beside the agent's unit in its slice.
pub const PODS_UNIT: &str = "skiff-pods.service";

/// The extended attributes systemd sets to "1" on the cgroup of a unit with `Delegate=yes`
/// (both seen on systemd 252).
const DELEGATE_XATTRS: [&str; 2] = ["trusted.delegate", "user.delegate"];

/// The subtree systemd delegated for the pods, as the agent found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegatedSubtree {
    /// The delegated cgroup relative to the cgroup2 mount, e.g.
    /// `system.slice/skiff-pods.service`: the agent's subtree.
    pub subtree: PathBuf,
    /// Where the agent still has to move itself (relative to the mount), when it runs in
    /// the root of that delegated cgroup.
    pub move_agent_to: Option<PathBuf>,
}

/// The subtree for the pods of an agent whose cgroup v2 path is `own` (from
/// [`super::own_cgroup_v2`]): the pods unit's delegated cgroup beside the agent's unit,
/// else the agent's own unit cgroup when that is delegated (from its root or its `agent`
/// leaf). `None` without systemd's delegation mark, e.g. on the hybrid development hosts
/// whose agents get `--cgroup-root`.
pub fn find_delegated_subtree(mount: &Path, own: &Path) -> Option<DelegatedSubtree> {
    find_delegated_subtree_with(&HostFs, mount, own)
}

pub(crate) fn find_delegated_subtree_with(
    fs: &dyn CgroupFs,
    mount: &Path,
    own: &Path,
) -> Option<DelegatedSubtree> {
    let own = relative(own)?;
    if let Some(slice) = own.parent() {
        let pods_unit = slice.join(PODS_UNIT);
        if pods_unit != own && is_delegated(fs, &mount.join(&pods_unit)) {
            return Some(DelegatedSubtree {
                subtree: pods_unit,
                move_agent_to: None,
            });
        }
    }
    if is_delegated(fs, &mount.join(&own)) {
        return Some(DelegatedSubtree {
            move_agent_to: Some(own.join(AGENT_LEAF)),
            subtree: own,
        });
    }
    let parent = own.parent()?;
    (own.file_name() == Some(AGENT_LEAF.as_ref())
        && !parent.as_os_str().is_empty()
        && is_delegated(fs, &mount.join(parent)))
    .then(|| DelegatedSubtree {
        subtree: parent.to_path_buf(),
        move_agent_to: None,
    })
}

/// The delegated cgroup (relative to the mount) of a process whose cgroup v2 path is
/// `own`, if that cgroup is delegated: the pods unit's, for `skiff-agent hold-cgroup`.
pub fn own_delegated_cgroup(mount: &Path, own: &Path) -> Option<PathBuf> {
    own_delegated_cgroup_with(&HostFs, mount, own)
}

pub(crate) fn own_delegated_cgroup_with(
    fs: &dyn CgroupFs,
    mount: &Path,
    own: &Path,
) -> Option<PathBuf> {
    let own = relative(own)?;
    is_delegated(fs, &mount.join(&own)).then_some(own)
}

/// Moves the process `pid` into the cgroup `leaf` (relative to `mount`), creating it;
/// returns its directory. Processes it starts afterwards begin there too.
pub fn enter_leaf(mount: &Path, leaf: &Path, pid: u32) -> Result<PathBuf, CgroupError> {
    enter_leaf_with(&HostFs, mount, leaf, pid)
}

pub(crate) fn enter_leaf_with(
    fs: &dyn CgroupFs,
    mount: &Path,
    leaf: &Path,
    pid: u32,
) -> Result<PathBuf, CgroupError> {
    let dir = mount.join(leaf);
    fs::ensure_dir(fs, &dir)?;
    fs::write(fs, &dir.join("cgroup.procs"), &pid.to_string())?;
    Ok(dir)
}

/// Whether systemd marked the cgroup directory `dir` as delegated.
fn is_delegated(fs: &dyn CgroupFs, dir: &Path) -> bool {
    DELEGATE_XATTRS.iter().any(|name| {
        fs.xattr(dir, name)
            .ok()
            .flatten()
            .is_some_and(|value| value.as_slice() == b"1")
    })
}

/// `own` without its leading `/`; `None` for the root cgroup (never a unit's) or a path
/// that leaves the mount.
fn relative(own: &Path) -> Option<PathBuf> {
    let mut path = PathBuf::new();
    for component in own.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => path.push(part),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!path.as_os_str().is_empty()).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::fs::FakeCgroupFs;
    use crate::cgroups::manager::OpenMode;
    use crate::cgroups::{CgroupConfig, CgroupManager, Controller};

    const AGENT_UNIT: &str = "system.slice/skiff-agent.service";
    const PODS: &str = "system.slice/skiff-pods.service";

    /// A systemd host: the root and `system.slice` pass every controller down; the agent's
    /// unit cgroup holds the agent (pid 4321), the pods unit's its holder (pid 77), each
    /// delegated as asked.
    fn systemd_host(dir: &Path, agent_delegated: bool, pods_unit: bool) -> FakeCgroupFs {
        let fs = FakeCgroupFs::new(dir, "cpu io memory pids");
        fs.write(
            &dir.join("cgroup.subtree_control"),
            "+cpu +io +memory +pids",
        )
        .unwrap();
        let slice = dir.join("system.slice");
        fs.mkdir(&slice).unwrap();
        fs.write(
            &slice.join("cgroup.subtree_control"),
            "+cpu +io +memory +pids",
        )
        .unwrap();
        let agent = dir.join(AGENT_UNIT);
        fs.mkdir(&agent).unwrap();
        fs.write(&agent.join("cgroup.procs"), "4321").unwrap();
        if agent_delegated {
            fs.set_xattr(&agent, "trusted.delegate", b"1");
        }
        if pods_unit {
            let pods = dir.join(PODS);
            fs.mkdir(&pods).unwrap();
            fs.write(&pods.join("cgroup.procs"), "77").unwrap();
            fs.set_xattr(&pods, "trusted.delegate", b"1");
        }
        fs
    }

    fn open(dir: &Path, subtree: &Path) -> CgroupManager {
        let mut config = CgroupConfig::new(dir, subtree);
        config.resources.page_size = 4096;
        CgroupManager::open_with(
            config,
            Box::new(FakeCgroupFs::attach(dir)),
            OpenMode::Create,
        )
        .unwrap()
    }

    fn procs(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("cgroup.procs")).unwrap()
    }

    #[test]
    fn the_pods_unit_beside_the_agent_is_the_subtree_once_its_holder_moved() {
        let dir = tempfile::tempdir().unwrap();
        let fs = systemd_host(dir.path(), false, true);
        let own = PathBuf::from(format!("/{AGENT_UNIT}"));
        let found = find_delegated_subtree_with(&fs, dir.path(), &own).unwrap();
        assert_eq!(
            found,
            DelegatedSubtree {
                subtree: PathBuf::from(PODS),
                move_agent_to: None
            }
        );
        // `skiff-agent hold-cgroup` in the pods unit: its cgroup is delegated, and it
        // leaves the root of it for its leaf.
        let holder_own = PathBuf::from(format!("/{PODS}"));
        let pods = own_delegated_cgroup_with(&fs, dir.path(), &holder_own).unwrap();
        let leaf = enter_leaf_with(&fs, dir.path(), &pods.join(HOLDER_LEAF), 77).unwrap();
        assert_eq!(leaf, dir.path().join(PODS).join("holder"));
        assert_eq!(procs(&leaf), "77\n");
        assert_eq!(procs(&dir.path().join(PODS)), "");
        // Then every controller reaches the tiers, and the agent's cgroup is untouched.
        let manager = open(dir.path(), &found.subtree);
        for controller in [Controller::Cpu, Controller::Memory, Controller::Pids] {
            assert!(
                manager.is_enforced(controller),
                "{controller}: {:?}",
                manager.unenforced()
            );
        }
        assert_eq!(
            manager.kubepods_dir(),
            dir.path().join(PODS).join("kubepods")
        );
        assert_eq!(procs(&dir.path().join(AGENT_UNIT)), "4321\n");
        assert!(!dir.path().join(AGENT_UNIT).join("kubepods").exists());
    }

    #[test]
    fn a_holder_still_in_the_root_of_the_pods_unit_leaves_the_pods_without_controllers() {
        // Why the holder moves (and why the agent starts only once it has: the pods unit
        // is Type=notify): a process in the unit's cgroup blocks the controllers.
        let dir = tempfile::tempdir().unwrap();
        systemd_host(dir.path(), false, true);
        let manager = open(dir.path(), Path::new(PODS));
        assert!(!manager.is_enforced(Controller::Memory));
    }

    #[test]
    fn a_delegated_agent_unit_alone_is_the_subtree_and_the_agent_moves_to_its_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let fs = systemd_host(dir.path(), true, false);
        let found =
            find_delegated_subtree_with(&fs, dir.path(), Path::new(&format!("/{AGENT_UNIT}")))
                .unwrap();
        assert_eq!(found.subtree, Path::new(AGENT_UNIT));
        let leaf = found.move_agent_to.clone().unwrap();
        assert_eq!(leaf, Path::new(AGENT_UNIT).join(AGENT_LEAF));
        enter_leaf_with(&fs, dir.path(), &leaf, 4321).unwrap();
        assert_eq!(procs(&dir.path().join(&leaf)), "4321\n");
        let manager = open(dir.path(), &found.subtree);
        assert!(manager.is_enforced(Controller::Memory));
        assert_eq!(
            manager.kubepods_dir(),
            dir.path().join(AGENT_UNIT).join("kubepods")
        );

        // systemd 254's DelegateSubgroup=agent starts the agent in the leaf already.
        let found = find_delegated_subtree_with(
            &fs,
            dir.path(),
            Path::new(&format!("/{AGENT_UNIT}/{AGENT_LEAF}")),
        );
        assert_eq!(
            found,
            Some(DelegatedSubtree {
                subtree: PathBuf::from(AGENT_UNIT),
                move_agent_to: None
            })
        );
    }

    #[test]
    fn the_pods_unit_wins_over_a_delegated_agent_unit() {
        let dir = tempfile::tempdir().unwrap();
        let fs = systemd_host(dir.path(), true, true);
        let found =
            find_delegated_subtree_with(&fs, dir.path(), Path::new(&format!("/{AGENT_UNIT}")))
                .unwrap();
        assert_eq!(found.subtree, Path::new(PODS));
        assert_eq!(found.move_agent_to, None);
    }

    #[test]
    fn nothing_undelegated_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let fs = systemd_host(dir.path(), false, false);
        let own = PathBuf::from(format!("/{AGENT_UNIT}"));
        assert_eq!(find_delegated_subtree_with(&fs, dir.path(), &own), None);
        assert_eq!(own_delegated_cgroup_with(&fs, dir.path(), &own), None);
        // A pods unit without the mark (Delegate= missing from its file).
        let pods = dir.path().join(PODS);
        fs.mkdir(&pods).unwrap();
        assert_eq!(find_delegated_subtree_with(&fs, dir.path(), &own), None);
        // A mark with another value is no delegation; user.delegate counts as well.
        fs.set_xattr(&pods, "trusted.delegate", b"0");
        assert_eq!(find_delegated_subtree_with(&fs, dir.path(), &own), None);
        fs.set_xattr(&pods, "user.delegate", b"1");
        assert!(find_delegated_subtree_with(&fs, dir.path(), &own).is_some());
        // The hybrid development host: the agent runs in the root of the v2 hierarchy.
        assert_eq!(
            find_delegated_subtree_with(&fs, dir.path(), Path::new("/")),
            None
        );
        // A leaf named agent under an undelegated cgroup, and a path leaving the mount.
        fs.mkdir(&dir.path().join("user.slice")).unwrap();
        fs.mkdir(&dir.path().join("user.slice/agent")).unwrap();
        assert_eq!(
            find_delegated_subtree_with(&fs, dir.path(), Path::new("/user.slice/agent")),
            None
        );
        assert_eq!(
            find_delegated_subtree_with(&fs, dir.path(), Path::new("/../x")),
            None
        );
    }
}
