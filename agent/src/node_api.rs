//! The node API, the kubelet's port: `GET /healthz`, `GET /pods`,
//! `GET /containerLogs/{namespace}/{pod}/{container}` and the WebSocket upgrade of
//! `/exec/{namespace}/{pod}/{container}` ([`crate::exec`]) over HTTPS (hyper + rustls), which
//! the API server proxies `pods/{name}/log` and `pods/{name}/exec` to.
//!
//! **Architecture invariant:** everything but `/healthz` needs a client certificate signed
//! by the configured CA (the control plane's, with which the API server mints its client
//! certificate) or a bearer token from the configured token file. With neither configured,
//! only `/healthz` answers. There is no authorization beyond that.
//!
//! The API knows nothing of containerd or pod workers: what it serves comes from a
//! [`NodeState`] the agent passes in.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::exec::{self, ExecOptions, Executor};
use crate::logs::{LogOptions, StreamSelection, read_logs};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// What the node API serves, supplied by the agent.
pub trait NodeState: Send + Sync {
    /// The pods this node runs, as the agent last saw them.
    fn pods(&self) -> Vec<Pod>;

    /// Where a container's log is: the current run's, or with `previous` the run before
    /// (restartCount - 1). The kubelet's errors: an unknown pod or container is
    /// [`LogLookupError::PodNotFound`] / [`LogLookupError::ContainerNotFound`] (404); a
    /// container with no log to show is [`LogLookupError::Unavailable`] (400), with the
    /// kubelet's messages from its constructors.
    fn container_log(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        previous: bool,
    ) -> Result<ContainerLogSource, LogLookupError>;

    /// The containerd ID of a container that runs now, for exec. An unknown pod is
    /// [`LogLookupError::PodNotFound`]; a container that is unknown or not running is
    /// [`LogLookupError::ContainerNotFound`], as the kubelet finds only running containers.
    /// By default there is none: a state that runs no containers serves logs only.
    fn running_container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Result<String, LogLookupError> {
        let _ = namespace;
        Err(LogLookupError::container_not_found(container, pod))
    }
}

/// A container log to read, and whether its container is still running (a follower stops
/// once this turns false, or once the sender is dropped).
pub struct ContainerLogSource {
    pub path: PathBuf,
    pub running: watch::Receiver<bool>,
}

