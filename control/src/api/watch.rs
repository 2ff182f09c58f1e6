//! Watch: a chunked stream of `{"type": ..., "object": ...}` lines that follows the store.
//!
//! Semantics follow kube-apiserver: no `resourceVersion` (or "0") starts with synthetic
//! ADDED events for what exists, then follows changes; a given version replays from
//! there, or answers an ERROR event with a 410 Status when it is too old. Objects moving in
//! or out of the selectors appear as ADDED or DELETED. Bookmarks come when asked for.
//!
//! Every watch is served from the watch cache ([`super::cache`]): a stream filters the
//! shared, already decoded events and, for plain JSON, sends the line the cache wrote once
//! for all watchers. The stream is the response body itself; no task or channel sits
//! between the cache and the connection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::cache::{
    CachedEvent, CachedObject, Dispatch, Filter, WatchCache, WatchKind, WatchStart,
};
use super::output::{partial_metadata, table};
use super::registry::ResourceInfo;
use super::selectors::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::{ApiServer, Body, Context, Representation, ResourceRequest};
use crate::store::{Revision, StoreError};

/// Writes events in the client's representation; a Table's columns go only in the first.
struct Encoder {
    info: &'static ResourceInfo,
    representation: Representation,
    columns_sent: bool,
}

impl Encoder {
    /// The line of a live event: for plain JSON, the one shared by every watcher.
    fn dispatched(&mut self, kind: WatchKind, dispatch: &Dispatch) -> Result<Bytes, ApiError> {
        match self.representation {
            Representation::Json => Ok(dispatch.line(kind)),
            _ => {
                let event = &dispatch.event;
                self.object(kind, event.object_for(kind), event.revision)
            }
        }
    }

    fn object(
        &mut self,
        kind: WatchKind,
        object: &CachedObject,
        revision: Revision,
    ) -> Result<Bytes, ApiError> {
        match self.representation {
            Representation::Json => Ok(object.line(kind, revision)),
            _ => Ok(self.converted(kind, object.to_value(revision)?)),
        }
    }

    /// A line for the representations that are built from the decoded object.
    fn converted(&mut self, kind: WatchKind, object: Value) -> Bytes {
        let object = match self.representation {
            Representation::Json => object,
            Representation::PartialMetadata => partial_metadata(&object),
            Representation::Table(include) => {
                let metadata = json!({"resourceVersion": object["metadata"]["resourceVersion"]});
                let with_columns = !self.columns_sent;
                self.columns_sent = true;
                table(
                    self.info,
                    std::slice::from_ref(&object),
                    metadata,
                    include,
                    with_columns,
                )
            }
        };
        line(&json!({"type": kind.as_str(), "object": object}))
    }

    fn bookmark(&self, revision: Revision, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let (kind, api_version) = match self.representation {
            Representation::Json => (self.info.kind, self.info.api_version()),
            _ => ("PartialObjectMetadata", "meta.k8s.io/v1".to_string()),
        };
        let object = json!({"kind": kind, "apiVersion": api_version, "metadata": metadata});
        line(&json!({"type": "BOOKMARK", "object": object}))
    }
}

fn line(event: &Value) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn error_event(error: &ApiError) -> Bytes {
    line(&json!({"type": "ERROR", "object": error.to_status()}))
}

/// One watch, in the order its lines go out: an error (then the end), the initial objects
/// and their closing bookmark, the replayed events, then the live ones.
struct WatchEvents {
    cache: Arc<WatchCache>,
    info: &'static ResourceInfo,
    filter: Filter,
    encoder: Encoder,
    error: Option<Bytes>,
    initial: std::vec::IntoIter<Arc<CachedObject>>,
    initial_events_end: Option<Revision>,
    replay: std::vec::IntoIter<Arc<CachedEvent>>,
    live: Option<mpsc::Receiver<Arc<Dispatch>>>,
    last_revision: Revision,
    bookmarks: Option<tokio::time::Interval>,
}

impl WatchEvents {
    /// The next line to send; `None` ends the stream.
    async fn next_line(&mut self) -> Option<Bytes> {
        match self.next_event().await {
            Ok(line) => line,
            Err(error) => {
                self.live = None;
                Some(error_event(&error))
            }
        }
    }

