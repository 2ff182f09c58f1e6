//! Images in containerd 1.6, which has no Transfer service: the agent pulls and imports
//! images itself, as `ctr` does. Blobs go into containerd's content store, an image record
//! names the top manifest, layers are unpacked into snapshots, and labels tell containerd's
//! garbage collector what keeps what:
//!
//! ```text
//! image record ──► index ──gc.ref.content.m.N──► manifest ──gc.ref.content.config──► config
//!                                                   └──gc.ref.content.l.N──► layers    │
//!                                          snapshot (top chain ID) ◄──gc.ref.snapshot.overlayfs
//! ```
//!
//! Everything a pull or import writes is held by a lease until the image record and the
//! labels hold it, so a garbage collection in between takes nothing.
//!
//! Start with [`ImageService::ensure`], which is what the kubelet's image manager does for a
//! container: honour `imagePullPolicy`, pull if needed, unpack, and answer with what a
//! container of the image needs ([`ImageInfo`]).

mod archive;
pub mod content;
pub mod keyring;
pub mod manifest;
pub mod reference;
pub mod registry;
mod unpack;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_client::tonic::Code;
use futures::{StreamExt as _, TryStreamExt as _};

pub use self::manifest::{Descriptor, Platform, RuntimeConfig};
use self::manifest::{ImageConfigFile, Index, MAX_MANIFEST_SIZE, Manifest};
pub use self::reference::{Reference, ReferenceError};
pub use self::registry::{Credentials, RegistryConfig};
use self::registry::{Registries, RegistryError, Repository};
use crate::containerd::api::{
    CreateImageRequest, DeleteImageRequest, GetImageRequest, Image, ListImagesRequest,
    UpdateImageRequest,
};
use crate::containerd::{self, Client, call_error};

/// The snapshotter images are unpacked with unless told otherwise.
pub const DEFAULT_SNAPSHOTTER: &str = "overlayfs";

/// How long a pull's lease outlives an agent that died during the pull.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);

/// Kubernetes' `imagePullPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The policy of a container: the one it names, else Kubernetes' default (`Always` for
    /// a `:latest` or untagged image without digest, `IfNotPresent` otherwise).
    pub fn for_container(policy: Option<&str>, image: &Reference) -> Result<Self, String> {
        match policy {
            Some(policy) => policy.parse(),
            None if image.digest.is_none()
                && image
                    .tag
                    .as_deref()
                    .is_none_or(|tag| tag == reference::DEFAULT_TAG) =>
            {
                Ok(PullPolicy::Always)
            }
            None => Ok(PullPolicy::IfNotPresent),
        }
    }
}

impl std::str::FromStr for PullPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "Always" => Ok(PullPolicy::Always),
            "IfNotPresent" => Ok(PullPolicy::IfNotPresent),
            "Never" => Ok(PullPolicy::Never),
            other => Err(format!("unknown image pull policy {other:?}")),
        }
    }
}

/// What a container of an image needs, as the kubelet reports and uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image record's name: the normalized reference (`docker.io/library/busybox:latest`).
    pub name: String,
    /// The config digest, which the kubelet reports as the container's `imageID`.
    pub id: String,
    /// `repository@digest` of the record's target (the kubelet's `imageRef`).
    pub repo_digest: String,
    /// What the record points at: an index or a manifest.
    pub target: Descriptor,
    /// The manifest for this platform.
    pub manifest: Descriptor,
    pub config: RuntimeConfig,
    /// The layers' uncompressed digests, bottom first.
    pub diff_ids: Vec<String>,
    /// The chain ID of the top layer: the committed snapshot a rootfs is prepared from.
    pub chain_id: String,
    /// The compressed size of the layers.
    pub size: i64,
}

/// An image record as `list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub target: Descriptor,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    InvalidReference(#[from] ReferenceError),
    /// The registry has no such repository, tag or manifest.
    #[error("pull {reference}: {reason}")]
    NotFound { reference: String, reason: String },
    /// The registry refused the agent (it has no credentials) or its token service did.
    #[error("pull {reference}: {reason}")]
    Unauthorized { reference: String, reason: String },
    #[error("pull {reference}: registry {registry} unreachable: {reason}")]
    Unreachable {
        reference: String,
        registry: String,
        reason: String,
    },
    /// Any other failed registry answer.
    #[error("pull {reference}: {reason}")]
    Registry { reference: String, reason: String },
    #[error("container image \"{reference}\" is not present with pull policy of Never")]
    NeverPull { reference: String },
    /// The image's documents are unusable: unsupported or malformed manifests, no
    /// manifest for this platform, layers that do not match the config.
    #[error("image {reference}: {reason}")]
    Invalid { reference: String, reason: String },
    #[error("import {}: {reason}", path.display())]
    Import { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Containerd {
        context: String,
        #[source]
        source: containerd::Error,
    },
}

