//! `agentctl`: the node operator's view of what the machine holds, read straight from
//! containerd, the run and state directories, the cgroup tree and the CNI result cache, so
//! that it answers while the agent is down. Start with [`main`]; `pods.rs` is the heart.
//!
//! Every command takes the agent's own location flags (`--containerd-socket`,
//! `--run-dir`, `--cgroup-root` ...) with the agent's defaults, and prints a table or, with
//! `-o json`, one JSON object whose field names are kept stable for scripts.
//!
//! **Architecture invariant:** `agentctl` never talks to the agent, and only `explain`
//! talks to the API server (to set what the API asks beside what the node holds). Apart
//! from `image import`, `image rm` and `lb reset` it changes nothing on the node: no cgroup is created,
//! no container label written, no CNI plugin run, no BPF map written.

mod images;
mod lb;
mod node;
mod pods;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

pub use node::NodeFlags;

#[derive(Parser, Debug)]
#[command(
    name = "agentctl",
    about = "Inspects a skiff node: its pods and images, read from the machine itself",
    version
)]
struct Cli {
    #[command(flatten)]
    node: NodeFlags,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, global = true)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON object, for scripts; field names are stable.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Images in the agent's containerd namespace.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// The pods this node holds: containers, sandboxes, cgroups and CNI attachments, with
    /// what each pod is missing (a leak shows as a pod known to only some of them).
    Pods,
    /// The service load balancer's frontends and backends, from the pinned BPF maps.
    #[command(subcommand)]
    Lb(lb::LbCommand),
    /// Connection tracking of the NodePort datapath, from the pinned `ct4` map.
    #[command(subcommand)]
    Ct(lb::CtCommand),
    /// Explains an object's datapath state against the API.
    #[command(subcommand)]
    Explain(lb::ExplainCommand),
}

/// Runs `agentctl` with the process's arguments. Any failure is printed as
/// `agentctl: <what>: <why>` on stderr with exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings of the shared code (an unreadable CNI cache entry that is skipped) go to
    // stderr, so that a script reading stdout still gets clean JSON.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("agentctl: start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Image(command) => images::run(&cli.node, cli.output, command).await,
            Command::Pods => pods::run(&cli.node, cli.output).await,
            Command::Lb(command) => lb::run(&cli.node, cli.output, command),
            Command::Ct(command) => lb::connections(&cli.node, cli.output, command),
            Command::Explain(command) => lb::explain(&cli.node, cli.output, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("agentctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `value` as pretty JSON followed by a newline.
pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn location_flags_and_output_go_anywhere() {
        let cli = Cli::try_parse_from([
            "agentctl",
            "pods",
            "-o",
            "json",
            "--run-dir",
            "/tmp/run",
            "--containerd-namespace",
            "other",
        ])
        .unwrap();
        assert_eq!(cli.output, Format::Json);
        assert_eq!(cli.node.run_dir, std::path::Path::new("/tmp/run"));
        assert_eq!(cli.node.containerd_namespace, "other");
        let cli = Cli::try_parse_from(["agentctl", "image", "list"]).unwrap();
        assert_eq!(cli.output, Format::Table);
        assert_eq!(
            cli.node.containerd_socket,
            std::path::Path::new("/run/containerd/containerd.sock")
        );
        assert_eq!(cli.node.cgroup_root, None);
    }
}
