//! Small OCI images built in Rust for tests, with no registry and no network: a first layer
//! of busybox-static (`/bin/busybox` and its applets as symlinks), more layers of files a
//! test chooses, and a config with Entrypoint, Cmd, Env and WorkingDir. Written as an OCI
//! image layout directory (what `skopeo copy oci:DIR:TAG` reads) or as an OCI archive tar.
//! Tars are deterministic (mtime 0, uid 0), so the same builder always gives the same
//! digests.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::require_tool;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The busybox applets linked into `/bin`.
pub const APPLETS: &[&str] = &[
    "sh", "ash", "echo", "sleep", "cat", "wget", "nc", "httpd", "ls", "env", "true", "false",
    "hostname", "id", "ps", "mkdir", "rm", "touch", "printf", "test", "grep", "sed", "head",
    "tail", "kill", "mount", "ip", "ifconfig", "date", "pwd", "uname", "sync", "wc", "tee",
];

enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
}

/// An image under construction.
pub struct ImageBuilder {
    layers: Vec<Vec<Entry>>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    working_dir: String,
    user: String,
}

/// Digests of a built image.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub manifest_digest: String,
    pub manifest_size: i64,
    pub config_digest: String,
    /// The compressed layers' digests, bottom first.
    pub layer_digests: Vec<String>,
    /// The uncompressed layers' digests, bottom first.
    pub diff_ids: Vec<String>,
    /// The chain ID of the top layer.
    pub chain_id: String,
}

/// Where the static busybox is; fails the test if it is missing or not static.
pub fn busybox_path() -> PathBuf {
    require_tool(
        "busybox",
        "install Debian's busybox-static (`cargo xtask deps`)",
    );
    let output = std::process::Command::new("sh")
        .args(["-c", "command -v busybox"])
        .output()
        .expect("find busybox");
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    let binary = std::fs::read(&path).expect("read busybox");
    assert!(
        is_static_elf(&binary),
        "{} is not statically linked: install busybox-static",
        path.display()
    );
    path
}

