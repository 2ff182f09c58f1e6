//! Image references normalized as Kubernetes and containerd do (docker/distribution's
//! `ParseNormalizedNamed` plus the kubelet's default `:latest` tag): `busybox` is
//! `docker.io/library/busybox:latest`.

use std::fmt;

/// The registry of references that name none.
pub const DEFAULT_DOMAIN: &str = "docker.io";

/// The tag of references that carry neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

/// The longest repository name (domain and path) distribution accepts.
const MAX_NAME_LENGTH: usize = 255;

/// A normalized image reference: `domain/path[:tag][@digest]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// The registry host, with its port if any: `docker.io`, `localhost:5000`.
    pub domain: String,
    /// The repository path inside the registry: `library/busybox`.
    pub path: String,
    pub tag: Option<String>,
    /// `algorithm:hex`, for example `sha256:...`.
    pub digest: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
}

impl Reference {
    /// Parses and normalizes `text`, adding the default domain, `library/` for official
    /// Docker Hub images, and `:latest` when there is neither tag nor digest.
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        let fail = |reason: &str| ReferenceError {
            reference: text.to_string(),
            reason: reason.to_string(),
        };
        if text.is_empty() {
            return Err(fail("empty reference"));
        }
        if is_hex_identifier(text) {
            return Err(fail("cannot specify 64-byte hexadecimal strings"));
        }
        let (name, digest) = match text.split_once('@') {
            Some((name, digest)) => {
                validate_digest(digest).map_err(|reason| fail(&reason))?;
                (name, Some(digest.to_string()))
            }
            None => (text, None),
        };
        // The tag is after the last ':' that follows the last '/', so a registry port is
        // never mistaken for a tag.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &name[last_slash + i + 1..];
                validate_tag(tag).map_err(|reason| fail(&reason))?;
                (&name[..last_slash + i], Some(tag.to_string()))
            }
            None => (name, None),
        };
        let (domain, path) = split_domain(name);
        validate_domain(&domain).map_err(|reason| fail(&reason))?;
        validate_path(&path).map_err(|reason| fail(&reason))?;
        if domain.len() + 1 + path.len() > MAX_NAME_LENGTH {
            return Err(fail("repository name must not be more than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (tag, _) => tag,
        };
        Ok(Self {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// `domain/path`, the repository without tag or digest.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// What the registry's manifest endpoint is asked for: the digest if there is one,
    /// else the tag.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// `domain/path@digest`, the kubelet's `imageRef` (repo digest) for a manifest digest.
    pub fn with_digest(&self, digest: &str) -> String {
        format!("{}@{}", self.repository(), digest)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// Splits a name into registry domain and path the way distribution does: the first
/// component is a domain only if it has a '.' or a ':', is `localhost`, or has capitals.
fn split_domain(name: &str) -> (String, String) {
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => (DEFAULT_DOMAIN.to_string(), name.to_string()),
    };
    let domain = if domain == "index.docker.io" {
        DEFAULT_DOMAIN.to_string()
    } else {
        domain
    };
    let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    (domain, path)
}

fn is_hex_identifier(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn validate_domain(domain: &str) -> Result<(), String> {
    let invalid = || format!("invalid registry {domain:?}");
    let (host, port) = if domain.starts_with('[') {
        // A bracketed IPv6 address, maybe followed by a port.
        let end = domain.find(']').ok_or_else(invalid)?;
        let port = match &domain[end + 1..] {
            "" => None,
            rest => Some(rest.strip_prefix(':').ok_or_else(invalid)?),
        };
        (&domain[..=end], port)
    } else {
        match domain.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("invalid port in registry {domain:?}"));
    }
    if let Some(ipv6) = host.strip_prefix('[') {
        let valid = ipv6
            .strip_suffix(']')
            .is_some_and(|inner| inner.parse::<std::net::Ipv6Addr>().is_ok());
        return if valid { Ok(()) } else { Err(invalid()) };
    }
    let valid_component = |component: &str| {
        !component.is_empty()
            && component
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !component.starts_with('-')
            && !component.ends_with('-')
    };
    if host.split('.').all(valid_component) {
        Ok(())
    } else {
        Err(invalid())
    }
}

/// Path components are `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn validate_path(path: &str) -> Result<(), String> {
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("repository name must be lowercase".to_string());
    }
    for component in path.split('/') {
        if !valid_path_component(component) {
            return Err(format!("invalid repository path component {component:?}"));
        }
    }
    Ok(())
}

fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alphanumeric(bytes[0]) || !alphanumeric(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alphanumeric(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator: '.', '_', '__' or one or more '-'.
        let start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= bytes.len() || !alphanumeric(bytes[i]) {
            return false;
        }
    }
    true
}

/// Tags are `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn validate_tag(tag: &str) -> Result<(), String> {
    let valid = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !tag.starts_with(['.', '-']);
    if valid {
        Ok(())
    } else {
        Err(format!("invalid tag {tag:?}"))
    }
}

/// Digests are `algorithm:hex`; sha256 (the only one skiff verifies) has 64 hex digits.
pub(crate) fn validate_digest(digest: &str) -> Result<(), String> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(format!("invalid digest {digest:?}: no algorithm"));
    };
    let lower_hex = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match algorithm {
        "sha256" if hex.len() == 64 && lower_hex(hex) => Ok(()),
        "sha512" if hex.len() == 128 && lower_hex(hex) => Ok(()),
        "sha256" | "sha512" => Err(format!("invalid digest {digest:?}")),
        _ => Err(format!("unsupported digest algorithm {algorithm:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized(text: &str) -> String {
        Reference::parse(text)
            .unwrap_or_else(|e| panic!("{e}"))
            .to_string()
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalizes_like_containerd() {
        assert_eq!(normalized("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(normalized("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(
            normalized("library/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(normalized("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            normalized("index.docker.io/user/app:v2"),
            "docker.io/user/app:v2"
        );
        assert_eq!(
            normalized("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(normalized("localhost/app"), "localhost/app:latest");
        assert_eq!(normalized("localhost:5000/app:v1"), "localhost:5000/app:v1");
        assert_eq!(
            normalized("127.0.0.1:5000/a/b/c:v1"),
            "127.0.0.1:5000/a/b/c:v1"
        );
        assert_eq!(
            normalized("registry.k8s.io/pause:3.9"),
            "registry.k8s.io/pause:3.9"
        );
        assert_eq!(normalized("[::1]:5000/app:v1"), "[::1]:5000/app:v1");
        assert_eq!(
            normalized("my_app.x-y__z"),
            "docker.io/library/my_app.x-y__z:latest"
        );
    }

    #[test]
    fn digests_get_no_default_tag() {
        let reference = Reference::parse(&format!("busybox@{DIGEST}")).unwrap();
        assert_eq!(reference.tag, None);
        assert_eq!(reference.object(), DIGEST);
        assert_eq!(
            reference.to_string(),
            format!("docker.io/library/busybox@{DIGEST}")
        );
        assert_eq!(
            normalized(&format!("localhost:5000/app:v1@{DIGEST}")),
            format!("localhost:5000/app:v1@{DIGEST}")
        );
    }

    #[test]
    fn parts() {
        let reference = Reference::parse("localhost:5000/team/app:v1").unwrap();
        assert_eq!(reference.domain, "localhost:5000");
        assert_eq!(reference.path, "team/app");
        assert_eq!(reference.object(), "v1");
        assert_eq!(reference.repository(), "localhost:5000/team/app");
        assert_eq!(
            reference.with_digest(DIGEST),
            format!("localhost:5000/team/app@{DIGEST}")
        );
    }

    #[test]
    fn rejects_invalid() {
        for bad in [
            "",
            "Busybox",
            "docker.io/Library/busybox",
            "busybox:",
            "busybox:-tag",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "a//b",
            "-app",
            "app-",
            "app..x",
            "app___x",
            "localhost:port/app",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "bad host/app",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let error = Reference::parse("Busybox").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid image reference \"Busybox\": repository name must be lowercase"
        );
    }
}
