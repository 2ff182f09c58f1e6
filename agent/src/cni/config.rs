//! Network configuration: loading the node's configuration list from a directory (as
//! containerd's CRI does: the first file in lexical order), validating it, and building the
//! configuration each plugin reads on stdin (`name`, `cniVersion`, `prevResult`,
//! `runtimeConfig`, `cni.dev/valid-attachments` injected, as libcni does).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

use super::error::CniError;

/// The spec versions the runtime speaks. 0.1.0 and 0.2.0 had another result format and
/// are refused; every version here shares one result shape.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The file extensions read from a configuration directory.
pub const CONFIG_EXTENSIONS: &[&str] = &["conflist", "conf", "json"];

/// A network configuration list: a network name, a spec version, and the plugins of the
/// chain in order.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfigList {
    pub name: String,
    /// The version every plugin of the chain is asked to speak.
    pub cni_version: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    pub plugins: Vec<PluginConfig>,
    /// The file it was read from, or `<inline>`.
    pub origin: String,
}

/// One plugin of a chain, as written in the list.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// `type`: the name of the plugin's executable.
    pub plugin_type: String,
    /// The capabilities the plugin declares (`"capabilities": {"portMappings": true}`);
    /// only those get `runtimeConfig` entries.
    pub capabilities: BTreeSet<String>,
    /// The plugin's object as written.
    pub raw: Map<String, Value>,
}

/// What the runtime adds to a plugin's configuration for one invocation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Injection<'a> {
    /// The result of the previous plugin (ADD), or the cached result (CHECK, DEL).
    pub prev_result: Option<&'a Value>,
    /// The runtime's capability arguments; each one the plugin declares goes into its
    /// `runtimeConfig`.
    pub capability_args: Option<&'a Map<String, Value>>,
    /// GC's `cni.dev/valid-attachments`.
    pub valid_attachments: Option<&'a Value>,
}

/// A parsed `MAJOR.MINOR.PATCH`.
pub(crate) fn parse_version(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let parsed = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(parsed)
}

/// True when `version` is `minimum` or later (false when either does not parse).
pub(crate) fn version_at_least(version: &str, minimum: &str) -> bool {
    match (parse_version(version), parse_version(minimum)) {
        (Some(v), Some(m)) => v >= m,
        _ => false,
    }
}

/// The spec's rule for network names and container ids: a letter or digit, then letters,
/// digits, `_`, `.` and `-`.
pub(crate) fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The configuration file a directory holds: the first `*.conflist`, `*.conf` or `*.json`
/// in lexical order of file names, as containerd's CRI picks it. That file decides: an
/// invalid one is an error naming it, not a reason to try the next.
pub fn load_config_dir(dir: &Path) -> Result<NetworkConfigList, CniError> {
    let dir_error = |source| CniError::ConfigDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_error)? {
        let path = entry.map_err(dir_error)?.path();
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if CONFIG_EXTENSIONS.contains(&extension) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let path = files.first().ok_or_else(|| CniError::NoConfig {
        dir: dir.to_path_buf(),
    })?;
    load_config_file(path)
}

/// One configuration file: a `.conflist` is a list; a `.conf` or `.json` is a single
/// plugin's configuration, made a list of one (or a list, if it is written as one).
pub fn load_config_file(path: &Path) -> Result<NetworkConfigList, CniError> {
    let bytes = std::fs::read(path).map_err(|source| CniError::ConfigRead {
        path: path.to_path_buf(),
        source,
    })?;
    let origin = path.display().to_string();
    let value = parse_json(&bytes, &origin)?;
    if path.extension().is_some_and(|e| e == "conflist") {
        NetworkConfigList::from_list_value(value, &origin)
    } else {
        NetworkConfigList::from_value(value, &origin)
    }
}

fn parse_json(bytes: &[u8], origin: &str) -> Result<Value, CniError> {
    serde_json::from_slice(bytes).map_err(|e| CniError::InvalidConfig {
        origin: origin.to_owned(),
        reason: format!("not JSON: {e}"),
    })
}

impl NetworkConfigList {
    /// A configuration given as bytes: a list when it has `plugins`, else a single plugin
    /// configuration.
    pub fn from_bytes(bytes: &[u8]) -> Result<NetworkConfigList, CniError> {
        NetworkConfigList::from_value(parse_json(bytes, "<inline>")?, "<inline>")
    }

