//! Watch: a chunked stream of `{"type": ..., "object": ...}` lines that follows the store.
//!
//! Semantics follow kube-apiserver: no `resourceVersion` (or "0") starts with synthetic
//! ADDED events for what exists, then follows changes; a given version replays from
//! there, or answers an ERROR event with a 410 Status when it is too old. Objects moving in
//! or out of the selectors appear as ADDED or DELETED. Bookmarks come when asked for.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::objects::{decode_stored, set_resource_version};
use super::output::{partial_metadata, table};
use super::registry::ResourceInfo;
use super::selectors::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::{ApiServer, Body, Context, Representation, ResourceRequest};
use crate::store::{Event, EventKind, StoreError, WatchStream};

type Frames = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

struct Filter {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }
}

/// Writes events in the client's representation; a Table's columns go only in the first.
struct Encoder {
    info: &'static ResourceInfo,
    representation: Representation,
    columns_sent: bool,
}

impl Encoder {
    fn event(&mut self, kind: &str, object: Value) -> Bytes {
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
        let mut line =
            serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }

    fn bookmark(&self, revision: i64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let (kind, api_version) = match self.representation {
            Representation::Json => (self.info.kind, self.info.api_version()),
            _ => ("PartialObjectMetadata", "meta.k8s.io/v1".to_string()),
        };
        let object = json!({"kind": kind, "apiVersion": api_version, "metadata": metadata});
        let mut line =
            serde_json::to_vec(&json!({"type": "BOOKMARK", "object": object})).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }
}

fn error_event(error: &ApiError) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": "ERROR", "object": error.to_status()}))
        .unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// What a store event looks like through the filter, if anything.
