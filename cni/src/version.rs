//! CNI spec versions this plugin speaks, and the answer to the VERSION verb.

use crate::error::{CniError, CniResult, ErrorCode};

/// Every version whose config and result format the plugin reads and writes. 0.3.x results
/// have the same shape as 0.4.0 ones; 0.1.0/0.2.0 results (one ip4/ip6 object) are not
/// produced.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version, used where no config says otherwise (VERSION's own answer).
pub const CURRENT_VERSION: &str = "1.1.0";

/// A parsed `major.minor.patch`, ordered as the spec orders versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    pub const V0_4_0: Version = Version(0, 4, 0);
    pub const V1_0_0: Version = Version(1, 0, 0);
    pub const V1_1_0: Version = Version(1, 1, 0);

    /// Parses a version string; an empty one means 0.1.0, as the spec's reference library
    /// treats a config without `cniVersion`.
    pub fn parse(text: &str) -> Option<Version> {
        if text.is_empty() {
            return Some(Version(0, 1, 0));
        }
        let mut parts = text.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().map_or(Some(0), |p| p.parse().ok())?;
        if parts.next().is_some() {
            return None;
        }
        Some(Version(major, minor, patch))
    }
}

/// Checks that `cni_version` is one this plugin supports and returns it parsed.
pub fn negotiate(cni_version: &str) -> CniResult<Version> {
    if SUPPORTED_VERSIONS.contains(&cni_version)
        && let Some(version) = Version::parse(cni_version)
    {
        return Ok(version);
    }
    Err(CniError::new(
        ErrorCode::IncompatibleVersion,
        format!("incompatible CNI version {cni_version:?}"),
    )
    .with_details(format!(
        "supported versions: {}",
        SUPPORTED_VERSIONS.join(", ")
    )))
}

/// The VERSION verb's answer: the spec's "version info" object.
pub fn version_info_json(cni_version: &str) -> String {
    let reported = if SUPPORTED_VERSIONS.contains(&cni_version) {
        cni_version
    } else {
        CURRENT_VERSION
    };
    serde_json::json!({
        "cniVersion": reported,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_versions_negotiate() {
        assert_eq!(negotiate("0.4.0").unwrap(), Version::V0_4_0);
        assert_eq!(negotiate("1.0.0").unwrap(), Version::V1_0_0);
        assert_eq!(negotiate("1.1.0").unwrap(), Version::V1_1_0);
        assert_eq!(negotiate("0.3.1").unwrap(), Version(0, 3, 1));
    }

    #[test]
    fn unknown_versions_are_code_1() {
        for v in ["", "0.1.0", "0.2.0", "2.0.0", "1.0", "banana", "1.1.0.1"] {
            let err = negotiate(v).unwrap_err();
            assert_eq!(err.code, ErrorCode::IncompatibleVersion, "{v}");
        }
    }

    #[test]
    fn versions_order_as_the_spec_says() {
        assert!(Version::parse("0.4.0").unwrap() < Version::parse("1.0.0").unwrap());
        assert!(Version::parse("0.10.0").unwrap() > Version::parse("0.4.0").unwrap());
        assert_eq!(Version::parse(""), Some(Version(0, 1, 0)));
    }

    #[test]
    fn version_info_lists_all() {
        let v: serde_json::Value = serde_json::from_str(&version_info_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED_VERSIONS.len()
        );
        let v: serde_json::Value = serde_json::from_str(&version_info_json("9.9.9")).unwrap();
        assert_eq!(v["cniVersion"], CURRENT_VERSION);
    }
}