/// Whether an ELF64 binary has no program interpreter (PT_INTERP), i.e. is static.
fn is_static_elf(binary: &[u8]) -> bool {
    if binary.len() < 64 || &binary[..4] != b"\x7fELF" || binary[4] != 2 {
        return false;
    }
    let u16_at = |at: usize| u16::from_le_bytes([binary[at], binary[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(binary[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        binary.len() >= at + 4 && u32::from_le_bytes(binary[at..at + 4].try_into().unwrap()) != 3
    })
}

impl ImageBuilder {
    /// An image whose first layer is busybox, a minimal `/etc`, and the usual directories;
    /// Entrypoint none, Cmd `["sh"]`, a PATH in Env.
    pub fn busybox() -> Self {
        let busybox = std::fs::read(busybox_path()).expect("read busybox");
        let mut layer = Vec::new();
        for dir in [
            "bin", "dev", "etc", "proc", "root", "sys", "usr", "usr/bin", "var",
        ] {
            layer.push(Entry::Dir {
                path: dir.to_string(),
                mode: 0o755,
            });
        }
        layer.push(Entry::Dir {
            path: "tmp".to_string(),
            mode: 0o1777,
        });
        layer.push(Entry::File {
            path: "bin/busybox".to_string(),
            data: busybox,
            mode: 0o755,
        });
        for applet in APPLETS {
            layer.push(Entry::Symlink {
                path: format!("bin/{applet}"),
                target: "busybox".to_string(),
            });
        }
        layer.push(Entry::File {
            path: "etc/passwd".to_string(),
            data: b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
                .to_vec(),
            mode: 0o644,
        });
        layer.push(Entry::File {
            path: "etc/group".to_string(),
            data: b"root:x:0:\nnobody:x:65534:\n".to_vec(),
            mode: 0o644,
        });
        Self {
            layers: vec![layer],
            entrypoint: Vec::new(),
            cmd: vec!["sh".to_string()],
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ],
            working_dir: "/".to_string(),
            user: String::new(),
        }
    }

    /// Adds a layer holding `files` (path without leading '/', contents), mode 0644; their
    /// parent directories must exist in a lower layer or come earlier in the list.
    pub fn layer(mut self, files: &[(&str, &[u8])]) -> Self {
        let entries = files
            .iter()
            .map(|(path, data)| Entry::File {
                path: path.trim_start_matches('/').to_string(),
                data: data.to_vec(),
                mode: 0o644,
            })
            .collect();
        self.layers.push(entries);
        self
    }

    /// Adds a layer holding one directory.
    pub fn dir_layer(mut self, path: &str) -> Self {
        self.layers.push(vec![Entry::Dir {
            path: path.trim_start_matches('/').to_string(),
            mode: 0o755,
        }]);
        self
    }

    pub fn entrypoint(mut self, entrypoint: &[&str]) -> Self {
        self.entrypoint = entrypoint.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn env(mut self, variable: &str) -> Self {
        self.env.push(variable.to_string());
        self
    }

    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = dir.to_string();
        self
    }

    pub fn user(mut self, user: &str) -> Self {
        self.user = user.to_string();
        self
    }

    /// The image's files: `(path in the layout, contents)`, and its digests.
    fn build(&self, tag: &str) -> (Vec<(String, Vec<u8>)>, BuiltImage) {
        let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
        let mut diff_ids = Vec::new();
        let mut layer_descriptors = Vec::new();
        let mut layer_digests = Vec::new();
        for layer in &self.layers {
            let tar = layer_tar(layer);
            diff_ids.push(sha256(&tar));
            let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gzip.write_all(&tar).expect("gzip layer");
            let compressed = gzip.finish().expect("gzip layer");
            let digest = sha256(&compressed);
            layer_descriptors.push(json!({
                "mediaType": OCI_LAYER_GZIP,
                "digest": digest,
                "size": compressed.len(),
            }));
            layer_digests.push(digest);
            blobs.push((
                blob_path(&layer_digests[layer_digests.len() - 1]),
                compressed,
            ));
        }
        let mut runtime = json!({
            "Env": self.env,
            "Cmd": self.cmd,
            "WorkingDir": self.working_dir,
        });
        if !self.entrypoint.is_empty() {
            runtime["Entrypoint"] = json!(self.entrypoint);
        }
        if !self.user.is_empty() {
            runtime["User"] = json!(self.user);
        }
        let config = serde_json::to_vec(&json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": host_architecture(),
            "os": "linux",
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": self.layers.iter().map(|_| json!({"created": "1970-01-01T00:00:00Z", "created_by": "skiff integration::oci_image"})).collect::<Vec<_>>(),
        }))
        .expect("config JSON");
        let config_digest = sha256(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": layer_descriptors,
        }))
        .expect("manifest JSON");
        let manifest_digest = sha256(&manifest);
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        }))
        .expect("index JSON");
        let built = BuiltImage {
            manifest_size: manifest.len() as i64,
            manifest_digest: manifest_digest.clone(),
            config_digest: config_digest.clone(),
            chain_id: chain_id(&diff_ids),
            layer_digests,
            diff_ids,
        };
        blobs.push((blob_path(&config_digest), config));
        blobs.push((blob_path(&manifest_digest), manifest));
        let mut files = vec![
            (
                "oci-layout".to_string(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".to_string(), index),
        ];
        files.extend(blobs);
        (files, built)
    }

    /// Writes the image as an OCI layout directory, `tag` being its
    /// `org.opencontainers.image.ref.name`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> BuiltImage {
        let (files, built) = self.build(tag);
        for (path, data) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("create layout dir");
            std::fs::write(&path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        built
    }

    /// Writes the image as an OCI archive: the layout in a tar.
    pub fn write_archive(&self, path: &Path, tag: &str) -> BuiltImage {
        let (files, built) = self.build(tag);
        let mut archive = tar::Builder::new(Vec::new());
        let mut dirs = std::collections::BTreeSet::new();
        for (name, data) in &files {
            if let Some((dir, _)) = name.rsplit_once('/') {
                let mut prefix = String::new();
                for part in dir.split('/') {
                    prefix = if prefix.is_empty() {
                        part.to_string()
                    } else {
                        format!("{prefix}/{part}")
                    };
                    if dirs.insert(prefix.clone()) {
                        append(
                            &mut archive,
                            &Entry::Dir {
                                path: prefix.clone(),
                                mode: 0o755,
                            },
                        );
                    }
                }
            }
            append(
                &mut archive,
                &Entry::File {
                    path: name.clone(),
                    data: data.clone(),
                    mode: 0o644,
                },
            );
        }
        let bytes = archive.into_inner().expect("finish archive");
        std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        built
    }
}

fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for entry in entries {
        append(&mut tar, entry);
    }
    tar.into_inner().expect("finish layer tar")
}

fn append(tar: &mut tar::Builder<Vec<u8>>, entry: &Entry) {
    let mut header = tar::Header::new_ustar();
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    match entry {
        Entry::Dir { path, mode } => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(*mode);
            header.set_size(0);
            tar.append_data(&mut header, format!("{path}/"), std::io::empty())
                .expect("append directory");
        }
        Entry::File { path, data, mode } => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(*mode);
            header.set_size(data.len() as u64);
            tar.append_data(&mut header, path, data.as_slice())
                .expect("append file");
        }
        Entry::Symlink { path, target } => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            tar.append_link(&mut header, path, target)
                .expect("append symlink");
        }
    }
}

fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// The image spec's ChainID of a stack of diff IDs.
pub fn chain_id(diff_ids: &[String]) -> String {
    let mut chain = diff_ids[0].clone();
    for diff_id in &diff_ids[1..] {
        chain = sha256(format!("{chain} {diff_id}").as_bytes());
    }
    chain
}

fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_are_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let image = || ImageBuilder::busybox().layer(&[("etc/greeting", b"hi\n")]);
        let first = image().write_layout(&dir.path().join("a"), "v1");
        let second = image().write_archive(&dir.path().join("b.tar"), "v1");
        assert_eq!(first.manifest_digest, second.manifest_digest);
        assert_eq!(first.diff_ids.len(), 2);
        assert!(dir.path().join("a/index.json").exists());
        let blob = dir.path().join("a").join(blob_path(&first.config_digest));
        assert_eq!(sha256(&std::fs::read(blob).unwrap()), first.config_digest);
    }

    #[test]
    fn detects_static_binaries() {
        assert!(is_static_elf(&std::fs::read(busybox_path()).unwrap()));
        assert!(!is_static_elf(&std::fs::read("/bin/ls").unwrap()));
    }
}
