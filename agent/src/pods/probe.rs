//! Startup, liveness and readiness probes of a pod's app containers and sidecars: when each
//! is due, what its result means (thresholds), and running httpGet, tcpSocket and gRPC
//! ([`super::grpc_probe`]) checks from the node. Exec probes run through the pod runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::grpc_probe;
use super::model::long_running;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

/// A probe's counters for one container instance.
#[derive(Debug, Clone, Default)]
struct Counters {
    successes: i32,
    failures: i32,
    next_at: Option<Timestamp>,
    /// The probe's current verdict (passing or not).
    passing: bool,
    /// A liveness or startup probe reached its failure threshold.
    tripped: bool,
}

/// Probe state of one container instance; reset when the instance changes.
#[derive(Debug, Clone, Default)]
struct ContainerProbes {
    instance: String,
    counters: BTreeMap<ProbeKind, Counters>,
}

/// The verdicts the worker reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdicts {
    pub ready: BTreeSet<String>,
    pub started: BTreeSet<String>,
    /// Containers to kill and restart (liveness or startup failed).
    pub unhealthy: BTreeSet<String>,
}

/// All probe state of a pod.
#[derive(Debug, Default)]
pub struct Prober {
    containers: BTreeMap<String, ContainerProbes>,
}

/// One probe to run now.
#[derive(Debug, Clone)]
pub struct DueProbe {
    pub container: String,
    pub kind: ProbeKind,
    pub probe: Probe,
}

fn probe_of(container: &Container, kind: ProbeKind) -> Option<&Probe> {
    match kind {
        ProbeKind::Startup => container.startup_probe.as_ref(),
        ProbeKind::Liveness => container.liveness_probe.as_ref(),
        ProbeKind::Readiness => container.readiness_probe.as_ref(),
    }
}

fn seconds(value: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(value.unwrap_or(default).max(0) as u64)
}

impl Prober {
    /// The probes due at `now` for the running app containers and sidecars (name →
    /// (instance id, started at)), and when the next one is due.
    pub fn due(
        &mut self,
        pod: &Pod,
        running: &BTreeMap<String, (String, Timestamp)>,
        now: Timestamp,
    ) -> (Vec<DueProbe>, Option<Timestamp>) {
        let mut due = Vec::new();
        let mut next: Option<Timestamp> = None;
        self.containers.retain(|name, _| running.contains_key(name));
        for container in long_running(pod) {
            let Some((instance, started_at)) = running.get(&container.name) else {
                continue;
            };
            let state = self.containers.entry(container.name.clone()).or_default();
            if &state.instance != instance {
                *state = ContainerProbes {
                    instance: instance.clone(),
                    counters: BTreeMap::new(),
                };
            }
            let startup_passed = container.startup_probe.is_none()
                || state
                    .counters
                    .get(&ProbeKind::Startup)
                    .is_some_and(|c| c.passing);
            for kind in [
                ProbeKind::Startup,
                ProbeKind::Liveness,
                ProbeKind::Readiness,
            ] {
                let Some(probe) = probe_of(container, kind) else {
                    continue;
                };
                // Liveness and readiness wait for the startup probe to pass; the startup
                // probe stops once it has.
                if (kind == ProbeKind::Startup) == startup_passed {
                    continue;
                }
                let counters = state.counters.entry(kind).or_default();
                let at = *counters
                    .next_at
                    .get_or_insert_with(|| *started_at + seconds(probe.initial_delay_seconds, 0));
                if at <= now {
                    due.push(DueProbe {
                        container: container.name.clone(),
                        kind,
                        probe: probe.clone(),
                    });
                    counters.next_at = Some(now + seconds(probe.period_seconds, 10));
                }
                let upcoming = counters.next_at.unwrap_or(at);
                next = Some(next.map_or(upcoming, |n| n.min(upcoming)));
            }
        }
        (due, next)
    }

    /// Records a probe's result.
    pub fn record(&mut self, container: &str, kind: ProbeKind, probe: &Probe, success: bool) {
        let Some(state) = self.containers.get_mut(container) else {
            return;
        };
        let counters = state.counters.entry(kind).or_default();
        if success {
            counters.successes += 1;
            counters.failures = 0;
            if counters.successes >= probe.success_threshold.unwrap_or(1).max(1) {
                counters.passing = true;
            }
        } else {
            counters.failures += 1;
            counters.successes = 0;
            if counters.failures >= probe.failure_threshold.unwrap_or(3).max(1) {
                counters.passing = false;
                // A failed liveness or startup probe restarts the container; the new
                // instance starts with fresh counters.
                counters.tripped = kind != ProbeKind::Readiness;
            }
        }
    }

