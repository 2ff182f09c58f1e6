//! A read-only look into a container's root filesystem before it runs: the snapshot's
//! mounts (what `Snapshots.Prepare` returned) mounted read-only, as containerd's
//! `WithReadonlyTempMount` does to read `/etc/passwd` for `WithUser`.
//!
//! The mount is made on a dedicated thread that first moves into a private mount
//! namespace of its own: no other thread or process ever sees it, and it vanishes with
//! the thread even if the agent dies meanwhile. Only the empty mount point, a directory
//! under the scratch directory the caller passes, exists on the node, and it is removed
//! after.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::containerd::types::Mount;

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("{what}: {errno}")]
    Sys { what: String, errno: Errno },
    #[error("create mount point {path}: {source}")]
    MountPoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("start the rootfs view thread: {0}")]
    Thread(std::io::Error),
    #[error("the rootfs view thread of {key} ended without an answer")]
    Lost { key: String },
}

fn sys(what: impl Into<String>) -> impl FnOnce(Errno) -> ViewError {
    let what = what.into();
    move |errno| ViewError::Sys { what, errno }
}

/// The options of an overlay mount made read-only as containerd's `readonlyOverlay`
/// makes them: no `upperdir` and `workdir`, the upper directory first of the lower ones.
/// The upper directory of a freshly prepared snapshot is empty, but a prepared key that
/// existed already may hold files.
fn read_only_overlay(options: &[String]) -> Vec<String> {
    let upper = options
        .iter()
        .find_map(|option| option.strip_prefix("upperdir="));
    options
        .iter()
        .filter(|option| !option.starts_with("upperdir=") && !option.starts_with("workdir="))
        .map(|option| match (option.strip_prefix("lowerdir="), upper) {
            (Some(lower), Some(upper)) => format!("lowerdir={upper}:{lower}"),
            _ => option.clone(),
        })
        .collect()
}

/// Flags and data of one mount, read-only and without devices or set-id programs.
fn mount_arguments(mount: &Mount) -> (MsFlags, Option<String>) {
    let base = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    if mount.r#type == "overlay" {
        return (base, Some(read_only_overlay(&mount.options).join(",")));
    }
    let bind = mount.r#type == "bind"
        || mount
            .options
            .iter()
            .any(|option| option == "bind" || option == "rbind");
    if bind {
        let recursive = mount.options.iter().any(|option| option == "rbind");
        let flags = if recursive {
            MsFlags::MS_BIND | MsFlags::MS_REC
        } else {
            MsFlags::MS_BIND
        };
        return (flags | base, None);
    }
    let data: Vec<&str> = mount
        .options
        .iter()
        .map(String::as_str)
        .filter(|option| !matches!(*option, "rw" | "ro"))
        .collect();
    (base, Some(data.join(",")).filter(|d| !d.is_empty()))
}

/// Runs on the dedicated thread: a private mount namespace, the mounts on `target`,
/// `read` on the result, and the mounts off again.
fn mount_and_read<T>(
    mounts: &[Mount],
    target: &Path,
    read: impl FnOnce(&Path) -> T,
) -> Result<T, ViewError> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNS)
        .map_err(sys("unshare a mount namespace for the rootfs view"))?;
    let none = None::<&str>;
    // Private, so that nothing mounted here propagates to the node's namespace.
    nix::mount::mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(sys("make the rootfs view's mount namespace private"))?;
    for mount in mounts {
        let (flags, data) = mount_arguments(mount);
        let kind = (!flags.contains(MsFlags::MS_BIND)).then_some(mount.r#type.as_str());
        let what = || {
            format!(
                "mount {} ({}) read-only on {}",
                mount.source,
                mount.r#type,
                target.display()
            )
        };
        nix::mount::mount(
            Some(mount.source.as_str()),
            target,
            kind,
            flags,
            data.as_deref(),
        )
        .map_err(sys(what()))?;
        if flags.contains(MsFlags::MS_BIND) {
            // A bind mount takes MS_RDONLY only on a remount.
            nix::mount::mount(
                none,
                target,
                none,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
                none,
            )
            .map_err(sys(what()))?;
        }
    }
    let result = read(target);
    // The namespace dies with the thread; unmounting first releases the layers at once.
    let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
    Ok(result)
}

/// Mounts the snapshot `key`'s `mounts` read-only under `scratch_dir` where only this call
/// sees them, and returns what `read` makes of the root directory.
pub async fn read_rootfs<T: Send + 'static>(
    scratch_dir: &Path,
    key: &str,
    mounts: Vec<Mount>,
    read: impl FnOnce(&Path) -> T + Send + 'static,
) -> Result<T, ViewError> {
    let target = scratch_dir.join(key);
    std::fs::create_dir_all(&target).map_err(|source| ViewError::MountPoint {
        path: target.clone(),
        source,
    })?;
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let thread_target = target.clone();
    // unshare() moves the calling thread into the new namespace for good, so this runs on
    // a thread of its own (never a tokio worker) that ends with the read.
    let spawned = std::thread::Builder::new()
        .name("rootfs-view".into())
        .spawn(move || {
            let _ = sender.send(mount_and_read(&mounts, &thread_target, read));
        });
    let result = match spawned {
        Ok(_) => receiver.await.unwrap_or_else(|_| {
            Err(ViewError::Lost {
                key: key.to_string(),
            })
        }),
        Err(error) => Err(ViewError::Thread(error)),
    };
    // Only the node's empty directory is left to remove: the mount never was in its
    // namespace.
    let _ = std::fs::remove_dir(&target);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(kind: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: kind.to_string(),
            source: kind.to_string(),
            target: String::new(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn overlays_lose_their_upper_and_work_dirs_and_keep_the_upper_as_a_lower() {
        let overlay = mount(
            "overlay",
            &[
                "index=off",
                "workdir=/s/3/work",
                "upperdir=/s/3/fs",
                "lowerdir=/s/2/fs:/s/1/fs",
            ],
        );
        assert_eq!(
            mount_arguments(&overlay),
            (
                MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                Some("index=off,lowerdir=/s/3/fs:/s/2/fs:/s/1/fs".to_string())
            )
        );
    }

    #[test]
    fn bind_mounts_are_read_only_binds() {
        let (flags, data) = mount_arguments(&mount("bind", &["rw", "rbind"]));
        assert!(flags.contains(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY));
        assert_eq!(data, None);
        let (flags, data) = mount_arguments(&mount("tmpfs", &["rw", "size=1m"]));
        assert!(!flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY));
        assert_eq!(data.as_deref(), Some("size=1m"));
    }
}
