//! Hollow nodes: many simulated nodes in one process, as kubemark and KWOK make them, so
//! the control plane can be exercised at thousands of nodes on one machine.
//!
//! Each hollow node is a registered, Ready Node whose Lease in `kube-node-lease` is renewed
//! every few seconds. Pods bound to a hollow node are reported Running (phase, conditions,
//! a pod IP from the node's range, running container statuses) without any container, and
//! pods being deleted are removed at once, as a kubelet does once their containers stop.
//! One pod watch serves all hollow nodes; every write goes out with bounded concurrency.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, watcher};
use serde_json::json;
use tokio::sync::Semaphore;

/// The namespace node Leases live in.
const LEASE_NAMESPACE: &str = "kube-node-lease";
/// Hollow node `i` gets pod range `10.128.0.0/9 + i * 256` as a /24.
const MAX_NODES: usize = 32_768;

/// What `skiff-control sim` registers.
#[derive(Clone, Debug, clap::Args)]
pub struct SimOptions {
    /// How many hollow nodes to register.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Nodes are named PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "hollow-node")]
    pub name_prefix: String,
    /// CPU capacity and allocatable of each node.
    #[arg(long, default_value = "8")]
    pub cpu: String,
    /// Memory capacity and allocatable of each node.
    #[arg(long, default_value = "32Gi")]
    pub memory: String,
    /// Pod capacity of each node.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// Seconds between two renewals of a node's Lease (spread over the nodes).
    #[arg(long, default_value_t = 10)]
    pub lease_renew_seconds: u64,
    /// API requests in flight at most, for registration and for pod status updates.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Extra labels for every node, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            nodes: 100,
            name_prefix: "hollow-node".into(),
            cpu: "8".into(),
            memory: "32Gi".into(),
            max_pods: 110,
            lease_renew_seconds: 10,
            concurrency: 64,
            labels: Vec::new(),
        }
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {text:?}: expected KEY=VALUE"))
}

/// The line `run` prints on stdout once every node is registered.
pub const READY_LINE: &str = "skiff-control sim: registered";

fn node_name(options: &SimOptions, node_idx: usize) -> String {
    format!("{}-{node_idx}", options.name_prefix)
}

/// Node `i`'s InternalIP: 172.16.0.0/12 plus `i + 1`.
fn node_ip(node_idx: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + node_idx as u32 + 1)
}

/// Node `i`'s pod range, a /24 in 10.128.0.0/9.
fn pod_cidr_base(node_idx: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + ((node_idx as u32) << 8))
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn now_micro() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string()
}

fn node_object(options: &SimOptions, node_idx: usize) -> serde_json::Value {
    let name = node_name(options, node_idx);
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
        ("skiff.dev/hollow".to_string(), "true".to_string()),
    ]);
    labels.extend(options.labels.iter().cloned());
    let cidr = format!("{}/24", pod_cidr_base(node_idx));
    let resources = json!({
        "cpu": options.cpu,
        "memory": options.memory,
        "pods": options.max_pods.to_string(),
        "ephemeral-storage": "100Gi",
    });
    let now = now_rfc3339();
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": node_ip(node_idx).to_string()},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": format!("hollow-{node_idx}"),
                "containerRuntimeVersion": "hollow://0.1.0",
                "kernelVersion": "hollow",
                "kubeProxyVersion": "",
                "kubeletVersion": "v1.31.0-skiff-hollow",
                "machineID": format!("hollow-{node_idx}"),
                "operatingSystem": "linux",
                "osImage": "skiff hollow node",
                "systemUUID": format!("hollow-{node_idx}"),
            },
        },
    })
}

fn lease_object(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now_micro()},
    })
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

fn is_gone(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404 || status.code == 409)
}

/// Registers node `node_idx` (or marks it Ready again if it exists) and its Lease.
async fn register(
    client: kube::Client,
    options: &SimOptions,
    node_idx: usize,
) -> anyhow::Result<()> {
    let name = node_name(options, node_idx);
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(node_object(options, node_idx))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(error) if is_conflict(&error) => {
            let status = json!({"status": node_object(options, node_idx)["status"]});
            nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await
                .with_context(|| format!("mark node {name} Ready"))?;
        }
        Err(error) => return Err(error).with_context(|| format!("register node {name}")),
    }
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    let lease: Lease = serde_json::from_value(lease_object(&name))?;
    match leases.create(&PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(error) if is_conflict(&error) => renew(&leases, &name).await,
        Err(error) => Err(error).with_context(|| format!("create lease {name}")),
    }
}

