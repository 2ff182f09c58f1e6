//! The CNI result (interfaces, IPs, routes, DNS), read from `prevResult` in any supported
//! version and written in the version the config asked for.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value, json};

use crate::error::{CniError, CniResult, ErrorCode};
use crate::version::Version;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Index into the result's interfaces.
    pub interface: Option<usize>,
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct CniOutput {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    /// Kept as JSON: the plugin passes DNS through and never interprets it.
    pub dns: Option<Value>,
}

impl CniOutput {
    /// The result JSON in `cni_version`'s format (0.3.x/0.4.0 carry `ips[].version`).
    pub fn to_json(&self, cni_version: &str) -> Value {
        let version = Version::parse(cni_version).unwrap_or(Version::V1_0_0);
        let mut top = Map::new();
        top.insert("cniVersion".into(), json!(cni_version));
        if !self.interfaces.is_empty() {
            let interfaces = self
                .interfaces
                .iter()
                .map(|i| {
                    let mut m = Map::new();
                    m.insert("name".into(), json!(i.name));
                    if !i.mac.is_empty() {
                        m.insert("mac".into(), json!(i.mac));
                    }
                    if let (Some(mtu), true) = (i.mtu, version >= Version::V1_1_0) {
                        m.insert("mtu".into(), json!(mtu));
                    }
                    if let Some(sandbox) = &i.sandbox {
                        m.insert("sandbox".into(), json!(sandbox));
                    }
                    Value::Object(m)
                })
                .collect();
            top.insert("interfaces".into(), Value::Array(interfaces));
        }
        if !self.ips.is_empty() {
            let ips = self
                .ips
                .iter()
                .map(|ip| {
                    let mut m = Map::new();
                    if version < Version::V1_0_0 {
                        let family = if ip.address.addr().is_ipv4() {
                            "4"
                        } else {
                            "6"
                        };
                        m.insert("version".into(), json!(family));
                    }
                    if let Some(index) = ip.interface {
                        m.insert("interface".into(), json!(index));
                    }
                    m.insert("address".into(), json!(ip.address.to_string()));
                    if let Some(gw) = ip.gateway {
                        m.insert("gateway".into(), json!(gw.to_string()));
                    }
                    Value::Object(m)
                })
                .collect();
            top.insert("ips".into(), Value::Array(ips));
        }
        if !self.routes.is_empty() {
            let routes = self
                .routes
                .iter()
                .map(|r| {
                    let mut m = Map::new();
                    m.insert("dst".into(), json!(r.dst.to_string()));
                    if let Some(gw) = r.gw {
                        m.insert("gw".into(), json!(gw.to_string()));
                    }
                    Value::Object(m)
                })
                .collect();
            top.insert("routes".into(), Value::Array(routes));
        }
        top.insert("dns".into(), self.dns.clone().unwrap_or_else(|| json!({})));
        Value::Object(top)
    }

    /// Reads a `prevResult` (any supported version). Its `cniVersion`, when present, must
    /// be the config's: the spec makes the runtime convert it.
    pub fn from_prev_result(value: &Value, config_version: &str) -> CniResult<CniOutput> {
        let bad = |what: &str| {
            CniError::new(
                ErrorCode::DecodeFailure,
                format!("decode prevResult: {what}"),
            )
        };
        let obj = value.as_object().ok_or_else(|| bad("not an object"))?;
        if let Some(v) = obj.get("cniVersion").and_then(Value::as_str)
            && v != config_version
        {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "prevResult cniVersion {v:?} differs from config cniVersion {config_version:?}"
                ),
            ));
        }
        let mut out = CniOutput::default();
        for iface in obj
            .get("interfaces")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.interfaces.push(Interface {
                name: str_field(iface, "name").ok_or_else(|| bad("interface without name"))?,
                mac: str_field(iface, "mac").unwrap_or_default(),
                mtu: iface.get("mtu").and_then(Value::as_u64).map(|m| m as u32),
                sandbox: str_field(iface, "sandbox"),
            });
        }
        for ip in obj
            .get("ips")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let address = str_field(ip, "address")
                .and_then(|a| a.parse::<IpNet>().ok())
                .ok_or_else(|| bad("ip without a valid address"))?;
            let gateway = match str_field(ip, "gateway") {
                Some(g) => Some(g.parse().map_err(|_| bad("invalid gateway"))?),
                None => None,
            };
            let interface = ip
                .get("interface")
                .and_then(Value::as_u64)
                .map(|i| i as usize);
            out.ips.push(IpConfig {
                interface,
                address,
                gateway,
            });
        }
        for route in obj
            .get("routes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let dst = str_field(route, "dst")
                .and_then(|d| d.parse::<IpNet>().ok())
                .ok_or_else(|| bad("route without a valid dst"))?;
            let gw = match str_field(route, "gw") {
                Some(g) => Some(g.parse().map_err(|_| bad("invalid route gw"))?),
                None => None,
            };
            out.routes.push(Route { dst, gw });
        }
        out.dns = obj.get("dns").cloned();
        Ok(out)
    }
}

fn str_field(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniOutput {
        CniOutput {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: "02:00:00:00:00:01".into(),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    mtu: Some(1500),
                    sandbox: Some("/run/netns/x".into()),
                },
            ],
            ips: vec![IpConfig {
                interface: Some(1),
                address: "10.1.0.5/24".parse().unwrap(),
                gateway: Some("10.1.0.1".parse().unwrap()),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
            }],
            dns: None,
        }
    }

    #[test]
    fn old_results_carry_ip_version() {
        let v = sample().to_json("0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
        assert!(v["interfaces"][1].get("mtu").is_none());
        let v = sample().to_json("1.0.0");
        assert!(v["ips"][0].get("version").is_none());
        assert!(v["interfaces"][1].get("mtu").is_none());
        let v = sample().to_json("1.1.0");
        assert_eq!(v["interfaces"][1]["mtu"], 1500);
    }

    #[test]
    fn prev_result_round_trips() {
        for version in ["0.4.0", "1.0.0", "1.1.0"] {
            let json = sample().to_json(version);
            let back = CniOutput::from_prev_result(&json, version).unwrap();
            assert_eq!(back.ips, sample().ips);
            assert_eq!(back.routes, sample().routes);
            assert_eq!(back.interfaces[1].sandbox.as_deref(), Some("/run/netns/x"));
        }
    }

    #[test]
    fn prev_result_version_must_match() {
        let json = sample().to_json("0.4.0");
        let err = CniOutput::from_prev_result(&json, "1.0.0").unwrap_err();
        assert_eq!(err.code, ErrorCode::IncompatibleVersion);
    }

    #[test]
    fn prev_result_garbage_is_decode_failure() {
        let err =
            CniOutput::from_prev_result(&json!({"ips": [{"address": "x"}]}), "1.0.0").unwrap_err();
        assert_eq!(err.code, ErrorCode::DecodeFailure);
        let err = CniOutput::from_prev_result(&json!([1]), "1.0.0").unwrap_err();
        assert_eq!(err.code, ErrorCode::DecodeFailure);
    }
}
