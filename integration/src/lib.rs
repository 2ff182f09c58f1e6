//! Test harness for end-to-end tests: starts the real `skiff-control` binary on a fresh data
//! directory and hands out kubectl and HTTPS clients bound to it.
//!
//! The binaries are found next to the test executable (`target/<profile>/`); `cargo xtask
//! test` builds them before running the tests. A missing binary or tool fails the test with
//! a message naming it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;

pub mod containerd;
pub mod lbnet;
pub mod netns;
pub mod node;
pub mod oci_image;
pub mod pod_cluster;
pub mod registry;
pub mod vm;

/// The directory holding the workspace's binaries for this build profile.
pub fn binary_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SKIFF_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable under target/<profile>/deps")
        .to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    let path = binary_dir().join(name);
    assert!(
        path.exists(),
        "{name} not found at {}: build it first (`cargo build --workspace --bins`; `cargo xtask test` does)",
        path.display()
    );
    path
}

/// Fails with a message saying why when the test does not run as root (effective uid 0).
pub fn require_root(why: &str) {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    assert_eq!(euid, Some("0"), "{why} and needs root");
}

/// Fails with a clear message when a tool the test needs is not installed.
pub fn require_tool(name: &str, hint: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{name} is not installed: {hint}");
}

/// The stdout of `output`, a run of `program args...`; fails the test, with both streams,
/// if the run failed.
pub fn succeeded(program: &str, args: &[&str], output: &Output) -> String {
    assert!(
        output.status.success(),
        "{program} {} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A unique suffix for names that live in the kernel's global namespaces.
pub fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id(), nanos & 0xfffff)
}

/// Every file under `dir`, recursively (none when `dir` does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// A running `skiff-control serve` on a temporary data directory; killed on drop.
pub struct ControlPlane {
    child: Option<Child>,
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    pub url: String,
    pub kubeconfig: PathBuf,
    pub token: String,
    pub ca_pem: Vec<u8>,
}

impl ControlPlane {
    pub fn start() -> Self {
        let temp = tempfile::Builder::new()
            .prefix("skiff-control-")
            .tempdir()
            .expect("temp dir");
        let data_dir = temp.path().to_path_buf();
        let mut plane = Self::start_in(&data_dir);
        plane._temp = Some(temp);
        plane
    }

    /// Starts a server on an existing data directory (to restart after a crash).
    pub fn start_in(data_dir: &Path) -> Self {
        let mut child = Command::new(binary("skiff-control"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn skiff-control");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("skiff-control serving ") {
                    let _ = sender.send(url.trim().to_string());
                }
            }
        });
        let url = match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("skiff-control did not report its address within 30 s");
            }
        };
        let kubeconfig = data_dir.join("admin.kubeconfig");
        let config = std::fs::read_to_string(&kubeconfig).expect("read admin kubeconfig");
        let field = |name: &str| {
            config
                .lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("kubeconfig has no {name}"))
        };
        let ca_pem = base64::engine::general_purpose::STANDARD
            .decode(field("certificate-authority-data:"))
            .expect("CA is base64");
        Self {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            _temp: None,
            url,
            token: field("token:"),
            kubeconfig,
            ca_pem,
        }
    }

    /// `kill -9`: the server gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A kubectl command bound to this server (not yet run).
    pub fn kubectl_command(&self) -> Command {
        require_tool("kubectl", "the real kubectl must be on PATH");
        let mut command = Command::new("kubectl");
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.data_dir.join("home"))
            .stdin(Stdio::null());
        command
    }

    /// Runs kubectl with `args`; returns its output whatever the exit status.
    pub fn kubectl_output(&self, args: &[&str]) -> Output {
        self.kubectl_command()
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl with `args` and returns stdout, failing the test if kubectl fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        succeeded("kubectl", args, &self.kubectl_output(args))
    }

    /// kubectl with a manifest on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .kubectl_command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write manifest");
        child.wait_with_output().expect("kubectl output")
    }

    /// An HTTPS client that trusts the cluster CA and sends the admin token.
    pub fn http(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(&self.ca_pem).expect("CA certificate");
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", self.token).parse().expect("header"),
        );
        reqwest::Client::builder()
            .add_root_certificate(ca)
            .default_headers(headers)
            .build()
            .expect("HTTP client")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends a request and decodes its JSON body, failing the test on any error.
pub trait SendJson {
    fn send_json(self) -> impl std::future::Future<Output = serde_json::Value>;
}

impl SendJson for reqwest::RequestBuilder {
    async fn send_json(self) -> serde_json::Value {
        self.send()
            .await
            .expect("send request")
            .json()
            .await
            .expect("JSON response body")
    }
}
