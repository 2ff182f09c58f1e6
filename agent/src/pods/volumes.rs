//! A pod's volumes on the node: emptyDir (disk or tmpfs), hostPath (with its type checks),
//! configMap, secret (on tmpfs) and downwardAPI files, under
//! `<state_dir>/pods/<uid>/volumes/<name>`; and the bind mounts each container gets.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Volume};
use nix::mount::{MntFlags, MsFlags};

use super::env::{Objects, field_value};
use super::runtime::StartError;
use super::spec::BindMount;

/// One file of a projected volume: its path in the volume, content and mode.
type ProjectedFile = (String, Vec<u8>, Option<i32>);

fn config_error(message: String) -> StartError {
    StartError::new("CreateContainerConfigError", message)
}

/// The directory of a pod's state (volumes) on the node.
pub fn pod_dir(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join("pods").join(uid)
}

fn volume_dir(state_dir: &Path, uid: &str, name: &str) -> PathBuf {
    pod_dir(state_dir, uid).join("volumes").join(name)
}

fn mount_tmpfs(dir: &Path, size: Option<&str>) -> Result<(), StartError> {
    if crate::mountinfo::is_mount_point(dir) {
        return Ok(());
    }
    let options = size.map(|size| format!("size={size}"));
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        options.as_deref(),
    )
    .map_err(|errno| {
        StartError::new(
            "CreateContainerError",
            format!("mount tmpfs on {}: {errno}", dir.display()),
        )
    })
}

fn io_error(what: &str, path: &Path, error: std::io::Error) -> StartError {
    StartError::new(
        "CreateContainerError",
        format!("{what} {}: {error}", path.display()),
    )
}

/// Writes the projected files of a configMap, secret or downwardAPI volume: every key, or
/// only the listed items, with their modes.
fn write_files(dir: &Path, files: &[ProjectedFile], default_mode: i32) -> Result<(), StartError> {
    for (relative, content, mode) in files {
        if relative
            .split('/')
            .any(|part| part == ".." || part.is_empty())
        {
            return Err(config_error(format!(
                "volume file path {relative:?} must be relative and may not contain '..'"
            )));
        }
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_error("create", parent, e))?;
        }
        std::fs::write(&path, content).map_err(|e| io_error("write", &path, e))?;
        let mode = mode.unwrap_or(default_mode) as u32 & 0o7777;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_error("chmod", &path, e))?;
    }
    Ok(())
}

fn select_items(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    kind: &str,
    name: &str,
) -> Result<Vec<ProjectedFile>, StartError> {
    match items {
        None => Ok(data
            .into_iter()
            .map(|(key, value)| (key, value, None))
            .collect()),
        Some(items) => items
            .iter()
            .map(|item| {
                data.get(&item.key)
                    .map(|value| (item.path.clone(), value.clone(), item.mode))
                    .ok_or_else(|| {
                        config_error(format!(
                            "configuration of {kind} {name:?} has no key {:?}",
                            item.key
                        ))
                    })
            })
            .collect(),
    }
}

