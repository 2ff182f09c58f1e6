//! The network configuration on stdin and the `CNI_*` environment, decoded and validated
//! into the plain values the verbs act on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{CniError, CniResult, ErrorCode};
use crate::result::Route;

/// Where allocations live when the config names no `ipam.dataDir` (host-local's default,
/// so a node can switch between the two plugins without losing its reservations).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";
pub const DEFAULT_BRIDGE: &str = "cni0";
pub const DEFAULT_MTU: u32 = 1500;

/// The verb the runtime asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

/// The `CNI_*` environment variables, unvalidated.
#[derive(Debug, Clone, Default)]
pub struct RawEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl RawEnv {
    pub fn from_process() -> RawEnv {
        let get = |k: &str| std::env::var(k).ok();
        RawEnv {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }
}

pub fn parse_command(env: &RawEnv) -> CniResult<Command> {
    match env.command.as_deref() {
        Some("ADD") => Ok(Command::Add),
        Some("DEL") => Ok(Command::Del),
        Some("CHECK") => Ok(Command::Check),
        Some("STATUS") => Ok(Command::Status),
        Some("GC") => Ok(Command::Gc),
        Some("VERSION") => Ok(Command::Version),
        Some("") | None => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            "required environment variable CNI_COMMAND is missing",
        )),
        Some(other) => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("unknown CNI_COMMAND {other:?}"),
        )),
    }
}

