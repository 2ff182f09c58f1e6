//! Registry credentials from image pull secrets, matched to an image as the kubelet's
//! credential keyring matches them (`pkg/credentialprovider/keyring.go`): a secret's keys
//! (`host[:port][/path]`, with or without a scheme, `/v1/` and `/v2/` meaning the host) match
//! an image whose host has as many labels, each matching (`*` globs allowed), the same
//! port, and a repository starting with the key's path; the most specific keys come first.
//! Pure.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;

use super::reference::{DEFAULT_DOMAIN, Reference};
use super::registry::Credentials;

/// The secret types that hold registry credentials, and the data key of each.
pub const DOCKER_CONFIG_JSON: (&str, &str) =
    ("kubernetes.io/dockerconfigjson", ".dockerconfigjson");
pub const DOCKER_CFG: (&str, &str) = ("kubernetes.io/dockercfg", ".dockercfg");

/// Docker Hub's key in docker configurations (`https://index.docker.io/v1/`, normalized).
const DEFAULT_REGISTRY_HOST: &str = "index.docker.io";

/// One registry's entry of a docker configuration.
#[derive(Deserialize, Default)]
struct Entry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    /// base64 of `username:password`, used when the two above are empty.
    #[serde(default)]
    auth: String,
}

#[derive(Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

/// Credentials by normalized key, looked up most specific key first.
#[derive(Debug, Default, Clone)]
pub struct Keyring {
    entries: Vec<(String, Credentials)>,
}

