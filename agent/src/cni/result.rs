//! A plugin's ADD result (interfaces, IPs, routes, DNS) in the versions the runtime speaks,
//! and its conversion between them. 0.3.x and 0.4.0 carry `ips[].version`; 1.1.0 adds
//! interface `mtu`, `socketPath`, `pciID` and route `mtu`, `advmss`, `priority`, `table`,
//! `scope`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::config::{SUPPORTED_VERSIONS, version_at_least};

/// An address with its prefix length, as a result writes it (`10.1.0.5/24`: the host bits
/// are kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an address with a prefix length"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = len
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: {len:?} is not a prefix length"))?;
        Ok(Cidr { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Cidr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The namespace path for an interface inside the sandbox; empty for host interfaces.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: Cidr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into the result's `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: Cidr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    ips: Vec<IpConfig>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    dns: Dns,
}

/// An ADD result. `raw` is the JSON as the plugin printed it (unknown fields kept), which is
/// what the next plugin gets as `prevResult` and what the cache keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct CniResult {
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
    raw: Value,
}

impl CniResult {
    /// A result as a plugin printed it.
    pub fn parse(bytes: &[u8]) -> Result<CniResult, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            format!("not JSON ({e}): {}", {
                String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
            })
        })?;
        CniResult::from_value(value)
    }

    pub fn from_value(value: Value) -> Result<CniResult, String> {
        let Some(object) = value.as_object() else {
            return Err("not a JSON object".into());
        };
        let version = match object.get("cniVersion") {
            Some(Value::String(v)) => v.clone(),
            _ => return Err("no cniVersion".into()),
        };
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(format!(
                "cniVersion {version:?} is not one the runtime reads (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ));
        }
        let wire: Wire = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        let n_interfaces = wire.interfaces.len();
        if let Some(ip) = wire
            .ips
            .iter()
            .find(|ip| ip.interface.is_some_and(|i| i >= n_interfaces))
        {
            return Err(format!(
                "ip {} names interface {} of {n_interfaces}",
                ip.address,
                ip.interface.unwrap_or_default()
            ));
        }
        Ok(CniResult {
            cni_version: version,
            interfaces: wire.interfaces,
            ips: wire.ips,
            routes: wire.routes,
            dns: wire.dns,
            raw: value,
        })
    }

    /// The JSON as the plugin printed it (or as converted).
    pub fn raw(&self) -> &Value {
        &self.raw
    }

    /// The same result in `version`. Unchanged (unknown fields and all) when it already is;
    /// otherwise rebuilt from the parsed fields, as libcni converts.
    pub fn convert_to(&self, version: &str) -> CniResult {
        if self.cni_version == version {
            return self.clone();
        }
        // Parsed back so the typed fields match the JSON (a 1.1.0 field dropped for 1.0.0
        // is gone from both); what to_json writes always parses.
        let raw = self.to_json(version);
        CniResult::from_value(raw.clone()).unwrap_or_else(|_| CniResult {
            cni_version: version.to_owned(),
            raw,
            ..self.clone()
        })
    }

    /// The result's JSON in `version`: `ips[].version` before 1.0.0; the 1.1.0 fields of
    /// interfaces and routes only from 1.1.0.
    pub fn to_json(&self, version: &str) -> Value {
        let has_1_1_fields = version_at_least(version, "1.1.0");
        let mut out = Map::new();
        out.insert("cniVersion".into(), version.into());
        if !self.interfaces.is_empty() {
            let interfaces = self
                .interfaces
                .iter()
                .map(|i| {
                    let mut i = i.clone();
                    if !has_1_1_fields {
                        i.mtu = None;
                        i.socket_path = None;
                        i.pci_id = None;
                    }
                    serde_json::to_value(i).unwrap_or_default()
                })
                .collect();
            out.insert("interfaces".into(), Value::Array(interfaces));
        }
        if !self.ips.is_empty() {
            let ips = self
                .ips
                .iter()
                .map(|ip| {
                    let mut value = serde_json::to_value(ip).unwrap_or_default();
                    if !version_at_least(version, "1.0.0")
                        && let Some(object) = value.as_object_mut()
                    {
                        let family = if ip.address.addr.is_ipv4() { "4" } else { "6" };
                        object.insert("version".into(), family.into());
                    }
                    value
                })
                .collect();
            out.insert("ips".into(), Value::Array(ips));
        }
        if !self.routes.is_empty() {
            let routes = self
                .routes
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    if !has_1_1_fields {
                        r.mtu = None;
                        r.advmss = None;
                        r.priority = None;
                        r.table = None;
                        r.scope = None;
                    }
                    serde_json::to_value(r).unwrap_or_default()
                })
                .collect();
            out.insert("routes".into(), Value::Array(routes));
        }
        if !self.dns.is_empty() {
            out.insert(
                "dns".into(),
                serde_json::to_value(&self.dns).unwrap_or_default(),
            );
        }
        Value::Object(out)
    }

    /// The addresses of the sandbox interface `ifname`, the pod IPs. A result whose IPs name
    /// no interface (some plugins leave the index out) gives all its IPs.
    pub fn sandbox_ips(&self, ifname: &str) -> Vec<IpAddr> {
        let on_sandbox = |ip: &&IpConfig| match ip.interface {
            Some(index) => {
                let interface = &self.interfaces[index];
                interface.name == ifname && !interface.sandbox.is_empty()
            }
            None => self.ips.iter().all(|ip| ip.interface.is_none()),
        };
        self.ips
            .iter()
            .filter(on_sandbox)
            .map(|ip| ip.address.addr)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn bridge_result_0_4_0() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:02"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/skiff/pods/u/ns/net"},
            ],
            "ips": [
                {"version": "4", "address": "10.22.0.5/24", "gateway": "10.22.0.1", "interface": 2},
                {"version": "6", "address": "fd00::5/64", "interface": 2},
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.22.0.1"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
            "extra": "kept as is",
        })
    }

    #[test]
    fn parse_a_result() {
        let result = CniResult::parse(bridge_result_0_4_0().to_string().as_bytes()).unwrap();
        assert_eq!(result.cni_version, "0.4.0");
        assert_eq!(result.interfaces.len(), 3);
        assert_eq!(result.interfaces[2].sandbox, "/run/skiff/pods/u/ns/net");
        assert_eq!(result.ips[0].address.to_string(), "10.22.0.5/24");
        assert_eq!(result.ips[0].gateway, Some("10.22.0.1".parse().unwrap()));
        assert_eq!(result.routes[0].dst.prefix_len, 0);
        assert_eq!(result.dns.nameservers, ["10.96.0.10"]);
        assert_eq!(
            result.sandbox_ips("eth0"),
            [
                "10.22.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(result.sandbox_ips("eth1").is_empty());
        assert_eq!(result.raw()["extra"], "kept as is");
    }

    #[test]
    fn ipam_style_results_without_interfaces() {
        let result = CniResult::from_value(json!({
            "cniVersion": "1.0.0", "ips": [{"address": "10.0.0.9/16"}],
        }))
        .unwrap();
        assert_eq!(
            result.sandbox_ips("eth0"),
            ["10.0.0.9".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn bad_results_are_refused_with_a_reason() {
        let cases = [
            (json!([]), "not a JSON object"),
            (json!({"ips": []}), "no cniVersion"),
            (
                json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/24"}}),
                "cniVersion \"0.2.0\" is not one the runtime reads",
            ),
            (
                json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2"}]}),
                "not an address with a prefix length",
            ),
            (
                json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/33"}]}),
                "is not a prefix length",
            ),
            (
                json!({"cniVersion": "1.0.0", "interfaces": [], "ips": [{"address": "10.0.0.2/24", "interface": 0}]}),
                "names interface 0 of 0",
            ),
        ];
        for (value, expected) in cases {
            let err = CniResult::from_value(value.clone()).unwrap_err();
            assert!(err.contains(expected), "{value}: {err}");
        }
        let err = CniResult::parse(b"garbage").unwrap_err();
        assert!(err.starts_with("not JSON"), "{err}");
    }

    #[test]
    fn conversion_between_versions() {
        let old = CniResult::from_value(bridge_result_0_4_0()).unwrap();
        let new = old.convert_to("1.0.0");
        assert_eq!(new.cni_version, "1.0.0");
        assert_eq!(new.raw()["cniVersion"], "1.0.0");
        assert!(new.raw()["ips"][0].get("version").is_none());
        assert!(new.raw().get("extra").is_none());
        assert_eq!(new.ips, old.ips);
        let back = new.convert_to("0.3.1");
        assert_eq!(back.raw()["ips"][1]["version"], "6");
        assert_eq!(back.raw()["ips"][0]["interface"], 2);
        // Converting to the version it already has keeps the plugin's JSON untouched.
        assert_eq!(old.convert_to("0.4.0").raw(), &bridge_result_0_4_0());

        let with_mtu = CniResult::from_value(json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "mtu": 1450, "sandbox": "/ns"}],
            "ips": [{"address": "10.0.0.2/24", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1", "mtu": 1400, "table": 100}],
        }))
        .unwrap();
        let down = with_mtu.convert_to("1.0.0");
        assert_eq!(
            down.raw(),
            &json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/ns"}],
                "ips": [{"address": "10.0.0.2/24", "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}],
            })
        );
        assert_eq!(with_mtu.interfaces[0].mtu, Some(1450));
        assert_eq!(down.interfaces[0].mtu, None);
    }
}
