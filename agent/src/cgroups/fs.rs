//! The seam between the manager and the kernel: every cgroupfs read, write, mkdir, rmdir,
//! extended attribute and signal goes through [`CgroupFs`]. [`HostFs`] is the real thing; the tests'
//! `FakeCgroupFs` keeps a tempdir laid out as the kernel lays out a cgroup2 hierarchy.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;

use nix::errno::Errno;

use super::CgroupError;

/// The cgroupfs operations the manager needs.
pub(crate) trait CgroupFs: Send + Sync + fmt::Debug {
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Writes `value` to an existing file in one write, as cgroupfs wants.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    fn rmdir(&self, path: &Path) -> io::Result<()>;
    /// The names of the child cgroups (directories) of `path`.
    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>>;
    fn is_dir(&self, path: &Path) -> bool;
    fn exists(&self, path: &Path) -> bool;
    /// Sends SIGKILL to `pid`.
    fn kill(&self, pid: i32) -> io::Result<()>;
    /// The extended attribute `name` of the cgroup directory `path`, `None` when it has
    /// none (systemd marks the cgroups it delegates with `trusted.delegate`).
    fn xattr(&self, path: &Path, name: &str) -> io::Result<Option<Vec<u8>>>;
}

/// The host's cgroupfs through `std::fs` and `kill(2)`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct HostFs;

impl CgroupFs for HostFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        // No O_CREAT: a missing file is a missing controller, not a file to make.
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.write_all(value.as_bytes())
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }

    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn kill(&self, pid: i32) -> io::Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(io::Error::from)
    }

    fn xattr(&self, path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
        let mut value = [0u8; 64];
        match rustix::fs::getxattr(path, name, &mut value[..]) {
            Ok(len) => Ok(Some(value[..len].to_vec())),
            // No such attribute, or a file system without them in that namespace.
            Err(rustix::io::Errno::NODATA | rustix::io::Errno::OPNOTSUPP) => Ok(None),
            Err(errno) => Err(io::Error::from(errno)),
        }
    }
}

pub(crate) fn is_errno(error: &io::Error, errno: Errno) -> bool {
    error.raw_os_error() == Some(errno as i32)
}

/// Reads a file that may legitimately be absent (its controller is not enabled).
pub(crate) fn read_optional(fs: &dyn CgroupFs, path: &Path) -> Result<Option<String>, CgroupError> {
    match fs.read(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if is_errno(&error, Errno::ENOENT) => Ok(None),
        Err(error) => Err(CgroupError::io("read", path, error)),
    }
}

pub(crate) fn read(fs: &dyn CgroupFs, path: &Path) -> Result<String, CgroupError> {
    fs.read(path)
        .map_err(|cause| CgroupError::io("read", path, cause))
}

pub(crate) fn write(fs: &dyn CgroupFs, path: &Path, value: &str) -> Result<(), CgroupError> {
    fs.write(path, value)
        .map_err(|cause| CgroupError::io("write", path, cause))
}

/// Creates the cgroup `path` unless it exists.
pub(crate) fn ensure_dir(fs: &dyn CgroupFs, path: &Path) -> Result<(), CgroupError> {
    match fs.mkdir(path) {
        Err(error) if !is_errno(&error, Errno::EEXIST) => {
            Err(CgroupError::io("create", path, error))
        }
        _ => Ok(()),
    }
}