async fn renew(leases: &Api<Lease>, name: &str) -> anyhow::Result<()> {
    let patch = json!({"spec": {"holderIdentity": name, "renewTime": now_micro()}});
    leases
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .with_context(|| format!("renew lease {name}"))?;
    Ok(())
}

/// Renews every node's Lease once per period, spread evenly over the period.
async fn renew_leases(client: kube::Client, options: SimOptions) {
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    let period = Duration::from_secs(options.lease_renew_seconds.max(1));
    // Ticks of at least 100 ms, each renewing the next share of the nodes.
    let ticks_per_period =
        (period.as_millis() / 100).clamp(1, options.nodes.max(1) as u128) as usize;
    let per_tick = options.nodes.div_ceil(ticks_per_period);
    let mut interval = tokio::time::interval(period / ticks_per_period as u32);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut next_idx = 0;
    loop {
        interval.tick().await;
        for _ in 0..per_tick {
            let name = node_name(&options, next_idx);
            next_idx = (next_idx + 1) % options.nodes;
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let leases = leases.clone();
            tokio::spawn(async move {
                if let Err(error) = renew(&leases, &name).await {
                    tracing::warn!(error = format!("{error:#}"), "hollow node lease");
                }
                drop(permit);
            });
        }
    }
}

/// What a hollow node does about one of its pods.
enum Action {
    Run { node_idx: usize, pod_ip: Ipv4Addr },
    Delete,
}

/// Registers the hollow nodes, then keeps their Leases fresh and their pods Running until
/// a watch fails for good. Prints [`READY_LINE`] on stdout once every node is registered.
pub async fn run(client: kube::Client, options: SimOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_NODES).contains(&options.nodes),
        "hollow nodes: --nodes must be between 1 and {MAX_NODES}"
    );
    let started = std::time::Instant::now();
    let registered = futures::stream::iter(0..options.nodes)
        .map(|node_idx| {
            let client = client.clone();
            let options = &options;
            async move { register(client, options, node_idx).await }
        })
        .buffer_unordered(options.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    for result in registered {
        result?;
    }
    tracing::info!(nodes = options.nodes, elapsed = ?started.elapsed(), "hollow nodes registered");
    println!("{READY_LINE} {} nodes", options.nodes);
    tokio::spawn(renew_leases(client.clone(), options.clone()));
    run_pods(client, options).await
}

/// Watches the pods bound to any node (one watch for all hollow nodes) and acts for those
/// on hollow nodes.
async fn run_pods(client: kube::Client, options: SimOptions) -> anyhow::Result<()> {
    let node_idx_of: HashMap<String, usize> = (0..options.nodes)
        .map(|i| (node_name(&options, i), i))
        .collect();
    let mut next_ip: Vec<u8> = vec![2; options.nodes];
    let in_progress: Arc<Mutex<HashSet<String>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let all_pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields("spec.nodeName!=");
    let mut events = watcher(all_pods, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(%error, "hollow nodes: pod watch failed; retrying");
                continue;
            }
        };
        let Some(node_idx) = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .and_then(|n| node_idx_of.get(n))
            .copied()
        else {
            continue;
        };
        let action = if pod.metadata.deletion_timestamp.is_some() {
            Action::Delete
        } else if needs_running(&pod) {
            let host = &mut next_ip[node_idx];
            let pod_ip = Ipv4Addr::from(u32::from(pod_cidr_base(node_idx)) + u32::from(*host));
            *host = if *host >= 254 { 2 } else { *host + 1 };
            Action::Run { node_idx, pod_ip }
        } else {
            continue;
        };
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let key = format!("{namespace}/{name}");
        if !in_progress
            .lock()
            .expect("in-progress set")
            .insert(key.clone())
        {
            continue;
        }
        let permit = permits.clone().acquire_owned().await?;
        let client = client.clone();
        let in_progress = in_progress.clone();
        tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(client, &namespace);
            let result = match action {
                Action::Run { node_idx, pod_ip } => {
                    let status = running_status(&pod, node_ip(node_idx), pod_ip);
                    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                        .await
                        .map(drop)
                }
                Action::Delete => {
                    let params = DeleteParams {
                        grace_period_seconds: Some(0),
                        preconditions: Some(Preconditions {
                            uid: pod.metadata.uid.clone(),
                            resource_version: None,
                        }),
                        ..DeleteParams::default()
                    };
                    pods.delete(&name, &params).await.map(drop)
                }
            };
            match result {
                Ok(()) => {}
                Err(error) if is_gone(&error) => {}
                Err(error) => tracing::warn!(pod = %key, %error, "hollow node pod update"),
            }
            in_progress.lock().expect("in-progress set").remove(&key);
            drop(permit);
        });
    }
    anyhow::bail!("hollow nodes: the pod watch ended")
}

