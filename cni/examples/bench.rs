//! ADD/DEL latency of skiff-cni against the reference `bridge` + `host-local` plugins, in
//! the same run: sequential, and 20 at once. Root only; everything happens in network
//! namespaces the bench creates and deletes.
//!
//! Build and run (what `cargo xtask bench cni` calls):
//! `cargo build --release -p skiff-cni --bins --examples && target/release/examples/bench`
//! Options: `--pods N` (default 100, a multiple of 20), `--masq` (ipMasq on for both),
//! `--json` (one JSON object on stdout instead of the table).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BURST: usize = 20;

struct Netns(String);

impl Netns {
    fn new(prefix: &str) -> Netns {
        let name = format!("{prefix}{:08x}", rand::random::<u32>());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name} failed (root and iproute2 needed)");
        Netns(name)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Plugin {
    label: &'static str,
    bin: PathBuf,
    plugin_type: &'static str,
}

fn run_once(plugin: &Plugin, command: &str, id: &str, netns: &str, config: &str) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(&plugin.bin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", plugin.bin.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "{} {command} {id} failed: {}{}",
        plugin.label,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let rank = ((samples.len() as f64) * p).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1000.0
}

/// (op, mode) -> samples in ms percentiles.
struct Figures {
    rows: Vec<(String, &'static str, &'static str, usize, f64, f64)>,
}

fn bench_plugin(plugin: &Plugin, pods: &[Netns], masq: bool, figures: &mut Figures) {
    // Each plugin gets its own "node": a namespace holding its bridge and sysctls. The
    // bench's main thread enters it (it has no other threads yet that matter, and is not
    // an async runtime), and every plugin process it spawns starts there.
    let node = Netns::new("skbn");
    let node_file = std::fs::File::open(node.path()).unwrap();
    let data = std::env::temp_dir().join(format!("skiff-cni-bench-{:08x}", rand::random::<u32>()));
    let config = serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench", "type": plugin.plugin_type, "bridge": "skbench0",
        "isGateway": true, "ipMasq": masq,
        "ipam": {"type": "host-local", "subnet": "10.123.0.0/16", "dataDir": data},
    })
    .to_string();
    let ids: Vec<String> = (0..pods.len()).map(|i| format!("bench-{i}")).collect();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&node_file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("enter the bench node namespace");
                // Warm-up: creates the bridge (and the masquerade chain) outside the
                // measurements, as on a node that already runs pods.
                run_once(plugin, "ADD", "warmup", &pods[0].path(), &config);
                run_once(plugin, "DEL", "warmup", &pods[0].path(), &config);

                let mut add = Vec::new();
                for (pod, id) in pods.iter().zip(&ids) {
                    add.push(run_once(plugin, "ADD", id, &pod.path(), &config));
                }
                let mut del = Vec::new();
                for (pod, id) in pods.iter().zip(&ids) {
                    del.push(run_once(plugin, "DEL", id, &pod.path(), &config));
                }
                record(figures, plugin.label, "ADD", "sequential", &mut add);
                record(figures, plugin.label, "DEL", "sequential", &mut del);

                let mut add = Vec::new();
                let mut del = Vec::new();
                for chunk in pods.iter().zip(&ids).collect::<Vec<_>>().chunks(BURST) {
                    add.extend(burst(plugin, "ADD", chunk, &config));
                    del.extend(burst(plugin, "DEL", chunk, &config));
                }
                record(figures, plugin.label, "ADD", "20 at once", &mut add);
                record(figures, plugin.label, "DEL", "20 at once", &mut del);
            })
            .join()
            .expect("bench thread panicked");
    });
    let _ = std::fs::remove_dir_all(&data);
}

