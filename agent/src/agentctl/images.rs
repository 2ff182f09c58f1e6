//! `agentctl image import | list | rm`: images in the agent's containerd namespace,
//! imported with the agent's own `ImageService`, listed without unpacking anything.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use serde::Serialize;
use tonic::Code;

use super::node::NodeFlags;
use super::table::{self, Table};
use super::{Format, print_json};
use crate::containerd::{Client, api::GetImageRequest, call_error};
use crate::image::manifest::{self, Index, MAX_MANIFEST_SIZE, Manifest};
use crate::image::{Descriptor, ImageError, ImageInfo, ImageService, Platform, Reference, content};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Imports an image archive (OCI layout tar as `skopeo copy ... oci-archive:FILE`
    /// writes, or a `docker save` / docker-archive tar) and unpacks it.
    Import {
        /// The archive.
        file: PathBuf,
        /// The name of an unnamed image, or the repository a bare tag in the archive
        /// belongs to (as `ctr import --base-name`).
        #[arg(long)]
        name: Option<String>,
    },
    /// The images of the namespace, with ID (config digest) and size (compressed layers).
    #[command(alias = "ls")]
    List,
    /// Removes image records; their content goes with containerd's next garbage
    /// collection unless something else holds it.
    #[command(alias = "remove")]
    Rm {
        /// Image names (`busybox:1` is `docker.io/library/busybox:1`).
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// One image as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageView {
    pub name: String,
    /// The config digest, the kubelet's `imageID` (tables print its first 12 hex
    /// digits, as docker and crictl do); `None` when the image's documents are
    /// not (all) in the content store.
    pub id: Option<String>,
    /// The compressed size of the layers for this platform.
    pub size: Option<i64>,
    /// The digest of what the record points at (an index or a manifest).
    pub digest: String,
    pub media_type: String,
}

#[derive(Serialize)]
struct ImageList<'a> {
    images: &'a [ImageView],
}

#[derive(Serialize)]
struct Removed<'a> {
    removed: &'a [String],
}

pub async fn run(flags: &NodeFlags, format: Format, command: ImageCommand) -> anyhow::Result<()> {
    let client = flags.containerd().await?;
    let socket = flags.containerd_socket.display();
    match command {
        ImageCommand::Import { file, name } => {
            let service = ImageService::new(client, Default::default());
            let imported = service
                .import_archive(&file, name.as_deref())
                .await
                .map_err(|error| image_error(&socket, error))?;
            let views: Vec<ImageView> = imported.iter().map(view_of_info).collect();
            print_images(format, &views)
        }
        ImageCommand::List => {
            let views = list(&client)
                .await
                .with_context(|| format!("containerd at {socket}"))?;
            print_images(format, &views)
        }
        ImageCommand::Rm { names } => {
            let service = ImageService::new(client.clone(), Default::default());
            let mut removed = Vec::new();
            for name in &names {
                let normalized = Reference::parse(name)?.to_string();
                if !exists(&client, &normalized)
                    .await
                    .with_context(|| format!("containerd at {socket}"))?
                {
                    anyhow::bail!("image {normalized}: not found");
                }
                service
                    .remove(&normalized)
                    .await
                    .map_err(|error| image_error(&socket, error))?;
                removed.push(normalized);
            }
            match format {
                Format::Json => print_json(&Removed { removed: &removed }),
                Format::Table => {
                    for name in &removed {
                        println!("removed {name}");
                    }
                    Ok(())
                }
            }
        }
    }
}

/// An image error; one that came from containerd names the socket first.
fn image_error(socket: &impl std::fmt::Display, error: ImageError) -> anyhow::Error {
    match error {
        ImageError::Containerd { .. } => anyhow::anyhow!("containerd at {socket}: {error}"),
        other => other.into(),
    }
}

fn view_of_info(info: &ImageInfo) -> ImageView {
    ImageView {
        name: info.name.clone(),
        id: Some(info.id.clone()),
        size: Some(info.size),
        digest: info.target.digest.clone(),
        media_type: info.target.media_type.clone(),
    }
}

fn print_images(format: Format, images: &[ImageView]) -> anyhow::Result<()> {
    match format {
        Format::Json => print_json(&ImageList { images }),
        Format::Table => {
            let mut out = Table::new(&["NAME", "ID", "SIZE"]);
            for image in images {
                out.row(vec![
                    image.name.clone(),
                    table::or_none(image.id.as_deref().map(short_id)),
                    table::or_none(image.size.map(|s| table::bytes(s.max(0) as u64))),
                ]);
            }
            print!("{}", out.render(""));
            Ok(())
        }
    }
}

/// The first 12 hex digits of a digest, as docker and crictl print image IDs.
fn short_id(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    hex.get(..12).unwrap_or(hex)
}

async fn exists(client: &Client, name: &str) -> anyhow::Result<bool> {
    let request = GetImageRequest {
        name: name.to_string(),
    };
    match client.images().get(request).await {
        Ok(_) => Ok(true),
        Err(status) if status.code() == Code::NotFound => Ok(false),
        Err(status) => Err(call_error("Images.Get")(status).into()),
    }
}

/// Every image record, described from the content store alone. Unlike
/// `ImageService::get`, which unpacks a missing snapshot, this writes nothing.
async fn list(client: &Client) -> anyhow::Result<Vec<ImageView>> {
    let service = ImageService::new(client.clone(), Default::default());
    let platform = Platform::host();
    let mut views = Vec::new();
    for record in service.list().await? {
        let (id, size) = match describe(client, &record.target, &platform).await? {
            Some((id, size)) => (Some(id), Some(size)),
            None => (None, None),
        };
        views.push(ImageView {
            name: record.name,
            id,
            size,
            digest: record.target.digest,
            media_type: record.target.media_type,
        });
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(views)
}

/// The config digest and the layers' size of the image at `target` for `platform`;
/// `None` when a document is missing or is not an image this node can run.
async fn describe(
    client: &Client,
    target: &Descriptor,
    platform: &Platform,
) -> anyhow::Result<Option<(String, i64)>> {
    let mut descriptor = target.clone();
    // An index may point at an index; four levels are more than any registry makes.
    for _ in 0..4 {
        let Some(Ok(bytes)) = content::read(client, &descriptor.digest, MAX_MANIFEST_SIZE).await?
        else {
            return Ok(None);
        };
        if manifest::is_manifest(&descriptor.media_type) {
            let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) else {
                return Ok(None);
            };
            let size = manifest.layers.iter().map(|layer| layer.size).sum();
            return Ok(Some((manifest.config.digest, size)));
        }
        if !manifest::is_index(&descriptor.media_type) {
            return Ok(None);
        }
        let Ok(index) = serde_json::from_slice::<Index>(&bytes) else {
            return Ok(None);
        };
        let Some(child) = manifest::select_manifest(&index, platform) else {
            return Ok(None);
        };
        descriptor = child.clone();
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids() {
        assert_eq!(short_id("sha256:46069f9d82484b63b064cd3d"), "46069f9d8248");
        assert_eq!(short_id("sha256:abc"), "abc");
    }
}
