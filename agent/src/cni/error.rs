//! What can go wrong in the CNI runtime: the configuration, the attachment, finding and
//! running a plugin, what a plugin reports (its error object: code, msg, details), the
//! results cache.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// A CNI verb, as `CNI_COMMAND` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which plugin of which network a verb was running, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginCall {
    pub command: Command,
    pub network: String,
    /// The plugin's `type`, the name of its binary.
    pub plugin: String,
}

impl fmt::Display for PluginCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} network {} plugin {}",
            self.command, self.network, self.plugin
        )
    }
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(" ({details})")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("read network configuration directory {}: {source}", dir.display())]
    ConfigDir { dir: PathBuf, source: io::Error },
    #[error("no network configuration (*.conflist, *.conf, *.json) in {}", dir.display())]
    NoConfig { dir: PathBuf },
    #[error("read network configuration {}: {source}", path.display())]
    ConfigRead { path: PathBuf, source: io::Error },
    /// `origin` is the file, or `<inline>` for a configuration given as bytes.
    #[error("invalid network configuration {origin}: {reason}")]
    InvalidConfig { origin: String, reason: String },
    #[error("invalid attachment: {reason}")]
    InvalidAttachment { reason: String },
    #[error("{call}: no executable {} in {search_path}", call.plugin)]
    PluginNotFound {
        call: PluginCall,
        search_path: String,
    },
    #[error("{call}: run {}: {source}", path.display())]
    Exec {
        call: PluginCall,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{call}: no answer within {timeout:?}, killed")]
    Timeout { call: PluginCall, timeout: Duration },
    /// The plugin failed and said why with the spec's error object.
    #[error("{call}: error {code}: {msg}{}", details_suffix(details))]
    Plugin {
        call: PluginCall,
        code: u32,
        msg: String,
        details: String,
    },
    /// The plugin failed without a readable error object; `output` is what it printed.
    #[error("{call}: {status} with no error object: {output}")]
    PluginFailed {
        call: PluginCall,
        status: String,
        output: String,
    },
    #[error("{call}: invalid result: {reason}")]
    InvalidResult { call: PluginCall, reason: String },
    #[error("{command} network {network}: cniVersion {version} does not support {command}")]
    UnsupportedVersion {
        command: Command,
        network: String,
        version: String,
    },
    #[error(
        "CHECK network {network}: no cached ADD result for container {container_id} interface {ifname}"
    )]
    NotAdded {
        network: String,
        container_id: String,
        ifname: String,
    },
    #[error("results cache {}: {reason}", path.display())]
    Cache { path: PathBuf, reason: String },
    /// ADD failed and undoing the part that succeeded failed too: something may be left.
    #[error("{add}; undoing it with DEL failed too: {del}")]
    RollbackFailed {
        add: Box<CniError>,
        del: Box<CniError>,
    },
    #[error("GC network {network}: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Gc {
        network: String,
        errors: Vec<CniError>,
    },
}

impl CniError {
    /// The CNI error code the plugin reported, if a plugin reported one.
    pub fn code(&self) -> Option<u32> {
        match self {
            CniError::Plugin { code, .. } => Some(*code),
            CniError::RollbackFailed { add, .. } => add.code(),
            _ => None,
        }
    }

    /// The plugin (`type`) that failed, when a plugin failed.
    pub fn plugin(&self) -> Option<&str> {
        match self {
            CniError::PluginNotFound { call, .. }
            | CniError::Exec { call, .. }
            | CniError::Timeout { call, .. }
            | CniError::Plugin { call, .. }
            | CniError::PluginFailed { call, .. }
            | CniError::InvalidResult { call, .. } => Some(&call.plugin),
            CniError::RollbackFailed { add, .. } => add.plugin(),
            _ => None,
        }
    }

    /// The plugin's `msg` (for a plugin error object).
    pub fn plugin_message(&self) -> Option<&str> {
        match self {
            CniError::Plugin { msg, .. } => Some(msg),
            CniError::RollbackFailed { add, .. } => add.plugin_message(),
            _ => None,
        }
    }

    /// Code 11, "try again later": the condition is expected to clear up by itself.
    pub fn is_try_again_later(&self) -> bool {
        self.code() == Some(11)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_plugin_and_carry_code_and_details() {
        let call = PluginCall {
            command: Command::Add,
            network: "pods".into(),
            plugin: "bridge".into(),
        };
        let err = CniError::Plugin {
            call: call.clone(),
            code: 11,
            msg: "no IP addresses available".into(),
            details: "range 10.0.0.0/30".into(),
        };
        assert_eq!(
            err.to_string(),
            "ADD network pods plugin bridge: error 11: no IP addresses available (range 10.0.0.0/30)"
        );
        assert_eq!(err.code(), Some(11));
        assert!(err.is_try_again_later());
        let rolled = CniError::RollbackFailed {
            add: Box::new(err),
            del: Box::new(CniError::Timeout {
                call: PluginCall {
                    command: Command::Del,
                    ..call
                },
                timeout: Duration::from_secs(3),
            }),
        };
        assert_eq!(rolled.code(), Some(11));
        assert_eq!(rolled.plugin(), Some("bridge"));
        assert!(
            rolled
                .to_string()
                .ends_with("undoing it with DEL failed too: DEL network pods plugin bridge: no answer within 3s, killed")
        );
    }
}
