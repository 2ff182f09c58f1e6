//! The object verbs: get, list, create, update, patch, delete and deletecollection, and the
//! `status`, `scale` and `binding` subresources, for every resource alike.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use super::cache::{CachedObject, Filter};
use super::output::{cached_list_response, list_response, object_response, scale_of};
use super::registry::ResourceInfo;
use super::selectors::{FieldSelector, LabelSelector};
use super::status::{ApiError, Cause, success_status};
use super::{
    ApiServer, Body, Context, Representation, ResourceRequest, bytes_response, defaults, encoding,
    json_response, strategic_merge, strategy, validation,
};
use crate::store::{KeyValue, StoreError};

/// How often a write that raced another is retried before the client is told to retry.
const MAX_WRITE_ATTEMPTS: usize = 16;

/// How kube-apiserver treats fields the kind does not have (`fieldValidation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    fn from_query(context: &Context) -> Result<Self, ApiError> {
        match context.query.get("fieldValidation") {
            None | Some("" | "Warn") => Ok(Self::Warn),
            Some("Ignore") => Ok(Self::Ignore),
            Some("Strict") => Ok(Self::Strict),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation parameter unsupported: {other}. Supported values are: Ignore, Warn, Strict"
            ))),
        }
    }
}

enum Change {
    Replace(Value),
    Patch {
        patch_type: PatchType,
        patch: Value,
    },
    /// A write through the `scale` subresource: a new Scale, or a patch of the current one.
    Scale(Box<Change>),
}

#[derive(Debug, Clone, Copy)]
enum PatchType {
    Json,
    Merge,
    Strategic,
}

pub(crate) fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A stored value as a client sees it: the store revision is its `resourceVersion`.
pub(crate) fn decode_stored(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut object: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("decode stored object {}: {e}", kv.key)))?;
    set_resource_version(&mut object, kv.mod_revision);
    Ok(object)
}

pub(crate) fn set_resource_version(object: &mut Value, revision: i64) {
    object["metadata"]["resourceVersion"] = json!(revision.to_string());
}

/// An object serialized without `metadata.resourceVersion`, without copying it first.
struct WithoutVersion<'a>(&'a Value);

/// A `metadata` map serialized without its `resourceVersion`.
struct MetadataWithoutVersion<'a>(&'a serde_json::Map<String, Value>);

impl serde::Serialize for WithoutVersion<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let Value::Object(fields) = self.0 else {
            return self.0.serialize(serializer);
        };
        let mut map = serializer.serialize_map(Some(fields.len()))?;
        for (key, value) in fields {
            match value {
                Value::Object(metadata) if key == "metadata" => {
                    map.serialize_entry(key, &MetadataWithoutVersion(metadata))?
                }
                _ => map.serialize_entry(key, value)?,
            }
        }
        map.end()
    }
}

impl serde::Serialize for MetadataWithoutVersion<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().filter(|(key, _)| *key != "resourceVersion"))
    }
}

/// The stored form of an object: its JSON without the version (the store revision is the
/// version), in an allocation of exactly its size, since the store and the watch cache
/// keep it for the object's lifetime.
fn encode_for_store(object: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&WithoutVersion(object)).unwrap_or_default();
    bytes.shrink_to_fit();
    Bytes::from(bytes)
}

/// Whether two objects are equal but for `metadata.resourceVersion` (compared in place).
fn same_but_version(a: &Value, b: &Value) -> bool {
    // Maps iterate in key order, so the filtered entries compare pairwise.
    fn metadata_equal(
        x: &serde_json::Map<String, Value>,
        y: &serde_json::Map<String, Value>,
    ) -> bool {
        let unversioned = |(key, _): &(&String, &Value)| *key != "resourceVersion";
        x.iter()
            .filter(unversioned)
            .eq(y.iter().filter(unversioned))
    }
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter().all(|(key, value)| match (value, b.get(key)) {
                    (Value::Object(x), Some(Value::Object(y))) if key == "metadata" => {
                        metadata_equal(x, y)
                    }
                    (value, other) => Some(value) == other,
                })
        }
        _ => a == b,
    }
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or("")
}

fn parse_body(context: &Context) -> Result<Value, ApiError> {
    if context.body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    let media = context.content_type.split(';').next().unwrap_or("").trim();
    if media == "application/vnd.kubernetes.protobuf" {
        return Err(ApiError::unsupported_media_type(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {media})"
        )));
    }
    let value: Value = if media.ends_with("yaml") {
        serde_yaml::from_slice(&context.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
    } else {
        serde_json::from_slice(&context.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))?
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// Checks `apiVersion` and `kind` when the object gives them.
fn verify_type_meta(
    info: &ResourceInfo,
    object: &Value,
    expected_kind: &str,
    api_version: &str,
) -> Result<(), ApiError> {
    let given_kind = object["kind"].as_str().unwrap_or(expected_kind);
    let given_version = object["apiVersion"].as_str().unwrap_or(api_version);
    if given_kind != expected_kind || given_version != api_version {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({given_version}) does not match the expected API version ({api_version}) or kind {given_kind} is not {expected_kind} (resource {})",
            info.resource
        )));
    }
    Ok(())
}

