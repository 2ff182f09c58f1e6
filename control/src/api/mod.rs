//! The API server's request path: routing, content negotiation and the generic verbs that
//! serve every resource in the [`registry`].
//!
//! **Architecture invariant:** there is no per-kind handler. A request is routed to a
//! [`registry::ResourceInfo`], and every difference between kinds lives in that table or in
//! the kind-keyed modules (`defaults`, `validation`, `strategy`, `printers`,
//! `strategic_merge`).

pub mod allocator;
mod cache;
pub mod defaults;
mod discovery;
mod encoding;
mod objects;
mod output;
pub mod printers;
pub mod proxy;
pub mod registry;
pub mod selectors;
pub mod status;
pub mod strategic_merge;
mod strategy;
pub mod validation;
mod watch;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;

use crate::store::Store;
use allocator::{Ipv4Cidr, ServiceAllocator};
use registry::ResourceInfo;
use status::ApiError;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Settings of the API server that clients can observe.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub service_cidr: Ipv4Cidr,
    pub node_ports: std::ops::RangeInclusive<u16>,
    /// Bodies larger than this are refused with 413, as kube-apiserver refuses them.
    pub max_body_bytes: usize,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// How many recent events the watch cache keeps per resource, for watches that
    /// resume from a version.
    pub watch_history: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            service_cidr: "10.96.0.0/12".parse().expect("valid default CIDR"),
            node_ports: 30000..=32767,
            max_body_bytes: 3 * 1024 * 1024,
            bookmark_interval: Duration::from_secs(30),
            watch_history: 10_000,
        }
    }
}

pub struct ApiServer {
    pub(crate) store: Arc<dyn Store>,
    /// Every object decoded once, for watches and lists.
    pub(crate) cache: Arc<cache::WatchCache>,
    pub(crate) allocator: ServiceAllocator,
    pub(crate) config: ApiConfig,
    /// Read-modify-write of one key is serialized here, so that racing writers to a hot
    /// object queue instead of spinning on store conflicts. Striped: a key maps to one lock.
    write_locks: Box<[tokio::sync::Mutex<()>]>,
}

const WRITE_LOCK_STRIPES: usize = 256;

/// What the request's `Accept` header asks the object in the response to look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Representation {
    Json,
    /// `as=Table;g=meta.k8s.io;v=v1`; rows carry the object as `includeObject` says.
    Table(IncludeObject),
    /// `as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`.
    PartialMetadata,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IncludeObject {
    None,
    Metadata,
    Object,
}

/// The query string, decoded.
#[derive(Debug, Default)]
pub(crate) struct Query(HashMap<String, String>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub(crate) fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    pub(crate) fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }
}

/// A request for a resource, after routing.
pub(crate) struct ResourceRequest {
    pub info: &'static ResourceInfo,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
    pub legacy_watch: bool,
}

pub(crate) struct Context {
    pub method: Method,
    pub query: Query,
    /// The query as sent: `pods/exec` repeats `command`, which [`Query`] keeps once.
    pub raw_query: String,
    pub headers: hyper::HeaderMap,
    /// The connection's upgrade, for `pods/exec` (hyper's, taken from the request).
    pub on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    pub representation: Representation,
    pub content_type: String,
    pub body: Bytes,
}

pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    bytes_response(status, "application/json", Bytes::from(body))
}

