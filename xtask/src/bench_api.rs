//! `cargo xtask bench api`: measures a release `skiff-control` over HTTPS beside the floor
//! that any durable store pays, one fsynced append per write.

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::bench::{self, Process, expect_success, megabytes, verdict};
use crate::cluster::{self, Kubeconfig};

#[derive(clap::Args)]
pub struct ApiBenchArgs {
    /// Concurrent HTTPS clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// ConfigMaps created in each create phase (paced, then unpaced).
    #[arg(long, default_value_t = 5_000)]
    creates: usize,
    /// Target rate of the paced create phase, per second.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Single-object gets.
    #[arg(long, default_value_t = 5_000)]
    gets: usize,
    /// Lists of up to 500 ConfigMaps.
    #[arg(long, default_value_t = 200)]
    lists: usize,
    /// Watchers of the ConfigMaps during the create phases.
    #[arg(long, default_value_t = 2)]
    watchers: usize,
    /// Pods stored before memory is read.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Where the temporary data directory goes (default: the system temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keeps the data directory (store, server log) for a look afterwards.
    #[arg(long)]
    keep: bool,
}

const CONFIGMAPS: &str = "/api/v1/namespaces/default/configmaps";
const PODS: &str = "/api/v1/namespaces/default/pods";

/// Latencies of one phase and its wall time.
struct Sample {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Sample {
    fn new(mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        Self { latencies, elapsed }
    }

    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The nearest-rank percentile, in milliseconds.
    fn percentile_ms(&self, percent: f64) -> f64 {
        bench::percentile_ms(&self.latencies, percent)
    }
}

/// Starts `skiff-control serve` on a temporary data directory; returns the process (killed
/// on drop) and the URL it serves.
fn start_server(executable: &Path, data_dir: &Path) -> anyhow::Result<(Process, String)> {
    fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let log = data_dir.join("skiff-control.log");
    let server = Process::start(
        Command::new(executable)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "warn"),
        &log,
    )?;
    let url = server.wait_for_line("skiff-control serving ", Duration::from_secs(30), &log)?;
    Ok((server, url))
}

/// Sends `count` requests from `clients` concurrent tasks, started at `rate` per second when
/// given (open loop: request `i` is due at `i / rate`), else as fast as answers come back.
async fn drive<F, Fut>(
    count: usize,
    clients: usize,
    rate: Option<f64>,
    request: F,
) -> anyhow::Result<Sample>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let request = Arc::new(request);
    let next = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let request = request.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return anyhow::Ok(latencies);
                }
                if let Some(rate) = rate {
                    let due = started + Duration::from_secs_f64(index as f64 / rate);
                    tokio::time::sleep_until(due).await;
                }
                let sent = Instant::now();
                request(index).await?;
                latencies.push(sent.elapsed());
            }
        });
    }
    let mut latencies = Vec::with_capacity(count);
    while let Some(result) = tasks.join_next().await {
        latencies.extend(result.context("a bench client panicked")??);
    }
    Ok(Sample::new(latencies, started.elapsed()))
}

fn configmap_body(name: &str, index: usize) -> String {
    // About 1 KiB of data that differs per object, so nothing compresses or dedups it away.
    let payload: String = (0..128)
        .map(|k| format!("{:08x}", index * 131 + k))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app": "bench"}},
        "data": {"payload": payload},
    })
    .to_string()
}

/// A pod as a Deployment would create it: two containers with probes, env, resources, mounts.
fn pod_body(index: usize) -> String {
    let name = format!("web-7c9d8f6b5-{index:05}");
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app": "web", "tier": "frontend", "pod-template-hash": "7c9d8f6b5"},
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "9090",
                "kubectl.kubernetes.io/default-container": "web",
            },
        },
        "spec": {
            "containers": [
                {
                    "name": "web",
                    "image": "registry.local:5000/web:1.24.3",
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["/app/web"],
                    "args": ["--listen=:8080", "--metrics=:9090", "--log-format=json"],
                    "ports": [
                        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
                    ],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "CACHE_SIZE_MB", "value": "64"},
                    ],
                    "resources": {
                        "requests": {"cpu": "250m", "memory": "256Mi"},
                        "limits": {"cpu": "1", "memory": "512Mi"},
                    },
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 5},
                    "livenessProbe": {
                        "httpGet": {"path": "/healthz", "port": 8080},
                        "initialDelaySeconds": 10,
                        "periodSeconds": 10,
                    },
                    "volumeMounts": [
                        {"name": "config", "mountPath": "/etc/web", "readOnly": true},
                        {"name": "cache", "mountPath": "/var/cache/web"},
                    ],
                },
                {
                    "name": "log-shipper",
                    "image": "registry.local:5000/log-shipper:0.9.1",
                    "args": ["--source=/var/log/web", "--sink=http://logs.observability:8080"],
                    "resources": {
                        "requests": {"cpu": "50m", "memory": "64Mi"},
                        "limits": {"memory": "128Mi"},
                    },
                    "volumeMounts": [{"name": "cache", "mountPath": "/var/log/web", "subPath": "logs"}],
                },
            ],
            "volumes": [
                {"name": "config", "configMap": {"name": "web-config"}},
                {"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}},
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
        },
    })
    .to_string()
}

