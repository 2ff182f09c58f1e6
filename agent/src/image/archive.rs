//! Importing image archives: an OCI image layout in a tar (what `skopeo copy ...
//! oci-archive:FILE:NAME` and `ctr export` write) or a `docker save` / `docker-archive`
//! tar, optionally gzip-compressed. The archive is read once, every file streamed into the
//! content store as it comes; the image structure is worked out afterwards from the store.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tokio::sync::mpsc;

use super::manifest::{self, Descriptor, Index, Manifest};
use super::{Context as _, ImageError, ImageInfo, ImageService, LazyLease, Reference, content};

/// Archive files read into memory rather than the content store.
const METADATA_FILES: [&str; 4] = ["oci-layout", "index.json", "manifest.json", "repositories"];

/// Files are read from the archive in pieces of this size.
const READ_CHUNK: usize = 256 << 10;

/// What the archive reader thread tells the importer.
enum Event {
    Metadata { path: String, data: Vec<u8> },
    Start { path: String, size: u64 },
    Data(Vec<u8>),
    End,
    Failed(String),
}

/// A blob of the archive as stored: its descriptor and whether it is gzip data.
struct Stored {
    digest: String,
    size: i64,
    gzip: bool,
}

/// One image the archive names.
struct Named {
    name: String,
    target: Descriptor,
}

impl ImageService {
    /// Imports every image of the archive at `path` and unpacks it; returns them in
    /// archive order.
    ///
    /// Names come from `io.containerd.image.name`, else `org.opencontainers.image.ref.name`
    /// (OCI) or `RepoTags` (Docker), normalized (`app:v1` is `docker.io/library/app:v1`).
    /// A bare word (`v1`) is a tag of `base_name` when one is given, as with
    /// `ctr import --base-name`, and an image name otherwise. An unnamed image is named
    /// `base_name`, or skipped without one.
    pub async fn import_archive(
        &self,
        path: &Path,
        base_name: Option<&str>,
    ) -> Result<Vec<ImageInfo>, ImageError> {
        let fail = |reason: String| ImageError::Import {
            path: path.to_path_buf(),
            reason,
        };
        let base = base_name.map(Reference::parse).transpose()?;
        let lease = LazyLease::new(&self.client);
        let result = self.import_leased(path, base.as_ref(), &lease).await;
        let released = lease
            .release()
            .await
            .context(|| format!("import {}: release lease", path.display()));
        let named = result?;
        released?;
        if named.is_empty() {
            return Err(fail(
                "the archive names no image (give a base name)".to_string(),
            ));
        }
        let mut images = Vec::with_capacity(named.len());
        for image in named {
            let reference = Reference::parse(&image.name)?;
            let info = self
                .describe_local(&reference, &image.target)
                .await?
                .ok_or_else(|| {
                    fail(format!(
                        "image {}: blobs missing from the archive",
                        image.name
                    ))
                })?;
            images.push(info);
        }
        Ok(images)
    }

