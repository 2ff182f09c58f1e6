//! gRPC probes for real: the agent's prober calls `grpc.health.v1.Health/Check` on the pod
//! IP, answered by a real tonic gRPC server the test runs in the pod's network namespace
//! (the busybox image has no gRPC server, and the prober only needs one listening on the
//! pod IP). Readiness follows SERVING, a named service is asked for by name, and a
//! liveness probe nothing answers restarts its container.

use std::collections::HashMap;
use std::os::fd::AsFd as _;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use integration::pod_cluster::{IMAGE, PodCluster, phase};
use serde_json::Value;
use skiff_agent::pods::grpc_probe::{
    CHECK_PATH, HealthCheckRequest, HealthCheckResponse, ServingStatus,
};
use tonic::codegen::{BoxFuture, Service, http};

/// What the health server answers per service name; a service it does not know gets
/// NotFound, as grpc-go's health server answers.
type Statuses = Arc<Mutex<HashMap<String, ServingStatus>>>;

#[derive(Clone)]
struct Health {
    statuses: Statuses,
}

struct Check {
    statuses: Statuses,
}

impl tonic::server::UnaryService<HealthCheckRequest> for Check {
    type Response = HealthCheckResponse;
    type Future = BoxFuture<tonic::Response<HealthCheckResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<HealthCheckRequest>) -> Self::Future {
        let service = request.into_inner().service;
        let status = self.statuses.lock().unwrap().get(&service).copied();
        Box::pin(async move {
            match status {
                Some(status) => Ok(tonic::Response::new(HealthCheckResponse {
                    status: status as i32,
                })),
                None => Err(tonic::Status::not_found("unknown service")),
            }
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for Health {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let statuses = self.statuses.clone();
        Box::pin(async move {
            if request.uri().path() != CHECK_PATH {
                return Ok(tonic::Status::unimplemented("").into_http());
            }
            let codec =
                tonic_prost::ProstCodec::<HealthCheckResponse, HealthCheckRequest>::default();
            Ok(tonic::server::Grpc::new(codec)
                .unary(Check { statuses }, request)
                .await)
        })
    }
}

impl tonic::server::NamedService for Health {
    const NAME: &'static str = "grpc.health.v1.Health";
}

/// A listening socket of the network namespace at `netns`: opened on a thread that joins
/// the namespace and ends, so the test's own threads never change namespace.
fn listen_in(netns: &std::path::Path, port: u16) -> std::net::TcpListener {
    let netns = std::fs::File::open(netns).expect("open the pod's network namespace");
    std::thread::spawn(move || {
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("join the pod's network namespace");
        let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("listen");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        listener
    })
    .join()
    .expect("listener thread")
}

/// The events of the pod whose message contains `text`, waited for up to 30 s.
fn wait_for_event(cluster: &PodCluster, pod: &str, text: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events: Value = serde_json::from_str(&cluster.plane.kubectl(&[
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={pod}"),
            "-o",
            "json",
        ]))
        .expect("events JSON");
        let items = events["items"].as_array().cloned().unwrap_or_default();
        if let Some(event) = items
            .iter()
            .find(|e| e["message"].as_str().is_some_and(|m| m.contains(text)))
        {
            return event.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no event with {text:?} within 30 s; events:\n{}\nagent log:\n{}",
            items
                .iter()
                .map(|e| format!(
                    "{} {} {}",
                    e["reason"], e["involvedObject"]["fieldPath"], e["message"]
                ))
                .collect::<Vec<_>>()
                .join("\n"),
            cluster.node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or(&Value::Null)
}

#[test]
fn grpc_probes_follow_the_health_service_and_restart_unhealthy_containers() {
    let cluster = PodCluster::start(&[]);
    let probe = |kind: &str, port: u16, service: &str| {
        format!(
            "    {kind}:\n      grpc: {{port: {port}{service}}}\n      periodSeconds: 1\n      \
             failureThreshold: 2\n      timeoutSeconds: 1\n"
        )
    };
    let app = |name: &str, probes: String| {
        format!(
            "  - name: {name}\n    image: {IMAGE}\n    command: [\"sh\", \"-c\", \"sleep 1000\"]\n{probes}"
        )
    };
    let containers = [
        app("plain", probe("readinessProbe", 9000, "")),
        app("named", probe("readinessProbe", 9000, ", service: backend")),
        app("ghost", probe("readinessProbe", 9000, ", service: ghost")),
        app("doomed", probe("livenessProbe", 9001, "")),
    ];
    cluster.apply_pod(
        "grpc",
        &format!(
            "  terminationGracePeriodSeconds: 1\n  containers:\n{}",
            containers.concat()
        ),
    );
    let pod = cluster.wait_for_pod("grpc", "Running", |pod| {
        phase(pod) == "Running" && pod["status"]["podIP"].is_string()
    });
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    let pod_ip = pod["status"]["podIP"].as_str().unwrap().to_string();

    // The health server, in the pod's network namespace, on the pod IP's port 9000.
    let sandbox = skiff_agent::sandbox::open(&cluster.node.run_dir, uid)
        .expect("open the pod's sandbox")
        .expect("the pod has a sandbox");
    let listener = listen_in(&sandbox.netns_path(), 9000);
    let statuses: Statuses = Arc::new(Mutex::new(HashMap::from([
        (String::new(), ServingStatus::Serving),
        ("backend".to_string(), ServingStatus::Serving),
    ])));
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let server = {
        let health = Health {
            statuses: statuses.clone(),
        };
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
        })
    };

    // SERVING: ready, both for the server as a whole and for the named service.
    cluster.wait_for_pod("grpc", "plain and named ready", |pod| {
        container(pod, "plain")["ready"] == true && container(pod, "named")["ready"] == true
    });
    // A service the server does not know is never ready, with grpc's NotFound.
    assert_eq!(container(&cluster.pod("grpc"), "ghost")["ready"], false);
    wait_for_event(
        &cluster,
        "grpc",
        "Readiness probe failed: error: health rpc probe failed: rpc error: code = NotFound \
         desc = unknown service",
    );

    // NOT_SERVING for the named service: that container only becomes unready.
    statuses
        .lock()
        .unwrap()
        .insert("backend".to_string(), ServingStatus::NotServing);
    let pod = cluster.wait_for_pod("grpc", "named unready", |pod| {
        container(pod, "named")["ready"] == false
    });
    assert_eq!(
        container(&pod, "plain")["ready"],
        true,
        "{:#}",
        pod["status"]
    );
    let event = wait_for_event(
        &cluster,
        "grpc",
        "Readiness probe failed: service unhealthy (responded with \"NOT_SERVING\")",
    );
    assert_eq!(event["reason"], "Unhealthy");
    assert_eq!(event["type"], "Warning");
    assert_eq!(
        event["involvedObject"]["fieldPath"],
        "spec.containers{named}"
    );

    // Nothing answers on port 9001: the liveness probe times out and restarts the
    // container.
    cluster.wait_for_pod("grpc", "doomed restarted", |pod| {
        container(pod, "doomed")["restartCount"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    wait_for_event(
        &cluster,
        "grpc",
        &format!(
            "Liveness probe failed: timeout: failed to connect service \"{pod_ip}:9001\" within \
             1s: context deadline exceeded"
        ),
    );

    // SERVING again: ready again.
    statuses
        .lock()
        .unwrap()
        .insert("backend".to_string(), ServingStatus::Serving);
    cluster.wait_for_pod("grpc", "named ready again", |pod| {
        container(pod, "named")["ready"] == true
    });
    server.abort();
}