    /// A list when the object has `plugins` and no `type`, else a single plugin
    /// configuration converted to a list of one.
    pub fn from_value(value: Value, origin: &str) -> Result<NetworkConfigList, CniError> {
        let is_list = value
            .as_object()
            .is_some_and(|o| o.contains_key("plugins") && !o.contains_key("type"));
        if is_list {
            return NetworkConfigList::from_list_value(value, origin);
        }
        let invalid = |reason: String| CniError::InvalidConfig {
            origin: origin.to_owned(),
            reason,
        };
        let Value::Object(conf) = value else {
            return Err(invalid("not a JSON object".into()));
        };
        if !conf.get("type").is_some_and(|t| t.is_string()) {
            return Err(invalid(
                "no type (a single plugin configuration names its plugin in `type`)".into(),
            ));
        }
        let mut list = Map::new();
        for key in ["cniVersion", "cniVersions", "name"] {
            if let Some(v) = conf.get(key) {
                list.insert(key.to_owned(), v.clone());
            }
        }
        list.insert(
            "plugins".to_owned(),
            Value::Array(vec![Value::Object(conf)]),
        );
        NetworkConfigList::from_list_value(Value::Object(list), origin)
    }

    /// A configuration list (`.conflist`), validated: `name`, `cniVersion` (or the highest
    /// supported of `cniVersions`), and a non-empty `plugins` array of objects with a
    /// `type`.
    pub fn from_list_value(value: Value, origin: &str) -> Result<NetworkConfigList, CniError> {
        let invalid = |reason: String| CniError::InvalidConfig {
            origin: origin.to_owned(),
            reason,
        };
        let Value::Object(list) = value else {
            return Err(invalid("not a JSON object".into()));
        };
        let name = match list.get("name") {
            None => return Err(invalid("no name".into())),
            Some(Value::String(name)) if is_valid_name(name) => name.clone(),
            Some(Value::String(name)) => {
                return Err(invalid(format!(
                    "name {name:?} is invalid: it must start with a letter or digit and hold \
                     only letters, digits, '_', '.' and '-'"
                )));
            }
            Some(other) => return Err(invalid(format!("name must be a string, not {other}"))),
        };
        let cni_version = select_version(&list).map_err(invalid)?;
        let disable_check = flag(&list, "disableCheck").map_err(invalid)?;
        let disable_gc = flag(&list, "disableGC").map_err(invalid)?;
        let plugins = match list.get("plugins") {
            None => return Err(invalid("no plugins".into())),
            Some(Value::Array(plugins)) if plugins.is_empty() => {
                return Err(invalid("no plugins: the plugins list is empty".into()));
            }
            Some(Value::Array(plugins)) => plugins,
            Some(_) => return Err(invalid("plugins must be a list".into())),
        };
        let plugins = plugins
            .iter()
            .enumerate()
            .map(|(index, plugin)| plugin_config(index, plugin).map_err(&invalid))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NetworkConfigList {
            name,
            cni_version,
            disable_check,
            disable_gc,
            plugins,
            origin: origin.to_owned(),
        })
    }

    /// The list as JSON (with the version chosen), what the results cache keeps so that a
    /// later DEL can run with the configuration the ADD ran with.
    pub fn to_value(&self) -> Value {
        let mut list = Map::new();
        list.insert("cniVersion".into(), self.cni_version.clone().into());
        list.insert("name".into(), self.name.clone().into());
        if self.disable_check {
            list.insert("disableCheck".into(), true.into());
        }
        if self.disable_gc {
            list.insert("disableGC".into(), true.into());
        }
        let plugins = self
            .plugins
            .iter()
            .map(|p| Value::Object(p.raw.clone()))
            .collect();
        list.insert("plugins".into(), Value::Array(plugins));
        Value::Object(list)
    }

    /// The configuration plugin `index` reads on stdin: its own object with the list's
    /// `name` and `cniVersion`, and what `inject` carries.
    pub fn plugin_stdin(&self, index: usize, inject: &Injection) -> Value {
        let plugin = &self.plugins[index];
        let mut conf = plugin.raw.clone();
        conf.insert("name".into(), self.name.clone().into());
        conf.insert("cniVersion".into(), self.cni_version.clone().into());
        if let Some(prev) = inject.prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        if let Some(args) = inject.capability_args {
            let runtime_config: Map<String, Value> = args
                .iter()
                .filter(|(name, _)| plugin.capabilities.contains(*name))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect();
            // As libcni: only when the plugin gets something, and then it replaces any
            // runtimeConfig written in the file.
            if !runtime_config.is_empty() {
                conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
            }
        }
        if let Some(valid) = inject.valid_attachments {
            conf.insert("cni.dev/valid-attachments".into(), valid.clone());
        }
        Value::Object(conf)
    }
}