    /// The verdicts for the running containers.
    pub fn verdicts(&self, pod: &Pod, running: &BTreeMap<String, (String, Timestamp)>) -> Verdicts {
        let mut verdicts = Verdicts::default();
        for container in long_running(pod) {
            if !running.contains_key(&container.name) {
                continue;
            }
            let state = self.containers.get(&container.name);
            let counters = |kind| state.and_then(|s| s.counters.get(&kind));
            let started = container.startup_probe.is_none()
                || counters(ProbeKind::Startup).is_some_and(|c| c.passing);
            if started {
                verdicts.started.insert(container.name.clone());
            }
            let ready = started
                && (container.readiness_probe.is_none()
                    || counters(ProbeKind::Readiness).is_some_and(|c| c.passing));
            if ready {
                verdicts.ready.insert(container.name.clone());
            }
            let failed = |kind| counters(kind).is_some_and(|c| c.tripped);
            if failed(ProbeKind::Liveness) || failed(ProbeKind::Startup) {
                verdicts.unhealthy.insert(container.name.clone());
            }
        }
        verdicts
    }
}

/// The port a probe names, resolved against the container's named ports.
pub fn resolve_port(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(number) => u16::try_from(*number).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// The host a network probe dials: its own `host` when set, else the pod IP.
pub fn probe_host(host: Option<&String>, pod_ip: &str) -> String {
    host.filter(|h| !h.is_empty())
        .map_or_else(|| pod_ip.to_string(), Clone::clone)
}

/// The URL an httpGet probe asks for, its port already resolved (or shown as `?`).
pub fn http_url(http: &HTTPGetAction, port: impl std::fmt::Display, pod_ip: &str) -> String {
    let scheme = http
        .scheme
        .as_deref()
        .unwrap_or("HTTP")
        .to_ascii_lowercase();
    let host = probe_host(http.host.as_ref(), pod_ip);
    let path = http.path.as_deref().unwrap_or("/");
    let slash = if path.starts_with('/') { "" } else { "/" };
    format!("{scheme}://{host}:{port}{slash}{path}")
}

/// What a failed httpGet or tcpSocket probe tried.
fn network_failure(probe: &Probe, container: &Container, pod_ip: &str) -> String {
    let port = |port| resolve_port(port, container).map_or("?".to_string(), |p| p.to_string());
    if let Some(http) = &probe.http_get {
        return format!(
            "HTTP probe failed: GET {}",
            http_url(http, port(&http.port), pod_ip)
        );
    }
    if let Some(tcp) = &probe.tcp_socket {
        return format!(
            "TCP probe failed: dial tcp {}:{}",
            probe_host(tcp.host.as_ref(), pod_ip),
            port(&tcp.port)
        );
    }
    "no handler".to_string()
}

/// Runs an httpGet, tcpSocket or gRPC probe from the node against the pod IP: `Ok` when
/// it passes, the failure's message otherwise; `None` for exec probes (the caller runs
/// those in the container).
pub async fn check_network(
    probe: &Probe,
    container: &Container,
    pod_ip: &str,
) -> Option<Result<(), String>> {
    let timeout = seconds(probe.timeout_seconds, 1).max(Duration::from_millis(100));
    let failed = || Err(network_failure(probe, container, pod_ip));
    if let Some(http) = &probe.http_get {
        let Some(port) = resolve_port(&http.port, container) else {
            return Some(failed());
        };
        let url = http_url(http, port, pod_ip);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .danger_accept_invalid_certs(true)
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()
            .ok()?;
        let mut request = client.get(&url).header("User-Agent", "kube-probe/1.33");
        for header in http.http_headers.iter().flatten() {
            request = request.header(header.name.as_str(), header.value.as_str());
        }
        let ok = matches!(request.send().await, Ok(response) if (200..400).contains(&response.status().as_u16()));
        return Some(if ok { Ok(()) } else { failed() });
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = resolve_port(&tcp.port, container) else {
            return Some(failed());
        };
        let host = probe_host(tcp.host.as_ref(), pod_ip);
        let connect = tokio::net::TcpStream::connect((host.as_str(), port));
        let ok = matches!(tokio::time::timeout(timeout, connect).await, Ok(Ok(_)));
        return Some(if ok { Ok(()) } else { failed() });
    }
    if let Some(grpc) = &probe.grpc {
        // A gRPC probe has a port number (no named ports) and always dials the pod IP.
        let Ok(port) = u16::try_from(grpc.port) else {
            return Some(Err(format!("invalid gRPC probe port {}", grpc.port)));
        };
        let service = grpc.service.as_deref().unwrap_or_default();
        return Some(grpc_probe::check(pod_ip, port, service, timeout).await);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn http_urls_default_the_host_and_slash_the_path() {
        let http = |value: serde_json::Value| -> HTTPGetAction {
            serde_json::from_value(value).expect("valid httpGet")
        };
        assert_eq!(
            http_url(
                &http(json!({"port": 8080, "path": "healthz"})),
                8080,
                "10.1.0.2"
            ),
            "http://10.1.0.2:8080/healthz"
        );
        assert_eq!(
            http_url(
                &http(json!({"port": "web", "host": "example.test", "scheme": "HTTPS"})),
                "?",
                "10.1.0.2"
            ),
            "https://example.test:?/"
        );
        assert_eq!(probe_host(Some(&String::new()), "10.1.0.2"), "10.1.0.2");
    }

    fn pod(container: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p", "uid": "u"}, "spec": {"containers": [container]}}),
        )
        .unwrap()
    }

    #[test]
    fn readiness_needs_success_and_liveness_kills_after_threshold() {
        let pod = pod(json!({"name": "app", "image": "x",
            "readinessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 5},
            "livenessProbe": {"tcpSocket": {"port": 80}, "initialDelaySeconds": 10, "failureThreshold": 2}}));
        let t0 = Timestamp::from_second(1000).unwrap();
        let running = BTreeMap::from([("app".to_string(), ("c1".to_string(), t0))]);
        let mut prober = Prober::default();
        let (due, next) = prober.due(&pod, &running, t0);
        assert_eq!(
            due.iter().map(|d| d.kind).collect::<Vec<_>>(),
            [ProbeKind::Readiness]
        );
        assert_eq!(next, Some(t0 + Duration::from_secs(5)));
        assert!(prober.verdicts(&pod, &running).ready.is_empty());
        prober.record("app", ProbeKind::Readiness, &due[0].probe, true);
        assert!(prober.verdicts(&pod, &running).ready.contains("app"));

        let t10 = t0 + Duration::from_secs(10);
        let (due, _) = prober.due(&pod, &running, t10);
        let liveness = due
            .iter()
            .find(|d| d.kind == ProbeKind::Liveness)
            .unwrap()
            .probe
            .clone();
        prober.record("app", ProbeKind::Liveness, &liveness, false);
        assert!(prober.verdicts(&pod, &running).unhealthy.is_empty());
        prober.record("app", ProbeKind::Liveness, &liveness, false);
        assert!(prober.verdicts(&pod, &running).unhealthy.contains("app"));

        // A new instance starts with fresh counters.
        let restarted = BTreeMap::from([("app".to_string(), ("c2".to_string(), t10))]);
        prober.due(&pod, &restarted, t10);
        assert!(prober.verdicts(&pod, &restarted).unhealthy.is_empty());
    }

    #[test]
    fn startup_probe_holds_the_others_back() {
        let pod = pod(json!({"name": "app", "image": "x",
            "startupProbe": {"tcpSocket": {"port": 80}},
            "readinessProbe": {"tcpSocket": {"port": 80}}}));
        let t0 = Timestamp::from_second(1000).unwrap();
        let running = BTreeMap::from([("app".to_string(), ("c1".to_string(), t0))]);
        let mut prober = Prober::default();
        let (due, _) = prober.due(&pod, &running, t0);
        assert_eq!(
            due.iter().map(|d| d.kind).collect::<Vec<_>>(),
            [ProbeKind::Startup]
        );
        assert!(!prober.verdicts(&pod, &running).started.contains("app"));
        prober.record("app", ProbeKind::Startup, &due[0].probe, true);
        assert!(prober.verdicts(&pod, &running).started.contains("app"));
        let (due, _) = prober.due(&pod, &running, t0);
        assert_eq!(
            due.iter().map(|d| d.kind).collect::<Vec<_>>(),
            [ProbeKind::Readiness]
        );
    }

    #[test]
    fn sidecars_are_probed_and_regular_init_containers_are_not() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {
                "initContainers": [
                    {"name": "setup", "image": "x"},
                    {"name": "proxy", "image": "x", "restartPolicy": "Always",
                        "startupProbe": {"tcpSocket": {"port": 80}},
                        "readinessProbe": {"tcpSocket": {"port": 80}}},
                ],
                "containers": [{"name": "app", "image": "x"}],
            },
        }))
        .unwrap();
        let t0 = Timestamp::from_second(1000).unwrap();
        let running = BTreeMap::from([
            ("setup".to_string(), ("s1".to_string(), t0)),
            ("proxy".to_string(), ("p1".to_string(), t0)),
        ]);
        let mut prober = Prober::default();
        let (due, _) = prober.due(&pod, &running, t0);
        let due: Vec<_> = due.iter().map(|d| (d.container.as_str(), d.kind)).collect();
        assert_eq!(due, [("proxy", ProbeKind::Startup)]);
        let verdicts = prober.verdicts(&pod, &running);
        assert!(verdicts.started.is_empty() && verdicts.ready.is_empty());
        let startup = pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[1]
            .startup_probe
            .clone()
            .unwrap();
        prober.record("proxy", ProbeKind::Startup, &startup, true);
        let verdicts = prober.verdicts(&pod, &running);
        assert_eq!(verdicts.started, BTreeSet::from(["proxy".to_string()]));
        assert!(
            verdicts.ready.is_empty(),
            "its readiness probe has not passed"
        );
    }

    #[test]
    fn named_ports_resolve() {
        let container: Container = serde_json::from_value(
            json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}),
        )
        .unwrap();
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &container),
            Some(8080)
        );
        assert_eq!(resolve_port(&IntOrString::Int(81), &container), Some(81));
        assert_eq!(
            resolve_port(&IntOrString::String("nope".into()), &container),
            None
        );
    }
}
