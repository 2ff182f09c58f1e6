//! `cargo xtask bench sched`: a release `skiff-control serve` (scheduler in-process) with
//! hollow nodes from `skiff-control sim`, then pods created through the API as fast as
//! concurrent clients go; prints pods bound per second, creation-to-binding latency and
//! the control plane's peak memory beside upstream's figures.
//!
//! Latency is measured on the client side: the time each create request was sent, and the
//! time the bench's own watch delivered the first event showing the pod's `spec.nodeName`
//! (creationTimestamp has only second resolution).

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::bench::{Process, expect_json, percentile_ms, process_cpu_seconds};
use crate::cluster::{self, Kubeconfig};

#[derive(clap::Args)]
pub struct SchedBenchArgs {
    /// Hollow nodes registered before the pods are created.
    #[arg(long, default_value_t = 5_000)]
    nodes: usize,
    /// Pods created through the API.
    #[arg(long, default_value_t = 30_000)]
    pods: usize,
    /// Concurrent HTTPS clients creating pods.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Replicas of the Deployment measured after the pods (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    deployment_replicas: usize,
    /// Give up when no pod got bound for this many seconds.
    #[arg(long, default_value_t = 60)]
    stall_seconds: u64,
    /// Where the temporary data directory goes (default: the system temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keeps the data directory (store, logs) for a look afterwards.
    #[arg(long)]
    keep: bool,
    /// Runs this `skiff-control` instead of building the release binary, so that two builds
    /// (a baseline and a change, say) can be measured back to back under the same load.
    #[arg(long)]
    binary: Option<PathBuf>,
}

const NAMESPACE: &str = "sched-bench";

/// The server's watch history, in events. At 5 000 nodes the Leases alone write 500
/// events/s, so the default 10 000 lasts seconds under load; etcd's default compaction
/// keeps 5 minutes. Watchers that fall further behind relist (and the bench says so).
const WATCH_HISTORY: usize = 100_000;

/// Upstream's scheduler_perf CI floor at 5 000 nodes (SchedulingBasic, pods/s).
const UPSTREAM_FLOOR: &str = "680-810 pods/s";
const TARGET_PODS_PER_SECOND: f64 = 1_500.0;
const TARGET_DEPLOYMENT_SECONDS: f64 = 15.0;

fn pod_body(name: &str) -> String {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "sched-bench"}},
        "spec": {"containers": [{
            "name": "app",
            "image": "registry.k8s.io/pause:3.10",
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}
        }]}
    })
    .to_string()
}

/// `text` without terminal color sequences (the server's log is colored).
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// When the bench's watch first saw each pod bound, by name.
type BoundAt = Arc<Mutex<HashMap<String, Instant>>>;

/// Watches the pods at `pods_url` and records when each first shows a node. A watch that
/// falls out of the server's history window (410) or ends is resumed from a fresh list,
/// whose bound pods count as seen when the list arrives; `restarts` counts those.
async fn watch_bindings(
    client: reqwest::Client,
    pods_url: String,
    bound: BoundAt,
    restarts: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let mut first = true;
    loop {
        let list = expect_json(client.get(&pods_url).send().await?, "list the bench pods").await?;
        let listed = Instant::now();
        if !first {
            restarts.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        for pod in list["items"].as_array().into_iter().flatten() {
            record_bound(&bound, pod, listed);
        }
        let revision = list["metadata"]["resourceVersion"].as_str().unwrap_or("0");
        let url =
            format!("{pods_url}?watch=true&resourceVersion={revision}&allowWatchBookmarks=true");
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
        'stream: while let Some(chunk) = response.chunk().await.context("read the pod watch")? {
            let received = Instant::now();
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if event["type"] == "ERROR" {
                    break 'stream;
                }
                record_bound(&bound, &event["object"], received);
            }
        }
    }
}