/// Checks `apiVersion` and `kind` when the body gives them, and fills them in otherwise.
fn check_type_meta(
    info: &ResourceInfo,
    object: &mut Value,
    expected_kind: &str,
    api_version: &str,
) -> Result<(), ApiError> {
    verify_type_meta(info, object, expected_kind, api_version)?;
    object["kind"] = json!(expected_kind);
    object["apiVersion"] = json!(api_version);
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    Ok(())
}

/// Lists fields of `input` that did not survive decoding into the kind's type.
fn unknown_fields(input: &Value, output: &Value, path: &str, found: &mut Vec<String>) {
    let mut path = path.to_string();
    collect_unknown_fields(input, output, &mut path, found);
}

/// [`unknown_fields`] with one path buffer for the whole walk: a field's path is written
/// into it as the walk descends and cut back on the way up, so that the common case (every
/// field known) formats nothing.
fn collect_unknown_fields(
    input: &Value,
    output: &Value,
    path: &mut String,
    found: &mut Vec<String>,
) {
    use std::fmt::Write as _;
    let parent_len = path.len();
    match (input, output) {
        (Value::Object(input), Value::Object(output)) => {
            for (key, value) in input {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                match output.get(key) {
                    Some(kept) => collect_unknown_fields(value, kept, path, found),
                    None if value.is_null() => {}
                    None => found.push(path.clone()),
                }
                path.truncate(parent_len);
            }
        }
        (Value::Array(input), Value::Array(output)) => {
            for (index, (value, kept)) in input.iter().zip(output).enumerate() {
                let _ = write!(path, "[{index}]");
                collect_unknown_fields(value, kept, path, found);
                path.truncate(parent_len);
            }
        }
        _ => {}
    }
}

/// Decodes `object` through the kind's type; returns it with warnings for dropped fields.
fn decode_typed(
    info: &ResourceInfo,
    object: Value,
    mode: FieldValidation,
) -> Result<(Value, Vec<String>), ApiError> {
    let decoded = (info.decode)(&object).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            info.kind, info.version, info.kind
        ))
    })?;
    let mut unknown = Vec::new();
    if mode != FieldValidation::Ignore {
        unknown_fields(&object, &decoded, "", &mut unknown);
    }
    let messages: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    if mode == FieldValidation::Strict && !messages.is_empty() {
        return Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            messages.join(", ")
        )));
    }
    Ok((decoded, messages))
}

fn causes(found: Vec<validation::FieldCause>) -> Vec<Cause> {
    found
        .into_iter()
        .map(|c| Cause {
            reason: c.reason,
            field: c.field,
            message: c.message,
        })
        .collect()
}

fn with_warnings(mut response: Response<Body>, warnings: &[String]) -> Response<Body> {
    for warning in warnings {
        let escaped = warning.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(value) = hyper::header::HeaderValue::from_str(&format!("299 - \"{escaped}\"")) {
            response.headers_mut().append("Warning", value);
        }
    }
    response
}

fn generate_name(prefix: &str) -> String {
    // kube-apiserver's alphabet: no vowels (no words) and no confusable characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    use rand::Rng;
    let mut rng = rand::rng();
    let prefix: String = prefix.chars().take(58).collect();
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{suffix}")
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: i64,
    start: String,
}

fn encode_continue(revision: i64, relative_key: &str) -> String {
    let token = serde_json::to_vec(&ContinueToken {
        rv: revision,
        start: relative_key.to_string(),
    })
    .unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<ContinueToken>(&bytes).ok())
        .filter(|t| !t.start.contains(".."))
        .ok_or_else(|| ApiError::bad_request(format!("continue key is not valid: {token}")))
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeleteOptions {
    grace_period_seconds: Option<i64>,
    propagation_policy: Option<String>,
    preconditions: Option<Preconditions>,
    dry_run: Option<Vec<String>>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Preconditions {
    uid: Option<String>,
    resource_version: Option<String>,
}

impl DeleteOptions {
    fn from_request(context: &Context) -> Result<Self, ApiError> {
        let mut options: DeleteOptions = if context.body.is_empty() {
            DeleteOptions::default()
        } else {
            serde_json::from_slice(&context.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
        };
        if let Some(grace) = context.query.get("gracePeriodSeconds") {
            options.grace_period_seconds = Some(grace.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid gracePeriodSeconds: {grace}"))
            })?);
        }
        if let Some(policy) = context.query.get("propagationPolicy") {
            options.propagation_policy = Some(policy.to_string());
        }
        if let Some(policy) = &options.propagation_policy
            && !matches!(policy.as_str(), "Orphan" | "Background" | "Foreground")
        {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: \"{policy}\": supported values: \"Foreground\", \"Background\", \"Orphan\""
            )));
        }
        if context.query.dry_run() {
            options.dry_run = Some(vec!["All".into()]);
        }
        Ok(options)
    }

    fn dry_run(&self) -> bool {
        self.dry_run
            .as_ref()
            .is_some_and(|d| d.iter().any(|v| v == "All"))
    }
}