/// `cniVersions` (spec 1.1), when present, offers several versions: the highest one the
/// runtime speaks is chosen. Otherwise `cniVersion` must be one it speaks.
fn select_version(list: &Map<String, Value>) -> Result<String, String> {
    if let Some(offered) = list.get("cniVersions") {
        let Some(offered) = offered.as_array() else {
            return Err("cniVersions must be a list of strings".into());
        };
        let mut best: Option<&str> = None;
        for version in offered {
            let Some(version) = version.as_str() else {
                return Err("cniVersions must be a list of strings".into());
            };
            if SUPPORTED_VERSIONS.contains(&version)
                && best.is_none_or(|b| parse_version(version) > parse_version(b))
            {
                best = Some(version);
            }
        }
        return best.map(str::to_owned).ok_or_else(|| {
            format!(
                "none of cniVersions {} is supported (supported: {})",
                Value::Array(offered.clone()),
                SUPPORTED_VERSIONS.join(", ")
            )
        });
    }
    match list.get("cniVersion") {
        None => Err("no cniVersion".into()),
        Some(Value::String(v)) if SUPPORTED_VERSIONS.contains(&v.as_str()) => Ok(v.clone()),
        Some(Value::String(v)) => Err(format!(
            "cniVersion {v:?} is not supported (supported: {})",
            SUPPORTED_VERSIONS.join(", ")
        )),
        Some(other) => Err(format!("cniVersion must be a string, not {other}")),
    }
}

/// A boolean flag of the list; libcni also takes the strings "true" and "false".
fn flag(list: &Map<String, Value>, key: &str) -> Result<bool, String> {
    match list.get(key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err(format!("{key} must be true or false, not {other}")),
    }
}