impl ContainerLogSource {
    /// The log of a container that no longer runs (an exited one, or `previous`).
    pub fn finished(path: PathBuf) -> Self {
        let (_, running) = watch::channel(false);
        Self { path, running }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogLookupError {
    #[error("pod \"{pod}\" does not exist")]
    PodNotFound { pod: String },
    #[error("container \"{container}\" not found in pod \"{pod}\"")]
    ContainerNotFound { pod: String, container: String },
    /// The container exists but has no log to show; the message is the whole answer.
    #[error("{0}")]
    Unavailable(String),
}

impl LogLookupError {
    /// A container that has not started yet (`reason` as in its waiting state, e.g.
    /// `ContainerCreating`).
    pub fn waiting(container: &str, pod: &str, reason: &str) -> Self {
        Self::Unavailable(format!(
            "container \"{container}\" in pod \"{pod}\" is waiting to start: {reason}"
        ))
    }

    /// A container the pod does not have (or, for exec, that does not run).
    pub fn container_not_found(container: &str, pod: &str) -> Self {
        Self::ContainerNotFound {
            pod: pod.to_string(),
            container: container.to_string(),
        }
    }

    /// `previous` asked of a container that never restarted.
    pub fn previous_not_found(container: &str, pod: &str) -> Self {
        Self::Unavailable(format!(
            "previous terminated container \"{container}\" in pod \"{pod}\" not found"
        ))
    }

    pub fn not_available(container: &str, pod: &str) -> Self {
        Self::Unavailable(format!(
            "container \"{container}\" in pod \"{pod}\" is not available"
        ))
    }

    fn status(&self) -> StatusCode {
        match self {
            LogLookupError::PodNotFound { .. } | LogLookupError::ContainerNotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            LogLookupError::Unavailable(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// The certificate the node API serves.
#[derive(Clone, Debug)]
pub enum ServingCertificate {
    /// Made at start, as the kubelet does without `--tls-cert-file`: a throwaway CA and a
    /// certificate it signs for `hosts` (the node's addresses and names; `localhost` and
    /// `127.0.0.1` are always added). [`NodeApi::serving_ca_pem`] gives the CA.
    SelfSigned { hosts: Vec<String> },
    /// PEM files: the certificate chain and its private key.
    Files { cert: PathBuf, key: PathBuf },
}

#[derive(Clone, Debug)]
pub struct NodeApiConfig {
    pub listen: SocketAddr,
    pub serving_certificate: ServingCertificate,
    /// PEM CA bundle: a client certificate it signed authenticates a request.
    pub client_ca_file: Option<PathBuf>,
    /// Static bearer tokens, kube-apiserver's `--token-auth-file` format
    /// (`token,user,uid[,"group1,group2"]`).
    pub token_file: Option<PathBuf>,
}

/// The node API bound to its port, ready to [`NodeApi::run`].
pub struct NodeApi {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    service: Service,
    serving_ca_pem: Option<String>,
}

/// Binds and serves until the process ends.
pub async fn serve(config: NodeApiConfig, state: Arc<dyn NodeState>) -> anyhow::Result<()> {
    NodeApi::bind(config, state).await?.run().await
}

impl NodeApi {
    /// Loads the credentials and binds the port (port 0 picks a free one; see
    /// [`NodeApi::local_addr`]).
    pub async fn bind(config: NodeApiConfig, state: Arc<dyn NodeState>) -> anyhow::Result<Self> {
        let tokens = match &config.token_file {
            Some(path) => {
                let contents = std::fs::read_to_string(path)
                    .with_context(|| format!("read token file {}", path.display()))?;
                parse_token_file(&contents)
                    .with_context(|| format!("parse token file {}", path.display()))?
            }
            None => HashMap::new(),
        };
        let (tls, serving_ca_pem) = tls_config(&config)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("bind the node API to {}", config.listen))?;
        Ok(Self {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            service: Service {
                state,
                users_by_token: tokens,
                executor: None,
            },
            serving_ca_pem,
        })
    }

    /// Serves `/exec` with `executor`; without one, exec requests are refused.
    pub fn with_executor(mut self, executor: Executor) -> Self {
        self.service.executor = Some(executor);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// The CA of a self-signed serving certificate, for clients to trust.
    pub fn serving_ca_pem(&self) -> Option<&str> {
        self.serving_ca_pem.as_deref()
    }

    /// Serves connections until the process ends.
    pub async fn run(self) -> anyhow::Result<()> {
        let service = Arc::new(self.service);
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Running out of descriptors must not end the server; back off instead.
                    tracing::warn!(%error, "node API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let acceptor = self.acceptor.clone();
            let service = service.clone();
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "node API TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                // The handshake verified any certificate the client presented against the
                // client CA; presenting none is allowed (a token may follow).
                let client_certificate = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .is_some_and(|certs| !certs.is_empty());
                let handler = service_fn(move |request| {
                    let service = service.clone();
                    async move { Ok::<_, Infallible>(service.handle(request, client_certificate).await) }
                });
                let result = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), handler)
                    .await;
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "node API connection ended with an error");
                }
            });
        }
    }
}

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// The streaming requests of the node API.
#[derive(Clone, Copy, Debug)]
enum Stream {
    /// A new process in the container.
    Exec,
    /// The streams of the container's own process.
    Attach,
}

/// What an upgraded stream connection serves.
enum Session {
    Exec(Executor, String),
    Attach(ContainerLogSource),
}

struct Service {
    state: Arc<dyn NodeState>,
    users_by_token: HashMap<String, String>,
    executor: Option<Executor>,
}