fn record_bound(bound: &BoundAt, pod: &Value, at: Instant) {
    let node = pod["spec"]["nodeName"].as_str().unwrap_or("");
    if node.is_empty() {
        return;
    }
    if let Some(name) = pod["metadata"]["name"].as_str() {
        bound
            .lock()
            .expect("bound map")
            .entry(name.to_string())
            .or_insert(at);
    }
}

/// Waits until `count` entries of `bound` (whose names `is_ours` accepts) are there, or no
/// new one came for `stall`. Returns how many arrived.
async fn wait_bound(
    bound: &BoundAt,
    count: usize,
    stall: Duration,
    is_ours: impl Fn(&str) -> bool,
) -> usize {
    let mut last_count = 0;
    let mut last_progress = Instant::now();
    loop {
        let now_count = bound
            .lock()
            .expect("bound map")
            .keys()
            .filter(|k| is_ours(k))
            .count();
        if now_count >= count {
            return now_count;
        }
        if now_count > last_count {
            last_count = now_count;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > stall {
            return now_count;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn run(args: &SchedBenchArgs) -> anyhow::Result<()> {
    let executable = match &args.binary {
        Some(binary) => binary.clone(),
        None => cluster::build_control_release()?,
    };
    let temp = match &args.dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("skiff-bench-sched-")
            .tempdir_in(dir),
        None => tempfile::Builder::new()
            .prefix("skiff-bench-sched-")
            .tempdir(),
    }
    .context("create the bench's data directory")?;
    let data_dir = temp.path().to_path_buf();

    let server_log = data_dir.join("skiff-control.log");
    let server = Process::start(
        Command::new(&executable)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .args(["--watch-history", &WATCH_HISTORY.to_string()])
            .env("RUST_LOG", "warn,skiff_control::scheduler=info"),
        &server_log,
    )?;
    let url = server.wait_for_line(
        "skiff-control serving ",
        Duration::from_secs(30),
        &server_log,
    )?;
    let kubeconfig_path = data_dir.join("admin.kubeconfig");
    let kubeconfig = Kubeconfig::read(&kubeconfig_path)?;

    println!(
        "bench sched: {} hollow nodes, {} pods (cpu 10m, memory 16Mi), {} clients, watch history {WATCH_HISTORY} events",
        args.nodes, args.pods, args.clients
    );
    let sim_log = data_dir.join("skiff-sim.log");
    let registering = Instant::now();
    let sim = Process::start(
        Command::new(&executable)
            .args(["sim", "--kubeconfig"])
            .arg(&kubeconfig_path)
            .args(["--nodes", &args.nodes.to_string()])
            .env("RUST_LOG", "warn"),
        &sim_log,
    )?;
    let register_timeout = Duration::from_secs(60 + args.nodes as u64 / 20);
    sim.wait_for_line("skiff-control sim: registered", register_timeout, &sim_log)?;
    println!(
        "  {} hollow nodes registered in {:.1} s",
        args.nodes,
        registering.elapsed().as_secs_f64()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the bench's runtime")?;
    let result = runtime.block_on(measure(args, &url, &kubeconfig));
    let (_, control_peak) = cluster::resident_memory(server.pid())?;
    let control_cpu = process_cpu_seconds(server.pid());
    let sim_cpu = process_cpu_seconds(sim.pid());
    let (_, sim_peak) = cluster::resident_memory(sim.pid()).unwrap_or((0, 0));
    let report = result?;

    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!();
    println!(
        "  pods created:          {} in {:.2} s ({:.0}/s)",
        report.created,
        report.create_elapsed.as_secs_f64(),
        report.created as f64 / report.create_elapsed.as_secs_f64()
    );
    println!(
        "  pods bound:            {} of {} in {:.2} s from the first create",
        report.bound,
        report.created,
        report.bind_elapsed.as_secs_f64()
    );
    let verdict = |ok: bool| if ok { "meets" } else { "below" };
    println!(
        "  pods bound per second: {:.0}   (upstream floor at 5 000 nodes: {UPSTREAM_FLOOR}; target {:.0}: {})",
        report.bound_per_second(),
        TARGET_PODS_PER_SECOND,
        verdict(report.bound_per_second() >= TARGET_PODS_PER_SECOND)
    );
    println!(
        "  create to bound:       p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile_ms(&report.latencies, 50.0),
        percentile_ms(&report.latencies, 99.0),
        percentile_ms(&report.latencies, 100.0)
    );
    println!(
        "  control plane peak RSS (VmHWM): {:.0} MiB   (hollow nodes process: {:.0} MiB)",
        mib(control_peak),
        mib(sim_peak)
    );
    println!(
        "  CPU time used: control plane {control_cpu:.1} s, hollow nodes {sim_cpu:.1} s (2 cores shared with the bench's clients)"
    );
    match &report.deployment {
        DeploymentFigure::Skipped(why) => println!("  deployment: skipped: {why}"),
        DeploymentFigure::Measured {
            replicas,
            bound,
            elapsed,
        } => println!(
            "  deployment of {replicas} replicas: {bound} pods bound in {:.2} s (target under {TARGET_DEPLOYMENT_SECONDS:.0} s: {})",
            elapsed.as_secs_f64(),
            verdict(*bound == *replicas && elapsed.as_secs_f64() < TARGET_DEPLOYMENT_SECONDS)
        ),
    }
    // The scheduler logs its load every 10 s; the busiest windows say whether it kept up.
    let log_text = fs::read_to_string(&server_log).unwrap_or_default();
    for line in log_text.lines().filter(|l| l.contains("scheduler load")) {
        let fields = line
            .split_once("scheduler load")
            .map_or("", |(_, rest)| rest);
        println!("  scheduler load:{}", strip_ansi(fields));
    }
    if report.watch_restarts > 0 {
        println!(
            "  note: the bench's watch fell out of the history window {} time(s) and resumed from a list; pods seen in those lists count as bound when listed",
            report.watch_restarts
        );
    }
    if report.bound != report.created {
        let kept = temp.keep();
        anyhow::bail!(
            "only {} of {} pods were bound; logs kept in {}",
            report.bound,
            report.created,
            kept.display()
        );
    }
    drop(sim);
    drop(server);
    if args.keep {
        let kept = temp.keep();
        println!(
            "  logs kept: {} and {}",
            server_log.display(),
            sim_log.display()
        );
        println!("  data directory kept: {}", kept.display());
    }
    Ok(())
}

enum DeploymentFigure {
    Skipped(String),
    Measured {
        replicas: usize,
        bound: usize,
        elapsed: Duration,
    },
}

struct Report {
    watch_restarts: usize,
    created: usize,
    create_elapsed: Duration,
    bound: usize,
    bind_elapsed: Duration,
    latencies: Vec<Duration>,
    deployment: DeploymentFigure,
}

impl Report {
    fn bound_per_second(&self) -> f64 {
        self.bound as f64 / self.bind_elapsed.as_secs_f64()
    }
}

async fn measure(
    args: &SchedBenchArgs,
    base: &str,
    kubeconfig: &Kubeconfig,
) -> anyhow::Result<Report> {
    let client = kubeconfig.client()?;
    let namespace =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}});
    expect_json(
        client
            .post(format!("{base}/api/v1/namespaces"))
            .json(&namespace)
            .send()
            .await?,
        "create the bench namespace",
    )
    .await?;
    // The scheduler's node watch has delivered the nodes once a fresh list shows them all;
    // a short pause lets it digest them.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let pods_url = format!("{base}/api/v1/namespaces/{NAMESPACE}/pods");
    let bound: BoundAt = Arc::default();
    let restarts = Arc::new(AtomicUsize::new(0));
    let watch = tokio::spawn(watch_bindings(
        client.clone(),
        pods_url.clone(),
        bound.clone(),
        restarts.clone(),
    ));

    let sent_at: Arc<Vec<Mutex<Option<Instant>>>> =
        Arc::new((0..args.pods).map(|_| Mutex::new(None)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut creators = tokio::task::JoinSet::new();
    for _ in 0..args.clients.max(1) {
        let client = client.clone();
        let pods_url = pods_url.clone();
        let next = next.clone();
        let sent_at = sent_at.clone();
        let count = args.pods;
        creators.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return anyhow::Ok(());
                }
                let name = format!("bench-{index}");
                let body = pod_body(&name);
                *sent_at[index].lock().expect("sent_at") = Some(Instant::now());
                let response = client
                    .post(&pods_url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .with_context(|| format!("create pod {name}"))?;
                expect_json(response, &format!("create pod {name}")).await?;
            }
        });
    }
    while let Some(result) = creators.join_next().await {
        result.context("a creating client panicked")??;
    }
    let create_elapsed = started.elapsed();
    let n_bound = wait_bound(
        &bound,
        args.pods,
        Duration::from_secs(args.stall_seconds),
        |name| name.starts_with("bench-"),
    )
    .await;
    let (latencies, last_bound) = {
        let bound = bound.lock().expect("bound map");
        let mut latencies = Vec::with_capacity(args.pods);
        let mut last_bound = started;
        for (index, sent) in sent_at.iter().enumerate() {
            let sent = sent.lock().expect("sent_at");
            if let (Some(sent), Some(at)) = (*sent, bound.get(&format!("bench-{index}"))) {
                latencies.push(at.saturating_duration_since(sent));
                last_bound = last_bound.max(*at);
            }
        }
        latencies.sort_unstable();
        (latencies, last_bound)
    };

    let deployment = if args.deployment_replicas == 0 {
        DeploymentFigure::Skipped("--deployment-replicas 0".into())
    } else {
        measure_deployment(&client, base, args.deployment_replicas, &bound).await?
    };
    watch.abort();
    Ok(Report {
        watch_restarts: restarts.load(Ordering::Relaxed),
        created: args.pods,
        create_elapsed,
        bound: n_bound,
        bind_elapsed: last_bound.saturating_duration_since(started),
        latencies,
        deployment,
    })
}

