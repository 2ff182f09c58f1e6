//! A client of the OCI distribution API (`/v2/`): resolving a tag to a manifest descriptor,
//! fetching manifests and blobs, and authentication as the registry's `WWW-Authenticate`
//! challenge asks: a `Bearer` token from its token service (anonymous, or with the pull
//! secret's credentials as Basic auth), or Basic auth to the registry itself.
//! Registries listed as plain HTTP are reached without TLS, as containerd's `plain-http`
//! hosts are.

use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use serde::Deserialize;

use super::manifest::{self, Descriptor, MANIFEST_ACCEPT, MAX_MANIFEST_SIZE};
use super::reference::{DEFAULT_DOMAIN, Reference};
use crate::containerd::error_chain;

/// The header a registry names a manifest's digest in.
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// Docker Hub's API host for the `docker.io` domain.
const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

/// Error bodies longer than this are cut.
const MAX_ERROR_BODY: usize = 64 << 10;

/// How the agent reaches registries.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Registries (`host` or `host:port`, as written in image references) reached over
    /// plain HTTP instead of HTTPS, like containerd's `plain-http` hosts. Meant for local
    /// registries such as `localhost:5000`.
    pub plain_http: Vec<String>,
    pub connect_timeout: Duration,
    /// The longest wait for the next bytes of a response.
    pub read_timeout: Duration,
    /// How many layers of one image are downloaded at once (containerd's default is 3).
    pub max_concurrent_downloads: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            plain_http: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            max_concurrent_downloads: 3,
        }
    }
}

/// Why a registry request failed, without the image it was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// 404: no such repository, tag, manifest or blob.
    NotFound(String),
    /// 401/403, or a token that could not be had.
    Unauthorized(String),
    /// The registry (or its token service) did not answer.
    Unreachable { registry: String, reason: String },
    /// Anything else: other HTTP errors, bad answers, digest mismatches.
    Other(String),
}

/// A user name and password for a registry, from an image pull secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password: errors and logs print credentials.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// How a repository session authenticates its requests, once a challenge said how.
#[derive(Clone)]
enum Auth {
    Bearer(String),
    Basic,
}

/// The shared HTTP client and configuration; one per image service.
pub struct Registries {
    http: reqwest::Client,
    config: RegistryConfig,
}

impl Registries {
    pub fn new(config: RegistryConfig) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .user_agent(concat!("skiff-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with a fixed configuration builds");
        Self { http, config }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// A session with the repository of `reference`, authenticating with `credentials`
    /// when the registry asks for them; it keeps its token for its lifetime.
    pub fn repository(
        &self,
        reference: &Reference,
        credentials: Option<Credentials>,
    ) -> Repository<'_> {
        let scheme = if self
            .config
            .plain_http
            .iter()
            .any(|h| h == &reference.domain)
        {
            "http"
        } else {
            "https"
        };
        let host = if reference.domain == DEFAULT_DOMAIN {
            DOCKER_HUB_HOST
        } else {
            &reference.domain
        };
        Repository {
            http: &self.http,
            registry: reference.domain.clone(),
            base: format!("{scheme}://{host}/v2/{}", reference.path),
            path: reference.path.clone(),
            credentials,
            auth: tokio::sync::Mutex::new(None),
        }
    }
}

/// What resolving a tag found: the top descriptor, and its body when it had to be fetched.
pub struct Resolved {
    pub descriptor: Descriptor,
    pub body: Option<Vec<u8>>,
}

pub struct Repository<'a> {
    http: &'a reqwest::Client,
    /// The registry as named in the reference, for messages.
    registry: String,
    /// `scheme://host/v2/<path>`.
    base: String,
    path: String,
    credentials: Option<Credentials>,
    auth: tokio::sync::Mutex<Option<Auth>>,
}

