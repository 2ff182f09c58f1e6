//! The workload controllers against a real `skiff-control serve`, driven by the real
//! kubectl. There is no kubelet here: the tests play its part by writing pod status
//! (Running, Ready, an IP) through the API, as a node agent would.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use integration::ControlPlane;
use serde_json::{Value, json};

/// Polls `check` every 200 ms until it returns Some, or panics after `timeout`.
async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get_json(plane: &ControlPlane, path: &str) -> Value {
    let response = plane
        .http()
        .get(format!("{}{path}", plane.url))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    response.json().await.expect("JSON body")
}

async fn send_json(plane: &ControlPlane, method: reqwest::Method, path: &str, content_type: &str, body: &Value) -> (u16, Value) {
    let response = plane
        .http()
        .request(method.clone(), format!("{}{path}", plane.url))
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let code = response.status().as_u16();
    (code, response.json().await.unwrap_or(Value::Null))
}

async fn items(plane: &ControlPlane, path: &str) -> Vec<Value> {
    get_json(plane, path).await["items"].as_array().cloned().unwrap_or_default()
}

fn apply(plane: &ControlPlane, manifest: &str) {
    let output = plane.kubectl_stdin(&["apply", "-f", "-"], manifest);
    assert!(
        output.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn now_rfc3339() -> String {
    // Seconds since the epoch, formatted by hand to keep the tests free of a time crate.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes the status a kubelet would for a running pod, Ready or not.
async fn set_pod_status(plane: &ControlPlane, namespace: &str, name: &str, ip: &str, ready: bool) {
    let status = if ready { "True" } else { "False" };
    let patch = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "Ready", "status": status, "lastTransitionTime": now_rfc3339()},
            {"type": "ContainersReady", "status": status, "lastTransitionTime": now_rfc3339()},
        ],
    }});
    let (code, body) = send_json(
        plane,
        reqwest::Method::PATCH,
        &format!("/api/v1/namespaces/{namespace}/pods/{name}/status"),
        "application/merge-patch+json",
        &patch,
    )
    .await;
    assert!(code == 200 || code == 404, "patch pod status {name}: {code} {body}");
}

/// A stand-in for kubelets: every 300 ms, pods of `namespace` that are not Ready yet and
/// not being deleted become Running and Ready with a fresh IP. Stops when dropped.
struct FakeKubelet {
    stop: Arc<AtomicBool>,
}

impl FakeKubelet {
    fn start(plane: &ControlPlane, namespace: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let plane = PlaneHandle::of(plane);
        let namespace = namespace.to_string();
        let next_ip = Arc::new(AtomicU32::new(1));
        tokio::spawn(async move {
            while !flag.load(Ordering::SeqCst) {
                let pods = plane.items(&format!("/api/v1/namespaces/{namespace}/pods")).await;
                for pod in pods {
                    if is_ready(&pod) || pod["metadata"]["deletionTimestamp"].is_string() {
                        continue;
                    }
                    let n = next_ip.fetch_add(1, Ordering::SeqCst);
                    let ip = format!("10.244.{}.{}", n / 250, n % 250 + 1);
                    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
                    plane.set_pod_status(&namespace, name, &ip).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Self { stop }
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What a background task needs to reach the server (ControlPlane itself is not Clone).
#[derive(Clone)]
struct PlaneHandle {
    url: String,
    client: reqwest::Client,
}

impl PlaneHandle {
    fn of(plane: &ControlPlane) -> Self {
        Self {
            url: plane.url.clone(),
            client: plane.http(),
        }
    }

    async fn items(&self, path: &str) -> Vec<Value> {
        let Ok(response) = self.client.get(format!("{}{path}", self.url)).send().await else {
            return Vec::new();
        };
        let body: Value = response.json().await.unwrap_or(Value::Null);
        body["items"].as_array().cloned().unwrap_or_default()
    }

    async fn set_pod_status(&self, namespace: &str, name: &str, ip: &str) {
        let patch = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now_rfc3339()},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now_rfc3339()},
            ],
        }});
        let _ = self
            .client
            .patch(format!("{}/api/v1/namespaces/{namespace}/pods/{name}/status", self.url))
            .header("content-type", "application/merge-patch+json")
            .body(patch.to_string())
            .send()
            .await;
    }
}

