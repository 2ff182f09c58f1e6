//! `cargo xtask bench pods`: one real node (a release `skiff-control`, a private containerd
//! and `skiff-agent`, all under a temp dir with unique names), then N pods created at once
//! through the API; prints p50/p99 from the create request to Running as seen by a watch,
//! and in the same run the floor: the same number of containers started at once with
//! `ctr run` in the same containerd. Then the agent's resident memory with the pods running
//! and, apart, that of the log drivers (children of the shims, not of the agent).
//!
//! Where the time goes is read from the outside, without instrumenting the agent: the
//! bench's watch (bound, Running), the files the agent writes on the way (the namespace
//! directory, the CNI result cache, the pod's `hosts`, the container's termination-log
//! file) and containerd's events (`ctr events`: snapshot prepare, container create, task
//! create, task start). File times have the kernel's timestamp granularity (a few ms).
//! Everything is removed at the end, also when the bench fails.

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::bench::{TICKS_PER_SECOND, expect_json, ms, percentile, process_cpu_seconds, verdict};
use crate::cluster::{self, Kubeconfig};
use crate::node::{self, Layout};
use crate::oci_image::{self, BUSYBOX_IMAGE};

#[derive(clap::Args)]
pub struct PodsBenchArgs {
    /// Pods created at once, and containers started at once with `ctr run` for the floor.
    #[arg(long, default_value_t = 50)]
    pods: usize,
    /// Give up when the pods are not all Running after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_seconds: u64,
    /// Where the temporary directory goes (default: the system temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keeps the temporary directory (logs, containerd events) for a look afterwards;
    /// processes, mounts, the bridge and cgroups are removed all the same.
    #[arg(long)]
    keep: bool,
}

/// The Kubernetes namespace of the bench's pods.
const NAMESPACE: &str = "pods-bench";
/// The containerd namespace of the floor's containers (the agent's is `skiff`).
const FLOOR_NAMESPACE: &str = "skiff-bench-floor";

const TARGET_P99: Duration = Duration::from_secs(1);
const TARGET_RATIO: f64 = 2.0;
const TARGET_RSS_MB: f64 = 30.0;

/// What the bench started, removed in order by [`Leftovers::remove`]: the node, the
/// floor's cgroup, the control plane, the temp dir (unless kept).
#[derive(Default)]
struct Leftovers {
    layout: Option<Layout>,
    floor_cgroup: Option<PathBuf>,
    control_dir: Option<PathBuf>,
    temp_dir: Option<PathBuf>,
    removed: bool,
}

impl Leftovers {
    fn remove(&mut self) {
        if std::mem::replace(&mut self.removed, true) {
            return;
        }
        if let Some(layout) = &self.layout
            && let Err(error) = node::stop(layout, false)
        {
            eprintln!("bench cleanup: {error:#}");
        }
        if let Some(cgroup) = &self.floor_cgroup {
            node::kill_cgroup(cgroup);
            node::remove_cgroup_tree(cgroup);
        }
        if let Some(control_dir) = &self.control_dir
            && control_dir.join("skiff-control.pid").exists()
            && let Err(error) = cluster::stop_control(control_dir)
        {
            eprintln!("bench cleanup: {error:#}");
        }
        // The node's shared mounts are gone (node::stop), so this removes files only.
        if let Some(dir) = &self.temp_dir
            && let Err(error) = fs::remove_dir_all(dir)
        {
            eprintln!("bench cleanup: remove {}: {error}", dir.display());
        }
    }
}

/// Removes the leftovers when dropped (the bench ended or failed), or on ^C: the daemons
/// run in sessions of their own, so an interrupted bench would leave them running.
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
                eprintln!("interrupted: removing what the bench started");
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

