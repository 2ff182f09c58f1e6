//! The busybox image `up` imports and the pod bench runs, built here as an OCI archive:
//! one uncompressed layer of the host's static busybox with its applets as symlinks, a
//! minimal `/etc`, and a config whose Cmd is `sh`. No registry is reachable on these
//! machines, so the image is made from a Debian package instead of pulled.
//!
//! `integration::oci_image` builds richer images for tests, but xtask cannot depend on that
//! crate: it drags in the agent library, whose build needs `protoc`, and xtask must build
//! before `cargo xtask deps` has installed it. The archive names its image with containerd's
//! `io.containerd.image.name` annotation, so `ctr images import` files it under that name.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The image `up` imports and the bench's pods run. A tag other than `latest` makes
/// Kubernetes' default pull policy `IfNotPresent`, so the agent never asks a registry.
pub const BUSYBOX_IMAGE: &str = "skiff.local/busybox:static";

/// The busybox applets linked into `/bin`.
const APPLETS: &[&str] = &[
    "sh", "ash", "cat", "date", "echo", "env", "false", "grep", "head", "hostname", "id", "ip",
    "kill", "ls", "mkdir", "nc", "ping", "printf", "ps", "pwd", "rm", "sed", "sleep", "tail",
    "test", "top", "touch", "true", "uname", "wc", "wget",
];

/// Where the host's busybox is, failing unless it is a static binary.
fn busybox_path() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("busybox"))
                .find(|candidate| candidate.is_file())
        })
        .context("busybox is not on PATH: install Debian's busybox-static (`cargo xtask deps`)")?;
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    let binary = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    anyhow::ensure!(
        is_static_elf(&binary),
        "{} is not statically linked: install Debian's busybox-static",
        path.display()
    );
    Ok(path)
}

/// Whether an ELF64 binary has no program interpreter (PT_INTERP), i.e. is static.
fn is_static_elf(binary: &[u8]) -> bool {
    if binary.len() < 64 || &binary[..4] != b"\x7fELF" || binary[4] != 2 {
        return false;
    }
    let u16_at = |at: usize| usize::from(u16::from_le_bytes([binary[at], binary[at + 1]]));
    let Ok(phoff) = binary[0x20..0x28].try_into().map(u64::from_le_bytes) else {
        return false;
    };
    let (phoff, phentsize, phnum) = (phoff as usize, u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        binary.len() >= at + 4 && binary[at..at + 4] != [3, 0, 0, 0]
    })
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    // Deterministic: the same busybox always gives the same digests.
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn append_file(tar: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut header = header(tar::EntryType::Regular, mode, data.len() as u64);
    tar.append_data(&mut header, path, data)
        .expect("appending to an in-memory tar cannot fail");
}

/// The image's only layer, uncompressed.
fn layer(busybox: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (dir, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o755),
        ("root", 0o700),
        ("sys", 0o755),
        ("tmp", 0o1777),
        ("var", 0o755),
    ] {
        let mut header = header(tar::EntryType::Directory, mode, 0);
        tar.append_data(&mut header, format!("{dir}/"), std::io::empty())
            .expect("appending to an in-memory tar cannot fail");
    }
    append_file(&mut tar, "bin/busybox", busybox, 0o755);
    for applet in APPLETS {
        let mut header = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut header, format!("bin/{applet}"), "busybox")
            .expect("appending to an in-memory tar cannot fail");
    }
    append_file(
        &mut tar,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        0o644,
    );
    append_file(
        &mut tar,
        "etc/group",
        b"root:x:0:\nnobody:x:65534:\n",
        0o644,
    );
    tar.into_inner()
        .expect("finishing an in-memory tar cannot fail")
}

fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes the busybox image as an OCI archive (an OCI image layout in a tar) at `path`,
/// named [`BUSYBOX_IMAGE`].
pub fn write_busybox_archive(path: &Path) -> anyhow::Result<()> {
    let busybox = std::fs::read(busybox_path()?).context("read busybox")?;
    let layer = layer(&busybox);
    let diff_id = sha256(&layer);
    let config = serde_json::to_vec(&json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": host_architecture(),
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask"}],
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": diff_id,
            "size": layer.len(),
        }],
    }))?;
    let tag = BUSYBOX_IMAGE
        .rsplit_once(':')
        .map_or("latest", |(_, tag)| tag);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(&manifest),
            "size": manifest.len(),
            "annotations": {
                "org.opencontainers.image.ref.name": tag,
                "io.containerd.image.name": BUSYBOX_IMAGE,
            },
        }],
    }))?;

    let mut archive = tar::Builder::new(Vec::new());
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut header = header(tar::EntryType::Directory, 0o755, 0);
        archive
            .append_data(&mut header, dir, std::io::empty())
            .expect("appending to an in-memory tar cannot fail");
    }
    append_file(
        &mut archive,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    );
    append_file(&mut archive, "index.json", &index, 0o644);
    for blob in [&layer, &config, &manifest] {
        let name = format!("blobs/{}", sha256(blob).replacen(':', "/", 1));
        append_file(&mut archive, &name, blob, 0o644);
    }
    let bytes = archive
        .into_inner()
        .expect("finishing an in-memory tar cannot fail");
    std::fs::write(path, bytes).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_holds_a_layout_naming_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busybox.tar");
        write_busybox_archive(&path).unwrap();
        let mut archive = tar::Archive::new(std::fs::File::open(&path).unwrap());
        let mut names = Vec::new();
        let mut index = String::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            if name == "index.json" {
                std::io::Read::read_to_string(&mut entry, &mut index).unwrap();
            }
            names.push(name);
        }
        assert!(names.contains(&"oci-layout".to_string()));
        let blobs = names
            .iter()
            .filter(|n| n.starts_with("blobs/sha256/") && n.len() > "blobs/sha256/".len());
        assert_eq!(blobs.count(), 3);
        assert!(index.contains(BUSYBOX_IMAGE));
    }

    #[test]
    fn tells_static_binaries_apart() {
        assert!(!is_static_elf(&std::fs::read("/bin/ls").unwrap()));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }
}