fn plugin_config(index: usize, plugin: &Value) -> Result<PluginConfig, String> {
    let Value::Object(raw) = plugin else {
        return Err(format!("plugin {index} is not an object"));
    };
    let plugin_type = match raw.get("type") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        _ => return Err(format!("plugin {index} has no type")),
    };
    if plugin_type.contains('/') || plugin_type == "." || plugin_type == ".." {
        return Err(format!(
            "plugin {index} type {plugin_type:?} is not a plain executable name"
        ));
    }
    let capabilities = match raw.get("capabilities") {
        None => BTreeSet::new(),
        Some(Value::Object(caps)) => {
            let mut enabled = BTreeSet::new();
            for (name, on) in caps {
                match on {
                    Value::Bool(true) => {
                        enabled.insert(name.clone());
                    }
                    Value::Bool(false) => {}
                    _ => {
                        return Err(format!(
                            "plugin {index} ({plugin_type}) capability {name} must be true or false"
                        ));
                    }
                }
            }
            enabled
        }
        Some(_) => {
            return Err(format!(
                "plugin {index} ({plugin_type}) capabilities must be an object"
            ));
        }
    };
    Ok(PluginConfig {
        plugin_type,
        capabilities,
        raw: raw.clone(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn list(value: Value) -> Result<NetworkConfigList, CniError> {
        NetworkConfigList::from_list_value(value, "test.conflist")
    }

    fn reason(value: Value) -> String {
        list(value).unwrap_err().to_string()
    }

    #[test]
    fn a_list_is_validated_with_clear_errors() {
        let good = list(json!({
            "cniVersion": "1.0.0", "name": "pods",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
                {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}},
            ],
        }))
        .unwrap();
        assert_eq!(good.name, "pods");
        assert_eq!(good.cni_version, "1.0.0");
        assert_eq!(good.plugins.len(), 2);
        assert_eq!(good.plugins[1].plugin_type, "portmap");
        assert_eq!(
            good.plugins[1].capabilities,
            BTreeSet::from(["portMappings".to_owned()])
        );
        assert!(!good.disable_check);

        let cases = [
            (json!([1]), "not a JSON object"),
            (json!({"cniVersion": "1.0.0", "plugins": []}), "no name"),
            (
                json!({"name": "-bad", "cniVersion": "1.0.0", "plugins": [{"type": "x"}]}),
                "name \"-bad\" is invalid",
            ),
            (
                json!({"name": "n", "plugins": [{"type": "x"}]}),
                "no cniVersion",
            ),
            (
                json!({"name": "n", "cniVersion": "0.2.0", "plugins": [{"type": "x"}]}),
                "cniVersion \"0.2.0\" is not supported (supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)",
            ),
            (
                json!({"name": "n", "cniVersion": 1, "plugins": [{"type": "x"}]}),
                "cniVersion must be a string",
            ),
            (json!({"name": "n", "cniVersion": "1.0.0"}), "no plugins"),
            (
                json!({"name": "n", "cniVersion": "1.0.0", "plugins": []}),
                "the plugins list is empty",
            ),
            (
                json!({"name": "n", "cniVersion": "1.0.0", "plugins": {}}),
                "plugins must be a list",
            ),
            (
                json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "x"}, 3]}),
                "plugin 1 is not an object",
            ),
            (
                json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{"bridge": "x"}]}),
                "plugin 0 has no type",
            ),
            (
                json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "../sbin/x"}]}),
                "not a plain executable name",
            ),
            (
                json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "x", "capabilities": {"a": 1}}]}),
                "capability a must be true or false",
            ),
            (
                json!({"name": "n", "cniVersion": "1.0.0", "disableCheck": 2, "plugins": [{"type": "x"}]}),
                "disableCheck must be true or false",
            ),
        ];
        for (value, expected) in cases {
            let message = reason(value.clone());
            assert!(
                message.starts_with("invalid network configuration test.conflist: ")
                    && message.contains(expected),
                "{value}: {message}"
            );
        }
    }

    #[test]
    fn cni_versions_picks_the_highest_supported() {
        let chosen = list(json!({
            "cniVersion": "0.4.0", "cniVersions": ["0.4.0", "1.1.0", "1.0.0", "9.9.9"],
            "name": "n", "plugins": [{"type": "x"}],
        }))
        .unwrap();
        assert_eq!(chosen.cni_version, "1.1.0");
        assert!(
            reason(json!({"cniVersions": ["9.0.0"], "name": "n", "plugins": [{"type": "x"}]}))
                .contains("none of cniVersions [\"9.0.0\"] is supported")
        );
    }

    #[test]
    fn flags_accept_booleans_and_their_strings() {
        let l = list(json!({
            "cniVersion": "1.1.0", "name": "n", "disableCheck": "TRUE", "disableGC": true,
            "plugins": [{"type": "x"}],
        }))
        .unwrap();
        assert!(l.disable_check && l.disable_gc);
    }

    #[test]
    fn a_single_plugin_configuration_becomes_a_list_of_one() {
        let l = NetworkConfigList::from_bytes(
            br#"{"cniVersion": "0.4.0", "name": "single", "type": "bridge", "bridge": "br0"}"#,
        )
        .unwrap();
        assert_eq!(l.name, "single");
        assert_eq!(l.cni_version, "0.4.0");
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.plugins[0].raw["bridge"], "br0");
        let err = NetworkConfigList::from_bytes(br#"{"cniVersion": "0.4.0", "name": "x"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no type"), "{err}");
        let err = NetworkConfigList::from_bytes(b"{not json").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid network configuration <inline>: not JSON:"),
            "{err}"
        );
    }

    #[test]
    fn the_first_file_in_lexical_order_decides() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_config_dir(dir.path()).unwrap_err();
        assert!(matches!(err, CniError::NoConfig { .. }), "{err}");
        std::fs::write(dir.path().join("README"), "not a config").unwrap();
        std::fs::write(
            dir.path().join("20-single.conf"),
            r#"{"cniVersion": "1.0.0", "name": "single", "type": "bridge"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("30-list.conflist"),
            r#"{"cniVersion": "1.0.0", "name": "later", "plugins": [{"type": "bridge"}]}"#,
        )
        .unwrap();
        assert_eq!(load_config_dir(dir.path()).unwrap().name, "single");
        std::fs::write(
            dir.path().join("10-list.conflist"),
            r#"{"cniVersion": "1.1.0", "name": "first", "plugins": [{"type": "skiff-cni"}]}"#,
        )
        .unwrap();
        let first = load_config_dir(dir.path()).unwrap();
        assert_eq!(first.name, "first");
        assert!(first.origin.ends_with("10-list.conflist"));
        // A broken first file is an error that names it, not a reason to skip it.
        std::fs::write(
            dir.path().join("05-broken.conflist"),
            r#"{"cniVersion": "1.1.0", "plugins": [{"type": "x"}]}"#,
        )
        .unwrap();
        let err = load_config_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("05-broken.conflist") && err.ends_with("no name"),
            "{err}"
        );
        // A .conflist must be a list.
        std::fs::write(
            dir.path().join("01-single.conflist"),
            r#"{"cniVersion": "1.1.0", "name": "x", "type": "bridge"}"#,
        )
        .unwrap();
        let err = load_config_dir(dir.path()).unwrap_err().to_string();
        assert!(err.ends_with("no plugins"), "{err}");
        let missing = load_config_dir(&dir.path().join("absent")).unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("read network configuration directory"),
            "{missing}"
        );
    }

    #[test]
    fn stdin_gets_name_version_prev_result_and_declared_capabilities() {
        let l = list(json!({
            "cniVersion": "1.0.0", "name": "pods",
            "plugins": [
                {"type": "bridge", "name": "ignored", "cniVersion": "0.1.0",
                 "runtimeConfig": {"kept": true}},
                {"type": "portmap", "capabilities": {"portMappings": true},
                 "runtimeConfig": {"replaced": true}},
            ],
        }))
        .unwrap();
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]});
        let mut caps = Map::new();
        caps.insert("portMappings".into(), json!([{"hostPort": 8080}]));
        caps.insert("bandwidth".into(), json!({"ingressRate": 1}));
        let inject = Injection {
            prev_result: Some(&prev),
            capability_args: Some(&caps),
            valid_attachments: None,
        };
        let first = l.plugin_stdin(0, &Injection::default());
        assert_eq!(
            first,
            json!({"type": "bridge", "name": "pods", "cniVersion": "1.0.0",
                   "runtimeConfig": {"kept": true}})
        );
        let second = l.plugin_stdin(1, &inject);
        assert_eq!(
            second,
            json!({"type": "portmap", "name": "pods", "cniVersion": "1.0.0",
                   "capabilities": {"portMappings": true},
                   "runtimeConfig": {"portMappings": [{"hostPort": 8080}]},
                   "prevResult": prev})
        );
        // The bridge declares no capability: nothing is injected, its own value stays.
        assert_eq!(
            l.plugin_stdin(0, &inject)["runtimeConfig"],
            json!({"kept": true})
        );
        let valid = json!([{"containerID": "c1", "ifname": "eth0"}]);
        let gc = l.plugin_stdin(
            0,
            &Injection {
                valid_attachments: Some(&valid),
                ..Default::default()
            },
        );
        assert_eq!(gc["cni.dev/valid-attachments"], valid);
    }

    #[test]
    fn round_trip_through_json() {
        let l = list(json!({
            "cniVersion": "1.1.0", "name": "pods", "disableGC": true,
            "plugins": [{"type": "skiff-cni", "bridge": "cni0"}],
        }))
        .unwrap();
        let again = NetworkConfigList::from_value(l.to_value(), "test.conflist").unwrap();
        assert_eq!(again, l);
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("1.1.0", "0.4.0"));
        assert!(version_at_least("0.10.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("junk", "0.4.0"));
        assert_eq!(parse_version("1.0.0.0"), None);
        assert!(is_valid_name("a-b_c.d"));
        assert!(!is_valid_name("_a") && !is_valid_name("") && !is_valid_name("a/b"));
    }
}
