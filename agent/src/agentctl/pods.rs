//! `agentctl pods`: every pod the machine holds, put together from each place the agent
//! leaves a pod's traces: containerd containers (by their pod labels), sandboxes under
//! the run directory, pod cgroups, the CNI result cache and volume directories. A pod
//! known to only some of them is shown with the others named as missing, which is how
//! a leak (a sandbox, an address, a cgroup nobody owns any more) becomes visible.
//!
//! Gathering reads (and only reads) each source; [`merge`] is pure and does the rest.
//! A source that cannot be read is reported as unreadable, never as "missing" for every
//! pod, and makes the command exit with 1 after printing what the other sources hold.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use serde::Serialize;

use super::node::{CgroupUsage, NodeFlags, PodCgroupFacts, pod_cgroups};
use super::table::{self, Table};
use super::{Format, print_json};
use crate::cni;
use crate::containerd::api::{ListContainersRequest, ListTasksRequest};
use crate::containerd::{call_error, types::v1::Status};
use crate::pods::model::labels::{self, EXIT_CODE, EXIT_REASON, FINISHED_AT, STARTED_AT};

/// How long all of containerd's answers together may take.
const CONTAINERD_TIMEOUT: Duration = Duration::from_secs(20);

/// The `CNI_ARGS` keys the agent passes with a pod's namespace and name.
const CNI_ARG_NAMESPACE: &str = "K8S_POD_NAMESPACE";
const CNI_ARG_NAME: &str = "K8S_POD_NAME";

/// Where a pod's traces are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// containerd containers labelled with the pod's UID.
    Containers,
    /// `<run_dir>/pods/<uid>`: the pinned namespaces and pod files.
    Sandbox,
    /// `kubepods[/<tier>]/pod<uid>` under the agent's cgroup subtree.
    Cgroup,
    /// CNI result cache entries whose container ID is the pod's UID.
    Network,
    /// `<state_dir>/pods/<uid>`: the pod's volumes (a pod without volumes has none, so
    /// it is never reported missing).
    Volumes,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Containers => "containers",
            Source::Sandbox => "sandbox",
            Source::Cgroup => "cgroup",
            Source::Network => "network",
            Source::Volumes => "volumes",
        }
    }
}

/// A containerd container of a pod and its task, as containerd holds them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerFacts {
    pub id: String,
    pub labels: HashMap<String, String>,
    /// The image record the container was created from.
    pub image: String,
    pub task: Option<TaskFacts>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskFacts {
    /// containerd's `Status` (created, running, stopped, paused ...).
    pub status: i32,
    pub pid: u32,
    pub exit_status: u32,
}

/// A sandbox directory under the run directory.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxFacts {
    pub uid: String,
    pub dir: PathBuf,
    /// Every namespace the sandbox owns is pinned.
    pub complete: bool,
    /// The network namespace's bind mount, when the sandbox is complete and owns one.
    pub netns: Option<PathBuf>,
    /// A complete sandbox without a network namespace: a `hostNetwork` pod's, on the
    /// node's network and with no CNI attachment.
    pub host_network: bool,
}

/// A cached CNI attachment (an ADD with no DEL since).
#[derive(Debug, Clone, PartialEq)]
pub struct AttachmentFacts {
    pub network: String,
    /// `CNI_CONTAINERID`, the pod UID for the agent's attachments.
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<PathBuf>,
    pub ips: Vec<IpAddr>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

/// Everything read from the node; `Err` holds why a source could not be read.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub containers: Result<Vec<ContainerFacts>, String>,
    pub sandboxes: Result<Vec<SandboxFacts>, String>,
    pub cgroups: Result<Vec<PodCgroupFacts>, String>,
    pub attachments: Result<Vec<AttachmentFacts>, String>,
    pub volumes: Result<Vec<(String, PathBuf)>, String>,
    /// The network of the CNI configuration directory, if it is readable.
    pub configured_network: Option<String>,
}

/// The report `agentctl pods -o json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodsReport {
    pub pods: Vec<PodView>,
    /// Sources that could not be read; their absence from a pod says nothing.
    pub unreadable: Vec<Unreadable>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unreadable {
    pub source: Source,
    pub error: String,
}

