//! The agent as a CNI runtime (spec 1.1, the exec protocol, behaving as libcni does): it
//! loads the node's network configuration list ([`load_config_dir`]), runs the plugin
//! chain for ADD, CHECK and DEL of a pod's attachment, STATUS and GC of the network, and
//! keeps each ADD result in a results cache for DEL, CHECK and adoption after a restart.
//! Any plugin works: the reference `bridge` + `host-local`, `skiff-cni`, or another.
//!
//! - ADD runs the plugins in order, each getting the previous one's result as
//!   `prevResult`; the last result is parsed, converted to the list's version and cached.
//!   When a plugin fails, DEL runs (in reverse) for it and every plugin before it, so a
//!   failed ADD leaves nothing behind.
//! - DEL runs the plugins in reverse with the cached result and succeeds when the namespace
//!   or the cache entry is gone (`CNI_NETNS` is then empty, as the spec allows), so it can
//!   be repeated.
//! - CHECK needs 0.4.0 and a cached result; STATUS and GC's plugin calls need 1.1.0 and are
//!   skipped for older versions, as libcni does. GC first DELs the cached attachments that
//!   are not in the valid list.
//!
//! Plugins run as child processes of the calling thread, so in its network namespace:
//! the host's, since no thread of the agent's runtime ever changes namespace.

mod cache;
mod config;
mod error;
mod exec;
mod result;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use cache::CachedAttachment;
pub use config::{
    CONFIG_EXTENSIONS, Injection, NetworkConfigList, PluginConfig, SUPPORTED_VERSIONS,
    load_config_dir, load_config_file,
};
pub use error::{CniError, Command, PluginCall};
pub use exec::format_cni_args;
pub use result::{Cidr, CniResult, Dns, Interface, IpConfig, Route};

use config::version_at_least;

/// How long one plugin invocation may take before it is killed.
pub const DEFAULT_PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The interface name pods get.
pub const POD_IFNAME: &str = "eth0";

/// Where the agent's CNI runtime caches its results: `<run_dir>/cni-cache`. The agent
/// gives it to [`Runtime::new`]; `agentctl` reads the attachments there.
pub fn cni_cache_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("cni-cache")
}

