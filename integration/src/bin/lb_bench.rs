//! `lb-bench`, run by `cargo xtask bench lb` as root: connections per second and request
//! latency (a new TCP connection per request) from a client network namespace to backend pods
//! directly (the floor), to a ClusterIP through skiff's socket load balancer, and to a
//! ClusterIP through iptables rules laid out as kube-proxy's iptables mode writes them, each
//! with several Service counts; then the time skiff and `iptables-restore` take to program
//! the same Services.
//!
//! Everything lives in network namespaces, cgroups and a bpffs mount the bench creates under
//! unique names and removes at the end, also when it fails or is interrupted: a bridge in a
//! "node" namespace joins two client namespaces (one for direct and skiff, which never holds
//! a netfilter rule; one for iptables, whose own nat table holds kube-proxy's rules) and four
//! backend namespaces, each served by a thread of this process. Each measurement runs in a
//! child process (`lb-bench client`) that moves itself into a cgroup (the one skiff's socket
//! hooks are attached to, or a plain one) and enters a client namespace. The host's
//! interfaces and iptables are never touched.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nix::sched::{CloneFlags, setns};
use sha2::{Digest as _, Sha256};
use skiff_agent::lb::datapath::{Datapath, MapSizes};
use skiff_agent::lb::desired::{self, Frontend, NodeContext};
use skiff_agent::lb::programmer::Programmer;

/// Backend pods, each a network namespace with a server; every Service has all of them as
/// endpoints.
const BACKENDS: usize = 4;
const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
const SERVICE_PORT_NAME: &str = "http";
/// The namespace of the synthetic Services.
const NAMESPACE: &str = "lb-bench";
const NODE_NAME: &str = "lb-bench-node";
/// The pod network of the bench's namespaces, also kube-proxy's `--cluster-cidr` (the rules
/// masquerade traffic to a ClusterIP from outside it).
const POD_CIDR: &str = "10.250.0.0/16";
const POD_PREFIX_LEN: u8 = 16;
const DIRECT_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
const IPTABLES_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 3);
/// The service network; only the iptables client has a route to it (kube-proxy's rules
/// rewrite packets after the route lookup), so a ClusterIP connect() that skiff's hook did
/// not rewrite fails at once with "network unreachable" instead of measuring something else.
const SERVICE_CIDR: &str = "10.96.0.0/12";
/// kube-proxy's default masquerade bit (14), formatted as it formats it (`%#08x`).
const MASQUERADE_MARK: &str = "0x00004000";
/// The request and the reply, 8 bytes each; the reply names the backend.
const REQUEST: &[u8; 8] = b"request\n";
/// A client gives up after this many failed requests.
const MAX_FAILURES: usize = 10;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

const TARGET_WITHIN_DIRECT: f64 = 0.05;
const TARGET_OVER_IPTABLES: f64 = 1.5;
const TARGET_PROGRAM: Duration = Duration::from_secs(1);
const TARGET_PROGRAM_RATIO: f64 = 20.0;
const TARGET_CHANGE_P99: Duration = Duration::from_millis(50);
/// The Service count at which the ratio targets apply.
const TARGET_SCALE: usize = 10_000;

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "skiff's socket load balancer against a direct connection and kube-proxy's iptables rules",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Internal>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Subcommand)]
enum Internal {
    /// One measurement (run by the bench itself): N sequential new connections per thread.
    #[command(hide = true)]
    Client(ClientArgs),
    /// Prints kube-proxy's startup rules (`--base`) or its sync for N Services, as the
    /// bench restores them.
    #[command(hide = true)]
    Rules {
        #[arg(long, default_value_t = 1)]
        services: usize,
        #[arg(long)]
        base: bool,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// New TCP connections measured per case (direct, skiff, iptables) and Service count.
    #[arg(long, default_value_t = 3000)]
    connections: usize,
    /// Connections the client keeps in flight at once (one thread each).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Each case's connections are split into this many batches, the cases taking turns
    /// (each case's client waits between its batches), so that a change in the machine's
    /// load during the run hits every case alike.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Service counts (each with 4 endpoints), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    scales: Vec<usize>,
    /// The iptables backend for kube-proxy's rules: `nft` or `legacy` (default: the one
    /// `iptables` is on this machine).
    #[arg(long)]
    iptables: Option<String>,
    /// Times kube-proxy's own invocation, `iptables-restore --noflush --counters` after its
    /// startup chains, instead of one flushing restore of the same rules (the fastest way
    /// iptables loads them). iptables-nft 1.8.9 is quadratic in --noflush mode: about 9
    /// minutes for 10 000 Services on the 2-core development machine.
    #[arg(long)]
    noflush: bool,
    /// Services in the API server for the EndpointSlice change figure.
    #[arg(long, default_value_t = 1000)]
    change_services: usize,
    /// EndpointSlice changes measured (each removes or adds back one endpoint of another
    /// Service); 0 skips the figure.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// The skiff-control binary (default: the one next to this executable).
    #[arg(long)]
    control_binary: Option<PathBuf>,
    /// Where the temporary directory goes (default: the system temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keeps the temporary directory (the iptables-restore files); namespaces, cgroups and
    /// the bpffs mount are removed all the same.
    #[arg(long)]
    keep: bool,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// The network namespace to connect from (a file under /run/netns).
    #[arg(long)]
    netns: PathBuf,
    /// The cgroup v2 directory to move into first.
    #[arg(long)]
    cgroup: PathBuf,
    /// Where to connect, taken in turn; comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    targets: Vec<SocketAddrV4>,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Unmeasured connections first (ARP, caches).
    #[arg(long, default_value_t = 20)]
    warmup: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Internal::Client(args)) => client(&args),
        Some(Internal::Rules { services, base }) => {
            let rules = if base {
                kube_proxy_base_rules()
            } else {
                kube_proxy_sync_rules(services)
            };
            std::io::stdout()
                .write_all(rules.as_bytes())
                .context("write the rules")
        }
        None => bench(&cli.bench),
    }
}

// ---------------------------------------------------------------------------------------
// Cleanup.

/// What the bench created, removed by [`Leftovers::remove`]: the bpffs mount first (its
/// pinned links hold the hooks on the cgroups), then the cgroups, the namespaces (the node
/// namespace takes the bridge and every veth with it) and the temp dir unless kept.
#[derive(Default)]
struct Leftovers {
    bpffs: Option<PathBuf>,
    /// Deepest first.
    cgroups: Vec<PathBuf>,
    netns: Vec<String>,
    temp_dir: Option<PathBuf>,
    removed: bool,
}

impl Leftovers {
    fn remove(&mut self) {
        if std::mem::replace(&mut self.removed, true) {
            return;
        }
        if let Some(dir) = &self.bpffs
            && let Err(error) = nix::mount::umount2(dir.as_path(), nix::mount::MntFlags::MNT_DETACH)
        {
            eprintln!("bench cleanup: unmount bpffs {}: {error}", dir.display());
        }
        for cgroup in &self.cgroups {
            remove_cgroup(cgroup);
        }
        for name in &self.netns {
            let deleted = Command::new("ip")
                .args(["netns", "delete", name])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !deleted && Path::new("/run/netns").join(name).exists() {
                eprintln!("bench cleanup: ip netns delete {name} failed");
            }
        }
        if let Some(dir) = &self.temp_dir
            && let Err(error) = fs::remove_dir_all(dir)
        {
            eprintln!("bench cleanup: remove {}: {error}", dir.display());
        }
    }
}

/// Kills what is left in a cgroup of ours (a client of an interrupted run) and removes it.
fn remove_cgroup(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            // A cgroup is busy for a moment after its last process died.
            Err(error) if error.raw_os_error() == Some(16) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => {
                eprintln!("bench cleanup: remove cgroup {}: {error}", dir.display());
                return;
            }
        }
    }
}

/// Removes the leftovers when dropped (the bench ended or failed), or on ^C.
struct Cleanup(Arc<Mutex<Leftovers>>);

