//! Where the node's state is: the agent's location flags with the agent's defaults, the
//! containerd connection with errors that name the socket, and a read-only view of the
//! agent's pod cgroups.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;

use crate::cgroups::{
    CgroupConfig, CgroupError, CgroupManager, PodCgroup, Usage, find_cgroup2_mount, own_cgroup_v2,
};
use crate::containerd::{self, Client};

/// How long containerd may take to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the agent keeps what it runs: the same flags, with the same defaults, as
/// `skiff-agent run` (`config::AgentConfig`).
#[derive(Args, Debug, Clone)]
pub struct NodeFlags {
    /// containerd's gRPC socket.
    #[arg(long, global = true, default_value = containerd::DEFAULT_SOCKET)]
    pub containerd_socket: PathBuf,
    /// The containerd namespace the agent keeps its containers and images in.
    #[arg(long, global = true, default_value = containerd::DEFAULT_NAMESPACE)]
    pub containerd_namespace: String,
    /// The agent's runtime state: pod namespaces, sandboxes, CNI result cache.
    #[arg(long, global = true, default_value = "/run/skiff")]
    pub run_dir: PathBuf,
    /// The agent's persistent state: volumes of pods.
    #[arg(long, global = true, default_value = "/var/lib/skiff/agent")]
    pub state_dir: PathBuf,
    /// The agent's cgroup subtree, relative to the cgroup2 mount (default: as the agent
    /// finds it, the cgroup this process runs in; give the agent's `--cgroup-root` or its
    /// unit's cgroup when agentctl runs elsewhere, e.g. from a login shell).
    #[arg(long, global = true)]
    pub cgroup_root: Option<PathBuf>,
    /// Directory of CNI network configurations (the first one is the pods' network).
    #[arg(long, global = true, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Where the agent pins the load balancer's maps (its `--bpffs-dir`).
    #[arg(long, global = true, default_value = "/sys/fs/bpf/skiff")]
    pub bpffs_dir: PathBuf,
    /// The kubeconfig for `explain` (default: as kubectl finds one).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, for `explain` (default: the hostname, as the agent's default).
    #[arg(long, global = true)]
    pub node_name: Option<String>,
}

impl NodeFlags {
    /// Connects to containerd; the error names the socket and the reason in a few words
    /// (`containerd at /run/containerd/containerd.sock: connection refused`).
    pub async fn containerd(&self) -> anyhow::Result<Client> {
        let socket = &self.containerd_socket;
        let connect = Client::connect(socket, &self.containerd_namespace);
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(error)) => Err(anyhow!(
                "containerd at {}: {}",
                socket.display(),
                connect_reason(&error)
            )),
            Err(_) => Err(anyhow!(
                "containerd at {}: no answer within {} s",
                socket.display(),
                CONNECT_TIMEOUT.as_secs()
            )),
        }
    }

    /// The agent's cgroup subtree as the agent derives it (the cgroup2 mount from the
    /// mount table, the subtree from `--cgroup-root` or this process's own cgroup),
    /// opened read only: nothing is created and no controller enabled.
    pub fn cgroups(&self) -> Result<CgroupManager, CgroupError> {
        let mount = find_cgroup2_mount(Path::new("/proc/self/mountinfo"))?;
        let subtree = match &self.cgroup_root {
            Some(root) => root.clone(),
            None => own_cgroup_v2(Path::new("/proc/self/cgroup"))?,
        };
        CgroupManager::open_existing(CgroupConfig::new(mount.mount_point, subtree))
    }
}

/// Why a connection failed, in a few words: the OS error of the socket when there is one
/// (`connection refused`, `no such file or directory`), else the transport's own chain.
fn connect_reason(error: &containerd::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut chain = Vec::new();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return match io.raw_os_error() {
                Some(code) => lowercase_first(nix::errno::Errno::from_raw(code).desc()),
                None => io.to_string(),
            };
        }
        chain.push(cause.to_string());
        source = cause.source();
    }
    // The first link repeats the socket; the causes say why.
    chain.into_iter().skip(1).collect::<Vec<_>>().join(": ")
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// What a cgroup has used, from the files that exist (a controller that is not enabled
/// has no file there).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// `memory.current`, in bytes.
    pub memory_current: Option<u64>,
    /// `usage_usec` of `cpu.stat`, which every cgroup has.
    pub cpu_usage_usec: Option<u64>,
}

impl CgroupUsage {
    /// The usage the manager read; none when it could not be read (the cgroup was removed
    /// meanwhile, or a file held something unexpected).
    fn of(usage: Result<Usage, CgroupError>) -> Self {
        usage.map_or_else(
            |_| CgroupUsage::default(),
            |usage| CgroupUsage {
                memory_current: usage.memory_current,
                cpu_usage_usec: usage.cpu.map(|cpu| cpu.usage_usec),
            },
        )
    }
}