/// One attachment of a container to a network: the parameters of ADD, CHECK and DEL.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    /// `CNI_CONTAINERID`; for a pause-less sandbox, the pod uid.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_NETNS`; required for ADD and CHECK, optional for DEL.
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS`, in order.
    pub cni_args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, `bandwidth`, ...): each goes into the
    /// `runtimeConfig` of the plugins that declare that capability.
    pub capability_args: Map<String, Value>,
}

impl Attachment {
    pub fn new(container_id: &str, ifname: &str, netns: Option<PathBuf>) -> Attachment {
        Attachment {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
            netns,
            cni_args: Vec::new(),
            capability_args: Map::new(),
        }
    }

    /// A pod's `eth0` in the namespace at `netns`, with the container id the pod uid and
    /// the kubelet's `CNI_ARGS`.
    pub fn for_pod(namespace: &str, name: &str, uid: &str, netns: &Path) -> Attachment {
        Attachment {
            cni_args: pod_cni_args(namespace, name, uid, uid),
            ..Attachment::new(uid, POD_IFNAME, Some(netns.to_path_buf()))
        }
    }

    /// Adds the `portMappings` capability argument (skipped when there are none).
    pub fn with_port_mappings(mut self, mappings: &[PortMapping]) -> Attachment {
        if !mappings.is_empty() {
            let value = serde_json::to_value(mappings).unwrap_or_default();
            self.capability_args.insert("portMappings".into(), value);
        }
        self
    }

    /// The spec's rules: a container id of letters, digits, `_`, `.`, `-` starting with a
    /// letter or digit; an interface name of 1 to 15 bytes, not `.` or `..`, without `/`,
    /// `:` or whitespace; a namespace for every verb but DEL; encodable `CNI_ARGS`.
    fn validate(&self, command: Command) -> Result<(), CniError> {
        let invalid = |reason: String| Err(CniError::InvalidAttachment { reason });
        if !config::is_valid_name(&self.container_id) {
            return invalid(format!(
                "container id {:?} must start with a letter or digit and hold only letters, \
                 digits, '_', '.' and '-'",
                self.container_id
            ));
        }
        let ifname = &self.ifname;
        if ifname.is_empty()
            || ifname.len() > 15
            || ifname == "."
            || ifname == ".."
            || ifname.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
        {
            return invalid(format!(
                "interface name {ifname:?} must be 1 to 15 bytes, not . or .., without '/', ':' or whitespace"
            ));
        }
        if command != Command::Del && self.netns.is_none() {
            return invalid(format!("{command} needs a network namespace path"));
        }
        exec::format_cni_args(&self.cni_args).map(drop)
    }
}

/// The kubelet's `CNI_ARGS` for a pod (as containerd's CRI passes them).
pub fn pod_cni_args(
    namespace: &str,
    name: &str,
    uid: &str,
    infra_container_id: &str,
) -> Vec<(String, String)> {
    [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", infra_container_id),
        ("K8S_POD_UID", uid),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// One entry of the `portMappings` capability, as the `portmap` plugin reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: i32,
    pub container_port: i32,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    #[serde(default, rename = "hostIP", skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// The port mappings of a pod: every container port with a `hostPort`, as the kubelet and
/// containerd's CRI derive them.
pub fn port_mappings(pod: &Pod) -> Vec<PortMapping> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|port| {
            let host_port = port.host_port.filter(|p| *p > 0)?;
            Some(PortMapping {
                host_port,
                container_port: port.container_port,
                protocol: port
                    .protocol
                    .as_deref()
                    .unwrap_or("TCP")
                    .to_ascii_lowercase(),
                host_ip: port.host_ip.clone().unwrap_or_default(),
            })
        })
        .collect()
}

/// An attachment GC must keep: `cni.dev/valid-attachments` entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttachmentId {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// A plugin's answer to VERSION.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub cni_version: String,
    #[serde(default)]
    pub supported_versions: Vec<String>,
}

/// The CNI runtime: where plugins are, where results are cached, how long a plugin may run.
#[derive(Debug, Clone)]
pub struct Runtime {
    bin_dirs: Vec<PathBuf>,
    cache_dir: PathBuf,
    timeout: Duration,
}

impl Runtime {
    /// Plugins are looked up in `bin_dirs` in order (also `CNI_PATH` for the plugins
    /// themselves); results are cached under `cache_dir`.
    pub fn new(bin_dirs: Vec<PathBuf>, cache_dir: impl Into<PathBuf>) -> Runtime {
        Runtime {
            bin_dirs,
            cache_dir: cache_dir.into(),
            timeout: DEFAULT_PLUGIN_TIMEOUT,
        }
    }

    /// The time one plugin invocation may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Runtime {
        self.timeout = timeout;
        self
    }

    pub fn bin_dirs(&self) -> &[PathBuf] {
        &self.bin_dirs
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    fn call(network: &NetworkConfigList, index: usize, command: Command) -> PluginCall {
        PluginCall {
            command,
            network: network.name.clone(),
            plugin: network.plugins[index].plugin_type.clone(),
        }
    }

    async fn exec(
        &self,
        call: &PluginCall,
        env: &[(&'static str, String)],
        stdin: &Value,
    ) -> Result<Vec<u8>, CniError> {
        let stdin = serde_json::to_vec(stdin).unwrap_or_default();
        exec::run_plugin(call, &self.bin_dirs, env, &stdin, self.timeout).await
    }

    /// Attaches the container: ADD through the chain, the result cached and returned in the
    /// list's version. On failure DEL undoes the plugins that ran (the failed one too); the
    /// error is the ADD's, or [`CniError::RollbackFailed`] when undoing failed as well.
    ///
    /// The spec forbids a second ADD of the same attachment without a DEL between: after a
    /// restart, look in [`Runtime::cached`] first.
    pub async fn add(
        &self,
        network: &NetworkConfigList,
        attachment: &Attachment,
    ) -> Result<CniResult, CniError> {
        attachment.validate(Command::Add)?;
        let netns = attachment
            .netns
            .as_deref()
            .unwrap_or_else(|| Path::new(""))
            .display()
            .to_string();
        let env = exec::plugin_env(Command::Add, Some(attachment), &netns, &self.bin_dirs)?;
        let mut prev: Option<CniResult> = None;
        for index in 0..network.plugins.len() {
            let call = Runtime::call(network, index, Command::Add);
            let stdin = network.plugin_stdin(
                index,
                &Injection {
                    prev_result: prev.as_ref().map(CniResult::raw),
                    capability_args: Some(&attachment.capability_args),
                    valid_attachments: None,
                },
            );
            let added = self.exec(&call, &env, &stdin).await.and_then(|stdout| {
                CniResult::parse(&stdout)
                    .map(|r| r.convert_to(&network.cni_version))
                    .map_err(|reason| CniError::InvalidResult {
                        call: call.clone(),
                        reason,
                    })
            });
            match added {
                Ok(result) => prev = Some(result),
                Err(err) => {
                    return Err(self
                        .undo_add(network, attachment, index, prev.as_ref(), err)
                        .await);
                }
            }
        }
        let Some(result) = prev else {
            return Err(CniError::InvalidConfig {
                origin: network.origin.clone(),
                reason: "no plugins".into(),
            });
        };
        let entry = CachedAttachment {
            network: network.clone(),
            attachment: attachment.clone(),
            result,
        };
        if let Err(err) = cache::write(&self.cache_dir, &entry) {
            // Without the cache a later DEL would run without prevResult: undo now.
            let last = network.plugins.len() - 1;
            return Err(self
                .undo_add(network, attachment, last, Some(&entry.result), err)
                .await);
        }
        Ok(entry.result)
    }

    /// DEL, in reverse, for the plugins `0..=last` of a failed ADD, each with the last
    /// result the chain produced. Every plugin is tried even when one fails, so one
    /// failure leaves as little as possible.
    async fn undo_add(
        &self,
        network: &NetworkConfigList,
        attachment: &Attachment,
        last: usize,
        prev: Option<&CniResult>,
        add_error: CniError,
    ) -> CniError {
        tracing::info!(
            network = %network.name,
            container_id = %attachment.container_id,
            error = %add_error,
            "ADD failed; deleting what the chain made"
        );
        let mut first_failure = None;
        for index in (0..=last).rev() {
            if let Err(err) = self.del_one(network, index, attachment, prev).await {
                tracing::warn!(error = %err, "undoing a failed ADD");
                first_failure.get_or_insert(err);
            }
        }
        match first_failure {
            None => add_error,
            Some(del) => CniError::RollbackFailed {
                add: Box::new(add_error),
                del: Box::new(del),
            },
        }
    }

    async fn del_one(
        &self,
        network: &NetworkConfigList,
        index: usize,
        attachment: &Attachment,
        prev: Option<&CniResult>,
    ) -> Result<(), CniError> {
        // A namespace that is gone (or a placeholder left by an unmount) is passed as no
        // namespace: the spec has plugins then clean up what they can, and succeed.
        let netns = match attachment.netns.as_deref() {
            Some(path) if crate::sandbox::is_namespace_file(path).unwrap_or(false) => {
                path.display().to_string()
            }
            _ => String::new(),
        };
        let env = exec::plugin_env(Command::Del, Some(attachment), &netns, &self.bin_dirs)?;
        let prev = prev
            .filter(|_| version_at_least(&network.cni_version, "0.4.0"))
            .map(|r| r.convert_to(&network.cni_version));
        let stdin = network.plugin_stdin(
            index,
            &Injection {
                prev_result: prev.as_ref().map(CniResult::raw),
                capability_args: Some(&attachment.capability_args),
                valid_attachments: None,
            },
        );
        let call = Runtime::call(network, index, Command::Del);
        self.exec(&call, &env, &stdin).await.map(drop)
    }

    /// Detaches the container: DEL through the chain in reverse, with the cached result as
    /// `prevResult` (from 0.4.0), then the cache entry is deleted. Repeating it succeeds.
    /// A plugin's failure stops it and keeps the cache entry, so it can be retried.
    pub async fn del(
        &self,
        network: &NetworkConfigList,
        attachment: &Attachment,
    ) -> Result<(), CniError> {
        attachment.validate(Command::Del)?;
        let cached = match cache::read(
            &self.cache_dir,
            &network.name,
            &attachment.container_id,
            &attachment.ifname,
        ) {
            Ok(entry) => entry.map(|e| e.result),
            Err(err) => {
                tracing::warn!(error = %err, "DEL without prevResult: the cache entry is unreadable");
                None
            }
        };
        for index in (0..network.plugins.len()).rev() {
            self.del_one(network, index, attachment, cached.as_ref())
                .await?;
        }
        cache::remove(
            &self.cache_dir,
            &network.name,
            &attachment.container_id,
            &attachment.ifname,
        )
    }

    /// CHECK through the chain with the cached result; the first failure is returned. A
    /// list with `disableCheck` passes without running anything.
    pub async fn check(
        &self,
        network: &NetworkConfigList,
        attachment: &Attachment,
    ) -> Result<(), CniError> {
        attachment.validate(Command::Check)?;
        if !version_at_least(&network.cni_version, "0.4.0") {
            return Err(CniError::UnsupportedVersion {
                command: Command::Check,
                network: network.name.clone(),
                version: network.cni_version.clone(),
            });
        }
        if network.disable_check {
            return Ok(());
        }
        let cached = cache::read(
            &self.cache_dir,
            &network.name,
            &attachment.container_id,
            &attachment.ifname,
        )?
        .ok_or_else(|| CniError::NotAdded {
            network: network.name.clone(),
            container_id: attachment.container_id.clone(),
            ifname: attachment.ifname.clone(),
        })?;
        let prev = cached.result.convert_to(&network.cni_version);
        let netns = attachment
            .netns
            .as_deref()
            .unwrap_or_else(|| Path::new(""))
            .display()
            .to_string();
        let env = exec::plugin_env(Command::Check, Some(attachment), &netns, &self.bin_dirs)?;
        for index in 0..network.plugins.len() {
            let call = Runtime::call(network, index, Command::Check);
            let stdin = network.plugin_stdin(
                index,
                &Injection {
                    prev_result: Some(prev.raw()),
                    capability_args: Some(&attachment.capability_args),
                    valid_attachments: None,
                },
            );
            self.exec(&call, &env, &stdin).await?;
        }
        Ok(())
    }

    /// STATUS of every plugin, the first failure returned (code 50: not available, 51: not
    /// available and existing attachments may be broken). Before 1.1.0 there is no STATUS:
    /// the network counts as ready.
    pub async fn status(&self, network: &NetworkConfigList) -> Result<(), CniError> {
        if !version_at_least(&network.cni_version, "1.1.0") {
            return Ok(());
        }
        let env = exec::plugin_env(Command::Status, None, "", &self.bin_dirs)?;
        for index in 0..network.plugins.len() {
            let call = Runtime::call(network, index, Command::Status);
            let stdin = network.plugin_stdin(index, &Injection::default());
            self.exec(&call, &env, &stdin).await?;
        }
        Ok(())
    }

    /// Garbage collection, as libcni: DEL for every cached attachment of this network that
    /// is not in `valid`, then (from 1.1.0, unless `disableGC`) GC of every plugin with
    /// `cni.dev/valid-attachments`. Every step runs; the failures are returned together.
    pub async fn gc(
        &self,
        network: &NetworkConfigList,
        valid: &[AttachmentId],
    ) -> Result<(), CniError> {
        let mut errors = Vec::new();
        for cached in cache::list(&self.cache_dir)? {
            let a = &cached.attachment;
            let id = AttachmentId {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            };
            if cached.network.name != network.name || valid.contains(&id) {
                continue;
            }
            tracing::info!(network = %network.name, container_id = %a.container_id, ifname = %a.ifname, "GC: deleting a stale attachment");
            if let Err(err) = self.del(network, a).await {
                errors.push(err);
            }
        }
        if version_at_least(&network.cni_version, "1.1.0") && !network.disable_gc {
            let valid = serde_json::to_value(valid).unwrap_or_default();
            let env = exec::plugin_env(Command::Gc, None, "", &self.bin_dirs)?;
            for index in 0..network.plugins.len() {
                let call = Runtime::call(network, index, Command::Gc);
                let stdin = network.plugin_stdin(
                    index,
                    &Injection {
                        valid_attachments: Some(&valid),
                        ..Default::default()
                    },
                );
                if let Err(err) = self.exec(&call, &env, &stdin).await {
                    errors.push(err);
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CniError::Gc {
                network: network.name.clone(),
                errors,
            })
        }
    }

    /// VERSION of one plugin, asked in `cni_version`.
    pub async fn version(
        &self,
        plugin_type: &str,
        cni_version: &str,
    ) -> Result<VersionInfo, CniError> {
        let call = PluginCall {
            command: Command::Version,
            network: String::new(),
            plugin: plugin_type.to_owned(),
        };
        let env = exec::plugin_env(Command::Version, None, "", &self.bin_dirs)?;
        let stdin = serde_json::json!({ "cniVersion": cni_version });
        let stdout = self.exec(&call, &env, &stdin).await?;
        serde_json::from_slice(&stdout).map_err(|e| CniError::InvalidResult {
            call,
            reason: format!("VERSION answer: {e}"),
        })
    }

    /// Checks that every plugin of the list is installed and speaks the list's version,
    /// as libcni's `ValidateNetworkList`: worth doing once at start rather than finding out
    /// at the first pod.
    pub async fn validate(&self, network: &NetworkConfigList) -> Result<(), CniError> {
        for plugin in &network.plugins {
            let info = self
                .version(&plugin.plugin_type, &network.cni_version)
                .await?;
            if !info.supported_versions.contains(&network.cni_version) {
                return Err(CniError::InvalidConfig {
                    origin: network.origin.clone(),
                    reason: format!(
                        "plugin {} does not support cniVersion {} (it supports {})",
                        plugin.plugin_type,
                        network.cni_version,
                        info.supported_versions.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }

    /// The cached attachment (ADD done, no DEL since), for adoption after a restart.
    pub fn cached(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<CachedAttachment>, CniError> {
        cache::read(&self.cache_dir, network, container_id, ifname)
    }

    /// Every cached attachment, of every network.
    pub fn cached_attachments(&self) -> Result<Vec<CachedAttachment>, CniError> {
        cache::list(&self.cache_dir)
    }
}

#[cfg(test)]
mod tests;
