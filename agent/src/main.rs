//! `skiff-agent`: the node agent. `skiff-agent run` is the daemon; `skiff-agent log-driver`
//! is the container log writer that containerd's shim starts for each container.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "skiff-agent", about = "skiff's node agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the node agent.
    Run(Box<skiff_agent::config::AgentConfig>),
    /// Writes a container's stdout and stderr in the CRI log format (started by containerd's
    /// shim through a `binary://` log URI, not by hand).
    LogDriver(skiff_agent::logs::LogDriverArgs),
    /// Holds the delegated cgroup of `skiff-pods.service` for the pods: moves into its
    /// `holder` leaf, tells systemd it is ready and sleeps (started by that unit, not by
    /// hand).
    HoldCgroup,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(config) => run(*config),
        Command::LogDriver(args) => skiff_agent::logs::run_log_driver(args),
        Command::HoldCgroup => hold_cgroup(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("skiff-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(mut config: skiff_agent::config::AgentConfig) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Before any thread or child process exists, so that all of them start in the leaf.
    take_delegated_cgroup(&mut config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(skiff_agent::agent::run(config))
}

/// Without `--cgroup-root`, under systemd: takes the cgroup systemd delegated for the pods
/// (`skiff-pods.service` beside the agent's unit, or the agent's own unit when that is
/// delegated, the agent then moving into its `agent` leaf). Anywhere else (the hybrid
/// development hosts) nothing changes, and the pod runtime uses the agent's own cgroup as
/// before.
fn take_delegated_cgroup(config: &mut skiff_agent::config::AgentConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use skiff_agent::cgroups;

    if config.cgroup_root.is_some() {
        return Ok(());
    }
    // The pod runtime reports a host without cgroup2 or /proc when it opens the subtree.
    let Some((mount, own)) = own_cgroup() else {
        return Ok(());
    };
    let Some(delegated) = cgroups::find_delegated_subtree(&mount, &own) else {
        return Ok(());
    };
    if let Some(leaf) = &delegated.move_agent_to {
        cgroups::enter_leaf(&mount, leaf, std::process::id())
            .context("move the agent into a leaf of its delegated cgroup")?;
    }
    tracing::info!(
        subtree = %delegated.subtree.display(),
        agent_cgroup = %delegated.move_agent_to.as_deref().unwrap_or(own.as_path()).display(),
        "using the cgroup systemd delegated for the pods"
    );
    config.cgroup_root = Some(delegated.subtree);
    Ok(())
}

/// `skiff-agent hold-cgroup`: the one process of `skiff-pods.service`. It leaves the root
/// of the unit's delegated cgroup for the `holder` leaf, so that the agent can enable the
/// controllers there for `kubepods`, and only then reports ready: the agent's unit starts
/// after it.
fn hold_cgroup() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use skiff_agent::cgroups;

    let (mount, own) = own_cgroup().context("find this process's cgroup v2")?;
    let unit = cgroups::own_delegated_cgroup(&mount, &own).with_context(|| {
        format!(
            "hold cgroup {}: it is not delegated (run from a unit with Delegate=yes)",
            own.display()
        )
    })?;
    let leaf = cgroups::enter_leaf(&mount, &unit.join(cgroups::HOLDER_LEAF), std::process::id())
        .context("move into the holder leaf")?;
    eprintln!(
        "skiff-agent: holding {} for the pods (this process is in {})",
        mount.join(&unit).display(),
        leaf.display()
    );
    skiff_agent::agent::notify_systemd_ready();
    // SIGTERM's default action ends the process when the unit stops.
    loop {
        std::thread::park();
    }
}

/// The cgroup2 mount point and this process's cgroup v2 path, if both can be read.
fn own_cgroup() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    use skiff_agent::cgroups;
    use std::path::Path;

    let mount = cgroups::find_cgroup2_mount(Path::new("/proc/self/mountinfo")).ok()?;
    let own = cgroups::own_cgroup_v2(Path::new("/proc/self/cgroup")).ok()?;
    Some((mount.mount_point, own))
}
