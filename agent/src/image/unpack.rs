//! Unpacking layers into committed snapshots named by chain ID (Prepare, Diff.Apply,
//! Commit per layer, as containerd's unpacker does), and container root filesystems as
//! active snapshots on top of them.

use std::collections::HashMap;
use std::time::Instant;

use containerd_client::tonic::Code;

use super::manifest::{self, Descriptor, ImageConfigFile, Manifest};
use super::{Context as _, ImageError, ImageService, LazyLease, content};
use crate::containerd::api::ApplyRequest;
use crate::containerd::api::snapshots::{
    CommitSnapshotRequest, MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest,
};
use crate::containerd::types::Mount;
use crate::containerd::{Client, call_error};

/// The label that makes containerd's garbage collector keep a snapshot no record refers to.
const GC_ROOT: &str = "containerd.io/gc.root";

impl ImageService {
    /// Whether the top layer of the image is a committed snapshot.
    pub(super) async fn is_unpacked(
        &self,
        name: &str,
        config: &ImageConfigFile,
    ) -> Result<bool, ImageError> {
        let chain = manifest::chain_ids(&config.rootfs.diff_ids);
        match chain.last() {
            Some(top) => self
                .snapshot_exists(top)
                .await
                .context(|| format!("image {name}")),
            None => Ok(false),
        }
    }

    async fn snapshot_exists(&self, key: &str) -> Result<bool, crate::containerd::Error> {
        let request = StatSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        };
        match self.client.snapshots().stat(request).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(call_error("Snapshots.Stat")(status)),
        }
    }

    /// Applies every layer whose chain is not yet committed, bottom first, and labels the
    /// config so the garbage collector keeps the top snapshot. Returns the top chain ID.
    pub(super) async fn unpack(
        &self,
        name: &str,
        manifest: &Manifest,
        config: &ImageConfigFile,
        lease: &LazyLease<'_>,
    ) -> Result<String, ImageError> {
        let context = || format!("unpack {name}");
        let diff_ids = &config.rootfs.diff_ids;
        let chain = manifest::chain_ids(diff_ids);
        let top = chain
            .last()
            .cloned()
            .ok_or_else(|| ImageError::invalid(name, "image has no layers"))?;
        let started = Instant::now();
        // Most images are either fully unpacked or not at all: look from the top down for
        // the highest committed chain, then apply what lies above it.
        let mut first_missing = chain.len();
        while first_missing > 0
            && !self
                .snapshot_exists(&chain[first_missing - 1])
                .await
                .context(context)?
        {
            first_missing -= 1;
        }
        if first_missing < chain.len() {
            let client = lease.client().await.context(context)?;
            for i in first_missing..chain.len() {
                // A concurrent unpack of the same layers in this agent goes first; then
                // there is nothing left to do here.
                let _in_flight = self.in_flight.lock(&format!("chain {}", chain[i])).await;
                if self.snapshot_exists(&chain[i]).await.context(context)? {
                    continue;
                }
                let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
                self.apply_layer(
                    client,
                    name,
                    &manifest.layers[i],
                    &diff_ids[i],
                    &chain[i],
                    parent,
                )
                .await?;
            }
            tracing::debug!(image = name, layers = chain.len() - first_missing,
                elapsed = ?started.elapsed(), "unpacked image");
        }
        let label = format!("{}.{}", content::GC_REF_SNAPSHOT, self.snapshotter);
        self.label(name, &manifest.config.digest, [(label, top.clone())].into())
            .await?;
        Ok(top)
    }

    async fn apply_layer(
        &self,
        client: &Client,
        name: &str,
        layer: &Descriptor,
        diff_id: &str,
        chain_id: &str,
        parent: &str,
    ) -> Result<(), ImageError> {
        let context = || format!("unpack {name}: layer {}", layer.digest);
        let key = format!("extract-{} {chain_id}", uuid::Uuid::new_v4().simple());
        let prepare = PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.clone(),
            parent: parent.to_string(),
            labels: HashMap::new(),
        };
        let mounts = client
            .snapshots()
            .prepare(prepare)
            .await
            .map_err(call_error("Snapshots.Prepare"))
            .context(context)?
            .into_inner()
            .mounts;
        let applied = async {
            let request = ApplyRequest {
                diff: Some(layer.to_containerd()),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            };
            let applied = client
                .diff()
                .apply(request)
                .await
                .map_err(call_error("Diff.Apply"))
                .context(context)?
                .into_inner()
                .applied
                .unwrap_or_default();
            if applied.digest != diff_id {
                return Err(ImageError::invalid(
                    name,
                    format!(
                        "layer {} unpacks to {}, the config says {diff_id}",
                        layer.digest, applied.digest
                    ),
                ));
            }
            let commit = CommitSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                name: chain_id.to_string(),
                key: key.clone(),
                labels: HashMap::new(),
            };
            match client.snapshots().commit(commit).await {
                Ok(_) => Ok(true),
                // Another unpack of the same layers got there first.
                Err(status) if status.code() == Code::AlreadyExists => Ok(false),
                Err(status) => Err(call_error("Snapshots.Commit")(status)).context(context),
            }
        }
        .await;
        match applied {
            Ok(true) => {}
            Ok(false) | Err(_) => self.remove_snapshot(client, &key).await,
        }
        applied?;
        if layer.digest != diff_id {
            self.label(
                name,
                &layer.digest,
                [(content::LABEL_UNCOMPRESSED.to_string(), diff_id.to_string())].into(),
            )
            .await?;
        }
        Ok(())
    }

    async fn remove_snapshot(&self, client: &Client, key: &str) {
        let request = RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        };
        if let Err(status) = client.snapshots().remove(request).await
            && status.code() != Code::NotFound
        {
            tracing::warn!(key, error = %status.message(), "remove snapshot");
        }
    }

    /// Prepares the writable root filesystem `key` on top of the committed snapshot
    /// `chain_id` (an image's [`chain_id`](super::ImageInfo::chain_id)) and returns the
    /// mounts for `Tasks.Create`. Preparing an existing key returns its mounts.
    ///
    /// The snapshot is a garbage-collection root: it lives until [`remove_rootfs`]
    /// (a container record naming it as `snapshot_key` is not needed to keep it).
    ///
    /// [`remove_rootfs`]: ImageService::remove_rootfs
    pub async fn prepare_rootfs(
        &self,
        chain_id: &str,
        key: &str,
    ) -> Result<Vec<Mount>, ImageError> {
        let context = || format!("prepare rootfs {key}");
        let created = jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let request = PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
            parent: chain_id.to_string(),
            labels: [(GC_ROOT.to_string(), created.to_string())].into(),
        };
        match self.client.snapshots().prepare(request).await {
            Ok(response) => Ok(response.into_inner().mounts),
            Err(status) if status.code() == Code::AlreadyExists => {
                let request = MountsRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: key.to_string(),
                };
                let mounts = self
                    .client
                    .snapshots()
                    .mounts(request)
                    .await
                    .map_err(call_error("Snapshots.Mounts"))
                    .context(context)?;
                Ok(mounts.into_inner().mounts)
            }
            Err(status) => Err(call_error("Snapshots.Prepare")(status)).context(context),
        }
    }

    /// Removes the root filesystem `key`; a missing one is success.
    pub async fn remove_rootfs(&self, key: &str) -> Result<(), ImageError> {
        let request = RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        };
        match self.client.snapshots().remove(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(call_error("Snapshots.Remove")(status))
                .context(|| format!("remove rootfs {key}")),
        }
    }
}
