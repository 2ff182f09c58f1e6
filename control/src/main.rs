//! `skiff-control`: the control plane binary. `skiff-control serve` runs the API server on
//! its embedded store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use skiff_control::api::{ApiConfig, ApiServer};
use skiff_control::pki::{self, PkiPaths};
use skiff_control::server::{self, Authenticator};
use skiff_control::store::embedded::{EmbeddedOptions, EmbeddedStore};

/// mimalloc rather than the system allocator: the API server allocates and frees many small
/// JSON values per request on every worker thread, which glibc's malloc serves slowly
/// (a third of the CPU time under load) and with per-thread arenas that fragment.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Events the store itself keeps (see `serve`).
const STORE_HISTORY: usize = 1_000;

#[derive(Parser)]
#[command(name = "skiff-control", version, about = "skiff's control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the API server on the embedded store, with the scheduler and controllers.
    Serve(ServeArgs),
    /// Runs only the scheduler, against the API server of a kubeconfig.
    Scheduler(ClientArgs),
    /// Runs only the workload controllers, against the API server of a kubeconfig.
    Controllers(ClientArgs),
    /// Runs hollow nodes: simulated Ready nodes that report their pods Running.
    Sim(SimArgs),
}

#[derive(clap::Args)]
struct SimArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    options: skiff_control::sim::SimOptions,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// The kubeconfig to reach the API server with (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

/// A kube-rs client for the API server a kubeconfig names.
async fn client_from(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("load kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("find a kubeconfig")?,
    };
    kube::Client::try_from(config).context("build the API client")
}

