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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(config) => run(*config),
        Command::LogDriver(args) => skiff_agent::logs::run_log_driver(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("skiff-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: skiff_agent::config::AgentConfig) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(skiff_agent::agent::run(config))
}