/// One pod as the node holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    pub uid: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// From the pod cgroup's tier: Guaranteed, Burstable or BestEffort.
    pub qos_class: Option<String>,
    /// The pod's addresses: those of `eth0` in the CNI cache.
    pub ips: Vec<String>,
    pub netns: Option<PathBuf>,
    /// The pod shares the node's network namespace (its sandbox has none of its own).
    pub host_network: bool,
    pub sandbox_dir: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub memory_current_bytes: Option<u64>,
    pub cpu_usage_usec: Option<u64>,
    pub volumes_dir: Option<PathBuf>,
    pub networks: Vec<NetworkView>,
    /// Every container instance, init containers first, then by name and attempt.
    pub containers: Vec<ContainerView>,
    /// The readable sources that hold nothing of this pod.
    pub missing: Vec<Source>,
    /// Inconsistencies between the sources, one sentence each.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkView {
    pub network: String,
    pub ifname: String,
    pub ips: Vec<String>,
    pub netns: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    pub name: String,
    /// "init" or "app".
    pub kind: String,
    pub attempt: u32,
    /// "running", "exited", "created", "paused" or "unknown".
    pub state: String,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub pid: Option<u32>,
    pub containerd_id: String,
    pub image: String,
    pub image_id: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The container cgroup, given to the newest instance of each container.
    pub cgroup: Option<PathBuf>,
    pub memory_current_bytes: Option<u64>,
    pub cpu_usage_usec: Option<u64>,
}

pub async fn run(flags: &NodeFlags, format: Format) -> anyhow::Result<()> {
    let facts = gather(flags).await;
    let report = merge(facts);
    match format {
        Format::Json => print_json(&report)?,
        Format::Table => print!("{}", render(&report)),
    }
    if report.unreadable.is_empty() {
        Ok(())
    } else {
        let errors: Vec<&str> = report.unreadable.iter().map(|u| u.error.as_str()).collect();
        Err(anyhow!("{}", errors.join("; ")))
    }
}

/// Reads every source; none of them is changed.
pub async fn gather(flags: &NodeFlags) -> NodeFacts {
    let containers = match tokio::time::timeout(CONTAINERD_TIMEOUT, gather_containers(flags)).await
    {
        Ok(result) => result.map_err(|e| format!("{e:#}")),
        Err(_) => Err(format!(
            "containerd at {}: no answer within {} s",
            flags.containerd_socket.display(),
            CONTAINERD_TIMEOUT.as_secs()
        )),
    };
    let cgroups = flags
        .cgroups()
        .and_then(|cgroups| pod_cgroups(&cgroups))
        .map_err(|e| format!("pod cgroups: {e}"));
    NodeFacts {
        containers,
        sandboxes: gather_sandboxes(flags),
        cgroups,
        attachments: gather_attachments(flags),
        volumes: gather_volumes(flags),
        configured_network: cni::load_config_dir(&flags.cni_conf_dir)
            .ok()
            .map(|network| network.name),
    }
}

async fn gather_containers(flags: &NodeFlags) -> anyhow::Result<Vec<ContainerFacts>> {
    let client = flags.containerd().await?;
    let socket = flags.containerd_socket.display();
    let request = ListContainersRequest {
        filters: vec![format!("labels.\"{}\"", labels::POD_UID)],
    };
    let containers = client
        .containers()
        .list(request)
        .await
        .map_err(call_error("Containers.List"))
        .map_err(|e| anyhow!("containerd at {socket}: {e}"))?
        .into_inner()
        .containers;
    let tasks = client
        .tasks()
        .list(ListTasksRequest {
            filter: String::new(),
        })
        .await
        .map_err(call_error("Tasks.List"))
        .map_err(|e| anyhow!("containerd at {socket}: {e}"))?
        .into_inner()
        .tasks;
    // containerd names a task's container in `id` (and leaves `container_id` empty).
    let mut tasks: HashMap<String, TaskFacts> = tasks
        .into_iter()
        .map(|process| {
            let id = if process.container_id.is_empty() {
                process.id
            } else {
                process.container_id
            };
            let task = TaskFacts {
                status: process.status,
                pid: process.pid,
                exit_status: process.exit_status,
            };
            (id, task)
        })
        .collect();
    Ok(containers
        .into_iter()
        .map(|container| ContainerFacts {
            task: tasks.remove(&container.id),
            id: container.id,
            labels: container.labels,
            image: container.image,
        })
        .collect())
}

