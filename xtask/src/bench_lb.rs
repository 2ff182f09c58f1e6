//! `cargo xtask bench lb`: builds the load balancer bench (`integration`'s `lb-bench`, which
//! links the agent's eBPF datapath) and `skiff-control` in release, then runs the bench as
//! root. The bench prints connections per second and request latency directly, through
//! skiff's socket load balancer and through kube-proxy's iptables rules at several Service
//! counts, the time each takes to program them, and how fast an EndpointSlice change
//! reaches skiff's maps; it removes the namespaces, cgroups and mounts it made.
//!
//! xtask itself does not link the agent: the agent's build needs clang, which `deps`
//! installs.

use std::path::PathBuf;

use crate::cluster;

#[derive(clap::Args)]
pub struct LbBenchArgs {
    /// New TCP connections measured per case (direct, skiff, iptables) and Service count.
    #[arg(long, default_value_t = 3000)]
    connections: usize,
    /// Connections in flight at once (one client thread each).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Batches each case's connections are split into, the cases taking turns.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Service counts (4 endpoints each), comma-separated.
    #[arg(long, default_value = "1,1000,10000")]
    scales: String,
    /// iptables backend for kube-proxy's rules, `nft` or `legacy` (default: the system's).
    #[arg(long)]
    iptables: Option<String>,
    /// Time kube-proxy's own `iptables-restore --noflush` (about 9 minutes for 10 000
    /// Services with iptables-nft 1.8.9) instead of one flushing restore of the same rules.
    #[arg(long)]
    noflush: bool,
    /// Services in the API server for the EndpointSlice change figure.
    #[arg(long, default_value_t = 1000)]
    change_services: usize,
    /// EndpointSlice changes measured; 0 skips the figure.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Where the temporary directory goes (default: the system temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keeps the temporary directory (iptables-restore files, skiff-control's log).
    #[arg(long)]
    keep: bool,
}

pub fn run(args: &LbBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "`cargo xtask bench lb` creates network namespaces, cgroups and a bpffs mount: run it \
         as root"
    );
    cluster::deps()?;
    println!("==> build: lb-bench, skiff-control (release)");
    cluster::run(cluster::cargo().args([
        "build",
        "--release",
        "-p",
        "integration",
        "--bin",
        "lb-bench",
        "-p",
        "skiff-control",
        "--bin",
        "skiff-control",
    ]))?;
    let release = cluster::workspace_root().join("target/release");
    let mut command = std::process::Command::new(release.join("lb-bench"));
    command.current_dir(cluster::workspace_root());
    command
        .args(["--connections", &args.connections.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--rounds", &args.rounds.to_string()])
        .args(["--scales", &args.scales])
        .args(["--change-services", &args.change_services.to_string()])
        .args(["--changes", &args.changes.to_string()])
        .arg("--control-binary")
        .arg(release.join("skiff-control"));
    if let Some(iptables) = &args.iptables {
        command.args(["--iptables", iptables]);
    }
    if args.noflush {
        command.arg("--noflush");
    }
    if let Some(dir) = &args.dir {
        command.arg("--dir").arg(dir);
    }
    if args.keep {
        command.arg("--keep");
    }
    cluster::run(&mut command)
}

/// Whether this process runs as root (effective uid 0), from /proc/self/status.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}
