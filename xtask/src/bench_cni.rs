//! `cargo xtask bench cni`: builds skiff-cni and its bench in release and runs the bench,
//! which measures skiff-cni and the reference plugins in the same run.

use crate::cluster;

#[derive(clap::Args)]
pub struct CniBenchArgs {
    /// Pods per mode.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Also masquerade traffic leaving the pod CIDR (ipMasq).
    #[arg(long)]
    masq: bool,
}

pub fn run(args: &CniBenchArgs) -> anyhow::Result<()> {
    cluster::deps()?;
    cluster::run(cluster::cargo().args([
        "build",
        "--release",
        "-p",
        "skiff-cni",
        "--bins",
        "--examples",
    ]))?;
    let bench = cluster::workspace_root().join("target/release/examples/bench");
    let mut command = std::process::Command::new(bench);
    command.current_dir(cluster::workspace_root());
    command.args(["--pods", &args.pods.to_string()]);
    if args.masq {
        command.arg("--masq");
    }
    cluster::run(&mut command)
}
