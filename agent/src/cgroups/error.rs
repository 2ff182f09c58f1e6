//! The one error type of the cgroup manager; every message names the path or object and
//! the operation that failed.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// A cgroup operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A read, write, mkdir, rmdir or listing of a cgroup file or directory failed.
    #[error("{op} {}: {}", path.display(), describe_io(cause))]
    Io {
        /// What was done: `read`, `write`, `create`, `remove`, `list`.
        op: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    /// No cgroup2 file system appears in the mount table that was read.
    #[error("find the cgroup2 mount in {}: no cgroup2 file system is mounted", mountinfo.display())]
    NoCgroup2Mount { mountinfo: PathBuf },
    /// A cgroup file held something the kernel never writes there.
    #[error("parse {}: {what}", path.display())]
    Parse { path: PathBuf, what: String },
    /// A resource quantity of the pod is not a Kubernetes quantity.
    #[error("parse quantity {value:?} of {field}: {reason}")]
    Quantity {
        /// Where it was found, e.g. `container app limits.memory`.
        field: String,
        value: String,
        reason: &'static str,
    },
    /// A name that would not stay one directory below its parent.
    #[error("use {name:?} as the {what} of a cgroup: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    /// The pod has no `metadata.uid`, so it has no cgroup name.
    #[error("find the cgroup of pod {name}: the pod has no metadata.uid")]
    PodWithoutUid { name: String },
    /// The named container is not in the pod's spec.
    #[error("find container {container} in pod {pod}: it is not in the pod spec")]
    NoSuchContainer { pod: String, container: String },
    /// Signalling a process of a cgroup (when there is no `cgroup.kill`) failed.
    #[error("kill process {pid} of cgroup {}: {}", cgroup.display(), describe_io(cause))]
    Kill {
        pid: i32,
        cgroup: PathBuf,
        cause: io::Error,
    },
    /// The processes of a cgroup were killed but the cgroup never became empty.
    #[error(
        "empty cgroup {}: it still holds processes {waited:?} after they were killed",
        cgroup.display()
    )]
    NotEmptied { cgroup: PathBuf, waited: Duration },
}

impl CgroupError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, cause: io::Error) -> Self {
        CgroupError::Io {
            op,
            path: path.into(),
            cause,
        }
    }

    /// The OS error behind an `Io` or `Kill` error, if that is what this is.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            CgroupError::Io { cause, .. } | CgroupError::Kill { cause, .. } => cause.raw_os_error(),
            _ => None,
        }
    }
}

/// An I/O error as a lowercase phrase without the "(os error N)" tail, so that messages
/// read "write .../cpu.weight: no such file or directory".
pub(crate) fn describe_io(error: &io::Error) -> String {
    let text = match error.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => error.to_string(),
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_operation_and_path_in_lowercase() {
        let error = CgroupError::io(
            "write",
            "/sys/fs/cgroup/unified/skiff/kubepods/cpu.weight",
            io::Error::from_raw_os_error(libc_enoent()),
        );
        assert_eq!(
            error.to_string(),
            "write /sys/fs/cgroup/unified/skiff/kubepods/cpu.weight: no such file or directory"
        );
        assert_eq!(error.raw_os_error(), Some(libc_enoent()));
    }

    fn libc_enoent() -> i32 {
        nix::errno::Errno::ENOENT as i32
    }
}
