//! The same user flow once through the official Kubernetes Python client.

use std::process::Command;

use integration::ControlPlane;

#[test]
fn official_python_client_flow() {
    let has_client = Command::new("python3")
        .args(["-c", "import kubernetes"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_client,
        "the Python package `kubernetes` is not installed: run `cargo xtask deps` (or `pip install kubernetes`)"
    );
    let plane = ControlPlane::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/flow.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(&plane.kubeconfig)
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "python flow failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
