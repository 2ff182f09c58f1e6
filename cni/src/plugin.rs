//! The CNI verbs: one invocation's environment and stdin in, its stdout and exit code out.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{self, Attachment, Command, NetConf, RawEnv};
use crate::datapath::{self, BridgeSpec, Kernel};
use crate::error::{CniError, CniResult, ErrorCode};
use crate::ipam::IpamStore;
use crate::masq;
use crate::result::{CniOutput, Interface, IpConfig, Route};
use crate::version::{self, CURRENT_VERSION, Version};

/// What the binary prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

/// Runs one CNI invocation. Every failure becomes the spec's error JSON on stdout and exit
/// code 1; nothing here panics on bad input.
pub fn run(env: &RawEnv, stdin: &[u8]) -> Outcome {
    let reported_version = config::peek_version(stdin)
        .filter(|v| version::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| CURRENT_VERSION.to_owned());
    match dispatch(env, stdin) {
        Ok(stdout) => Outcome {
            stdout,
            exit_code: 0,
        },
        Err(err) => Outcome {
            stdout: err.to_json(&reported_version),
            exit_code: 1,
        },
    }
}

fn dispatch(env: &RawEnv, stdin: &[u8]) -> CniResult<String> {
    let command = config::parse_command(env)?;
    if command == Command::Version {
        let asked = config::peek_version(stdin).unwrap_or_default();
        return Ok(version::version_info_json(&asked));
    }
    let conf = config::parse_netconf(stdin)?;
    let version = version::negotiate(&conf.cni_version)?;
    let need = |min: Version, verb: &str| -> CniResult<()> {
        if version < min {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "{verb} needs cniVersion {}.{}.{} or later, config has {}",
                    min.0, min.1, min.2, conf.cni_version
                ),
            ));
        }
        Ok(())
    };
    let prev = match &conf.prev_result {
        Some(value) => Some(CniOutput::from_prev_result(value, &conf.cni_version)?),
        None => None,
    };
    match command {
        Command::Add => {
            let att = config::parse_attachment(env, command)?;
            let out = cmd_add(&conf, &att, prev)?;
            Ok(out.to_json(&conf.cni_version).to_string())
        }
        Command::Del => {
            let att = config::parse_attachment(env, command)?;
            cmd_del(&conf, &att)?;
            Ok(String::new())
        }
        Command::Check => {
            need(Version::V0_4_0, "CHECK")?;
            let att = config::parse_attachment(env, command)?;
            let prev = prev.ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidConfig,
                    "CHECK needs prevResult in the config",
                )
            })?;
            cmd_check(&conf, &att, &prev)?;
            Ok(String::new())
        }
        Command::Status => {
            need(Version::V1_1_0, "STATUS")?;
            cmd_status(&conf)?;
            Ok(String::new())
        }
        Command::Gc => {
            need(Version::V1_1_0, "GC")?;
            cmd_gc(&conf)?;
            Ok(String::new())
        }
        Command::Version => unreachable!("answered above"),
    }
}

/// The routes the pod gets: IPAM's, plus a default route per gateway family when the
/// bridge is the default gateway (the reference plugin's rule, including its refusal of
/// an IPAM default route through another gateway).
fn pod_routes(conf: &NetConf, ips: &[IpConfig]) -> CniResult<Vec<Route>> {
    let mut routes = conf.ipam.routes.clone();
    if conf.is_default_gateway {
        for ip in ips {
            let default: IpNet = if ip.address.addr().is_ipv4() {
                "0.0.0.0/0".parse().expect("literal")
            } else {
                "::/0".parse().expect("literal")
            };
            for r in &conf.ipam.routes {
                if r.dst == default && r.gw.is_some() && r.gw != ip.gateway {
                    return Err(CniError::new(
                        ErrorCode::InvalidConfig,
                        format!(
                            "isDefaultGateway ineffective because IPAM sets default route via {}",
                            r.gw.map(|g| g.to_string()).unwrap_or_default()
                        ),
                    ));
                }
            }
            routes.push(Route {
                dst: default,
                gw: ip.gateway,
            });
        }
    }
    Ok(routes)
}