fn gather_sandboxes(flags: &NodeFlags) -> Result<Vec<SandboxFacts>, String> {
    let run_dir = &flags.run_dir;
    let uids = crate::sandbox::list(run_dir)
        .map_err(|e| format!("sandboxes under {}: {e}", run_dir.display()))?;
    let mut sandboxes = Vec::with_capacity(uids.len());
    for uid in uids {
        let sandbox = crate::sandbox::open(run_dir, &uid)
            .map_err(|e| format!("sandbox {uid} under {}: {e}", run_dir.display()))?;
        sandboxes.push(SandboxFacts {
            dir: run_dir.join("pods").join(&uid),
            uid,
            complete: sandbox.is_some(),
            netns: sandbox.as_ref().and_then(|s| s.own_netns_path()),
            host_network: sandbox
                .as_ref()
                .is_some_and(|s| !s.owns(crate::sandbox::Namespace::Net)),
        });
    }
    Ok(sandboxes)
}

fn gather_attachments(flags: &NodeFlags) -> Result<Vec<AttachmentFacts>, String> {
    let cache_dir = cni::cni_cache_dir(&flags.run_dir);
    // No plugin is run: the runtime only reads its cache here.
    let runtime = cni::Runtime::new(Vec::new(), &cache_dir);
    let cached = runtime
        .cached_attachments()
        .map_err(|e| format!("CNI result cache under {}: {e}", cache_dir.display()))?;
    Ok(cached
        .into_iter()
        .map(|entry| {
            let arg = |key: &str| {
                entry
                    .attachment
                    .cni_args
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
            };
            AttachmentFacts {
                ips: entry.result.sandbox_ips(&entry.attachment.ifname),
                pod_namespace: arg(CNI_ARG_NAMESPACE),
                pod_name: arg(CNI_ARG_NAME),
                network: entry.network.name,
                container_id: entry.attachment.container_id,
                ifname: entry.attachment.ifname,
                netns: entry.attachment.netns,
            }
        })
        .collect())
}

fn gather_volumes(flags: &NodeFlags) -> Result<Vec<(String, PathBuf)>, String> {
    let pods = flags.state_dir.join("pods");
    let entries = match std::fs::read_dir(&pods) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("pod volumes: read {}: {e}", pods.display())),
    };
    let mut volumes: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| {
            let uid = entry.file_name().to_string_lossy().into_owned();
            let dir = crate::pods::volumes::pod_dir(&flags.state_dir, &uid);
            (uid, dir)
        })
        .collect();
    volumes.sort();
    Ok(volumes)
}

