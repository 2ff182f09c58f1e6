//! `pods/{name}/log` and `pods/{name}/exec`: the requests the API server passes on to a
//! node, as kube-apiserver passes them to the kubelet. The pod names its node; the Node gives
//! its address (InternalIP first) and its node API port
//! (`status.daemonEndpoints.kubeletEndpoint.Port`). For a log, the node API's
//! `/containerLogs/{namespace}/{pod}/{container}` answers, and its body goes back to the
//! client as it arrives, unbuffered, so `kubectl logs -f` follows. For an exec, the client's
//! upgrade request (WebSocket, `v5.channel.k8s.io`) goes on to the node API's
//! `/exec/{namespace}/{pod}/{container}`; once the node has switched protocols, so has the
//! client, and the two upgraded connections are spliced byte for byte (`pods/{name}/attach`
//! likewise, to `/attach/...`): the API server reads
//! no frame of the stream. A node's refusal goes back to the client as the node wrote it,
//! as kube-apiserver's upgrade-aware proxy passes it.
//!
//! The API server authenticates to the node with a client certificate signed by the cluster
//! CA ([`crate::pki::node_client_identity`]), installed once at start through
//! [`install_client_identity`]; agents trust that CA with `--client-ca-file`.
//!
//! **Architecture invariant:** this is the only place the API server opens a connection.
//! It reads the pod and the Node from the store and nothing else; what a node answers is
//! never stored.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::{LazyLock, Mutex, OnceLock};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::registry::{self, ResourceInfo};
use super::status::ApiError;
use super::{ApiServer, Body, Context, Query, ResourceRequest, bytes_response};
use crate::pki::ClientIdentity;

/// The node API port of a Node that reports none, as kube-apiserver's `--kubelet-port`.
const DEFAULT_NODE_API_PORT: i64 = 10250;

/// At most this much of a node's error answer is read, as kube-apiserver reads it.
const MAX_ERROR_BODY: usize = 50_000;

/// Log chunks in flight between the node and the client; the node is read no faster than
/// the client takes them.
const CHUNKS_IN_FLIGHT: usize = 8;

/// The certificate the API server presents to node APIs.
static CLIENT_IDENTITY: OnceLock<ClientIdentity> = OnceLock::new();

/// One HTTPS client (and so one connection pool) per node API endpoint.
static NODE_CLIENTS: LazyLock<Mutex<HashMap<String, kube::Client>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Sets the client certificate for node APIs. The first call wins: the process has one CA.
pub fn install_client_identity(identity: ClientIdentity) {
    let _ = CLIENT_IDENTITY.set(identity);
}

/// PodLogOptions, decoded from the query as kube-apiserver decodes it.
#[derive(Debug, Default, PartialEq, Eq)]
struct LogOptions {
    container: Option<String>,
    follow: bool,
    previous: bool,
    timestamps: bool,
    since_seconds: Option<i64>,
    since_time: Option<jiff::Timestamp>,
    tail_lines: Option<i64>,
    limit_bytes: Option<i64>,
    stream: Option<String>,
}

/// A query boolean as kube-apiserver converts it: false only for `0`, `f`, `false`, `n`,
/// `no`, `off` (any case); present with any other value, even empty, is true.
fn query_flag(query: &Query, key: &str) -> bool {
    query.get(key).is_some_and(|value| {
        !(value == "0"
            || ["f", "false", "n", "no", "off"]
                .iter()
                .any(|no| value.eq_ignore_ascii_case(no)))
    })
}

fn query_integer(query: &Query, key: &str) -> Result<Option<i64>, ApiError> {
    query
        .get(key)
        .map(|value| {
            value
                .parse::<i64>()
                .map_err(|error| ApiError::bad_request(format!("invalid {key} {value:?}: {error}")))
        })
        .transpose()
}