impl Keyring {
    /// Adds the credentials of a secret of type `secret_type` with `data`; a secret of
    /// another type adds nothing. Fails with why when its data is not a docker
    /// configuration.
    pub fn add_secret(
        &mut self,
        secret_type: &str,
        data: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(), String> {
        let entries: BTreeMap<String, Entry> = if secret_type == DOCKER_CONFIG_JSON.0 {
            let bytes = data
                .get(DOCKER_CONFIG_JSON.1)
                .ok_or_else(|| format!("no {} key", DOCKER_CONFIG_JSON.1))?;
            serde_json::from_slice::<DockerConfigJson>(bytes)
                .map_err(|e| format!("{}: {e}", DOCKER_CONFIG_JSON.1))?
                .auths
        } else if secret_type == DOCKER_CFG.0 {
            let bytes = data
                .get(DOCKER_CFG.1)
                .ok_or_else(|| format!("no {} key", DOCKER_CFG.1))?;
            serde_json::from_slice(bytes).map_err(|e| format!("{}: {e}", DOCKER_CFG.1))?
        } else {
            return Ok(());
        };
        for (location, entry) in entries {
            let credentials = credentials(entry)
                .map_err(|reason| format!("credentials for {location:?}: {reason}"))?;
            self.entries.push((normalize_key(&location), credentials));
        }
        // Reverse order puts `quay.io/team` before `quay.io`, as the kubelet's index.
        self.entries.sort_by(|a, b| b.0.cmp(&a.0));
        self.entries.dedup();
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every credential that matches the image's repository, most specific first; for a
    /// Docker Hub image with none, those for `index.docker.io`.
    pub fn lookup(&self, reference: &Reference) -> Vec<Credentials> {
        let target = format!("{}/{}", reference.domain, reference.path);
        let matching: Vec<Credentials> = self
            .entries
            .iter()
            .filter(|(key, _)| urls_match(key, &target))
            .map(|(_, credentials)| credentials.clone())
            .collect();
        if !matching.is_empty() || reference.domain != DEFAULT_DOMAIN {
            return matching;
        }
        self.entries
            .iter()
            .filter(|(key, _)| key == DEFAULT_REGISTRY_HOST)
            .map(|(_, credentials)| credentials.clone())
            .collect()
    }
}

fn credentials(entry: Entry) -> Result<Credentials, String> {
    if !entry.username.is_empty() || !entry.password.is_empty() || entry.auth.is_empty() {
        return Ok(Credentials {
            username: entry.username,
            password: entry.password,
        });
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry.auth.trim())
        .map_err(|e| format!("auth is not base64: {e}"))?;
    let text = String::from_utf8(decoded).map_err(|_| "auth is not UTF-8".to_string())?;
    let (username, password) = text
        .split_once(':')
        .ok_or_else(|| "auth is not username:password".to_string())?;
    Ok(Credentials {
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// `https://host:port/v1/path/` → `host:port/path/`; `host` alone stays `host`.
fn normalize_key(location: &str) -> String {
    let without_scheme = location
        .strip_prefix("https://")
        .or_else(|| location.strip_prefix("http://"))
        .unwrap_or(location);
    let (host, path) = match without_scheme.find('/') {
        Some(slash) => without_scheme.split_at(slash),
        None => (without_scheme, ""),
    };
    let path = ["/v1/", "/v2/"]
        .iter()
        .find_map(|prefix| path.strip_prefix(prefix).map(|rest| format!("/{rest}")))
        .unwrap_or_else(|| path.to_string());
    if path.is_empty() || path == "/" {
        host.to_string()
    } else {
        format!("{host}{path}")
    }
}

/// Splits `host[:port][/path]` into its host labels, its port and its path.
fn split(url: &str) -> (Vec<&str>, &str, &str) {
    let (authority, path) = match url.find('/') {
        Some(slash) => url.split_at(slash),
        None => (url, ""),
    };
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, ""));
    (host.split('.').collect(), port, path)
}

/// The kubelet's URLsMatch: as many labels, each matching the glob, the same port, and
/// the target's path starting with the key's.
fn urls_match(key: &str, target: &str) -> bool {
    let (key_labels, key_port, key_path) = split(key);
    let (target_labels, target_port, target_path) = split(target);
    key_port == target_port
        && key_labels.len() == target_labels.len()
        && target_path.starts_with(key_path)
        && key_labels
            .iter()
            .zip(&target_labels)
            .all(|(glob, label)| glob_match(glob.as_bytes(), label.as_bytes()))
}

/// `*` (any run of characters) and `?` (one), as Go's filepath.Match within a label.
fn glob_match(glob: &[u8], text: &[u8]) -> bool {
    match glob.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob_match(rest, &text[skip..])),
        Some((b'?', rest)) => !text.is_empty() && glob_match(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && glob_match(rest, &text[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secret(secret_type: (&str, &str), value: serde_json::Value) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([(secret_type.1.to_string(), value.to_string().into_bytes())])
    }

    fn user(name: &str) -> Credentials {
        Credentials {
            username: name.into(),
            password: format!("{name}-pw"),
        }
    }

    fn users(keyring: &Keyring, image: &str) -> Vec<String> {
        keyring
            .lookup(&Reference::parse(image).unwrap())
            .into_iter()
            .map(|c| c.username)
            .collect()
    }

    #[test]
    fn secrets_match_images_by_host_port_and_path_most_specific_first() {
        let mut keyring = Keyring::default();
        let auth = base64::engine::general_purpose::STANDARD.encode("team:team-pw");
        keyring
            .add_secret(
                DOCKER_CONFIG_JSON.0,
                &secret(
                    DOCKER_CONFIG_JSON,
                    json!({"auths": {
                        "https://registry.example:5000/v2/": {"username": "host", "password": "host-pw"},
                        "registry.example:5000/team": {"auth": auth},
                        "*.corp.example": {"username": "glob", "password": "glob-pw"},
                        "https://index.docker.io/v1/": {"username": "hub", "password": "hub-pw"},
                    }}),
                ),
            )
            .unwrap();
        assert_eq!(
            keyring.lookup(&Reference::parse("registry.example:5000/team/app:v1").unwrap()),
            [user("team"), user("host")]
        );
        assert_eq!(users(&keyring, "registry.example:5000/other/app"), ["host"]);
        // Another port, or none, is another registry.
        assert!(users(&keyring, "registry.example/team/app").is_empty());
        assert_eq!(users(&keyring, "images.corp.example/app"), ["glob"]);
        assert!(users(&keyring, "a.images.corp.example/app").is_empty());
        assert_eq!(users(&keyring, "busybox"), ["hub"]);
        assert!(users(&keyring, "quay.io/team/app").is_empty());
    }

    #[test]
    fn legacy_dockercfg_secrets_and_other_types() {
        let mut keyring = Keyring::default();
        keyring
            .add_secret(
                DOCKER_CFG.0,
                &secret(
                    DOCKER_CFG,
                    json!({"localhost:5000": {"username": "old", "password": "old-pw"}}),
                ),
            )
            .unwrap();
        keyring.add_secret("Opaque", &BTreeMap::new()).unwrap();
        assert_eq!(users(&keyring, "localhost:5000/app"), ["old"]);
        let error = keyring
            .add_secret(DOCKER_CONFIG_JSON.0, &BTreeMap::new())
            .unwrap_err();
        assert_eq!(error, "no .dockerconfigjson key");
        let error = keyring
            .add_secret(
                DOCKER_CONFIG_JSON.0,
                &secret(
                    DOCKER_CONFIG_JSON,
                    json!({"auths": {"r.example": {"auth": "bm9jb2xvbg=="}}}),
                ),
            )
            .unwrap_err();
        assert_eq!(
            error,
            "credentials for \"r.example\": auth is not username:password"
        );
        assert_eq!(
            format!("{:?}", user("a")),
            "Credentials { username: \"a\", .. }"
        );
    }
}