/// What one delete did.
pub(crate) enum Deleted {
    /// The object is gone; this was its last state.
    Removed(Value),
    /// The object is still there, marked for deletion (grace period or finalizers).
    Marked(Value),
}

fn resource_version_of(object: &Value) -> Result<Option<i64>, ApiError> {
    match object["metadata"]["resourceVersion"].as_str() {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "metadata.resourceVersion: Invalid value: \"{text}\": must be a valid integer"
            ))
        }),
    }
}

impl ApiServer {
    /// Resolves the namespace of an object in a request, checking that the body agrees.
    fn resolve_namespace(
        info: &ResourceInfo,
        request_namespace: Option<&str>,
        object: &mut Value,
    ) -> Result<Option<String>, ApiError> {
        if !info.namespaced {
            if let Some(metadata) = object["metadata"].as_object_mut() {
                metadata.remove("namespace");
            }
            return Ok(None);
        }
        let body_namespace = object["metadata"]["namespace"]
            .as_str()
            .filter(|n| !n.is_empty());
        let namespace = match (request_namespace, body_namespace) {
            (Some(request), Some(body)) if request != body => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (Some(request), _) => request.to_string(),
            (None, Some(body)) => body.to_string(),
            (None, None) => {
                return Err(ApiError::bad_request(
                    "the namespace of the object must be set",
                ));
            }
        };
        object["metadata"]["namespace"] = json!(namespace);
        Ok(Some(namespace))
    }

