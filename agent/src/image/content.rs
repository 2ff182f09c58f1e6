//! containerd's content store as the image code uses it: blob info and reads, streaming
//! writes verified against an expected digest and size, and the labels that tell
//! containerd's garbage collector what a blob refers to.

use std::collections::HashMap;
use std::time::Duration;

use containerd_client::tonic::{Code, Status};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::containerd::api::{
    AbortRequest, Info, InfoRequest, ReadContentRequest, UpdateRequest, WriteAction,
    WriteContentRequest,
};
use crate::containerd::{Client, Error, call_error};

/// Data is sent to containerd in messages of about this size.
const WRITE_CHUNK: usize = 1 << 20;

/// How long a write waits for another writer of the same blob (containerd locks an ingest
/// ref while a write holds it) before giving up.
const LOCKED_WAIT: Duration = Duration::from_secs(300);

/// The label prefix that makes containerd's garbage collector keep a blob's children.
pub const GC_REF_CONTENT: &str = "containerd.io/gc.ref.content";
/// The label prefix that makes it keep a snapshot (`.<snapshotter>` follows).
pub const GC_REF_SNAPSHOT: &str = "containerd.io/gc.ref.snapshot";
/// The label recording a compressed layer's uncompressed digest (its diff ID).
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// The label prefix recording which repository a blob came from (`.<registry>` follows).
pub const LABEL_DISTRIBUTION_SOURCE: &str = "containerd.io/distribution.source";

/// The blob's info, or `None` if the namespace has no such blob.
pub async fn info(client: &Client, digest: &str) -> Result<Option<Info>, Error> {
    let request = InfoRequest {
        digest: digest.to_string(),
    };
    match client.content().info(request).await {
        Ok(response) => Ok(response.into_inner().info),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(call_error("Content.Info")(status)),
    }
}

/// Reads a whole blob, or `None` if it is absent. Blobs larger than `max_size` are refused
/// with `Ok(Err(size))` so a caller names the blob in its own error.
pub async fn read(
    client: &Client,
    digest: &str,
    max_size: u64,
) -> Result<Option<Result<Vec<u8>, i64>>, Error> {
    let Some(info) = info(client, digest).await? else {
        return Ok(None);
    };
    if info.size < 0 || info.size as u64 > max_size {
        return Ok(Some(Err(info.size)));
    }
    let request = ReadContentRequest {
        digest: digest.to_string(),
        offset: 0,
        size: 0,
    };
    let mut stream = match client.content().read(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::NotFound => return Ok(None),
        Err(status) => return Err(call_error("Content.Read")(status)),
    };
    let mut data = Vec::with_capacity(info.size as usize);
    while let Some(chunk) = stream.message().await.map_err(call_error("Content.Read"))? {
        data.extend_from_slice(&chunk.data);
    }
    Ok(Some(Ok(data)))
}