fn cmd_add(conf: &NetConf, att: &Attachment, prev: Option<CniOutput>) -> CniResult<CniOutput> {
    let netns_path = att.netns.as_deref().expect("ADD always has a netns");
    let netns = datapath::open_netns(netns_path)?;
    // Checked before anything is allocated; used again when the veth is made.
    requested_mac(conf, att)?;
    let requested = requested_ips(conf, att)?;
    let kernel = Kernel::new()?;
    // The pod's socket is opened on a helper thread while IPAM and the host side proceed.
    let pending_pod = kernel.start_handle_in(&netns, netns_path)?;

    let ips = {
        let store = IpamStore::lock(&conf.ipam.network_dir)?;
        store.allocate(&conf.ipam, &att.container_id, &att.ifname, &requested)?
    };
    failpoint("after-ipam");
    let mut created_host = None;
    let built = kernel.block_on(add_datapath(
        &kernel,
        conf,
        att,
        (&netns, netns_path),
        pending_pod,
        &ips,
        &mut created_host,
    ));
    match built {
        Ok((bridge, veth, routes)) => {
            let mut out = prev.unwrap_or_default();
            let base = out.interfaces.len();
            out.interfaces.push(Interface {
                name: conf.bridge.clone(),
                mac: bridge.mac,
                mtu: None,
                sandbox: None,
            });
            out.interfaces.push(Interface {
                name: veth.host_name,
                mac: veth.host_mac,
                mtu: Some(conf.mtu),
                sandbox: None,
            });
            out.interfaces.push(Interface {
                name: att.ifname.clone(),
                mac: veth.pod_mac,
                mtu: Some(conf.mtu),
                sandbox: Some(netns_path.display().to_string()),
            });
            out.ips.extend(ips.into_iter().map(|ip| IpConfig {
                interface: Some(base + 2),
                ..ip
            }));
            out.routes.extend(routes);
            if conf.dns.is_some() {
                out.dns = conf.dns.clone();
            }
            Ok(out)
        }
        Err(err) => {
            // A failed ADD leaves nothing: the veth pair (its pod end goes with it) and
            // the addresses are given back before the error is reported.
            if let Some(name) = created_host {
                let _ = kernel.block_on(datapath::delete_link(&kernel.host, &name));
            }
            if let Ok(store) = IpamStore::lock(&conf.ipam.network_dir) {
                let _ = store.release(&att.container_id, &att.ifname);
            }
            Err(err)
        }
    }
}

