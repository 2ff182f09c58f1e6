//! The agent's settings: every path, address and limit it uses, from flags (or their
//! environment variables), so that tests run several agents side by side on one machine.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Args;

/// How `skiff-agent run` is configured.
#[derive(Args, Debug, Clone)]
pub struct AgentConfig {
    /// The Node's name (default: the machine's hostname).
    #[arg(long, env = "SKIFF_NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubeconfig for the API server (default: the usual kube-rs discovery).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The address other nodes and the API server reach this node at (InternalIP).
    #[arg(long, env = "SKIFF_NODE_IP")]
    pub node_ip: Option<IpAddr>,
    /// The pod CIDR of this node, when the Node spec does not carry one.
    #[arg(long)]
    pub pod_cidr: Option<String>,
    /// Labels to register the Node with (`key=value`, repeatable).
    #[arg(long = "node-label", value_parser = parse_key_value)]
    pub node_labels: Vec<(String, String)>,

    /// containerd's gRPC socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub containerd_socket: PathBuf,
    /// The containerd namespace the agent keeps its containers and images in.
    #[arg(long, default_value = "skiff")]
    pub containerd_namespace: String,
    /// Registries reached over plain HTTP (`host:port`, repeatable), as containerd's
    /// insecure registries.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,

    /// The agent's cgroup subtree, relative to the cgroup2 mount. Default: under systemd,
    /// the cgroup delegated to `skiff-pods.service` beside the agent's unit (or the agent's
    /// own unit cgroup when that is delegated: the agent then moves into its `agent` leaf);
    /// elsewhere the cgroup the agent runs in.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// The pids limit of each pod (default: unlimited).
    #[arg(long)]
    pub pod_pids_limit: Option<u64>,

    /// Runtime state: pod namespaces, sandboxes, CNI result cache.
    #[arg(long, default_value = "/run/skiff")]
    pub run_dir: PathBuf,
    /// Persistent state: volumes of pods.
    #[arg(long, default_value = "/var/lib/skiff/agent")]
    pub state_dir: PathBuf,
    /// Where container logs go (`<dir>/<namespace>_<pod>_<uid>/<container>/<n>.log`).
    #[arg(long, default_value = "/var/log/pods")]
    pub pod_log_dir: PathBuf,
    /// Rotate a container's log when it grows past this many bytes.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    pub container_log_max_size: u64,
    /// Rotated log files kept per container, the current one included.
    #[arg(long, default_value_t = 5)]
    pub container_log_max_files: u32,

    /// Directory of CNI network configurations (the first `*.conflist` is used).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Directories holding CNI plugin binaries.
    #[arg(long = "cni-bin-dir", default_values = ["/opt/cni/bin", "/usr/lib/cni"])]
    pub cni_bin_dirs: Vec<PathBuf>,

    /// Cluster DNS servers written into pods' resolv.conf (dnsPolicy ClusterFirst).
    #[arg(long = "cluster-dns")]
    pub cluster_dns: Vec<IpAddr>,
    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The resolv.conf pods with dnsPolicy Default get.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,

    /// CPU kept back from pods (Kubernetes quantity, e.g. `100m`).
    #[arg(long, default_value = "0")]
    pub reserved_cpu: String,
    /// Memory kept back from pods (Kubernetes quantity, e.g. `256Mi`).
    #[arg(long, default_value = "0")]
    pub reserved_memory: String,
    /// The most pods this node runs.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,