    async fn next_event(&mut self) -> Result<Option<Bytes>, ApiError> {
        if let Some(error) = self.error.take() {
            self.live = None;
            return Ok(Some(error));
        }
        if let Some(object) = self.initial.next() {
            let revision = object.revision;
            return self
                .encoder
                .object(WatchKind::Added, &object, revision)
                .map(Some);
        }
        if let Some(revision) = self.initial_events_end.take() {
            return Ok(Some(self.encoder.bookmark(revision, true)));
        }
        for event in self.replay.by_ref() {
            self.last_revision = event.revision;
            if let Some(kind) = event.seen_through(self.info, &self.filter) {
                return self
                    .encoder
                    .object(kind, event.object_for(kind), event.revision)
                    .map(Some);
            }
        }
        let Some(live) = self.live.as_mut() else {
            return Ok(None);
        };
        loop {
            let tick = async {
                match self.bookmarks.as_mut() {
                    Some(bookmarks) => {
                        bookmarks.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                dispatch = live.recv() => {
                    // The cache ends a watcher that fell behind; its client resumes.
                    let Some(dispatch) = dispatch else {
                        return Ok(None);
                    };
                    self.last_revision = dispatch.event.revision;
                    if let Some(kind) = dispatch.event.seen_through(self.info, &self.filter) {
                        return self.encoder.dispatched(kind, &dispatch).map(Some);
                    }
                }
                () = tick => {
                    // With nothing queued, the watcher has seen every event of its keys up
                    // to the cache's revision (the cache publishes it after dispatching),
                    // so the bookmark can report that progress.
                    let progress = self.cache.revision();
                    if live.is_empty() {
                        self.last_revision = self.last_revision.max(progress);
                    }
                    return Ok(Some(self.encoder.bookmark(self.last_revision, false)));
                }
            }
        }
    }
}

impl ApiServer {
    pub(crate) async fn watch_named(
        self: &Arc<Self>,
        request: ResourceRequest,
        context: Context,
        name: String,
    ) -> Result<Response<Body>, ApiError> {
        self.start_watch(request, context, Some(name)).await
    }

    pub(crate) async fn watch(
        self: &Arc<Self>,
        request: ResourceRequest,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        self.start_watch(request, context, None).await
    }

    async fn start_watch(
        self: &Arc<Self>,
        request: ResourceRequest,
        context: Context,
        name: Option<String>,
    ) -> Result<Response<Body>, ApiError> {
        let info = request.info;
        let query = &context.query;
        let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let mut field_text = query.get("fieldSelector").unwrap_or("").to_string();
        if let Some(name) = &name {
            if !field_text.is_empty() {
                field_text.push(',');
            }
            field_text.push_str(&format!("metadata.name={name}"));
        }
        let fields = FieldSelector::parse(&field_text, info.field_selectors)
            .map_err(ApiError::bad_request)?;
        let filter = Filter { labels, fields };
        let bookmarks = query.flag("allowWatchBookmarks");
        let version = query.get("resourceVersion").unwrap_or("");
        let send_initial = match query.get("sendInitialEvents") {
            Some("true") => true,
            Some("false") => false,
            _ => matches!(version, "" | "0"),
        };
        let timeout =
            match query.get("timeoutSeconds") {
                Some(text) => Duration::from_secs(text.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid timeoutSeconds: {text}"))
                })?),
                // kube-apiserver spreads watch lifetimes so that clients do not reconnect at once.
                None => Duration::from_secs(rand::rng().random_range(1800..3600)),
            };
        let prefix = info.list_prefix(request.namespace.as_deref());
        let parse_version = |text: &str| {
            text.parse::<Revision>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion: {text}")))
        };
        // The start is decided before the response begins, so that a bad resourceVersion
        // is an error response, and a stale one an ERROR event.
        let start = match (send_initial, version) {
            // "Most recent": the snapshot must include every acknowledged write.
            (true, "") => {
                let current = self
                    .store
                    .current_revision()
                    .await
                    .map_err(|e| ApiError::from_store(e, info, ""))?;
                self.cache.wait_for(current).await?;
                WatchStart::Snapshot
            }
            (true, "0") => WatchStart::Snapshot,
            (true, text) => {
                self.cache.wait_for(parse_version(text)?).await?;
                WatchStart::Snapshot
            }
            (false, "" | "0") => WatchStart::Now,
            (false, text) => {
                // A version the cache has not applied yet (just read from the store by
                // the client) is waited for rather than missed.
                let after = parse_version(text)?;
                if after > self.cache.revision() {
                    self.cache.wait_for(after).await?;
                }
                WatchStart::After(after)
            }
        };
        let mut events = WatchEvents {
            cache: self.cache.clone(),
            info,
            filter,
            encoder: Encoder {
                info,
                representation: context.representation,
                columns_sent: false,
            },
            error: None,
            initial: Vec::new().into_iter(),
            initial_events_end: None,
            replay: Vec::new().into_iter(),
            live: None,
            last_revision: 0,
            bookmarks: None,
        };
        match self.cache.watch(info, &prefix, start, &events.filter) {
            Ok(registration) => {
                if send_initial && bookmarks {
                    events.initial_events_end = Some(registration.start);
                }
                events.initial = registration.initial.into_iter();
                events.replay = registration.replay.into_iter();
                events.live = Some(registration.live);
                events.last_revision = registration.start;
                let every = self.config.bookmark_interval;
                events.bookmarks = bookmarks
                    .then(|| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
            }
            Err(error @ StoreError::Compacted { .. }) => {
                events.error = Some(error_event(&ApiError::from_store(error, info, "")));
            }
            Err(error) => return Err(ApiError::from_store(error, info, "")),
        }

        let stream = futures::stream::unfold(events, |mut events| async move {
            let line = events.next_line().await?;
            Some((Ok::<_, std::io::Error>(Frame::data(line)), events))
        })
        .take_until(tokio::time::sleep(timeout));
        let body = BodyExt::boxed(StreamBody::new(stream));
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::OK;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(response)
    }
}
