//! The CNI error value a plugin prints on stdout, with the spec's well-known codes.

use serde::Serialize;

/// The error codes of the CNI specification ("Well-known Error Codes"), plus skiff's own
/// plugin-specific codes (100 and up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 1: the config's `cniVersion` (or prevResult's) is not one this plugin speaks.
    IncompatibleVersion = 1,
    /// 2: a field of the network configuration this plugin does not implement.
    UnsupportedField = 2,
    /// 3: the container (its network namespace) is unknown or gone.
    UnknownContainer = 3,
    /// 4: a `CNI_*` environment variable is missing or invalid.
    InvalidEnvironment = 4,
    /// 5: reading or writing the plugin's own files failed.
    IoFailure = 5,
    /// 6: stdin is not the JSON it should be.
    DecodeFailure = 6,
    /// 7: the configuration decodes but makes no sense.
    InvalidConfig = 7,
    /// 11: a transient condition (range exhausted, lock contention) that may clear up.
    TryAgainLater = 11,
    /// 50: STATUS: the plugin cannot serve ADDs right now.
    NotAvailable = 50,
    /// 100: a kernel (netlink, namespace, sysctl) operation failed.
    Datapath = 100,
    /// 101: an address is already allocated to this container and interface.
    DuplicateAllocation = 101,
    /// 102: CHECK found the attachment different from what ADD made.
    CheckFailed = 102,
    /// 103: a requested address is taken, is a gateway, or is in none of the ranges.
    AddressUnavailable = 103,
}

/// A CNI error, printed as the spec's error JSON on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error as the spec's JSON object, in the caller's `cniVersion`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code as u32,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| String::from("{\"code\":999,\"msg\":\"encode error\"}"))
    }
}

/// Shorthand used throughout the crate.
pub type CniResult<T> = Result<T, CniError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_spec_fields() {
        let e = CniError::new(ErrorCode::InvalidConfig, "bad subnet").with_details("10.0.0.0/33");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad subnet");
        assert_eq!(v["details"], "10.0.0.0/33");
        let bare = CniError::new(ErrorCode::TryAgainLater, "x").to_json("1.1.0");
        assert!(!bare.contains("details"));
    }
}