impl Service {
    async fn handle<B>(&self, mut request: Request<B>, client_certificate: bool) -> Response<Body> {
        let path = request.uri().path().to_string();
        // A stream is upgraded from a GET (WebSocket) or a POST (SPDY, which is refused
        // below with a message).
        let streaming = path.starts_with("/exec/") || path.starts_with("/attach/");
        let allowed = request.method() == Method::GET
            || request.method() == Method::HEAD
            || (streaming && request.method() == Method::POST);
        if !allowed {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        if path == "/healthz" {
            return text(StatusCode::OK, "ok");
        }
        let user = if client_certificate {
            Some("client-certificate")
        } else {
            self.token_user(&request)
        };
        let Some(user) = user else {
            return text(StatusCode::UNAUTHORIZED, "Unauthorized\n");
        };
        tracing::debug!(%path, user, "node API request");
        if path == "/pods" || path == "/pods/" {
            return self.pods();
        }
        if let Some(rest) = path.strip_prefix("/containerLogs/") {
            let segments: Vec<&str> = rest.split('/').collect();
            if let [namespace, pod, container] = segments[..]
                && !namespace.is_empty()
                && !pod.is_empty()
                && !container.is_empty()
            {
                let query = request.uri().query().unwrap_or("");
                return self
                    .container_logs(
                        &percent_decode(namespace),
                        &percent_decode(pod),
                        &percent_decode(container),
                        query,
                    )
                    .await;
            }
        }
        let stream = [("/exec/", Stream::Exec), ("/attach/", Stream::Attach)]
            .into_iter()
            .find_map(|(prefix, stream)| Some((path.strip_prefix(prefix)?, stream)));
        if let Some((rest, stream)) = stream {
            let segments: Vec<&str> = rest.split('/').collect();
            if let [namespace, pod, container] = segments[..]
                && !namespace.is_empty()
                && !pod.is_empty()
                && !container.is_empty()
            {
                let (namespace, pod, container) = (
                    percent_decode(namespace),
                    percent_decode(pod),
                    percent_decode(container),
                );
                return self.stream(stream, &mut request, &namespace, &pod, &container);
            }
        }
        text(StatusCode::NOT_FOUND, "404 page not found\n")
    }

    /// `/exec/{namespace}/{pod}/{container}` and `/attach/...`: checks the container runs
    /// and the request is a WebSocket upgrade to a protocol the node speaks, answers 101 and
    /// serves the session on the upgraded connection. Refusals are the kubelet's: 404 `pod
    /// does not exist`, 500 `container not found ("name")`, 400 for bad options.
    fn stream<B>(
        &self,
        stream: Stream,
        request: &mut Request<B>,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Response<Body> {
        let query = request.uri().query().unwrap_or("");
        let parsed = match stream {
            Stream::Exec => ExecOptions::parse(query),
            Stream::Attach => ExecOptions::parse_attach(query),
        };
        let options = match parsed {
            Ok(options) => options,
            Err(message) => return text(StatusCode::BAD_REQUEST, &message),
        };
        if matches!(stream, Stream::Attach) && options.stdin {
            // kubectl asks for stdin only of a container whose spec has one.
            return text(
                StatusCode::BAD_REQUEST,
                "attaching to stdin is not supported: containers run without one",
            );
        }
        let container_id = match self.state.running_container(namespace, pod, container) {
            Ok(id) => id,
            Err(LogLookupError::PodNotFound { .. }) => {
                return text(StatusCode::NOT_FOUND, "pod does not exist");
            }
            Err(_) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("container not found ({container:?})"),
                );
            }
        };
        let headers = request.headers();
        let header_text = |name: header::HeaderName| {
            headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("")
        };
        let websocket = header_text(header::UPGRADE).eq_ignore_ascii_case("websocket");
        let key = header_text(header::SEC_WEBSOCKET_KEY).to_string();
        if !websocket || key.is_empty() {
            return bad_request_status(
                "skiff nodes speak the WebSocket remote command protocols (v5.channel.k8s.io, \
                 v4.channel.k8s.io) only; SPDY is not supported",
            );
        }
        let offered = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|value| value.to_str().ok());
        let Some(protocol) = exec::negotiate(offered) else {
            return bad_request_status(
                "none of the offered protocols is supported (v5.channel.k8s.io, \
                 v4.channel.k8s.io)",
            );
        };
        let session = match stream {
            Stream::Exec => {
                let Some(executor) = self.executor.clone() else {
                    return text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "exec is not available on this node",
                    );
                };
                Session::Exec(executor, container_id)
            }
            Stream::Attach => match self.state.container_log(namespace, pod, container, false) {
                Ok(log) => Session::Attach(log),
                Err(error) => return text(error.status(), &error.to_string()),
            },
        };
        let on_upgrade = hyper::upgrade::on(request);
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(error) => {
                    tracing::debug!(%error, "stream connection upgrade failed");
                    return;
                }
            };
            match session {
                Session::Exec(executor, container_id) => {
                    executor
                        .serve(upgraded, protocol, &container_id, options)
                        .await;
                }
                Session::Attach(log) => exec::serve_attach(upgraded, log, options).await,
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header(
                header::SEC_WEBSOCKET_ACCEPT,
                derive_accept_key(key.as_bytes()),
            )
            .header(header::SEC_WEBSOCKET_PROTOCOL, protocol)
            .body(full(Bytes::new()))
            .expect("a valid response")
    }

    fn token_user<B>(&self, request: &Request<B>) -> Option<&str> {
        let header = request
            .headers()
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?;
        let (scheme, token) = header.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.users_by_token.get(token.trim()).map(String::as_str)
    }

    fn pods(&self) -> Response<Body> {
        let list = k8s_openapi::List::<Pod> {
            items: self.state.pods(),
            metadata: Default::default(),
        };
        match serde_json::to_vec(&list) {
            Ok(json) => Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(full(json))
                .expect("a valid response"),
            Err(error) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("encode pod list: {error}\n"),
            ),
        }
    }

    async fn container_logs(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        query: &str,
    ) -> Response<Body> {
        let query = match parse_log_query(query, Timestamp::now()) {
            Ok(query) => query,
            Err(error) => return text(error.status, &error.message),
        };
        let source = match self
            .state
            .container_log(namespace, pod, container, query.previous)
        {
            Ok(source) => source,
            Err(error) => return text(error.status(), &error.to_string()),
        };
        let stream = match read_logs(&source.path, query.options, source.running).await {
            Ok(stream) => stream,
            Err(error) => return text(StatusCode::BAD_REQUEST, &error.to_string()),
        };
        let body = StreamBody::new(stream.map(|chunk| match chunk {
            Ok(bytes) => Ok(Frame::data(bytes)),
            Err(error) => {
                // Headers are gone: aborting the response is how the client learns.
                tracing::warn!(%error, "container log stream failed");
                Err(io::Error::other(error))
            }
        }));
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(UnsyncBoxBody::new(body))
            .expect("a valid response")
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A 400 as a `Status`, which kubectl prints as it is: a plain-text body holding `: ` reads
/// to its decoder as a YAML mapping, and its message would be lost.
fn bad_request_status(message: &str) -> Response<Body> {
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "BadRequest",
        "code": 400,
    });
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(status.to_string()))
        .expect("a valid response")
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(message.to_string()))
        .expect("a valid response")
}