impl ImageError {
    /// The kubelet's waiting reason for a container whose image failed this way.
    pub fn kubelet_reason(&self) -> &'static str {
        match self {
            ImageError::InvalidReference(_) => "InvalidImageName",
            ImageError::NeverPull { .. } => "ErrImageNeverPull",
            _ => "ErrImagePull",
        }
    }

    fn from_registry(reference: &Reference, error: RegistryError) -> Self {
        let reference = reference.to_string();
        match error {
            RegistryError::NotFound(reason) => ImageError::NotFound { reference, reason },
            RegistryError::Unauthorized(reason) => ImageError::Unauthorized { reference, reason },
            RegistryError::Unreachable { registry, reason } => ImageError::Unreachable {
                reference,
                registry,
                reason,
            },
            RegistryError::Other(reason) => ImageError::Registry { reference, reason },
        }
    }

    fn invalid(reference: impl ToString, reason: impl Into<String>) -> Self {
        ImageError::Invalid {
            reference: reference.to_string(),
            reason: reason.into(),
        }
    }
}

/// Adds context to containerd errors: `.context(|| format!("pull {reference}"))`.
trait Context<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, ImageError>;
}

impl<T> Context<T> for Result<T, containerd::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, ImageError> {
        self.map_err(|source| ImageError::Containerd {
            context: context(),
            source,
        })
    }
}

/// A lease created on first use: an operation that finds everything in place writes
/// nothing and so never creates (nor deletes, which would schedule a GC) a lease.
struct LazyLease<'a> {
    client: &'a Client,
    leased: tokio::sync::OnceCell<Client>,
}

impl<'a> LazyLease<'a> {
    fn new(client: &'a Client) -> Self {
        Self {
            client,
            leased: tokio::sync::OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<&Client, containerd::Error> {
        self.leased
            .get_or_try_init(|| async {
                let id = format!("skiff-{}", uuid::Uuid::new_v4());
                let id = self.client.create_lease(&id, LEASE_EXPIRY).await?;
                self.client.with_lease(&id)
            })
            .await
    }

    /// Deletes the lease if one was made; what it held is kept only by labels and records.
    async fn release(self) -> Result<(), containerd::Error> {
        match self.leased.get().and_then(Client::lease) {
            Some(id) => self.client.delete_lease(id).await,
            None => Ok(()),
        }
    }
}

/// Pulls, imports, unpacks and looks up images in one containerd namespace.
pub struct ImageService {
    client: Client,
    registries: Registries,
    snapshotter: String,
    platform: Platform,
    /// Serializes work on one blob digest or chain ID across concurrent pulls of this
    /// service: a second pull waits here and then finds the work done, instead of waiting
    /// on containerd's ingest lock, whose server-side retries sleep up to a second.
    in_flight: KeyedLocks,
}

/// One async mutex per key, created on demand and dropped when nobody holds or awaits it.
#[derive(Default)]
struct KeyedLocks {
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let lock = self
            .locks
            .lock()
            .expect("keyed locks")
            .entry(key.to_string())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        KeyedGuard {
            locks: self,
            key: key.to_string(),
            lock,
            guard: Some(guard),
        }
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.locks.lock().expect("keyed locks");
        // The map's reference and ours: nobody else holds or awaits this key.
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.key);
        }
    }
}

impl ImageService {
    pub fn new(client: Client, registry: RegistryConfig) -> Self {
        Self {
            client,
            registries: Registries::new(registry),
            snapshotter: DEFAULT_SNAPSHOTTER.to_string(),
            platform: Platform::host(),
            in_flight: KeyedLocks::default(),
        }
    }

    pub fn with_snapshotter(mut self, snapshotter: &str) -> Self {
        self.snapshotter = snapshotter.to_string();
        self
    }