impl LogOptions {
    /// Decodes and validates the options (`ValidatePodLogOptions`: 422 naming the field).
    /// `insecureSkipTLSVerifyBackend` is accepted and has no effect: node serving
    /// certificates are never verified (see [`node_client`]).
    fn parse(query: &Query, pod: &str) -> Result<Self, ApiError> {
        let since_time = query
            .get("sinceTime")
            .map(|value| {
                value.parse::<jiff::Timestamp>().map_err(|error| {
                    ApiError::bad_request(format!("invalid sinceTime {value:?}: {error}"))
                })
            })
            .transpose()?;
        let options = Self {
            container: query
                .get("container")
                .filter(|name| !name.is_empty())
                .map(str::to_string),
            follow: query_flag(query, "follow"),
            previous: query_flag(query, "previous"),
            timestamps: query_flag(query, "timestamps"),
            since_seconds: query_integer(query, "sinceSeconds")?,
            since_time,
            tail_lines: query_integer(query, "tailLines")?,
            limit_bytes: query_integer(query, "limitBytes")?,
            stream: query.get("stream").map(str::to_string),
        };
        let mut causes: Vec<(&str, String)> = Vec::new();
        if let Some(lines) = options.tail_lines
            && lines < 0
        {
            causes.push((
                "tailLines",
                format!("Invalid value: {lines}: must be greater than or equal to 0"),
            ));
        }
        if let Some(limit) = options.limit_bytes
            && limit < 1
        {
            causes.push((
                "limitBytes",
                format!("Invalid value: {limit}: must be greater than 0"),
            ));
        }
        match (options.since_seconds, options.since_time) {
            (Some(_), Some(_)) => causes.push((
                "",
                "Forbidden: at most one of `sinceTime` or `sinceSeconds` may be specified"
                    .to_string(),
            )),
            (Some(seconds), None) if seconds < 1 => causes.push((
                "sinceSeconds",
                format!("Invalid value: {seconds}: must be greater than 0"),
            )),
            _ => {}
        }
        if causes.is_empty() {
            Ok(options)
        } else {
            Err(invalid_options(pod, &causes))
        }
    }

    /// The node API's query, with only the options that differ from their defaults (as
    /// kube-apiserver's `LogLocation` builds it).
    fn node_query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (key, on) in [
            ("follow", self.follow),
            ("previous", self.previous),
            ("timestamps", self.timestamps),
        ] {
            if on {
                query.append_pair(key, "true");
            }
        }
        if let Some(seconds) = self.since_seconds {
            query.append_pair("sinceSeconds", &seconds.to_string());
        }
        if let Some(time) = self.since_time {
            // RFC 3339 to the second, as Go's time.RFC3339 formats it.
            query.append_pair(
                "sinceTime",
                &time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            );
        }
        if let Some(lines) = self.tail_lines {
            query.append_pair("tailLines", &lines.to_string());
        }
        if let Some(limit) = self.limit_bytes {
            query.append_pair("limitBytes", &limit.to_string());
        }
        if let Some(stream) = &self.stream {
            query.append_pair("stream", stream);
        }
        query.finish()
    }
}

/// kube-apiserver's 422 for PodLogOptions: `PodLogOptions "web" is invalid: <field>: <what>`.
fn invalid_options(pod: &str, causes: &[(&str, String)]) -> ApiError {
    let listed: Vec<String> = causes
        .iter()
        .map(|(field, message)| format!("{field}: {message}"))
        .collect();
    let summary = match listed.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    ApiError {
        code: 422,
        reason: "Invalid",
        message: format!("PodLogOptions \"{pod}\" is invalid: {summary}"),
        details: Some(json!({
            "name": pod,
            "kind": "PodLogOptions",
            "causes": causes.iter().map(|(field, message)| {
                let reason = if message.starts_with("Forbidden") { "FieldValueForbidden" } else { "FieldValueInvalid" };
                json!({"reason": reason, "message": message, "field": field})
            }).collect::<Vec<_>>(),
        })),
    }
}