/// Makes one volume exist on the node; returns its host path.
async fn prepare_volume(
    volume: &Volume,
    pod: &Pod,
    dir: &Path,
    objects: &Objects<'_>,
    host_ip: &str,
    pod_ips: &[String],
) -> Result<PathBuf, StartError> {
    let create =
        |path: &Path| std::fs::create_dir_all(path).map_err(|e| io_error("create", path, e));
    if let Some(empty) = &volume.empty_dir {
        create(dir)?;
        if empty.medium.as_deref() == Some("Memory") {
            mount_tmpfs(dir, empty.size_limit.as_ref().map(|q| q.0.as_str()))?;
        }
        return Ok(dir.to_path_buf());
    }
    if let Some(host) = &volume.host_path {
        let path = PathBuf::from(&host.path);
        let kind = host.type_.as_deref().unwrap_or("");
        let meta = std::fs::metadata(&path);
        let problem = match (kind, &meta) {
            ("DirectoryOrCreate", Err(_)) => {
                std::fs::create_dir_all(&path).map_err(|e| io_error("create", &path, e))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).ok();
                None
            }
            ("FileOrCreate", Err(_)) => {
                if let Some(parent) = path.parent() {
                    create(parent)?;
                }
                std::fs::write(&path, b"").map_err(|e| io_error("create", &path, e))?;
                None
            }
            ("" | "DirectoryOrCreate" | "FileOrCreate", _) => None,
            (_, Err(_)) => Some("does not exist"),
            ("Directory", Ok(m)) if !m.is_dir() => Some("is not a directory"),
            ("File", Ok(m)) if !m.is_file() => Some("is not a file"),
            ("Socket", Ok(m)) if !m.file_type().is_socket() => Some("is not a socket"),
            ("CharDevice", Ok(m)) if !m.file_type().is_char_device() => {
                Some("is not a character device")
            }
            ("BlockDevice", Ok(m)) if !m.file_type().is_block_device() => {
                Some("is not a block device")
            }
            ("Directory" | "File" | "Socket" | "CharDevice" | "BlockDevice", Ok(_)) => None,
            (other, _) => {
                return Err(config_error(format!(
                    "volume {:?}: hostPath type {other:?} is not supported",
                    volume.name
                )));
            }
        };
        if let Some(problem) = problem {
            return Err(config_error(format!(
                "hostPath type check failed: {} {problem}",
                host.path
            )));
        }
        return Ok(path);
    }
    if let Some(source) = &volume.config_map {
        create(dir)?;
        let optional = source.optional.unwrap_or(false);
        let data = objects
            .config_map(&source.name, optional)
            .await?
            .unwrap_or_default();
        let data = data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        let files = select_items(data, source.items.as_ref(), "configmap", &source.name)?;
        write_files(dir, &files, source.default_mode.unwrap_or(0o644))?;
        return Ok(dir.to_path_buf());
    }
    if let Some(source) = &volume.secret {
        create(dir)?;
        // Secrets never touch the node's disk.
        mount_tmpfs(dir, None)?;
        let name = source.secret_name.clone().unwrap_or_default();
        let data = objects
            .secret(&name, source.optional.unwrap_or(false))
            .await?
            .unwrap_or_default();
        let files = select_items(data, source.items.as_ref(), "secret", &name)?;
        write_files(dir, &files, source.default_mode.unwrap_or(0o644))?;
        return Ok(dir.to_path_buf());
    }
    if let Some(source) = &volume.downward_api {
        create(dir)?;
        let mut files = Vec::new();
        for item in source.items.iter().flatten() {
            let value = match (&item.field_ref, &item.resource_field_ref) {
                (Some(field), _) => field_value(pod, &field.field_path, host_ip, pod_ips),
                _ => None,
            }
            .ok_or_else(|| {
                config_error(format!(
                    "volume {:?}: item {:?} has no supported fieldRef",
                    volume.name, item.path
                ))
            })?;
            files.push((item.path.clone(), value.into_bytes(), item.mode));
        }
        write_files(dir, &files, source.default_mode.unwrap_or(0o644))?;
        return Ok(dir.to_path_buf());
    }
    Err(config_error(format!(
        "volume {:?}: only emptyDir, hostPath, configMap, secret and downwardAPI volumes are supported",
        volume.name
    )))
}

/// Prepares every volume of the pod; returns name → host path.
pub async fn prepare(
    state_dir: &Path,
    pod: &Pod,
    objects: &Objects<'_>,
    host_ip: &str,
    pod_ips: &[String],
) -> Result<BTreeMap<String, PathBuf>, StartError> {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let mut paths = BTreeMap::new();
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let dir = volume_dir(state_dir, uid, &volume.name);
        let path = prepare_volume(volume, pod, &dir, objects, host_ip, pod_ips).await?;
        paths.insert(volume.name.clone(), path);
    }
    Ok(paths)
}

/// The container's volume mounts as bind mounts.
pub fn container_mounts(
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
) -> Result<Vec<BindMount>, StartError> {
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let base = volumes.get(&mount.name).ok_or_else(|| {
            config_error(format!(
                "container {}: volumeMount {:?} names no volume of the pod",
                container.name, mount.name
            ))
        })?;
        let source = match mount.sub_path.as_deref().filter(|p| !p.is_empty()) {
            Some(sub) => {
                if Path::new(sub).is_absolute() || sub.split('/').any(|part| part == "..") {
                    return Err(config_error(format!(
                        "container {}: subPath {sub:?} must be a relative path without '..'",
                        container.name
                    )));
                }
                let path = base.join(sub);
                if !path.exists() {
                    std::fs::create_dir_all(&path).map_err(|e| io_error("create", &path, e))?;
                }
                path
            }
            None => base.clone(),
        };
        mounts.push(BindMount {
            source,
            destination: mount.mount_path.clone(),
            read_only: mount.read_only.unwrap_or(false),
        });
    }
    Ok(mounts)
}

/// Unmounts and removes everything of the pod's volumes; idempotent.
pub fn remove(state_dir: &Path, uid: &str) -> std::io::Result<()> {
    let dir = pod_dir(state_dir, uid);
    let volumes = dir.join("volumes");
    if let Ok(entries) = std::fs::read_dir(&volumes) {
        for entry in entries.flatten() {
            let path = entry.path();
            if crate::mountinfo::is_mount_point(&path) {
                nix::mount::umount2(&path, MntFlags::MNT_DETACH).map_err(std::io::Error::from)?;
            }
        }
    }
    match std::fs::remove_dir_all(&dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}