fn lock(leftovers: &Mutex<Leftovers>) -> std::sync::MutexGuard<'_, Leftovers> {
    leftovers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A pod subnet no host route overlaps (and not `up`'s 10.244.0.0/24).
fn free_subnet(seed: u32) -> anyhow::Result<(Ipv4Addr, u8)> {
    (0..200)
        .map(|i| {
            let third = ((seed + i * 7) % 250) as u8;
            (Ipv4Addr::new(10, 246, third, 0), 24)
        })
        .find(|subnet| node::conflicting_route(*subnet, "").is_none())
        .context("no free /24 in 10.246.0.0/16 for the bench's pods")
}

/// p50 and p99 of `values` (sorted here).
fn p50_p99(values: &mut [Duration]) -> (Duration, Duration) {
    values.sort();
    (percentile(values, 50.0), percentile(values, 99.0))
}

/// `later - earlier`, 0 when the clocks' granularity puts them the other way round.
fn between(earlier: SystemTime, later: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

/// What the bench's watch saw of one pod.
#[derive(Default, Clone)]
struct PodSeen {
    uid: String,
    bound: Option<SystemTime>,
    running: Option<SystemTime>,
    container_id: String,
}

type Seen = Arc<Mutex<HashMap<String, PodSeen>>>;

fn record(seen: &Seen, pod: &Value, at: SystemTime) {
    let Some(name) = pod["metadata"]["name"].as_str() else {
        return;
    };
    let mut seen = seen.lock().expect("seen map");
    let entry = seen.entry(name.to_string()).or_default();
    if let Some(uid) = pod["metadata"]["uid"].as_str() {
        entry.uid = uid.to_string();
    }
    if entry.bound.is_none()
        && pod["spec"]["nodeName"]
            .as_str()
            .is_some_and(|n| !n.is_empty())
    {
        entry.bound = Some(at);
    }
    if entry.running.is_none() && pod["status"]["phase"] == "Running" {
        entry.running = Some(at);
    }
    if let Some(id) = pod["status"]["containerStatuses"][0]["containerID"].as_str() {
        entry.container_id = id.trim_start_matches("containerd://").to_string();
    }
}

/// Watches the bench's pods from `revision` on and records what it sees, until dropped.
async fn watch_pods(
    client: reqwest::Client,
    pods_url: String,
    revision: String,
    seen: Seen,
) -> anyhow::Result<()> {
    let url = format!("{pods_url}?watch=true&resourceVersion={revision}");
    let mut response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("watch {url}"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "watch {url}: {}",
        response.status()
    );
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(chunk) = response.chunk().await.context("read the pod watch")? {
        let received = SystemTime::now();
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            anyhow::ensure!(event["type"] != "ERROR", "pod watch failed: {event}");
            record(&seen, &event["object"], received);
        }
    }
    anyhow::bail!("the pod watch ended")
}

fn pod_body(name: &str) -> String {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "containers": [{
                "name": "sleep",
                "image": BUSYBOX_IMAGE,
                "command": ["sleep", "3600"],
            }],
            "terminationGracePeriodSeconds": 0,
        }
    })
    .to_string()
}

/// containerd's events, as `ctr events` prints them, by (namespace, topic, object id).
#[derive(Default)]
struct Events {
    at: HashMap<(String, String, String), SystemTime>,
}