/// Sets `labels` on a blob, sending only those that differ from what it has.
pub async fn ensure_labels(
    client: &Client,
    digest: &str,
    current: &HashMap<String, String>,
    labels: &HashMap<String, String>,
) -> Result<(), Error> {
    let changed: HashMap<String, String> = labels
        .iter()
        .filter(|(key, value)| current.get(*key) != Some(*value))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let paths = changed.keys().map(|key| format!("labels.{key}")).collect();
    let request = UpdateRequest {
        info: Some(Info {
            digest: digest.to_string(),
            labels: changed,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask { paths }),
    };
    client
        .content()
        .update(request)
        .await
        .map_err(call_error("Content.Update"))?;
    Ok(())
}

/// The ingest ref a blob is written under. A stable name lets a second writer of the same
/// blob wait for the first instead of writing it twice.
pub fn ingest_ref(digest: &str) -> String {
    format!("skiff-{digest}")
}

/// Writes a small blob held in memory in one message.
pub async fn write_all(
    client: &Client,
    digest: &str,
    data: &[u8],
    labels: HashMap<String, String>,
) -> Result<(), Error> {
    match BlobWriter::open(client, &ingest_ref(digest), digest, data.len() as i64).await? {
        None => Ok(()),
        Some(mut writer) => {
            writer.write(data).await?;
            writer.commit(digest, labels).await
        }
    }
}

/// Drops a partly written ingest, so a failed write leaves nothing behind.
pub async fn abort(client: &Client, reference: &str) {
    let request = AbortRequest {
        r#ref: reference.to_string(),
    };
    if let Err(status) = client.content().abort(request).await
        && status.code() != Code::NotFound
    {
        tracing::debug!(reference, error = %status.message(), "abort content ingest");
    }
}

/// One streaming `Content.Write`: the data goes out in ~1 MiB messages while a task drains
/// containerd's per-message answers, so the stream never stalls on flow control.
pub struct BlobWriter {
    reference: String,
    requests: mpsc::Sender<WriteContentRequest>,
    /// `None` once the call has ended and its status was collected.
    responses: Option<tokio::task::JoinHandle<Result<(), Status>>>,
    total: i64,
    offset: i64,
    buffer: Vec<u8>,
    hasher: Sha256,
}

impl BlobWriter {
    /// Opens a write of `total` bytes (0 if unknown) under ingest ref `reference`.
    /// `expected` (may be empty) is the digest the blob must have; if the store already
    /// has it, there is nothing to write and `None` is returned.
    pub async fn open(
        client: &Client,
        reference: &str,
        expected: &str,
        total: i64,
    ) -> Result<Option<Self>, Error> {
        let deadline = tokio::time::Instant::now() + LOCKED_WAIT;
        let mut wait = Duration::from_millis(10);
        loop {
            let (requests, receiver) = mpsc::channel(4);
            let first = WriteContentRequest {
                action: WriteAction::Stat as i32,
                r#ref: reference.to_string(),
                total,
                expected: expected.to_string(),
                ..Default::default()
            };
            requests
                .try_send(first)
                .expect("a fresh channel has room for the first message");
            let opened = async {
                let mut stream = client
                    .content()
                    .write(ReceiverStream::new(receiver))
                    .await?
                    .into_inner();
                // The answer to the STAT message: the ingest is ours from here on.
                stream.message().await?;
                Ok::<_, Status>(stream)
            }
            .await;
            match opened {
                Ok(mut stream) => {
                    let responses = tokio::spawn(async move {
                        while stream.message().await?.is_some() {}
                        Ok(())
                    });
                    return Ok(Some(Self {
                        reference: reference.to_string(),
                        requests,
                        responses: Some(responses),
                        total,
                        offset: 0,
                        buffer: Vec::with_capacity(WRITE_CHUNK),
                        hasher: Sha256::new(),
                    }));
                }
                Err(status) if status.code() == Code::AlreadyExists => return Ok(None),
                // Another writer holds the ref ("ref ... locked"): wait for it, then find
                // the blob present. Other Unavailable errors (containerd gone) fail at once.
                Err(status)
                    if status.code() == Code::Unavailable
                        && status.message().contains("locked")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                Err(status) => return Err(call_error("Content.Write")(status)),
            }
        }
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> i64 {
        self.offset + self.buffer.len() as i64
    }

    /// The sha256 digest of everything written so far.
    pub fn digest(&self) -> String {
        format!("sha256:{:x}", self.hasher.clone().finalize())
    }

    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), Error> {
        self.hasher.update(data);
        while !data.is_empty() {
            let room = WRITE_CHUNK - self.buffer.len();
            let (now, later) = data.split_at(room.min(data.len()));
            self.buffer.extend_from_slice(now);
            data = later;
            if self.buffer.len() == WRITE_CHUNK {
                self.flush(WriteAction::Write, String::new(), HashMap::new())
                    .await?;
            }
        }
        Ok(())
    }

    /// Sends the rest and commits the blob as `expected` with `labels`. Someone else
    /// committing the same blob first is success.
    pub async fn commit(
        mut self,
        expected: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        if self.total <= 0 {
            self.total = self.written();
        }
        self.flush(WriteAction::Commit, expected.to_string(), labels)
            .await?;
        let Self {
            requests,
            responses,
            ..
        } = self;
        // Closing the request stream ends the call once containerd has answered.
        drop(requests);
        let Some(responses) = responses else {
            return Err(call_error("Content.Write")(Status::aborted(
                "content write ended early",
            )));
        };
        match Self::join(responses).await {
            Ok(()) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => Ok(()),
            Err(status) => Err(call_error("Content.Write")(status)),
        }
    }

    async fn flush(
        &mut self,
        action: WriteAction,
        expected: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(WRITE_CHUNK));
        let length = data.len() as i64;
        let request = WriteContentRequest {
            action: action as i32,
            r#ref: self.reference.clone(),
            total: self.total,
            expected,
            offset: self.offset,
            data,
            labels,
        };
        if self.requests.send(request).await.is_err() {
            // The call ended early: its status says why.
            let status = match self.responses.take() {
                Some(responses) => Self::join(responses).await.err(),
                None => None,
            };
            let status = status.unwrap_or_else(|| Status::aborted("content write ended early"));
            return Err(call_error("Content.Write")(status));
        }
        self.offset += length;
        Ok(())
    }

    async fn join(responses: tokio::task::JoinHandle<Result<(), Status>>) -> Result<(), Status> {
        match responses.await {
            Ok(result) => result,
            Err(error) => Err(Status::internal(format!("content write task: {error}"))),
        }
    }
}