/// Starts every call of the chunk at the same moment (threads released by a barrier).
fn burst(
    plugin: &Plugin,
    command: &str,
    chunk: &[(&Netns, &String)],
    config: &str,
) -> Vec<Duration> {
    let barrier = std::sync::Barrier::new(chunk.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunk
            .iter()
            .map(|(pod, id)| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    run_once(plugin, command, id, &pod.path(), config)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn record(
    figures: &mut Figures,
    label: &str,
    op: &'static str,
    mode: &'static str,
    samples: &mut [Duration],
) {
    let p50 = percentile(samples, 0.50);
    let p99 = percentile(samples, 0.99);
    figures
        .rows
        .push((label.to_owned(), op, mode, samples.len(), p50, p99));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pods_n: usize = args
        .iter()
        .position(|a| a == "--pods")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let masq = args.iter().any(|a| a == "--masq");
    let json = args.iter().any(|a| a == "--json");
    assert!(
        pods_n >= BURST && pods_n.is_multiple_of(BURST),
        "--pods must be a multiple of {BURST}"
    );

    let skiff = std::env::var_os("SKIFF_CNI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent()
                .and_then(Path::parent)
                .unwrap()
                .join("skiff-cni")
        });
    assert!(
        skiff.exists(),
        "{} not found: build it first (cargo build --release -p skiff-cni --bins --examples) \
         or set SKIFF_CNI_BIN",
        skiff.display()
    );
    for reference in ["bridge", "host-local"] {
        let path = Path::new("/usr/lib/cni").join(reference);
        assert!(
            path.exists(),
            "reference plugin {} missing: apt-get install -y containernetworking-plugins",
            path.display()
        );
    }
    let plugins = [
        Plugin {
            label: "skiff-cni",
            bin: skiff,
            plugin_type: "skiff-cni",
        },
        Plugin {
            label: "reference",
            bin: PathBuf::from("/usr/lib/cni/bridge"),
            plugin_type: "bridge",
        },
    ];
    let pods: Vec<Netns> = (0..pods_n).map(|_| Netns::new("skbp")).collect();
    let mut figures = Figures { rows: Vec::new() };
    for plugin in &plugins {
        bench_plugin(plugin, &pods, masq, &mut figures);
    }

    if json {
        let rows: Vec<serde_json::Value> = figures
            .rows
            .iter()
            .map(|(label, op, mode, n, p50, p99)| {
                serde_json::json!({"plugin": label, "op": op, "mode": mode, "n": n,
                                   "p50_ms": p50, "p99_ms": p99})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"pods": pods_n, "ip_masq": masq, "rows": rows})
        );
        return;
    }
    println!("CNI ADD/DEL latency, {pods_n} pods per mode, ipMasq {masq}, release build");
    println!(
        "{:<10} {:<4} {:<11} {:>5} {:>9} {:>9}",
        "plugin", "op", "mode", "n", "p50 ms", "p99 ms"
    );
    for (label, op, mode, n, p50, p99) in &figures.rows {
        println!("{label:<10} {op:<4} {mode:<11} {n:>5} {p50:>9.2} {p99:>9.2}");
    }
    println!("ratio reference/skiff-cni (higher is better for skiff-cni):");
    for op in ["ADD", "DEL"] {
        for mode in ["sequential", "20 at once"] {
            let find = |label: &str| {
                figures
                    .rows
                    .iter()
                    .find(|r| r.0 == label && r.1 == op && r.2 == mode)
                    .map(|r| (r.4, r.5))
                    .unwrap()
            };
            let (s50, s99) = find("skiff-cni");
            let (r50, r99) = find("reference");
            println!(
                "{op:<4} {mode:<11} p50 x{:.1}  p99 x{:.1}",
                r50 / s50,
                r99 / s99
            );
        }
    }
    let (_, s99) = figures
        .rows
        .iter()
        .find(|r| r.0 == "skiff-cni" && r.1 == "ADD" && r.2 == "20 at once")
        .map(|r| (r.4, r.5))
        .unwrap();
    let (_, r99) = figures
        .rows
        .iter()
        .find(|r| r.0 == "reference" && r.1 == "ADD" && r.2 == "20 at once")
        .map(|r| (r.4, r.5))
        .unwrap();
    let target_met = s99 <= r99 / 2.0;
    println!(
        "target (skiff-cni burst ADD p99 <= half the reference's): {}",
        if target_met { "met" } else { "NOT met" }
    );
}
