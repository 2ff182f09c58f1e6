//! Machine setup and the local cluster's lifecycle: `deps` installs packages, `build` compiles,
//! `up` and `down` start and stop a background `skiff-control`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;

/// Debian packages the project needs, each with the reason. Later work adds to this list.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "containernetworking-plugins",
        "the reference CNI plugins the CNI tests compare against",
    ),
    ("iproute2", "`ip` for network namespaces and veths in tests"),
    ("nftables", "`nft` for the CNI tests' reference rules"),
    (
        "containerd",
        "the container runtime the agent drives through its native API",
    ),
    (
        "runc",
        "the OCI runtime containerd's shim runs containers with",
    ),
    (
        "protobuf-compiler",
        "`protoc`, which containerd-client's build script needs",
    ),
    (
        "docker-registry",
        "a real OCI registry on loopback for image pull tests",
    ),
    ("skopeo", "pushes test images to the local registry"),
    (
        "busybox-static",
        "the static binary test images are built from",
    ),
    (
        "clang",
        "compiles the eBPF programs in ebpf/ (`-target bpf`)",
    ),
    ("libbpf-dev", "`bpf/bpf_helpers.h` for the eBPF programs"),
    (
        "bpftool",
        "the load balancer tests read pinned maps and attachments with it",
    ),
    (
        "iptables",
        "`bench lb` compares with kube-proxy's iptables rules",
    ),
    // The cgroup v2 guest VM test (integration/src/vm.rs): debootstrap builds the image,
    // mkfs.ext4 and qemu-img make its disks, and Debian's QEMU (extracted with `apt-get
    // download` + `dpkg -x`, since an installed newer qemu-utils conflicts with
    // qemu-system-x86) boots it with SeaBIOS and iPXE's ROMs and these shared libraries.
    ("debootstrap", "builds the cgroup v2 guest VM's image"),
    ("e2fsprogs", "`mkfs.ext4 -d` makes the guest VM's disks"),
    (
        "qemu-utils",
        "`qemu-img` makes the guest VM's qcow2 overlays",
    ),
    ("seabios", "the BIOS the guest VM's QEMU boots with"),
    ("ipxe-qemu", "the option ROMs the guest VM's QEMU loads"),
    ("libcapstone4", "a library the guest VM's QEMU links"),
    ("libfdt1", "a library the guest VM's QEMU links"),
    ("libpmem1", "a library the guest VM's QEMU links"),
    ("librdmacm1", "a library the guest VM's QEMU links"),
    ("libibverbs1", "a library the guest VM's QEMU links"),
    ("libslirp0", "a library the guest VM's QEMU links"),
    ("libvdeplug2", "a library the guest VM's QEMU links"),
];

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// The cargo that runs us, so that toolchain overrides carry over.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// Runs `command`, failing with its description unless it exits successfully.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let description = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("run {description}"))?;
    anyhow::ensure!(status.success(), "{description} failed: {status}");
    Ok(())
}

/// Runs `command` with its output captured, showing the output only when it fails.
fn run_quiet(command: &mut Command) -> anyhow::Result<()> {
    let description = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {description}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{description} failed: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether an executable named `name` is on PATH.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            fs::metadata(dir.join(name)).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Installs what is missing, printing one line per thing installed. Cheap when all is present.
pub fn deps() -> anyhow::Result<()> {
    anyhow::ensure!(
        on_path("kubectl"),
        "kubectl is not on PATH: skiff's tests and `cargo xtask up` use the real kubectl, which \
         these machines provide (it is not a Debian package); install it and retry"
    );
    let mut missing: Vec<(&str, &str)> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|(package, _)| !dpkg_installed(package))
        .collect();
    let has_pip = succeeds("python3", &["-m", "pip", "--version"]);
    if !has_pip {
        missing.push((
            "python3-pip",
            "pip, to install the Kubernetes Python client",
        ));
    }
    if !missing.is_empty() {
        anyhow::ensure!(
            is_root(),
            "missing Debian packages {:?}: run `cargo xtask deps` as root",
            missing.iter().map(|(p, _)| *p).collect::<Vec<_>>()
        );
        run_quiet(Command::new("apt-get").args(["update", "-qq"]))?;
        run_quiet(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(missing.iter().map(|(p, _)| *p))
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        for (package, reason) in &missing {
            println!("deps: installed {package} ({reason})");
        }
    }
    if !succeeds("python3", &["-c", "import kubernetes"]) {
        run_quiet(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "kubernetes",
                ])
                // Debian's Python refuses system-wide installs without this (PEP 668); older
                // pips ignore the variable.
                .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
                .env("PIP_ROOT_USER_ACTION", "ignore"),
        )?;
        println!("deps: installed the Python package kubernetes (the official client, for a test)");
    }
    Ok(())
}

