//! Finding the cgroup2 hierarchy from the mount table (`/proc/self/mountinfo`) and the
//! agent's own place in it (`/proc/self/cgroup`), instead of assuming `/sys/fs/cgroup`.

use std::path::{Path, PathBuf};

use super::CgroupError;

/// Where the cgroup2 hierarchy is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// The mount point, e.g. `/sys/fs/cgroup` on a pure v2 host or
    /// `/sys/fs/cgroup/unified` on a hybrid one.
    pub mount_point: PathBuf,
    /// The cgroup shown at the mount point (`/` unless a subtree was bind-mounted or the
    /// mount was made inside a cgroup namespace).
    pub root: PathBuf,
}

/// Picks the cgroup2 mount out of the text of a `mountinfo` file, or `None` when there is
/// none. When several are listed (bind mounts into containers, chroots), a mount of the
/// hierarchy's root is preferred, then the shortest mount point, as the kubelet does for
/// v1 hierarchies.
pub fn parse_mountinfo_cgroup2(mountinfo: &str) -> Option<Cgroup2Mount> {
    mountinfo
        .lines()
        .filter_map(parse_cgroup2_line)
        .min_by_key(|mount| {
            (
                mount.root != Path::new("/"),
                mount.mount_point.as_os_str().len(),
            )
        })
}

/// Reads the mount table at `mountinfo` (normally `/proc/self/mountinfo`) and finds the
/// cgroup2 mount in it.
pub fn find_cgroup2_mount(mountinfo: &Path) -> Result<Cgroup2Mount, CgroupError> {
    let text = std::fs::read_to_string(mountinfo)
        .map_err(|cause| CgroupError::io("read", mountinfo, cause))?;
    parse_mountinfo_cgroup2(&text).ok_or_else(|| CgroupError::NoCgroup2Mount {
        mountinfo: mountinfo.to_path_buf(),
    })
}

/// The cgroup2 mount of one mountinfo line, if it is one.
fn parse_cgroup2_line(line: &str) -> Option<Cgroup2Mount> {
    let entry = crate::mountinfo::parse_line(line)?;
    (entry.fstype == "cgroup2").then_some(Cgroup2Mount {
        root: entry.root,
        mount_point: entry.mount_point,
    })
}

/// The cgroup v2 path of a process from the text of its `/proc/<pid>/cgroup` (the
/// `0::<path>` line), relative to the reader's cgroup namespace root.
pub fn parse_own_cgroup_v2(proc_cgroup: &str) -> Option<PathBuf> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| PathBuf::from(path.trim_end()))
}

/// The cgroup v2 path the agent runs in (under systemd with `Delegate=yes`, its unit's
/// cgroup), read from `proc_self_cgroup` (normally `/proc/self/cgroup`).
pub fn own_cgroup_v2(proc_self_cgroup: &Path) -> Result<PathBuf, CgroupError> {
    let text = std::fs::read_to_string(proc_self_cgroup)
        .map_err(|cause| CgroupError::io("read", proc_self_cgroup, cause))?;
    parse_own_cgroup_v2(&text).ok_or_else(|| CgroupError::Parse {
        path: proc_self_cgroup.to_path_buf(),
        what: "no cgroup v2 entry (0::<path>)".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mount table of this project's hybrid development machines.
    const HYBRID: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A Debian 12 systemd host (pure cgroup v2).
    const PURE_V2: &str = "\
21 26 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
28 21 0:25 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
29 21 0:26 / /sys/fs/pstore rw,nosuid,nodev,noexec,relatime shared:5 - pstore pstore rw
30 21 0:27 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:6 - bpf bpf rw,mode=700
";

    #[test]
    fn finds_the_unified_mount_of_a_hybrid_host() {
        let mount = parse_mountinfo_cgroup2(HYBRID).unwrap();
        assert_eq!(mount.mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(mount.root, Path::new("/"));
    }

    #[test]
    fn finds_the_mount_of_a_pure_v2_host_with_optional_fields() {
        let mount = parse_mountinfo_cgroup2(PURE_V2).unwrap();
        assert_eq!(mount.mount_point, Path::new("/sys/fs/cgroup"));
    }

    #[test]
    fn no_cgroup2_mount_is_none_and_v1_is_not_mistaken_for_it() {
        let v1_only: String = HYBRID.lines().filter(|l| !l.contains("cgroup2")).collect();
        assert_eq!(parse_mountinfo_cgroup2(&v1_only), None);
        assert_eq!(parse_mountinfo_cgroup2(""), None);
    }

    #[test]
    fn prefers_the_hierarchy_root_then_the_shortest_mount_point() {
        let text = "\
90 80 0:25 /kubepods/pod1 /var/lib/c1/sys/fs/cgroup rw - cgroup2 cgroup2 rw
91 80 0:25 / /var/lib/chroot/sys/fs/cgroup rw - cgroup2 cgroup2 rw
28 21 0:25 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw
";
        let mount = parse_mountinfo_cgroup2(text).unwrap();
        assert_eq!(mount.mount_point, Path::new("/sys/fs/cgroup"));
        let only_subtree = text.lines().next().unwrap();
        let mount = parse_mountinfo_cgroup2(only_subtree).unwrap();
        assert_eq!(mount.root, Path::new("/kubepods/pod1"));
    }

    #[test]
    fn unescapes_octal_sequences_in_paths() {
        let line = r"50 22 0:40 / /mnt/my\040cgroups\134x rw - cgroup2 none rw";
        let mount = parse_mountinfo_cgroup2(line).unwrap();
        assert_eq!(mount.mount_point, Path::new(r"/mnt/my cgroups\x"));
        assert_eq!(crate::mountinfo::unescape(r"a\09b\"), r"a\09b\");
    }

    #[test]
    fn reads_a_mountinfo_file_and_names_it_when_nothing_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mountinfo");
        std::fs::write(&path, HYBRID).unwrap();
        let mount = find_cgroup2_mount(&path).unwrap();
        assert_eq!(mount.mount_point, Path::new("/sys/fs/cgroup/unified"));
        std::fs::write(&path, "").unwrap();
        let error = find_cgroup2_mount(&path).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "find the cgroup2 mount in {}: no cgroup2 file system is mounted",
                path.display()
            )
        );
    }

    #[test]
    fn own_cgroup_is_the_v2_entry() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/6d8e\n1:cpu:/\n0::/\n";
        assert_eq!(parse_own_cgroup_v2(hybrid), Some(PathBuf::from("/")));
        let systemd = "0::/system.slice/skiff-agent.service\n";
        assert_eq!(
            parse_own_cgroup_v2(systemd),
            Some(PathBuf::from("/system.slice/skiff-agent.service"))
        );
        assert_eq!(parse_own_cgroup_v2("4:memory:/x\n"), None);
    }
}