/// Puts the sources together, one [`PodView`] per pod UID any of them knows.
pub fn merge(facts: NodeFacts) -> PodsReport {
    let mut pods: BTreeMap<String, PodView> = BTreeMap::new();
    let mut unreadable = Vec::new();
    let mut readable = BTreeSet::new();
    let mut seen: BTreeMap<String, BTreeSet<Source>> = BTreeMap::new();
    // The pod `uid`, created on first sight, with `source` recorded as knowing it.
    fn pod<'a>(
        pods: &'a mut BTreeMap<String, PodView>,
        seen: &mut BTreeMap<String, BTreeSet<Source>>,
        uid: &str,
        source: Source,
    ) -> &'a mut PodView {
        seen.entry(uid.to_string()).or_default().insert(source);
        pods.entry(uid.to_string()).or_insert_with(|| PodView {
            uid: uid.to_string(),
            ..PodView::default()
        })
    }

    for (source, error) in [
        (Source::Containers, facts.containers.as_ref().err()),
        (Source::Sandbox, facts.sandboxes.as_ref().err()),
        (Source::Cgroup, facts.cgroups.as_ref().err()),
        (Source::Network, facts.attachments.as_ref().err()),
        (Source::Volumes, facts.volumes.as_ref().err()),
    ] {
        match error {
            None => {
                readable.insert(source);
            }
            Some(error) => unreadable.push(Unreadable {
                source,
                error: error.clone(),
            }),
        }
    }

    for container in facts.containers.iter().flatten() {
        let Some(uid) = container.labels.get(labels::POD_UID) else {
            continue;
        };
        let view = pod(&mut pods, &mut seen, uid, Source::Containers);
        let label = |key: &str| container.labels.get(key).cloned();
        if view.namespace.is_none() {
            view.namespace = label(labels::POD_NAMESPACE);
            view.name = label(labels::POD_NAME);
        }
        view.containers.push(container_view(container));
    }
    for sandbox in facts.sandboxes.iter().flatten() {
        let view = pod(&mut pods, &mut seen, &sandbox.uid, Source::Sandbox);
        view.sandbox_dir = Some(sandbox.dir.clone());
        view.netns = sandbox.netns.clone();
        view.host_network = sandbox.host_network;
        if !sandbox.complete {
            view.problems.push(format!(
                "the sandbox at {} is incomplete: not all of its namespaces are pinned",
                sandbox.dir.display()
            ));
        }
    }
    for cgroup in facts.cgroups.iter().flatten() {
        let view = pod(&mut pods, &mut seen, cgroup.cgroup.uid(), Source::Cgroup);
        view.qos_class = Some(cgroup.cgroup.qos().as_str().to_string());
        view.cgroup = Some(cgroup.dir.clone());
        view.memory_current_bytes = cgroup.usage.memory_current;
        view.cpu_usage_usec = cgroup.usage.cpu_usage_usec;
        attach_container_cgroups(view, &cgroup.containers);
    }
    for attachment in facts.attachments.iter().flatten() {
        let view = pod(
            &mut pods,
            &mut seen,
            &attachment.container_id,
            Source::Network,
        );
        if view.namespace.is_none() {
            view.namespace = attachment.pod_namespace.clone();
            view.name = attachment.pod_name.clone();
        }
        let ips: Vec<String> = attachment.ips.iter().map(ToString::to_string).collect();
        let configured = facts
            .configured_network
            .as_deref()
            .is_none_or(|name| name == attachment.network);
        if attachment.ifname == cni::POD_IFNAME && (configured || view.ips.is_empty()) {
            view.ips = ips.clone();
        }
        if !configured {
            view.problems.push(format!(
                "attached to network {} (interface {}), which is not the configured network {}",
                attachment.network,
                attachment.ifname,
                facts.configured_network.as_deref().unwrap_or_default()
            ));
        }
        if view.host_network {
            view.problems.push(format!(
                "the pod is on the node's network, yet network {} holds an attachment for it",
                attachment.network
            ));
        }
        if let (Some(cached), Some(netns)) = (&attachment.netns, &view.netns)
            && cached != netns
        {
            view.problems.push(format!(
                "the CNI cache of network {} names network namespace {}, the sandbox's is {}",
                attachment.network,
                cached.display(),
                netns.display()
            ));
        }
        view.networks.push(NetworkView {
            network: attachment.network.clone(),
            ifname: attachment.ifname.clone(),
            ips,
            netns: attachment.netns.clone(),
        });
    }
    for (uid, dir) in facts.volumes.iter().flatten() {
        pod(&mut pods, &mut seen, uid, Source::Volumes).volumes_dir = Some(dir.clone());
    }

    let mut pods: Vec<PodView> = pods.into_values().collect();
    for view in &mut pods {
        let mut present = seen.get(&view.uid).cloned().unwrap_or_default();
        if view.host_network {
            // A host-network pod is never attached: no address in the CNI cache is right.
            present.insert(Source::Network);
        }
        view.missing = [
            Source::Containers,
            Source::Sandbox,
            Source::Cgroup,
            Source::Network,
        ]
        .into_iter()
        .filter(|source| readable.contains(source) && !present.contains(source))
        .collect();
        view.containers
            .sort_by_key(|c| (c.kind != "init", c.name.clone(), c.attempt));
        // The container cgroups were given by name before the instances were sorted.
        keep_cgroup_on_newest(view);
    }
    pods.sort_by(|a, b| {
        let key = |p: &PodView| (p.namespace.is_none(), p.namespace.clone(), p.name.clone());
        key(a).cmp(&key(b)).then_with(|| a.uid.cmp(&b.uid))
    });
    PodsReport { pods, unreadable }
}