/// `cargo build --workspace --bins --tests`, debug, so binaries and tests are built once.
pub fn build() -> anyhow::Result<()> {
    run(cargo().args(["build", "--workspace", "--bins", "--tests"]))
}

/// Builds `skiff-control` in release and returns the path of the executable.
pub fn build_control_release() -> anyhow::Result<PathBuf> {
    let mut child = cargo()
        .args([
            "build",
            "--release",
            "--package",
            "skiff-control",
            "--bin",
            "skiff-control",
            "--message-format=json-render-diagnostics",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("run cargo build --release --package skiff-control")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut executable = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read cargo's messages")?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && message["target"]["name"] == "skiff-control"
            && let Some(path) = message["executable"].as_str()
        {
            executable = Some(PathBuf::from(path));
        }
    }
    let status = child.wait().context("wait for cargo build")?;
    anyhow::ensure!(
        status.success(),
        "cargo build --release --package skiff-control failed: {status}"
    );
    executable.context("cargo built no skiff-control executable")
}

/// What a client needs from an admin kubeconfig written by `skiff-control`.
pub struct Kubeconfig {
    pub server: String,
    pub ca_pem: Vec<u8>,
    pub token: String,
}

impl Kubeconfig {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
                .with_context(|| format!("kubeconfig {} has no {name}", path.display()))
        };
        let ca_pem = base64::engine::general_purpose::STANDARD
            .decode(field("certificate-authority-data:")?)
            .with_context(|| format!("kubeconfig {}: CA is not base64", path.display()))?;
        Ok(Self {
            server: field("server:")?,
            ca_pem,
            token: field("token:")?,
        })
    }

    /// An HTTPS client that trusts the cluster CA and sends the bearer token.
    pub fn client(&self) -> anyhow::Result<reqwest::Client> {
        let ca = reqwest::Certificate::from_pem(&self.ca_pem).context("parse the cluster CA")?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", self.token)
                .parse()
                .context("token as header")?,
        );
        reqwest::Client::builder()
            .add_root_certificate(ca)
            .default_headers(headers)
            .build()
            .context("build the HTTPS client")
    }
}

/// Whether `pid` is a live (not zombie) `skiff-control` process.
pub fn control_alive(pid: u32) -> bool {
    // /proc/PID/stat is "pid (comm) state ...". Our parent may not reap a stopped server,
    // so a zombie counts as gone; the name guards against a reused pid.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let comm_ok = stat.contains("(skiff-control)");
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim().chars().next());
        comm_ok && !matches!(state, Some('Z' | 'X') | None)
    })
}

/// Reads the resident memory of `pid` (VmRSS and the peak VmHWM) in bytes.
pub fn resident_memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let kib = |name: &str| -> anyhow::Result<u64> {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("{path} has no {name}"))?;
        let number = value.trim().trim_end_matches("kB").trim();
        Ok(number
            .parse::<u64>()
            .with_context(|| format!("{path}: {name} {value:?}"))?
            * 1024)
    };
    Ok((kib("VmRSS:")?, kib("VmHWM:")?))
}

fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    run(Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .stderr(Stdio::null()))
}

fn pid_file(data_dir: &Path) -> PathBuf {
    data_dir.join("skiff-control.pid")
}