pub(crate) fn bytes_response(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Body> {
    let mut response = Response::new(
        Full::new(body)
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub(crate) fn error_response(error: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &error.to_status())
}

fn representation(accept: &str, query: &Query) -> Representation {
    // The first acceptable media type wins; kubectl lists the Table form first and plain
    // JSON as its fallback.
    for media in accept.split(',') {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        let as_param = params.iter().find_map(|p| p.strip_prefix("as="));
        match as_param {
            Some("Table") => {
                let include = match query.get("includeObject") {
                    Some("None") => IncludeObject::None,
                    Some("Object") => IncludeObject::Object,
                    _ => IncludeObject::Metadata,
                };
                return Representation::Table(include);
            }
            Some("PartialObjectMetadata" | "PartialObjectMetadataList") => {
                return Representation::PartialMetadata;
            }
            Some(_) => continue,
            None => return Representation::Json,
        }
    }
    Representation::Json
}

impl ApiServer {
    /// Builds the server over `store`, creating the namespaces and the `kubernetes` Service
    /// that a fresh cluster has, and rebuilding the Service allocations from the store.
    pub async fn new(store: Arc<dyn Store>, config: ApiConfig) -> anyhow::Result<Arc<Self>> {
        let allocator = ServiceAllocator::new(config.service_cidr, config.node_ports.clone());
        let cache = cache::WatchCache::start(store.clone(), config.watch_history).await?;
        let server = Arc::new(Self {
            cache,
            store,
            allocator,
            config,
            write_locks: (0..WRITE_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        });
        server.restore_allocations().await?;
        server.bootstrap().await?;
        Ok(server)
    }

    /// Holds the write lock of `key` for a read-modify-write.
    pub(crate) async fn lock_key(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        key.hash(&mut hasher);
        let stripe = (hasher.finish() % self.write_locks.len() as u64) as usize;
        self.write_locks[stripe].lock().await
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Serves one authenticated request.
    pub async fn handle(
        self: &Arc<Self>,
        request: Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path().to_string();
        let query = Query::parse(parts.uri.query());
        let accept = parts
            .headers
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json");
        let representation = representation(accept, &query);
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();

        let limited = http_body_util::Limited::new(body, self.config.max_body_bytes);
        let body = match limited.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                let error = if error.is::<http_body_util::LengthLimitError>() {
                    ApiError::too_large(format!(
                        "the request body is larger than the limit of {} bytes",
                        self.config.max_body_bytes
                    ))
                } else {
                    ApiError::bad_request(format!("read request body: {error}"))
                };
                return error_response(&error);
            }
        };
        let context = Context {
            method: parts.method,
            query,
            raw_query: parts.uri.query().unwrap_or("").to_string(),
            on_upgrade: parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
            headers: parts.headers,
            representation,
            content_type,
            body,
        };
        match self.route(&path, context).await {
            Ok(response) => response,
            Err(error) => error_response(&error),
        }
    }

    async fn route(
        self: &Arc<Self>,
        path: &str,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        let segments: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let read_only = context.method == Method::GET;
        match segments.as_slice() {
            ["version"] if read_only => Ok(json_response(StatusCode::OK, &discovery::version())),
            ["healthz" | "livez" | "readyz", ..] if read_only => Ok(bytes_response(
                StatusCode::OK,
                "text/plain",
                Bytes::from_static(b"ok"),
            )),
            ["api"] if read_only => Ok(json_response(StatusCode::OK, &discovery::api_versions())),
            ["apis"] if read_only => {
                Ok(json_response(StatusCode::OK, &discovery::api_group_list()))
            }
            ["apis", group] if read_only => discovery::api_group(group)
                .map(|g| json_response(StatusCode::OK, &g))
                .ok_or_else(|| ApiError::not_found_path(path)),
            ["api", "v1"] if read_only => Ok(json_response(
                StatusCode::OK,
                &discovery::resource_list("", "v1"),
            )),
            ["apis", group, version] if read_only => {
                if registry::in_group_version(group, version).next().is_none() {
                    return Err(ApiError::not_found_path(path));
                }
                Ok(json_response(
                    StatusCode::OK,
                    &discovery::resource_list(group, version),
                ))
            }
            ["openapi", "v2"] if read_only => {
                Ok(json_response(StatusCode::OK, &discovery::openapi_v2()))
            }
            ["openapi", "v3"] if read_only => {
                Ok(json_response(StatusCode::OK, &discovery::openapi_v3_root()))
            }
            ["openapi", "v3", rest @ ..] if read_only => {
                discovery::openapi_v3_document(&rest.join("/"))
                    .map(|d| bytes_response(StatusCode::OK, "application/json", d))
                    .ok_or_else(|| ApiError::not_found_path(path))
            }
            ["api", "v1", rest @ ..] => {
                let request =
                    route_resource("", "v1", rest).ok_or_else(|| ApiError::not_found_path(path))?;
                self.serve_resource(request, context).await
            }
            ["apis", group, version, rest @ ..] => {
                let request = route_resource(group, version, rest)
                    .ok_or_else(|| ApiError::not_found_path(path))?;
                self.serve_resource(request, context).await
            }
            _ => Err(ApiError::not_found_path(path)),
        }
    }

    async fn serve_resource(
        self: &Arc<Self>,
        request: ResourceRequest,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        if let Some(subresource) = &request.subresource
            && !request.info.has_subresource(subresource)
        {
            return Err(ApiError::not_found_path(&format!(
                "{}/{}",
                request.info.resource, subresource
            )));
        }
        if request.subresource.as_deref() == Some("log") {
            return self.pod_log(request, context).await;
        }
        match request.subresource.as_deref() {
            Some("exec") => return self.pod_stream(proxy::Stream::Exec, request, context).await,
            Some("attach") => {
                return self
                    .pod_stream(proxy::Stream::Attach, request, context)
                    .await;
            }
            _ => {}
        }
        let watch = request.legacy_watch || context.query.flag("watch");
        match (&context.method, &request.name, watch) {
            (&Method::GET, None, true) => self.watch(request, context).await,
            (&Method::GET, Some(name), true) => {
                // A watch of one object is a watch of its collection narrowed by name.
                let name = name.clone();
                self.watch_named(request, context, name).await
            }
            (&Method::GET, None, false) => self.list(request, context).await,
            (&Method::GET, Some(_), false) => self.get(request, context).await,
            (&Method::POST, None, false) => self.create(request, context).await,
            (&Method::POST, Some(_), false)
                if request.subresource.as_deref() == Some("binding") =>
            {
                self.bind(request, context).await
            }
            (&Method::POST, Some(_), false)
                if request.info.resource == "pods" && request.subresource.is_none() =>
            {
                // `POST pods/{name}/binding` is routed above; POST on a named pod is not a verb.
                Err(ApiError::method_not_allowed(
                    "POST is not supported on a named pod",
                ))
            }
            (&Method::PUT, Some(_), false) => self.update(request, context).await,
            (&Method::PATCH, Some(_), false) => self.patch(request, context).await,
            (&Method::DELETE, Some(_), false) => self.delete(request, context).await,
            (&Method::DELETE, None, false) => self.delete_collection(request, context).await,
            (method, _, _) => Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({method})"
            ))),
        }
    }
}