async fn add_datapath(
    kernel: &Kernel,
    conf: &NetConf,
    att: &Attachment,
    (netns, netns_path): (&std::fs::File, &std::path::Path),
    pending_pod: datapath::PendingHandle,
    ips: &[IpConfig],
    created_host: &mut Option<String>,
) -> CniResult<(datapath::LinkFacts, datapath::VethPair, Vec<Route>)> {
    let routes = pod_routes(conf, ips)?;
    let bridge = datapath::ensure_bridge(
        &kernel.host,
        &BridgeSpec {
            name: &conf.bridge,
            mtu: conf.mtu,
            promisc: conf.promisc_mode,
        },
    )
    .await?;
    if conf.is_gateway {
        let gateways: Vec<IpNet> = ips
            .iter()
            .filter_map(|ip| {
                ip.gateway
                    .and_then(|gw| IpNet::new(gw, ip.address.prefix_len()).ok())
            })
            .collect();
        datapath::ensure_bridge_addresses(&kernel.host, &bridge, &gateways, conf.force_address)
            .await?;
        for v4 in [true, false] {
            if gateways.iter().any(|g| g.addr().is_ipv4() == v4) {
                datapath::enable_forwarding(v4)?;
            }
        }
    }
    let alias = veth_alias(&conf.name, &att.container_id, &att.ifname);
    let mut pending_pod = Some(pending_pod);
    let mut pod: Option<rtnetlink::Handle> = None;
    let mut tries = 0;
    let veth = loop {
        let created = datapath::create_veth(
            &kernel.host,
            bridge.index,
            netns,
            &att.ifname,
            conf.mtu,
            requested_mac(conf, att)?,
        )
        .await;
        match created {
            Ok(veth) => break veth,
            Err(datapath::VethError::Other(e)) => return Err(e),
            Err(datapath::VethError::NameTaken) => {
                // Either the pod already has `ifname` (an error) or the random host name
                // collided (try another).
                if let Some(pending) = pending_pod.take() {
                    pod = Some(pending.wait(kernel)?);
                }
                let handle = pod.as_ref().expect("resolved above");
                if datapath::link_by_name(handle, &att.ifname).await?.is_some() {
                    return Err(CniError::new(
                        ErrorCode::Datapath,
                        format!(
                            "interface {} already exists in {}",
                            att.ifname,
                            netns_path.display()
                        ),
                    ));
                }
                tries += 1;
                if tries >= 5 {
                    return Err(CniError::new(
                        ErrorCode::Datapath,
                        format!("create veth pair for {}: no free host name", att.ifname),
                    ));
                }
            }
        }
    };
    *created_host = Some(veth.host_name.clone());
    datapath::set_port_options(&kernel.host, &veth.host_name, conf.hairpin_mode, &alias).await?;
    failpoint("after-veth");
    let pod = match (pod, pending_pod) {
        (Some(pod), _) => pod,
        (None, Some(pending)) => pending.wait(kernel)?,
        (None, None) => unreachable!("the pod handle is either pending or resolved"),
    };
    let pod = &pod;
    let pod_link = datapath::link_by_name(pod, &att.ifname)
        .await?
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::Datapath,
                format!(
                    "interface {} vanished from the pod after creation",
                    att.ifname
                ),
            )
        })?;
    let addresses: Vec<(IpNet, Option<IpAddr>)> =
        ips.iter().map(|ip| (ip.address, ip.gateway)).collect();
    datapath::configure_pod(pod, pod_link.index, &addresses, &routes).await?;
    if conf.ip_masq {
        let subnets: Vec<IpNet> = ips.iter().map(|ip| ip.address.trunc()).collect();
        masq::ensure_masquerade(&conf.name, &subnets)?;
    }
    Ok((bridge, veth, routes))
}

/// `CNI_ARGS` `IP=` (comma-separated), then `args.cni.ips`, then `runtimeConfig.ips`, as
/// host-local gathers them.
fn requested_ips(conf: &NetConf, att: &Attachment) -> CniResult<Vec<IpAddr>> {
    let mut ips = Vec::new();
    if let Some(list) = att.args.get("IP").filter(|v| !v.is_empty()) {
        for text in list.split(',') {
            ips.push(config::parse_requested_ip(text).ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("invalid IP {text:?} in CNI_ARGS"),
                )
            })?);
        }
    }
    ips.extend(&conf.requested_ips);
    Ok(ips)
}

/// `runtimeConfig.mac` / `args.cni.mac` win over `CNI_ARGS` `MAC=`, as in the reference.
fn requested_mac(conf: &NetConf, att: &Attachment) -> CniResult<Option<[u8; 6]>> {
    if conf.requested_mac.is_some() {
        return Ok(conf.requested_mac);
    }
    match att.args.get("MAC").filter(|m| !m.is_empty()) {
        Some(text) => config::parse_mac(text).map(Some).ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("invalid MAC {text:?} in CNI_ARGS"),
            )
        }),
        None => Ok(None),
    }
}

/// The host end's alias names its attachment, so GC can find veths whose pod is gone
/// from the runtime's list even when their namespace still exists (a crashed ADD).
fn veth_alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{VETH_ALIAS_PREFIX}{network} {container_id} {ifname}")
}

const VETH_ALIAS_PREFIX: &str = "skiff-cni ";