/// PodExecOptions (or PodAttachOptions, which have no command), decoded from the query
/// (`command` repeats) as kube-apiserver decodes them.
#[derive(Debug, Default, PartialEq, Eq)]
struct ExecOptions {
    container: Option<String>,
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

impl ExecOptions {
    fn parse(raw_query: &str, stream: Stream) -> Result<Self, ApiError> {
        let mut options = Self::default();
        for (key, value) in form_urlencoded::parse(raw_query.as_bytes()) {
            let on = !(value == "0"
                || ["f", "false", "n", "no", "off"]
                    .iter()
                    .any(|no| value.eq_ignore_ascii_case(no)));
            match key.as_ref() {
                "container" if !value.is_empty() => options.container = Some(value.into_owned()),
                "command" => options.command.push(value.into_owned()),
                "stdin" => options.stdin = on,
                "stdout" => options.stdout = on,
                "stderr" => options.stderr = on,
                "tty" => options.tty = on,
                _ => {}
            }
        }
        if stream == Stream::Exec && options.command.is_empty() {
            return Err(ApiError::bad_request(
                "you must specify at least one command for the container",
            ));
        }
        if !(options.stdin || options.stdout || options.stderr) {
            return Err(ApiError::bad_request(
                "you must specify at least 1 of stdin, stdout, stderr",
            ));
        }
        Ok(options)
    }

    /// The node API's query, in the kubelet's names (`input`, `output`, `error`, `tty`),
    /// as kube-apiserver's `ExecLocation` builds it.
    fn node_query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for command in &self.command {
            query.append_pair("command", command);
        }
        for (key, on) in [
            ("input", self.stdin),
            ("output", self.stdout),
            ("error", self.stderr),
            ("tty", self.tty),
        ] {
            if on {
                query.append_pair(key, "1");
            }
        }
        query.finish()
    }
}

/// The two streaming subresources of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stream {
    /// `pods/exec`: a new process in the container.
    Exec,
    /// `pods/attach`: the streams of the container's own process.
    Attach,
}

impl Stream {
    /// The node API path's first segment, as the kubelet's.
    fn node_path(self) -> &'static str {
        match self {
            Stream::Exec => "exec",
            Stream::Attach => "attach",
        }
    }
}

/// The request headers an upgrade carries to the node: the upgrade itself, the WebSocket
/// handshake (key, version, offered protocols) and SPDY's protocol versions. The client's
/// credentials stay here; the API server authenticates to the node as itself.
const UPGRADE_HEADERS: [&str; 7] = [
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "x-stream-protocol-version",
];

/// The node's 101 headers the client needs to finish its handshake.
const SWITCHED_HEADERS: [&str; 6] = [
    "connection",
    "upgrade",
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "x-stream-protocol-version",
];

fn container_names<'a>(pod: &'a Value, list: &str) -> Vec<&'a str> {
    pod["spec"][list]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|container| container["name"].as_str())
        .collect()
}

/// The container to read: the one asked for, which the pod must have, or the pod's only
/// container. kube-apiserver's messages (400).
fn choose_container(pod: &Value, name: &str, requested: Option<&str>) -> Result<String, ApiError> {
    let containers = container_names(pod, "containers");
    let init_containers = container_names(pod, "initContainers");
    let ephemeral_containers = container_names(pod, "ephemeralContainers");
    if let Some(requested) = requested {
        let known = containers
            .iter()
            .chain(&init_containers)
            .chain(&ephemeral_containers)
            .any(|container| *container == requested);
        if !known {
            return Err(ApiError::bad_request(format!(
                "container {requested} is not valid for pod {name}"
            )));
        }
        return Ok(requested.to_string());
    }
    match containers.as_slice() {
        [only] => Ok(only.to_string()),
        [] => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}"
        ))),
        many => {
            let mut message = format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                many.join(" ")
            );
            if !init_containers.is_empty() {
                message.push_str(&format!(
                    " or one of the init containers: [{}]",
                    init_containers.join(" ")
                ));
            }
            if !ephemeral_containers.is_empty() {
                message.push_str(&format!(
                    " or one of the ephemeral containers: [{}]",
                    ephemeral_containers.join(" ")
                ));
            }
            Err(ApiError::bad_request(message))
        }
    }
}

/// A failure that is no API error (an unreachable node): 500 with the error's text and no
/// reason, as kube-apiserver reports an error it has no status for.
fn plain_error(message: String) -> ApiError {
    ApiError {
        code: 500,
        reason: "",
        message,
        details: None,
    }
}