fn container_view(container: &ContainerFacts) -> ContainerView {
    let label = |key: &str| container.labels.get(key).cloned();
    let mut view = ContainerView {
        name: label(labels::CONTAINER_NAME).unwrap_or_default(),
        kind: label(labels::CONTAINER_KIND).unwrap_or_else(|| "app".to_string()),
        attempt: label(labels::ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0),
        containerd_id: container.id.clone(),
        image: label(labels::IMAGE).unwrap_or_else(|| container.image.clone()),
        image_id: label(labels::IMAGE_ID),
        started_at: label(STARTED_AT),
        ..ContainerView::default()
    };
    // The agent records an exit in the labels and deletes the task; a stopped task
    // whose exit it has not recorded yet tells the same from containerd.
    if let Some(code) = label(EXIT_CODE).and_then(|c| c.parse().ok()) {
        view.state = "exited".to_string();
        view.exit_code = Some(code);
        view.reason = label(EXIT_REASON);
        view.finished_at = label(FINISHED_AT);
        return view;
    }
    let (state, pid) = match &container.task {
        None => ("created", None),
        Some(task) => match Status::try_from(task.status) {
            Ok(Status::Running) => ("running", Some(task.pid)),
            Ok(Status::Created) => ("created", Some(task.pid)),
            Ok(Status::Stopped) => {
                view.exit_code = Some(task.exit_status as i32);
                ("exited", None)
            }
            Ok(Status::Paused | Status::Pausing) => ("paused", Some(task.pid)),
            Ok(Status::Unknown) | Err(_) => ("unknown", None),
        },
    };
    view.state = state.to_string();
    view.pid = pid.filter(|&pid| pid > 0);
    view
}

/// Gives each container cgroup (by name) to the instances of that name; the newest one
/// keeps it in [`keep_cgroup_on_newest`].
fn attach_container_cgroups(view: &mut PodView, cgroups: &[(String, PathBuf, CgroupUsage)]) {
    for (name, dir, usage) in cgroups {
        for container in view.containers.iter_mut().filter(|c| &c.name == name) {
            container.cgroup = Some(dir.clone());
            container.memory_current_bytes = usage.memory_current;
            container.cpu_usage_usec = usage.cpu_usage_usec;
        }
    }
}

/// A container cgroup is per name, not per instance: only the newest attempt keeps it.
fn keep_cgroup_on_newest(view: &mut PodView) {
    let mut newest: HashMap<(String, String), u32> = HashMap::new();
    for container in &view.containers {
        let key = (container.kind.clone(), container.name.clone());
        let attempt = newest.entry(key).or_insert(container.attempt);
        *attempt = (*attempt).max(container.attempt);
    }
    for container in &mut view.containers {
        let key = (container.kind.clone(), container.name.clone());
        if newest.get(&key) != Some(&container.attempt) {
            container.cgroup = None;
            container.memory_current_bytes = None;
            container.cpu_usage_usec = None;
        }
    }
}