/// Creates the ConfigMaps of `bodies` (name, JSON) and records when each create was
/// acknowledged.
async fn create_configmaps(
    client: &reqwest::Client,
    url: &str,
    clients: usize,
    rate: Option<f64>,
    bodies: Arc<Vec<(String, String)>>,
) -> anyhow::Result<(Sample, HashMap<String, Instant>)> {
    let acknowledged = Arc::new(Mutex::new(HashMap::with_capacity(bodies.len())));
    let (client, url, acks) = (
        client.clone(),
        format!("{url}{CONFIGMAPS}"),
        acknowledged.clone(),
    );
    let count = bodies.len();
    let sample = drive(count, clients, rate, move |index| {
        let (client, url, acks, bodies) =
            (client.clone(), url.clone(), acks.clone(), bodies.clone());
        async move {
            let (name, body) = &bodies[index];
            let response = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .with_context(|| format!("create configmap {name}"))?;
            expect_success(response, &format!("create configmap {name}")).await?;
            acks.lock()
                .expect("acks lock")
                .insert(name.clone(), Instant::now());
            Ok(())
        }
    })
    .await?;
    let acknowledged = std::mem::take(&mut *acknowledged.lock().expect("acks lock"));
    Ok((sample, acknowledged))
}

/// A watch of the ConfigMaps that records when each object's event arrived.
struct Watcher {
    seen: Arc<AtomicUsize>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<HashMap<String, Instant>>>,
}

impl Watcher {
    /// Returns once the server has answered, which it does after registering the watch.
    async fn start(client: reqwest::Client, url: &str, revision: &str) -> anyhow::Result<Self> {
        let mut response = client
            .get(format!(
                "{url}{CONFIGMAPS}?watch=true&resourceVersion={revision}"
            ))
            .send()
            .await
            .context("start a configmap watch")?;
        anyhow::ensure!(
            response.status().is_success(),
            "start a configmap watch: {}",
            response.status()
        );
        let seen = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let counter = seen.clone();
        let task = tokio::spawn(async move {
            let mut arrivals = HashMap::new();
            let mut buffer: Vec<u8> = Vec::new();
            loop {
                let chunk = tokio::select! {
                    _ = &mut stopped => break,
                    chunk = response.chunk() => chunk.context("read the watch stream")?,
                };
                let Some(chunk) = chunk else { break };
                let arrived = Instant::now();
                buffer.extend_from_slice(&chunk);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let event: Value =
                        serde_json::from_slice(&line).context("parse a watch event")?;
                    match event["type"].as_str() {
                        Some("ADDED") => {
                            let name = event["object"]["metadata"]["name"]
                                .as_str()
                                .context("watch event without a name")?;
                            arrivals.insert(name.to_string(), arrived);
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        Some("ERROR") => anyhow::bail!("watch ended with an error: {event}"),
                        _ => {}
                    }
                }
            }
            Ok(arrivals)
        });
        Ok(Self { seen, stop, task })
    }
}

/// Delivery latency from a create's acknowledgement to its watch event, for all watchers.
struct Delivery {
    sample: Sample,
    before_ack: usize,
}

fn delivery(
    acknowledged: &HashMap<String, Instant>,
    arrivals: &[HashMap<String, Instant>],
    elapsed: Duration,
) -> anyhow::Result<Delivery> {
    let mut latencies = Vec::new();
    let mut before_ack = 0;
    for watcher in arrivals {
        for (name, acked) in acknowledged {
            let arrived = watcher
                .get(name)
                .with_context(|| format!("a watcher never received configmap {name}"))?;
            if arrived < acked {
                before_ack += 1;
            }
            latencies.push(arrived.saturating_duration_since(*acked));
        }
    }
    Ok(Delivery {
        sample: Sample::new(latencies, elapsed),
        before_ack,
    })
}

