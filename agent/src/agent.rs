//! The daemon: connects to the API server and containerd, registers the Node, and runs
//! the pod manager, the node status reports and the Lease until it is stopped.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::config::AgentConfig;
use crate::node::{self, Health, Machine, NodeInfo, Signals};
use crate::node_api::{NodeApi, NodeApiConfig, ServingCertificate};
use crate::pods::manager::{self, KubePodApi, PodTable};
use crate::pods::node_runtime::NodeRuntime;
use crate::pods::node_state::{AgentNodeState, ReportingPodApi};
use crate::pods::worker::WorkerShared;

async fn kube_config(config: &AgentConfig) -> anyhow::Result<kube::Config> {
    Ok(match &config.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("load kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("find a kubeconfig")?,
    })
}

/// The node's address: the flag, or the source address of the route to the API server.
fn node_ip(config: &AgentConfig, api_url: &str) -> anyhow::Result<IpAddr> {
    if let Some(ip) = config.node_ip {
        return Ok(ip);
    }
    let authority = api_url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .context("API server URL has no host")?;
    let target = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").context("find the node IP")?;
    socket
        .connect(&target)
        .with_context(|| format!("find the node IP: route to {target}"))?;
    Ok(socket.local_addr()?.ip())
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let node_name = config.node_name()?;
    for dir in [&config.run_dir, &config.state_dir, &config.pod_log_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let kube_config = kube_config(&config).await?;
    let node_ip = node_ip(&config, &kube_config.cluster_url.to_string())?;
    let client = kube::Client::try_from(kube_config).context("build the API client")?;
    let machine = Machine::read(&config.state_dir)?;
    let events = crate::events::EventRecorder::start(client.clone(), &node_name);

    let (exits_tx, mut runtime_exits) = mpsc::unbounded_channel::<String>();
    let runtime = Arc::new(
        NodeRuntime::start(
            &config,
            &node_name,
            client.clone(),
            node_ip.to_string(),
            exits_tx,
            events.clone(),
        )
        .await
        .context("start the container runtime")?,
    );
    let runtime_version = runtime.version().await;

    let routes = if config.host_gw_routes {
        let table =
            crate::routes::Routes::host().context("open the netlink socket for host-gw routes")?;
        Some(tokio::spawn(crate::routes::run(
            client.clone(),
            table,
            crate::routes::RoutesConfig {
                node_name: node_name.clone(),
                own_pod_cidrs: config.pod_cidr.iter().cloned().collect(),
                resync: Duration::from_secs(config.routes_resync_seconds.max(1)),
            },
        )))
    } else {
        None
    };
    let service_lb = if config.service_lb {
        let lb_cgroup = config
            .lb_cgroup
            .clone()
            .unwrap_or_else(|| runtime.pods_cgroup_dir());
        match start_service_lb(&config, &lb_cgroup, node_ip) {
            Ok(programmer) => {
                let node = crate::lb::desired::NodeContext {
                    node_name: node_name.clone(),
                    node_addresses: match node_ip {
                        IpAddr::V4(address) => vec![address],
                        IpAddr::V6(_) => Vec::new(),
                    },
                };
                Some(tokio::spawn(crate::lb::sync::run(
                    client.clone(),
                    node,
                    programmer,
                )))
            }
            Err(error) => {
                // Pods still run; Services do not resolve on this node until it is fixed.
                tracing::error!(
                    error = format!("{error:#}"),
                    "service load balancer not started"
                );
                None
            }
        }
    } else {
        None
    };
    // The node API is bound before the Node is registered, so the Node reports the port it
    // really has (`--node-api-listen` may ask for port 0).
    let table = PodTable::default();
    let node_state = AgentNodeState::new(table.clone(), config.pod_log_dir.clone());
    let serving_certificate = match (&config.tls_cert_file, &config.tls_private_key_file) {
        (Some(cert), Some(key)) => ServingCertificate::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => ServingCertificate::SelfSigned {
            hosts: vec![node_ip.to_string(), node_name.clone()],
        },
    };
    let node_api = NodeApi::bind(
        NodeApiConfig {
            listen: config.node_api_listen,
            serving_certificate,
            client_ca_file: config.client_ca_file.clone(),
            token_file: config.node_api_token_file.clone(),
        },
        node_state.clone(),
    )
    .await
    .context("start the node API")?;
    let executor = runtime.executor().clone();
    let node_api = node_api.with_executor(executor.clone());
    tokio::spawn(async move { executor.remove_orphans().await });
    tracing::info!(address = %node_api.local_addr(), "node API listening");
    if config.client_ca_file.is_none() && config.node_api_token_file.is_none() {
        tracing::warn!(
            "the node API has neither --client-ca-file nor --node-api-token-file: it refuses \
             every log request, so kubectl logs cannot work"
        );
    }

    let info = NodeInfo {
        name: &node_name,
        config: &config,
        machine: &machine,
        node_ip,
        runtime_version: &runtime_version,
        node_api_port: node_api.local_addr().port(),
    };
    let thresholds = crate::node::Thresholds::parse(&config.eviction_hard)
        .map_err(|e| anyhow::anyhow!("--eviction-hard: {e}"))?;
    let health = |signals: &Signals| Health {
        memory_pressure: signals.memory_pressure(&thresholds),
        disk_pressure: signals.disk_pressure(&thresholds),
        pid_pressure: signals.pid_pressure(&thresholds),
        unenforced: runtime.unenforced(),
        not_ready: None,
    };
    let signals = Signals::read(&config.state_dir)?;
    node::register(&client, &info, &health(&signals))
        .await
        .context("register the node")?;
    node::renew_lease(&client, &node_name).await?;
    tracing::info!(node = %node_name, ip = %node_ip, "node registered");
    node::record_start(&events, runtime.unenforced_limits());
    // Registered, serving the node API, and the pod manager below adopts the pods already
    // on the machine: `systemctl start` returns from here on (`Type=notify`).
    notify_systemd_ready();

    let lease = tokio::spawn(node::keep_lease(
        client.clone(),
        node_name.clone(),
        Duration::from_secs(config.lease_renew_seconds.max(1)),
    ));
    let shared = Arc::new(WorkerShared {
        runtime: runtime.clone(),
        // The node state hears of each status the workers write: it is what stops log
        // followers when their container stops.
        api: Arc::new(ReportingPodApi::new(
            KubePodApi {
                client: client.clone(),
            },
            node_state.clone(),
        )),
        host_ip: node_ip.to_string(),
        events: events.clone(),
    });
    // Container exits wake the pod workers; the node state sees them first, for pods the
    // API no longer has (whose workers write no more status).
    let (worker_exits, exits_rx) = mpsc::unbounded_channel();
    let exits_state = node_state.clone();
    let forward_exits = tokio::spawn(async move {
        while let Some(uid) = runtime_exits.recv().await {
            exits_state.container_exited(&uid);
            if worker_exits.send(uid).is_err() {
                break;
            }
        }
    });
    let usage_runtime = runtime.clone();
    let eviction = tokio::spawn(crate::pods::eviction::run(
        client.clone(),
        table.clone(),
        crate::pods::eviction::EvictionConfig {
            thresholds,
            state_dir: config.state_dir.clone(),
            interval: Duration::from_secs(config.eviction_interval_seconds.max(1)),
        },
        Arc::new(move |pod: &k8s_openapi::api::core::v1::Pod| usage_runtime.pod_memory(pod)),
        events,
    ));
    let pods = manager::run(client.clone(), &node_name, shared, table.clone(), exits_rx);

    // Node status: reported at start, when a condition changes, and every
    // `status_report_seconds` otherwise.
    let report_period = Duration::from_secs(config.status_report_seconds.max(1));
    let status_loop = async {
        let mut last = health(&signals);
        let mut since_report = Duration::ZERO;
        let tick = Duration::from_secs(5).min(report_period);
        loop {
            tokio::time::sleep(tick).await;
            since_report += tick;
            let Ok(signals) = Signals::read(&config.state_dir) else {
                continue;
            };
            let now = health(&signals);
            if now != last || since_report >= report_period {
                if let Err(error) = node::report(&client, &info, &now).await {
                    tracing::warn!(error = format!("{error:#}"), "node status");
                    continue;
                }
                last = now;
                since_report = Duration::ZERO;
            }
        }
    };

    let result = tokio::select! {
        result = pods => result,
        result = node_api.run() => result.context("node API"),
        () = status_loop => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = sigterm() => Ok(()),
    };
    lease.abort();
    // Routes and the load balancer's pinned maps and links stay in place while the agent
    // is down, so traffic keeps flowing.
    if let Some(routes) = routes {
        routes.abort();
    }
    if let Some(service_lb) = service_lb {
        service_lb.abort();
    }
    eviction.abort();
    forward_exits.abort();
    tracing::info!("agent stopping; pods keep running");
    result
}

/// Loads the load balancer's programs (reusing pinned maps and links) and attaches the
/// socket hooks to `lb_cgroup`.
fn start_service_lb(
    config: &AgentConfig,
    lb_cgroup: &std::path::Path,
    node_ip: IpAddr,
) -> anyhow::Result<crate::lb::programmer::Programmer> {
    use crate::lb::datapath::{self, Datapath, MapSizes};
    datapath::ensure_bpffs(&config.bpffs_dir)?;
    let sizes = MapSizes {
        services: config.lb_max_services,
        backends: config.lb_max_backends,
        reverse_sk: config.lb_max_sockets,
        affinity: config.lb_max_affinity,
    };
    let mut datapath = Datapath::load(&config.bpffs_dir, &sizes)?;
    datapath.attach_cgroup(lb_cgroup)?;
    // NodePorts from outside: a failure here leaves the socket side serving.
    match nodeport_interfaces(&config.nodeport_interfaces, node_ip) {
        Ok(interfaces) if interfaces.is_empty() => {
            tracing::info!(
                "no interface for NodePorts from outside the node (--nodeport-interfaces)"
            );
        }
        Ok(interfaces) => {
            let names: Vec<&str> = interfaces.iter().map(String::as_str).collect();
            let attached =
                crate::lb::tc::TcDatapath::load(&config.bpffs_dir, config.lb_max_connections)
                    .and_then(|mut tc| tc.attach(None, &names));
            match attached {
                Ok(()) => tracing::info!(interfaces = ?names, "NodePort programs attached"),
                Err(error) => {
                    tracing::error!(%error, "NodePort programs not attached; NodePorts answer only from this node")
                }
            }
        }
        Err(error) => tracing::error!(error = format!("{error:#}"), "NodePort interfaces"),
    }
    tracing::info!(bpffs = %config.bpffs_dir.display(), cgroup = %lb_cgroup.display(), "service load balancer attached");
    Ok(crate::lb::programmer::Programmer::new(datapath)?)
}

/// The interfaces `--nodeport-interfaces` names: `none`, a list, or `auto` (the
/// non-loopback interface holding the node IP; none when the node IP is a loopback one).
fn nodeport_interfaces(flag: &str, node_ip: IpAddr) -> anyhow::Result<Vec<String>> {
    match flag {
        "none" | "" => Ok(Vec::new()),
        "auto" => {
            if node_ip.is_loopback() {
                return Ok(Vec::new());
            }
            let addresses = nix::ifaddrs::getifaddrs().context("list the node's interfaces")?;
            let mut names: Vec<String> = addresses
                .filter(|address| {
                    address
                        .address
                        .as_ref()
                        .and_then(|address| address.as_sockaddr_in())
                        .is_some_and(|address| IpAddr::V4(address.ip()) == node_ip)
                })
                .map(|address| address.interface_name)
                .collect();
            names.dedup();
            Ok(names)
        }
        list => Ok(list
            .split(',')
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .collect()),
    }
}

/// Sends `READY=1` to systemd when it started this process as a `Type=notify` service (the
/// `NOTIFY_SOCKET` variable names its socket); does nothing otherwise.
pub fn notify_systemd_ready() {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    match notify_systemd(&socket, "READY=1") {
        Ok(()) => tracing::info!("told systemd the agent is ready"),
        Err(error) => tracing::warn!(
            %error,
            socket = %socket.to_string_lossy(),
            "tell systemd the agent is ready"
        ),
    }
}

/// Sends `message` as one datagram to the notification socket `socket`: a path, or an
/// abstract name when it starts with `@` (sd_notify(3)).
fn notify_systemd(socket: &std::ffi::OsStr, message: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    let address = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(socket)?,
    };
    let sender = UnixDatagram::unbound()?;
    sender.send_to_addr(message.as_bytes(), &address)?;
    Ok(())
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        let mut buffer = [0u8; 64];
        let len = socket.recv(&mut buffer).unwrap();
        String::from_utf8_lossy(&buffer[..len]).into_owned()
    }

    #[test]
    fn readiness_reaches_a_notification_socket_at_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        notify_systemd(path.as_os_str(), "READY=1").unwrap();
        assert_eq!(received(&systemd), "READY=1");
    }

    #[test]
    fn readiness_reaches_an_abstract_notification_socket() {
        let name = format!("skiff-notify-test-{}", uuid::Uuid::new_v4());
        let systemd =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        notify_systemd(std::ffi::OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        assert_eq!(received(&systemd), "READY=1");
    }

    #[test]
    fn a_missing_notification_socket_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = notify_systemd(dir.path().join("absent").as_os_str(), "READY=1").unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
    }
}