/// The report as blocks, one per pod, each with a table of its containers.
pub fn render(report: &PodsReport) -> String {
    let mut out = String::new();
    if report.pods.is_empty() {
        out.push_str(if report.unreadable.is_empty() {
            "no pods on this node\n"
        } else {
            "no pods in the sources that could be read\n"
        });
    }
    for (i, pod) in report.pods.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let title = match (&pod.namespace, &pod.name) {
            (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
            _ => "<unknown pod>".to_string(),
        };
        out.push_str(&format!("POD {title}\n"));
        let mut fields: Vec<(&str, String)> = vec![
            ("uid", pod.uid.clone()),
            ("qos", table::or_none(pod.qos_class.as_deref())),
            (
                "ips",
                table::or_none(Some(pod.ips.join(", ")).filter(|s| !s.is_empty())),
            ),
            (
                "netns",
                if pod.host_network {
                    "node's (hostNetwork)".to_string()
                } else {
                    table::or_none(pod.netns.as_ref().map(|p| p.display()))
                },
            ),
            (
                "cgroup",
                table::or_none(pod.cgroup.as_ref().map(|p| p.display())),
            ),
        ];
        if pod.cgroup.is_some() {
            fields.push((
                "usage",
                usage_text(pod.memory_current_bytes, pod.cpu_usage_usec),
            ));
        }
        if let Some(dir) = &pod.volumes_dir {
            fields.push(("volumes", dir.display().to_string()));
        }
        if !pod.missing.is_empty() {
            let names: Vec<&str> = pod.missing.iter().map(|s| s.name()).collect();
            let mut text = names.join(", ");
            let finished = !pod.containers.is_empty()
                && pod.containers.iter().all(|c| c.state == "exited")
                && [Source::Sandbox, Source::Cgroup, Source::Network]
                    .iter()
                    .all(|s| pod.missing.contains(s));
            if finished {
                text.push_str(" (every container exited: a finished pod keeps only those)");
            }
            fields.push(("MISSING", text));
        }
        for problem in &pod.problems {
            fields.push(("PROBLEM", problem.clone()));
        }
        let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
        for (key, value) in fields {
            out.push_str(&format!("  {:<width$} {value}\n", format!("{key}:")));
        }
        if !pod.containers.is_empty() {
            let mut containers = Table::new(&[
                "CONTAINER",
                "ATTEMPT",
                "STATE",
                "CONTAINERD ID",
                "IMAGE",
                "MEMORY",
                "CPU",
            ]);
            for container in &pod.containers {
                let name = if container.kind == "init" {
                    format!("{} (init)", container.name)
                } else {
                    container.name.clone()
                };
                let state = match (container.exit_code, &container.reason) {
                    (Some(code), Some(reason)) if !reason.is_empty() => {
                        format!("exited {code} ({reason})")
                    }
                    (Some(code), _) => format!("exited {code}"),
                    (None, _) => container.state.clone(),
                };
                containers.row(vec![
                    name,
                    container.attempt.to_string(),
                    state,
                    container.containerd_id.clone(),
                    container.image.clone(),
                    table::or_none(container.memory_current_bytes.map(table::bytes)),
                    table::or_none(container.cpu_usage_usec.map(table::cpu_time)),
                ]);
            }
            out.push_str(&containers.render("  "));
        }
    }
    out
}

fn usage_text(memory: Option<u64>, cpu_usec: Option<u64>) -> String {
    format!(
        "memory {}, cpu {}",
        table::or_none(memory.map(table::bytes)),
        table::or_none(cpu_usec.map(table::cpu_time))
    )
}

#[cfg(test)]
mod tests {
    use crate::cgroups::{PodCgroup, QosClass};

    use super::*;