/// The floor: one write plus `sync_data` per payload to a plain file; `writers` threads
/// share the file behind a mutex.
fn fsync_floor(path: &Path, payloads: &[String], writers: usize) -> anyhow::Result<Sample> {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let file = Mutex::new(file);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let latencies = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<Vec<Duration>> {
                    let mut latencies = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(payload) = payloads.get(index) else {
                            return Ok(latencies);
                        };
                        let begun = Instant::now();
                        let mut file = file.lock().expect("floor file lock");
                        file.write_all(payload.as_bytes())
                            .and_then(|()| file.write_all(b"\n"))
                            .and_then(|()| file.sync_data())
                            .with_context(|| format!("append to {}", path.display()))?;
                        drop(file);
                        latencies.push(begun.elapsed());
                    }
                })
            })
            .collect();
        let mut all = Vec::with_capacity(payloads.len());
        for handle in handles {
            all.extend(handle.join().expect("floor writer panicked")?);
        }
        anyhow::Ok(all)
    })?;
    Ok(Sample::new(latencies, started.elapsed()))
}

fn row(label: &str, sample: &Sample, target: &str) {
    println!(
        "{label:<40} {:>7} {:>9.0} {:>8.2} {:>8.2}  {target}",
        sample.latencies.len(),
        sample.per_second(),
        sample.percentile_ms(50.0),
        sample.percentile_ms(99.0),
    );
}

pub fn run(args: &ApiBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients > 0 && args.creates > 0 && args.rate > 0.0,
        "--clients, --creates and --rate must be positive"
    );
    eprintln!("bench: building skiff-control (release)");
    let executable = cluster::build_control_release()?;
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let temp = tempfile::Builder::new()
        .prefix("skiff-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("create a temp dir in {}", parent.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let result = runtime.block_on(bench(args, &executable, temp.path()));
    if args.keep {
        eprintln!("bench: kept {}", temp.keep().display());
    }
    result
}