/// Routes the part of a path after `/api/v1` or `/apis/{group}/{version}`.
fn route_resource(group: &str, version: &str, rest: &[&str]) -> Option<ResourceRequest> {
    let (legacy_watch, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let lookup = |resource: &str| registry::lookup(group, version, resource);
    let request = |info, namespace: Option<&str>, name: Option<&str>, subresource: Option<&str>| {
        Some(ResourceRequest {
            info,
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
            subresource: subresource.map(str::to_string),
            legacy_watch,
        })
    };
    match rest {
        // `namespaces/{ns}/{resource}...` when {resource} is a namespaced resource of this
        // group; otherwise `namespaces/{name}/{subresource}` on the Namespace itself.
        ["namespaces", namespace, resource, tail @ ..]
            if lookup(resource).is_some_and(|i| i.namespaced) =>
        {
            let info = lookup(resource)?;
            match tail {
                [] => request(info, Some(namespace), None, None),
                [name] => request(info, Some(namespace), Some(name), None),
                [name, subresource] => {
                    request(info, Some(namespace), Some(name), Some(subresource))
                }
                _ => None,
            }
        }
        [resource] => request(lookup(resource)?, None, None, None),
        [resource, name] => request(lookup(resource)?, None, Some(name), None),
        [resource, name, subresource] => {
            let info = lookup(resource)?;
            if info.namespaced {
                return None;
            }
            request(info, None, Some(name), Some(subresource))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_namespaced_cluster_and_subresource_paths() {
        let r = route_resource(
            "",
            "v1",
            &["namespaces", "default", "pods", "web", "status"],
        )
        .unwrap();
        assert_eq!(
            (
                r.info.resource,
                r.namespace.as_deref(),
                r.name.as_deref(),
                r.subresource.as_deref()
            ),
            ("pods", Some("default"), Some("web"), Some("status"))
        );
        let r = route_resource("", "v1", &["namespaces", "default"]).unwrap();
        assert_eq!(
            (r.info.resource, r.name.as_deref()),
            ("namespaces", Some("default"))
        );
        let r = route_resource("", "v1", &["namespaces", "team", "status"]).unwrap();
        assert_eq!(
            (r.info.resource, r.subresource.as_deref()),
            ("namespaces", Some("status"))
        );
        let r = route_resource("", "v1", &["pods"]).unwrap();
        assert!(r.namespace.is_none() && r.name.is_none());
        let r = route_resource("apps", "v1", &["watch", "namespaces", "x", "deployments"]).unwrap();
        assert!(r.legacy_watch);
        assert!(route_resource("", "v1", &["deployments"]).is_none());
        assert!(route_resource("", "v1", &["pods", "a", "status"]).is_none());
    }

    #[test]
    fn accept_header_picks_the_first_known_representation() {
        let query = Query::default();
        assert_eq!(
            representation(
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
                &query
            ),
            Representation::Table(IncludeObject::Metadata)
        );
        assert_eq!(
            representation("application/json", &query),
            Representation::Json
        );
        assert_eq!(
            representation(
                "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io,application/json",
                &query
            ),
            Representation::Table(IncludeObject::Metadata)
        );
        assert_eq!(
            representation(
                "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
                &query
            ),
            Representation::PartialMetadata
        );
    }
}
