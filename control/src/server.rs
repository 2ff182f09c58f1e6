//! The HTTPS front door: TLS with the cluster's serving certificate, bearer-token
//! authentication, and HTTP/1.1 and HTTP/2 on one port.
//!
//! **Architecture invariant:** every request passes authentication here before the API
//! sees it, except the health and version endpoints that kube-apiserver also serves to
//! anonymous clients. There is no authorization yet: an authenticated user may do anything.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::api::status::ApiError;
use crate::api::{ApiServer, Body, error_response};
use crate::pki::{PkiPaths, TokenEntry};

pub struct Authenticator {
    users_by_token: HashMap<String, String>,
}

impl Authenticator {
    pub fn new(entries: &[TokenEntry]) -> Self {
        Self {
            users_by_token: entries
                .iter()
                .map(|e| (e.token.clone(), e.user.clone()))
                .collect(),
        }
    }

    /// The user a request authenticates as, if any.
    pub fn user<B>(&self, request: &Request<B>) -> Option<&str> {
        let header = request
            .headers()
            .get(hyper::header::AUTHORIZATION)?
            .to_str()
            .ok()?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))?;
        self.users_by_token.get(token.trim()).map(String::as_str)
    }
}

fn is_public(path: &str) -> bool {
    matches!(path, "/healthz" | "/livez" | "/readyz" | "/version")
}

async fn serve_request(
    api: Arc<ApiServer>,
    authenticator: Option<Arc<Authenticator>>,
    request: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let user = match &authenticator {
        Some(authenticator) => authenticator.user(&request).map(str::to_string),
        None => Some("anonymous".to_string()),
    };
    let response = match user {
        None if !is_public(&path) => error_response(&ApiError::unauthorized()),
        _ => api.handle(request).await,
    };
    tracing::debug!(%method, %path, user = user.as_deref().unwrap_or("-"), status = response.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "request");
    response
}

/// The serving TLS settings. Also mints the API server's client certificate for node APIs
/// from the same CA and hands it to the node proxy (`pods/log`, `pods/exec`,
/// `pods/attach`): both are the server's credentials, made once at start from the data
/// directory.
pub fn tls_config(paths: &PkiPaths) -> anyhow::Result<rustls::ServerConfig> {
    crate::api::proxy::install_client_identity(
        crate::pki::node_client_identity(paths).context("mint the node API client certificate")?,
    );
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.server_cert)
        .with_context(|| format!("read {}", paths.server_cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse {}", paths.server_cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&paths.server_key)
        .with_context(|| format!("read {}", paths.server_key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("load the serving certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the API on `listener` until the process ends. With `tls`, every connection is
/// TLS; without it (the explicit debugging flag), plain HTTP.
pub async fn serve(
    listener: TcpListener,
    api: Arc<ApiServer>,
    tls: Option<rustls::ServerConfig>,
    authenticator: Option<Arc<Authenticator>>,
) -> anyhow::Result<()> {
    let acceptor = tls.map(|config| tokio_rustls::TlsAcceptor::from(Arc::new(config)));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Running out of file descriptors must not end the server; back off instead.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let authenticator = authenticator.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let api = api.clone();
                let authenticator = authenticator.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        serve_request(api, authenticator, request).await,
                    )
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let result = match acceptor {
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(
                        Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    // Upgrades: `pods/exec` turns the connection into a WebSocket.
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .await
                }
                None => {
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

pub fn local_addr(listener: &TcpListener) -> anyhow::Result<SocketAddr> {
    listener.local_addr().context("listener address")
}