fn read_pid(data_dir: &Path) -> Option<u32> {
    fs::read_to_string(pid_file(data_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn print_how_to_use(url: &str, data_dir: &Path, node: &crate::node::Layout) {
    println!("skiff-control serving {url}");
    println!(
        "  export KUBECONFIG={}",
        data_dir.join("admin.kubeconfig").display()
    );
    println!("  kubectl get nodes");
    println!(
        "  kubectl run hello --image={} -- sh -c 'echo hello from skiff; sleep 3600'",
        crate::oci_image::BUSYBOX_IMAGE
    );
    println!("  kubectl logs hello; kubectl delete pod hello");
    println!("logs:");
    println!(
        "  skiff-control  {}",
        data_dir.join("skiff-control.log").display()
    );
    println!("  skiff-agent    {}", node.agent_log().display());
    println!("  containerd     {}", node.containerd_log().display());
    println!("  pods           {}", node.pod_log_dir.display());
    println!(
        "containerd: ctr --address {} --namespace {} containers ls",
        node.containerd_socket().display(),
        crate::node::CONTAINERD_NAMESPACE
    );
    println!("stop everything: cargo xtask down");
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Installs and builds what is missing, then starts skiff on this machine in the
/// background: `skiff-control`, and a node of it (containerd and `skiff-agent`, see
/// `node.rs`) with the busybox image imported. What already runs is left running.
pub fn up(data_dir: &Path, listen: SocketAddr) -> anyhow::Result<()> {
    deps()?;
    let binaries = crate::node::build_release()?;
    let url = match read_pid(data_dir).filter(|pid| control_alive(*pid)) {
        Some(pid) => {
            println!("skiff-control is already running (pid {pid})");
            Kubeconfig::read(&data_dir.join("admin.kubeconfig"))?.server
        }
        None => {
            let (pid, url) = start_control(&binaries.control, data_dir, listen)?;
            println!(
                "started skiff-control (pid {pid}, log {})",
                data_dir.join("skiff-control.log").display()
            );
            url
        }
    };
    let node = crate::node::Layout::system(data_dir)?;
    let started = crate::node::start(&node, &binaries)?;
    let verb = if started.already_running {
        "already running:"
    } else {
        "started"
    };
    println!(
        "{verb} containerd (pid {}) and skiff-agent (pid {}), node {} Ready, pod CIDR {}/{} on \
         bridge {}",
        started.containerd_pid,
        started.agent_pid,
        node.node_name,
        node.pod_cidr.0,
        node.pod_cidr.1,
        node.bridge
    );
    let images = crate::node::ctr(
        &node,
        crate::node::CONTAINERD_NAMESPACE,
        &["images", "ls", "--quiet"],
    )?;
    if !images
        .lines()
        .any(|l| l.trim() == crate::oci_image::BUSYBOX_IMAGE)
    {
        let temp = tempfile::tempdir().context("temp dir for the image archive")?;
        let archive = temp.path().join("busybox.tar");
        crate::oci_image::write_busybox_archive(&archive)?;
        crate::node::import_image(&node, crate::node::CONTAINERD_NAMESPACE, &archive)?;
        println!(
            "imported the image {} (busybox-static; no registry is reachable here)",
            crate::oci_image::BUSYBOX_IMAGE
        );
    }
    print_how_to_use(&url, data_dir, &node);
    Ok(())
}

/// Starts `skiff-control serve` from `executable` in the background with its pid file and
/// log in `data_dir`, waits until it answers `/readyz`, and returns its pid and URL.
pub fn start_control(
    executable: &Path,
    data_dir: &Path,
    listen: SocketAddr,
) -> anyhow::Result<(u32, String)> {
    fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let log = data_dir.join("skiff-control.log");
    let log_file = fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    // setsid gives the server its own session: closing the terminal or ^C does not reach it.
    let mut child = Command::new("setsid")
        .arg(executable)
        .args(["serve", "--listen", &listen.to_string(), "--data-dir"])
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().context("duplicate the log file")?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("start {}", executable.display()))?;
    let pid = child.id();
    let pid_path = pid_file(data_dir);
    fs::write(&pid_path, format!("{pid}\n"))
        .with_context(|| format!("write {}", pid_path.display()))?;

    let deadline = Instant::now() + Duration::from_secs(20);
    let url = loop {
        if let Some(status) = child.try_wait().context("check skiff-control")? {
            let _ = fs::remove_file(&pid_path);
            anyhow::bail!(
                "skiff-control exited during startup ({status}); the end of {}:\n{}",
                log.display(),
                log_tail(&log)
            );
        }
        let served = fs::read_to_string(&log).ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("skiff-control serving "))
                .map(|url| {
                    url.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string()
                })
        });
        if let Some(url) = served
            && readyz(&url, data_dir)
        {
            break url;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "skiff-control (pid {pid}) did not answer /readyz within 20 s; the end of {}:\n{}",
                log.display(),
                log_tail(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok((pid, url))
}

fn readyz(url: &str, data_dir: &Path) -> bool {
    let Ok(kubeconfig) = Kubeconfig::read(&data_dir.join("admin.kubeconfig")) else {
        return false;
    };
    let Ok(client) = kubeconfig.client() else {
        return false;
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return false;
    };
    runtime.block_on(async {
        client
            .get(format!("{url}/readyz"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
}

/// Stops what `up` started and removes what its node made (pods' processes, mounts, the
/// bridge, cgroups); the node first, so that no agent outlives its API server. Idempotent.
pub fn down(data_dir: &Path) -> anyhow::Result<()> {
    crate::node::stop(&crate::node::Layout::system(data_dir)?, true)?;
    stop_control(data_dir)
}

/// Stops the `skiff-control` whose pid file is in `data_dir`: SIGTERM, then SIGKILL after
/// 5 s.
pub fn stop_control(data_dir: &Path) -> anyhow::Result<()> {
    let pid_path = pid_file(data_dir);
    let Some(pid) = read_pid(data_dir) else {
        println!(
            "skiff-control is not running (no pid file {})",
            pid_path.display()
        );
        return Ok(());
    };
    if control_alive(pid) {
        signal(pid, "TERM")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while control_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if control_alive(pid) {
            println!("skiff-control (pid {pid}) ignored SIGTERM for 5 s: sending SIGKILL");
            signal(pid, "KILL")?;
            while control_alive(pid) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        println!("stopped skiff-control (pid {pid})");
    } else {
        println!("skiff-control (pid {pid}) was not running");
    }
    fs::remove_file(&pid_path).with_context(|| format!("remove {}", pid_path.display()))
}