impl Repository<'_> {
    /// Resolves a tag or digest to the descriptor of what it points at, with a `HEAD` as
    /// containerd does (registries count manifest `GET`s against rate limits), falling back
    /// to a `GET` when the `HEAD` answer lacks what is needed or failed (for the reason).
    pub async fn resolve(&self, object: &str) -> Result<Resolved, RegistryError> {
        let url = format!("{}/manifests/{object}", self.base);
        let head = self.send(Method::HEAD, &url, Some(MANIFEST_ACCEPT)).await?;
        if head.status().is_success()
            && let Some(descriptor) = descriptor_from_headers(head.headers())
            && (!object.contains(':') || descriptor.digest == object)
        {
            return Ok(Resolved {
                descriptor,
                body: None,
            });
        }
        let response = self.send(Method::GET, &url, Some(MANIFEST_ACCEPT)).await?;
        if !response.status().is_success() {
            return Err(error_from_response(response).await);
        }
        let declared_type = header(response.headers(), CONTENT_TYPE.as_str());
        let declared_digest = header(response.headers(), DOCKER_CONTENT_DIGEST);
        let body = self.read_limited(response, MAX_MANIFEST_SIZE).await?;
        let digest = manifest::sha256_digest(&body);
        let wanted = if object.contains(':') {
            Some(object.to_string())
        } else {
            declared_digest.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(wanted) = wanted
            && wanted != digest
        {
            return Err(RegistryError::Other(format!(
                "manifest {object} has digest {digest}, the registry said {wanted}"
            )));
        }
        let media_type =
            manifest::detect_media_type(declared_type.as_deref(), &body).ok_or_else(|| {
                RegistryError::Other(format!("manifest {object}: unknown media type"))
            })?;
        Ok(Resolved {
            descriptor: Descriptor {
                media_type,
                digest,
                size: body.len() as i64,
                ..Default::default()
            },
            body: Some(body),
        })
    }

    /// Fetches the manifest or index `descriptor` names and checks its digest.
    pub async fn fetch_manifest(&self, descriptor: &Descriptor) -> Result<Vec<u8>, RegistryError> {
        let url = format!("{}/manifests/{}", self.base, descriptor.digest);
        let accept = if descriptor.media_type.is_empty() {
            MANIFEST_ACCEPT
        } else {
            &descriptor.media_type
        };
        let response = self.send(Method::GET, &url, Some(accept)).await?;
        self.verified_body(response, descriptor).await
    }

    /// Fetches a small blob (an image config) whole and checks its digest.
    pub async fn fetch_small_blob(
        &self,
        descriptor: &Descriptor,
    ) -> Result<Vec<u8>, RegistryError> {
        let response = self.fetch_blob(&descriptor.digest).await?;
        self.verified_body(response, descriptor).await
    }

    /// Starts fetching a blob; the caller streams the body.
    pub async fn fetch_blob(&self, digest: &str) -> Result<Response, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let response = self.send(Method::GET, &url, None).await?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(error_from_response(response).await)
        }
    }

    /// Turns a transport error while reading a body into a registry error.
    pub fn body_error(&self, error: reqwest::Error) -> RegistryError {
        self.transport_error(&self.registry, error)
    }

    async fn verified_body(
        &self,
        response: Response,
        descriptor: &Descriptor,
    ) -> Result<Vec<u8>, RegistryError> {
        if !response.status().is_success() {
            return Err(error_from_response(response).await);
        }
        let limit = if descriptor.size > 0 {
            descriptor.size as u64
        } else {
            MAX_MANIFEST_SIZE
        };
        let body = self.read_limited(response, limit).await?;
        if descriptor.size > 0 && body.len() as i64 != descriptor.size {
            return Err(RegistryError::Other(format!(
                "{}: got {} bytes, expected {}",
                descriptor.digest,
                body.len(),
                descriptor.size
            )));
        }
        if !manifest::verify_digest(&descriptor.digest, &body) {
            return Err(RegistryError::Other(format!(
                "{}: content has digest {}",
                descriptor.digest,
                manifest::sha256_digest(&body)
            )));
        }
        Ok(body)
    }

    async fn read_limited(
        &self,
        mut response: Response,
        limit: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.body_error(e))? {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > limit {
                return Err(RegistryError::Other(format!(
                    "{}: answer larger than {limit} bytes",
                    response.url().path()
                )));
            }
        }
        Ok(body)
    }

    /// Sends a request with the session's authentication; on a `401` with a `Bearer`
    /// challenge, gets a token from the realm (with the credentials, if any), on one with a
    /// `Basic` challenge takes the credentials, and tries once more.
    async fn send(
        &self,
        method: Method,
        url: &str,
        accept: Option<&str>,
    ) -> Result<Response, RegistryError> {
        let mut authenticated = false;
        loop {
            let mut request = self.http.request(method.clone(), url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            match (self.auth.lock().await.as_ref(), &self.credentials) {
                (Some(Auth::Bearer(token)), _) => request = request.bearer_auth(token),
                (Some(Auth::Basic), Some(credentials)) => {
                    request = request.basic_auth(&credentials.username, Some(&credentials.password))
                }
                _ => {}
            }
            let response = request
                .send()
                .await
                .map_err(|e| self.transport_error(&self.registry, e))?;
            if response.status() != StatusCode::UNAUTHORIZED || authenticated {
                return Ok(response);
            }
            let auth = match bearer_challenge(response.headers()) {
                Some(challenge) => Auth::Bearer(self.fetch_token(&challenge).await?),
                // Basic (or an unknown scheme) needs credentials; without any, the 401 is
                // the answer.
                None if self.credentials.is_some() && has_basic_challenge(response.headers()) => {
                    Auth::Basic
                }
                None => return Ok(response),
            };
            *self.auth.lock().await = Some(auth);
            authenticated = true;
        }
    }

    async fn fetch_token(&self, challenge: &Challenge) -> Result<String, RegistryError> {
        let realm = challenge.param("realm").ok_or_else(|| {
            RegistryError::Unauthorized("bearer challenge without realm (401)".into())
        })?;
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(service) = challenge.param("service") {
            query.push(("service", service.to_string()));
        }
        let scope = challenge
            .param("scope")
            .map(str::to_string)
            .unwrap_or_else(|| format!("repository:{}:pull", self.path));
        for scope in scope.split(' ').filter(|s| !s.is_empty()) {
            query.push(("scope", scope.to_string()));
        }
        let token_host = reqwest::Url::parse(realm)
            .ok()
            .and_then(|url| url.host_str().map(str::to_string))
            .unwrap_or_else(|| realm.to_string());
        let mut request = self.http.get(realm).query(&query);
        if let Some(credentials) = &self.credentials {
            request = request.basic_auth(&credentials.username, Some(&credentials.password));
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.transport_error(&token_host, e))?;
        if !response.status().is_success() {
            let reason = match error_from_response(response).await {
                RegistryError::NotFound(reason)
                | RegistryError::Unauthorized(reason)
                | RegistryError::Other(reason) => reason,
                RegistryError::Unreachable { reason, .. } => reason,
            };
            return Err(RegistryError::Unauthorized(format!(
                "get token from {token_host}: {reason}"
            )));
        }
        #[derive(Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = self.read_limited(response, MAX_ERROR_BODY as u64).await?;
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            RegistryError::Unauthorized(format!("token from {token_host} is not JSON: {e}"))
        })?;
        answer
            .token
            .or(answer.access_token)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| RegistryError::Unauthorized(format!("{token_host} gave no token")))
    }

    fn transport_error(&self, host: &str, error: reqwest::Error) -> RegistryError {
        // The first line of a reqwest error repeats the URL and hyper's "client error
        // (Connect)" says nothing more; the causes below them say what happened.
        let reason = match std::error::Error::source(&error) {
            Some(source) => error_chain(source)
                .split(": ")
                .filter(|part| !part.starts_with("client error ("))
                .collect::<Vec<_>>()
                .join(": "),
            None => error.to_string(),
        };
        if error.is_connect() || error.is_timeout() {
            RegistryError::Unreachable {
                registry: host.to_string(),
                reason,
            }
        } else {
            RegistryError::Other(format!("{}: {reason}", error.without_url()))
        }
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
}