/// The options of one `containerLogs` request.
#[derive(Debug, PartialEq, Eq)]
pub struct LogQuery {
    pub options: LogOptions,
    pub previous: bool,
}

/// A request the node API refuses: 400 for a query it cannot decode, 422 for values
/// PodLogOptions validation refuses, as the kubelet answers.
#[derive(Debug, PartialEq, Eq)]
pub struct QueryError {
    pub status: StatusCode,
    pub message: String,
}

impl QueryError {
    fn bad(message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }

    fn invalid(message: String) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message,
        }
    }
}

/// Decodes PodLogOptions from a query as the kubelet does: `follow`, `previous`,
/// `timestamps` (a boolean is false only for `0`, `f`, `false`, `n`, `no`, `off`), `tailLines`
/// (or the legacy `tail`, where `all` means no limit), `sinceSeconds`, `sinceTime`
/// (RFC 3339), `limitBytes`, `stream` (`All`, `Stdout`, `Stderr`). Unknown keys are ignored;
/// of repeated keys the first counts.
pub fn parse_log_query(query: &str, now: Timestamp) -> Result<LogQuery, QueryError> {
    let mut values: HashMap<String, String> = HashMap::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        values
            .entry(key.into_owned())
            .or_insert_with(|| value.into_owned());
    }
    let flag = |key: &str| {
        values.get(key).is_some_and(|value| {
            !(value == "0"
                || ["f", "false", "n", "no", "off"]
                    .iter()
                    .any(|no| value.eq_ignore_ascii_case(no)))
        })
    };
    let integer = |key: &str| -> Result<Option<i64>, QueryError> {
        values
            .get(key)
            .map(|value| {
                value
                    .parse::<i64>()
                    .map_err(|error| QueryError::bad(format!("invalid {key} {value:?}: {error}")))
            })
            .transpose()
    };

    let mut tail_lines = integer("tailLines")?;
    if let Some(tail) = values.get("tail") {
        tail_lines = if tail == "all" {
            None
        } else {
            integer("tail")?
        };
    }
    let limit_bytes = integer("limitBytes")?;
    let since_seconds = integer("sinceSeconds")?;
    let since_time = values
        .get("sinceTime")
        .map(|value| {
            value
                .parse::<Timestamp>()
                .map_err(|error| QueryError::bad(format!("invalid sinceTime {value:?}: {error}")))
        })
        .transpose()?;
    let streams = match values.get("stream").map(String::as_str) {
        None | Some("All") => StreamSelection::All,
        Some("Stdout") => StreamSelection::Stdout,
        Some("Stderr") => StreamSelection::Stderr,
        Some(other) => {
            return Err(QueryError::invalid(format!(
                "stream: Unsupported value: {other:?}: supported values: \"All\", \"Stderr\", \"Stdout\""
            )));
        }
    };

    if let Some(lines) = tail_lines
        && lines < 0
    {
        return Err(QueryError::invalid(format!(
            "tailLines: Invalid value: {lines}: must be greater than or equal to 0"
        )));
    }
    if let Some(limit) = limit_bytes
        && limit < 1
    {
        return Err(QueryError::invalid(format!(
            "limitBytes: Invalid value: {limit}: must be greater than 0"
        )));
    }
    if let Some(seconds) = since_seconds
        && seconds < 1
    {
        return Err(QueryError::invalid(format!(
            "sinceSeconds: Invalid value: {seconds}: must be greater than 0"
        )));
    }
    if since_seconds.is_some() && since_time.is_some() {
        return Err(QueryError::invalid(
            "at most one of `sinceTime` or `sinceSeconds` may be specified".to_string(),
        ));
    }
    let since = match (since_seconds, since_time) {
        (Some(seconds), _) => Some(
            now.checked_sub(jiff::SignedDuration::from_secs(seconds))
                .unwrap_or(Timestamp::MIN),
        ),
        (None, time) => time,
    };
    Ok(LogQuery {
        options: LogOptions {
            follow: flag("follow"),
            timestamps: flag("timestamps"),
            tail_lines: tail_lines.map(|lines| lines as u64),
            since,
            limit_bytes: limit_bytes.map(|limit| limit as u64),
            streams,
        },
        previous: flag("previous"),
    })
}