async fn bench(args: &ApiBenchArgs, executable: &Path, dir: &Path) -> anyhow::Result<()> {
    // The floor runs first, on an idle disk, over the payloads the paced creates send.
    let paced: Arc<Vec<(String, String)>> = Arc::new(
        (0..args.creates)
            .map(|i| {
                let name = format!("paced-{i:05}");
                let body = configmap_body(&name, i);
                (name, body)
            })
            .collect(),
    );
    eprintln!("bench: fsync floor, {} appends", args.creates);
    let payloads: Vec<String> = paced.iter().map(|(_, body)| body.clone()).collect();
    let (floor_serial, floor_shared) = tokio::task::block_in_place(|| {
        anyhow::Ok((
            fsync_floor(&dir.join("floor-1.log"), &payloads, 1)?,
            fsync_floor(&dir.join("floor-shared.log"), &payloads, args.clients)?,
        ))
    })?;

    let data_dir = dir.join("control");
    let (server, url) = start_server(executable, &data_dir)?;
    let kubeconfig = Kubeconfig::read(&data_dir.join("admin.kubeconfig"))?;
    let client = kubeconfig.client()?;
    let (rss_idle, _) = cluster::resident_memory(server.pid())?;

    let unpaced: Arc<Vec<(String, String)>> = Arc::new(
        (0..args.creates)
            .map(|i| {
                let name = format!("unpaced-{i:05}");
                let body = configmap_body(&name, args.creates + i);
                (name, body)
            })
            .collect(),
    );

    // Watchers start at the current revision, so they receive exactly the bench's creates.
    let list = expect_success(
        client
            .get(format!("{url}{CONFIGMAPS}?limit=1"))
            .send()
            .await?,
        "list configmaps",
    )
    .await?;
    let list: Value = serde_json::from_slice(&list).context("parse the configmap list")?;
    let revision = list["metadata"]["resourceVersion"]
        .as_str()
        .context("configmap list without a resourceVersion")?
        .to_string();
    let mut watchers = Vec::new();
    for _ in 0..args.watchers {
        watchers.push(Watcher::start(kubeconfig.client()?, &url, &revision).await?);
    }

    eprintln!(
        "bench: {} configmap creates at {}/s from {} clients, {} watchers",
        args.creates, args.rate, args.clients, args.watchers
    );
    let (create_paced, acks_paced) =
        create_configmaps(&client, &url, args.clients, Some(args.rate), paced.clone()).await?;
    eprintln!("bench: {} configmap creates, unpaced", args.creates);
    let (create_unpaced, acks_unpaced) =
        create_configmaps(&client, &url, args.clients, None, unpaced.clone()).await?;

    let expected = 2 * args.creates;
    let deadline = Instant::now() + Duration::from_secs(10);
    while watchers
        .iter()
        .any(|w| w.seen.load(Ordering::Relaxed) < expected)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut arrivals = Vec::new();
    for watcher in watchers {
        let _ = watcher.stop.send(());
        arrivals.push(watcher.task.await.context("a watcher panicked")??);
    }
    let watch_paced = delivery(&acks_paced, &arrivals, create_paced.elapsed)?;
    let watch_unpaced = delivery(&acks_unpaced, &arrivals, create_unpaced.elapsed)?;

    eprintln!("bench: {} gets, {} lists", args.gets, args.lists);
    let names: Arc<Vec<String>> = Arc::new(
        paced
            .iter()
            .chain(unpaced.iter())
            .map(|(name, _)| name.clone())
            .collect(),
    );
    let (get_client, get_url) = (client.clone(), format!("{url}{CONFIGMAPS}"));
    let gets = drive(args.gets, args.clients, None, move |index| {
        // A fixed stride spreads the reads over all objects without a random generator.
        let name = names[(index * 7919) % names.len()].clone();
        let (client, url) = (get_client.clone(), get_url.clone());
        async move {
            let response = client.get(format!("{url}/{name}")).send().await?;
            expect_success(response, &format!("get configmap {name}")).await?;
            Ok(())
        }
    })
    .await?;
    let (list_client, list_url) = (client.clone(), format!("{url}{CONFIGMAPS}?limit=500"));
    let list_bytes = Arc::new(AtomicUsize::new(0));
    let bytes_counter = list_bytes.clone();
    let lists = drive(args.lists, args.clients, None, move |_| {
        let (client, url, bytes) = (list_client.clone(), list_url.clone(), bytes_counter.clone());
        async move {
            let body = expect_success(client.get(&url).send().await?, "list configmaps").await?;
            bytes.fetch_add(body.len(), Ordering::Relaxed);
            Ok(())
        }
    })
    .await?;
    let (rss_configmaps, _) = cluster::resident_memory(server.pid())?;

    eprintln!("bench: {} pod creates, unpaced", args.pods);
    let (pod_client, pod_url) = (client.clone(), format!("{url}{PODS}"));
    let pods = drive(args.pods, args.clients, None, move |index| {
        let (client, url) = (pod_client.clone(), pod_url.clone());
        async move {
            let response = client
                .post(&url)
                .header("content-type", "application/json")
                .body(pod_body(index))
                .send()
                .await?;
            expect_success(response, &format!("create pod {index}")).await?;
            Ok(())
        }
    })
    .await?;
    let (rss_pods, rss_peak) = cluster::resident_memory(server.pid())?;
    drop(server);

    let create_target = format!(
        "p99 < 20 ms at 500/s: {}",
        verdict(create_paced.percentile_ms(99.0) < 20.0)
    );
    let watch_target = format!(
        "p99 < 10 ms: {}",
        verdict(watch_paced.sample.percentile_ms(99.0) < 10.0)
    );
    println!();
    println!(
        "skiff-control API bench: {} clients, {} watchers, configmap body {} B, pod body {} B, \
         data in {}",
        args.clients,
        args.watchers,
        paced[0].1.len(),
        pod_body(0).len(),
        dir.display()
    );
    println!(
        "{:<40} {:>7} {:>9} {:>8} {:>8}  target",
        "phase", "count", "per s", "p50 ms", "p99 ms"
    );
    row(
        &format!("create configmap, paced {}/s", args.rate),
        &create_paced,
        &create_target,
    );
    row("create configmap, unpaced", &create_unpaced, "");
    row("get configmap", &gets, "");
    let mean_list_kb = list_bytes.load(Ordering::Relaxed) as f64 / args.lists.max(1) as f64 / 1e3;
    row(
        &format!("list configmaps limit=500 ({mean_list_kb:.0} kB)"),
        &lists,
        "",
    );
    row(
        &format!("watch delivery, paced ({} early)", watch_paced.before_ack),
        &watch_paced.sample,
        &watch_target,
    );
    row(
        &format!(
            "watch delivery, unpaced ({} early)",
            watch_unpaced.before_ack
        ),
        &watch_unpaced.sample,
        "",
    );
    row("create pod, unpaced", &pods, "");
    row("floor: write+fdatasync, 1 writer", &floor_serial, "");
    row(
        &format!("floor: write+fdatasync, {} writers", args.clients),
        &floor_shared,
        "",
    );
    println!(
        "API/floor: create p99 (paced vs 1 writer) {:.2}x; create throughput (unpaced vs {} \
         writers) {:.2}x",
        create_paced.percentile_ms(99.0) / floor_serial.percentile_ms(99.0),
        args.clients,
        create_unpaced.per_second() / floor_shared.per_second()
    );
    println!(
        "server RSS: idle {:.1} MB, +{} configmaps {:.1} MB, +{} pods {:.1} MB (peak {:.1} MB)  \
         target < 150 MB with 10 000 pods: {}",
        megabytes(rss_idle),
        2 * args.creates,
        megabytes(rss_configmaps),
        args.pods,
        megabytes(rss_pods),
        megabytes(rss_peak),
        verdict(rss_pods < 150_000_000)
    );
    println!(
        "(\"early\": watch events that arrived before the create's response; counted as 0 ms)"
    );
    Ok(())
}