/// Test-only crash injection: `SKIFF_CNI_FAILPOINT=<name>` aborts the process at that
/// point, as a kill -9 or a node crash would, so tests can check what GC recovers.
fn failpoint(name: &str) {
    if std::env::var_os("SKIFF_CNI_FAILPOINT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}

fn cmd_del(conf: &NetConf, att: &Attachment) -> CniResult<()> {
    // The pod's socket is opened on a helper thread while the addresses are released.
    let mut pod_side = None;
    if let Some(netns_path) = att.netns.as_deref() {
        match std::fs::File::open(netns_path) {
            Ok(netns) => {
                let kernel = Kernel::new()?;
                let pending = kernel.start_handle_in(&netns, netns_path)?;
                pod_side = Some((kernel, pending));
            }
            // The namespace is already gone, and the pod end of the veth with it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(CniError::new(
                    ErrorCode::UnknownContainer,
                    format!("open network namespace {}: {e}", netns_path.display()),
                ));
            }
        }
    }
    {
        let store = IpamStore::lock(&conf.ipam.network_dir)?;
        store.release(&att.container_id, &att.ifname)?;
    }
    let Some((kernel, pending)) = pod_side else {
        return Ok(());
    };
    let pod = pending.wait(&kernel)?;
    kernel.block_on(datapath::delete_link(&pod, &att.ifname))
}

fn check_failed(msg: String) -> CniError {
    CniError::new(ErrorCode::CheckFailed, msg)
}

fn cmd_check(conf: &NetConf, att: &Attachment, prev: &CniOutput) -> CniResult<()> {
    let netns_path = att.netns.as_deref().expect("CHECK always has a netns");
    let netns = datapath::open_netns(netns_path)?;
    let sandbox = netns_path.display().to_string();
    // The prevResult's IPs on our interface: those pointing at it, or all without index.
    let our_iface_idx = prev
        .interfaces
        .iter()
        .position(|i| i.name == att.ifname && i.sandbox.as_deref() == Some(sandbox.as_str()));
    let our_ips: Vec<&IpConfig> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == our_iface_idx)
        .collect();
    {
        let store = IpamStore::lock(&conf.ipam.network_dir)?;
        let held = store.find(&att.container_id, &att.ifname)?;
        for ip in &our_ips {
            let in_our_ranges = conf
                .ipam
                .range_sets
                .iter()
                .flatten()
                .any(|r| r.contains(ip.address.addr()));
            if in_our_ranges && !held.contains(&ip.address.addr()) {
                return Err(check_failed(format!(
                    "ipam holds no reservation of {} for {}/{}",
                    ip.address, att.container_id, att.ifname
                )));
            }
        }
    }
    let kernel = Kernel::new()?;
    let pod = kernel.handle_in(&netns, netns_path)?;
    kernel.block_on(async {
        let link = datapath::link_by_name(&pod, &att.ifname)
            .await?
            .ok_or_else(|| {
                check_failed(format!("interface {} not found in {sandbox}", att.ifname))
            })?;
        if let Some(mac) = our_iface_idx.map(|i| &prev.interfaces[i].mac)
            && !mac.is_empty()
            && !mac.eq_ignore_ascii_case(&link.mac)
        {
            return Err(check_failed(format!(
                "interface {} has mac {}, prevResult says {mac}",
                att.ifname, link.mac
            )));
        }
        if link.mtu != conf.mtu {
            return Err(check_failed(format!(
                "interface {} has mtu {}, config says {}",
                att.ifname, link.mtu, conf.mtu
            )));
        }
        let addrs = datapath::addresses_of(&pod, link.index).await?;
        for ip in &our_ips {
            if !addrs.contains(&ip.address) {
                return Err(check_failed(format!(
                    "interface {} lacks address {}",
                    att.ifname, ip.address
                )));
            }
        }
        let routes = datapath::routes_of(&pod).await?;
        for r in &prev.routes {
            if !routes.iter().any(|(dst, _, _)| *dst == r.dst) {
                return Err(check_failed(format!(
                    "route to {} missing in {sandbox}",
                    r.dst
                )));
            }
        }
        let bridge = datapath::link_by_name(&kernel.host, &conf.bridge)
            .await?
            .ok_or_else(|| check_failed(format!("bridge {} not found", conf.bridge)))?;
        let peer = match link.peer_index {
            Some(index) => datapath::link_by_index(&kernel.host, index).await?,
            None => None,
        };
        match peer {
            Some(peer) if peer.controller == Some(bridge.index) => Ok(()),
            _ => Err(check_failed(format!(
                "the host end of {} is not a port of bridge {}",
                att.ifname, conf.bridge
            ))),
        }
    })
}