    async fn import_leased(
        &self,
        path: &Path,
        base: Option<&Reference>,
        lease: &LazyLease<'_>,
    ) -> Result<Vec<Named>, ImageError> {
        let fail = |reason: String| ImageError::Import {
            path: path.to_path_buf(),
            reason,
        };
        let context = || format!("import {}", path.display());
        let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
        let (sender, mut events) = mpsc::channel(16);
        let reader = tokio::task::spawn_blocking(move || read_archive(file, &sender));

        let mut metadata: HashMap<String, Vec<u8>> = HashMap::new();
        let mut blobs: HashMap<String, Stored> = HashMap::new();
        while let Some(event) = events.recv().await {
            match event {
                Event::Metadata { path, data } => {
                    metadata.insert(path, data);
                }
                Event::Start {
                    path: file_path,
                    size,
                } => {
                    let stored = self
                        .import_file(path, &file_path, size, &mut events, lease)
                        .await?;
                    blobs.insert(file_path, stored);
                }
                Event::Failed(reason) => return Err(fail(reason)),
                Event::Data(_) | Event::End => {
                    return Err(fail("archive reader out of step".into()));
                }
            }
        }
        reader.await.map_err(|e| fail(e.to_string()))?;

        let named = if let Some(index) = metadata.get("index.json") {
            let index: Index =
                serde_json::from_slice(index).map_err(|e| fail(format!("bad index.json: {e}")))?;
            let unnamed = index
                .manifests
                .iter()
                .filter(|d| image_name(d).is_none())
                .count();
            let mut named = Vec::new();
            for descriptor in &index.manifests {
                let name = match (image_name(descriptor), base) {
                    (Some(name), base) => name_for(name, base)?,
                    (None, Some(base)) if unnamed == 1 => base.to_string(),
                    (None, _) => continue,
                };
                named.push(Named {
                    name,
                    target: descriptor.clone(),
                });
            }
            named
        } else if let Some(docker_manifest) = metadata.get("manifest.json") {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "PascalCase")]
            struct Entry {
                config: String,
                #[serde(default)]
                repo_tags: Option<Vec<String>>,
                layers: Vec<String>,
            }
            let entries: Vec<Entry> = serde_json::from_slice(docker_manifest)
                .map_err(|e| fail(format!("bad manifest.json: {e}")))?;
            let mut named = Vec::new();
            for entry in entries {
                let stored = |file: &str| {
                    blobs.get(normalize_path(file).as_str()).ok_or_else(|| {
                        fail(format!(
                            "manifest.json names {file}, which is not in the archive"
                        ))
                    })
                };
                let config = stored(&entry.config)?;
                let mut layers = Vec::with_capacity(entry.layers.len());
                for layer in &entry.layers {
                    let blob = stored(layer)?;
                    layers.push(Descriptor {
                        media_type: if blob.gzip {
                            manifest::DOCKER_LAYER_GZIP
                        } else {
                            manifest::DOCKER_LAYER
                        }
                        .to_string(),
                        digest: blob.digest.clone(),
                        size: blob.size,
                        ..Default::default()
                    });
                }
                let image_manifest = Manifest {
                    schema_version: 2,
                    media_type: Some(manifest::DOCKER_MANIFEST.to_string()),
                    config: Descriptor {
                        media_type: manifest::DOCKER_CONFIG.to_string(),
                        digest: config.digest.clone(),
                        size: config.size,
                        ..Default::default()
                    },
                    layers,
                    annotations: HashMap::new(),
                };
                let bytes = serde_json::to_vec(&image_manifest).expect("a manifest serializes");
                let target = Descriptor {
                    media_type: manifest::DOCKER_MANIFEST.to_string(),
                    digest: manifest::sha256_digest(&bytes),
                    size: bytes.len() as i64,
                    ..Default::default()
                };
                let leased = lease.client().await.context(context)?;
                content::write_all(leased, &target.digest, &bytes, HashMap::new())
                    .await
                    .context(context)?;
                let tags = entry.repo_tags.unwrap_or_default();
                if tags.is_empty()
                    && let Some(base) = base
                {
                    named.push(Named {
                        name: base.to_string(),
                        target: target.clone(),
                    });
                }
                for tag in tags {
                    named.push(Named {
                        name: name_for(&tag, base)?,
                        target: target.clone(),
                    });
                }
            }
            named
        } else {
            return Err(fail(
                "neither an OCI layout (index.json) nor a Docker archive (manifest.json)".into(),
            ));
        };

        for image in &named {
            self.label_tree(&image.name, &image.target, 0).await?;
            self.set_record(&image.name, &image.target).await?;
        }
        Ok(named)
    }

    /// Streams one archive file into the content store and returns where it went.
    async fn import_file(
        &self,
        archive: &Path,
        file_path: &str,
        size: u64,
        events: &mut mpsc::Receiver<Event>,
        lease: &LazyLease<'_>,
    ) -> Result<Stored, ImageError> {
        let fail = |reason: String| ImageError::Import {
            path: archive.to_path_buf(),
            reason,
        };
        let context = || format!("import {}: {file_path}", archive.display());
        // OCI layouts name blobs by digest; Docker archives do not, so the digest is
        // learnt while writing.
        let expected = file_path
            .strip_prefix("blobs/")
            .and_then(|rest| rest.split_once('/'))
            .map(|(algorithm, hex)| format!("{algorithm}:{hex}"))
            .filter(|digest| super::reference::validate_digest(digest).is_ok())
            .unwrap_or_default();
        let ingest = if expected.is_empty() {
            format!("skiff-import-{}", uuid::Uuid::new_v4().simple())
        } else {
            content::ingest_ref(&expected)
        };
        let client = lease.client().await.context(context)?;
        let mut writer = content::BlobWriter::open(client, &ingest, &expected, size as i64)
            .await
            .context(context)?;
        let mut head: Vec<u8> = Vec::with_capacity(2);
        let outcome = async {
            loop {
                match events.recv().await {
                    Some(Event::Data(data)) => {
                        if head.len() < 2 {
                            head.extend(data.iter().take(2 - head.len()));
                        }
                        if let Some(writer) = writer.as_mut() {
                            writer.write(&data).await.context(context)?;
                        }
                    }
                    Some(Event::End) => return Ok(()),
                    Some(Event::Failed(reason)) => return Err(fail(reason)),
                    _ => return Err(fail(format!("{file_path}: archive ended early"))),
                }
            }
        }
        .await;
        let gzip = head == [0x1f, 0x8b];
        match (outcome, writer) {
            (Err(error), Some(_)) => {
                content::abort(client, &ingest).await;
                Err(error)
            }
            (Err(error), None) => Err(error),
            // Already in the store.
            (Ok(()), None) => Ok(Stored {
                digest: expected,
                size: size as i64,
                gzip,
            }),
            (Ok(()), Some(writer)) => {
                let digest = writer.digest();
                if !expected.is_empty() && digest != expected {
                    content::abort(client, &ingest).await;
                    return Err(fail(format!("{file_path} has digest {digest}")));
                }
                writer
                    .commit(&digest, HashMap::new())
                    .await
                    .context(context)?;
                Ok(Stored {
                    digest,
                    size: size as i64,
                    gzip,
                })
            }
        }
    }

    /// Sets the garbage-collection labels of an index or manifest and of the children
    /// that are present, so the image record keeps them all.
    async fn label_tree(
        &self,
        name: &str,
        descriptor: &Descriptor,
        depth: u32,
    ) -> Result<(), ImageError> {
        let Some(bytes) = self.read_document(name, descriptor).await? else {
            return Ok(());
        };
        let mut labels = HashMap::new();
        if manifest::is_index(&descriptor.media_type) && depth < 4 {
            let index: Index = super::parse_json(name, "index", &bytes)?;
            for (i, child) in index.manifests.iter().enumerate() {
                if content::info(&self.client, &child.digest)
                    .await
                    .context(|| format!("image {name}"))?
                    .is_some()
                {
                    labels.insert(
                        format!("{}.m.{i}", content::GC_REF_CONTENT),
                        child.digest.clone(),
                    );
                    Box::pin(self.label_tree(name, child, depth + 1)).await?;
                }
            }
        } else if manifest::is_manifest(&descriptor.media_type) {
            let image_manifest: Manifest = super::parse_json(name, "manifest", &bytes)?;
            labels.insert(
                format!("{}.config", content::GC_REF_CONTENT),
                image_manifest.config.digest.clone(),
            );
            for (i, layer) in image_manifest.layers.iter().enumerate() {
                labels.insert(
                    format!("{}.l.{i}", content::GC_REF_CONTENT),
                    layer.digest.clone(),
                );
            }
        }
        if labels.is_empty() {
            return Ok(());
        }
        self.label(name, &descriptor.digest, labels).await
    }
}