/// A pod that is neither Running with Ready conditions nor finished.
fn needs_running(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return true;
    };
    match status.phase.as_deref() {
        Some("Succeeded" | "Failed") => false,
        Some("Running") => !status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        _ => true,
    }
}

/// The status a kubelet reports for a pod whose containers all started.
fn running_status(pod: &Pod, host_ip: Ipv4Addr, pod_ip: Ipv4Addr) -> serde_json::Value {
    let now = now_rfc3339();
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let containers: Vec<serde_json::Value> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            let image = c.image.clone().unwrap_or_default();
            json!({
                "name": c.name,
                "image": image,
                "imageID": format!("hollow://{image}"),
                "containerID": format!("hollow://{uid}/{}", c.name),
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    let condition = |kind: &str| json!({"type": kind, "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
    json!({"status": {
        "phase": "Running",
        "hostIP": host_ip.to_string(),
        "hostIPs": [{"ip": host_ip.to_string()}],
        "podIP": pod_ip.to_string(),
        "podIPs": [{"ip": pod_ip.to_string()}],
        "startTime": now,
        "conditions": [
            condition("PodReadyToStartContainers"),
            condition("Initialized"),
            condition("Ready"),
            condition("ContainersReady"),
            condition("PodScheduled"),
        ],
        "containerStatuses": containers,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_per_node() {
        assert_eq!(node_ip(0).to_string(), "172.16.0.1");
        assert_eq!(node_ip(300).to_string(), "172.16.1.45");
        assert_eq!(pod_cidr_base(0).to_string(), "10.128.0.0");
        assert_eq!(pod_cidr_base(257).to_string(), "10.129.1.0");
        assert_eq!(pod_cidr_base(MAX_NODES - 1).to_string(), "10.255.255.0");
    }

    #[test]
    fn node_objects_decode_as_nodes() {
        let options = SimOptions {
            labels: vec![("zone".into(), "a".into())],
            ..SimOptions::default()
        };
        let node: Node = serde_json::from_value(node_object(&options, 7)).unwrap();
        assert_eq!(node.metadata.name.as_deref(), Some("hollow-node-7"));
        let labels = node.metadata.labels.unwrap();
        assert_eq!(labels["kubernetes.io/hostname"], "hollow-node-7");
        assert_eq!(labels["zone"], "a");
        let status = node.status.unwrap();
        assert_eq!(status.allocatable.unwrap()["memory"].0, "32Gi");
        let lease: Lease = serde_json::from_value(lease_object("hollow-node-7")).unwrap();
        assert_eq!(lease.spec.unwrap().lease_duration_seconds, Some(40));
    }

    #[test]
    fn running_status_decodes_as_pod_status() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u"},
            "spec": {"containers": [{"name": "app", "image": "busybox"}]}
        }))
        .unwrap();
        assert!(needs_running(&pod));
        let status = running_status(&pod, node_ip(0), Ipv4Addr::new(10, 128, 0, 2));
        let mut running = pod.clone();
        running.status = Some(serde_json::from_value(status["status"].clone()).unwrap());
        assert!(!needs_running(&running));
        assert!(running.status.unwrap().container_statuses.unwrap()[0].ready);
    }
}