impl Events {
    fn parse(text: &str) -> Self {
        let mut events = Events::default();
        for line in text.lines() {
            // "2025-01-02 03:04:05.123456789 +0000 UTC <namespace> <topic> <json>"
            let mut fields = line.splitn(7, ' ');
            let (Some(date), Some(time), Some(offset), Some(_zone)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (Some(namespace), Some(topic), Some(body)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Some(at) = parse_go_time(date, time, offset) else {
                continue;
            };
            let Ok(body) = serde_json::from_str::<Value>(body) else {
                continue;
            };
            let id = ["container_id", "id", "key"]
                .iter()
                .find_map(|field| body[field].as_str())
                .unwrap_or_default();
            events
                .at
                .entry((namespace.to_string(), topic.to_string(), id.to_string()))
                .or_insert(at);
        }
        events
    }

    fn get(&self, namespace: &str, topic: &str, id: &str) -> Option<SystemTime> {
        self.at
            .get(&(namespace.to_string(), topic.to_string(), id.to_string()))
            .copied()
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Go's `time.Time.String()` ("2025-01-02 03:04:05.123456789 +0000") as a system time.
fn parse_go_time(date: &str, time: &str, offset: &str) -> Option<SystemTime> {
    let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (clock, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut clock = clock.split(':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (clock.next()??, clock.next()??, clock.next()??);
    let nanos: u32 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").get(..9)?.parse().ok()?
    };
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let digits = offset.trim_start_matches(['+', '-']);
    let offset_seconds = sign
        * (digits.get(..2)?.parse::<i64>().ok()? * 3600
            + digits.get(2..4)?.parse::<i64>().ok()? * 60);
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_seconds;
    let seconds = u64::try_from(seconds).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos))
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// `ctr events` writing to a file while the measurements run; killed on drop.
struct EventLog {
    child: std::process::Child,
    path: PathBuf,
}

impl EventLog {
    fn start(layout: &Layout, path: &Path) -> anyhow::Result<Self> {
        let file = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        let child = Command::new("ctr")
            .arg("--address")
            .arg(layout.containerd_socket())
            .arg("events")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .context("start ctr events")?;
        // Let it subscribe before anything happens.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self {
            child,
            path: path.to_path_buf(),
        })
    }

    fn read(&self) -> Events {
        Events::parse(&fs::read_to_string(&self.path).unwrap_or_default())
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One phase of the breakdown: its name and each pod's duration.
struct Phase {
    name: &'static str,
    durations: Vec<Duration>,
}

fn print_phases(title: &str, phases: &mut [Phase]) {
    println!("{title}");
    println!(
        "  {:<58} {:>8} {:>8} {:>5}",
        "phase", "p50 ms", "p99 ms", "n"
    );
    for phase in phases {
        let (p50, p99) = p50_p99(&mut phase.durations);
        println!(
            "  {:<58} {:>8.1} {:>8.1} {:>5}",
            phase.name,
            ms(p50),
            ms(p99),
            phase.durations.len()
        );
    }
}

/// CPU time used so far, in seconds: the machine's busy time over all CPUs, and that of
/// the node's three daemons (their own, not their children's).
#[derive(Clone, Copy, Default)]
struct CpuSample {
    machine_busy: f64,
    agent: f64,
    containerd: f64,
    control: f64,
    /// The containers' cgroup tree (the agent's subtree, or the floor's cgroup): runc's
    /// init and the containers' own processes, which runc places there.
    containers: f64,
}

impl CpuSample {
    fn take(watched: &Watched, containers: &Path) -> Self {
        Self {
            machine_busy: machine_busy_seconds(),
            agent: process_cpu_seconds(watched.agent),
            containerd: process_cpu_seconds(watched.containerd),
            control: process_cpu_seconds(watched.control),
            containers: cgroup_cpu_seconds(containers),
        }
    }

    fn since(&self, earlier: &CpuSample) -> CpuSample {
        CpuSample {
            machine_busy: self.machine_busy - earlier.machine_busy,
            agent: self.agent - earlier.agent,
            containerd: self.containerd - earlier.containerd,
            control: self.control - earlier.control,
            containers: self.containers - earlier.containers,
        }
    }
}

/// The processes and cgroups whose CPU time the bench reports.
struct Watched {
    agent: u32,
    containerd: u32,
    control: u32,
    agent_cgroup: PathBuf,
    floor_cgroup: PathBuf,
}

/// CPU seconds used in a cgroup v2 tree (`cpu.stat` `usage_usec`, there even without the
/// cpu controller); 0 when it does not exist yet.
fn cgroup_cpu_seconds(dir: &Path) -> f64 {
    fs::read_to_string(dir.join("cpu.stat"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(0.0, |usec| usec / 1e6)
}

/// Busy time of all CPUs since boot: `/proc/stat`'s first line less idle and iowait.
fn machine_busy_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    // guest and guest_nice are already counted in user and nice.
    let total: f64 = ticks.iter().take(8).sum();
    (total - idle) / TICKS_PER_SECOND
}

/// The proportional set size of `pid` (shared pages split among their users), in bytes.
fn pss(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn print_cpu(wall: Duration, cpu: &CpuSample, ours: bool) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let rest = cpu.machine_busy - cpu.agent - cpu.containerd - cpu.control - cpu.containers;
    let daemons = if ours {
        format!(
            "skiff-agent {:.2}, containerd {:.2}, skiff-control {:.2}",
            cpu.agent, cpu.containerd, cpu.control
        )
    } else {
        format!("containerd {:.2}", cpu.containerd)
    };
    println!(
        "    {:.2} s wall, machine busy {:.2} of {:.2} CPU-s: {daemons}, container cgroups \
         (runc init, sleep) {:.2}, everything else {:.2} (shims, runc, {}other users of the \
         machine)",
        wall.as_secs_f64(),
        cpu.machine_busy,
        wall.as_secs_f64() * cpus,
        cpu.containers,
        rest,
        if ours { "log drivers, CNI, " } else { "ctr, " }
    );
}

pub fn run(args: &PodsBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.pods > 0, "--pods must be at least 1");
    cluster::deps()?;
    println!("==> build: skiff-control, skiff-agent, skiff-cni (release)");
    let binaries = node::build_release()?;
    let temp = match &args.dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("skiff-bench-pods-")
            .tempdir_in(dir),
        None => tempfile::Builder::new()
            .prefix("skiff-bench-pods-")
            .tempdir(),
    }
    .context("create the bench's temp dir")?;
    let root = temp.path().to_path_buf();
    let suffix: String = root
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("skiff-bench-pods-")
                .to_lowercase()
        })
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(6)
        .collect();
    let seed = suffix
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31) + u32::from(b));
    let control_dir = root.join("control");
    // The guard removes the directory (unless kept), after the mounts in it are gone.
    let _ = temp.keep();
    let cleanup = Cleanup::new();
    cleanup.update(|l| {
        l.control_dir = Some(control_dir.clone());
        l.temp_dir = (!args.keep).then(|| root.clone());
    });
    if args.keep {
        println!("keeping {}", root.display());
    }

    println!(
        "==> start: skiff-control, containerd and skiff-agent under {}",
        root.display()
    );
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
    let (control_pid, _url) = cluster::start_control(&binaries.control, &control_dir, listen)?;
    let kubeconfig_path = control_dir.join("admin.kubeconfig");
    let layout = Layout {
        node_name: format!("bench-{suffix}"),
        containerd_dir: root.join("containerd"),
        run_dir: root.join("run"),
        state_dir: root.join("state"),
        pod_log_dir: root.join("pod-logs"),
        log_dir: root.join("logs"),
        cni_conf_dir: root.join("net.d"),
        cgroup_subtree: format!("skiff-bench-{suffix}"),
        bridge: format!("skbench{suffix}"),
        pod_cidr: free_subnet(seed)?,
        kubeconfig: kubeconfig_path.clone(),
        client_ca: Some(control_dir.join("pki").join("ca.crt")),
        agent_log_filter: "info".into(),
        eviction_hard: node::DEV_EVICTION_HARD.into(),
    };
    cleanup.update(|l| l.layout = Some(layout.clone()));
    let started = node::start(&layout, &binaries)?;
    let cgroup_root = node::cgroup2_root()?;
    let floor_cgroup = format!("skiff-bench-floor-{suffix}");
    cleanup.update(|l| l.floor_cgroup = Some(cgroup_root.join(&floor_cgroup)));

    let archive = root.join("busybox.tar");
    oci_image::write_busybox_archive(&archive)?;
    for namespace in [node::CONTAINERD_NAMESPACE, FLOOR_NAMESPACE] {
        node::import_image(&layout, namespace, &archive)?;
    }
    println!(
        "node {} Ready (agent pid {}, containerd pid {}, control pid {control_pid}); image {} \
         imported",
        layout.node_name, started.agent_pid, started.containerd_pid, BUSYBOX_IMAGE
    );

    let events = EventLog::start(&layout, &root.join("containerd-events.log"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("build the tokio runtime")?;

    println!(
        "==> floor: {} containers started at once with `ctr run`",
        args.pods
    );
    let watched = Watched {
        agent: started.agent_pid,
        containerd: started.containerd_pid,
        control: control_pid,
        agent_cgroup: cgroup_root.join(&layout.cgroup_subtree),
        floor_cgroup: cgroup_root.join(&floor_cgroup),
    };
    // One untimed container first, so that neither side pays for loading runc and the shim.
    runtime.block_on(ctr_run(
        layout.containerd_socket(),
        floor_cgroup.clone(),
        "floor-warmup".to_string(),
    ))?;
    // Other users of a shared machine slow both sides alike; the load says how busy it was.
    let load_before = fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let floor_cpu_before = CpuSample::take(&watched, &watched.floor_cgroup);
    let floor_clock = Instant::now();
    let floor = runtime.block_on(floor(&layout, &floor_cgroup, args.pods))?;
    let floor_wall = floor_clock.elapsed();
    let floor_cpu = CpuSample::take(&watched, &watched.floor_cgroup).since(&floor_cpu_before);
    // The floor's containers go before the pods start, so both run on an idle machine.
    let ids: Vec<String> = (0..args.pods)
        .map(|i| format!("floor-{i}"))
        .chain(["floor-warmup".to_string()])
        .collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let _ = node::ctr(
        &layout,
        FLOOR_NAMESPACE,
        &[&["tasks", "delete", "--force"], id_refs.as_slice()].concat(),
    );
    let _ = node::ctr(
        &layout,
        FLOOR_NAMESPACE,
        &[&["containers", "delete"], id_refs.as_slice()].concat(),
    );
    node::kill_cgroup(&cgroup_root.join(&floor_cgroup));
    node::remove_cgroup_tree(&cgroup_root.join(&floor_cgroup));

    println!(
        "==> skiff: {} pods created at once through the API",
        args.pods
    );
    let kubeconfig = Kubeconfig::read(&kubeconfig_path)?;
    let (ours, ours_wall, ours_cpu) = runtime.block_on(pods(&kubeconfig, args, &watched))?;

    // Steady state with every pod running.
    std::thread::sleep(Duration::from_secs(2));
    let (agent_rss, agent_hwm) = cluster::resident_memory(started.agent_pid)?;
    let drivers = node::log_drivers(&layout);
    let driver_rss: u64 = drivers
        .keys()
        .filter_map(|pid| cluster::resident_memory(*pid).ok())
        .map(|(rss, _)| rss)
        .sum();
    let driver_pss: u64 = drivers.keys().map(|pid| pss(*pid)).sum();
    let agent_pss = pss(started.agent_pid);
    let mut driver_parents: Vec<&str> = drivers.values().map(String::as_str).collect();
    driver_parents.sort();
    driver_parents.dedup();

    let events_seen = events.read();
    drop(events);

    // The results.
    let mut ours_latency: Vec<Duration> = ours
        .iter()
        .filter_map(|(_, sent, seen)| seen.running.map(|at| between(*sent, at)))
        .collect();
    let mut floor_latency: Vec<Duration> = floor.iter().map(|f| f.elapsed).collect();
    let (ours_p50, ours_p99) = p50_p99(&mut ours_latency);
    let (floor_p50, floor_p99) = p50_p99(&mut floor_latency);
    let ratio_p50 = ours_p50.as_secs_f64() / floor_p50.as_secs_f64().max(1e-9);
    let ratio_p99 = ours_p99.as_secs_f64() / floor_p99.as_secs_f64().max(1e-9);
    let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);

    println!();
    println!(
        "pod startup, {} at once on one node ({} CPUs; load average before the floor: {})",
        args.pods,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_before
    );
    println!("  {:<44} {:>8} {:>8} {:>7}", "", "p50 ms", "p99 ms", "n");
    println!(
        "  {:<44} {:>8.1} {:>8.1} {:>7}   target p99 < {} ms: {}",
        "skiff: API create -> Running seen by watch",
        ms(ours_p50),
        ms(ours_p99),
        ours_latency.len(),
        TARGET_P99.as_millis(),
        verdict(ours_latency.len() == args.pods && ours_p99 < TARGET_P99)
    );
    println!(
        "  {:<44} {:>8.1} {:>8.1} {:>7}",
        "floor: `ctr run -d` start -> exit",
        ms(floor_p50),
        ms(floor_p99),
        floor_latency.len()
    );
    println!(
        "  {:<44} {:>8.2} {:>8.2} {:>7}   target < {TARGET_RATIO}x: {}",
        "ratio skiff / floor",
        ratio_p50,
        ratio_p99,
        "",
        verdict(ratio_p99 < TARGET_RATIO)
    );
    println!();
    println!("memory with {} pods running", ours_latency.len());
    println!(
        "  skiff-agent VmRSS {:.1} MB (peak VmHWM {:.1} MB, PSS {:.1} MB)   target < \
         {TARGET_RSS_MB} MB: {}",
        mb(agent_rss),
        mb(agent_hwm),
        mb(agent_pss),
        verdict(mb(agent_rss) < TARGET_RSS_MB)
    );
    println!(
        "  log drivers (children of {}, not of the agent): {} processes, VmRSS sum {:.1} MB \
         ({:.2} MB each), PSS sum {:.1} MB",
        if driver_parents.is_empty() {
            "-".to_string()
        } else {
            driver_parents.join(", ")
        },
        drivers.len(),
        mb(driver_rss),
        mb(driver_rss) / drivers.len().max(1) as f64,
        mb(driver_pss)
    );
    println!();
    println!("CPU during the burst (from the first start to the last Running)");
    println!("  floor:");
    print_cpu(floor_wall, &floor_cpu, false);
    println!("  skiff:");
    print_cpu(ours_wall, &ours_cpu, true);

    // Where the time went.
    println!();
    let run_dir = layout.agent_run_dir();
    let network = format!("skiff-{}", layout.bridge);
    let mut phases: Vec<Phase> = [
        "scheduling: create sent -> bound seen by watch",
        "worker start, pod cgroup, netns/ipc/uts files (-> ns dir)",
        "unshare + bind mounts + CNI ADD (-> CNI result cached)",
        "pod files: hosts, resolv.conf (-> hosts written)",
        "image ensure, env, volumes (-> termination-log file)",
        "cgroup, OCI spec, log dir, rootfs (-> /snapshot/prepare)",
        "container create (-> /containers/create)",
        "task create: shim, log driver, runc create (-> /tasks/create)",
        "task start (-> /tasks/start)",
        "start label, relist, status write, watch (-> Running seen)",
    ]
    .into_iter()
    .map(|name| Phase {
        name,
        durations: Vec::new(),
    })
    .collect();
    for (_, sent, seen) in &ours {
        let pod_dir = run_dir.join("pods").join(&seen.uid);
        let id = &seen.container_id;
        let marks = [
            Some(*sent),
            seen.bound,
            modified(&pod_dir.join("ns")),
            modified(
                &run_dir
                    .join("cni-cache")
                    .join("results")
                    .join(format!("{network}:{}:eth0", seen.uid)),
            ),
            modified(&pod_dir.join("hosts")),
            modified(&pod_dir.join("containers/sleep/termination-log")),
            events_seen.get(node::CONTAINERD_NAMESPACE, "/snapshot/prepare", id),
            events_seen.get(node::CONTAINERD_NAMESPACE, "/containers/create", id),
            events_seen.get(node::CONTAINERD_NAMESPACE, "/tasks/create", id),
            events_seen.get(node::CONTAINERD_NAMESPACE, "/tasks/start", id),
            seen.running,
        ];
        for (phase, pair) in phases.iter_mut().zip(marks.windows(2)) {
            if let (Some(from), Some(to)) = (pair[0], pair[1]) {
                phase.durations.push(between(from, to));
            }
        }
    }
    print_phases("skiff, where the time goes (per pod)", &mut phases);
    let mut floor_phases: Vec<Phase> = [
        "ctr start, image, snapshot prepare (-> /containers/create)",
        "task create: shim, runc create (-> /tasks/create)",
        "task start (-> /tasks/start)",
        "ctr exits",
    ]
    .into_iter()
    .map(|name| Phase {
        name,
        durations: Vec::new(),
    })
    .collect();
    for run in &floor {
        let marks = [
            Some(run.started),
            events_seen.get(FLOOR_NAMESPACE, "/containers/create", &run.id),
            events_seen.get(FLOOR_NAMESPACE, "/tasks/create", &run.id),
            events_seen.get(FLOOR_NAMESPACE, "/tasks/start", &run.id),
            Some(run.started + run.elapsed),
        ];
        for (phase, pair) in floor_phases.iter_mut().zip(marks.windows(2)) {
            if let (Some(from), Some(to)) = (pair[0], pair[1]) {
                phase.durations.push(between(from, to));
            }
        }
    }
    print_phases(
        "floor, where the time goes (per container)",
        &mut floor_phases,
    );
    println!();
    anyhow::ensure!(
        ours_latency.len() == args.pods,
        "only {} of {} pods became Running within {} s; see {}",
        ours_latency.len(),
        args.pods,
        args.timeout_seconds,
        layout.agent_log().display()
    );
    println!("==> cleanup");
    drop(cleanup);
    println!("removed the node, its pods, mounts, bridge and cgroups, and the control plane");
    Ok(())
}