/// The name an OCI index entry gives its image, if any.
fn image_name(descriptor: &Descriptor) -> Option<&str> {
    descriptor
        .annotations
        .get(manifest::ANNOTATION_IMAGE_NAME)
        .or_else(|| descriptor.annotations.get(manifest::ANNOTATION_REF_NAME))
        .map(String::as_str)
        .filter(|name| !name.is_empty())
}

/// A full reference stays as it is (normalized); a bare word is a tag of `base` if given.
fn name_for(name: &str, base: Option<&Reference>) -> Result<String, ImageError> {
    let text = match base {
        Some(base) if !name.contains(['/', ':', '@']) => format!("{}:{name}", base.repository()),
        _ => name.to_string(),
    };
    Ok(Reference::parse(&text)?.to_string())
}

fn normalize_path(path: &str) -> String {
    let mut path = path;
    loop {
        if let Some(rest) = path.strip_prefix("./") {
            path = rest;
        } else if let Some(rest) = path.strip_prefix('/') {
            path = rest;
        } else {
            return path.to_string();
        }
    }
}

/// Runs on a blocking thread: reads the (maybe gzip-compressed) tar and sends its files.
fn read_archive(file: std::fs::File, events: &mpsc::Sender<Event>) {
    if let Err(reason) = read_archive_inner(file, events) {
        let _ = events.blocking_send(Event::Failed(reason));
    }
}