    /// Where the node API (logs, healthz, pods) listens.
    #[arg(long, default_value = "0.0.0.0:10250")]
    pub node_api_listen: SocketAddr,
    /// PEM CA bundle for the node API: a client certificate it signed authenticates (give
    /// it the control plane's CA, with which the API server signs its certificate).
    #[arg(long)]
    pub client_ca_file: Option<PathBuf>,
    /// Bearer tokens for the node API, in kube-apiserver's `--token-auth-file` format.
    #[arg(long)]
    pub node_api_token_file: Option<PathBuf>,
    /// The node API's certificate chain (PEM); without it and `--tls-private-key-file`, a
    /// self-signed one for the node's IP and name is made at start.
    #[arg(long, requires = "tls_private_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of `--tls-cert-file` (PEM).
    #[arg(long, requires = "tls_cert_file")]
    pub tls_private_key_file: Option<PathBuf>,
    /// Seconds between two renewals of the node's Lease.
    #[arg(long, default_value_t = 10)]
    pub lease_renew_seconds: u64,
    /// Keep host-gw routes: a route to every other Node's podCIDR via its InternalIP
    /// (off by default: several test agents share one host, and other CNIs route
    /// themselves).
    #[arg(long, env = "SKIFF_HOST_GW_ROUTES")]
    pub host_gw_routes: bool,
    /// Seconds between two full comparisons of the host-gw routes with the kernel's.
    #[arg(long, default_value_t = 30)]
    pub routes_resync_seconds: u64,
    /// The eBPF service load balancer that replaces kube-proxy (`--service-lb=false` to run
    /// without it, e.g. beside kube-proxy).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub service_lb: bool,
    /// Where the load balancer pins its maps and links: a bpffs mount, or a directory where
    /// the agent mounts one. Pins outlive the agent so the datapath keeps serving.
    #[arg(long, default_value = "/sys/fs/bpf/skiff")]
    pub bpffs_dir: PathBuf,
    /// The cgroup v2 directory the socket hooks attach to, absolute (default: the pods'
    /// cgroup, `<cgroup root>/kubepods`). The cgroup2 mount root lets the node's own
    /// processes reach Services too.
    #[arg(long)]
    pub lb_cgroup: Option<PathBuf>,
    /// Interfaces where NodePorts and external IPs are served to clients outside the node
    /// (tc programs): a comma-separated list, `auto` for the non-loopback interface that
    /// holds the node IP, or `none`.
    #[arg(long, default_value = "auto")]
    pub nodeport_interfaces: String,
    /// Capacity of the NodePort connection tracking map (LRU, two entries per flow).
    #[arg(long, default_value_t = skiff_ebpf::lb::CT_DEFAULT_MAX_ENTRIES)]
    pub lb_max_connections: u32,
    /// Capacity of the frontend map: one entry per frontend plus one per backend slot.
    #[arg(long, default_value_t = 262_144)]
    pub lb_max_services: u32,
    /// Capacity of the backend map (one entry per frontend and endpoint).
    #[arg(long, default_value_t = 131_072)]
    pub lb_max_backends: u32,
    /// Capacity of the socket reverse-translation map (LRU).
    #[arg(long, default_value_t = 262_144)]
    pub lb_max_sockets: u32,
    /// Capacity of the ClientIP session affinity map (LRU).
    #[arg(long, default_value_t = 65_536)]
    pub lb_max_affinity: u32,
    /// Hard eviction thresholds, in the kubelet's syntax.
    #[arg(long, default_value = crate::node::DEFAULT_EVICTION_HARD)]
    pub eviction_hard: String,
    /// Seconds between two passes of the eviction manager.
    #[arg(long, default_value_t = 10)]
    pub eviction_interval_seconds: u64,
    /// Seconds between two node status reports when nothing changed.
    #[arg(long, default_value_t = 60)]
    pub status_report_seconds: u64,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got {text:?}"))?;
    Ok((key.to_string(), value.to_string()))
}

impl AgentConfig {
    /// The node name: the flag, or the machine's hostname as the kubelet does (lowercased).
    pub fn node_name(&self) -> anyhow::Result<String> {
        if let Some(name) = &self.node_name {
            return Ok(name.clone());
        }
        let host = nix::unistd::gethostname()?;
        Ok(host.to_string_lossy().to_lowercase())
    }
}