/// The 405 of a method a pod subresource does not take, in kube-apiserver's words.
fn method_not_allowed(method: &Method) -> ApiError {
    ApiError::method_not_allowed(format!(
        "the server does not allow this method on the requested resource ({method})"
    ))
}

/// The body of a node's refusal, of which at most [`MAX_ERROR_BODY`] is read.
async fn read_refusal(body: kube::client::Body, url: &str) -> Result<Bytes, ApiError> {
    http_body_util::Limited::new(body, MAX_ERROR_BODY)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|error| ApiError::internal(format!("read the answer of {url}: {error}")))
}

/// `https://<address>:<port>` of a Node's API: its InternalIP (else ExternalIP, else a
/// name) and the port it reports. kube-apiserver prefers the Hostname address by default;
/// skiff prefers addresses, since node names need not resolve.
fn node_endpoint(node: &Value) -> Result<String, ApiError> {
    let addresses: Vec<(&str, &str)> = node["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|address| Some((address["type"].as_str()?, address["address"].as_str()?)))
        .filter(|(_, address)| !address.is_empty())
        .collect();
    let preferred = [
        "InternalIP",
        "ExternalIP",
        "Hostname",
        "InternalDNS",
        "ExternalDNS",
    ]
    .iter()
    .find_map(|kind| {
        addresses
            .iter()
            .find(|(address_kind, _)| address_kind == kind)
            .map(|(_, address)| *address)
    });
    let Some(address) = preferred else {
        let known: Vec<String> = addresses
            .iter()
            .map(|(kind, address)| format!("{{{kind} {address}}}"))
            .collect();
        return Err(plain_error(format!(
            "no preferred addresses found; known addresses: [{}]",
            known.join(" ")
        )));
    };
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_i64()
        .filter(|port| (1..=65535).contains(port))
        .unwrap_or(DEFAULT_NODE_API_PORT);
    Ok(match address.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("https://[{ip}]:{port}"),
        _ => format!("https://{address}:{port}"),
    })
}

/// The client for one node API endpoint, made on first use.
fn node_client(endpoint: &str) -> Result<kube::Client, ApiError> {
    let mut clients = NODE_CLIENTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(client) = clients.get(endpoint) {
        return Ok(client.clone());
    }
    let uri = endpoint
        .parse::<hyper::Uri>()
        .map_err(|error| plain_error(format!("node API address {endpoint}: {error}")))?;
    let mut config = kube::Config::new(uri);
    // The node's serving certificate is not verified, as kube-apiserver does not verify the
    // kubelet's without --kubelet-certificate-authority: an agent's certificate is
    // self-signed unless it is given one. The node does verify ours.
    config.accept_invalid_certs = true;
    // A followed log is open for as long as the client reads it.
    config.read_timeout = None;
    // A node's refusal goes back to the client as it is, not retried.
    config.default_retry = false;
    if let Some(identity) = CLIENT_IDENTITY.get() {
        let base64 = base64::engine::general_purpose::STANDARD;
        config.auth_info.client_certificate_data = Some(base64.encode(&identity.cert_pem));
        config.auth_info.client_key_data = Some(base64.encode(&identity.key_pem).into());
    }
    let client = kube::Client::try_from(config)
        .map_err(|error| plain_error(format!("client for node API {endpoint}: {error}")))?;
    clients.insert(endpoint.to_string(), client.clone());
    Ok(client)
}