impl Cleanup {
    fn new() -> Self {
        let leftovers: Arc<Mutex<Leftovers>> = Arc::default();
        let on_interrupt = leftovers.clone();
        std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            if runtime.block_on(tokio::signal::ctrl_c()).is_ok() {
                eprintln!("interrupted: removing what the bench created");
                lock(&on_interrupt).remove();
                std::process::exit(130);
            }
        });
        Self(leftovers)
    }

    fn update(&self, change: impl FnOnce(&mut Leftovers)) {
        change(&mut lock(&self.0));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        lock(&self.0).remove();
    }
}

fn lock(leftovers: &Mutex<Leftovers>) -> MutexGuard<'_, Leftovers> {
    leftovers.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// Namespaces and the network.

/// The bench's network namespaces, by name (files under /run/netns).
struct Topology {
    node: String,
    direct_client: String,
    iptables_client: String,
    backends: Vec<String>,
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn backend_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 0, 10 + index as u8)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ip (iproute2)")?;
    ensure!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

impl Topology {
    /// Creates the namespaces, recording each in `cleanup` before it exists, and wires them.
    fn create(suffix: &str, cleanup: &Cleanup) -> anyhow::Result<Self> {
        let name = |role: &str| format!("skiff-lb-{suffix}-{role}");
        let topology = Topology {
            node: name("node"),
            direct_client: name("client"),
            iptables_client: name("ipt"),
            backends: (0..BACKENDS).map(|i| name(&format!("be{i}"))).collect(),
        };
        let all: Vec<String> = [
            &topology.node,
            &topology.direct_client,
            &topology.iptables_client,
        ]
        .into_iter()
        .chain(&topology.backends)
        .cloned()
        .collect();
        for netns in &all {
            cleanup.update(|l| l.netns.push(netns.clone()));
            ip(&["netns", "add", netns])?;
            ip(&["-n", netns, "link", "set", "lo", "up"])?;
        }
        let node = topology.node.as_str();
        ip(&["-n", node, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", node, "link", "set", "br0", "up"])?;
        let mut pods: Vec<(&str, Ipv4Addr, String)> = vec![
            (&topology.direct_client, DIRECT_CLIENT, "vclient".into()),
            (&topology.iptables_client, IPTABLES_CLIENT, "vipt".into()),
        ];
        for (index, backend) in topology.backends.iter().enumerate() {
            pods.push((backend, backend_address(index), format!("vbe{index}")));
        }
        for (netns, address, node_side) in &pods {
            ip(&[
                "-n", node, "link", "add", node_side, "type", "veth", "peer", "name", "eth0",
                "netns", netns,
            ])?;
            ip(&["-n", node, "link", "set", node_side, "master", "br0", "up"])?;
            let cidr = format!("{address}/{POD_PREFIX_LEN}");
            ip(&["-n", netns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        }
        ip(&[
            "-n",
            &topology.iptables_client,
            "route",
            "add",
            SERVICE_CIDR,
            "dev",
            "eth0",
        ])?;
        Ok(topology)
    }
}

/// Runs `work` on a thread of its own that entered the network namespace at `netns`: the
/// sockets it creates and the processes it spawns live there. Other threads are unaffected.
fn in_netns<T: Send>(netns: &Path, work: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    skiff_agent::sandbox::run_in_namespace(netns, skiff_agent::sandbox::Namespace::Net, work)
        .map_err(anyhow::Error::from)
}

/// Starts the server of backend `index` in its namespace: two threads accepting on one
/// listener; each connection reads the 8-byte request, answers with the backend's name and
/// closes (the server closes first, so TIME_WAIT stays on the backends' side). The threads
/// live as long as the process.
fn start_backend(netns: &Path, index: usize) -> anyhow::Result<()> {
    let address = SocketAddr::from((backend_address(index), BACKEND_PORT));
    let listener = in_netns(netns, || TcpListener::bind(address))?
        .with_context(|| format!("listen on {address} in {}", netns.display()))?;
    let reply = format!("backend{index}");
    for _ in 0..2 {
        let listener = listener.try_clone().context("clone the listener")?;
        let reply = reply.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = [0u8; REQUEST.len()];
                if stream.read_exact(&mut request).is_ok() {
                    let _ = stream.write_all(reply.as_bytes());
                }
            }
        });
    }
    Ok(())
}

/// The cgroup2 mount, from /proc/self/mountinfo.
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mount = skiff_agent::cgroups::find_cgroup2_mount(Path::new("/proc/self/mountinfo"))
        .context("find the cgroup2 mount")?;
    Ok(mount.mount_point)
}

// ---------------------------------------------------------------------------------------
// The client.

/// What one batch of connections measured (or several, merged).
#[derive(Default)]
struct Measured {
    /// Wall time of the measured connections, all threads.
    wall: Duration,
    latencies: Vec<Duration>,
    failures: usize,
    first_error: Option<String>,
    /// Replies per backend.
    per_backend: [usize; BACKENDS],
    /// Connections per second of each batch, to see how steady the machine was.
    batch_rates: Vec<f64>,
}

impl Measured {
    fn merge(&mut self, other: Measured) {
        self.batch_rates.push(other.connections_per_second());
        self.wall += other.wall;
        self.latencies.extend(other.latencies);
        self.failures += other.failures;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        for (sum, count) in self.per_backend.iter_mut().zip(other.per_backend) {
            *sum += count;
        }
    }

    fn connections_per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// The median of the batches' connections per second: a batch that another user of the
    /// machine slowed down moves it less than it moves the overall rate.
    fn median_batch_rate(&self) -> f64 {
        let mut rates = self.batch_rates.clone();
        rates.sort_by(f64::total_cmp);
        match rates.len() {
            0 => self.connections_per_second(),
            n if !n.is_multiple_of(2) => rates[n / 2],
            n => (rates[n / 2 - 1] + rates[n / 2]) / 2.0,
        }
    }
}

/// One request on a new connection: connect, send 8 bytes, read the reply to EOF, close.
/// Returns the backend that answered.
fn request(target: SocketAddrV4) -> anyhow::Result<usize> {
    let mut stream = TcpStream::connect_timeout(&target.into(), IO_TIMEOUT)
        .with_context(|| format!("connect to {target}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(REQUEST)?;
    let mut reply = Vec::with_capacity(16);
    stream
        .read_to_end(&mut reply)
        .with_context(|| format!("read the reply from {target}"))?;
    let backend = reply
        .strip_prefix(b"backend")
        .and_then(|digit| std::str::from_utf8(digit).ok())
        .and_then(|digit| digit.parse::<usize>().ok())
        .filter(|index| *index < BACKENDS);
    backend.with_context(|| {
        format!(
            "unexpected reply from {target}: {:?}",
            String::from_utf8_lossy(&reply)
        )
    })
}

/// `count` requests from `concurrency` threads, each sequential; the targets taken in turn.
fn run_batch(targets: &[SocketAddrV4], count: usize, concurrency: usize) -> Measured {
    let threads = concurrency.clamp(1, count.max(1));
    let started = Instant::now();
    let parts: Vec<Measured> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let count = count / threads + usize::from(thread < count % threads);
                scope.spawn(move || {
                    let mut measured = Measured {
                        latencies: Vec::with_capacity(count),
                        ..Measured::default()
                    };
                    for index in 0..count {
                        let target = targets[(index * threads + thread) % targets.len()];
                        let begin = Instant::now();
                        match request(target) {
                            Ok(backend) => {
                                measured.latencies.push(begin.elapsed());
                                measured.per_backend[backend] += 1;
                            }
                            Err(error) => {
                                measured.failures += 1;
                                measured.first_error.get_or_insert(format!("{error:#}"));
                                if measured.failures >= MAX_FAILURES {
                                    break;
                                }
                            }
                        }
                    }
                    measured
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_default())
            .collect()
    });
    let mut batch = Measured {
        wall: started.elapsed(),
        ..Measured::default()
    };
    for part in parts {
        batch.latencies.extend(part.latencies);
        batch.failures += part.failures;
        if batch.first_error.is_none() {
            batch.first_error = part.first_error;
        }
        for (sum, count) in batch.per_backend.iter_mut().zip(part.per_backend) {
            *sum += count;
        }
    }
    batch
}

/// The lines [`parse_batch`] reads, ending with `end`.
fn format_batch(batch: &Measured) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "wall_ns {}", batch.wall.as_nanos());
    let _ = writeln!(out, "failures {}", batch.failures);
    if let Some(error) = &batch.first_error {
        let _ = writeln!(out, "error {}", error.replace('\n', " "));
    }
    let counts: Vec<String> = batch.per_backend.iter().map(usize::to_string).collect();
    let _ = writeln!(out, "backends {}", counts.join(" "));
    for latency in &batch.latencies {
        let _ = writeln!(out, "{}", latency.as_nanos());
    }
    out += "end\n";
    out
}

