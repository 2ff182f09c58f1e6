//! `cargo xtask`: the project's entry point for setup, building, the local cluster, tests and
//! benchmarks.

mod bench;
mod bench_api;
mod bench_cni;
mod bench_lb;
mod bench_pods;
mod bench_sched;
mod cluster;
mod node;
mod oci_image;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "skiff's development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Installs the Debian and Python packages the project needs (as root; quick when present).
    Deps,
    /// Builds every binary and test of the workspace (debug).
    Build,
    /// Installs, builds and starts skiff-control and a node of it (containerd and
    /// skiff-agent) in the background.
    Up(UpArgs),
    /// Stops what `up` started and removes its pods' processes, mounts, bridge and cgroups.
    Down(DownArgs),
    /// Installs, builds, then runs every test of the workspace.
    Test,
    /// Runs a benchmark; without a name, lists them.
    Bench {
        #[command(subcommand)]
        bench: Option<Bench>,
    },
}

#[derive(clap::Args)]
struct UpArgs {
    /// The server's data directory (store, certificates, kubeconfig, pid file and log).
    #[arg(long, default_value = "/var/lib/skiff/control")]
    data_dir: PathBuf,
    /// Where the server listens.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
}

#[derive(clap::Args)]
struct DownArgs {
    /// The data directory given to `up`.
    #[arg(long, default_value = "/var/lib/skiff/control")]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Bench {
    /// The API server: create, get, list and watch latency, memory with many pods, and the
    /// fsync floor of the same writes.
    Api(bench_api::ApiBenchArgs),
    /// The CNI plugin: ADD and DEL latency, sequential and 20 at once, for skiff-cni and the
    /// reference bridge + host-local plugins in the same run (needs root).
    Cni(bench_cni::CniBenchArgs),
    /// The scheduler: hollow nodes, then pods created through the API; pods bound per
    /// second, creation-to-binding latency, peak memory.
    Sched(bench_sched::SchedBenchArgs),
    /// One node: pods created at once through the API until Running, beside the same
    /// containers started with `ctr run`; the agent's memory with the pods running.
    Pods(bench_pods::PodsBenchArgs),
    /// The service load balancer: connections per second and latency directly, through
    /// skiff's socket LB and through kube-proxy's iptables rules at 1, 1 000 and 10 000
    /// Services; programming time; EndpointSlice change to maps (needs root).
    Lb(bench_lb::LbBenchArgs),
}

fn header(phase: &str) {
    println!("==> {phase}");
}

/// Runs the test suite and returns its exit code.
fn test() -> anyhow::Result<ExitCode> {
    header("deps");
    cluster::deps()?;
    header("build: cargo build --workspace --bins --tests");
    cluster::build()?;
    let has_nextest = cluster::cargo()
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut command = cluster::cargo();
    if has_nextest {
        header("test: cargo nextest run --workspace --no-fail-fast");
        command.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        header("test: cargo test --workspace --no-fail-fast (cargo-nextest not installed)");
        command.args(["test", "--workspace", "--no-fail-fast"]);
    }
    let status = command
        .status()
        .map_err(|e| anyhow::anyhow!("run the tests: {e}"))?;
    let code = status.code().unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Deps => cluster::deps()?,
        Command::Build => cluster::build()?,
        Command::Up(args) => cluster::up(&args.data_dir, args.listen)?,
        Command::Down(args) => cluster::down(&args.data_dir)?,
        Command::Test => return test(),
        Command::Bench { bench: None } => {
            println!("benchmarks (cargo xtask bench NAME --help for options):");
            println!(
                "  api   the API server: creates (paced and unpaced), gets, lists, watch delivery,"
            );
            println!("        memory with 10 000 pods, and the fsync floor of the same writes");
            println!("  cni   ADD/DEL latency of skiff-cni against the reference plugins");
            println!("  sched pods bound per second at 5 000 hollow nodes");
            println!("  pods  50 pods created at once on one node until Running, beside `ctr run`");
            println!(
                "  lb    ClusterIP connections direct, through skiff and through kube-proxy's"
            );
            println!("        iptables rules at 1 to 10 000 Services; programming time");
        }
        Command::Bench {
            bench: Some(Bench::Api(args)),
        } => bench_api::run(&args)?,
        Command::Bench {
            bench: Some(Bench::Cni(args)),
        } => bench_cni::run(&args)?,
        Command::Bench {
            bench: Some(Bench::Sched(args)),
        } => bench_sched::run(&args)?,
        Command::Bench {
            bench: Some(Bench::Pods(args)),
        } => bench_pods::run(&args)?,
        Command::Bench {
            bench: Some(Bench::Lb(args)),
        } => bench_lb::run(&args)?,
    }
    Ok(ExitCode::SUCCESS)
}