    pub fn with_platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// Makes `image` present and unpacked as `policy` says, and describes it.
    /// `Always` asks the registry every time (a no-op when nothing changed);
    /// `IfNotPresent` pulls only a missing image; `Never` fails with
    /// [`ImageError::NeverPull`] when it is missing.
    pub async fn ensure(&self, image: &str, policy: PullPolicy) -> Result<ImageInfo, ImageError> {
        let reference = Reference::parse(image)?;
        if policy != PullPolicy::Always
            && let Some(info) = self.local(&reference).await?
        {
            return Ok(info);
        }
        if policy == PullPolicy::Never {
            return Err(ImageError::NeverPull {
                reference: reference.to_string(),
            });
        }
        self.pull_reference(&reference, &[]).await
    }

    /// Pulls `image` from its registry and unpacks it.
    pub async fn pull(&self, image: &str) -> Result<ImageInfo, ImageError> {
        self.pull_reference(&Reference::parse(image)?, &[]).await
    }

    /// Pulls `image` with the credentials the pod's pull secrets hold for its registry
    /// ([`keyring::Keyring::lookup`]), each tried in turn until one pull succeeds, as the
    /// kubelet tries them; the last failure is returned. None means an anonymous pull.
    pub async fn pull_with_credentials(
        &self,
        image: &str,
        credentials: &[Credentials],
    ) -> Result<ImageInfo, ImageError> {
        self.pull_reference(&Reference::parse(image)?, credentials)
            .await
    }

    /// The image if its record exists and everything it needs is in the content store;
    /// unpacks it if its snapshots are missing.
    pub async fn get(&self, image: &str) -> Result<Option<ImageInfo>, ImageError> {
        self.local(&Reference::parse(image)?).await
    }