fn cmd_status(conf: &NetConf) -> CniResult<()> {
    let store = IpamStore::lock(&conf.ipam.network_dir)?;
    let free = store.free_counts(&conf.ipam)?;
    if let Some(set_idx) = free.iter().position(|n| *n == 0) {
        return Err(CniError::new(
            ErrorCode::NotAvailable,
            format!("no IP addresses available in range set {set_idx}"),
        ));
    }
    // A node before its first pod has no bridge yet (ADD creates it); a bridge missing
    // while pods hold addresses means their datapath is gone.
    let attached = !store.reservations()?.is_empty();
    drop(store);
    if attached {
        let kernel = Kernel::new()?;
        if kernel
            .block_on(datapath::link_by_name(&kernel.host, &conf.bridge))?
            .is_none()
        {
            return Err(CniError::new(
                ErrorCode::NotAvailable,
                format!("bridge {} is missing while pods are attached", conf.bridge),
            ));
        }
    }
    Ok(())
}

fn cmd_gc(conf: &NetConf) -> CniResult<()> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "GC needs cni.dev/valid-attachments in the config",
        )
    })?;
    {
        let store = IpamStore::lock(&conf.ipam.network_dir)?;
        store.gc(valid)?;
    }
    // Host ends of this network's veths whose attachment is not valid any more: their
    // pod ends go with them.
    let kernel = Kernel::new()?;
    let prefix = format!("{VETH_ALIAS_PREFIX}{} ", conf.name);
    kernel.block_on(async {
        for link in datapath::all_links(&kernel.host).await? {
            let Some(rest) = link.alias.as_deref().and_then(|a| a.strip_prefix(&prefix)) else {
                continue;
            };
            let Some((id, ifname)) = rest.split_once(' ') else {
                continue;
            };
            if !valid.iter().any(|(vid, vif)| vid == id && vif == ifname) {
                datapath::delete_link_index(&kernel.host, link.index).await?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> RawEnv {
        RawEnv {
            command: Some(command.into()),
            container_id: Some("c1".into()),
            netns: Some("/run/netns/skiff-test-does-not-exist".into()),
            ifname: Some("eth0".into()),
            args: None,
            path: None,
        }
    }

    fn code(out: &Outcome) -> u64 {
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["code"].as_u64().unwrap()
    }

    #[test]
    fn version_verb_answers_without_config() {
        let out = run(&env("VERSION"), b"");
        assert_eq!(out.exit_code, 0);
        assert!(out.stdout.contains("supportedVersions"));
        let out = run(&env("VERSION"), br#"{"cniVersion":"0.4.0"}"#);
        assert!(out.stdout.contains("\"cniVersion\":\"0.4.0\""));
    }

    #[test]
    fn verbs_gate_on_version() {
        let tmp = tempfile::tempdir().unwrap();
        let conf = |v: &str| {
            format!(
                r#"{{"cniVersion":"{v}","name":"n","ipam":{{"subnet":"10.0.0.0/24","dataDir":{:?}}}}}"#,
                tmp.path().to_str().unwrap()
            )
        };
        let out = run(&env("STATUS"), conf("1.0.0").as_bytes());
        assert_eq!((out.exit_code, code(&out)), (1, 1));
        let out = run(&env("GC"), conf("0.4.0").as_bytes());
        assert_eq!(code(&out), 1);
        let out = run(&env("CHECK"), conf("0.3.1").as_bytes());
        assert_eq!(code(&out), 1);
        let out = run(&env("ADD"), conf("0.2.0").as_bytes());
        assert_eq!(code(&out), 1);
        // The error is reported in the config's own version when it is one we speak.
        let out = run(&env("CHECK"), conf("0.3.1").as_bytes());
        assert!(out.stdout.contains("\"cniVersion\":\"0.3.1\""));
        // STATUS on an empty network with no pods is ready.
        let out = run(&env("STATUS"), conf("1.1.0").as_bytes());
        assert_eq!(
            out,
            Outcome {
                stdout: String::new(),
                exit_code: 0
            }
        );
    }

    #[test]
    fn missing_netns_is_unknown_container_and_leaves_no_allocation() {
        let tmp = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","ipam":{{"subnet":"10.0.0.0/24","dataDir":{:?}}}}}"#,
            tmp.path().to_str().unwrap()
        );
        let out = run(&env("ADD"), conf.as_bytes());
        assert_eq!(code(&out), 3);
        let left: Vec<_> = std::fs::read_dir(tmp.path().join("n"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.iter().all(|n| n == "lock"), "{left:?}");
        // DEL with a gone namespace succeeds.
        let out = run(&env("DEL"), conf.as_bytes());
        assert_eq!(out.exit_code, 0, "{}", out.stdout);
    }

    #[test]
    fn check_requires_prev_result() {
        let tmp = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","ipam":{{"subnet":"10.0.0.0/24","dataDir":{:?}}}}}"#,
            tmp.path().to_str().unwrap()
        );
        let out = run(&env("CHECK"), conf.as_bytes());
        assert_eq!(code(&out), 7);
    }

    /// Thousands of mangled configs: every answer is error JSON with a spec code, none
    /// panics. (ADD and CHECK stop at the missing namespace, before touching any file.)
    #[test]
    fn mangled_configs_never_panic() {
        use rand::{Rng, SeedableRng};
        let base = br#"{"cniVersion":"1.0.0","name":"n","type":"skiff-cni","bridge":"b0","isGateway":true,"ipMasq":true,"mtu":1400,"runtimeConfig":{"mac":"02:00:00:00:00:01"},"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"interface":0,"address":"10.0.0.2/24","gateway":"10.0.0.1"}],"routes":[{"dst":"0.0.0.0/0"}]},"ipam":{"type":"host-local","ranges":[[{"subnet":"10.0.0.0/24","rangeStart":"10.0.0.10","rangeEnd":"10.0.0.20","gateway":"10.0.0.1"}],[{"subnet":"fd00::/64"}]],"routes":[{"dst":"0.0.0.0/0","gw":"10.0.0.1"}],"dataDir":"/nonexistent/skiff"}}"#;
        let alphabet = br#"{}[]":,0123456789./-abcdefxyzABC \null true false 255 ::"#;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5c1ff);
        for round in 0..3000 {
            let mut input = base.to_vec();
            for _ in 0..rng.random_range(1..6) {
                let pos = rng.random_range(0..input.len());
                match rng.random_range(0..4) {
                    0 => input[pos] = alphabet[rng.random_range(0..alphabet.len())],
                    1 => input.insert(pos, alphabet[rng.random_range(0..alphabet.len())]),
                    2 => {
                        input.remove(pos);
                    }
                    _ => input.truncate(pos.max(1)),
                }
                if input.is_empty() {
                    input.push(b'{');
                }
            }
            let command = ["ADD", "CHECK", "VERSION"][round % 3];
            let out = std::panic::catch_unwind(|| run(&env(command), &input))
                .unwrap_or_else(|_| panic!("panicked on {}", String::from_utf8_lossy(&input)));
            let v: serde_json::Value = serde_json::from_str(&out.stdout)
                .unwrap_or_else(|_| panic!("not JSON: {:?}", out.stdout));
            if command == "VERSION" {
                assert_eq!(out.exit_code, 0);
                continue;
            }
            assert_eq!(out.exit_code, 1, "{}", out.stdout);
            let code = v["code"].as_u64().unwrap();
            assert!(
                [1, 2, 3, 4, 6, 7].contains(&code),
                "code {code}: {}",
                out.stdout
            );
            assert!(!v["msg"].as_str().unwrap().is_empty());
        }
    }

    #[test]
    fn gc_needs_valid_attachments() {
        let tmp = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","ipam":{{"subnet":"10.0.0.0/24","dataDir":{:?}}}}}"#,
            tmp.path().to_str().unwrap()
        );
        assert_eq!(code(&run(&env("GC"), conf.as_bytes())), 7);
    }
}