fn translate(event: &Event, filter: &Filter) -> Result<Option<(&'static str, Value)>, ApiError> {
    let previous = match &event.prev {
        Some(prev) => {
            let mut object = decode_stored(prev)?;
            let passes = filter.matches(&object);
            set_resource_version(&mut object, event.revision());
            Some((object, passes))
        }
        None => None,
    };
    let previous_passes = previous.as_ref().is_some_and(|(_, passes)| *passes);
    match event.kind {
        EventKind::Delete => {
            if !previous_passes {
                return Ok(None);
            }
            Ok(Some(("DELETED", decode_stored(&event.kv)?)))
        }
        EventKind::Put => {
            let current = decode_stored(&event.kv)?;
            let current_passes = filter.matches(&current);
            Ok(
                match (previous.is_some(), previous_passes, current_passes) {
                    (_, true, true) => Some(("MODIFIED", current)),
                    (_, false, true) => Some(("ADDED", current)),
                    (true, true, false) => previous.map(|(object, _)| ("DELETED", object)),
                    _ => None,
                },
            )
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
        let send_initial = match query.get("sendInitialEvents") {
            Some("true") => true,
            Some("false") => false,
            _ => matches!(query.get("resourceVersion"), None | Some("" | "0")),
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

        let (frames, receiver) = mpsc::channel(64);
        let mut encoder = Encoder {
            info,
            representation: context.representation,
            columns_sent: false,
        };
        // The initial state and the watch start are decided before the response begins so
        // that a bad resourceVersion is an error response, and a stale one an ERROR event.
        let mut initial = Vec::new();
        let start = if send_initial {
            let page = self
                .store
                .list(&prefix, None, None)
                .await
                .map_err(|e| ApiError::from_store(e, info, ""))?;
            for kv in &page.items {
                let object = decode_stored(kv)?;
                if filter.matches(&object) {
                    initial.push(encoder.event("ADDED", object));
                }
            }
            page.revision
        } else {
            let text = query.get("resourceVersion").unwrap_or("0");
            text.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion: {text}")))?
        };
        let stream = match self.store.watch(&prefix, start).await {
            Ok(stream) => Ok(stream),
            Err(error @ StoreError::Compacted { .. }) => Err(ApiError::from_store(error, info, "")),
            Err(error) => return Err(ApiError::from_store(error, info, "")),
        };
        let interval = self.config.bookmark_interval;
        tokio::spawn(async move {
            let run = async {
                for line in initial {
                    send(&frames, line).await?;
                }
                let mut stream = match stream {
                    Ok(stream) => stream,
                    Err(error) => {
                        send(&frames, error_event(&error)).await?;
                        return None;
                    }
                };
                if send_initial && bookmarks {
                    send(&frames, encoder.bookmark(start, true)).await?;
                }
                follow(
                    &mut stream,
                    &filter,
                    &mut encoder,
                    &frames,
                    start,
                    bookmarks.then_some(interval),
                )
                .await
            };
            let _ = tokio::time::timeout(timeout, run).await;
        });

        let body = StreamBody::new(ReceiverStream::new(receiver)).boxed();
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::OK;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(response)
    }
}

async fn send(frames: &Frames, line: Bytes) -> Option<()> {
    frames.send(Ok(Frame::data(line))).await.ok()
}

/// Forwards store events until the client goes away or the store ends the watch.
async fn follow(
    stream: &mut WatchStream,
    filter: &Filter,
    encoder: &mut Encoder,
    frames: &Frames,
    start: i64,
    bookmark_interval: Option<Duration>,
) -> Option<()> {
    let mut last_revision = start;
    let mut ticker = bookmark_interval
        .map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    loop {
        let tick = async {
            match ticker.as_mut() {
                Some(ticker) => {
                    ticker.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            event = stream.next() => {
                let event = event?;
                last_revision = event.revision();
                match translate(&event, filter) {
                    Ok(Some((kind, object))) => send(frames, encoder.event(kind, object)).await?,
                    Ok(None) => {}
                    Err(error) => {
                        send(frames, error_event(&error)).await?;
                        return None;
                    }
                }
            }
            _ = tick => send(frames, encoder.bookmark(last_revision, false)).await?,
            _ = frames.closed() => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KeyValue;

    fn kv(labels: Value, revision: i64) -> KeyValue {
        KeyValue {
            key: "/registry/core/pods/default/a".into(),
            value: Bytes::from(
                serde_json::to_vec(&json!({"metadata": {"name": "a", "labels": labels}})).unwrap(),
            ),
            create_revision: 1,
            mod_revision: revision,
        }
    }

    fn filter(selector: &str) -> Filter {
        Filter {
            labels: LabelSelector::parse(selector).unwrap(),
            fields: FieldSelector::default(),
        }
    }

    #[test]
    fn objects_moving_across_the_selector_are_added_and_deleted() {
        let put = |prev: Option<KeyValue>, cur: KeyValue| Event {
            kind: EventKind::Put,
            kv: cur,
            prev,
        };
        let f = filter("app=web");
        let event = put(None, kv(json!({"app": "web"}), 2));
        assert_eq!(translate(&event, &f).unwrap().unwrap().0, "ADDED");
        let event = put(
            Some(kv(json!({"app": "web"}), 2)),
            kv(json!({"app": "web", "x": "y"}), 3),
        );
        assert_eq!(translate(&event, &f).unwrap().unwrap().0, "MODIFIED");
        let event = put(
            Some(kv(json!({"app": "web"}), 3)),
            kv(json!({"app": "api"}), 4),
        );
        let (kind, object) = translate(&event, &f).unwrap().unwrap();
        assert_eq!(
            (kind, object["metadata"]["resourceVersion"].as_str()),
            ("DELETED", Some("4"))
        );
        let event = put(
            Some(kv(json!({"app": "api"}), 4)),
            kv(json!({"app": "web"}), 5),
        );
        assert_eq!(translate(&event, &f).unwrap().unwrap().0, "ADDED");
        let event = put(
            Some(kv(json!({"app": "api"}), 5)),
            kv(json!({"app": "db"}), 6),
        );
        assert!(translate(&event, &f).unwrap().is_none());
        let deleted = Event {
            kind: EventKind::Delete,
            kv: kv(json!({"app": "web"}), 7),
            prev: Some(kv(json!({"app": "web"}), 6)),
        };
        assert_eq!(translate(&deleted, &f).unwrap().unwrap().0, "DELETED");
    }
}