/// Follows pod events in `namespace` from `resource_version` and records, after every
/// event, how many pods are Ready and not being deleted; returns the smallest count seen
/// and the number of events when `stop` is set.
fn watch_availability(
    plane: &ControlPlane,
    namespace: &str,
    resource_version: &str,
    initial: BTreeMap<String, bool>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize)> {
    let handle = PlaneHandle::of(plane);
    let url = format!(
        "{}/api/v1/namespaces/{namespace}/pods?watch=true&resourceVersion={resource_version}",
        handle.url
    );
    tokio::spawn(async move {
        let response = handle.client.get(url).send().await.expect("watch pods");
        assert_eq!(response.status(), 200, "watch pods");
        let mut stream = response.bytes_stream();
        let mut pods = initial;
        let mut minimum = pods.values().filter(|ready| **ready).count();
        let mut events = 0;
        let mut buffer = Vec::new();
        loop {
            let chunk = tokio::select! {
                chunk = stream.next() => chunk,
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if stop.load(Ordering::SeqCst) { break; }
                    continue;
                }
            };
            let Some(Ok(chunk)) = chunk else { break };
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let object = &event["object"];
                let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
                match event["type"].as_str() {
                    Some("ADDED" | "MODIFIED") => {
                        let available = is_ready(object) && !object["metadata"]["deletionTimestamp"].is_string();
                        pods.insert(name, available);
                    }
                    Some("DELETED") => {
                        pods.remove(&name);
                    }
                    _ => continue,
                }
                events += 1;
                minimum = minimum.min(pods.values().filter(|ready| **ready).count());
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
        }
        (minimum, events)
    })
}

fn rollout_status(plane: &ControlPlane, namespace: &str, deployment: &str) {
    plane.kubectl(&[
        "-n",
        namespace,
        "rollout",
        "status",
        &format!("deployment/{deployment}"),
        "--timeout=90s",
    ]);
}

async fn pods_of(plane: &ControlPlane, namespace: &str, selector: &str) -> Vec<Value> {
    items(plane, &format!("/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")).await
}