/// A node's refusal as kube-apiserver reports it (`GenericHttpResponseChecker`): the node's
/// text is the message of a 400 or 500; other codes get the generic message of their
/// reason and the node's text as a cause.
fn node_error(status: StatusCode, pod: &str, text: &str) -> ApiError {
    let code = status.as_u16();
    let cause = json!([{"reason": "UnexpectedServerResponse", "message": text}]);
    let details = Some(json!({"name": pod, "kind": "pods/log", "causes": cause}));
    match code {
        400 => ApiError::bad_request(text),
        500 => ApiError {
            code,
            reason: "InternalError",
            message: format!("Internal error occurred: {text}"),
            details: Some(json!({"causes": [{"message": text}]})),
        },
        _ => {
            let (reason, message) = match code {
                401 => (
                    "Unauthorized",
                    "the server has asked for the client to provide credentials".to_string(),
                ),
                403 => ("Forbidden", text.to_string()),
                404 => (
                    "NotFound",
                    "the server could not find the requested resource".to_string(),
                ),
                405 => (
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource".to_string(),
                ),
                422 => (
                    "Invalid",
                    "the server rejected our request due to an error in our request".to_string(),
                ),
                429 => (
                    "TooManyRequests",
                    "the server has received too many requests and has asked us to try again later"
                        .to_string(),
                ),
                503 => (
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request".to_string(),
                ),
                504 => (
                    "Timeout",
                    "the server was unable to return a response in the time allotted, but may still be processing the request".to_string(),
                ),
                code if code >= 500 => (
                    "InternalError",
                    format!(
                        "an error on the server ({text:?}) has prevented the request from succeeding"
                    ),
                ),
                code => (
                    "",
                    format!(
                        "the server responded with the status code {code} but did not return more information"
                    ),
                ),
            };
            ApiError {
                code,
                reason,
                // The verb is empty in kube-apiserver's message, hence the space after "(".
                message: format!("{message} ( pods/log {pod})"),
                details,
            }
        }
    }
}

fn text_response(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Passes the node's body through frame by frame. A task of its own reads the node, so
/// the node connection is dropped as soon as the client goes away, even while the node
/// has nothing to send (a quiet follow).
fn pass_through(mut upstream: kube::client::Body) -> Body {
    let (sender, receiver) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(CHUNKS_IN_FLIGHT);
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                frame = upstream.frame() => frame,
                () = sender.closed() => return,
            };
            let forwarded = match frame {
                None => return,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => Ok(Frame::data(data)),
                    // Trailers: a log has none worth passing on.
                    Err(_) => continue,
                },
                // The node aborted its answer; aborting ours is how the client learns.
                Some(Err(error)) => Err(io::Error::other(error)),
            };
            let failed = forwarded.is_err();
            if sender.send(forwarded).await.is_err() || failed {
                return;
            }
        }
    });
    StreamBody::new(ReceiverStream::new(receiver)).boxed()
}