/// Runs `task` until it fails, logging and restarting it: a controller that lost its
/// connection starts over from a fresh list.
async fn supervise<F, Fut>(name: &'static str, task: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    loop {
        match task().await {
            Ok(()) => return,
            Err(error) => {
                tracing::error!(%name, error = format!("{error:#}"), "stopped; restarting")
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Holds the store file, the certificates, the token file and the admin kubeconfig.
    #[arg(long, default_value = "/var/lib/skiff/control")]
    data_dir: PathBuf,
    /// Where HTTPS is served.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Serve plain HTTP without authentication instead of HTTPS, for local debugging only.
    #[arg(long)]
    insecure_http: bool,
    /// Extra names or addresses for the serving certificate (repeatable).
    #[arg(long = "tls-san")]
    tls_sans: Vec<String>,
    /// The range ClusterIPs are allocated from.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: String,
    /// The range NodePorts are allocated from, as FIRST-LAST.
    #[arg(long, default_value = "30000-32767")]
    node_port_range: String,
    /// How many recent events of each resource are kept for watches that resume.
    #[arg(long, default_value_t = 10_000)]
    watch_history: usize,
    /// Where to write the admin kubeconfig (default: DATA_DIR/admin.kubeconfig).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

fn parse_port_range(text: &str) -> anyhow::Result<std::ops::RangeInclusive<u16>> {
    let (first, last) = text
        .split_once('-')
        .with_context(|| format!("node port range {text:?}: expected FIRST-LAST"))?;
    let first: u16 = first
        .parse()
        .with_context(|| format!("node port range {text:?}: bad first port"))?;
    let last: u16 = last
        .parse()
        .with_context(|| format!("node port range {text:?}: bad last port"))?;
    anyhow::ensure!(
        first <= last && first > 0,
        "node port range {text:?}: empty"
    );
    Ok(first..=last)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create data directory {}", args.data_dir.display()))?;
    let config = ApiConfig {
        service_cidr: args.service_cidr.parse().map_err(anyhow::Error::msg)?,
        node_ports: parse_port_range(&args.node_port_range)?,
        watch_history: args.watch_history,
        ..ApiConfig::default()
    };
    // Watches resume from the API server's watch cache; the store's own window only
    // bridges the cache's list and its store watch.
    let store = EmbeddedStore::open(
        &args.data_dir.join("store.redb"),
        EmbeddedOptions {
            history_events: STORE_HISTORY,
        },
    )
    .context("open the embedded store")?;
    let api = ApiServer::new(Arc::new(store), config).await?;
    tokio::spawn(skiff_control::controllers::namespace::run(api.clone()));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let address = server::local_addr(&listener)?;

    if args.insecure_http {
        tracing::warn!(%address, "serving plain HTTP without authentication (--insecure-http)");
        println!("skiff-control serving http://{address} (no TLS, no authentication)");
        return server::serve(listener, api, None, None).await;
    }

    let paths = PkiPaths::new(&args.data_dir);
    let mut hosts = args.tls_sans.clone();
    hosts.push(address.ip().to_string());
    pki::ensure_certificates(&paths, &hosts)?;
    let tokens = pki::ensure_tokens(&paths.tokens)?;
    let kubeconfig = args
        .kubeconfig
        .clone()
        .unwrap_or_else(|| args.data_dir.join("admin.kubeconfig"));
    let ca_pem = std::fs::read_to_string(&paths.ca_cert)
        .with_context(|| format!("read {}", paths.ca_cert.display()))?;
    let host = if address.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        address.ip().to_string()
    };
    let url = format!("https://{host}:{}", address.port());
    pki::write_kubeconfig(&kubeconfig, &url, &ca_pem, &tokens[0].token)?;
    let tls = server::tls_config(&paths)?;
    tracing::info!(%address, kubeconfig = %kubeconfig.display(), "skiff-control serving");
    println!("skiff-control serving {url}");
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!("  kubectl get namespaces");
    let authenticator = Arc::new(Authenticator::new(&tokens));
    let serving = tokio::spawn(server::serve(listener, api, Some(tls), Some(authenticator)));
    // The scheduler and controllers reach the API server the way any client does: over
    // HTTPS with the admin kubeconfig, so each can also run on its own.
    let client = client_from(Some(&kubeconfig)).await?;
    // SKIFF_SCHEDULER=off leaves scheduling to a `skiff-control scheduler` of its own, as
    // SKIFF_CONTROLLERS=off does for the controllers.
    let scheduler_off =
        std::env::var("SKIFF_SCHEDULER").is_ok_and(|v| v == "off" || v == "false" || v == "0");
    let scheduler = if scheduler_off {
        tracing::info!("in-process scheduler disabled (SKIFF_SCHEDULER=off)");
        None
    } else {
        let scheduler_client = client.clone();
        Some(tokio::spawn(supervise("scheduler", move || {
            skiff_control::scheduler::run_with_leader_election(scheduler_client.clone())
        })))
    };
    let controllers = tokio::spawn(supervise("controllers", move || {
        skiff_control::controllers::run_workloads(client.clone())
    }));
    tokio::select! {
        result = serving => result.context("API server task")?,
        () = termination() => {
            // Leaders give their Leases up, so a standby control plane takes over at once.
            skiff_control::controllers::leader::request_stop();
            let _ = tokio::time::timeout(RELEASE_WAIT, async {
                let _ = controllers.await;
                if let Some(scheduler) = scheduler {
                    let _ = scheduler.await;
                }
            })
            .await;
            Ok(())
        }
    }
}

/// How long a stopping process waits for its elections to release their Leases.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// SIGTERM or SIGINT.
async fn termination() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs an elected component until it returns or the process is asked to stop, in which
/// case its Lease is released first.
async fn until_terminated(
    component: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut component = std::pin::pin!(component);
    tokio::select! {
        result = &mut component => result,
        () = termination() => {
            skiff_control::controllers::leader::request_stop();
            match tokio::time::timeout(RELEASE_WAIT, component).await {
                Ok(result) => result,
                Err(_) => Ok(()),
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?
        .block_on(run())
}

/// mimalloc's option numbers (`mi_option_e` in its `mimalloc.h`, the same in its v2 and v3),
/// which `libmimalloc-sys` does not name.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Has mimalloc give freed memory back to the OS at once rather than a second later, and
/// commit its arenas as they are used rather than whole: with its defaults it kept some
/// 35 MB more resident with 10 000 pods (the server, scheduler and controllers free much of
/// what they parse right away), 13 MB of it at idle.
///
/// It runs as a constructor of the executable (`.init_array`), before `main`: the first
/// allocation reserves mimalloc's first arena, whose commit mode is then fixed, and that
/// happens before `main` (set from `main`, the arena option changed nothing).
#[allow(
    unsafe_code,
    reason = "a constructor must be placed in .init_array by hand"
)]
#[used]
#[unsafe(link_section = ".init_array")]
static RETURN_FREED_MEMORY_PROMPTLY: extern "C" fn() = return_freed_memory_promptly;

#[allow(unsafe_code, reason = "mimalloc's options are set through its C API")]
extern "C" fn return_freed_memory_promptly() {
    // SAFETY: `mi_option_set` stores a plain integer in mimalloc's option table; both
    // option numbers exist in the linked mimalloc, and no other thread runs yet.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Scheduler(args) => {
            let client = client_from(args.kubeconfig.as_deref()).await?;
            until_terminated(skiff_control::scheduler::run_with_leader_election(client)).await
        }
        Command::Controllers(args) => {
            let client = client_from(args.kubeconfig.as_deref()).await?;
            until_terminated(skiff_control::controllers::run_workloads(client)).await
        }
        Command::Sim(args) => {
            let client = client_from(args.client.kubeconfig.as_deref()).await?;
            skiff_control::sim::run(client, args.options).await
        }
    }
}