/// Reads a token file in kube-apiserver's `--token-auth-file` format: CSV lines
/// `token,user,uid[,"group1,group2"]`; blank lines and `#` comments are skipped. Returns the
/// user of each token.
pub fn parse_token_file(contents: &str) -> anyhow::Result<HashMap<String, String>> {
    let mut users = HashMap::new();
    for (index, line) in contents.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line
            .splitn(4, ',')
            .map(|field| field.trim().trim_matches('"'));
        let (Some(token), Some(user), Some(_uid)) = (fields.next(), fields.next(), fields.next())
        else {
            anyhow::bail!(
                "token file line {}: expected token,user,uid[,groups]",
                index + 1
            );
        };
        if token.is_empty() {
            anyhow::bail!("token file line {}: empty token", index + 1);
        }
        users.insert(token.to_string(), user.to_string());
    }
    Ok(users)
}

/// The server's TLS settings, and the PEM of the CA of a generated certificate.
fn tls_config(config: &NodeApiConfig) -> anyhow::Result<(rustls::ServerConfig, Option<String>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key, serving_ca_pem) = match &config.serving_certificate {
        ServingCertificate::SelfSigned { hosts } => {
            let generated = self_signed(hosts)?;
            (generated.chain, generated.key, Some(generated.ca_pem))
        }
        ServingCertificate::Files { cert, key } => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("read {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parse {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("read {}", key.display()))?;
            (chain, key, None)
        }
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &config.client_ca_file {
        Some(ca_file) => {
            let roots = read_roots(ca_file)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            // A client without a certificate may still bring a bearer token.
            .allow_unauthenticated()
            .build()
            .with_context(|| format!("client CA {}", ca_file.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder
        .with_single_cert(chain, key)
        .context("load the node API serving certificate")?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((tls, serving_ca_pem))
}

fn read_roots(ca_file: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("read client CA {}", ca_file.display()))?
    {
        let cert = cert.with_context(|| format!("parse client CA {}", ca_file.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("add client CA {}", ca_file.display()))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "client CA {} holds no certificate",
        ca_file.display()
    );
    Ok(roots)
}

struct SelfSigned {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca_pem: String,
}

fn self_signed(hosts: &[String]) -> anyhow::Result<SelfSigned> {
    let now = Timestamp::now().as_second();
    let name = hosts.first().map(String::as_str).unwrap_or("skiff-node");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name}-ca@{now}"));
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut names: Vec<String> = Vec::new();
    for host in hosts
        .iter()
        .map(String::as_str)
        .chain(["localhost", "127.0.0.1"])
    {
        if !names.iter().any(|known| known == host) {
            names.push(host.to_string());
        }
    }
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name}@{now}"));
    for host in &names {
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(
                host.clone()
                    .try_into()
                    .with_context(|| format!("serving certificate name {host:?}"))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate()?;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(SelfSigned {
        chain: vec![cert.der().clone(), ca_cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ca_pem: ca_cert.pem(),
    })
}

fn percent_decode(segment: &str) -> String {
    if !segment.contains('%') {
        return segment.to_string();
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "s3cret-token";

    fn query(text: &str) -> Result<LogQuery, QueryError> {
        parse_log_query(text, "2024-01-01T00:01:00Z".parse().unwrap())
    }

    #[test]
    fn log_queries_decode_like_the_kubelets() {
        assert_eq!(
            query("").unwrap(),
            LogQuery {
                options: LogOptions::default(),
                previous: false
            }
        );
        let parsed = query(
            "follow=true&previous=1&timestamps=TRUE&tailLines=10&limitBytes=5&sinceSeconds=30&stream=Stderr",
        )
        .unwrap();
        assert!(parsed.previous);
        assert_eq!(
            parsed.options,
            LogOptions {
                follow: true,
                timestamps: true,
                tail_lines: Some(10),
                since: Some("2024-01-01T00:00:30Z".parse().unwrap()),
                limit_bytes: Some(5),
                streams: StreamSelection::Stderr,
            }
        );
        // Booleans are false only for the "no" words; an empty value is true.
        for no in ["0", "f", "False", "n", "NO", "off"] {
            assert!(
                !query(&format!("follow={no}")).unwrap().options.follow,
                "{no}"
            );
        }
        assert!(query("follow=").unwrap().options.follow);
        // sinceTime in RFC 3339, with its `+` percent-encoded.
        assert_eq!(
            query("sinceTime=2024-01-01T01%3A00%3A00%2B01%3A00")
                .unwrap()
                .options
                .since,
            Some("2024-01-01T00:00:00Z".parse().unwrap())
        );
        // The legacy `tail`.
        assert_eq!(query("tail=3").unwrap().options.tail_lines, Some(3));
        assert_eq!(
            query("tailLines=3&tail=all").unwrap().options.tail_lines,
            None
        );
        // The first of repeated keys counts; unknown keys are ignored.
        assert_eq!(
            query("tailLines=1&tailLines=2&color=red")
                .unwrap()
                .options
                .tail_lines,
            Some(1)
        );
    }

    #[test]
    fn bad_log_queries_get_400_or_422() {
        for (text, status, needle) in [
            ("tailLines=ten", 400, "tailLines"),
            ("limitBytes=1.5", 400, "limitBytes"),
            ("sinceTime=yesterday", 400, "sinceTime"),
            ("tailLines=-1", 422, "greater than or equal to 0"),
            ("limitBytes=0", 422, "limitBytes: Invalid value: 0"),
            ("sinceSeconds=0", 422, "sinceSeconds"),
            (
                "sinceSeconds=5&sinceTime=2024-01-01T00:00:00Z",
                422,
                "at most one",
            ),
            ("stream=Stdin", 422, "Unsupported value"),
        ] {
            let error = query(text).unwrap_err();
            assert_eq!(error.status.as_u16(), status, "{text}: {error:?}");
            assert!(error.message.contains(needle), "{text}: {error:?}");
        }
    }

    #[test]
    fn token_files_parse_like_kube_apiservers() {
        let users = parse_token_file(
            "# tokens\n\nabc,admin,1,\"system:masters,dev\"\n\"xyz\",\"bob\",\"2\"\n",
        )
        .unwrap();
        assert_eq!(users.get("abc").map(String::as_str), Some("admin"));
        assert_eq!(users.get("xyz").map(String::as_str), Some("bob"));
        assert!(parse_token_file("onlytoken\n").is_err());
        assert!(parse_token_file(",user,uid\n").is_err());
    }

    /// The state the tests serve: one pod `web` in `default` with container `app`, whose log
    /// file is given; container `init` has not started.
    struct TestState {
        log: PathBuf,
    }

    impl NodeState for TestState {
        fn pods(&self) -> Vec<Pod> {
            let mut pod = Pod::default();
            pod.metadata.name = Some("web".into());
            pod.metadata.namespace = Some("default".into());
            vec![pod]
        }

        fn container_log(
            &self,
            namespace: &str,
            pod: &str,
            container: &str,
            previous: bool,
        ) -> Result<ContainerLogSource, LogLookupError> {
            if namespace != "default" || pod != "web" {
                return Err(LogLookupError::PodNotFound { pod: pod.into() });
            }
            match (container, previous) {
                ("app", false) => Ok(ContainerLogSource::finished(self.log.clone())),
                ("app", true) => Err(LogLookupError::previous_not_found(container, pod)),
                ("init", _) => Err(LogLookupError::waiting(container, pod, "PodInitializing")),
                _ => Err(LogLookupError::container_not_found(container, pod)),
            }
        }

        fn running_container(
            &self,
            namespace: &str,
            pod: &str,
            container: &str,
        ) -> Result<String, LogLookupError> {
            if namespace != "default" || pod != "web" {
                return Err(LogLookupError::PodNotFound { pod: pod.into() });
            }
            match container {
                "app" => Ok("0123abcd".into()),
                _ => Err(LogLookupError::container_not_found(container, pod)),
            }
        }
    }

    struct Pki {
        ca_pem: String,
        client_pem: String,
    }

    /// A CA and a client certificate it signed (as the API server's), in PEM.
    fn client_pki(name: &str) -> Pki {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name}-ca"));
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver-kubelet-client");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params
            .signed_by(&key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
            .unwrap();
        Pki {
            ca_pem: ca.pem(),
            client_pem: format!("{}{}", cert.pem(), key.serialize_pem()),
        }
    }

    struct Server {
        url: String,
        ca_pem: String,
        _dir: tempfile::TempDir,
    }

    async fn start(pki: &Pki) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens.csv");
        std::fs::write(&tokens, format!("{TOKEN},ops,1\n")).unwrap();
        let client_ca = dir.path().join("client-ca.crt");
        std::fs::write(&client_ca, &pki.ca_pem).unwrap();
        let log = dir.path().join("0.log");
        std::fs::write(
            &log,
            "2024-01-01T00:00:00.000000000Z stdout F hello\n2024-01-01T00:00:01.000000000Z stderr F world\n",
        )
        .unwrap();
        let api = NodeApi::bind(
            NodeApiConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                serving_certificate: ServingCertificate::SelfSigned {
                    hosts: vec!["node-1".into()],
                },
                client_ca_file: Some(client_ca),
                token_file: Some(tokens),
            },
            Arc::new(TestState { log }),
        )
        .await
        .unwrap();
        let url = format!("https://127.0.0.1:{}", api.local_addr().port());
        let ca_pem = api.serving_ca_pem().unwrap().to_string();
        tokio::spawn(api.run());
        Server {
            url,
            ca_pem,
            _dir: dir,
        }
    }

    fn client(server: &Server, identity: Option<&str>) -> reqwest::Client {
        let mut builder = reqwest::Client::builder().add_root_certificate(
            reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap(),
        );
        if let Some(pem) = identity {
            builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
        }
        builder.build().unwrap()
    }

    async fn get(client: &reqwest::Client, url: String, token: Option<&str>) -> (u16, String) {
        let mut request = client.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    #[tokio::test]
    async fn client_certificates_and_tokens_authenticate() {
        let pki = client_pki("control-plane");
        let server = start(&pki).await;
        let anonymous = client(&server, None);
        let logs = format!("{}/containerLogs/default/web/app", server.url);

        assert_eq!(
            get(&anonymous, format!("{}/healthz", server.url), None).await,
            (200, "ok".into())
        );
        assert_eq!(get(&anonymous, logs.clone(), None).await.0, 401);
        assert_eq!(get(&anonymous, logs.clone(), Some("wrong")).await.0, 401);
        assert_eq!(
            get(&anonymous, logs.clone(), Some(TOKEN)).await,
            (200, "hello\nworld\n".into())
        );

        let api_server = client(&server, Some(&pki.client_pem));
        assert_eq!(
            get(
                &api_server,
                format!("{logs}?timestamps=true&tailLines=1"),
                None
            )
            .await,
            (200, "2024-01-01T00:00:01.000000000Z world\n".into())
        );
        let (status, body) = get(&api_server, format!("{}/pods", server.url), None).await;
        assert_eq!(status, 200);
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list["kind"], "PodList");
        assert_eq!(list["items"][0]["metadata"]["name"], "web");

        // A certificate from another CA does not get through the handshake.
        let stranger = client(&server, Some(&client_pki("elsewhere").client_pem));
        assert!(stranger.get(logs).send().await.is_err());
    }

    #[tokio::test]
    async fn errors_are_plain_text_with_the_kubelets_statuses() {
        let pki = client_pki("control-plane");
        let server = start(&pki).await;
        let client = client(&server, None);
        let url = |path: &str| format!("{}{path}", server.url);
        for (path, status, body) in [
            (
                "/containerLogs/default/nope/app",
                404,
                "pod \"nope\" does not exist",
            ),
            (
                "/containerLogs/default/web/db",
                404,
                "container \"db\" not found in pod \"web\"",
            ),
            (
                "/containerLogs/default/web/init",
                400,
                "container \"init\" in pod \"web\" is waiting to start: PodInitializing",
            ),
            (
                "/containerLogs/default/web/app?previous=true",
                400,
                "previous terminated container \"app\" in pod \"web\" not found",
            ),
            (
                "/containerLogs/default/web/app?tailLines=x",
                400,
                "invalid tailLines \"x\": invalid digit found in string",
            ),
            (
                "/containerLogs/default/web/app?limitBytes=0",
                422,
                "limitBytes: Invalid value: 0: must be greater than 0",
            ),
            ("/containerLogs/default/web", 404, "404 page not found\n"),
            ("/metrics", 404, "404 page not found\n"),
            (
                "/exec/default/nope/app?command=ls&stdout=1",
                404,
                "pod does not exist",
            ),
            (
                "/exec/default/web/db?command=ls&stdout=1",
                500,
                "container not found (\"db\")",
            ),
            (
                "/exec/default/web/app?stdout=1",
                400,
                "you must specify at least one command for the container",
            ),
            (
                "/attach/default/web/app?input=1&output=1",
                400,
                "attaching to stdin is not supported: containers run without one",
            ),
            (
                "/attach/default/nope/app?output=1",
                404,
                "pod does not exist",
            ),
        ] {
            assert_eq!(
                get(&client, url(path), Some(TOKEN)).await,
                (status, body.to_string()),
                "{path}"
            );
        }
        let response = client
            .post(url("/pods"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 405);

        // An exec that is no WebSocket upgrade (SPDY, or plain HTTP) is refused by name.
        let (status, body) = get(
            &client,
            url("/exec/default/web/app?command=ls&stdout=1"),
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, 400);
        assert!(body.contains("SPDY is not supported"), "{body}");
        // A WebSocket upgrade to a node without an executor: 503 before any upgrade.
        let response = client
            .get(url("/exec/default/web/app?command=ls&stdout=1"))
            .bearer_auth(TOKEN)
            .header("Upgrade", "websocket")
            .header("Connection", "Upgrade")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("Sec-WebSocket-Protocol", "v5.channel.k8s.io")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 503);
    }

    #[test]
    fn self_signed_certificates_name_the_node() {
        let generated = self_signed(&["10.0.0.7".into(), "node-7".into()]).unwrap();
        assert_eq!(generated.chain.len(), 2);
        assert!(generated.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        // The names are in the DER (as IP bytes and DNS strings).
        let der = generated.chain[0].as_ref();
        let contains = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
        assert!(contains(&[10, 0, 0, 7]));
        assert!(contains(b"node-7"));
        assert!(contains(b"localhost"));
        assert!(contains(&[127, 0, 0, 1]));
    }
}