/// One pod cgroup found under the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroupFacts {
    pub cgroup: PodCgroup,
    pub dir: PathBuf,
    pub usage: CgroupUsage,
    /// Container cgroups by name.
    pub containers: Vec<(String, PathBuf, CgroupUsage)>,
}

/// Every pod cgroup of `cgroups` with its usage and its container cgroups, in the
/// manager's order (by tier, then UID).
pub fn pod_cgroups(cgroups: &CgroupManager) -> Result<Vec<PodCgroupFacts>, CgroupError> {
    let mut pods = Vec::new();
    for cgroup in cgroups.list_pods()? {
        let dir = cgroups.pod_dir(&cgroup);
        let containers = cgroups
            .list_containers(&cgroup)?
            .into_iter()
            .map(|name| {
                let usage = CgroupUsage::of(cgroups.container_usage(&cgroup, &name));
                (name.clone(), dir.join(name), usage)
            })
            .collect();
        pods.push(PodCgroupFacts {
            usage: CgroupUsage::of(cgroups.pod_usage(&cgroup)),
            cgroup,
            dir,
            containers,
        });
    }
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use crate::cgroups::QosClass;

    use super::*;

    #[test]
    fn lists_pod_cgroups_without_creating_anything() {
        let root = tempfile::tempdir().unwrap();
        // The interface files `CgroupManager::open_existing` reads on its way down.
        let cgroup = |relative: &str| {
            let dir = root.path().join(relative);
            std::fs::create_dir_all(&dir).unwrap();
            for file in ["cgroup.controllers", "cgroup.subtree_control"] {
                std::fs::write(dir.join(file), "cpu memory pids\n").unwrap();
            }
            dir
        };
        cgroup("");
        let open = || CgroupManager::open_existing(CgroupConfig::new(root.path(), "/skiff"));
        let error = open().unwrap_err().to_string();
        assert!(error.contains("find kubepods under"), "{error}");
        assert!(
            !root.path().join("skiff").exists(),
            "opening created the subtree"
        );

        cgroup("skiff");
        let kubepods = cgroup("skiff/kubepods");
        cgroup("skiff/kubepods/burstable");
        cgroup("skiff/kubepods/besteffort");
        let guaranteed = kubepods.join("poda");
        let burstable = kubepods.join("burstable/podb");
        std::fs::create_dir_all(guaranteed.join("app")).unwrap();
        std::fs::create_dir_all(&burstable).unwrap();
        std::fs::write(guaranteed.join("memory.current"), "4096\n").unwrap();
        std::fs::write(
            guaranteed.join("app/cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        )
        .unwrap();
        // Not pods: a tier directory's sibling file and a foreign directory.
        std::fs::write(kubepods.join("cpu.weight"), "100").unwrap();
        std::fs::create_dir_all(kubepods.join("other")).unwrap();

        let pods = pod_cgroups(&open().unwrap()).unwrap();
        let summary: Vec<_> = pods
            .iter()
            .map(|p| (p.cgroup.uid(), p.cgroup.qos(), p.dir.clone()))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", QosClass::Guaranteed, guaranteed.clone()),
                ("b", QosClass::Burstable, burstable.clone()),
            ]
        );
        assert_eq!(pods[0].usage.memory_current, Some(4096));
        assert_eq!(pods[0].usage.cpu_usage_usec, None);
        assert_eq!(pods[0].containers.len(), 1);
        let (name, dir, usage) = &pods[0].containers[0];
        assert_eq!((name.as_str(), dir), ("app", &guaranteed.join("app")));
        assert_eq!(usage.cpu_usage_usec, Some(1500));
        assert!(pods[1].containers.is_empty());
        // Nothing was enabled on the way.
        assert_eq!(
            std::fs::read_to_string(kubepods.join("cgroup.subtree_control")).unwrap(),
            "cpu memory pids\n"
        );
    }

    #[tokio::test]
    async fn connect_errors_name_the_socket_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sock");
        let flags = NodeFlags {
            containerd_socket: missing.clone(),
            containerd_namespace: "skiff".into(),
            run_dir: dir.path().into(),
            state_dir: dir.path().into(),
            cgroup_root: None,
            cni_conf_dir: dir.path().into(),
            bpffs_dir: dir.path().into(),
            kubeconfig: None,
            node_name: None,
        };
        let error = flags.containerd().await.unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "containerd at {}: no such file or directory",
                missing.display()
            )
        );

        // A socket file nobody listens on any more.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let flags = NodeFlags {
            containerd_socket: stale.clone(),
            ..flags
        };
        let error = flags.containerd().await.unwrap_err().to_string();
        assert_eq!(
            error,
            format!("containerd at {}: connection refused", stale.display())
        );
    }
}