/// The attachment a verb works on: container, interface name and namespace path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// Absent only for DEL, which must succeed without a namespace.
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS` as key/value pairs.
    pub args: HashMap<String, String>,
}

fn require<'a>(value: &'a Option<String>, name: &str) -> CniResult<&'a str> {
    match value.as_deref() {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("required environment variable {name} is missing"),
        )),
    }
}

/// Validates the environment for ADD, DEL and CHECK.
pub fn parse_attachment(env: &RawEnv, command: Command) -> CniResult<Attachment> {
    let container_id = require(&env.container_id, "CNI_CONTAINERID")?;
    validate_container_id(container_id)?;
    let ifname = require(&env.ifname, "CNI_IFNAME")?;
    validate_ifname(ifname)?;
    let netns = match command {
        Command::Del => env
            .netns
            .as_deref()
            .filter(|n| !n.is_empty())
            .map(PathBuf::from),
        _ => Some(PathBuf::from(require(&env.netns, "CNI_NETNS")?)),
    };
    let args = parse_cni_args(env.args.as_deref().unwrap_or(""))?;
    Ok(Attachment {
        container_id: container_id.to_owned(),
        ifname: ifname.to_owned(),
        netns,
        args,
    })
}

/// The spec's rule: alphanumerics plus `_`, `.` and `-`, starting alphanumeric.
pub fn validate_container_id(id: &str) -> CniResult<()> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("invalid CNI_CONTAINERID {id:?}: must be alphanumerics, '_', '.' or '-'"),
        ))
    }
}

/// Linux's rules for an interface name (`dev_valid_name`), which the spec adopts.
pub fn validate_ifname(name: &str) -> CniResult<()> {
    let bad = |why: &str| {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("invalid CNI_IFNAME {name:?}: {why}"),
        ))
    };
    if name.len() > 15 {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("reserved name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return bad("contains '/', ':' or whitespace");
    }
    Ok(())
}

/// `CNI_ARGS`: `K1=V1;K2=V2`.
pub fn parse_cni_args(text: &str) -> CniResult<HashMap<String, String>> {
    let mut out = HashMap::new();
    for pair in text.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("invalid CNI_ARGS pair {pair:?}: expected KEY=VALUE"),
            ));
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawNetConf {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(default, rename = "type")]
    plugin_type: String,
    bridge: Option<String>,
    #[serde(default)]
    is_gateway: bool,
    #[serde(default)]
    is_default_gateway: bool,
    #[serde(default)]
    force_address: bool,
    #[serde(default)]
    ip_masq: bool,
    mtu: Option<u32>,
    #[serde(default)]
    hairpin_mode: bool,
    #[serde(default)]
    promisc_mode: bool,
    vlan: Option<i64>,
    #[serde(default)]
    macspoofchk: bool,
    ipam: Option<RawIpam>,
    prev_result: Option<Value>,
    dns: Option<Value>,
    runtime_config: Option<Value>,
    args: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<RawValidAttachment>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(default, rename = "type")]
    ipam_type: String,
    ranges: Option<Vec<Vec<RawRange>>>,
    subnet: Option<String>,
    range_start: Option<String>,
    range_end: Option<String>,
    gateway: Option<String>,
    routes: Option<Vec<RawRoute>>,
    data_dir: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    #[serde(default)]
    subnet: String,
    range_start: Option<String>,
    range_end: Option<String>,
    gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawRoute {
    dst: String,
    gw: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawValidAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// One allocatable range: `start..=end` inside `subnet`, never handing out `gateway`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: Option<IpAddr>,
}

impl Range {
    pub fn contains(&self, ip: IpAddr) -> bool {
        crate::ipam::ip_to_u128(ip) >= crate::ipam::ip_to_u128(self.start)
            && crate::ipam::ip_to_u128(ip) <= crate::ipam::ip_to_u128(self.end)
            && self.subnet.contains(&ip)
    }

    fn overlaps(&self, other: &Range) -> bool {
        use crate::ipam::ip_to_u128 as n;
        self.start.is_ipv4() == other.start.is_ipv4()
            && n(self.start) <= n(other.end)
            && n(other.start) <= n(self.end)
    }
}

/// The validated IPAM section: one address is allocated from each range set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamConf {
    pub range_sets: Vec<Vec<Range>>,
    pub routes: Vec<Route>,
    /// `dataDir/<network name>`: the allocation directory of this network.
    pub network_dir: PathBuf,
}

/// The validated network configuration of the bridge plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub bridge: String,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub force_address: bool,
    pub ip_masq: bool,
    pub mtu: u32,
    pub hairpin_mode: bool,
    pub promisc_mode: bool,
    pub ipam: IpamConf,
    pub prev_result: Option<Value>,
    pub dns: Option<Value>,
    /// The pod interface's MAC asked for by `runtimeConfig.mac` (the `mac` capability) or
    /// `args.cni.mac`; `CNI_ARGS` `MAC=` is read with the environment.
    pub requested_mac: Option<[u8; 6]>,
    /// Addresses asked for by `args.cni.ips` and `runtimeConfig.ips` (the `ips`
    /// capability, entries with or without a prefix length); `CNI_ARGS` `IP=` is read with
    /// the environment.
    pub requested_ips: Vec<IpAddr>,
    /// GC's list of attachments that are still in use.
    pub valid_attachments: Option<Vec<(String, String)>>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidConfig, msg)
}

/// Reads only `cniVersion`, so that even an error about the rest of the config is reported
/// in the caller's version.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_owned)
}

/// Decodes and validates the config. Decoding failures are code 6, nonsense is code 7,
/// options the plugin does not implement are code 2; the version is checked by the caller.
pub fn parse_netconf(stdin: &[u8]) -> CniResult<NetConf> {
    let raw: RawNetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            ErrorCode::DecodeFailure,
            format!("decode network configuration: {e}"),
        )
    })?;
    validate_network_name(&raw.name)?;
    if !raw.plugin_type.is_empty() && raw.plugin_type != "skiff-cni" && raw.plugin_type != "bridge"
    {
        return Err(invalid(format!(
            "plugin type {:?} is not skiff-cni",
            raw.plugin_type
        )));
    }
    if raw.vlan.is_some_and(|v| v != 0) {
        return Err(CniError::new(
            ErrorCode::UnsupportedField,
            "unsupported field \"vlan\": skiff-cni does not tag bridge ports",
        ));
    }
    if raw.macspoofchk {
        return Err(CniError::new(
            ErrorCode::UnsupportedField,
            "unsupported field \"macspoofchk\"",
        ));
    }
    let bridge = raw.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_owned());
    validate_ifname(&bridge).map_err(|_| {
        invalid(format!(
            "invalid bridge name {bridge:?}: not a Linux interface name"
        ))
    })?;
    if bridge.is_empty() {
        return Err(invalid("bridge name is empty"));
    }
    let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
    if !(68..=65535).contains(&mtu) {
        return Err(invalid(format!("invalid mtu {mtu}: must be 68..=65535")));
    }
    let ipam = parse_ipam(raw.ipam, &raw.name)?;
    // The reference plugin's precedence: runtimeConfig over args.
    let mac_text = raw
        .runtime_config
        .as_ref()
        .and_then(|r| r.get("mac"))
        .or_else(|| raw.args.as_ref().and_then(|a| a.pointer("/cni/mac")))
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty());
    let requested_mac = match mac_text {
        Some(text) => {
            Some(parse_mac(text).ok_or_else(|| invalid(format!("invalid mac {text:?}")))?)
        }
        None => None,
    };
    let mut requested_ips = Vec::new();
    let lists = [
        raw.args.as_ref().and_then(|a| a.pointer("/cni/ips")),
        raw.runtime_config.as_ref().and_then(|r| r.get("ips")),
    ];
    for list in lists.into_iter().flatten() {
        let entries = list
            .as_array()
            .ok_or_else(|| invalid("requested ips must be a list of addresses"))?;
        for entry in entries {
            let text = entry.as_str().unwrap_or_default();
            requested_ips.push(
                parse_requested_ip(text)
                    .ok_or_else(|| invalid(format!("invalid requested ip {entry}")))?,
            );
        }
    }
    let valid_attachments = raw.valid_attachments.map(|list| {
        list.into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect()
    });
    Ok(NetConf {
        cni_version: raw.cni_version,
        name: raw.name,
        bridge,
        // isDefaultGateway needs the gateway on the bridge, as the reference plugin decides.
        is_gateway: raw.is_gateway || raw.is_default_gateway,
        is_default_gateway: raw.is_default_gateway,
        force_address: raw.force_address,
        ip_masq: raw.ip_masq,
        mtu,
        hairpin_mode: raw.hairpin_mode,
        promisc_mode: raw.promisc_mode,
        ipam,
        prev_result: raw.prev_result,
        dns: raw.dns,
        requested_mac,
        requested_ips,
        valid_attachments,
    })
}

/// An address, or an address with a prefix length (the `ips` capability's form).
pub fn parse_requested_ip(text: &str) -> Option<IpAddr> {
    let address = text.split_once('/').map_or(text, |(a, _)| a);
    address.parse().ok()
}

/// `aa:bb:cc:dd:ee:ff` (or with `-`), a unicast address.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (slot, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 {
            return None;
        }
        *slot = u8::from_str_radix(part, 16).ok()?;
    }
    (mac[0] & 1 == 0).then_some(mac)
}

/// The spec's rule for network names; also what keeps `dataDir/<name>` inside `dataDir`.
fn validate_network_name(name: &str) -> CniResult<()> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else if name.is_empty() {
        Err(invalid("network name is missing"))
    } else {
        Err(invalid(format!(
            "invalid network name {name:?}: must be alphanumerics, '_', '.' or '-'"
        )))
    }
}

fn parse_ip(text: &str, what: &str) -> CniResult<IpAddr> {
    text.parse()
        .map_err(|_| invalid(format!("invalid {what} {text:?}: not an IP address")))
}

fn parse_ipam(raw: Option<RawIpam>, network_name: &str) -> CniResult<IpamConf> {
    let raw = raw.ok_or_else(|| invalid("ipam section is missing"))?;
    if !raw.ipam_type.is_empty() && raw.ipam_type != "host-local" {
        return Err(invalid(format!(
            "ipam type {:?} is not supported: skiff-cni has built-in host-local ipam",
            raw.ipam_type
        )));
    }
    let mut raw_sets = raw.ranges.unwrap_or_default();
    if let Some(subnet) = raw.subnet {
        raw_sets.insert(
            0,
            vec![RawRange {
                subnet,
                range_start: raw.range_start,
                range_end: raw.range_end,
                gateway: raw.gateway,
            }],
        );
    }
    if raw_sets.is_empty() {
        return Err(invalid("ipam has no ranges"));
    }
    let mut range_sets = Vec::new();
    for (set_idx, raw_set) in raw_sets.into_iter().enumerate() {
        if raw_set.is_empty() {
            return Err(invalid(format!("ipam range set {set_idx} is empty")));
        }
        let mut set: Vec<Range> = Vec::new();
        for raw_range in raw_set {
            let range = parse_range(raw_range)?;
            if let Some(first) = set.first()
                && first.start.is_ipv4() != range.start.is_ipv4()
            {
                return Err(invalid(format!(
                    "ipam range set {set_idx} mixes address families"
                )));
            }
            if let Some(other) = set.iter().find(|r| r.overlaps(&range)) {
                return Err(invalid(format!(
                    "ipam ranges {} and {} overlap",
                    other.subnet, range.subnet
                )));
            }
            set.push(range);
        }
        for (other_idx, other) in range_sets.iter().enumerate() {
            let other: &Vec<Range> = other;
            if other.iter().any(|a| set.iter().any(|b| a.overlaps(b))) {
                return Err(invalid(format!(
                    "ipam range set {set_idx} overlaps with range set {other_idx}"
                )));
            }
        }
        range_sets.push(set);
    }
    let mut routes = Vec::new();
    for r in raw.routes.unwrap_or_default() {
        let dst: IpNet = r
            .dst
            .parse()
            .map_err(|_| invalid(format!("invalid route dst {:?}", r.dst)))?;
        let gw = match r.gw {
            Some(g) => Some(parse_ip(&g, "route gw")?),
            None => None,
        };
        routes.push(Route {
            dst: dst.trunc(),
            gw,
        });
    }
    let data_dir = raw.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.to_owned());
    if data_dir.is_empty() {
        return Err(invalid("ipam dataDir is empty"));
    }
    Ok(IpamConf {
        range_sets,
        routes,
        network_dir: PathBuf::from(data_dir).join(network_name),
    })
}

/// host-local's canonical form: gateway defaults to the subnet's first address, the range
/// to the whole subnet less the network address (and IPv4's broadcast).
fn parse_range(raw: RawRange) -> CniResult<Range> {
    use crate::ipam::{ip_to_u128, u128_to_ip};
    if raw.subnet.is_empty() {
        return Err(invalid("ipam range has no subnet"));
    }
    let subnet: IpNet = raw
        .subnet
        .parse()
        .map_err(|_| invalid(format!("invalid subnet {:?}", raw.subnet)))?;
    if subnet.addr() != subnet.network() {
        return Err(invalid(format!(
            "subnet {subnet} has host bits set: the network address is {}",
            subnet.trunc()
        )));
    }
    let host_bits = subnet.max_prefix_len() - subnet.prefix_len();
    if host_bits < 2 {
        return Err(invalid(format!(
            "subnet {subnet} is too small to allocate from"
        )));
    }
    let v4 = subnet.addr().is_ipv4();
    let network = ip_to_u128(subnet.network());
    let last = ip_to_u128(subnet.broadcast());
    let first_usable = network + 1;
    let last_usable = if v4 { last - 1 } else { last };
    let in_subnet = |ip: IpAddr, what: &str| -> CniResult<IpAddr> {
        if !subnet.contains(&ip) || ip.is_ipv4() != v4 {
            return Err(invalid(format!("{what} {ip} is not in subnet {subnet}")));
        }
        Ok(ip)
    };
    let start = match raw.range_start {
        Some(s) => in_subnet(parse_ip(&s, "rangeStart")?, "rangeStart")?,
        None => u128_to_ip(first_usable, v4),
    };
    let end = match raw.range_end {
        Some(s) => in_subnet(parse_ip(&s, "rangeEnd")?, "rangeEnd")?,
        None => u128_to_ip(last_usable, v4),
    };
    if ip_to_u128(start) > ip_to_u128(end) {
        return Err(invalid(format!(
            "rangeStart {start} is after rangeEnd {end}"
        )));
    }
    let gateway = match raw.gateway {
        Some(g) => Some(in_subnet(parse_ip(&g, "gateway")?, "gateway")?),
        None => Some(u128_to_ip(first_usable, v4)),
    };
    Ok(Range {
        subnet,
        start,
        end,
        gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(ipam: &str) -> String {
        format!(r#"{{"cniVersion":"1.0.0","name":"net1","type":"skiff-cni","ipam":{ipam}}}"#)
    }

    #[test]
    fn legacy_and_ranges_forms_parse() {
        let c = parse_netconf(conf(r#"{"type":"host-local","subnet":"10.1.0.0/24"}"#).as_bytes())
            .unwrap();
        let r = &c.ipam.range_sets[0][0];
        assert_eq!(r.start.to_string(), "10.1.0.1");
        assert_eq!(r.end.to_string(), "10.1.0.254");
        assert_eq!(r.gateway.unwrap().to_string(), "10.1.0.1");
        assert_eq!(c.bridge, "cni0");
        assert_eq!(c.mtu, 1500);
        assert_eq!(
            c.ipam.network_dir,
            PathBuf::from("/var/lib/cni/networks/net1")
        );

        let c = parse_netconf(
            conf(r#"{"ranges":[[{"subnet":"10.2.0.0/24","rangeStart":"10.2.0.10","rangeEnd":"10.2.0.20","gateway":"10.2.0.254"},{"subnet":"10.3.0.0/25"}]],"dataDir":"/tmp/x","routes":[{"dst":"0.0.0.0/0"}]}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(c.ipam.range_sets[0].len(), 2);
        assert_eq!(c.ipam.range_sets[0][1].end.to_string(), "10.3.0.126");
        assert_eq!(c.ipam.routes[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(c.ipam.network_dir, PathBuf::from("/tmp/x/net1"));
    }

    #[test]
    fn requested_mac_from_runtime_config_wins() {
        let c = parse_netconf(
            br#"{"cniVersion":"1.0.0","name":"n","ipam":{"subnet":"10.0.0.0/24"},
                "args":{"cni":{"mac":"02:00:00:00:00:01"}},
                "runtimeConfig":{"mac":"02:00:00:00:00:02"}}"#,
        )
        .unwrap();
        assert_eq!(c.requested_mac, Some([2, 0, 0, 0, 0, 2]));
        for bad in ["02:00:00:00:00", "zz:00:00:00:00:01", "01:00:00:00:00:01"] {
            let text = format!(
                r#"{{"cniVersion":"1.0.0","name":"n","ipam":{{"subnet":"10.0.0.0/24"}},"runtimeConfig":{{"mac":"{bad}"}}}}"#
            );
            assert_eq!(
                parse_netconf(text.as_bytes()).unwrap_err().code,
                ErrorCode::InvalidConfig,
                "{bad}"
            );
        }
        assert_eq!(
            parse_mac("02-AA-bb-00-00-01"),
            Some([2, 0xaa, 0xbb, 0, 0, 1])
        );
    }

    #[test]
    fn v6_range_defaults_to_last_address() {
        let c = parse_netconf(conf(r#"{"subnet":"fd00::/120"}"#).as_bytes()).unwrap();
        assert_eq!(c.ipam.range_sets[0][0].end.to_string(), "fd00::ff");
    }

    #[test]
    fn config_errors_map_to_codes() {
        let cases: &[(&str, ErrorCode)] = &[
            ("{", ErrorCode::DecodeFailure),
            ("[]", ErrorCode::DecodeFailure),
            (
                r#"{"cniVersion":"1.0.0","name":"n","mtu":"big","ipam":{}}"#,
                ErrorCode::DecodeFailure,
            ),
            (
                r#"{"cniVersion":"1.0.0","ipam":{"subnet":"10.0.0.0/24"}}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"../etc","ipam":{"subnet":"10.0.0.0/24"}}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                &conf(r#"{"subnet":"10.0.0.0/33"}"#),
                ErrorCode::InvalidConfig,
            ),
            (
                &conf(r#"{"subnet":"10.0.0.1/24"}"#),
                ErrorCode::InvalidConfig,
            ),
            (
                &conf(r#"{"subnet":"10.0.0.0/31"}"#),
                ErrorCode::InvalidConfig,
            ),
            (
                &conf(r#"{"subnet":"10.0.0.0/24","rangeStart":"10.0.1.1"}"#),
                ErrorCode::InvalidConfig,
            ),
            (
                &conf(r#"{"subnet":"10.0.0.0/24","rangeStart":"10.0.0.9","rangeEnd":"10.0.0.8"}"#),
                ErrorCode::InvalidConfig,
            ),
            (
                &conf(r#"{"ranges":[[{"subnet":"10.0.0.0/24"},{"subnet":"10.0.0.0/25"}]]}"#),
                ErrorCode::InvalidConfig,
            ),
            (
                &conf(r#"{"ranges":[[{"subnet":"10.0.0.0/24"}],[{"subnet":"10.0.0.128/25"}]]}"#),
                ErrorCode::InvalidConfig,
            ),
            (
                &conf(r#"{"ranges":[[{"subnet":"10.0.0.0/24"},{"subnet":"fd00::/64"}]]}"#),
                ErrorCode::InvalidConfig,
            ),
            (&conf(r#"{"ranges":[[]]}"#), ErrorCode::InvalidConfig),
            (&conf(r#"{"type":"dhcp"}"#), ErrorCode::InvalidConfig),
            (
                &conf(r#"{"subnet":"10.0.0.0/24","routes":[{"dst":"nope"}]}"#),
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","vlan":5,"ipam":{"subnet":"10.0.0.0/24"}}"#,
                ErrorCode::UnsupportedField,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","mtu":20,"ipam":{"subnet":"10.0.0.0/24"}}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","bridge":"a/b","ipam":{"subnet":"10.0.0.0/24"}}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"macvlan","ipam":{"subnet":"10.0.0.0/24"}}"#,
                ErrorCode::InvalidConfig,
            ),
        ];
        for (input, code) in cases {
            let err = parse_netconf(input.as_bytes()).unwrap_err();
            assert_eq!(err.code, *code, "{input}: {}", err.msg);
            assert!(!err.msg.is_empty());
        }
    }

    #[test]
    fn env_validation() {
        let env = RawEnv {
            command: Some("ADD".into()),
            container_id: Some("abc-1.x_y".into()),
            netns: Some("/run/netns/x".into()),
            ifname: Some("eth0".into()),
            args: Some("IgnoreUnknown=1;K8S_POD_NAME=p".into()),
            path: None,
        };
        let a = parse_attachment(&env, Command::Add).unwrap();
        assert_eq!(a.args["K8S_POD_NAME"], "p");
        for (mutate, what) in [
            (
                Box::new(|e: &mut RawEnv| e.container_id = None) as Box<dyn Fn(&mut RawEnv)>,
                "no id",
            ),
            (
                Box::new(|e: &mut RawEnv| e.container_id = Some("a b".into())),
                "bad id",
            ),
            (Box::new(|e: &mut RawEnv| e.ifname = None), "no ifname"),
            (
                Box::new(|e: &mut RawEnv| e.ifname = Some("eth0/x".into())),
                "slash",
            ),
            (
                Box::new(|e: &mut RawEnv| e.ifname = Some("a234567890123456".into())),
                "long",
            ),
            (
                Box::new(|e: &mut RawEnv| e.ifname = Some("..".into())),
                "dotdot",
            ),
            (Box::new(|e: &mut RawEnv| e.netns = None), "no netns"),
            (
                Box::new(|e: &mut RawEnv| e.args = Some("novalue".into())),
                "bad args",
            ),
        ] {
            let mut e = env.clone();
            mutate(&mut e);
            let err = parse_attachment(&e, Command::Add).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidEnvironment, "{what}");
        }
        let mut e = env.clone();
        e.netns = None;
        assert!(parse_attachment(&e, Command::Del).unwrap().netns.is_none());
    }

    #[test]
    fn commands_parse() {
        let mut env = RawEnv::default();
        assert_eq!(
            parse_command(&env).unwrap_err().code,
            ErrorCode::InvalidEnvironment
        );
        env.command = Some("FROB".into());
        assert_eq!(
            parse_command(&env).unwrap_err().code,
            ErrorCode::InvalidEnvironment
        );
        env.command = Some("GC".into());
        assert_eq!(parse_command(&env).unwrap(), Command::Gc);
    }
}