/// A descriptor from a `HEAD` answer, if it names the digest, a known type and the size.
fn descriptor_from_headers(headers: &HeaderMap) -> Option<Descriptor> {
    let digest = header(headers, DOCKER_CONTENT_DIGEST).filter(|d| d.starts_with("sha256:"))?;
    let media_type =
        manifest::detect_media_type(header(headers, CONTENT_TYPE.as_str()).as_deref(), b"")?;
    let size = header(headers, CONTENT_LENGTH.as_str())?.parse().ok()?;
    Some(Descriptor {
        media_type,
        digest,
        size,
        ..Default::default()
    })
}

/// The reason of a failed answer, from the distribution spec's error body
/// (`{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}` becomes
/// `manifest unknown: manifest unknown (404)`), classified by status.
pub async fn error_from_response(response: Response) -> RegistryError {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    let body = &body[..body.len().min(MAX_ERROR_BODY)];
    let reason = format!("{} ({})", error_text(status, body), status.as_u16());
    match status {
        StatusCode::NOT_FOUND => RegistryError::NotFound(reason),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Unauthorized(reason),
        _ => RegistryError::Other(reason),
    }
}

fn error_text(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(errors) = serde_json::from_slice::<Errors>(body)
        && !errors.errors.is_empty()
    {
        return errors
            .errors
            .iter()
            .map(|entry| {
                let code = entry.code.to_lowercase().replace('_', " ");
                match (code.is_empty(), entry.message.is_empty()) {
                    (false, false) => format!("{code}: {}", entry.message),
                    (false, true) => code,
                    _ => entry.message.clone(),
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if !text.is_empty() && text.len() <= 200 && !text.starts_with('<') {
        text.to_string()
    } else {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    }
}

/// One `WWW-Authenticate` challenge: its scheme and parameters.
#[derive(Debug, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

fn has_basic_challenge(headers: &HeaderMap) -> bool {
    headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(parse_challenge)
        .any(|challenge| challenge.scheme.eq_ignore_ascii_case("basic"))
}

fn bearer_challenge(headers: &HeaderMap) -> Option<Challenge> {
    headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(parse_challenge)
        .find(|challenge| challenge.scheme.eq_ignore_ascii_case("bearer"))
}

/// Parses `Scheme key="value", key=token, ...` (RFC 7235, one challenge per header).
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, mut rest) = match value.split_once(' ') {
        Some((scheme, rest)) => (scheme, rest.trim_start()),
        None => (value, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    while !rest.is_empty() {
        rest = rest.trim_start_matches([',', ' ', '\t']);
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().to_string();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.push((key, value));
        rest = remaining;
    }
    Some(Challenge {
        scheme: scheme.to_string(),
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    #[test]
    fn parses_bearer_challenges() {
        let challenge = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(challenge.scheme, "Bearer");
        assert_eq!(
            challenge.param("realm"),
            Some("https://auth.docker.io/token")
        );
        assert_eq!(challenge.param("service"), Some("registry.docker.io"));
        assert_eq!(
            challenge.param("scope"),
            Some("repository:library/busybox:pull")
        );

        let challenge =
            parse_challenge(r#"Bearer realm="a,b", error=invalid_token , x="q\"uote""#).unwrap();
        assert_eq!(challenge.param("realm"), Some("a,b"));
        assert_eq!(challenge.param("error"), Some("invalid_token"));
        assert_eq!(challenge.param("x"), Some("q\"uote"));

        let basic = parse_challenge(r#"Basic realm="basic-realm""#).unwrap();
        assert_eq!(basic.scheme, "Basic");
    }

    #[test]
    fn error_bodies_become_reasons() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"1"}}]}"#;
        assert_eq!(
            error_text(StatusCode::NOT_FOUND, body),
            "manifest unknown: manifest unknown"
        );
        assert_eq!(error_text(StatusCode::NOT_FOUND, b""), "not found");
        assert_eq!(
            error_text(StatusCode::BAD_GATEWAY, b"<html>...</html>"),
            "bad gateway"
        );
        assert_eq!(
            error_text(StatusCode::TOO_MANY_REQUESTS, b"slow down"),
            "slow down"
        );
    }

    /// A registry that wants a bearer token from its own `/token` endpoint, served over
    /// loopback one request per connection.
    async fn token_registry() -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let realm = format!("http://{address}/token");
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":2},"layers":[]}"#;
        let digest = manifest::sha256_digest(manifest);
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..4 {
                let (stream, _) = listener.accept().await.unwrap();
                let mut reader = BufReader::new(stream);
                let mut request_line = String::new();
                reader.read_line(&mut request_line).await.unwrap();
                let mut authorization = String::new();
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).await.unwrap();
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    if line.to_ascii_lowercase().starts_with("authorization:") {
                        authorization = line["authorization:".len()..].trim().to_string();
                    }
                }
                seen.push(format!("{} [{}]", request_line.trim(), authorization));
                let (status, headers, body): (&str, String, Vec<u8>) = if request_line
                    .starts_with("GET /token?")
                {
                    assert!(
                        request_line.contains("scope=repository%3Ateam%2Fapp%3Apull"),
                        "{request_line}"
                    );
                    assert!(request_line.contains("service=fake"), "{request_line}");
                    ("200 OK", String::new(), br#"{"token":"t0ken"}"#.to_vec())
                } else if authorization != "Bearer t0ken" {
                    (
                        "401 Unauthorized",
                        format!("WWW-Authenticate: Bearer realm=\"{realm}\",service=\"fake\",scope=\"repository:team/app:pull\"\r\n"),
                        br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.to_vec(),
                    )
                } else {
                    (
                        "200 OK",
                        format!(
                            "Content-Type: application/vnd.oci.image.manifest.v1+json\r\nDocker-Content-Digest: {digest}\r\n"
                        ),
                        manifest.to_vec(),
                    )
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let mut stream = reader.into_inner();
                stream.write_all(head.as_bytes()).await.unwrap();
                if !request_line.starts_with("HEAD") {
                    stream.write_all(&body).await.unwrap();
                }
                stream.shutdown().await.unwrap();
            }
            seen
        });
        (address, server)
    }

    #[tokio::test]
    async fn bearer_token_flow() {
        let (address, server) = token_registry().await;
        let registries = Registries::new(RegistryConfig {
            plain_http: vec![address.clone()],
            ..Default::default()
        });
        let reference = Reference::parse(&format!("{address}/team/app:v1")).unwrap();
        let repository = registries.repository(&reference, None);
        let resolved = repository.resolve("v1").await.unwrap();
        assert_eq!(resolved.descriptor.media_type, manifest::OCI_MANIFEST);
        assert!(resolved.descriptor.digest.starts_with("sha256:"));
        // The HEAD answered with the digest, the type and the size: no GET was needed.
        assert!(resolved.body.is_none());
        // A second request reuses the token.
        let body = repository
            .fetch_manifest(&resolved.descriptor)
            .await
            .unwrap();
        assert_eq!(body.len() as i64, resolved.descriptor.size);
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            [
                "HEAD /v2/team/app/manifests/v1 HTTP/1.1 []".to_string(),
                "GET /token?service=fake&scope=repository%3Ateam%2Fapp%3Apull HTTP/1.1 []"
                    .to_string(),
                "HEAD /v2/team/app/manifests/v1 HTTP/1.1 [Bearer t0ken]".to_string(),
                format!(
                    "GET /v2/team/app/manifests/{} HTTP/1.1 [Bearer t0ken]",
                    resolved.descriptor.digest
                ),
            ]
        );
    }

    #[tokio::test]
    async fn a_token_is_asked_for_with_the_pull_secret_credentials() {
        let (address, server) = token_registry().await;
        let registries = Registries::new(RegistryConfig {
            plain_http: vec![address.clone()],
            ..Default::default()
        });
        let reference = Reference::parse(&format!("{address}/team/app:v1")).unwrap();
        let credentials = Credentials {
            username: "user".into(),
            password: "pw".into(),
        };
        let repository = registries.repository(&reference, Some(credentials));
        let resolved = repository.resolve("v1").await.unwrap();
        repository
            .fetch_manifest(&resolved.descriptor)
            .await
            .unwrap();
        let seen = server.await.unwrap();
        // `user:pw` in base64; the registry itself only ever sees the token.
        assert_eq!(
            seen[1],
            "GET /token?service=fake&scope=repository%3Ateam%2Fapp%3Apull HTTP/1.1 [Basic dXNlcjpwdw==]"
        );
        assert!(seen[2].ends_with("[Bearer t0ken]"), "{seen:?}");
    }

    #[tokio::test]
    async fn unreachable_registry() {
        // A port nothing listens on: bind one, then free it.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let registries = Registries::new(RegistryConfig {
            plain_http: vec![address.clone()],
            ..Default::default()
        });
        let reference = Reference::parse(&format!("{address}/app:v1")).unwrap();
        let error = registries
            .repository(&reference, None)
            .resolve("v1")
            .await
            .err()
            .unwrap();
        match error {
            RegistryError::Unreachable { registry, reason } => {
                assert_eq!(registry, address);
                assert!(reason.contains("refused"), "{reason}");
            }
            other => panic!("expected unreachable, got {other:?}"),
        }
    }
}
