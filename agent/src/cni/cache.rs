//! The results cache, like libcni's: one JSON file per attachment (network, container id,
//! interface) under `<cache_dir>/results/`, holding the ADD result, the configuration and
//! the arguments ADD ran with. DEL and CHECK read the result back as `prevResult`; after an
//! agent restart it tells which attachments exist and the pod IPs they got; GC deletes the
//! ones no longer wanted.
//!
//! File names are `<network>:<container id>:<ifname>`. None of the three can hold a `:`
//! (the spec's patterns for the first two, the interface name rules for the third), so a
//! name stands for one attachment only; the fields inside are what is read back, though.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Attachment;
use super::config::NetworkConfigList;
use super::error::CniError;
use super::result::CniResult;

const KIND: &str = "cniCacheV1";

/// An attachment the cache knows: ADD succeeded for it and no DEL since.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedAttachment {
    /// The configuration ADD ran with.
    pub network: NetworkConfigList,
    pub attachment: Attachment,
    /// The result of ADD, in the network's version.
    pub result: CniResult,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheFile {
    kind: String,
    container_id: String,
    if_name: String,
    network_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns: Option<PathBuf>,
    #[serde(default)]
    cni_args: Vec<(String, String)>,
    #[serde(default)]
    capability_args: Map<String, Value>,
    config: Value,
    result: Value,
}

fn results_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("results")
}

pub(crate) fn path(cache_dir: &Path, network: &str, container_id: &str, ifname: &str) -> PathBuf {
    results_dir(cache_dir).join(format!("{network}:{container_id}:{ifname}"))
}

fn cache_error(path: &Path, reason: impl std::fmt::Display) -> CniError {
    CniError::Cache {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Writes the entry atomically (a crash leaves the old file or the new one).
pub(crate) fn write(cache_dir: &Path, entry: &CachedAttachment) -> Result<(), CniError> {
    let attachment = &entry.attachment;
    let path = path(
        cache_dir,
        &entry.network.name,
        &attachment.container_id,
        &attachment.ifname,
    );
    let file = CacheFile {
        kind: KIND.into(),
        container_id: attachment.container_id.clone(),
        if_name: attachment.ifname.clone(),
        network_name: entry.network.name.clone(),
        netns: attachment.netns.clone(),
        cni_args: attachment.cni_args.clone(),
        capability_args: attachment.capability_args.clone(),
        config: entry.network.to_value(),
        result: entry.result.raw().clone(),
    };
    let dir = results_dir(cache_dir);
    std::fs::create_dir_all(&dir).map_err(|e| cache_error(&dir, format!("create: {e}")))?;
    let bytes = serde_json::to_vec(&file).map_err(|e| cache_error(&path, e))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temp, bytes).map_err(|e| cache_error(&temp, format!("write: {e}")))?;
    std::fs::rename(&temp, &path).map_err(|e| cache_error(&path, format!("rename: {e}")))
}

fn decode(path: &Path, bytes: &[u8]) -> Result<CachedAttachment, CniError> {
    let file: CacheFile = serde_json::from_slice(bytes).map_err(|e| cache_error(path, e))?;
    if file.kind != KIND {
        return Err(cache_error(path, format!("unknown kind {:?}", file.kind)));
    }
    let network = NetworkConfigList::from_list_value(file.config, &path.display().to_string())?;
    let result = CniResult::from_value(file.result)
        .map_err(|reason| cache_error(path, format!("result: {reason}")))?;
    Ok(CachedAttachment {
        result: result.convert_to(&network.cni_version),
        network,
        attachment: Attachment {
            container_id: file.container_id,
            ifname: file.if_name,
            netns: file.netns,
            cni_args: file.cni_args,
            capability_args: file.capability_args,
        },
    })
}

/// The cached attachment, `None` when there is none.
pub(crate) fn read(
    cache_dir: &Path,
    network: &str,
    container_id: &str,
    ifname: &str,
) -> Result<Option<CachedAttachment>, CniError> {
    let path = path(cache_dir, network, container_id, ifname);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cache_error(&path, format!("read: {e}"))),
    };
    let entry = decode(&path, &bytes)?;
    let a = &entry.attachment;
    if entry.network.name != network || a.container_id != container_id || a.ifname != ifname {
        return Err(cache_error(&path, "holds another attachment"));
    }
    Ok(Some(entry))
}

/// Deletes the entry; a missing one is fine.
pub(crate) fn remove(
    cache_dir: &Path,
    network: &str,
    container_id: &str,
    ifname: &str,
) -> Result<(), CniError> {
    let path = path(cache_dir, network, container_id, ifname);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(cache_error(&path, format!("remove: {e}")))
        }
        _ => Ok(()),
    }
}

/// Every readable entry, in file name order. An unreadable one is logged and skipped: one
/// bad file must not hide the others from GC or adoption.
pub(crate) fn list(cache_dir: &Path) -> Result<Vec<CachedAttachment>, CniError> {
    let dir = results_dir(cache_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(cache_error(&dir, format!("read directory: {e}"))),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        match std::fs::read(&path)
            .map_err(|e| cache_error(&path, format!("read: {e}")))
            .and_then(|bytes| decode(&path, &bytes))
        {
            Ok(entry) => out.push(entry),
            Err(err) => tracing::warn!(error = %err, "skipping an unreadable results cache entry"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry(container_id: &str) -> CachedAttachment {
        let network = NetworkConfigList::from_bytes(
            br#"{"cniVersion": "1.0.0", "name": "pods", "plugins": [{"type": "bridge"}]}"#,
        )
        .unwrap();
        let mut attachment = Attachment::new(container_id, "eth0", Some("/run/ns/x".into()));
        attachment.cni_args = vec![("K8S_POD_NAME".into(), "web".into())];
        attachment
            .capability_args
            .insert("portMappings".into(), json!([{"hostPort": 80}]));
        let result = CniResult::from_value(json!({
            "cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}],
        }))
        .unwrap();
        CachedAttachment {
            network,
            attachment,
            result,
        }
    }

    #[test]
    fn write_read_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path(), "pods", "c1", "eth0").unwrap(), None);
        assert!(list(dir.path()).unwrap().is_empty());
        let first = entry("c1");
        write(dir.path(), &first).unwrap();
        write(dir.path(), &entry("c2")).unwrap();
        let back = read(dir.path(), "pods", "c1", "eth0").unwrap().unwrap();
        assert_eq!(back.attachment, first.attachment);
        assert_eq!(back.result, first.result);
        assert_eq!(back.network.plugins, first.network.plugins);
        assert!(
            path(dir.path(), "pods", "c1", "eth0").ends_with("results/pods:c1:eth0"),
            "{:?}",
            path(dir.path(), "pods", "c1", "eth0")
        );
        // A corrupt entry is skipped by list and an error for read.
        std::fs::write(path(dir.path(), "pods", "c3", "eth0"), "{").unwrap();
        let ids: Vec<_> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|e| e.attachment.container_id)
            .collect();
        assert_eq!(ids, ["c1", "c2"]);
        assert!(read(dir.path(), "pods", "c3", "eth0").is_err());
        remove(dir.path(), "pods", "c1", "eth0").unwrap();
        remove(dir.path(), "pods", "c1", "eth0").unwrap();
        assert_eq!(read(dir.path(), "pods", "c1", "eth0").unwrap(), None);
    }
}
