//! `agentctl lb list|get` and `agentctl explain service`: the load balancer's pinned maps,
//! read directly (so they answer while the agent is down), and for `explain` beside what
//! the API server asks for.

use std::path::Path;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;

use crate::lb::desired::{self, NodeContext};
use crate::lb::inspect::{self, Difference, FrontendView, Snapshot};

use super::table::Table;
use super::{Format, NodeFlags, print_json};

#[derive(Subcommand, Debug)]
pub enum LbCommand {
    /// Every frontend with its backends and per-backend connection counters.
    List,
    /// The frontends of one Service (`NAMESPACE/NAME`).
    Get { service: String },
    /// Removes every pinned map and link: the socket hooks detach and Services stop
    /// resolving on this node until the agent starts again with empty maps (to resize the
    /// maps, or after a downgrade changed their layout).
    Reset,
}

#[derive(Subcommand, Debug)]
pub enum CtCommand {
    /// Connections to NodePorts and external IPs from outside the node, as the tc programs
    /// track them: client, frontend, backend, source translation, idle time.
    List,
}

pub fn connections(flags: &NodeFlags, format: Format, command: CtCommand) -> anyhow::Result<()> {
    let CtCommand::List = command;
    let connections = inspect::read_connections(&flags.bpffs_dir)
        .with_context(|| {
            format!(
                "read the conntrack map pinned under {}",
                flags.bpffs_dir.display()
            )
        })?
        .with_context(|| {
            format!(
                "no conntrack map under {}: the NodePort programs are not loaded on this node",
                flags.bpffs_dir.display()
            )
        })?;
    match format {
        Format::Json => print_json(&connections),
        Format::Table => {
            let mut table = Table::new(&[
                "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SNAT", "SERVICE", "STATE", "IDLE",
            ]);
            for connection in &connections {
                table.row(vec![
                    connection.protocol.into(),
                    connection.client.to_string(),
                    connection.frontend.to_string(),
                    connection.backend.to_string(),
                    connection
                        .snat
                        .map_or_else(|| "-".into(), |snat| snat.to_string()),
                    connection
                        .service
                        .split(' ')
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                    if connection.closing {
                        "closing"
                    } else {
                        "open"
                    }
                    .into(),
                    format!("{}s", connection.idle_seconds),
                ]);
            }
            print!("{}", table.render(""));
            println!("\n{} connections", connections.len());
            Ok(())
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ExplainCommand {
    /// What the API asks of the datapath for a Service (`NAMESPACE/NAME`) beside what the
    /// maps hold, with every difference named. Needs the API server (`--kubeconfig`).
    Service { service: String },
}

fn snapshot(flags: &NodeFlags) -> anyhow::Result<Snapshot> {
    inspect::read(&flags.bpffs_dir).with_context(|| {
        format!(
            "read the load balancer maps pinned under {} (is the agent's --bpffs-dir elsewhere?)",
            flags.bpffs_dir.display()
        )
    })
}

fn split_service(text: &str) -> anyhow::Result<(&str, &str)> {
    match text.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
            Ok((namespace, name))
        }
        _ => bail!("service {text:?}: expected NAMESPACE/NAME"),
    }
}

pub fn run(flags: &NodeFlags, format: Format, command: LbCommand) -> anyhow::Result<()> {
    if let LbCommand::Reset = command {
        crate::lb::datapath::remove_pins(&flags.bpffs_dir)
            .with_context(|| format!("remove the pins under {}", flags.bpffs_dir.display()))?;
        println!(
            "removed the load balancer's maps and links under {}",
            flags.bpffs_dir.display()
        );
        return Ok(());
    }
    let snapshot = snapshot(flags)?;
    match command {
        LbCommand::Reset => unreachable!("handled above"),
        LbCommand::List => {
            for problem in &snapshot.problems {
                eprintln!("agentctl: warning: {problem}");
            }
            match format {
                Format::Json => print_json(&snapshot),
                Format::Table => {
                    print!("{}", frontend_table(&snapshot.frontends));
                    println!(
                        "\n{} frontends; lb4_services {}/{} entries, lb4_backends {}/{}",
                        snapshot.frontends.len(),
                        snapshot.services_map.entries,
                        snapshot.services_map.max_entries,
                        snapshot.backends_map.entries,
                        snapshot.backends_map.max_entries
                    );
                    Ok(())
                }
            }
        }
        LbCommand::Get { service } => {
            let (namespace, name) = split_service(&service)?;
            let frontends: Vec<FrontendView> = snapshot
                .frontends
                .into_iter()
                .filter(|view| view.namespace == namespace && view.service == name)
                .collect();
            if frontends.is_empty() {
                bail!("service {namespace}/{name}: no frontend in the load balancer maps");
            }
            match format {
                Format::Json => print_json(&frontends),
                Format::Table => {
                    print!("{}", backend_table(&frontends));
                    Ok(())
                }
            }
        }
    }
}

/// One row per frontend, its backends as `address:port(connections)`.
fn frontend_table(frontends: &[FrontendView]) -> String {
    let mut table = Table::new(&["SERVICE", "KIND", "FRONTEND", "SCOPE", "BACKENDS"]);
    for view in frontends {
        let kind = view.name.rsplit(' ').next().unwrap_or_default().to_owned();
        let backends = if view.backends.is_empty() {
            "<none: connections refused>".to_owned()
        } else {
            view.backends
                .iter()
                .map(|backend| {
                    format!(
                        "{}:{}({})",
                        backend.address, backend.port, backend.connections
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        table.row(vec![
            view.name.split(' ').next().unwrap_or_default().to_owned(),
            kind,
            view.endpoint(),
            view.scope.to_owned(),
            backends,
        ]);
    }
    table.render("")
}

/// One row per backend of each frontend.
fn backend_table(frontends: &[FrontendView]) -> String {
    let mut table = Table::new(&[
        "FRONTEND",
        "SCOPE",
        "AFFINITY",
        "SLOT",
        "BACKEND",
        "STATE",
        "CONNECTIONS",
    ]);
    for view in frontends {
        let affinity = view.affinity_timeout_seconds.map_or_else(
            || "None".to_owned(),
            |seconds| format!("ClientIP {seconds}s"),
        );
        if view.backends.is_empty() {
            table.row(vec![
                view.endpoint(),
                view.scope.into(),
                affinity.clone(),
                "-".into(),
                "<none>".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for backend in &view.backends {
            let state = match (backend.terminating, backend.local) {
                (true, true) => "terminating,local",
                (true, false) => "terminating",
                (false, true) => "ready,local",
                (false, false) => "ready",
            };
            table.row(vec![
                view.endpoint(),
                view.scope.into(),
                affinity.clone(),
                backend.slot.to_string(),
                format!("{}:{}", backend.address, backend.port),
                state.into(),
                backend.connections.to_string(),
            ]);
        }
    }
    table.render("")
}

#[derive(Serialize)]
struct Explanation {
    service: String,
    node_name: String,
    node_addresses: Vec<std::net::Ipv4Addr>,
    /// What the API asks for, frontend by frontend.
    desired: Vec<DesiredView>,
    /// What the maps hold for the Service.
    programmed: Vec<FrontendView>,
    differences: Vec<Difference>,
}

#[derive(Serialize)]
struct DesiredView {
    frontend: String,
    scope: &'static str,
    kind: &'static str,
    affinity_timeout_seconds: Option<u32>,
    local_only: bool,
    backends: Vec<String>,
}

pub async fn explain(
    flags: &NodeFlags,
    format: Format,
    command: ExplainCommand,
) -> anyhow::Result<()> {
    let ExplainCommand::Service { service } = command;
    let (namespace, name) = split_service(&service)?;
    let client = kube_client(flags.kubeconfig.as_deref()).await?;
    let services: kube::Api<Service> = kube::Api::namespaced(client.clone(), namespace);
    let object = services
        .get_opt(name)
        .await
        .with_context(|| format!("get service {namespace}/{name}"))?;
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client.clone(), namespace);
    let slices = slices
        .list(
            &kube::api::ListParams::default().labels(&format!("kubernetes.io/service-name={name}")),
        )
        .await
        .with_context(|| format!("list the endpoint slices of {namespace}/{name}"))?;
    let node = node_context(&client, flags).await?;
    let slice_refs: Vec<&EndpointSlice> = slices.items.iter().collect();
    let wanted = object
        .as_ref()
        .map(|object| desired::service_frontends(object, &slice_refs, &node))
        .unwrap_or_default();
    let snapshot = snapshot(flags)?;
    let programmed: Vec<FrontendView> = snapshot
        .frontends
        .into_iter()
        .filter(|view| view.namespace == namespace && view.service == name)
        .collect();
    let mut differences = inspect::compare(&wanted, &programmed);
    if object.is_none() {
        differences.insert(
            0,
            Difference {
                frontend: "-".into(),
                what: format!("service {namespace}/{name} does not exist in the API"),
            },
        );
    }
    let explanation = Explanation {
        service: format!("{namespace}/{name}"),
        node_name: node.node_name.clone(),
        node_addresses: node.node_addresses.clone(),
        desired: wanted.iter().map(desired_view).collect(),
        programmed,
        differences,
    };
    match format {
        Format::Json => print_json(&explanation),
        Format::Table => {
            println!("Service {} on node {}", explanation.service, node.node_name);
            println!("\nAsked for by the API:");
            let mut table = Table::new(&["FRONTEND", "SCOPE", "KIND", "AFFINITY", "BACKENDS"]);
            for view in &explanation.desired {
                table.row(vec![
                    view.frontend.clone(),
                    view.scope.into(),
                    view.kind.into(),
                    view.affinity_timeout_seconds
                        .map_or("None".into(), |s| format!("ClientIP {s}s")),
                    if view.backends.is_empty() {
                        "<none>".into()
                    } else {
                        view.backends.join(" ")
                    },
                ]);
            }
            print!("{}", table.render("  "));
            println!("\nHeld in the maps:");
            print!(
                "{}",
                backend_table(&explanation.programmed)
                    .lines()
                    .map(|line| format!("  {line}\n"))
                    .collect::<String>()
            );
            if explanation.differences.is_empty() {
                println!("\nIn sync: the maps hold exactly what the API asks for.");
            } else {
                println!("\nDifferences:");
                for difference in &explanation.differences {
                    println!("  {}: {}", difference.frontend, difference.what);
                }
            }
            Ok(())
        }
    }
}

fn desired_view(frontend: &desired::Frontend) -> DesiredView {
    DesiredView {
        frontend: format!(
            "{}:{}/{}",
            frontend.key.address,
            frontend.key.port,
            match frontend.key.proto {
                desired::Proto::Tcp => "TCP",
                desired::Proto::Udp => "UDP",
            }
        ),
        scope: match frontend.key.scope {
            desired::Scope::Internal => "internal",
            desired::Scope::External => "external",
        },
        kind: crate::lb::programmer::kind_name(frontend.kind),
        affinity_timeout_seconds: frontend.affinity_timeout,
        local_only: frontend.local_only,
        backends: frontend
            .backends
            .iter()
            .map(|backend| format!("{}:{}", backend.address, backend.port))
            .collect(),
    }
}

async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| format!("use kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("find a kubeconfig (give --kubeconfig, the agent's)")?,
    };
    kube::Client::try_from(config).context("build the API client")
}

/// This node's name and addresses, as the agent computes NodePort frontends.
async fn node_context(client: &kube::Client, flags: &NodeFlags) -> anyhow::Result<NodeContext> {
    let node_name = match &flags.node_name {
        Some(name) => name.clone(),
        None => nix::unistd::gethostname()
            .context("read the hostname (give --node-name)")?
            .to_string_lossy()
            .into_owned(),
    };
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    let node = nodes
        .get_opt(&node_name)
        .await
        .with_context(|| format!("get node {node_name}"))?;
    let node_addresses = node
        .iter()
        .flat_map(|node| node.status.iter())
        .flat_map(|status| status.addresses.iter().flatten())
        .filter(|address| address.type_ == "InternalIP")
        .filter_map(|address| address.address.parse().ok())
        .collect();
    Ok(NodeContext {
        node_name,
        node_addresses,
    })
}