    /// Every image record of the namespace.
    pub async fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let images = self
            .client
            .images()
            .list(ListImagesRequest {
                filters: Vec::new(),
            })
            .await
            .map_err(call_error("Images.List"))
            .context(|| "list images".to_string())?
            .into_inner()
            .images;
        Ok(images
            .into_iter()
            .map(|image| ImageRecord {
                target: image
                    .target
                    .as_ref()
                    .map(Descriptor::from_containerd)
                    .unwrap_or_default(),
                name: image.name,
            })
            .collect())
    }

    /// Deletes an image record; its content and snapshots go with the next garbage
    /// collection unless another record keeps them. A missing image is success.
    pub async fn remove(&self, image: &str) -> Result<(), ImageError> {
        let name = Reference::parse(image)?.to_string();
        let request = DeleteImageRequest {
            name: name.clone(),
            sync: false,
            target: None,
        };
        match self.client.images().delete(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => {
                Err(call_error("Images.Delete")(status)).context(|| format!("remove image {name}"))
            }
        }
    }

    async fn local(&self, reference: &Reference) -> Result<Option<ImageInfo>, ImageError> {
        let name = reference.to_string();
        let Some(target) = self.record(&name).await? else {
            return Ok(None);
        };
        self.describe_local(reference, &target).await
    }

    /// The target of the record `name`, if there is one.
    async fn record(&self, name: &str) -> Result<Option<Descriptor>, ImageError> {
        let request = GetImageRequest {
            name: name.to_string(),
        };
        match self.client.images().get(request).await {
            Ok(response) => Ok(response
                .into_inner()
                .image
                .and_then(|image| image.target)
                .map(|target| Descriptor::from_containerd(&target))),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => {
                Err(call_error("Images.Get")(status)).context(|| format!("get image {name}"))
            }
        }
    }

    /// Describes an image whose documents are all in the content store, unpacking it if
    /// needed; `None` if some blob is missing.
    async fn describe_local(
        &self,
        reference: &Reference,
        target: &Descriptor,
    ) -> Result<Option<ImageInfo>, ImageError> {
        let name = reference.to_string();
        let mut descriptor = target.clone();
        let mut depth = 0;
        let manifest_bytes = loop {
            let Some(bytes) = self.read_document(&name, &descriptor).await? else {
                return Ok(None);
            };
            if manifest::is_manifest(&descriptor.media_type) {
                break bytes;
            }
            if !manifest::is_index(&descriptor.media_type) || depth == 4 {
                return Err(unsupported(&name, &descriptor.media_type));
            }
            let index: Index = parse_json(&name, "index", &bytes)?;
            descriptor = self.select(&name, &index)?.clone();
            depth += 1;
        };
        let manifest: Manifest = parse_json(&name, "manifest", &manifest_bytes)?;
        let Some(config_bytes) = self.read_document(&name, &manifest.config).await? else {
            return Ok(None);
        };
        let config: ImageConfigFile = parse_json(&name, "config", &config_bytes)?;
        check_layers(&name, &manifest, &config)?;
        // An unpacked image runs even if its layer blobs are gone; otherwise all are needed.
        if !self.is_unpacked(&name, &config).await? {
            for layer in &manifest.layers {
                let present = content::info(&self.client, &layer.digest)
                    .await
                    .context(|| format!("image {name}"))?;
                if present.is_none() {
                    return Ok(None);
                }
            }
        }
        let lease = LazyLease::new(&self.client);
        let unpacked = self.unpack(&name, &manifest, &config, &lease).await;
        lease
            .release()
            .await
            .context(|| format!("image {name}: release lease"))?;
        let chain_id = unpacked?;
        Ok(Some(image_info(
            reference,
            target,
            &descriptor,
            &manifest,
            config,
            chain_id,
        )))
    }

    /// Reads a manifest, index or config from the content store; `None` if absent.
    async fn read_document(
        &self,
        name: &str,
        descriptor: &Descriptor,
    ) -> Result<Option<Vec<u8>>, ImageError> {
        match content::read(&self.client, &descriptor.digest, MAX_MANIFEST_SIZE)
            .await
            .context(|| format!("image {name}: read {}", descriptor.digest))?
        {
            None => Ok(None),
            Some(Ok(bytes)) => Ok(Some(bytes)),
            Some(Err(size)) => Err(ImageError::invalid(
                name,
                format!(
                    "{} is {size} bytes, more than a manifest may be",
                    descriptor.digest
                ),
            )),
        }
    }

    fn select<'i>(&self, name: &str, index: &'i Index) -> Result<&'i Descriptor, ImageError> {
        manifest::select_manifest(index, &self.platform).ok_or_else(|| {
            ImageError::invalid(
                name,
                format!("no manifest for platform {} in the index", self.platform),
            )
        })
    }

    async fn pull_reference(
        &self,
        reference: &Reference,
        credentials: &[Credentials],
    ) -> Result<ImageInfo, ImageError> {
        let Some((last, first)) = credentials.split_last() else {
            return self.pull_once(reference, None).await;
        };
        for credentials in first {
            if let Ok(info) = self.pull_once(reference, Some(credentials)).await {
                return Ok(info);
            }
        }
        self.pull_once(reference, Some(last)).await
    }

    async fn pull_once(
        &self,
        reference: &Reference,
        credentials: Option<&Credentials>,
    ) -> Result<ImageInfo, ImageError> {
        let started = Instant::now();
        let lease = LazyLease::new(&self.client);
        let result = self.pull_leased(reference, credentials, &lease).await;
        let released = lease
            .release()
            .await
            .context(|| format!("pull {reference}: release lease"));
        let info = result?;
        released?;
        tracing::debug!(image = %reference, elapsed = ?started.elapsed(), "pulled image");
        Ok(info)
    }

    async fn pull_leased(
        &self,
        reference: &Reference,
        credentials: Option<&Credentials>,
        lease: &LazyLease<'_>,
    ) -> Result<ImageInfo, ImageError> {
        let name = reference.to_string();
        let repository = self.registries.repository(reference, credentials.cloned());
        let registry_error = |error| ImageError::from_registry(reference, error);
        let pull = || format!("pull {name}");

        // The top descriptor: known locally when the reference is a digest we already have.
        let local_top = match &reference.digest {
            Some(digest) => content::info(&self.client, digest).await.context(pull)?,
            None => None,
        };
        let (target, fetched_body) = match local_top {
            Some(info) => {
                let bytes = self
                    .read_document(
                        &name,
                        &Descriptor {
                            digest: info.digest.clone(),
                            ..Default::default()
                        },
                    )
                    .await?
                    .unwrap_or_default();
                let media_type = manifest::detect_media_type(None, &bytes)
                    .ok_or_else(|| ImageError::invalid(&name, "unknown manifest media type"))?;
                let descriptor = Descriptor {
                    media_type,
                    digest: info.digest,
                    size: info.size,
                    ..Default::default()
                };
                (descriptor, Some(bytes))
            }
            None => {
                let resolved = repository
                    .resolve(reference.object())
                    .await
                    .map_err(registry_error)?;
                (resolved.descriptor, resolved.body)
            }
        };

        // Walk index → manifest, storing each document.
        let mut descriptor = target.clone();
        let mut bytes = self
            .fetch_document(
                reference,
                &repository,
                &descriptor,
                fetched_body,
                true,
                lease,
            )
            .await?;
        let mut depth = 0;
        let manifest_bytes = loop {
            if manifest::is_manifest(&descriptor.media_type) {
                break bytes;
            }
            if !manifest::is_index(&descriptor.media_type) || depth == 4 {
                return Err(unsupported(&name, &descriptor.media_type));
            }
            let index: Index = parse_json(&name, "index", &bytes)?;
            let labels = index
                .manifests
                .iter()
                .enumerate()
                .map(|(i, child)| {
                    (
                        format!("{}.m.{i}", content::GC_REF_CONTENT),
                        child.digest.clone(),
                    )
                })
                .collect();
            let child = self.select(&name, &index)?.clone();
            // The child first, so the index's labels never name a blob that is not there.
            bytes = self
                .fetch_document(reference, &repository, &child, None, true, lease)
                .await?;
            self.label(&name, &descriptor.digest, labels).await?;
            descriptor = child;
            depth += 1;
        };
        let manifest: Manifest = parse_json(&name, "manifest", &manifest_bytes)?;
        let config_bytes = self
            .fetch_document(reference, &repository, &manifest.config, None, false, lease)
            .await?;
        let config: ImageConfigFile = parse_json(&name, "config", &config_bytes)?;
        check_layers(&name, &manifest, &config)?;
        if !config.os.is_empty()
            && !self.platform.matches(&Platform {
                architecture: config.architecture.clone(),
                os: config.os.clone(),
                variant: None,
            })
        {
            return Err(ImageError::invalid(
                &name,
                format!(
                    "image is for {}/{}, not {}",
                    config.os, config.architecture, self.platform
                ),
            ));
        }

        let started = Instant::now();
        let source = source_label(reference);
        // The fetches are built before they enter the stream: a closure over borrowed
        // layers there makes the whole pull future fail rustc's `Send` check (a known
        // higher-ranked lifetime limitation), and the agent spawns pulls.
        let fetches: Vec<_> = manifest
            .layers
            .iter()
            .map(|layer| self.fetch_layer(reference, &repository, layer, &source, lease))
            .collect();
        futures::stream::iter(fetches)
            .buffer_unordered(self.registries.config().max_concurrent_downloads.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        tracing::debug!(image = %name, elapsed = ?started.elapsed(), "fetched layers");

        let mut labels: HashMap<String, String> = [(
            format!("{}.config", content::GC_REF_CONTENT),
            manifest.config.digest.clone(),
        )]
        .into();
        for (i, layer) in manifest.layers.iter().enumerate() {
            labels.insert(
                format!("{}.l.{i}", content::GC_REF_CONTENT),
                layer.digest.clone(),
            );
        }
        self.label(&name, &descriptor.digest, labels).await?;
        self.set_record(&name, &target).await?;
        let chain_id = self.unpack(&name, &manifest, &config, lease).await?;
        Ok(image_info(
            reference,
            &target,
            &descriptor,
            &manifest,
            config,
            chain_id,
        ))
    }

    /// A manifest, index or config: read from the content store if there, else fetched
    /// (or taken from `fetched`), verified and written.
    async fn fetch_document(
        &self,
        reference: &Reference,
        repository: &Repository<'_>,
        descriptor: &Descriptor,
        fetched: Option<Vec<u8>>,
        is_manifest: bool,
        lease: &LazyLease<'_>,
    ) -> Result<Vec<u8>, ImageError> {
        let name = reference.to_string();
        let _in_flight = self.in_flight.lock(&descriptor.digest).await;
        if let Some(bytes) = self.read_document(&name, descriptor).await? {
            return Ok(bytes);
        }
        let bytes = match fetched {
            Some(bytes) => bytes,
            None => {
                let fetched = if is_manifest {
                    repository.fetch_manifest(descriptor).await
                } else {
                    repository.fetch_small_blob(descriptor).await
                };
                fetched.map_err(|error| ImageError::from_registry(reference, error))?
            }
        };
        let client = lease.client().await.context(|| format!("pull {name}"))?;
        let labels = [source_label(reference)].into();
        content::write_all(client, &descriptor.digest, &bytes, labels)
            .await
            .context(|| format!("pull {name}: write {}", descriptor.digest))?;
        Ok(bytes)
    }

    /// Streams a layer from the registry into the content store unless it is there.
    async fn fetch_layer(
        &self,
        reference: &Reference,
        repository: &Repository<'_>,
        layer: &Descriptor,
        source: &(String, String),
        lease: &LazyLease<'_>,
    ) -> Result<(), ImageError> {
        let pull = || format!("pull {reference}: layer {}", layer.digest);
        let _in_flight = self.in_flight.lock(&layer.digest).await;
        if content::info(&self.client, &layer.digest)
            .await
            .context(pull)?
            .is_some()
        {
            return Ok(());
        }
        if !layer.urls.is_empty() && layer.media_type == manifest::DOCKER_LAYER_FOREIGN_GZIP {
            return Err(ImageError::invalid(
                reference,
                "foreign layers are not supported",
            ));
        }
        let response = repository
            .fetch_blob(&layer.digest)
            .await
            .map_err(|error| ImageError::from_registry(reference, error))?;
        let client = lease.client().await.context(pull)?;
        let ingest = content::ingest_ref(&layer.digest);
        let Some(mut writer) =
            content::BlobWriter::open(client, &ingest, &layer.digest, layer.size)
                .await
                .context(pull)?
        else {
            return Ok(());
        };
        let streamed = async {
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk
                    .map_err(|e| ImageError::from_registry(reference, repository.body_error(e)))?;
                writer.write(&chunk).await.context(pull)?;
                if writer.written() > layer.size {
                    return Err(ImageError::Registry {
                        reference: reference.to_string(),
                        reason: format!(
                            "layer {} is larger than its {} bytes",
                            layer.digest, layer.size
                        ),
                    });
                }
            }
            let digest = writer.digest();
            if writer.written() != layer.size || digest != layer.digest {
                return Err(ImageError::Registry {
                    reference: reference.to_string(),
                    reason: format!(
                        "layer {}: got {} bytes with digest {digest}, expected {} bytes",
                        layer.digest,
                        writer.written(),
                        layer.size
                    ),
                });
            }
            Ok(())
        }
        .await;
        match streamed {
            Ok(()) => writer
                .commit(&layer.digest, [source.clone()].into())
                .await
                .context(pull),
            Err(error) => {
                drop(writer);
                content::abort(client, &ingest).await;
                Err(error)
            }
        }
    }

    /// Sets labels on a blob (labels create nothing, so no lease is needed).
    async fn label(
        &self,
        name: &str,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ImageError> {
        let context = || format!("image {name}: label {digest}");
        let current = content::info(&self.client, digest)
            .await
            .context(context)?
            .map(|info| info.labels)
            .unwrap_or_default();
        content::ensure_labels(&self.client, digest, &current, &labels)
            .await
            .context(context)
    }

    /// Creates the image record `name` → `target`, or points an existing one there.
    async fn set_record(&self, name: &str, target: &Descriptor) -> Result<(), ImageError> {
        let context = || format!("image {name}: record");
        if self.record(name).await?.is_some_and(|current| {
            current.digest == target.digest && current.media_type == target.media_type
        }) {
            return Ok(());
        }
        let image = Image {
            name: name.to_string(),
            target: Some(target.to_containerd()),
            ..Default::default()
        };
        let created = self
            .client
            .images()
            .create(CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            })
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => {
                // An empty mask replaces target and labels.
                let request = UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                };
                self.client
                    .images()
                    .update(request)
                    .await
                    .map_err(call_error("Images.Update"))
                    .context(context)?;
                Ok(())
            }
            Err(status) => Err(call_error("Images.Create")(status)).context(context),
        }
    }
}