/// Splices the client's and the node's upgraded connections until both ends are done.
async fn splice(client: hyper::upgrade::OnUpgrade, node: hyper::upgrade::OnUpgrade, pod: String) {
    let (client, node) = match tokio::try_join!(client, node) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(pod, %error, "exec upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut node = hyper_util::rt::TokioIo::new(node);
    match tokio::io::copy_bidirectional(&mut client, &mut node).await {
        Ok((sent, received)) => tracing::debug!(pod, sent, received, "exec stream ended"),
        Err(error) => tracing::debug!(pod, %error, "exec stream ended with an error"),
    }
}

impl ApiServer {
    /// The stored object `name`, as JSON.
    async fn stored_object(
        &self,
        info: &ResourceInfo,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = info.object_key(namespace, name);
        let stored = self
            .store
            .get(&key)
            .await
            .map_err(|error| ApiError::from_store(error, info, name))?
            .ok_or_else(|| ApiError::not_found(info, name))?;
        serde_json::from_slice(&stored.value)
            .map_err(|error| ApiError::internal(format!("decode stored object {key}: {error}")))
    }

    /// The container of pod `name` that a log or stream is for, as [`choose_container`]
    /// chooses it, and the node the pod is bound to, if it is bound yet.
    async fn pod_container_and_node(
        &self,
        info: &ResourceInfo,
        namespace: &str,
        name: &str,
        requested: Option<&str>,
    ) -> Result<(String, Option<String>), ApiError> {
        let pod = self.stored_object(info, Some(namespace), name).await?;
        let container = choose_container(&pod, name, requested)?;
        let node_name = pod["spec"]["nodeName"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        Ok((container, node_name))
    }

    /// The API endpoint of node `node_name`, from its stored Node.
    async fn stored_node_endpoint(&self, node_name: &str) -> Result<String, ApiError> {
        let nodes = registry::lookup("", "v1", "nodes").expect("nodes are a served resource");
        let node = self.stored_object(nodes, None, node_name).await?;
        node_endpoint(&node)
    }

    /// `GET pods/{name}/log`: the container's log from its node's API.
    pub(crate) async fn pod_log(
        &self,
        request: ResourceRequest,
        context: Context,
    ) -> Result<Response<Body>, ApiError> {
        if context.method != Method::GET {
            return Err(method_not_allowed(&context.method));
        }
        let info = request.info;
        let namespace = request.namespace.as_deref().unwrap_or("default");
        let name = request.name.as_deref().unwrap_or_default();
        let options = LogOptions::parse(&context.query, name)?;
        let (container, node_name) = self
            .pod_container_and_node(info, namespace, name, options.container.as_deref())
            .await?;
        let Some(node_name) = node_name else {
            // A pod on no node yet has an empty log, as kube-apiserver answers.
            return Ok(text_response(
                Empty::new().map_err(|never| match never {}).boxed(),
            ));
        };
        let endpoint = self.stored_node_endpoint(&node_name).await?;

        let query = options.node_query();
        let mut path = format!("/containerLogs/{namespace}/{name}/{container}");
        if !query.is_empty() {
            path = format!("{path}?{query}");
        }
        let url = format!("{endpoint}{path}");
        let client = node_client(&endpoint)?;
        let upstream = hyper::Request::get(path.as_str())
            .body(kube::client::Body::empty())
            .map_err(|error| plain_error(format!("Get \"{url}\": {error}")))?;
        let response = client
            .send(upstream)
            .await
            .map_err(|error| plain_error(format!("Get \"{url}\": {error}")))?;
        let status = response.status();
        if !(200..=206).contains(&status.as_u16()) {
            let body = read_refusal(response.into_body(), &url).await?;
            return Err(node_error(
                status,
                name,
                String::from_utf8_lossy(&body).trim_end(),
            ));
        }
        Ok(text_response(pass_through(response.into_body())))
    }

    /// `GET`/`POST pods/{name}/exec` and `pods/{name}/attach`: the client's upgrade goes on
    /// to the pod's node, and once both have switched protocols the two connections are
    /// spliced.
    pub(crate) async fn pod_stream(
        &self,
        stream: Stream,
        request: ResourceRequest,
        mut context: Context,
    ) -> Result<Response<Body>, ApiError> {
        if context.method != Method::GET && context.method != Method::POST {
            return Err(method_not_allowed(&context.method));
        }
        let info = request.info;
        let namespace = request.namespace.as_deref().unwrap_or("default");
        let name = request.name.as_deref().unwrap_or_default();
        let options = ExecOptions::parse(&context.raw_query, stream)?;
        let (container, node_name) = self
            .pod_container_and_node(info, namespace, name, options.container.as_deref())
            .await?;
        let Some(node_name) = node_name else {
            return Err(ApiError::bad_request(format!(
                "pod {name} does not have a host assigned"
            )));
        };
        let Some(client_upgrade) = context.on_upgrade.take() else {
            return Err(ApiError::bad_request(format!(
                "Upgrade request required: pods/{} is a stream (WebSocket)",
                stream.node_path()
            )));
        };
        let endpoint = self.stored_node_endpoint(&node_name).await?;

        let path = format!(
            "/{}/{namespace}/{name}/{container}?{}",
            stream.node_path(),
            options.node_query()
        );
        let url = format!("{endpoint}{path}");
        let client = node_client(&endpoint)?;
        let mut upstream = hyper::Request::builder()
            .method(context.method.clone())
            .uri(path.as_str());
        for name in UPGRADE_HEADERS {
            for value in context.headers.get_all(name) {
                upstream = upstream.header(name, value);
            }
        }
        let upstream = upstream
            .body(kube::client::Body::empty())
            .map_err(|error| plain_error(format!("{} \"{url}\": {error}", context.method)))?;
        let mut response = client
            .send(upstream)
            .await
            .map_err(|error| plain_error(format!("error dialing backend: {error}")))?;
        let status = response.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            // The node's refusal goes back as it is, as kube-apiserver's proxy passes it.
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("text/plain; charset=utf-8"));
            let body = read_refusal(response.into_body(), &url).await?;
            let mut refused = bytes_response(status, "text/plain; charset=utf-8", body);
            refused.headers_mut().insert(CONTENT_TYPE, content_type);
            return Ok(refused);
        }
        let node_upgrade = hyper::upgrade::on(&mut response);
        let mut switched = Response::new(Empty::new().map_err(|never| match never {}).boxed());
        *switched.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        for name in SWITCHED_HEADERS {
            for value in response.headers().get_all(name) {
                switched
                    .headers_mut()
                    .append(header::HeaderName::from_static(name), value.clone());
            }
        }
        tokio::spawn(splice(
            client_upgrade,
            node_upgrade,
            format!("{namespace}/{name}"),
        ));
        Ok(switched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(query: &str) -> Result<LogOptions, ApiError> {
        LogOptions::parse(&Query::parse(Some(query)), "web")
    }

    #[test]
    fn options_decode_and_pass_on_only_what_differs_from_defaults() {
        assert_eq!(options("").unwrap(), LogOptions::default());
        assert_eq!(options("").unwrap().node_query(), "");
        let parsed = options(
            "container=app&follow=true&previous=1&timestamps=TRUE&tailLines=10&limitBytes=5&sinceSeconds=30&insecureSkipTLSVerifyBackend=true",
        )
        .unwrap();
        assert_eq!(parsed.container.as_deref(), Some("app"));
        assert_eq!(
            parsed.node_query(),
            "follow=true&previous=true&timestamps=true&sinceSeconds=30&tailLines=10&limitBytes=5"
        );
        // Booleans are false only for the "no" words, as kube-apiserver converts them.
        for no in ["0", "f", "False", "n", "NO", "off"] {
            assert!(!options(&format!("follow={no}")).unwrap().follow, "{no}");
        }
        assert!(options("follow=").unwrap().follow);
        // sinceTime in any offset goes on in UTC, to the second.
        assert_eq!(
            options("sinceTime=2024-01-01T01%3A00%3A00.5%2B01%3A00")
                .unwrap()
                .node_query(),
            "sinceTime=2024-01-01T00%3A00%3A00Z"
        );
    }

    #[test]
    fn bad_options_are_400_and_invalid_ones_422_naming_the_field() {
        for (query, code, message) in [
            ("tailLines=ten", 400, "invalid tailLines \"ten\""),
            ("sinceTime=yesterday", 400, "invalid sinceTime"),
            (
                "tailLines=-1",
                422,
                "PodLogOptions \"web\" is invalid: tailLines: Invalid value: -1: must be greater than or equal to 0",
            ),
            (
                "limitBytes=0",
                422,
                "PodLogOptions \"web\" is invalid: limitBytes: Invalid value: 0: must be greater than 0",
            ),
            (
                "sinceSeconds=0",
                422,
                "PodLogOptions \"web\" is invalid: sinceSeconds: Invalid value: 0: must be greater than 0",
            ),
            (
                "sinceSeconds=5&sinceTime=2024-01-01T00:00:00Z",
                422,
                "at most one of `sinceTime` or `sinceSeconds` may be specified",
            ),
        ] {
            let error = options(query).unwrap_err();
            assert_eq!(error.code, code, "{query}: {error}");
            assert!(error.message.contains(message), "{query}: {error}");
        }
        let status = options("tailLines=-1&limitBytes=0")
            .unwrap_err()
            .to_status();
        assert_eq!(status["reason"], "Invalid");
        assert_eq!(status["details"]["kind"], "PodLogOptions");
        assert_eq!(status["details"]["causes"][1]["field"], "limitBytes");
    }

    #[test]
    fn exec_options_repeat_the_command_and_go_on_in_the_kubelets_names() {
        let options = ExecOptions::parse(
            "command=sh&command=-c&command=exit+3&container=app&stdin=true&stdout=true&tty=false",
            Stream::Exec,
        )
        .unwrap();
        assert_eq!(options.command, ["sh", "-c", "exit 3"]);
        assert_eq!(options.container.as_deref(), Some("app"));
        assert_eq!(
            options.node_query(),
            "command=sh&command=-c&command=exit+3&input=1&output=1"
        );
        let error = ExecOptions::parse("stdout=true", Stream::Exec).unwrap_err();
        assert_eq!(
            (error.code, error.message.as_str()),
            (
                400,
                "you must specify at least one command for the container"
            )
        );
        let error = ExecOptions::parse("command=ls", Stream::Exec).unwrap_err();
        assert_eq!(
            error.message,
            "you must specify at least 1 of stdin, stdout, stderr"
        );
        // An attach has no command.
        let attach = ExecOptions::parse("container=app&stdout=true&stderr=1", Stream::Attach);
        assert_eq!(attach.unwrap().node_query(), "output=1&error=1");
    }

    #[test]
    fn the_container_is_the_named_or_the_only_one() {
        let one = json!({"spec": {"containers": [{"name": "app"}]}});
        assert_eq!(choose_container(&one, "web", None).unwrap(), "app");
        assert_eq!(choose_container(&one, "web", Some("app")).unwrap(), "app");
        assert_eq!(
            choose_container(&one, "web", Some("db"))
                .unwrap_err()
                .message,
            "container db is not valid for pod web"
        );
        let many = json!({"spec": {
            "initContainers": [{"name": "setup"}],
            "containers": [{"name": "a"}, {"name": "b"}],
        }});
        let error = choose_container(&many, "multi", None).unwrap_err();
        assert_eq!(error.code, 400);
        assert_eq!(
            error.message,
            "a container name must be specified for pod multi, choose one of: [a b] or one of the init containers: [setup]"
        );
        assert_eq!(
            choose_container(&many, "multi", Some("setup")).unwrap(),
            "setup"
        );
        let none = json!({"spec": {"containers": []}});
        assert_eq!(
            choose_container(&none, "empty", None).unwrap_err().message,
            "a container name must be specified for pod empty"
        );
    }

    #[test]
    fn node_endpoints_prefer_the_internal_ip_and_the_reported_port() {
        let node = json!({"status": {
            "addresses": [
                {"type": "Hostname", "address": "node-1"},
                {"type": "InternalIP", "address": "10.0.0.7"},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 41234}},
        }});
        assert_eq!(node_endpoint(&node).unwrap(), "https://10.0.0.7:41234");
        let v6 = json!({"status": {"addresses": [{"type": "InternalIP", "address": "fd00::7"}]}});
        assert_eq!(node_endpoint(&v6).unwrap(), "https://[fd00::7]:10250");
        let error = node_endpoint(&json!({"status": {}})).unwrap_err();
        assert_eq!(error.code, 500);
        assert_eq!(
            error.message,
            "no preferred addresses found; known addresses: []"
        );
    }

    #[test]
    fn node_refusals_become_kube_apiservers_statuses() {
        let waiting = node_error(
            StatusCode::BAD_REQUEST,
            "web",
            "container \"app\" in pod \"web\" is waiting to start: ContainerCreating",
        );
        assert_eq!((waiting.code, waiting.reason), (400, "BadRequest"));
        assert_eq!(
            waiting.message,
            "container \"app\" in pod \"web\" is waiting to start: ContainerCreating"
        );
        let missing = node_error(StatusCode::NOT_FOUND, "web", "pod \"web\" does not exist");
        assert_eq!((missing.code, missing.reason), (404, "NotFound"));
        assert_eq!(
            missing.message,
            "the server could not find the requested resource ( pods/log web)"
        );
        assert_eq!(
            missing.to_status()["details"]["causes"][0]["message"],
            "pod \"web\" does not exist"
        );
        let broken = node_error(StatusCode::INTERNAL_SERVER_ERROR, "web", "disk on fire");
        assert_eq!(broken.message, "Internal error occurred: disk on fire");
        let refused = node_error(StatusCode::UNAUTHORIZED, "web", "Unauthorized");
        assert_eq!(refused.reason, "Unauthorized");
    }
}