/// One `ctr run` of the floor.
struct FloorRun {
    id: String,
    started: SystemTime,
    elapsed: Duration,
}

/// `ctr run -d` of one container, timed from its spawn to its exit (ctr returns once the
/// task started).
async fn ctr_run(socket: PathBuf, cgroup: String, id: String) -> anyhow::Result<FloorRun> {
    let mut command = tokio::process::Command::new("ctr");
    command
        .arg("--address")
        .arg(&socket)
        .args([
            "--namespace",
            FLOOR_NAMESPACE,
            "run",
            "--detach",
            "--null-io",
        ])
        // ctr asks for cpu shares by default; runc fails to write them where there is no
        // cpu controller (this hybrid host), and the agent writes none for these pods
        // either.
        .args(["--cpu-shares", "0"])
        .arg("--cgroup")
        .arg(format!("/{cgroup}/{id}"))
        .args([BUSYBOX_IMAGE, &id, "sleep", "3600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = SystemTime::now();
    let clock = Instant::now();
    let output = command.output().await.context("run ctr")?;
    let elapsed = clock.elapsed();
    anyhow::ensure!(
        output.status.success(),
        "ctr run {id} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(FloorRun {
        id,
        started,
        elapsed,
    })
}

/// Starts `count` containers at once with `ctr run -d`.
async fn floor(layout: &Layout, cgroup: &str, count: usize) -> anyhow::Result<Vec<FloorRun>> {
    let runs = (0..count).map(|i| {
        ctr_run(
            layout.containerd_socket(),
            cgroup.to_string(),
            format!("floor-{i}"),
        )
    });
    futures_join_all(runs.collect()).await.into_iter().collect()
}

/// Awaits all futures concurrently (tokio has no join_all; xtask has no futures crate).
async fn futures_join_all<T: Send + 'static>(
    futures: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        results.push(handle.await.expect("bench task panicked"));
    }
    results
}