    /// New objects may only go into a namespace that exists and is not being deleted.
    async fn check_namespace_accepts(
        &self,
        info: &ResourceInfo,
        namespace: &str,
        name: &str,
    ) -> Result<(), ApiError> {
        let namespaces =
            super::registry::lookup("", "v1", "namespaces").expect("namespaces are registered");
        let key = namespaces.object_key(None, namespace);
        let stored = self
            .store
            .get(&key)
            .await
            .map_err(|e| ApiError::from_store(e, namespaces, namespace))?
            .ok_or_else(|| ApiError::namespace_not_found(namespace))?;
        let object = decode_stored(&stored)?;
        if object["metadata"]["deletionTimestamp"].is_string() {
            let mut error = ApiError::forbidden(format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                info.resource
            ));
            error.details = Some(
                json!({"name": name, "kind": info.resource, "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {namespace} is being terminated"), "field": "metadata.namespace"}]}),
            );
            return Err(error);
        }
        Ok(())
    }

    async fn fetch_optional(
        &self,
        info: &ResourceInfo,
        key: &str,
        name: &str,
    ) -> Result<Option<KeyValue>, ApiError> {
        self.store
            .get(key)
            .await
            .map_err(|e| ApiError::from_store(e, info, name))
    }

    /// The stored object at `key`, or 404 naming `name`.
    async fn fetch(
        &self,
        info: &ResourceInfo,
        key: &str,
        name: &str,
    ) -> Result<KeyValue, ApiError> {
        self.fetch_optional(info, key, name)
            .await?
            .ok_or_else(|| ApiError::not_found(info, name))
    }

    pub(crate) async fn get(
        &self,
        request: ResourceRequest,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        let info = request.info;
        let name = request.name.as_deref().unwrap_or_default();
        let key = info.object_key(request.namespace.as_deref(), name);
        let stored = self.fetch(info, &key, name).await?;
        if request.subresource.is_none() && context.representation == Representation::Json {
            // The stored bytes with their version spliced in: no parse, no serialization.
            return Ok(bytes_response(
                StatusCode::OK,
                "application/json",
                encoding::object_bytes(&stored.value, stored.mod_revision),
            ));
        }
        let object = decode_stored(&stored)?;
        if request.subresource.as_deref() == Some("scale") {
            return Ok(json_response(StatusCode::OK, &scale_of(&object)));
        }
        Ok(object_response(
            info,
            object,
            context.representation,
            StatusCode::OK,
        ))
    }

    /// The objects of a collection that match the request's selectors, from the watch
    /// cache, with the list's revision and continue token.
    pub(crate) async fn list_matching(
        &self,
        info: &'static ResourceInfo,
        namespace: Option<&str>,
        context: &Context,
    ) -> Result<(Vec<Arc<CachedObject>>, i64, Option<String>), ApiError> {
        let filter = Filter {
            labels: LabelSelector::parse(context.query.get("labelSelector").unwrap_or(""))
                .map_err(ApiError::bad_request)?,
            fields: FieldSelector::parse(
                context.query.get("fieldSelector").unwrap_or(""),
                info.field_selectors,
            )
            .map_err(ApiError::bad_request)?,
        };
        let limit = match context.query.get("limit") {
            None | Some("" | "0") => None,
            Some(text) => Some(
                text.parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit: {text}")))?,
            ),
        };
        let prefix = info.list_prefix(namespace);
        let start_after = match context.query.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => Some(format!("{prefix}{}", decode_continue(token)?.start)),
            None => None,
        };
        // kube-apiserver's semantics: no version is a consistent read (every acknowledged
        // write is in it), "0" is any recent state, a version is at least that new.
        let wait_for =
            match context.query.get("resourceVersion") {
                None | Some("") => Some(
                    self.store
                        .current_revision()
                        .await
                        .map_err(|e| ApiError::from_store(e, info, ""))?,
                ),
                Some("0") => None,
                Some(text) => Some(text.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion: {text}"))
                })?),
            };
        if let Some(revision) = wait_for {
            self.cache.wait_for(revision).await?;
        }
        let page = self
            .cache
            .list(info, &prefix, start_after.as_deref(), limit, &filter);
        let continue_token = page.continue_after.map(|key| {
            let relative = key.strip_prefix(&prefix).unwrap_or(&key);
            encode_continue(page.revision, relative)
        });
        Ok((page.items, page.revision, continue_token))
    }

    pub(crate) async fn list(
        &self,
        request: ResourceRequest,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        let info = request.info;
        let (items, revision, continue_token) = self
            .list_matching(info, request.namespace.as_deref(), &context)
            .await?;
        if context.representation == Representation::Json {
            return Ok(cached_list_response(info, items, revision, continue_token));
        }
        let items = items
            .iter()
            .map(|item| item.to_value(item.revision))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(list_response(
            info,
            items,
            revision,
            continue_token,
            context.representation,
        ))
    }

    pub(crate) async fn create(
        &self,
        request: ResourceRequest,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        let info = request.info;
        let mode = FieldValidation::from_query(&context)?;
        let mut object = parse_body(&context)?;
        check_type_meta(info, &mut object, info.kind, &info.api_version())?;
        let (object, warnings) = decode_typed(info, object, mode)?;
        let created = self
            .create_object(
                info,
                request.namespace.as_deref(),
                object,
                context.query.dry_run(),
            )
            .await?;
        let response = object_response(info, created, context.representation, StatusCode::CREATED);
        Ok(with_warnings(response, &warnings))
    }

    /// Creates a decoded object: names it, defaults, validates, allocates and stores it.
    pub(crate) async fn create_object(
        &self,
        info: &ResourceInfo,
        request_namespace: Option<&str>,
        mut object: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let namespace = Self::resolve_namespace(info, request_namespace, &mut object)?;
        let generate = object["metadata"]["generateName"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let fixed_name = object["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        if fixed_name.is_none() && generate.is_empty() {
            return Err(ApiError::invalid(
                info,
                "",
                &[Cause {
                    reason: "FieldValueRequired",
                    field: "metadata.name".into(),
                    message: "Required value: name or generateName is required".into(),
                }],
            ));
        }
        if let Some(namespace) = &namespace {
            let shown = fixed_name.as_deref().unwrap_or(&generate);
            self.check_namespace_accepts(info, namespace, shown).await?;
        }
        {
            let metadata = object["metadata"]
                .as_object_mut()
                .expect("metadata is an object");
            for field in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
            ] {
                metadata.remove(field);
            }
            metadata.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            metadata.insert("creationTimestamp".into(), json!(now_rfc3339()));
        }
        strategy::normalize(info, &mut object);
        strategy::prepare_for_create(info, &mut object);
        defaults::apply_defaults(info.kind, &mut object);

        // A generated name that collides is drawn again, as kube-apiserver does.
        let attempts = if fixed_name.is_some() { 1 } else { 8 };
        for attempt in 0..attempts {
            let name = fixed_name
                .clone()
                .unwrap_or_else(|| generate_name(&generate));
            object["metadata"]["name"] = json!(name);
            strategy::prepare_named_for_create(info, &mut object);
            let found = causes(validation::validate(info.kind, &object, None));
            if !found.is_empty() {
                return Err(ApiError::invalid(info, &name, &found));
            }
            let allocations = if info.kind == "Service" {
                strategy::allocate_service(&self.allocator, info, &name, &mut object, None)?
            } else {
                strategy::ServiceAllocations::none(&self.allocator)
            };
            if dry_run {
                return Ok(object);
            }
            let key = info.object_key(namespace.as_deref(), &name);
            match self.store.create(&key, encode_for_store(&object)).await {
                Ok(revision) => {
                    allocations.commit();
                    set_resource_version(&mut object, revision);
                    return Ok(object);
                }
                Err(StoreError::AlreadyExists { .. }) if attempt + 1 < attempts => continue,
                Err(error) => return Err(ApiError::from_store(error, info, &name)),
            }
        }
        unreachable!("the last attempt returns")
    }

    pub(crate) async fn update(
        &self,
        request: ResourceRequest,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        let info = request.info;
        let name = request.name.clone().unwrap_or_default();
        let mode = FieldValidation::from_query(&context)?;
        let mut body = parse_body(&context)?;
        let (kind, api_version) = if request.subresource.as_deref() == Some("scale") {
            ("Scale", "autoscaling/v1".to_string())
        } else {
            (info.kind, info.api_version())
        };
        check_type_meta(info, &mut body, kind, &api_version)?;
        let body_name = body["metadata"]["name"].as_str().unwrap_or("");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let (change, warnings) = if kind == "Scale" {
            (Change::Replace(body), Vec::new())
        } else {
            let (decoded, warnings) = decode_typed(info, body, mode)?;
            (Change::Replace(decoded), warnings)
        };
        self.write_and_respond(&request, &name, change, mode, &context, &warnings)
            .await
    }

    pub(crate) async fn patch(
        &self,
        request: ResourceRequest,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        let name = request.name.clone().unwrap_or_default();
        let mode = FieldValidation::from_query(&context)?;
        let media = context.content_type.split(';').next().unwrap_or("").trim();
        let patch_type = match media {
            "application/json-patch+json" => PatchType::Json,
            "application/merge-patch+json" => PatchType::Merge,
            "application/strategic-merge-patch+json" => PatchType::Strategic,
            "application/apply-patch+yaml" => {
                return Err(ApiError::unsupported_media_type(
                    "server-side apply is not supported by this server; use client-side kubectl apply",
                ));
            }
            other => {
                return Err(ApiError::unsupported_media_type(format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {other})"
                )));
            }
        };
        let patch: Value = serde_json::from_slice(&context.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
        let change = Change::Patch { patch_type, patch };
        self.write_and_respond(&request, &name, change, mode, &context, &[])
            .await
    }

    /// Writes `change` to the object (or, through the `scale` subresource, to its Scale
    /// view) and answers in the representation the client asked for.
    async fn write_and_respond(
        &self,
        request: &ResourceRequest,
        name: &str,
        change: Change,
        mode: FieldValidation,
        context: &Context,
        warnings: &[String],
    ) -> Result<Response<Body>, ApiError> {
        let scale = request.subresource.as_deref() == Some("scale");
        let change = if scale {
            Change::Scale(Box::new(change))
        } else {
            change
        };
        let (object, status) = self
            .write(request, name, change, mode, context.query.dry_run())
            .await?;
        let response = if scale {
            json_response(status, &scale_of(&object))
        } else {
            object_response(request.info, object, context.representation, status)
        };
        Ok(with_warnings(response, warnings))
    }

    /// The read-modify-write loop shared by update, patch and the subresources.
    async fn write(
        &self,
        request: &ResourceRequest,
        name: &str,
        change: Change,
        mode: FieldValidation,
        dry_run: bool,
    ) -> Result<(Value, StatusCode), ApiError> {
        let info = request.info;
        let namespace = request.namespace.as_deref();
        let key = info.object_key(namespace, name);
        let _serialized = self.lock_key(&key).await;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let stored = self.fetch_optional(info, &key, name).await?;
            let Some(stored) = stored else {
                if let Change::Replace(body) = &change
                    && info.allow_create_on_update
                    && request.subresource.is_none()
                {
                    let created = self
                        .create_object(info, namespace, body.clone(), dry_run)
                        .await?;
                    return Ok((created, StatusCode::CREATED));
                }
                return Err(ApiError::not_found(info, name));
            };
            let old = decode_stored(&stored)?;
            let mut new = match &change {
                Change::Replace(body) => body.clone(),
                Change::Patch { patch_type, patch } => {
                    let patched = apply_patch(info, &old, *patch_type, patch)?;
                    verify_type_meta(info, &patched, info.kind, &info.api_version())?;
                    decode_typed(info, patched, mode)?.0
                }
                Change::Scale(scale_change) => {
                    let current = scale_of(&old);
                    let scale = match scale_change.as_ref() {
                        Change::Replace(body) => body.clone(),
                        Change::Patch { patch_type, patch } => {
                            apply_patch(info, &current, *patch_type, patch)?
                        }
                        Change::Scale(_) => unreachable!("scale changes do not nest"),
                    };
                    if let Some(rv) = scale["metadata"]["resourceVersion"]
                        .as_str()
                        .filter(|rv| !rv.is_empty())
                        && rv != stored.mod_revision.to_string()
                    {
                        return Err(ApiError::stale(info, name));
                    }
                    let replicas = scale["spec"]["replicas"].as_i64().unwrap_or(0);
                    let mut new = old.clone();
                    new["spec"]["replicas"] = json!(replicas);
                    new
                }
            };
            // A precondition is a version the client named: the body's for an update; for a
            // patch, only a version the patch itself changed (the patched object otherwise
            // carries the stored version, which must not turn a retry into a conflict).
            let explicit = match &change {
                Change::Scale(_) => None,
                Change::Replace(_) => resource_version_of(&new)?,
                Change::Patch { .. } => {
                    resource_version_of(&new)?.filter(|rv| *rv != stored.mod_revision)
                }
            };
            if explicit.is_some_and(|rv| rv != stored.mod_revision) {
                return Err(ApiError::stale(info, name));
            }
            new["kind"] = json!(info.kind);
            new["apiVersion"] = json!(info.api_version());
            new["metadata"]["name"] = json!(name);
            if let Some(namespace) = namespace {
                new["metadata"]["namespace"] = json!(namespace);
            }
            match request.subresource.as_deref() {
                Some("status") => strategy::prepare_for_status_update(&mut new, &old),
                _ => {
                    strategy::carry_server_metadata(&mut new, &old);
                    strategy::prepare_for_update(info, &mut new, &old);
                }
            }
            strategy::normalize(info, &mut new);
            defaults::apply_defaults(info.kind, &mut new);
            let found = causes(validation::validate(info.kind, &new, Some(&old)));
            if !found.is_empty() {
                return Err(ApiError::invalid(info, name, &found));
            }
            if same_but_version(&new, &old) {
                return Ok((old, StatusCode::OK));
            }
            // An object marked for deletion goes away when its last finalizer does.
            let finalizers_done = new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty);
            let grace_over = new["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(0)
                == 0;
            if new["metadata"]["deletionTimestamp"].is_string() && finalizers_done && grace_over {
                if dry_run {
                    return Ok((new, StatusCode::OK));
                }
                match self.store.delete(&key, Some(stored.mod_revision)).await {
                    Ok(deleted) => {
                        self.after_removal(info, &old);
                        set_resource_version(&mut new, deleted.mod_revision);
                        return Ok((new, StatusCode::OK));
                    }
                    Err(StoreError::Conflict { .. }) if explicit.is_none() => continue,
                    Err(error) => return Err(ApiError::from_store(error, info, name)),
                }
            }
            let allocations = if info.kind == "Service" {
                strategy::allocate_service(&self.allocator, info, name, &mut new, Some(&old))?
            } else {
                strategy::ServiceAllocations::none(&self.allocator)
            };
            if dry_run {
                return Ok((new, StatusCode::OK));
            }
            match self
                .store
                .update(&key, encode_for_store(&new), Some(stored.mod_revision))
                .await
            {
                Ok(revision) => {
                    allocations.commit();
                    set_resource_version(&mut new, revision);
                    return Ok((new, StatusCode::OK));
                }
                Err(StoreError::Conflict { .. }) if explicit.is_none() => continue,
                Err(error) => return Err(ApiError::from_store(error, info, name)),
            }
        }
        Err(ApiError::stale(info, name))
    }

    /// Gives back what a removed object held.
    fn after_removal(&self, info: &ResourceInfo, last: &Value) {
        if info.kind == "Service" {
            strategy::release_service(&self.allocator, last);
        }
    }

    pub(crate) async fn delete(
        &self,
        request: ResourceRequest,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        let info = request.info;
        let name = request.name.clone().unwrap_or_default();
        if request.subresource.is_some() {
            return Err(ApiError::method_not_allowed(
                "DELETE is not supported on subresources",
            ));
        }
        let options = DeleteOptions::from_request(&context)?;
        match self
            .delete_object(info, request.namespace.as_deref(), &name, &options)
            .await?
        {
            Deleted::Removed(object) | Deleted::Marked(object) => Ok(object_response(
                info,
                object,
                context.representation,
                StatusCode::OK,
            )),
        }
    }

    /// Deletes one object, honoring grace periods for pods and finalizers for all.
    pub(crate) async fn delete_object(
        &self,
        info: &ResourceInfo,
        namespace: Option<&str>,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Deleted, ApiError> {
        let key = info.object_key(namespace, name);
        let _serialized = self.lock_key(&key).await;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let stored = self.fetch(info, &key, name).await?;
            let old = decode_stored(&stored)?;
            if let Some(preconditions) = &options.preconditions {
                if let Some(uid) = &preconditions.uid
                    && old["metadata"]["uid"].as_str() != Some(uid.as_str())
                {
                    return Err(ApiError::conflict(
                        info,
                        name,
                        &format!(
                            "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                            old["metadata"]["uid"].as_str().unwrap_or("")
                        ),
                    ));
                }
                if let Some(rv) = &preconditions.resource_version
                    && *rv != stored.mod_revision.to_string()
                {
                    return Err(ApiError::conflict(
                        info,
                        name,
                        &format!(
                            "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                            stored.mod_revision
                        ),
                    ));
                }
            }
            let mut marked = old.clone();
            let already_marked = old["metadata"]["deletionTimestamp"].is_string();
            // Orphan and Foreground propagation are carried out by the garbage collector;
            // the object waits for it under a finalizer, as with kube-apiserver.
            let propagation_finalizer = match options.propagation_policy.as_deref() {
                Some("Orphan") => Some("orphan"),
                Some("Foreground") => Some("foregroundDeletion"),
                _ => None,
            };
            if let Some(finalizer) = propagation_finalizer
                && info.kind != "Namespace"
            {
                let mut finalizers = old["metadata"]["finalizers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !finalizers.iter().any(|f| f == finalizer) {
                    finalizers.push(json!(finalizer));
                    marked["metadata"]["finalizers"] = json!(finalizers);
                }
            }
            let finalizer_added = marked["metadata"]["finalizers"] != old["metadata"]["finalizers"];
            let has_finalizers = marked["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty());
            let mut grace = 0;
            if info.kind == "Pod" {
                let bound = old["spec"]["nodeName"]
                    .as_str()
                    .is_some_and(|n| !n.is_empty());
                let finished = matches!(
                    old["status"]["phase"].as_str(),
                    Some("Succeeded" | "Failed")
                );
                grace = options
                    .grace_period_seconds
                    .or_else(|| old["spec"]["terminationGracePeriodSeconds"].as_i64())
                    .unwrap_or(30)
                    .max(0);
                if !bound || finished {
                    grace = 0;
                }
                if already_marked {
                    let current = old["metadata"]["deletionGracePeriodSeconds"]
                        .as_i64()
                        .unwrap_or(0);
                    grace = grace.min(current);
                }
            }
            if info.kind == "Namespace" {
                if already_marked {
                    return Ok(Deleted::Marked(old));
                }
                marked["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                marked["status"]["phase"] = json!("Terminating");
            } else if grace > 0 || has_finalizers {
                let unchanged = already_marked
                    && !finalizer_added
                    && old["metadata"]["deletionGracePeriodSeconds"]
                        .as_i64()
                        .unwrap_or(0)
                        == grace;
                if unchanged {
                    return Ok(Deleted::Marked(old));
                }
                let when = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(grace);
                marked["metadata"]["deletionTimestamp"] =
                    json!(when.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
                marked["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            } else {
                if options.dry_run() {
                    return Ok(Deleted::Removed(old));
                }
                match self.store.delete(&key, Some(stored.mod_revision)).await {
                    Ok(deleted) => {
                        self.after_removal(info, &old);
                        let mut last = old;
                        set_resource_version(&mut last, deleted.mod_revision);
                        return Ok(Deleted::Removed(last));
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(StoreError::NotFound { .. }) => {
                        return Err(ApiError::not_found(info, name));
                    }
                    Err(error) => return Err(ApiError::from_store(error, info, name)),
                }
            }
            if options.dry_run() {
                return Ok(Deleted::Marked(marked));
            }
            match self
                .store
                .update(&key, encode_for_store(&marked), Some(stored.mod_revision))
                .await
            {
                Ok(revision) => {
                    set_resource_version(&mut marked, revision);
                    return Ok(Deleted::Marked(marked));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(ApiError::from_store(error, info, name)),
            }
        }
        Err(ApiError::stale(info, name))
    }

    /// Deletes one object with default options, as a controller inside the server does.
    pub async fn delete_internal(
        &self,
        info: &ResourceInfo,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), ApiError> {
        self.delete_object(info, namespace, name, &DeleteOptions::default())
            .await
            .map(|_| ())
    }

    pub(crate) async fn delete_collection(
        &self,
        request: ResourceRequest,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        let info = request.info;
        let options = DeleteOptions::from_request(&context)?;
        let (items, revision, _) = self
            .list_matching(info, request.namespace.as_deref(), &context)
            .await?;
        let mut deleted = Vec::with_capacity(items.len());
        for item in items {
            let item = item.to_value(item.revision)?;
            let namespace = item["metadata"]["namespace"].as_str().map(str::to_string);
            match self
                .delete_object(info, namespace.as_deref(), name_of(&item), &options)
                .await
            {
                Ok(Deleted::Removed(object) | Deleted::Marked(object)) => deleted.push(object),
                Err(error) if error.code == 404 => {}
                Err(error) => return Err(error),
            }
        }
        Ok(list_response(
            info,
            deleted,
            revision,
            None,
            context.representation,
        ))
    }

    /// `POST pods/{name}/binding`: assigns the pod to a node, once.
    pub(crate) async fn bind(
        &self,
        request: ResourceRequest,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        let info = request.info;
        let name = request.name.clone().unwrap_or_default();
        let binding = parse_body(&context)?;
        let node = binding["target"]["name"].as_str().unwrap_or("").to_string();
        if node.is_empty() {
            return Err(ApiError::invalid(
                info,
                &name,
                &[Cause {
                    reason: "FieldValueRequired",
                    field: "target.name".into(),
                    message: "Required value".into(),
                }],
            ));
        }
        let key = info.object_key(request.namespace.as_deref(), &name);
        let _serialized = self.lock_key(&key).await;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let stored = self.fetch(info, &key, &name).await?;
            let mut pod = decode_stored(&stored)?;
            if pod["metadata"]["deletionTimestamp"].is_string() {
                return Err(ApiError::conflict(
                    info,
                    &name,
                    &format!("pod {name} is being deleted, cannot be assigned to a host"),
                ));
            }
            if let Some(current) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
                return Err(ApiError::conflict(
                    info,
                    &name,
                    &format!("pod {name} is already assigned to node \"{current}\""),
                ));
            }
            pod["spec"]["nodeName"] = json!(node);
            let condition = json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now_rfc3339()});
            let conditions = pod["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut conditions: Vec<Value> = conditions
                .into_iter()
                .filter(|c| c["type"] != "PodScheduled")
                .collect();
            conditions.push(condition);
            pod["status"]["conditions"] = json!(conditions);
            if context.query.dry_run() {
                break;
            }
            match self
                .store
                .update(&key, encode_for_store(&pod), Some(stored.mod_revision))
                .await
            {
                Ok(_) => break,
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(ApiError::from_store(error, info, &name)),
            }
        }
        Ok(json_response(
            StatusCode::CREATED,
            &success_status(info, &name, None),
        ))
    }

    pub(crate) async fn restore_allocations(&self) -> anyhow::Result<()> {
        let services =
            super::registry::lookup("", "v1", "services").expect("services are registered");
        let page = self.store.list(&services.key_prefix(), None, None).await?;
        for kv in &page.items {
            let service = decode_stored(kv).map_err(|e| anyhow::anyhow!("{e}"))?;
            strategy::restore_service(&self.allocator, &service);
        }
        Ok(())
    }

    /// Creates what a new cluster has: the four standard namespaces.
    pub(crate) async fn bootstrap(self: &Arc<Self>) -> anyhow::Result<()> {
        let namespaces =
            super::registry::lookup("", "v1", "namespaces").expect("namespaces are registered");
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let object =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            match self.create_object(namespaces, None, object, false).await {
                Ok(_) => {}
                Err(error) if error.code == 409 => {}
                Err(error) => anyhow::bail!("create namespace {name}: {error}"),
            }
        }
        Ok(())
    }
}

fn apply_patch(
    info: &ResourceInfo,
    original: &Value,
    patch_type: PatchType,
    patch: &Value,
) -> Result<Value, ApiError> {
    let name = name_of(original).to_string();
    let failed = |message: String| {
        ApiError::invalid(
            info,
            &name,
            &[Cause {
                reason: "FieldValueInvalid",
                field: "patch".into(),
                message,
            }],
        )
    };
    match patch_type {
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            let mut target = original.clone();
            json_patch::merge(&mut target, patch);
            Ok(target)
        }
        PatchType::Json => {
            let operations: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("error decoding JSON patch: {e}")))?;
            let mut target = original.clone();
            json_patch::patch(&mut target, &operations).map_err(|e| failed(e.to_string()))?;
            Ok(target)
        }
        PatchType::Strategic => {
            strategic_merge::apply_strategic_merge_patch(info.kind, original, patch)
                .map_err(|e| failed(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_named_by_path() {
        let input = json!({"spec": {"containers": [{"name": "a", "imagee": "x"}], "extra": null, "bogus": 1}});
        let output = json!({"spec": {"containers": [{"name": "a"}]}});
        let mut found = Vec::new();
        unknown_fields(&input, &output, "", &mut found);
        assert_eq!(found, ["spec.bogus", "spec.containers[0].imagee"]);
    }

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let token = encode_continue(42, "web-7");
        let decoded = decode_continue(&token).unwrap();
        assert_eq!((decoded.rv, decoded.start.as_str()), (42, "web-7"));
        assert_eq!(decode_continue("%%%").err().unwrap().code, 400);
    }

    #[test]
    fn stored_objects_leave_out_only_the_version() {
        let object = json!({"kind": "Pod", "metadata": {"name": "a", "resourceVersion": "7", "labels": {"resourceVersion": "x"}}, "spec": {"metadata": {"resourceVersion": "y"}}});
        let stored: Value = serde_json::from_slice(&encode_for_store(&object)).unwrap();
        let mut expected = object.clone();
        expected["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("resourceVersion");
        assert_eq!(stored, expected);
    }

    #[test]
    fn objects_that_differ_only_in_version_are_the_same() {
        let a = json!({"metadata": {"name": "a", "resourceVersion": "1"}, "spec": {"x": 1}});
        let b = json!({"metadata": {"name": "a", "resourceVersion": "2"}, "spec": {"x": 1}});
        let c = json!({"metadata": {"name": "a"}, "spec": {"x": 1}});
        let d = json!({"metadata": {"name": "b"}, "spec": {"x": 1}});
        let e = json!({"metadata": {"name": "a"}, "spec": {"x": 2}});
        assert!(same_but_version(&a, &b) && same_but_version(&a, &c));
        assert!(!same_but_version(&a, &d) && !same_but_version(&a, &e));
        assert!(!same_but_version(&c, &json!({"metadata": {"name": "a"}})));
    }

    #[test]
    fn generated_names_keep_the_prefix() {
        let name = generate_name("web-");
        assert!(name.starts_with("web-") && name.len() == 9);
    }
}
