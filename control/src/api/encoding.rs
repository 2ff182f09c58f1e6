//! The wire form of stored objects: the stored JSON with `metadata.resourceVersion` spliced
//! in, so that serving an object, a list or a watch event needs no parse and no
//! serialization.
//!
//! The store holds an object's JSON without its `resourceVersion` (the store revision is
//! the version). A client must see it, so the bytes `"resourceVersion":"N",` go right
//! after the `{` that opens the top-level `metadata`; finding that brace is a scan of the
//! top-level keys that skips their values without building anything.

use std::io::Write as _;

use bytes::Bytes;

fn skip_whitespace(json: &[u8], mut at: usize) -> usize {
    while json.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// `json[at]` opens a string; returns the index after its closing quote.
fn skip_string(json: &[u8], at: usize) -> Option<usize> {
    let mut at = at + 1;
    loop {
        match json.get(at)? {
            b'"' => return Some(at + 1),
            b'\\' => at += 2,
            _ => at += 1,
        }
    }
}

/// `json[at]` starts a value; returns the index after it.
fn skip_value(json: &[u8], at: usize) -> Option<usize> {
    match json.get(at)? {
        b'"' => skip_string(json, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut at = at;
            loop {
                match json.get(at)? {
                    b'"' => {
                        at = skip_string(json, at)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(at + 1);
                        }
                    }
                    _ => {}
                }
                at += 1;
            }
        }
        _ => {
            let mut at = at;
            while let Some(byte) = json.get(at) {
                if matches!(byte, b',' | b'}' | b']') || byte.is_ascii_whitespace() {
                    break;
                }
                at += 1;
            }
            Some(at)
        }
    }
}

/// The index just after the `{` that opens the top-level `metadata` object of `json`, if
/// `json` is an object that has one.
pub(crate) fn metadata_offset(json: &[u8]) -> Option<usize> {
    let mut at = skip_whitespace(json, 0);
    if json.get(at) != Some(&b'{') {
        return None;
    }
    at += 1;
    loop {
        at = skip_whitespace(json, at);
        if json.get(at) != Some(&b'"') {
            return None;
        }
        let key_start = at + 1;
        at = skip_string(json, at)?;
        let key = &json[key_start..at - 1];
        at = skip_whitespace(json, at);
        if json.get(at) != Some(&b':') {
            return None;
        }
        at = skip_whitespace(json, at + 1);
        if key == b"metadata" {
            return (json.get(at) == Some(&b'{')).then_some(at + 1);
        }
        at = skip_whitespace(json, skip_value(json, at)?);
        if json.get(at) != Some(&b',') {
            return None;
        }
        at += 1;
    }
}

/// Appends `raw` with `metadata.resourceVersion` set to `revision`; `metadata_at` is
/// [`metadata_offset`] of `raw`. Without a metadata object, `raw` goes out unchanged.
pub(crate) fn write_object(
    raw: &[u8],
    metadata_at: Option<usize>,
    revision: i64,
    out: &mut Vec<u8>,
) {
    let Some(at) = metadata_at else {
        out.extend_from_slice(raw);
        return;
    };
    out.extend_from_slice(&raw[..at]);
    let _ = write!(out, "\"resourceVersion\":\"{revision}\"");
    if raw
        .get(skip_whitespace(raw, at))
        .is_some_and(|next| *next != b'}')
    {
        out.push(b',');
    }
    out.extend_from_slice(&raw[at..]);
}

/// The stored object `raw` as a client sees it, at `revision`.
pub(crate) fn object_bytes(raw: &[u8], revision: i64) -> Bytes {
    let mut out = Vec::with_capacity(raw.len() + 40);
    write_object(raw, metadata_offset(raw), revision, &mut out);
    Bytes::from(out)
}

/// One line of a watch stream: `{"type":"ADDED","object":{...}}` and a newline.
pub(crate) fn event_line(
    kind: &str,
    raw: &[u8],
    metadata_at: Option<usize>,
    revision: i64,
) -> Bytes {
    let mut out = Vec::with_capacity(raw.len() + 64);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    write_object(raw, metadata_at, revision, &mut out);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn spliced(value: &Value, revision: i64) -> Value {
        let raw = serde_json::to_vec(value).unwrap();
        serde_json::from_slice(&object_bytes(&raw, revision)).unwrap()
    }

    #[test]
    fn the_version_lands_in_the_top_level_metadata() {
        let object = json!({
            "apiVersion": "v1",
            "data": {"metadata": "{\"metadata\":{}}", "x\\\"": "[{]"},
            "kind": "ConfigMap",
            "list": [1, {"metadata": {}}, "s"],
            "n": -1.5e3,
            "t": true,
            "z": null,
            "metadata": {"name": "a", "labels": {"k": "v"}},
            "spec": {"template": {"metadata": {"labels": {}}}}
        });
        let mut expected = object.clone();
        expected["metadata"]["resourceVersion"] = json!("42");
        assert_eq!(spliced(&object, 42), expected);
    }

    #[test]
    fn empty_metadata_and_whitespace_are_handled() {
        let raw = br#" { "kind" : "X" , "metadata" : { } } "#;
        let value: Value = serde_json::from_slice(&object_bytes(raw, 7)).unwrap();
        assert_eq!(
            value,
            json!({"kind": "X", "metadata": {"resourceVersion": "7"}})
        );
    }

    #[test]
    fn objects_without_metadata_go_out_unchanged() {
        for raw in [
            &b"{\"kind\":\"X\"}"[..],
            b"[1,2]",
            b"{\"metadata\":1}",
            b"{\"a\":",
        ] {
            assert_eq!(&object_bytes(raw, 3)[..], raw);
        }
    }

    #[test]
    fn event_lines_are_one_json_document_per_line() {
        let raw = serde_json::to_vec(&json!({"metadata": {"name": "a"}})).unwrap();
        let line = event_line("MODIFIED", &raw, metadata_offset(&raw), 9);
        assert!(line.ends_with(b"}\n"));
        let event: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(event["type"], "MODIFIED");
        assert_eq!(event["object"]["metadata"]["resourceVersion"], "9");
    }
}