/// Creates the pods at once and waits until the watch saw each Running. Returns, per pod,
/// its name, when its create was sent, and what the watch saw; and the wall and CPU time
/// from the first create to the last Running.
/// Pods as [`pods`] reports them: name, when the create was sent, what the watch saw.
type PodResults = Vec<(String, SystemTime, PodSeen)>;

async fn pods(
    kubeconfig: &Kubeconfig,
    args: &PodsBenchArgs,
    watched: &Watched,
) -> anyhow::Result<(PodResults, Duration, CpuSample)> {
    let client = kubeconfig.client()?;
    let server = &kubeconfig.server;
    let namespace =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}});
    expect_json(
        client
            .post(format!("{server}/api/v1/namespaces"))
            .header("content-type", "application/json")
            .body(namespace.to_string())
            .send()
            .await?,
        "create the bench namespace",
    )
    .await?;
    let pods_url = format!("{server}/api/v1/namespaces/{NAMESPACE}/pods");
    // One warm connection per create: every create then starts at once, not after a TLS
    // handshake queued behind the others.
    let warm = (0..args.pods).map(|_| {
        let (client, url) = (client.clone(), format!("{pods_url}?limit=1"));
        async move { client.get(url).send().await.map(drop) }
    });
    for result in futures_join_all(warm.collect()).await {
        result.context("warm up the API connections")?;
    }
    let list = expect_json(client.get(&pods_url).send().await?, "list the bench pods").await?;
    let revision = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string();
    let seen: Seen = Arc::default();
    let watch = tokio::spawn(watch_pods(
        client.clone(),
        pods_url.clone(),
        revision,
        seen.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let cpu_before = CpuSample::take(watched, &watched.agent_cgroup);
    let clock = Instant::now();
    let creates = (0..args.pods).map(|i| {
        let (client, url) = (client.clone(), pods_url.clone());
        let name = format!("bench-{i}");
        let body = pod_body(&name);
        async move {
            let sent = SystemTime::now();
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .with_context(|| format!("create pod {name}"))?;
            expect_json(response, &format!("create pod {name}")).await?;
            Ok::<_, anyhow::Error>((name, sent))
        }
    });
    let mut sent = Vec::new();
    for result in futures_join_all(creates.collect()).await {
        sent.push(result?);
    }

    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
    loop {
        let running = seen
            .lock()
            .expect("seen map")
            .values()
            .filter(|p| p.running.is_some())
            .count();
        if running >= args.pods || Instant::now() > deadline {
            break;
        }
        // Polled every 20 ms, so the CPU window ends at most that late.
        if watch.is_finished() {
            watch.await.context("pod watch task")??;
            anyhow::bail!("the pod watch ended");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = clock.elapsed();
    let cpu = CpuSample::take(watched, &watched.agent_cgroup).since(&cpu_before);
    // The container IDs come with the status write that made the pod Running, or later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    watch.abort();
    let seen = seen.lock().expect("seen map").clone();
    let results = sent
        .into_iter()
        .map(|(name, at)| {
            let pod = seen.get(&name).cloned().unwrap_or_default();
            (name, at, pod)
        })
        .collect();
    Ok((results, wall, cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_times() {
        let at = parse_go_time("2025-01-02", "03:04:05.5", "+0000").unwrap();
        let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(since, Duration::new(1_735_787_045, 500_000_000));
        let east = parse_go_time("2025-01-02", "05:04:05.5", "+0200").unwrap();
        assert_eq!(east, at);
        assert!(parse_go_time("2025-01-02", "03:04", "+0000").is_none());
    }

    #[test]
    fn parses_ctr_events() {
        let text = "\
2025-01-02 03:04:05.123456789 +0000 UTC skiff /tasks/start {\"container_id\":\"abc\",\"pid\":42}
2025-01-02 03:04:05 +0000 UTC skiff /snapshot/prepare {\"key\":\"abc\",\"parent\":\"sha256:x\"}
not an event
";
        let events = Events::parse(text);
        let start = events.get("skiff", "/tasks/start", "abc").unwrap();
        let prepare = events.get("skiff", "/snapshot/prepare", "abc").unwrap();
        assert_eq!(
            start.duration_since(prepare).unwrap(),
            Duration::from_nanos(123_456_789)
        );
        assert!(events.get("skiff", "/tasks/create", "abc").is_none());
    }
}