fn deployment_manifest(namespace: &str, replicas: u32, image: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {namespace}}}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: {namespace}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  strategy:
    type: RollingUpdate
    rollingUpdate: {{maxSurge: 2, maxUnavailable: 1}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: web
        image: {image}
        ports: [{{containerPort: 80, name: http}}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deployment_scales_rolls_within_max_unavailable_and_undoes() {
    let plane = ControlPlane::start();
    let ns = "roll";
    apply(&plane, &deployment_manifest(ns, 10, "nginx:1.25"));
    let kubelet = FakeKubelet::start(&plane, ns);

    // 10 replicas → 10 pods, all owned by one ReplicaSet named after the template hash.
    rollout_status(&plane, ns, "web");
    let pods = pods_of(&plane, ns, "app=web").await;
    assert_eq!(pods.len(), 10);
    let replicasets = items(&plane, &format!("/apis/apps/v1/namespaces/{ns}/replicasets")).await;
    assert_eq!(replicasets.len(), 1);
    let rs = &replicasets[0];
    let hash = rs["metadata"]["labels"]["pod-template-hash"].as_str().expect("hash label");
    assert_eq!(rs["metadata"]["name"], format!("web-{hash}"));
    assert_eq!(rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "1");
    for pod in &pods {
        let owner = &pod["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "ReplicaSet");
        assert_eq!(owner["controller"], true);
        assert_eq!(owner["uid"], rs["metadata"]["uid"]);
        assert!(pod["metadata"]["name"].as_str().unwrap().starts_with(&format!("web-{hash}-")));
    }
    let deployment = get_json(&plane, &format!("/apis/apps/v1/namespaces/{ns}/deployments/web")).await;
    assert_eq!(deployment["status"]["availableReplicas"], 10);
    assert_eq!(deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "1");
    let conditions = deployment["status"]["conditions"].as_array().expect("conditions");
    assert!(conditions.iter().any(|c| c["type"] == "Available" && c["status"] == "True"));
    assert!(conditions
        .iter()
        .any(|c| c["type"] == "Progressing" && c["reason"] == "NewReplicaSetAvailable"));

    // Scale to 3 and back.
    plane.kubectl(&["-n", ns, "scale", "deployment/web", "--replicas=3"]);
    wait_for("3 pods", Duration::from_secs(30), async || {
        (pods_of(&plane, ns, "app=web").await.len() == 3).then_some(())
    })
    .await;
    rollout_status(&plane, ns, "web");
    plane.kubectl(&["-n", ns, "scale", "deployment/web", "--replicas=10"]);
    rollout_status(&plane, ns, "web");
    assert_eq!(pods_of(&plane, ns, "app=web").await.len(), 10);

    // Rolling update: watch availability from the stream while the fake kubelet marks the
    // new pods ready.
    let list = get_json(&plane, &format!("/api/v1/namespaces/{ns}/pods")).await;
    let resource_version = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let initial: BTreeMap<String, bool> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["metadata"]["name"].as_str().unwrap().to_string(), is_ready(p)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_availability(&plane, ns, &resource_version, initial, stop.clone());
    plane.kubectl(&["-n", ns, "set", "image", "deployment/web", "web=nginx:1.26"]);
    rollout_status(&plane, ns, "web");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let (minimum, events) = watcher.await.expect("watcher");
    assert!(events >= 20, "the watch saw the rollout ({events} events)");
    assert!(minimum >= 9, "availability fell to {minimum} (< replicas - maxUnavailable = 9)");
    let pods = pods_of(&plane, ns, "app=web").await;
    assert_eq!(pods.len(), 10);
    assert!(pods.iter().all(|p| p["spec"]["containers"][0]["image"] == "nginx:1.26"));

    // History and undo (kubectl patches the template back from the old ReplicaSet).
    let history = plane.kubectl(&["-n", ns, "rollout", "history", "deployment/web"]);
    assert!(history.contains('1') && history.contains('2'), "history: {history}");
    plane.kubectl(&["-n", ns, "rollout", "undo", "deployment/web"]);
    rollout_status(&plane, ns, "web");
    let deployment = get_json(&plane, &format!("/apis/apps/v1/namespaces/{ns}/deployments/web")).await;
    assert_eq!(deployment["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1.25");
    assert_eq!(deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "3");
    let pods = pods_of(&plane, ns, "app=web").await;
    assert_eq!(pods.len(), 10);
    assert!(pods.iter().all(|p| p["spec"]["containers"][0]["image"] == "nginx:1.25"));
    // The undone revision reuses the first ReplicaSet: still two ReplicaSets.
    let replicasets = items(&plane, &format!("/apis/apps/v1/namespaces/{ns}/replicasets")).await;
    assert_eq!(replicasets.len(), 2);

    // Restart: a new template annotation, so a new ReplicaSet and fresh pods.
    let before: Vec<String> = pods.iter().map(|p| p["metadata"]["name"].as_str().unwrap().to_string()).collect();
    plane.kubectl(&["-n", ns, "rollout", "restart", "deployment/web"]);
    rollout_status(&plane, ns, "web");
    let after = pods_of(&plane, ns, "app=web").await;
    assert_eq!(after.len(), 10);
    assert!(after.iter().all(|p| !before.contains(&p["metadata"]["name"].as_str().unwrap().to_string())));
    drop(kubelet);
}
