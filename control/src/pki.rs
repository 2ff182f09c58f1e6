//! The cluster's certificates and credentials: a CA and serving certificate generated at
//! first start, the static bearer-token file, and the admin kubeconfig that carries both.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use rand::Rng;

/// Where the credentials live inside the data directory.
pub struct PkiPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub tokens: PathBuf,
}

impl PkiPaths {
    pub fn new(data_dir: &Path) -> Self {
        let pki = data_dir.join("pki");
        Self {
            ca_cert: pki.join("ca.crt"),
            ca_key: pki.join("ca.key"),
            server_cert: pki.join("apiserver.crt"),
            server_key: pki.join("apiserver.key"),
            tokens: data_dir.join("tokens.csv"),
        }
    }
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("sync {}", path.display()))
}

/// The CA's subject and extensions. The CA key signs with these params, so a certificate
/// issued later (see [`node_client_identity`]) names exactly the issuer the CA certificate has.
fn ca_params() -> anyhow::Result<rcgen::CertificateParams> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "skiff-ca");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(ca_params)
}

/// Creates the CA and the serving certificate unless all four files already exist. The
/// serving certificate names `hosts` (DNS names or IP addresses) besides the usual local ones.
pub fn ensure_certificates(paths: &PkiPaths, hosts: &[String]) -> anyhow::Result<()> {
    let present = [
        &paths.ca_cert,
        &paths.ca_key,
        &paths.server_cert,
        &paths.server_key,
    ]
    .iter()
    .all(|p| p.exists());
    if present {
        return Ok(());
    }
    let ca_params = ca_params()?;
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut names: Vec<String> = vec![
        "localhost".into(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "127.0.0.1".into(),
    ];
    for host in hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    let mut server_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    server_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "skiff-apiserver");
    for name in &names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(name.clone().try_into()?),
        };
        server_params.subject_alt_names.push(san);
    }
    server_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    server_params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let server_key = rcgen::KeyPair::generate()?;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    write_private(&paths.ca_key, &ca_key.serialize_pem())?;
    write_private(&paths.ca_cert, &ca_cert.pem())?;
    write_private(&paths.server_key, &server_key.serialize_pem())?;
    write_private(&paths.server_cert, &server_cert.pem())?;
    Ok(())
}

/// A client certificate and its private key, in PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

/// The API server's client certificate for the node APIs, as kube-apiserver's
/// `--kubelet-client-certificate`: signed by the cluster CA (which agents trust with
/// `--client-ca-file`), for client authentication only. It is minted at every start and
/// kept in memory only, so it never needs rotating on disk.
pub fn node_client_identity(paths: &PkiPaths) -> anyhow::Result<ClientIdentity> {
    let ca_key_pem = fs::read_to_string(&paths.ca_key)
        .with_context(|| format!("read {}", paths.ca_key.display()))?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("parse {}", paths.ca_key.display()))?;
    let ca_params = ca_params()?;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver-kubelet-client");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:masters");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.not_after = ca_params.not_after;
    let key = rcgen::KeyPair::generate()?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("sign the node client certificate")?;
    Ok(ClientIdentity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// One line of the token file: `token,user,uid[,"group1,group2"]`, as kube-apiserver's
/// `--token-auth-file` reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEntry {
    pub token: String,
    pub user: String,
    pub uid: String,
    pub groups: Vec<String>,
}

pub fn parse_token_file(contents: &str) -> anyhow::Result<Vec<TokenEntry>> {
    let mut entries = Vec::new();
    for (index, line) in contents.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(4, ',');
        let (Some(token), Some(user), Some(uid)) = (fields.next(), fields.next(), fields.next())
        else {
            anyhow::bail!(
                "token file line {}: expected token,user,uid[,groups]",
                index + 1
            );
        };
        let groups = fields
            .next()
            .map(|g| {
                g.trim_matches('"')
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if token.is_empty() {
            anyhow::bail!("token file line {}: empty token", index + 1);
        }
        entries.push(TokenEntry {
            token: token.to_string(),
            user: user.to_string(),
            uid: uid.to_string(),
            groups,
        });
    }
    Ok(entries)
}

/// Reads the token file, creating it with one admin token when it does not exist.
pub fn ensure_tokens(path: &Path) -> anyhow::Result<Vec<TokenEntry>> {
    if !path.exists() {
        let token: String = rand::rng()
            .sample_iter(&rand::distr::Alphanumeric)
            .take(40)
            .map(char::from)
            .collect();
        write_private(path, &format!("{token},admin,admin,\"system:masters\"\n"))?;
    }
    let contents = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let entries =
        parse_token_file(&contents).with_context(|| format!("parse {}", path.display()))?;
    anyhow::ensure!(!entries.is_empty(), "{} holds no tokens", path.display());
    Ok(entries)
}

/// Writes a kubeconfig for `server` that trusts the CA and presents `token`.
pub fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca_pem: &str,
    token: &str,
) -> anyhow::Result<()> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: skiff\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: skiff\n  context:\n    cluster: skiff\n    user: admin\n    namespace: default\ncurrent-context: skiff\n"
    );
    write_private(path, &config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_lines_parse_like_kube_apiserver() {
        let entries =
            parse_token_file("# comment\nabc,admin,1,\"system:masters,dev\"\nxyz,bob,2\n").unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].groups, ["system:masters", "dev"]);
        assert!(entries[1].groups.is_empty());
        assert!(parse_token_file("onlytoken\n").is_err());
    }

    #[test]
    fn node_client_certificates_verify_against_the_ca() {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, UnixTime};
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let paths = PkiPaths::new(dir.path());
        ensure_certificates(&paths, &[]).unwrap();
        let identity = node_client_identity(&paths).unwrap();
        assert!(identity.key_pem.contains("PRIVATE KEY"));

        let verifier_for = |ca: &Path| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(cert.unwrap()).unwrap();
            }
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .unwrap()
        };
        let cert = CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).unwrap();
        verifier_for(&paths.ca_cert)
            .verify_client_cert(&cert, &[], UnixTime::now())
            .expect("the cluster CA accepts the node client certificate");

        // Another cluster's CA does not.
        let other = tempfile::tempdir().unwrap();
        let other_paths = PkiPaths::new(other.path());
        ensure_certificates(&other_paths, &[]).unwrap();
        assert!(
            verifier_for(&other_paths.ca_cert)
                .verify_client_cert(&cert, &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn certificates_are_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PkiPaths::new(dir.path());
        ensure_certificates(&paths, &["10.1.2.3".into(), "node.example".into()]).unwrap();
        let first = fs::read_to_string(&paths.server_cert).unwrap();
        ensure_certificates(&paths, &[]).unwrap();
        assert_eq!(first, fs::read_to_string(&paths.server_cert).unwrap());
        assert!(first.starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
