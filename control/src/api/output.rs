//! What a response body looks like: plain objects and lists, server-side Tables for
//! `kubectl get`, PartialObjectMetadata, and the Scale view.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Map, Value, json};

use super::cache::CachedObject;
use super::registry::ResourceInfo;
use super::{Body, IncludeObject, Representation, bytes_response, json_response, printers};

pub(crate) fn partial_metadata(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object["metadata"],
    })
}

fn table_row(
    info: &ResourceInfo,
    object: &Value,
    include: IncludeObject,
    now: jiff::Timestamp,
) -> Value {
    let mut row = json!({"cells": printers::row_cells(info.kind, object, now)});
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => row["object"] = partial_metadata(object),
        IncludeObject::Object => row["object"] = object.clone(),
    }
    row
}

/// A `meta.k8s.io/v1` Table of `objects`; `with_columns` is false for watch events after
/// the first, which reuse the columns already sent.
pub(crate) fn table(
    info: &ResourceInfo,
    objects: &[Value],
    list_metadata: Value,
    include: IncludeObject,
    with_columns: bool,
) -> Value {
    let now = jiff::Timestamp::now();
    let columns: Vec<Value> = if with_columns {
        printers::column_definitions(info.kind)
            .iter()
            .map(|c| c.to_json())
            .collect()
    } else {
        Vec::new()
    };
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_metadata,
        "columnDefinitions": columns,
        "rows": objects.iter().map(|o| table_row(info, o, include, now)).collect::<Vec<_>>(),
    })
}

/// One object in the representation the client asked for.
pub(crate) fn represent(
    info: &ResourceInfo,
    object: Value,
    representation: Representation,
) -> Value {
    match representation {
        Representation::Json => object,
        Representation::PartialMetadata => partial_metadata(&object),
        Representation::Table(include) => {
            let metadata = json!({"resourceVersion": object["metadata"]["resourceVersion"]});
            table(info, std::slice::from_ref(&object), metadata, include, true)
        }
    }
}

pub(crate) fn object_response(
    info: &ResourceInfo,
    object: Value,
    representation: Representation,
    status: StatusCode,
) -> Response<Body> {
    json_response(status, &represent(info, object, representation))
}

pub(crate) fn list_response(
    info: &ResourceInfo,
    items: Vec<Value>,
    revision: i64,
    continue_token: Option<String>,
    representation: Representation,
) -> Response<Body> {
    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), json!(revision.to_string()));
    if let Some(token) = continue_token {
        metadata.insert("continue".into(), json!(token));
    }
    let body = match representation {
        Representation::Table(include) => {
            table(info, &items, Value::Object(metadata), include, true)
        }
        Representation::PartialMetadata => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": metadata,
            "items": items.iter().map(partial_metadata).collect::<Vec<_>>(),
        }),
        Representation::Json => json!({
            "kind": format!("{}List", info.kind),
            "apiVersion": info.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    };
    json_response(StatusCode::OK, &body)
}

/// How much of a large list is written before it goes to the connection.
const LIST_CHUNK_BYTES: usize = 256 * 1024;

/// A list's JSON written piece by piece from the cached objects, so that a list of many
/// objects never sits whole in memory.
struct ListChunks {
    head: Option<Vec<u8>>,
    items: std::vec::IntoIter<Arc<CachedObject>>,
    first: bool,
    done: bool,
}

impl Iterator for ListChunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let mut out = self
            .head
            .take()
            .unwrap_or_else(|| Vec::with_capacity(LIST_CHUNK_BYTES + 16 * 1024));
        while out.len() < LIST_CHUNK_BYTES {
            let Some(item) = self.items.next() else {
                out.extend_from_slice(b"]}");
                self.done = true;
                break;
            };
            if !self.first {
                out.push(b',');
            }
            self.first = false;
            item.write_json(item.revision, &mut out);
        }
        Some(Bytes::from(out))
    }
}

/// A plain JSON list of cached objects: their stored bytes with the versions spliced in.
pub(crate) fn cached_list_response(
    info: &ResourceInfo,
    items: Vec<Arc<CachedObject>>,
    revision: i64,
    continue_token: Option<String>,
) -> Response<Body> {
    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), json!(revision.to_string()));
    if let Some(token) = continue_token {
        metadata.insert("continue".into(), json!(token));
    }
    let head = json!({
        "kind": format!("{}List", info.kind),
        "apiVersion": info.api_version(),
        "metadata": metadata,
    });
    let mut head = serde_json::to_vec(&head).unwrap_or_default();
    // `{...}` becomes `{...,"items":[` so that the items follow.
    head.pop();
    head.extend_from_slice(b",\"items\":[");
    let size: usize = items.iter().map(|item| item.json_len() + 1).sum();
    let mut chunks = ListChunks {
        head: Some(Vec::with_capacity(
            head.len() + size.min(LIST_CHUNK_BYTES) + 16 * 1024,
        )),
        items: items.into_iter(),
        first: true,
        done: false,
    };
    if let Some(buffer) = chunks.head.as_mut() {
        buffer.extend_from_slice(&head);
    }
    let first = chunks.next().unwrap_or_default();
    if chunks.done {
        return bytes_response(StatusCode::OK, "application/json", first);
    }
    let frames = futures::stream::iter(
        std::iter::once(first)
            .chain(chunks)
            .map(|chunk| Ok::<_, std::io::Error>(Frame::data(chunk))),
    );
    let mut response = Response::new(StreamBody::new(frames).boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `matchLabels` and `matchExpressions` in the string form `Scale.status.selector` uses.
fn selector_string(selector: &Value) -> String {
    let mut parts: Vec<String> = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    for expression in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = expression["key"].as_str().unwrap_or("");
        let values: Vec<&str> = expression["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        match expression["operator"].as_str().unwrap_or("") {
            "In" => parts.push(format!("{key} in ({})", values.join(","))),
            "NotIn" => parts.push(format!("{key} notin ({})", values.join(","))),
            "Exists" => parts.push(key.to_string()),
            "DoesNotExist" => parts.push(format!("!{key}")),
            _ => {}
        }
    }
    parts.sort();
    parts.join(",")
}

/// The `autoscaling/v1` Scale view of a Deployment or ReplicaSet.
pub(crate) fn scale_of(object: &Value) -> Value {
    let metadata = &object["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata["uid"],
            "resourceVersion": metadata["resourceVersion"],
            "creationTimestamp": metadata["creationTimestamp"],
        },
        "spec": {"replicas": object["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {
            "replicas": object["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": selector_string(&object["spec"]["selector"]),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_reports_replicas_and_selector() {
        let deployment = json!({
            "metadata": {"name": "web", "namespace": "default", "resourceVersion": "7"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web", "tier": "a"}, "matchExpressions": [{"key": "env", "operator": "In", "values": ["x", "y"]}]}},
            "status": {"replicas": 2}
        });
        let scale = scale_of(&deployment);
        assert_eq!(scale["spec"]["replicas"], 3);
        assert_eq!(scale["status"]["replicas"], 2);
        assert_eq!(scale["status"]["selector"], "app=web,env in (x,y),tier=a");
    }
}