/// `lb-bench client`: moves into the cgroup, enters the namespace, warms up, says `ready`,
/// then runs one batch per count read from stdin (until EOF) and prints what it measured.
fn client(args: &ClientArgs) -> anyhow::Result<()> {
    // "0" moves the writing process; this is still single-threaded, so all of it.
    let procs = args.cgroup.join("cgroup.procs");
    fs::write(&procs, "0").with_context(|| format!("join cgroup: write {}", procs.display()))?;
    let netns = fs::File::open(&args.netns)
        .with_context(|| format!("open network namespace {}", args.netns.display()))?;
    // Threads started later inherit the namespace.
    setns(&netns, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter network namespace {}", args.netns.display()))?;
    for index in 0..args.warmup {
        request(args.targets[index % args.targets.len()]).context("warm-up request")?;
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(b"ready\n")?;
    stdout.flush()?;
    for line in std::io::stdin().lines() {
        let line = line.context("read a batch size")?;
        let count: usize = line
            .trim()
            .parse()
            .with_context(|| format!("batch size {line:?}"))?;
        let batch = run_batch(&args.targets, count, args.concurrency);
        stdout.write_all(format_batch(&batch).as_bytes())?;
        stdout.flush()?;
    }
    Ok(())
}

/// Reads one batch's lines up to `end`.
fn parse_batch(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
) -> anyhow::Result<Measured> {
    let mut measured = Measured::default();
    for line in lines {
        let line = line.context("read the client's output")?;
        let (key, value) = line.split_once(' ').unwrap_or((&line, ""));
        match key {
            "end" => return Ok(measured),
            "wall_ns" => measured.wall = Duration::from_nanos(value.parse()?),
            "failures" => measured.failures = value.parse()?,
            "error" => measured.first_error = Some(value.to_string()),
            "backends" => {
                for (slot, count) in measured.per_backend.iter_mut().zip(value.split(' ')) {
                    *slot = count.parse()?;
                }
            }
            nanos => measured.latencies.push(Duration::from_nanos(
                nanos
                    .parse()
                    .with_context(|| format!("client output line {line:?}"))?,
            )),
        }
    }
    bail!("the client exited in the middle of a batch")
}

/// How one case reaches its backends.
struct Case {
    netns: PathBuf,
    cgroup: PathBuf,
    targets: Vec<SocketAddrV4>,
}

/// A running `lb-bench client` of one case, waiting for batches.
struct ClientProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: std::io::Lines<BufReader<ChildStdout>>,
    description: String,
}

impl ClientProcess {
    fn start(case: &Case, concurrency: usize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("find the bench's own executable")?;
        let targets: Vec<String> = case.targets.iter().map(ToString::to_string).collect();
        let description = format!(
            "lb-bench client to {} from {} in {}",
            targets.join(","),
            case.netns.display(),
            case.cgroup.display()
        );
        let mut child = Command::new(exe)
            .arg("client")
            .arg("--netns")
            .arg(&case.netns)
            .arg("--cgroup")
            .arg(&case.cgroup)
            .arg("--targets")
            .arg(targets.join(","))
            .args(["--concurrency", &concurrency.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {description}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("the client's stdout")?).lines();
        let mut process = Self {
            child,
            stdin,
            stdout,
            description,
        };
        match process.stdout.next() {
            Some(Ok(line)) if line == "ready" => Ok(process),
            _ => Err(process.failed()),
        }
    }

    /// Runs `count` connections; returns what they measured.
    fn batch(&mut self, count: usize) -> anyhow::Result<Measured> {
        let sent = self
            .stdin
            .as_mut()
            .map(|stdin| writeln!(stdin, "{count}").and_then(|()| stdin.flush()));
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.failed());
        }
        parse_batch(&mut self.stdout).map_err(|error| self.failed().context(error))
    }

    /// The error of a client that stopped answering, with what it said on stderr.
    fn failed(&mut self) -> anyhow::Error {
        self.stdin = None;
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
        anyhow::anyhow!("{} failed ({status}): {}", self.description, stderr.trim())
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        // EOF on stdin ends the client.
        self.stdin = None;
        let _ = self.child.wait();
    }
}
// ---------------------------------------------------------------------------------------
// The Services: synthetic API objects for skiff, kube-proxy's rules for iptables.

fn service_name(index: usize) -> String {
    format!("svc-{index:05}")
}

fn cluster_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + index as u32)
}

