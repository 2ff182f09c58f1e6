//! The `skiff-cni` binary: one CNI verb per run, as the runtime execs it.

use std::io::{Read, Write};

use skiff_cni::config::RawEnv;

fn main() {
    let mut stdin = Vec::new();
    let env = RawEnv::from_process();
    // VERSION may come with no stdin at all; a read error is reported as a decode failure
    // by the config parser, which sees empty input.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let outcome = match std::panic::catch_unwind(|| skiff_cni::plugin::run(&env, &stdin)) {
        Ok(outcome) => outcome,
        Err(_) => skiff_cni::plugin::Outcome {
            stdout: skiff_cni::error::CniError::new(
                skiff_cni::error::ErrorCode::Datapath,
                "internal error: the plugin panicked",
            )
            .to_json(skiff_cni::version::CURRENT_VERSION),
            exit_code: 1,
        },
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    std::process::exit(outcome.exit_code);
}
