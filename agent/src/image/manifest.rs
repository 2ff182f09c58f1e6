//! The image formats: OCI and Docker schema 2 manifests, indexes (manifest lists) and image
//! configs, as lenient serde types; platform selection; digests and layer chain IDs.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYER_NONDISTRIBUTABLE: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar";
pub const OCI_LAYER_NONDISTRIBUTABLE_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_MANIFEST_SCHEMA1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_FOREIGN_GZIP: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// The annotation an OCI layout's `index.json` names an image (or just its tag) with.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd's exporter puts the full image name in.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";

/// The manifest media types a registry is asked for, best first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Manifests and configs larger than this are refused, as registries do (4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;

pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

pub fn is_layer(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_LAYER
            | OCI_LAYER_GZIP
            | OCI_LAYER_ZSTD
            | OCI_LAYER_NONDISTRIBUTABLE
            | OCI_LAYER_NONDISTRIBUTABLE_GZIP
            | DOCKER_LAYER
            | DOCKER_LAYER_GZIP
            | DOCKER_LAYER_FOREIGN_GZIP
    )
}

/// A content descriptor as manifests and indexes carry them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

impl Descriptor {
    pub fn to_containerd(&self) -> crate::containerd::types::Descriptor {
        crate::containerd::types::Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: self.annotations.clone(),
        }
    }

    pub fn from_containerd(descriptor: &crate::containerd::types::Descriptor) -> Self {
        Self {
            media_type: descriptor.media_type.clone(),
            digest: descriptor.digest.clone(),
            size: descriptor.size,
            annotations: descriptor.annotations.clone(),
            platform: None,
            urls: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine, in OCI's names (`linux/amd64`, `linux/arm64`).
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Self {
            architecture: architecture.to_string(),
            os: std::env::consts::OS.to_string(),
            variant: None,
        }
    }

    /// Whether an image for `other` runs here. A variant is compared only when both sides
    /// name one (amd64 and arm64 images rarely do).
    pub fn matches(&self, other: &Platform) -> bool {
        let normalize = |arch: &str| match arch {
            "x86_64" | "x86-64" => "amd64".to_string(),
            "aarch64" => "arm64".to_string(),
            other => other.to_string(),
        };
        self.os == other.os
            && normalize(&self.architecture) == normalize(&other.architecture)
            && match (&self.variant, &other.variant) {
                (Some(mine), Some(theirs)) => mine == theirs,
                _ => true,
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// An image index or manifest list.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// The parts of an image config the agent runs a container with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<RuntimeConfig>,
    #[serde(default)]
    pub rootfs: RootFs,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// The `config` object of an image config: how a container of the image starts. Docker
/// writes `null` for absent lists, which read as empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    #[serde(default, deserialize_with = "null_as_default")]
    pub entrypoint: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub cmd: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub working_dir: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub user: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub stop_signal: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: HashMap<String, String>,
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// The media type of a manifest-like document: the declared one if any (a registry's
/// `Content-Type` or the document's `mediaType`), else guessed from its fields as
/// containerd does for OCI documents that omit it.
pub fn detect_media_type(declared: Option<&str>, body: &[u8]) -> Option<String> {
    let declared = declared
        .map(|value| value.split(';').next().unwrap_or("").trim().to_string())
        .filter(|value| {
            is_index(value)
                || is_manifest(value)
                || value == DOCKER_MANIFEST_SCHEMA1
                || value == DOCKER_MANIFEST_SCHEMA1_SIGNED
        });
    if declared.is_some() {
        return declared;
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        config: Option<serde_json::Value>,
        fs_layers: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(body).ok()?;
    if let Some(media_type) = probe.media_type {
        return Some(media_type);
    }
    if probe.manifests.is_some() {
        Some(OCI_INDEX.to_string())
    } else if probe.config.is_some() {
        Some(OCI_MANIFEST.to_string())
    } else if probe.fs_layers.is_some() {
        Some(DOCKER_MANIFEST_SCHEMA1.to_string())
    } else {
        None
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Whether `data` has `digest`. Only sha256 is computed; other algorithms never verify.
pub fn verify_digest(digest: &str, data: &[u8]) -> bool {
    digest.starts_with("sha256:") && sha256_digest(data) == digest
}

/// The chain IDs of a stack of layers: the first layer's diff ID, then
/// `sha256(parent_chain + " " + diff_id)` for each layer above (the image spec's ChainID).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => sha256_digest(format!("{parent} {diff_id}").as_bytes()),
        };
        chain.push(next);
    }
    chain
}

/// Picks the manifest for `platform` from an index: an exact platform match first, then an
/// entry that declares no platform (whose config is checked later). Attestation manifests
/// (`unknown/unknown`) never match.
pub fn select_manifest<'a>(index: &'a Index, platform: &Platform) -> Option<&'a Descriptor> {
    let candidates = || {
        index.manifests.iter().filter(|descriptor| {
            is_manifest(&descriptor.media_type) || is_index(&descriptor.media_type)
        })
    };
    candidates()
        .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
        .or_else(|| candidates().find(|d| d.platform.is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let diff_ids = vec![
            "sha256:a".to_string(),
            "sha256:b".to_string(),
            "sha256:c".to_string(),
        ];
        let chain = chain_ids(&diff_ids);
        assert_eq!(chain[0], "sha256:a");
        assert_eq!(chain[1], sha256_digest(b"sha256:a sha256:b"));
        assert_eq!(
            chain[2],
            sha256_digest(format!("{} sha256:c", chain[1]).as_bytes())
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn known_chain_id() {
        // Two empty layers: the diff ID of an empty tar (1024 zero bytes).
        let empty_tar = sha256_digest(&[0u8; 1024]);
        assert_eq!(
            empty_tar,
            "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
        );
        let chain = chain_ids(&[empty_tar.clone(), empty_tar.clone()]);
        assert_eq!(
            chain[1],
            sha256_digest(format!("{empty_tar} {empty_tar}").as_bytes())
        );
    }

    #[test]
    fn selects_the_host_platform() {
        let index: Index = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [
                {"mediaType": DOCKER_MANIFEST, "digest": "sha256:arm", "size": 1,
                 "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": "sha256:att", "size": 1,
                 "platform": {"architecture": "unknown", "os": "unknown"}},
                {"mediaType": DOCKER_MANIFEST, "digest": "sha256:amd", "size": 1,
                 "platform": {"architecture": "amd64", "os": "linux"}},
            ]
        }))
        .unwrap();
        let amd64 = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        };
        assert_eq!(
            select_manifest(&index, &amd64).unwrap().digest,
            "sha256:amd"
        );
        let arm64 = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: None,
        };
        assert_eq!(
            select_manifest(&index, &arm64).unwrap().digest,
            "sha256:arm"
        );
        let s390x = Platform {
            architecture: "s390x".into(),
            os: "linux".into(),
            variant: None,
        };
        assert!(select_manifest(&index, &s390x).is_none());
    }

    #[test]
    fn media_type_detection() {
        assert_eq!(
            detect_media_type(
                Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
                b"{}"
            )
            .as_deref(),
            Some(OCI_MANIFEST)
        );
        assert_eq!(
            detect_media_type(
                Some("application/json"),
                br#"{"schemaVersion":2,"manifests":[]}"#
            )
            .as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            detect_media_type(None, br#"{"schemaVersion":2,"config":{}}"#).as_deref(),
            Some(OCI_MANIFEST)
        );
        assert_eq!(detect_media_type(None, b"not json"), None);
    }

    #[test]
    fn docker_configs_with_nulls_parse() {
        let config: ImageConfigFile = serde_json::from_value(serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": null, "Cmd": ["sh"], "Env": null, "WorkingDir": "",
                       "User": "1000:1000", "Labels": null},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:a"]}
        }))
        .unwrap();
        let runtime = config.config.unwrap();
        assert!(runtime.entrypoint.is_empty());
        assert_eq!(runtime.cmd, ["sh"]);
        assert_eq!(runtime.user, "1000:1000");
        assert_eq!(config.rootfs.diff_ids, ["sha256:a"]);
    }
}