fn read_archive_inner(mut file: std::fs::File, events: &mpsc::Sender<Event>) -> Result<(), String> {
    let mut magic = [0u8; 2];
    let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    std::io::Seek::rewind(&mut file).map_err(|e| e.to_string())?;
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let mut archive = tar::Archive::new(reader);
    let closed = || "importer stopped".to_string();
    for entry in archive.entries().map_err(|e| format!("read tar: {e}"))? {
        let mut entry = entry.map_err(|e| format!("read tar: {e}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = normalize_path(&entry.path().map_err(|e| e.to_string())?.to_string_lossy());
        // Old `docker save` layouts carry per-layer `json` and `VERSION` files nobody reads.
        if path.ends_with("/json") || path.ends_with("/VERSION") {
            continue;
        }
        let size = entry.size();
        if METADATA_FILES.contains(&path.as_str()) {
            if size > manifest::MAX_MANIFEST_SIZE {
                return Err(format!("{path} is {size} bytes"));
            }
            let mut data = Vec::with_capacity(size as usize);
            entry
                .read_to_end(&mut data)
                .map_err(|e| format!("read {path}: {e}"))?;
            events
                .blocking_send(Event::Metadata { path, data })
                .map_err(|_| closed())?;
            continue;
        }
        events
            .blocking_send(Event::Start {
                path: path.clone(),
                size,
            })
            .map_err(|_| closed())?;
        loop {
            let mut chunk = vec![0u8; READ_CHUNK];
            let n = entry
                .read(&mut chunk)
                .map_err(|e| format!("read {path}: {e}"))?;
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            events
                .blocking_send(Event::Data(chunk))
                .map_err(|_| closed())?;
        }
        events.blocking_send(Event::End).map_err(|_| closed())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let base = Reference::parse("localhost/app").unwrap();
        assert_eq!(name_for("v1", Some(&base)).unwrap(), "localhost/app:v1");
        assert_eq!(name_for("v1", None).unwrap(), "docker.io/library/v1:latest");
        assert_eq!(
            name_for("busybox:1.36", Some(&base)).unwrap(),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(
            name_for("localhost:5000/x/y:z", None).unwrap(),
            "localhost:5000/x/y:z"
        );
        assert!(name_for("Bad:tag", None).is_err());
    }

    #[test]
    fn paths() {
        assert_eq!(normalize_path("./blobs/sha256/ab"), "blobs/sha256/ab");
        assert_eq!(normalize_path("/index.json"), "index.json");
        assert_eq!(normalize_path("abc/layer.tar"), "abc/layer.tar");
    }
}