fn unsupported(name: &str, media_type: &str) -> ImageError {
    let reason = if media_type == manifest::DOCKER_MANIFEST_SCHEMA1
        || media_type == manifest::DOCKER_MANIFEST_SCHEMA1_SIGNED
    {
        "Docker schema 1 manifests are not supported".to_string()
    } else {
        format!("unsupported manifest media type {media_type:?}")
    };
    ImageError::invalid(name, reason)
}

fn parse_json<T: serde::de::DeserializeOwned>(
    name: &str,
    what: &str,
    bytes: &[u8],
) -> Result<T, ImageError> {
    serde_json::from_slice(bytes)
        .map_err(|error| ImageError::invalid(name, format!("bad {what}: {error}")))
}

fn check_layers(
    name: &str,
    manifest: &Manifest,
    config: &ImageConfigFile,
) -> Result<(), ImageError> {
    if manifest.layers.is_empty() {
        return Err(ImageError::invalid(name, "image has no layers"));
    }
    if manifest.layers.len() != config.rootfs.diff_ids.len() {
        return Err(ImageError::invalid(
            name,
            format!(
                "manifest has {} layers, config has {} diff IDs",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            ),
        ));
    }
    if let Some(layer) = manifest
        .layers
        .iter()
        .find(|l| !manifest::is_layer(&l.media_type))
    {
        return Err(ImageError::invalid(
            name,
            format!(
                "layer {} has unsupported media type {:?}",
                layer.digest, layer.media_type
            ),
        ));
    }
    Ok(())
}