    fn container(uid: &str, name: &str, attempt: u32, task: Option<TaskFacts>) -> ContainerFacts {
        let labels = [
            (labels::POD_UID, uid),
            (labels::POD_NAMESPACE, "default"),
            (labels::POD_NAME, "web"),
            (labels::CONTAINER_NAME, name),
            (labels::CONTAINER_KIND, "app"),
            (labels::ATTEMPT, &attempt.to_string()),
            (labels::IMAGE, "skiff.test/busybox:1"),
            (labels::IMAGE_ID, "sha256:c0ffee"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        ContainerFacts {
            id: format!("{name}-{attempt}"),
            labels,
            image: "skiff.test/busybox:1".into(),
            task,
        }
    }

    fn running(pid: u32) -> Option<TaskFacts> {
        Some(TaskFacts {
            status: Status::Running as i32,
            pid,
            exit_status: 0,
        })
    }

    fn cgroup(uid: &str, containers: &[&str]) -> PodCgroupFacts {
        let dir = PathBuf::from(format!("/cg/kubepods/burstable/pod{uid}"));
        PodCgroupFacts {
            cgroup: PodCgroup::new(QosClass::Burstable, uid).unwrap(),
            usage: CgroupUsage {
                memory_current: Some(8192),
                cpu_usage_usec: Some(1500),
            },
            containers: containers
                .iter()
                .map(|name| {
                    let usage = CgroupUsage {
                        memory_current: None,
                        cpu_usage_usec: Some(700),
                    };
                    (name.to_string(), dir.join(name), usage)
                })
                .collect(),
            dir,
        }
    }

    fn sandbox(uid: &str, complete: bool) -> SandboxFacts {
        let dir = PathBuf::from(format!("/run/skiff/pods/{uid}"));
        SandboxFacts {
            uid: uid.into(),
            complete,
            netns: complete.then(|| dir.join("ns/net")),
            host_network: false,
            dir,
        }
    }

    fn attachment(uid: &str, network: &str, ip: &str) -> AttachmentFacts {
        AttachmentFacts {
            network: network.into(),
            container_id: uid.into(),
            ifname: "eth0".into(),
            netns: Some(PathBuf::from(format!("/run/skiff/pods/{uid}/ns/net"))),
            ips: vec![ip.parse().unwrap()],
            pod_namespace: Some("kube-system".into()),
            pod_name: Some("dns".into()),
        }
    }

    fn facts() -> NodeFacts {
        NodeFacts {
            containers: Ok(Vec::new()),
            sandboxes: Ok(Vec::new()),
            cgroups: Ok(Vec::new()),
            attachments: Ok(Vec::new()),
            volumes: Ok(Vec::new()),
            configured_network: Some("pods".into()),
        }
    }

    #[test]
    fn a_whole_pod_has_nothing_missing() {
        let mut exited = container("u1", "app", 0, None);
        exited
            .labels
            .insert(EXIT_CODE.to_string(), "137".to_string());
        exited
            .labels
            .insert(EXIT_REASON.to_string(), "OOMKilled".to_string());
        let report = merge(NodeFacts {
            containers: Ok(vec![container("u1", "app", 1, running(42)), exited]),
            sandboxes: Ok(vec![sandbox("u1", true)]),
            cgroups: Ok(vec![cgroup("u1", &["app"])]),
            attachments: Ok(vec![attachment("u1", "pods", "10.0.0.5")]),
            volumes: Ok(vec![("u1".into(), "/var/lib/skiff/agent/pods/u1".into())]),
            ..facts()
        });
        assert!(report.unreadable.is_empty());
        let [pod] = report.pods.as_slice() else {
            panic!("{report:#?}")
        };
        assert_eq!(pod.missing, []);
        assert_eq!(pod.problems, Vec::<String>::new());
        // The containers' labels name the pod before the CNI arguments do.
        assert_eq!(
            (pod.namespace.as_deref(), pod.name.as_deref()),
            (Some("default"), Some("web"))
        );
        assert_eq!(pod.qos_class.as_deref(), Some("Burstable"));
        assert_eq!(pod.ips, ["10.0.0.5"]);
        assert_eq!(
            pod.netns.as_deref(),
            Some(std::path::Path::new("/run/skiff/pods/u1/ns/net"))
        );
        assert_eq!(pod.memory_current_bytes, Some(8192));
        let summary: Vec<_> = pod
            .containers
            .iter()
            .map(|c| {
                (
                    c.attempt,
                    c.state.as_str(),
                    c.exit_code,
                    c.pid,
                    c.cpu_usage_usec,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (0, "exited", Some(137), None, None),
                (1, "running", None, Some(42), Some(700)),
            ]
        );
        assert_eq!(pod.containers[0].reason.as_deref(), Some("OOMKilled"));
        let text = render(&report);
        assert!(text.starts_with("POD default/web\n"), "{text}");
        assert!(text.contains("exited 137 (OOMKilled)"), "{text}");
        assert!(!text.contains("MISSING"), "{text}");
    }

    #[test]
    fn leaked_pieces_are_listed_with_what_is_missing() {
        let report = merge(NodeFacts {
            sandboxes: Ok(vec![sandbox("lone-sandbox", false)]),
            cgroups: Ok(vec![cgroup("lone-cgroup", &[])]),
            attachments: Ok(vec![attachment("lone-address", "old-net", "10.0.0.9")]),
            ..facts()
        });
        let by_uid: BTreeMap<&str, &PodView> =
            report.pods.iter().map(|p| (p.uid.as_str(), p)).collect();
        let sandbox_only = by_uid["lone-sandbox"];
        assert_eq!(
            sandbox_only.missing,
            [Source::Containers, Source::Cgroup, Source::Network]
        );
        assert!(sandbox_only.problems[0].contains("incomplete"));
        assert_eq!(
            by_uid["lone-cgroup"].missing,
            [Source::Containers, Source::Sandbox, Source::Network]
        );
        let address = by_uid["lone-address"];
        assert_eq!(
            address.missing,
            [Source::Containers, Source::Sandbox, Source::Cgroup]
        );
        // The CNI arguments name a pod no other source names; the address is still its IP.
        assert_eq!(address.name.as_deref(), Some("dns"));
        assert_eq!(address.ips, ["10.0.0.9"]);
        assert!(
            address.problems[0].contains("not the configured network pods"),
            "{:?}",
            address.problems
        );
        // Named pods first.
        assert_eq!(report.pods[0].uid, "lone-address");
        let text = render(&report);
        assert!(
            text.contains("MISSING: containers, cgroup, network"),
            "{text}"
        );
    }

    #[test]
    fn an_unreadable_source_is_not_missing_everywhere() {
        let report = merge(NodeFacts {
            containers: Err("containerd at /x.sock: connection refused".into()),
            sandboxes: Ok(vec![sandbox("u1", true)]),
            cgroups: Ok(vec![cgroup("u1", &["app"])]),
            attachments: Ok(vec![attachment("u1", "pods", "10.0.0.5")]),
            ..facts()
        });
        assert_eq!(
            report.unreadable,
            [Unreadable {
                source: Source::Containers,
                error: "containerd at /x.sock: connection refused".into()
            }]
        );
        assert_eq!(report.pods.len(), 1);
        assert_eq!(report.pods[0].missing, []);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["unreadable"][0]["source"], "containers");
        assert_eq!(json["pods"][0]["ips"][0], "10.0.0.5");
        assert_eq!(json["pods"][0]["qosClass"], "Burstable");
    }

    #[test]
    fn a_finished_pod_is_told_apart_from_a_leak() {
        let mut done = container("u1", "job", 0, None);
        done.labels.insert(EXIT_CODE.to_string(), "0".to_string());
        let report = merge(NodeFacts {
            containers: Ok(vec![done]),
            ..facts()
        });
        let pod = &report.pods[0];
        assert_eq!(
            pod.missing,
            [Source::Sandbox, Source::Cgroup, Source::Network]
        );
        assert!(render(&report).contains("a finished pod keeps only those"));
    }

    #[test]
    fn task_states() {
        let state = |task: Option<TaskFacts>| {
            let view = container_view(&container("u", "c", 0, task));
            (view.state, view.exit_code, view.pid)
        };
        assert_eq!(state(running(7)), ("running".into(), None, Some(7)));
        assert_eq!(state(None), ("created".into(), None, None));
        let stopped = TaskFacts {
            status: Status::Stopped as i32,
            pid: 7,
            exit_status: 3,
        };
        assert_eq!(state(Some(stopped)), ("exited".into(), Some(3), None));
        let odd = TaskFacts {
            status: 99,
            ..TaskFacts::default()
        };
        assert_eq!(state(Some(odd)), ("unknown".into(), None, None));
        assert_eq!(render(&merge(facts())), "no pods on this node\n");
    }

    #[test]
    fn a_host_network_pod_misses_no_network() {
        let host = SandboxFacts {
            netns: None,
            host_network: true,
            ..sandbox("u1", true)
        };
        let report = merge(NodeFacts {
            containers: Ok(vec![container("u1", "app", 0, running(42))]),
            sandboxes: Ok(vec![host.clone()]),
            cgroups: Ok(vec![cgroup("u1", &["app"])]),
            ..facts()
        });
        let pod = &report.pods[0];
        assert_eq!(pod.missing, []);
        assert_eq!(pod.problems, Vec::<String>::new());
        assert!(pod.host_network);
        assert_eq!(pod.netns, None);
        let text = render(&report);
        assert!(text.contains("netns:  node's (hostNetwork)"), "{text}");
        assert!(!text.contains("MISSING"), "{text}");
        assert_eq!(
            serde_json::to_value(&report).unwrap()["pods"][0]["hostNetwork"],
            true
        );

        // An attachment for such a pod is a leak of its own.
        let report = merge(NodeFacts {
            sandboxes: Ok(vec![host]),
            attachments: Ok(vec![attachment("u1", "pods", "10.0.0.5")]),
            ..facts()
        });
        assert!(
            report.pods[0].problems[0].contains("on the node's network"),
            "{:?}",
            report.pods[0].problems
        );
    }
}