/// The controller names of a `cgroup.controllers` or `cgroup.subtree_control` file.
pub(crate) fn read_controllers(fs: &dyn CgroupFs, path: &Path) -> Result<Vec<String>, CgroupError> {
    Ok(read(fs, path)?
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
pub(crate) use fake::FakeCgroupFs;

#[cfg(test)]
mod fake {
    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;

    /// A cgroup2 hierarchy in a tempdir, kept as the kernel keeps one: a new cgroup gets
    /// the interface files of the controllers its parent enabled, `cgroup.controllers` of
    /// a child is its parent's `cgroup.subtree_control`, enabling a controller in a
    /// cgroup with processes of its own fails with EBUSY, unavailable controllers with
    /// ENOENT, and a populated cgroup or one with children cannot be removed.
    #[derive(Debug)]
    pub(crate) struct FakeCgroupFs {
        root: PathBuf,
        /// Signals sent, and `cgroup.kill` files written.
        pub(crate) killed_pids: Mutex<Vec<i32>>,
        pub(crate) killed_cgroups: Mutex<Vec<PathBuf>>,
    }

    fn errno(errno: Errno) -> io::Error {
        io::Error::from_raw_os_error(errno as i32)
    }

    impl FakeCgroupFs {
        /// A root cgroup at `root` offering `controllers` (e.g. "cpu memory pids").
        pub(crate) fn new(root: &Path, controllers: &str) -> Self {
            std::fs::write(root.join("cgroup.controllers"), format!("{controllers}\n")).unwrap();
            std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
            std::fs::write(root.join("cgroup.procs"), "1\n").unwrap();
            std::fs::write(
                root.join("cpu.stat"),
                "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
            )
            .unwrap();
            FakeCgroupFs {
                root: root.to_path_buf(),
                killed_pids: Mutex::new(Vec::new()),
                killed_cgroups: Mutex::new(Vec::new()),
            }
        }

        /// A second fake over the hierarchy another one laid out at `root` (all state is
        /// in the directory, so both see every change).
        pub(crate) fn attach(root: &Path) -> Self {
            FakeCgroupFs {
                root: root.to_path_buf(),
                killed_pids: Mutex::new(Vec::new()),
                killed_cgroups: Mutex::new(Vec::new()),
            }
        }

        /// Sets the extended attribute `name` of the cgroup `dir` (kept in a file beside
        /// the interface files, which `subdirs` does not list).
        pub(crate) fn set_xattr(&self, dir: &Path, name: &str, value: &[u8]) {
            std::fs::write(dir.join(format!(".xattr.{name}")), value).unwrap();
        }

        /// Removes `pid` from every `cgroup.procs` under `dir` but `except`, as moving a
        /// process into a cgroup takes it out of the one it was in.
        fn take_pid_out(&self, dir: &Path, pid: &str, except: &Path) -> io::Result<()> {
            let procs = dir.join("cgroup.procs");
            if procs != except && procs.is_file() {
                let text = std::fs::read_to_string(&procs)?;
                let kept: String = text
                    .lines()
                    .filter(|line| line.trim() != pid)
                    .map(|line| format!("{line}\n"))
                    .collect();
                if kept != text {
                    std::fs::write(&procs, kept)?;
                }
            }
            for child in self.subdirs(dir)? {
                self.take_pid_out(&dir.join(child), pid, except)?;
            }
            Ok(())
        }

        fn controllers_of(&self, dir: &Path) -> io::Result<BTreeSet<String>> {
            Ok(self
                .read(&dir.join("cgroup.controllers"))?
                .split_whitespace()
                .map(str::to_string)
                .collect())
        }

        fn add_controller_files(dir: &Path, controller: &str) -> io::Result<()> {
            let files: &[(&str, &str)] = match controller {
                "cpu" => &[("cpu.weight", "100\n"), ("cpu.max", "max 100000\n")],
                "memory" => &[
                    ("memory.max", "max\n"),
                    ("memory.high", "max\n"),
                    ("memory.current", "0\n"),
                    (
                        "memory.events",
                        "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
                    ),
                ],
                "pids" => &[("pids.max", "max\n"), ("pids.current", "0\n")],
                _ => &[],
            };
            for (name, content) in files {
                std::fs::write(dir.join(name), content)?;
            }
            if controller == "cpu" {
                std::fs::write(
                    dir.join("cpu.stat"),
                    "usage_usec 0\nuser_usec 0\nsystem_usec 0\nnr_periods 0\nnr_throttled 0\n\
                     throttled_usec 0\n",
                )?;
            }
            Ok(())
        }

        fn write_subtree_control(&self, dir: &Path, value: &str) -> io::Result<()> {
            let available = self.controllers_of(dir)?;
            let path = dir.join("cgroup.subtree_control");
            let mut enabled: BTreeSet<String> = std::fs::read_to_string(&path)?
                .split_whitespace()
                .map(str::to_string)
                .collect();
            let has_processes = dir != self.root
                && !std::fs::read_to_string(dir.join("cgroup.procs"))?
                    .trim()
                    .is_empty();
            for token in value.split_whitespace() {
                let (enable, name) = match token.split_at(1) {
                    ("+", name) => (true, name),
                    ("-", name) => (false, name),
                    _ => return Err(errno(Errno::EINVAL)),
                };
                if !available.contains(name) {
                    return Err(errno(Errno::ENOENT));
                }
                if enable && has_processes {
                    return Err(errno(Errno::EBUSY));
                }
                if enable && enabled.insert(name.to_string()) {
                    for child in self.subdirs(dir)? {
                        Self::add_controller_files(&dir.join(child), name)?;
                    }
                } else if !enable {
                    enabled.remove(name);
                }
            }
            let text: Vec<&str> = enabled.iter().map(String::as_str).collect();
            std::fs::write(path, format!("{}\n", text.join(" ")))
        }
    }

    impl CgroupFs for FakeCgroupFs {
        fn read(&self, path: &Path) -> io::Result<String> {
            let dir = path.parent().unwrap_or(path);
            if path.file_name() == Some("cgroup.controllers".as_ref()) && dir != self.root {
                if !dir.is_dir() {
                    return Err(errno(Errno::ENOENT));
                }
                let parent = dir.parent().ok_or_else(|| errno(Errno::ENOENT))?;
                return std::fs::read_to_string(parent.join("cgroup.subtree_control"));
            }
            std::fs::read_to_string(path)
        }

        fn write(&self, path: &Path, value: &str) -> io::Result<()> {
            if !path.is_file() {
                return Err(errno(Errno::ENOENT));
            }
            let dir = path.parent().unwrap_or(path);
            match path.file_name().and_then(|n| n.to_str()) {
                Some("cgroup.subtree_control") => self.write_subtree_control(dir, value),
                Some("cgroup.kill") => {
                    self.killed_cgroups.lock().unwrap().push(dir.to_path_buf());
                    Ok(())
                }
                Some("cgroup.procs") => {
                    self.take_pid_out(&self.root, value.trim(), path)?;
                    let mut procs = std::fs::read_to_string(path)?;
                    procs.push_str(value.trim());
                    procs.push('\n');
                    std::fs::write(path, procs)
                }
                _ => std::fs::write(path, value),
            }
        }

        fn mkdir(&self, path: &Path) -> io::Result<()> {
            std::fs::create_dir(path)?;
            let files = [
                ("cgroup.controllers", ""),
                ("cgroup.subtree_control", ""),
                ("cgroup.procs", ""),
                ("cgroup.events", "populated 0\nfrozen 0\n"),
                ("cgroup.kill", ""),
                ("cpu.stat", "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"),
            ];
            for (name, content) in files {
                std::fs::write(path.join(name), content)?;
            }
            for controller in self.controllers_of(path)? {
                Self::add_controller_files(path, &controller)?;
            }
            Ok(())
        }

        fn rmdir(&self, path: &Path) -> io::Result<()> {
            if !path.is_dir() {
                return Err(errno(Errno::ENOENT));
            }
            let events = std::fs::read_to_string(path.join("cgroup.events")).unwrap_or_default();
            if !self.subdirs(path)?.is_empty() || events.contains("populated 1") {
                return Err(errno(Errno::EBUSY));
            }
            std::fs::remove_dir_all(path)
        }

        fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
            HostFs.subdirs(path)
        }

        fn is_dir(&self, path: &Path) -> bool {
            path.is_dir()
        }

        fn exists(&self, path: &Path) -> bool {
            path.exists()
        }

        fn kill(&self, pid: i32) -> io::Result<()> {
            self.killed_pids.lock().unwrap().push(pid);
            Ok(())
        }

        fn xattr(&self, path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
            if !path.is_dir() {
                return Err(errno(Errno::ENOENT));
            }
            match std::fs::read(path.join(format!(".xattr.{name}"))) {
                Ok(value) => Ok(Some(value)),
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(error) => Err(error),
            }
        }
    }
}