fn service_object(index: usize) -> Service {
    let address = cluster_ip(index).to_string();
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(index)),
            namespace: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(address.clone()),
            cluster_ips: Some(vec![address]),
            ports: Some(vec![ServicePort {
                name: Some(SERVICE_PORT_NAME.into()),
                port: i32::from(SERVICE_PORT),
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::Int(i32::from(BACKEND_PORT))),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn slice_object(index: usize) -> EndpointSlice {
    let name = service_name(index);
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-bench")),
            namespace: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([(
                desired::SERVICE_NAME_LABEL.to_string(),
                name,
            )])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: (0..BACKENDS)
            .map(|backend| Endpoint {
                addresses: vec![backend_address(backend).to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(NODE_NAME.into()),
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some(SERVICE_PORT_NAME.into()),
            port: Some(i32::from(BACKEND_PORT)),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// skiff's desired state for Services `0..count`, from the agent's own `desired` module.
fn frontends(count: usize) -> Vec<Frontend> {
    let node = NodeContext {
        node_name: NODE_NAME.into(),
        node_addresses: Vec::new(),
    };
    (0..count)
        .flat_map(|index| {
            let service = service_object(index);
            let slice = slice_object(index);
            desired::service_frontends(&service, &[&slice], &node)
        })
        .collect()
}

/// kube-proxy's `portProtoHash`: base32 (standard alphabet) of the SHA-256 of the service
/// port name and the lowercase protocol, first 16 characters.
fn port_proto_hash(service_port_name: &str, protocol: &str) -> String {
    base32_16(&Sha256::digest(format!("{service_port_name}{protocol}")))
}

/// kube-proxy's `servicePortEndpointChainName`, without the prefix.
fn endpoint_hash(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    base32_16(&Sha256::digest(format!(
        "{service_port_name}{protocol}{endpoint}"
    )))
}

/// The first 16 characters of the RFC 4648 base32 encoding of `bytes` (its first 80 bits).
fn base32_16(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bits = bytes[..10]
        .iter()
        .fold(0u128, |acc, byte| (acc << 8) | u128::from(*byte));
    (0..16)
        .map(|i| char::from(ALPHABET[((bits >> (75 - 5 * i)) & 31) as usize]))
        .collect()
}

/// The state kube-proxy sets up with `iptables` calls before its first sync: its top-level
/// chains and the jumps to them from the built-in chains (each prepended, hence the order).
/// Restored without `--noflush`, it also empties the tables of a previous scale.
fn kube_proxy_base_rules() -> String {
    let new = "-m conntrack --ctstate NEW";
    let jump = |chain: &str, extra: &str, comment: &str, target: &str| {
        let comment = if comment.is_empty() {
            String::new()
        } else {
            format!("-m comment --comment \"{comment}\" ")
        };
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!("{extra} ")
        };
        format!("-A {chain} {extra}{comment}-j {target}\n")
    };
    let mut rules =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for chain in [
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        let _ = writeln!(rules, ":{chain} - [0:0]");
    }
    let firewall = "kubernetes load balancer firewall";
    rules += &jump("INPUT", "", "", "KUBE-FIREWALL");
    rules += &jump("INPUT", new, firewall, "KUBE-PROXY-FIREWALL");
    rules += &jump(
        "INPUT",
        "",
        "kubernetes health check service ports",
        "KUBE-NODEPORTS",
    );
    rules += &jump(
        "INPUT",
        new,
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    );
    rules += &jump("FORWARD", new, firewall, "KUBE-PROXY-FIREWALL");
    rules += &jump("FORWARD", "", "kubernetes forwarding rules", "KUBE-FORWARD");
    rules += &jump(
        "FORWARD",
        new,
        "kubernetes service portals",
        "KUBE-SERVICES",
    );
    rules += &jump(
        "FORWARD",
        new,
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    );
    rules += &jump("OUTPUT", "", "", "KUBE-FIREWALL");
    rules += &jump("OUTPUT", new, firewall, "KUBE-PROXY-FIREWALL");
    rules += &jump("OUTPUT", new, "kubernetes service portals", "KUBE-SERVICES");
    rules += "COMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n";
    rules += &jump(
        "PREROUTING",
        "",
        "kubernetes service portals",
        "KUBE-SERVICES",
    );
    rules += &jump("OUTPUT", "", "kubernetes service portals", "KUBE-SERVICES");
    rules += &jump(
        "POSTROUTING",
        "",
        "kubernetes postrouting rules",
        "KUBE-POSTROUTING",
    );
    rules += "COMMIT\n";
    rules
}

/// What kube-proxy's iptables mode (`syncProxyRules`, a full sync) hands to
/// `iptables-restore --noflush` for Services `0..count`, each a ClusterIP with one TCP port
/// and [`BACKENDS`] ready endpoints, with `--cluster-cidr` [`POD_CIDR`] and the defaults
/// otherwise. The Services go in index order, so the last one is at the end of
/// KUBE-SERVICES (kube-proxy's order is that of a Go map: random).
fn kube_proxy_sync_rules(count: usize) -> String {
    // Above 1 000 endpoints kube-proxy drops the per-endpoint comments ("large cluster mode").
    let large_cluster = count * BACKENDS > 1000;
    let mut chains = String::new();
    let mut rules = String::new();
    chains += "*nat\n";
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN"
    );
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}"
    );
    rules += "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n";
    let _ = writeln!(
        rules,
        "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}"
    );
    for index in 0..count {
        let port_name = format!("{NAMESPACE}/{}:{SERVICE_PORT_NAME}", service_name(index));
        let service_chain = format!("KUBE-SVC-{}", port_proto_hash(&port_name, "tcp"));
        let address = cluster_ip(index);
        let _ = writeln!(chains, ":{service_chain} - [0:0]");
        let capture = format!(
            "-m comment --comment \"{port_name} cluster IP\" -m tcp -p tcp -d {address} --dport {SERVICE_PORT}"
        );
        let _ = writeln!(rules, "-A KUBE-SERVICES {capture} -j {service_chain}");
        let _ = writeln!(
            rules,
            "-A {service_chain} {capture} ! -s {POD_CIDR} -j KUBE-MARK-MASQ"
        );
        let endpoints: Vec<(String, String)> = (0..BACKENDS)
            .map(|backend| {
                let endpoint = format!("{}:{BACKEND_PORT}", backend_address(backend));
                let chain = format!("KUBE-SEP-{}", endpoint_hash(&port_name, "tcp", &endpoint));
                (endpoint, chain)
            })
            .collect();
        for (position, (endpoint, endpoint_chain)) in endpoints.iter().enumerate() {
            rules += &format!("-A {service_chain}");
            if !large_cluster {
                let _ = write!(rules, " -m comment --comment \"{port_name} -> {endpoint}\"");
            }
            let remaining = BACKENDS - position;
            if remaining > 1 {
                let _ = write!(
                    rules,
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / remaining as f64
                );
            }
            let _ = writeln!(rules, " -j {endpoint_chain}");
        }
        for (endpoint, endpoint_chain) in &endpoints {
            let _ = writeln!(chains, ":{endpoint_chain} - [0:0]");
            let comment = if large_cluster {
                String::new()
            } else {
                format!(" -m comment --comment {port_name}")
            };
            let (endpoint_ip, _) = endpoint.split_once(':').unwrap_or((endpoint, ""));
            let _ = writeln!(
                rules,
                "-A {endpoint_chain}{comment} -s {endpoint_ip} -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {endpoint_chain}{comment} -m tcp -p tcp -j DNAT --to-destination {endpoint}"
            );
        }
    }
    rules += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
    rules += "COMMIT\n";
    // The filter table of a sync where every Service has endpoints: no per-Service rule.
    let filter = format!(
        "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-FIREWALL - [0:0]\n\
         -A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n"
    );
    filter + &chains + &rules
}

/// One iptables-restore input holding the tables of several, in the order given: without
/// `--noflush` each `*table` section empties its table, so each table appears once, its
/// chains declared once (built-in chains first, as they came), then every rule in order.
fn merge_restore_files(files: &[&str]) -> String {
    // (table, declarations, rules), in the order the tables first appear.
    let mut tables: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for file in files {
        let mut current: Option<usize> = None;
        for line in file.lines() {
            if let Some(table) = line.strip_prefix('*') {
                let index = match tables.iter().position(|(name, _, _)| name == table) {
                    Some(index) => index,
                    None => {
                        tables.push((table.to_string(), Vec::new(), Vec::new()));
                        tables.len() - 1
                    }
                };
                current = Some(index);
            } else if line == "COMMIT" {
                current = None;
            } else if let Some(index) = current {
                let (_, declarations, rules) = &mut tables[index];
                if let Some(declaration) = line.strip_prefix(':') {
                    let chain = declaration.split(' ').next().unwrap_or_default();
                    let declared = declarations
                        .iter()
                        .any(|d| d[1..].split(' ').next() == Some(chain));
                    if !declared {
                        declarations.push(line.to_string());
                    }
                } else {
                    rules.push(line.to_string());
                }
            }
        }
    }
    let mut out = String::new();
    for (table, declarations, rules) in tables {
        let _ = writeln!(out, "*{table}");
        for line in declarations.iter().chain(&rules) {
            let _ = writeln!(out, "{line}");
        }
        out += "COMMIT\n";
    }
    out
}

/// Which iptables kube-proxy's rules go through.
struct Iptables {
    /// `nft` or `legacy`.
    variant: String,
    version: String,
}

impl Iptables {
    fn detect(requested: Option<&str>) -> anyhow::Result<Self> {
        let output = Command::new("iptables")
            .arg("--version")
            .output()
            .context("run iptables --version (is iptables installed?)")?;
        let system = String::from_utf8_lossy(&output.stdout).trim().to_string();
        let variant = match requested {
            Some(variant @ ("nft" | "legacy")) => variant.to_string(),
            Some(other) => bail!("--iptables {other}: expected nft or legacy"),
            None if system.contains("legacy") => "legacy".into(),
            None => "nft".into(),
        };
        let restore = format!("iptables-{variant}-restore");
        let output = Command::new(&restore)
            .arg("--version")
            .output()
            .with_context(|| format!("run {restore} --version"))?;
        let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
        Ok(Self { variant, version })
    }

    fn restore_binary(&self) -> String {
        format!("iptables-{}-restore", self.variant)
    }

    /// `iptables-restore` of `rules` inside `netns`; `noflush` as kube-proxy syncs. Returns
    /// the wall time of the process, start to exit.
    fn restore(&self, netns: &Path, rules: &Path, noflush: bool) -> anyhow::Result<Duration> {
        let binary = self.restore_binary();
        let input = fs::File::open(rules).with_context(|| format!("open {}", rules.display()))?;
        let (elapsed, output) = in_netns(netns, move || {
            let mut command = Command::new(&binary);
            // kube-proxy's flags: wait for the xtables lock; keep counters.
            command.args(["-w", "5", "-W", "100000"]);
            if noflush {
                command.args(["--noflush", "--counters"]);
            }
            let started = Instant::now();
            let output = command
                .stdin(input)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output();
            (started.elapsed(), output)
        })?;
        let output = output.with_context(|| format!("run {}", self.restore_binary()))?;
        ensure!(
            output.status.success(),
            "{} < {} in {}: {}\n{}",
            self.restore_binary(),
            rules.display(),
            netns.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(elapsed)
    }
}

// ---------------------------------------------------------------------------------------
// EndpointSlice changes: through the API server and the agent's sync loop to the maps.

/// A `skiff-control serve` of the bench's own, on a data dir in the temp dir; killed when
/// dropped.
struct ControlServer {
    child: Child,
    kubeconfig: PathBuf,
}

impl ControlServer {
    fn start(binary: &Path, data_dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
        let log_path = data_dir.join("skiff-control.log");
        let log = fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let mut child = Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let stdout = child.stdout.take().context("skiff-control's stdout")?;
        let (sender, receiver) = std::sync::mpsc::channel();
        // Reads stdout to the end, so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("skiff-control serving ") {
                    let _ = sender.send(());
                }
            }
        });
        let server = Self {
            child,
            kubeconfig: data_dir.join("admin.kubeconfig"),
        };
        receiver
            .recv_timeout(Duration::from_secs(30))
            .with_context(|| {
                format!(
                    "{} did not say it was serving within 30 s; see {}",
                    binary.display(),
                    log_path.display()
                )
            })?;
        Ok(server)
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the EndpointSlice changes measured, each from just before the API request.
struct ChangeResult {
    services: usize,
    /// Until the API server answered the write.
    write: Vec<Duration>,
    /// Until the bench saw the new endpoint count in the pinned services map.
    maps: Vec<Duration>,
    /// Changes not seen in the maps within [`CHANGE_TIMEOUT`].
    timeouts: usize,
    /// From the sync loop's start until the maps held every Service.
    initial_sync: Duration,
}

const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// The Service of the change figure: the API allocates the ClusterIP.
fn api_service_object(index: usize) -> Service {
    let mut service = service_object(index);
    if let Some(spec) = service.spec.as_mut() {
        spec.cluster_ip = None;
        spec.cluster_ips = None;
    }
    service
}

/// An EndpointSlice that no controller of the API server's manages.
fn api_slice_object(index: usize) -> EndpointSlice {
    let mut slice = slice_object(index);
    if let Some(labels) = slice.metadata.labels.as_mut() {
        labels.insert(
            "endpointslice.kubernetes.io/managed-by".into(),
            "lb-bench".into(),
        );
    }
    slice
}

/// Creates the namespace, `count` Services and their slices through the API; returns the
/// Services' ClusterIPs and slices, by index.
async fn create_api_objects(
    client: &kube::Client,
    count: usize,
) -> anyhow::Result<Vec<(Ipv4Addr, EndpointSlice)>> {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, PostParams};

    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(error).context("create namespace lb-bench"),
    }
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let created: Vec<anyhow::Result<(usize, Ipv4Addr, EndpointSlice)>> =
        futures::stream::iter(0..count)
            .map(|index| {
                let services = services.clone();
                let slices = slices.clone();
                async move {
                    let service = services
                        .create(&PostParams::default(), &api_service_object(index))
                        .await
                        .with_context(|| format!("create Service {}", service_name(index)))?;
                    let address: Ipv4Addr = service
                        .spec
                        .as_ref()
                        .and_then(|spec| spec.cluster_ip.as_deref())
                        .and_then(|address| address.parse().ok())
                        .with_context(|| {
                            format!("Service {} got no IPv4 ClusterIP", service_name(index))
                        })?;
                    let slice = slices
                        .create(&PostParams::default(), &api_slice_object(index))
                        .await
                        .with_context(|| {
                            format!("create the EndpointSlice of {}", service_name(index))
                        })?;
                    Ok((index, address, slice))
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
    let mut objects: Vec<(usize, Ipv4Addr, EndpointSlice)> =
        created.into_iter().collect::<anyhow::Result<_>>()?;
    objects.sort_by_key(|(index, _, _)| *index);
    Ok(objects
        .into_iter()
        .map(|(_, address, slice)| (address, slice))
        .collect())
}

/// The endpoint count skiff's services map holds for a ClusterIP (its slot 0), if any.
fn endpoint_count(
    map: &aya::maps::HashMap<
        aya::maps::MapData,
        skiff_ebpf::lb::Lb4Key,
        skiff_ebpf::lb::Lb4Service,
    >,
    address: Ipv4Addr,
) -> Option<u16> {
    let key = skiff_ebpf::lb::Lb4Key::new(
        address,
        SERVICE_PORT,
        skiff_ebpf::lb::IPPROTO_TCP,
        skiff_ebpf::lb::SCOPE_INTERNAL,
        0,
    );
    map.get(&key, 0).ok().map(|service| service.count)
}

/// Starts skiff-control, creates the Services and slices, runs the agent's sync loop
/// (`skiff_agent::lb::sync::run`) on fresh maps and times each slice change from the API
/// request until the pinned services map shows it.
fn measure_changes(args: &BenchArgs, root: &Path, bpffs: &Path) -> anyhow::Result<ChangeResult> {
    use kube::api::{Api, PostParams};

    let binary = match &args.control_binary {
        Some(binary) => binary.clone(),
        None => std::env::current_exe()
            .context("find the bench's own executable")?
            .with_file_name("skiff-control"),
    };
    ensure!(
        binary.exists(),
        "{} not found: build it (`cargo build --release -p skiff-control`) or pass \
         --control-binary, or --changes 0 to skip the EndpointSlice figure",
        binary.display()
    );
    let control = ControlServer::start(&binary, &root.join("control"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("build the tokio runtime")?;
    let client = runtime
        .block_on(async {
            let kubeconfig = kube::config::Kubeconfig::read_from(&control.kubeconfig)?;
            let config = kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?;
            anyhow::Ok(kube::Client::try_from(config)?)
        })
        .with_context(|| format!("a client from {}", control.kubeconfig.display()))?;
    let created = Instant::now();
    let mut objects = runtime.block_on(create_api_objects(&client, args.change_services))?;
    println!(
        "    created {} Services and their EndpointSlices in {:.1} s",
        grouped(args.change_services),
        created.elapsed().as_secs_f64()
    );

    let pins = bpffs.join("sync");
    fs::create_dir_all(&pins).with_context(|| format!("create {}", pins.display()))?;
    let datapath = Datapath::load(&pins, &map_sizes(args.change_services))
        .with_context(|| format!("load skiff's datapath under {}", pins.display()))?;
    let programmer = Programmer::new(datapath).context("start skiff's programmer")?;
    let map_pin = pins.join(skiff_ebpf::lb::SERVICES_MAP);
    let map = aya::maps::MapData::from_pin(&map_pin)
        .with_context(|| format!("open the pinned map {}", map_pin.display()))?;
    let map: aya::maps::HashMap<_, skiff_ebpf::lb::Lb4Key, skiff_ebpf::lb::Lb4Service> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map))
            .context("the services map's type")?;

    let node = NodeContext {
        node_name: NODE_NAME.into(),
        node_addresses: Vec::new(),
    };
    let sync_started = Instant::now();
    let sync = runtime.spawn(skiff_agent::lb::sync::run(client.clone(), node, programmer));
    let deadline = Instant::now() + Duration::from_secs(60);
    while objects
        .iter()
        .any(|(address, _)| endpoint_count(&map, *address) != Some(BACKENDS as u16))
    {
        ensure!(
            Instant::now() < deadline && !sync.is_finished(),
            "the sync loop did not program the {} Services within 60 s",
            args.change_services
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let initial_sync = sync_started.elapsed();

    let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
    let mut result = ChangeResult {
        services: args.change_services,
        write: Vec::new(),
        maps: Vec::new(),
        timeouts: 0,
        initial_sync,
    };
    for (address, slice) in objects.iter_mut().take(args.changes) {
        let mut changed = slice.clone();
        changed.endpoints.truncate(BACKENDS - 1);
        let expected = changed.endpoints.len() as u16;
        let name = changed.metadata.name.clone().unwrap_or_default();
        let api = slices.clone();
        let started = Instant::now();
        let write = runtime.spawn(async move {
            let answer = api.replace(&name, &PostParams::default(), &changed).await;
            (Instant::now(), answer)
        });
        let seen = loop {
            if endpoint_count(&map, *address) == Some(expected) {
                break Some(Instant::now());
            }
            if started.elapsed() > CHANGE_TIMEOUT {
                break None;
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        let (answered, answer) = runtime
            .block_on(write)
            .context("the EndpointSlice write task")?;
        *slice = answer.context("replace an EndpointSlice")?;
        result.write.push(answered - started);
        match seen {
            Some(seen) => result.maps.push(seen - started),
            None => result.timeouts += 1,
        }
        // Changes apart, as they come in a cluster, not one queued behind the other.
        std::thread::sleep(Duration::from_millis(5));
    }
    sync.abort();
    drop(runtime);
    drop(control);
    Ok(result)
}

// ---------------------------------------------------------------------------------------
// The bench.

/// Nearest-rank percentile of sorted `values`.
fn percentile(sorted: &[Duration], percent: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

/// `10000` as "10 000".
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(digit);
    }
    out
}

fn services_label(count: usize) -> String {
    format!(
        "{} Service{}",
        grouped(count),
        if count == 1 { "" } else { "s" }
    )
}

/// One scale's measurements.
struct ScaleResult {
    services: usize,
    direct: Measured,
    skiff: Measured,
    iptables: Measured,
    skiff_desired: Duration,
    skiff_program: Duration,
    iptables_program: Duration,
    iptables_rules: usize,
}

struct Summary {
    /// The median batch's.
    connections_per_second: f64,
    /// All connections over all the batches' wall time.
    overall_rate: f64,
    p50: Duration,
    p99: Duration,
    n: usize,
}

fn summarize(measured: &mut Measured) -> Summary {
    measured.latencies.sort();
    Summary {
        connections_per_second: measured.median_batch_rate(),
        overall_rate: measured.connections_per_second(),
        p50: percentile(&measured.latencies, 50.0),
        p99: percentile(&measured.latencies, 99.0),
        n: measured.latencies.len(),
    }
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    ensure!(
        args.connections > 0 && args.rounds > 0 && args.concurrency > 0,
        "--connections, --rounds and --concurrency must be at least 1"
    );
    ensure!(
        !args.scales.is_empty() && args.scales.iter().all(|n| *n > 0),
        "--scales needs Service counts of at least 1"
    );
    ensure!(
        args.changes <= args.change_services,
        "--changes: at most one per Service (--change-services)"
    );
    ensure!(
        args.scales.iter().all(|n| *n <= 500_000),
        "--scales: at most 500 000 Services (the service network and the maps)"
    );
    ensure!(
        nix::unistd::geteuid().is_root(),
        "lb-bench creates network namespaces, cgroups and a bpffs mount: run it as root"
    );
    let iptables = Iptables::detect(args.iptables.as_deref())?;
    let temp = match &args.dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("skiff-lb-bench-")
            .tempdir_in(dir),
        None => tempfile::Builder::new().prefix("skiff-lb-bench-").tempdir(),
    }
    .context("create the bench's temp dir")?;
    let root = temp.path().to_path_buf();
    let suffix: String = root
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("skiff-lb-bench-")
                .to_lowercase()
        })
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(6)
        .collect();
    // The guard removes the directory (unless kept), after the mount in it is gone.
    let _ = temp.keep();
    let cleanup = Cleanup::new();
    cleanup.update(|l| l.temp_dir = (!args.keep).then(|| root.clone()));
    if args.keep {
        println!("keeping {}", root.display());
    }

    println!("==> topology: network namespaces skiff-lb-{suffix}-*, a bridge, 4 backend servers");
    let topology = Topology::create(&suffix, &cleanup)?;
    for (index, backend) in topology.backends.iter().enumerate() {
        start_backend(&netns_path(backend), index)?;
    }
    let cgroup_parent = cgroup2_root()?.join(format!("skiff-lb-bench-{suffix}"));
    let plain_cgroup = cgroup_parent.join("plain");
    cleanup.update(|l| {
        l.cgroups.push(plain_cgroup.clone());
        l.cgroups.push(cgroup_parent.clone());
    });
    fs::create_dir_all(&plain_cgroup)
        .with_context(|| format!("create cgroup {}", plain_cgroup.display()))?;
    let bpffs = root.join("bpffs");
    fs::create_dir_all(&bpffs).with_context(|| format!("create {}", bpffs.display()))?;
    cleanup.update(|l| l.bpffs = Some(bpffs.clone()));
    nix::mount::mount(
        Some("bpf"),
        &bpffs,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount a bpffs at {}", bpffs.display()))?;

    let max_scale = args.scales.iter().copied().max().unwrap_or(1);
    let sizes = map_sizes(max_scale);
    let direct_targets: Vec<SocketAddrV4> = (0..BACKENDS)
        .map(|backend| SocketAddrV4::new(backend_address(backend), BACKEND_PORT))
        .collect();
    let load_before = fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();

    let mut results = Vec::new();
    for &services in &args.scales {
        println!(
            "==> {}: program skiff and iptables",
            services_label(services)
        );
        // skiff: maps of their own (a fresh pin directory), hooks on a cgroup of their own.
        let lb_cgroup = cgroup_parent.join(format!("lb-{services}"));
        cleanup.update(|l| l.cgroups.insert(0, lb_cgroup.clone()));
        fs::create_dir_all(&lb_cgroup)
            .with_context(|| format!("create cgroup {}", lb_cgroup.display()))?;
        let pins = bpffs.join(format!("scale-{services}"));
        fs::create_dir_all(&pins).with_context(|| format!("create {}", pins.display()))?;
        let mut datapath = Datapath::load(&pins, &sizes)
            .with_context(|| format!("load skiff's datapath under {}", pins.display()))?;
        datapath
            .attach_cgroup(&lb_cgroup)
            .with_context(|| format!("attach skiff's hooks to {}", lb_cgroup.display()))?;
        let mut programmer = Programmer::new(datapath).context("start skiff's programmer")?;
        let desired_started = Instant::now();
        let desired = frontends(services);
        let skiff_desired = desired_started.elapsed();
        ensure!(
            desired.len() >= services,
            "skiff's desired state has {} frontends for {services} ClusterIP Services",
            desired.len()
        );
        let program_started = Instant::now();
        programmer
            .apply_all(desired)
            .context("program skiff's maps")?;
        let skiff_program = program_started.elapsed();

        // iptables: kube-proxy's rules into tables emptied of the previous scale's.
        let ipt_netns = netns_path(&topology.iptables_client);
        let base_rules = kube_proxy_base_rules();
        let sync_rules = kube_proxy_sync_rules(services);
        let iptables_rules = (base_rules.clone() + &sync_rules)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count();
        let iptables_program = if args.noflush {
            // As kube-proxy: its startup chains (untimed), then its sync with --noflush.
            let base = root.join("kube-proxy-base.rules");
            fs::write(&base, base_rules).with_context(|| format!("write {}", base.display()))?;
            iptables.restore(&ipt_netns, &base, false)?;
            let sync = root.join(format!("kube-proxy-sync-{services}.rules"));
            fs::write(&sync, sync_rules).with_context(|| format!("write {}", sync.display()))?;
            iptables.restore(&ipt_netns, &sync, true)?
        } else {
            // The same final tables in one restore, which also flushes the previous scale's.
            let all = root.join(format!("kube-proxy-{services}.rules"));
            fs::write(&all, merge_restore_files(&[&base_rules, &sync_rules]))
                .with_context(|| format!("write {}", all.display()))?;
            iptables.restore(&ipt_netns, &all, false)?
        };
        println!(
            "    skiff apply_all {:.1} ms; {} of {} rules {:.1} ms",
            ms(skiff_program),
            iptables.restore_binary(),
            grouped(iptables_rules),
            ms(iptables_program)
        );

        let service_target = SocketAddrV4::new(cluster_ip(services - 1), SERVICE_PORT);
        let cases = [
            Case {
                netns: netns_path(&topology.direct_client),
                cgroup: plain_cgroup.clone(),
                targets: direct_targets.clone(),
            },
            Case {
                netns: netns_path(&topology.direct_client),
                cgroup: lb_cgroup.clone(),
                targets: vec![service_target],
            },
            Case {
                netns: ipt_netns.clone(),
                cgroup: plain_cgroup.clone(),
                targets: vec![service_target],
            },
        ];
        println!(
            "==> {}: {} connections per case in {} rounds",
            services_label(services),
            args.connections,
            args.rounds
        );
        let mut clients = cases
            .iter()
            .map(|case| ClientProcess::start(case, args.concurrency))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut measured: [Measured; 3] = Default::default();
        for round in 0..args.rounds {
            let count = args.connections / args.rounds
                + usize::from(round < args.connections % args.rounds);
            // Each round starts with another case, so none always runs first.
            for offset in 0..clients.len() {
                let which = (round + offset) % clients.len();
                let batch = clients[which].batch(count)?;
                measured[which].merge(batch);
            }
        }
        drop(clients);
        drop(programmer);
        let [direct, skiff, iptables_measured] = measured;
        results.push(ScaleResult {
            services,
            direct,
            skiff,
            iptables: iptables_measured,
            skiff_desired,
            skiff_program,
            iptables_program,
            iptables_rules,
        });
    }
    let changes = if args.changes == 0 {
        None
    } else {
        println!(
            "==> EndpointSlice changes: skiff-control with {}, the agent's sync loop, {} changes",
            services_label(args.change_services),
            args.changes
        );
        Some(measure_changes(args, &root, &bpffs)?)
    };
    let load_after = fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();

    report(
        args,
        &iptables,
        &mut results,
        changes,
        &load_before,
        &load_after,
    );
    println!("==> cleanup");
    drop(cleanup);
    println!("removed the namespaces, cgroups and bpffs mount");
    Ok(())
}

/// Map sizes for `services` Services of [`BACKENDS`] endpoints, with room to spare.
fn map_sizes(services: usize) -> MapSizes {
    let services = u32::try_from(services).unwrap_or(u32::MAX);
    let backends = services.saturating_mul(BACKENDS as u32);
    MapSizes {
        services: services
            .saturating_add(backends)
            .saturating_mul(5)
            .div_ceil(4)
            .max(1024),
        backends: backends.saturating_mul(5).div_ceil(4).max(1024),
        reverse_sk: 65_536,
        affinity: 1024,
    }
}

fn report(
    args: &BenchArgs,
    iptables: &Iptables,
    results: &mut [ScaleResult],
    changes: Option<ChangeResult>,
    load_before: &str,
    load_after: &str,
) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let per_batch = args.connections / args.rounds;
    println!();
    println!(
        "ClusterIP connections: skiff's socket LB vs kube-proxy's iptables mode \
         ({iptables_version}), release build",
        iptables_version = iptables.version
    );
    println!(
        "  {cpus} CPUs, load average {load_before} before and {load_after} after: other users \
         of the machine slow every case alike (the cases take turns in {} batches of {per_batch})",
        args.rounds
    );
    println!(
        "  each request: a new TCP connection, 8 bytes each way, closed by the backend; {} per \
         case, {} at a time; {BACKENDS} backend pods on a bridge",
        args.connections, args.concurrency
    );
    println!(
        "  the client connects to the last Service, at the end of KUBE-SERVICES (iptables' \
         worst case); direct and skiff clients run in a namespace without netfilter rules"
    );
    println!(
        "  conn/s: the median batch's (all: every connection over the batches' summed wall \
         time); latency: connect to the reply's EOF, over all connections"
    );
    println!();
    println!(
        "  {:<46} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "", "conn/s", "all", "p50 ms", "p99 ms", "n"
    );
    let mut problems = Vec::new();
    for result in results.iter_mut() {
        let label = services_label(result.services);
        let direct = summarize(&mut result.direct);
        let skiff = summarize(&mut result.skiff);
        let ipt = summarize(&mut result.iptables);
        println!("  {label}");
        for (name, summary, measured) in [
            (
                "direct to the backend pods (floor)",
                &direct,
                &result.direct,
            ),
            ("skiff ClusterIP (socket LB)", &skiff, &result.skiff),
            (
                "iptables ClusterIP (kube-proxy's rules)",
                &ipt,
                &result.iptables,
            ),
        ] {
            println!(
                "    {:<44} {:>8.0} {:>8.0} {:>8.3} {:>8.3} {:>6}",
                name,
                summary.connections_per_second,
                summary.overall_rate,
                ms(summary.p50),
                ms(summary.p99),
                summary.n
            );
            if measured.failures > 0 {
                problems.push(format!(
                    "{label}, {name}: {} failed requests ({})",
                    measured.failures,
                    measured.first_error.as_deref().unwrap_or("?")
                ));
            }
            if measured.per_backend.contains(&0) {
                problems.push(format!(
                    "{label}, {name}: not every backend answered (replies per backend {:?})",
                    measured.per_backend
                ));
            }
        }
        let rate = |a: f64, b: f64| a / b.max(1e-9);
        let time = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-12);
        let skiff_rate = rate(skiff.connections_per_second, direct.connections_per_second);
        let skiff_p50 = time(skiff.p50, direct.p50);
        let within =
            skiff_rate >= 1.0 - TARGET_WITHIN_DIRECT && skiff_p50 <= 1.0 + TARGET_WITHIN_DIRECT;
        println!(
            "    {:<44} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>6}   target within {:.0}% (conn/s, \
             p50): {}",
            "skiff / direct",
            skiff_rate,
            rate(skiff.overall_rate, direct.overall_rate),
            skiff_p50,
            time(skiff.p99, direct.p99),
            "",
            TARGET_WITHIN_DIRECT * 100.0,
            verdict(within)
        );
        let over_iptables = rate(skiff.connections_per_second, ipt.connections_per_second);
        let target = if result.services == TARGET_SCALE {
            format!(
                "   target conn/s >= {TARGET_OVER_IPTABLES}x: {}",
                verdict(over_iptables >= TARGET_OVER_IPTABLES)
            )
        } else {
            String::new()
        };
        println!(
            "    {:<44} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>6}{target}",
            "skiff / iptables (conn/s: higher is better)",
            over_iptables,
            rate(skiff.overall_rate, ipt.overall_rate),
            time(skiff.p50, ipt.p50),
            time(skiff.p99, ipt.p99),
            ""
        );
    }

    println!();
    println!(
        "programming N Services x {BACKENDS} endpoints into empty maps / tables (one run each)"
    );
    println!(
        "  {:<16} {:>12} {:>22} {:>9}",
        "", "skiff ms", "iptables-restore ms", "ratio"
    );
    for result in results.iter() {
        let ratio =
            result.iptables_program.as_secs_f64() / result.skiff_program.as_secs_f64().max(1e-9);
        let target = if result.services == TARGET_SCALE {
            format!(
                "   target skiff < {} s: {}, ratio >= {TARGET_PROGRAM_RATIO}x: {}",
                TARGET_PROGRAM.as_secs(),
                verdict(result.skiff_program < TARGET_PROGRAM),
                verdict(ratio >= TARGET_PROGRAM_RATIO)
            )
        } else {
            String::new()
        };
        println!(
            "  {:<16} {:>12.1} {:>22.1} {:>8.1}x{target}",
            services_label(result.services),
            ms(result.skiff_program),
            ms(result.iptables_program),
            ratio
        );
    }
    let desired: Vec<String> = results
        .iter()
        .map(|r| format!("{:.1} ms at {}", ms(r.skiff_desired), grouped(r.services)))
        .collect();
    println!(
        "  skiff: Programmer::apply_all of the frontends into fresh maps (computing them from \
         the Service and EndpointSlice objects took {} more)",
        desired.join(", ")
    );
    let rules = results.last().map_or(0, |r| r.iptables_rules);
    if args.noflush {
        println!(
            "  iptables: {} -w 5 -W 100000 --noflush --counters of kube-proxy's sync after its \
             startup chains, as kube-proxy runs it; process start to exit ({} rules at the \
             last scale)",
            iptables.restore_binary(),
            grouped(rules)
        );
    } else {
        println!(
            "  iptables: one {} of kube-proxy's startup chains and sync together ({} rules at \
             the last scale), process start to exit; kube-proxy itself restores with \
             --noflush, which iptables-nft 1.8.9 does in quadratic time (--noflush to time it)",
            iptables.restore_binary(),
            grouped(rules)
        );
    }
    if !results.iter().any(|r| r.services == TARGET_SCALE) {
        println!(
            "  (the ratio and programming targets apply at {} Services, not among --scales)",
            grouped(TARGET_SCALE)
        );
    }

    println!();
    match changes {
        None => println!("EndpointSlice change -> skiff's maps: not measured (--changes 0)"),
        Some(mut changes) => {
            changes.write.sort();
            changes.maps.sort();
            println!(
                "EndpointSlice change -> skiff's maps: {} Services in skiff-control, the agent's \
                 sync loop (skiff_agent::lb::sync::run) on fresh maps; each change replaces a \
                 slice without one of its endpoints, timed from the API request",
                grouped(changes.services)
            );
            println!(
                "  {:<46} {:>8} {:>8} {:>8} {:>6}",
                "", "p50 ms", "p99 ms", "max ms", "n"
            );
            let max = |values: &[Duration]| values.last().copied().unwrap_or_default();
            println!(
                "  {:<46} {:>8.2} {:>8.2} {:>8.2} {:>6}",
                "API server answered the write",
                ms(percentile(&changes.write, 50.0)),
                ms(percentile(&changes.write, 99.0)),
                ms(max(&changes.write)),
                changes.write.len()
            );
            let p99 = percentile(&changes.maps, 99.0);
            println!(
                "  {:<46} {:>8.2} {:>8.2} {:>8.2} {:>6}   target p99 < {} ms: {}",
                "the services map holds the new endpoints",
                ms(percentile(&changes.maps, 50.0)),
                ms(p99),
                ms(max(&changes.maps)),
                changes.maps.len(),
                TARGET_CHANGE_P99.as_millis(),
                verdict(changes.timeouts == 0 && p99 < TARGET_CHANGE_P99)
            );
            println!(
                "  (the sync loop's first list of the {} Services reached the maps in {:.0} ms; \
                 the map is polled every 0.1 ms)",
                grouped(changes.services),
                ms(changes.initial_sync)
            );
            if changes.timeouts > 0 {
                problems.push(format!(
                    "{} EndpointSlice changes not in the maps after {} s",
                    changes.timeouts,
                    CHANGE_TIMEOUT.as_secs()
                ));
            }
        }
    }
    if !problems.is_empty() {
        println!();
        println!("problems:");
        for problem in &problems {
            println!("  {problem}");
        }
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chain names seen in every kubeadm cluster's iptables-save.
    #[test]
    fn chain_hash_matches_kube_proxy() {
        assert_eq!(
            port_proto_hash("default/kubernetes:https", "tcp"),
            "NPX46M4PTMTKRN6Y"
        );
        assert_eq!(
            port_proto_hash("kube-system/kube-dns:dns", "udp"),
            "TCOU7JCQXEZGVUNU"
        );
        assert_eq!(
            port_proto_hash("kube-system/kube-dns:dns-tcp", "tcp"),
            "ERIFXISQEP7F7OF4"
        );
        assert_eq!(
            port_proto_hash("kube-system/kube-dns:metrics", "tcp"),
            "JD5MR3NA4I4DYORP"
        );
    }

    #[test]
    fn sync_rules_have_kube_proxy_layout() {
        let rules = kube_proxy_sync_rules(1);
        let hash = port_proto_hash("lb-bench/svc-00000:http", "tcp");
        assert!(rules.contains(&format!(
            "-A KUBE-SERVICES -m comment --comment \"lb-bench/svc-00000:http cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-{hash}\n"
        )));
        assert!(rules.contains("--probability 0.2500000000 -j KUBE-SEP-"));
        assert!(rules.contains("--probability 0.3333333333 -j KUBE-SEP-"));
        assert!(rules.contains("--probability 0.5000000000 -j KUBE-SEP-"));
        assert!(rules.contains("-m tcp -p tcp -j DNAT --to-destination 10.250.0.13:8080\n"));
        assert_eq!(rules.matches("-j KUBE-SEP-").count(), BACKENDS);
        // Large cluster mode drops the per-endpoint comments.
        let large = kube_proxy_sync_rules(300);
        assert!(!large.contains(" -> 10.250.0.10:8080"));
        assert_eq!(large.matches("-A KUBE-SERVICES ").count(), 301);
    }

    #[test]
    fn merged_restore_file_has_each_table_once() {
        let merged = merge_restore_files(&[&kube_proxy_base_rules(), &kube_proxy_sync_rules(2)]);
        assert_eq!(merged.matches("*nat\n").count(), 1);
        assert_eq!(merged.matches("*filter\n").count(), 1);
        assert_eq!(merged.matches(":KUBE-SERVICES - [0:0]").count(), 2);
        assert_eq!(merged.matches(":KUBE-POSTROUTING - [0:0]").count(), 1);
        let nat = &merged[merged.find("*nat").unwrap()..];
        let last_declaration = nat.rfind("\n:").unwrap();
        assert!(last_declaration < nat.find("\n-A OUTPUT").unwrap());
        assert!(nat.find("\n-A OUTPUT").unwrap() < nat.find("\n-A KUBE-SERVICES").unwrap());
    }

    #[test]
    fn client_output_round_trips() {
        let batch = Measured {
            wall: Duration::from_nanos(2000),
            latencies: vec![Duration::from_nanos(5), Duration::from_nanos(7)],
            failures: 1,
            first_error: Some("connect to 10.96.0.10:80: boom".into()),
            per_backend: [1, 0, 1, 0],
            batch_rates: Vec::new(),
        };
        let text = format_batch(&batch);
        let parsed = parse_batch(&mut text.lines().map(|l| Ok(l.to_string()))).unwrap();
        assert_eq!(parsed.first_error, batch.first_error);
        assert_eq!(parsed.wall, Duration::from_nanos(2000));
        assert_eq!(parsed.failures, 1);
        assert_eq!(parsed.per_backend, [1, 0, 1, 0]);
        assert_eq!(parsed.latencies.len(), 2);
    }

    #[test]
    fn grouped_thousands() {
        assert_eq!(grouped(1), "1");
        assert_eq!(grouped(1000), "1 000");
        assert_eq!(grouped(10000), "10 000");
        assert_eq!(grouped(123456), "123 456");
    }
}