/// Creates a Deployment of `replicas` and times it until every pod is bound, if a
/// Deployment controller runs (it is probed first with a one-replica Deployment).
async fn measure_deployment(
    client: &reqwest::Client,
    base: &str,
    replicas: usize,
    bound: &BoundAt,
) -> anyhow::Result<DeploymentFigure> {
    let deployments = format!("{base}/apis/apps/v1/namespaces/{NAMESPACE}/deployments");
    let deployment = |name: &str, replicas: usize| {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{
                        "name": "app",
                        "image": "registry.k8s.io/pause:3.10",
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}
                    }]}
                }
            }
        })
    };
    expect_json(
        client
            .post(&deployments)
            .json(&deployment("probe", 1))
            .send()
            .await?,
        "create the probe Deployment",
    )
    .await?;
    let probed = wait_bound(bound, 1, Duration::from_secs(10), |name| {
        name.starts_with("probe-")
    })
    .await;
    if probed == 0 {
        return Ok(DeploymentFigure::Skipped(
            "no Deployment controller yet: a 1-replica Deployment got no bound pod within 10 s"
                .into(),
        ));
    }
    let started = Instant::now();
    expect_json(
        client
            .post(&deployments)
            .json(&deployment("big", replicas))
            .send()
            .await?,
        "create the Deployment",
    )
    .await?;
    let n_bound = wait_bound(bound, replicas, Duration::from_secs(30), |name| {
        name.starts_with("big-")
    })
    .await;
    let elapsed = {
        let bound = bound.lock().expect("bound map");
        bound
            .iter()
            .filter(|(name, _)| name.starts_with("big-"))
            .map(|(_, at)| at.saturating_duration_since(started))
            .max()
            .unwrap_or_default()
    };
    Ok(DeploymentFigure::Measured {
        replicas,
        bound: n_bound,
        elapsed,
    })
}