/// `containerd.io/distribution.source.<registry>=<path>`, as containerd labels pulled blobs.
fn source_label(reference: &Reference) -> (String, String) {
    (
        format!(
            "{}.{}",
            content::LABEL_DISTRIBUTION_SOURCE,
            reference.domain
        ),
        reference.path.clone(),
    )
}

fn image_info(
    reference: &Reference,
    target: &Descriptor,
    manifest_descriptor: &Descriptor,
    manifest: &Manifest,
    config_file: ImageConfigFile,
    chain_id: String,
) -> ImageInfo {
    ImageInfo {
        name: reference.to_string(),
        id: manifest.config.digest.clone(),
        repo_digest: reference.with_digest(&target.digest),
        target: strip(target),
        manifest: strip(manifest_descriptor),
        config: config_file.config.unwrap_or_default(),
        diff_ids: config_file.rootfs.diff_ids,
        chain_id,
        size: manifest.layers.iter().map(|layer| layer.size).sum(),
    }
}

/// A descriptor without the platform and URLs an index entry carried.
fn strip(descriptor: &Descriptor) -> Descriptor {
    Descriptor {
        media_type: descriptor.media_type.clone(),
        digest: descriptor.digest.clone(),
        size: descriptor.size,
        annotations: HashMap::new(),
        platform: None,
        urls: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pull_policy() {
        let policy = |image: &str| {
            PullPolicy::for_container(None, &Reference::parse(image).unwrap()).unwrap()
        };
        assert_eq!(policy("busybox"), PullPolicy::Always);
        assert_eq!(policy("busybox:latest"), PullPolicy::Always);
        assert_eq!(policy("busybox:1.36"), PullPolicy::IfNotPresent);
        assert_eq!(
            policy(
                "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            ),
            PullPolicy::IfNotPresent
        );
        let reference = Reference::parse("busybox").unwrap();
        assert_eq!(
            PullPolicy::for_container(Some("Never"), &reference),
            Ok(PullPolicy::Never)
        );
        assert!(PullPolicy::for_container(Some("Sometimes"), &reference).is_err());
    }

    #[test]
    fn kubelet_reasons() {
        let never = ImageError::NeverPull {
            reference: "docker.io/library/app:v1".into(),
        };
        assert_eq!(never.kubelet_reason(), "ErrImageNeverPull");
        assert_eq!(
            never.to_string(),
            "container image \"docker.io/library/app:v1\" is not present with pull policy of Never"
        );
        let invalid = ImageError::from(Reference::parse("Bad").unwrap_err());
        assert_eq!(invalid.kubelet_reason(), "InvalidImageName");
        let missing = ImageError::from_registry(
            &Reference::parse("localhost:5000/nope:1").unwrap(),
            RegistryError::NotFound("manifest unknown: manifest unknown (404)".into()),
        );
        assert_eq!(missing.kubelet_reason(), "ErrImagePull");
        assert_eq!(
            missing.to_string(),
            "pull localhost:5000/nope:1: manifest unknown: manifest unknown (404)"
        );
    }
}
