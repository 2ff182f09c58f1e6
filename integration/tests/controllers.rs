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
async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
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

async fn send_json(
    plane: &ControlPlane,
    method: reqwest::Method,
    path: &str,
    content_type: &str,
    body: &Value,
) -> (u16, Value) {
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
    get_json(plane, path).await["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
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
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
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
    // A merge patch names no resourceVersion, yet the server has been seen answering 409
    // while the scheduler writes the same pod's status: retry as a kubelet would.
    let mut attempt = 0;
    loop {
        let (code, body) = send_json(
            plane,
            reqwest::Method::PATCH,
            &format!("/api/v1/namespaces/{namespace}/pods/{name}/status"),
            "application/merge-patch+json",
            &patch,
        )
        .await;
        attempt += 1;
        if code == 409 && attempt < 5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert!(
            code == 200 || code == 404,
            "patch pod status {name}: {code} {body}"
        );
        return;
    }
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
                let pods = plane
                    .items(&format!("/api/v1/namespaces/{namespace}/pods"))
                    .await;
                for pod in pods {
                    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
                    if pod["metadata"]["deletionTimestamp"].is_string() {
                        // The containers stopped: confirm the deletion, as a kubelet does.
                        plane.finish_deletion(&namespace, name).await;
                        continue;
                    }
                    if is_ready(&pod) {
                        continue;
                    }
                    let n = next_ip.fetch_add(1, Ordering::SeqCst);
                    let ip = format!("10.244.{}.{}", n / 250, n % 250 + 1);
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

    async fn finish_deletion(&self, namespace: &str, name: &str) {
        let _ = self
            .client
            .delete(format!(
                "{}/api/v1/namespaces/{namespace}/pods/{name}?gracePeriodSeconds=0",
                self.url
            ))
            .send()
            .await;
    }

    async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let code = response.status().as_u16();
        (code, response.json().await.unwrap_or(Value::Null))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: &Value,
    ) -> (u16, Value) {
        let response = self
            .client
            .request(method.clone(), format!("{}{path}", self.url))
            .header("content-type", content_type)
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let code = response.status().as_u16();
        (code, response.json().await.unwrap_or(Value::Null))
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
            .patch(format!(
                "{}/api/v1/namespaces/{namespace}/pods/{name}/status",
                self.url
            ))
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
                let name = object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                match event["type"].as_str() {
                    Some("ADDED" | "MODIFIED") => {
                        let available = is_ready(object)
                            && !object["metadata"]["deletionTimestamp"].is_string();
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
    items(
        plane,
        &format!("/api/v1/namespaces/{namespace}/pods?labelSelector={selector}"),
    )
    .await
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
    let replicasets = items(
        &plane,
        &format!("/apis/apps/v1/namespaces/{ns}/replicasets"),
    )
    .await;
    assert_eq!(replicasets.len(), 1);
    let rs = &replicasets[0];
    let hash = rs["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .expect("hash label");
    assert_eq!(rs["metadata"]["name"], format!("web-{hash}"));
    assert_eq!(
        rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );
    for pod in &pods {
        let owner = &pod["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "ReplicaSet");
        assert_eq!(owner["controller"], true);
        assert_eq!(owner["uid"], rs["metadata"]["uid"]);
        assert!(
            pod["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with(&format!("web-{hash}-"))
        );
    }
    let deployment = get_json(
        &plane,
        &format!("/apis/apps/v1/namespaces/{ns}/deployments/web"),
    )
    .await;
    assert_eq!(deployment["status"]["availableReplicas"], 10);
    assert_eq!(
        deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );
    let conditions = deployment["status"]["conditions"]
        .as_array()
        .expect("conditions");
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "Available" && c["status"] == "True")
    );
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "Progressing" && c["reason"] == "NewReplicaSetAvailable")
    );

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
    let resource_version = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let initial: BTreeMap<String, bool> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                is_ready(p),
            )
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_availability(&plane, ns, &resource_version, initial, stop.clone());
    plane.kubectl(&["-n", ns, "set", "image", "deployment/web", "web=nginx:1.26"]);
    rollout_status(&plane, ns, "web");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let (minimum, events) = watcher.await.expect("watcher");
    assert!(events >= 20, "the watch saw the rollout ({events} events)");
    assert!(
        minimum >= 9,
        "availability fell to {minimum} (< replicas - maxUnavailable = 9)"
    );
    let pods = pods_of(&plane, ns, "app=web").await;
    assert_eq!(pods.len(), 10);
    assert!(
        pods.iter()
            .all(|p| p["spec"]["containers"][0]["image"] == "nginx:1.26")
    );

    // History and undo (kubectl patches the template back from the old ReplicaSet).
    let history = plane.kubectl(&["-n", ns, "rollout", "history", "deployment/web"]);
    assert!(
        history.contains('1') && history.contains('2'),
        "history: {history}"
    );
    plane.kubectl(&["-n", ns, "rollout", "undo", "deployment/web"]);
    rollout_status(&plane, ns, "web");
    let deployment = get_json(
        &plane,
        &format!("/apis/apps/v1/namespaces/{ns}/deployments/web"),
    )
    .await;
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.25"
    );
    assert_eq!(
        deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    let pods = pods_of(&plane, ns, "app=web").await;
    assert_eq!(pods.len(), 10);
    assert!(
        pods.iter()
            .all(|p| p["spec"]["containers"][0]["image"] == "nginx:1.25")
    );
    // The undone revision reuses the first ReplicaSet: still two ReplicaSets.
    let replicasets = items(
        &plane,
        &format!("/apis/apps/v1/namespaces/{ns}/replicasets"),
    )
    .await;
    assert_eq!(replicasets.len(), 2);

    // Restart: a new template annotation, so a new ReplicaSet and fresh pods.
    let before: Vec<String> = pods
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    plane.kubectl(&["-n", ns, "rollout", "restart", "deployment/web"]);
    rollout_status(&plane, ns, "web");
    let after = pods_of(&plane, ns, "app=web").await;
    assert_eq!(after.len(), 10);
    assert!(
        after
            .iter()
            .all(|p| !before.contains(&p["metadata"]["name"].as_str().unwrap().to_string()))
    );
    drop(kubelet);
}

/// Binds a pod to a node through pods/binding, as the scheduler does.
async fn bind(plane: &ControlPlane, namespace: &str, pod: &str, node: &str) {
    let body = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": pod, "namespace": namespace},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    let (code, body) = send_json(
        plane,
        reqwest::Method::POST,
        &format!("/api/v1/namespaces/{namespace}/pods/{pod}/binding"),
        "application/json",
        &body,
    )
    .await;
    assert!(code == 201 || code == 200, "bind {pod}: {code} {body}");
}

/// The endpoints of every slice of a Service: (pod name, ip, ready, serving, terminating, port).
async fn slice_endpoints(
    plane: &ControlPlane,
    namespace: &str,
    service: &str,
) -> Vec<(String, String, bool, bool, bool, i64)> {
    let slices = items(
        plane,
        &format!("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?labelSelector=kubernetes.io/service-name={service}"),
    )
    .await;
    let mut found = Vec::new();
    for slice in &slices {
        assert_eq!(
            slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
            "endpointslice-controller.k8s.io"
        );
        assert_eq!(slice["metadata"]["ownerReferences"][0]["kind"], "Service");
        let port = slice["ports"][0]["port"].as_i64().unwrap_or(0);
        for endpoint in slice["endpoints"].as_array().into_iter().flatten() {
            let conditions = &endpoint["conditions"];
            found.push((
                endpoint["targetRef"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                endpoint["addresses"][0]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                conditions["ready"] == true,
                conditions["serving"] == true,
                conditions["terminating"] == true,
                port,
            ));
        }
    }
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpointslices_follow_pod_readiness() {
    let plane = ControlPlane::start();
    let ns = "eps";
    apply(
        &plane,
        &format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {ns}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: web
        image: nginx:1.25
        ports: [{{containerPort: 8080, name: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"#
        ),
    );
    let pods = wait_for("2 pods", Duration::from_secs(30), async || {
        let pods = pods_of(&plane, ns, "app=web").await;
        (pods.len() == 2).then_some(pods)
    })
    .await;
    let names: Vec<String> = pods
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    // No pod has an address yet: one empty slice.
    wait_for("an empty slice", Duration::from_secs(20), async || {
        let slices = items(
            &plane,
            &format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"),
        )
        .await;
        (slices.len() == 1 && slices[0]["endpoints"].as_array().is_none_or(Vec::is_empty))
            .then_some(())
    })
    .await;

    // One pod ready, one running but not ready.
    set_pod_status(&plane, ns, &names[0], "10.1.0.1", true).await;
    set_pod_status(&plane, ns, &names[1], "10.1.0.2", false).await;
    let mut expected = vec![
        (
            names[0].clone(),
            "10.1.0.1".to_string(),
            true,
            true,
            false,
            8080,
        ),
        (
            names[1].clone(),
            "10.1.0.2".to_string(),
            false,
            false,
            false,
            8080,
        ),
    ];
    expected.sort();
    wait_for(
        "ready and not-ready endpoints",
        Duration::from_secs(20),
        async || (slice_endpoints(&plane, ns, "web").await == expected).then_some(()),
    )
    .await;
    let endpoints = get_json(&plane, &format!("/api/v1/namespaces/{ns}/endpoints/web")).await;
    assert_eq!(endpoints["subsets"][0]["addresses"][0]["ip"], "10.1.0.1");
    assert_eq!(
        endpoints["subsets"][0]["notReadyAddresses"][0]["ip"],
        "10.1.0.2"
    );
    assert_eq!(endpoints["subsets"][0]["ports"][0]["port"], 8080);
    let described = plane.kubectl(&["-n", ns, "describe", "service", "web"]);
    assert!(
        described.contains("10.1.0.1:8080"),
        "describe svc shows the endpoint:\n{described}"
    );

    // The second becomes ready.
    set_pod_status(&plane, ns, &names[1], "10.1.0.2", true).await;
    wait_for("both ready", Duration::from_secs(20), async || {
        slice_endpoints(&plane, ns, "web")
            .await
            .iter()
            .all(|e| e.2)
            .then_some(())
    })
    .await;

    // A bound pod being deleted is terminating: serving, not ready, then gone.
    bind(&plane, ns, &names[0], "node-a").await;
    plane.kubectl(&["-n", ns, "delete", "pod", &names[0], "--wait=false"]);
    wait_for(
        "a terminating endpoint",
        Duration::from_secs(20),
        async || {
            slice_endpoints(&plane, ns, "web")
                .await
                .iter()
                .any(|e| e.0 == names[0] && !e.2 && e.3 && e.4)
                .then_some(())
        },
    )
    .await;
    wait_for(
        "terminating pods leave the legacy Endpoints",
        Duration::from_secs(20),
        async || {
            let endpoints =
                get_json(&plane, &format!("/api/v1/namespaces/{ns}/endpoints/web")).await;
            (!endpoints["subsets"].to_string().contains("10.1.0.1")).then_some(())
        },
    )
    .await;
    // Its replacement appears without an address: not in the slices until it has one.
    plane.kubectl(&[
        "-n",
        ns,
        "delete",
        "pod",
        &names[0],
        "--grace-period=0",
        "--force",
    ]);
    wait_for(
        "the deleted pod's endpoint gone",
        Duration::from_secs(20),
        async || {
            (!slice_endpoints(&plane, ns, "web")
                .await
                .iter()
                .any(|e| e.0 == names[0]))
            .then_some(())
        },
    )
    .await;

    // Deleting the Service removes its slices (garbage collector) and Endpoints.
    plane.kubectl(&["-n", ns, "delete", "service", "web"]);
    wait_for(
        "slices and endpoints gone",
        Duration::from_secs(20),
        async || {
            let slices = items(
                &plane,
                &format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"),
            )
            .await;
            let endpoints = items(&plane, &format!("/api/v1/namespaces/{ns}/endpoints")).await;
            (slices.is_empty() && endpoints.is_empty()).then_some(())
        },
    )
    .await;
}

fn small_deployment(namespace: &str, name: &str, replicas: u32) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers: [{{name: main, image: busybox:1.36}}]
"#
    )
}

async fn count_owned(plane: &ControlPlane, namespace: &str, app: &str) -> (usize, usize) {
    let replicasets = items(
        plane,
        &format!("/apis/apps/v1/namespaces/{namespace}/replicasets?labelSelector=app={app}"),
    )
    .await;
    let pods = pods_of(plane, namespace, &format!("app={app}")).await;
    (replicasets.len(), pods.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cascading_delete_removes_dependents_and_orphan_delete_keeps_them() {
    let plane = ControlPlane::start();
    let ns = "gc";
    plane.kubectl(&["create", "namespace", ns]);
    for (name, replicas) in [("background", 3), ("orphan", 2), ("foreground", 2)] {
        apply(&plane, &small_deployment(ns, name, replicas));
    }
    for (name, replicas) in [("background", 3), ("orphan", 2), ("foreground", 2)] {
        wait_for(
            &format!("{name} pods"),
            Duration::from_secs(30),
            async || (count_owned(&plane, ns, name).await == (1, replicas)).then_some(()),
        )
        .await;
    }

    // Background (kubectl's default): the Deployment goes at once, then its ReplicaSet and
    // pods.
    plane.kubectl(&["-n", ns, "delete", "deployment", "background"]);
    wait_for(
        "background dependents gone",
        Duration::from_secs(30),
        async || (count_owned(&plane, ns, "background").await == (0, 0)).then_some(()),
    )
    .await;

    // Orphan: the ReplicaSet and pods stay, and the ReplicaSet loses its ownerReference.
    plane.kubectl(&[
        "-n",
        ns,
        "delete",
        "deployment",
        "orphan",
        "--cascade=orphan",
    ]);
    wait_for(
        "orphan deployment gone",
        Duration::from_secs(30),
        async || {
            let (code, _) = send_json(
                &plane,
                reqwest::Method::GET,
                &format!("/apis/apps/v1/namespaces/{ns}/deployments/orphan"),
                "application/json",
                &Value::Null,
            )
            .await;
            (code == 404).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count_owned(&plane, ns, "orphan").await, (1, 2));
    let replicasets = items(
        &plane,
        &format!("/apis/apps/v1/namespaces/{ns}/replicasets?labelSelector=app=orphan"),
    )
    .await;
    assert!(
        replicasets[0]["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "orphaned replicaset keeps no owner: {}",
        replicasets[0]["metadata"]
    );
    assert!(
        replicasets[0]["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );

    // Foreground: the Deployment is marked and stays until its dependents are gone.
    let (code, body) = send_json(
        &plane,
        reqwest::Method::DELETE,
        &format!("/apis/apps/v1/namespaces/{ns}/deployments/foreground"),
        "application/json",
        &json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body["metadata"]["deletionTimestamp"].is_string());
    assert!(
        body["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "foregroundDeletion")
    );
    wait_for(
        "foreground deployment and dependents gone",
        Duration::from_secs(30),
        async || {
            let (code, _) = send_json(
                &plane,
                reqwest::Method::GET,
                &format!("/apis/apps/v1/namespaces/{ns}/deployments/foreground"),
                "application/json",
                &Value::Null,
            )
            .await;
            (code == 404 && count_owned(&plane, ns, "foreground").await == (0, 0)).then_some(())
        },
    )
    .await;
    // And kubectl's own flag works the same way.
    apply(&plane, &small_deployment(ns, "again", 2));
    wait_for("again pods", Duration::from_secs(30), async || {
        (count_owned(&plane, ns, "again").await == (1, 2)).then_some(())
    })
    .await;
    plane.kubectl(&[
        "-n",
        ns,
        "delete",
        "deployment",
        "again",
        "--cascade=foreground",
        "--timeout=30s",
    ]);
    assert_eq!(count_owned(&plane, ns, "again").await, (0, 0));
}

const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: edge-1, labels: {role: edge}}
---
apiVersion: v1
kind: Node
metadata: {name: edge-tainted, labels: {role: edge}}
spec:
  taints: [{key: dedicated, value: db, effect: NoSchedule}]
---
apiVersion: v1
kind: Node
metadata: {name: core-1, labels: {role: core}}
---
apiVersion: v1
kind: Node
metadata: {name: edge-down, labels: {role: edge}}
"#;

async fn daemon_pods_by_node(
    plane: &ControlPlane,
    namespace: &str,
) -> BTreeMap<String, Vec<Value>> {
    let mut by_node: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for pod in pods_of(plane, namespace, "app=agent").await {
        if pod["metadata"]["deletionTimestamp"].is_string() {
            continue;
        }
        let node = pod["spec"]["nodeName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        by_node.entry(node).or_default().push(pod);
    }
    by_node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daemonset_lands_one_pod_per_eligible_node() {
    let plane = ControlPlane::start();
    let ns = "daemons";
    apply(&plane, NODES);
    // A node that is NotReady and cordoned still runs daemons (upstream's tolerations).
    let (code, body) = send_json(
        &plane,
        reqwest::Method::PATCH,
        "/api/v1/nodes/edge-down/status",
        "application/merge-patch+json",
        &json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady"}]}}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    plane.kubectl(&["cordon", "edge-down"]);
    plane.kubectl(&["create", "namespace", ns]);
    apply(
        &plane,
        &format!(
            r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: agent, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: agent}}}}
  template:
    metadata: {{labels: {{app: agent}}}}
    spec:
      nodeSelector: {{role: edge}}
      containers: [{{name: agent, image: busybox:1.36}}]
"#
        ),
    );
    let kubelet = FakeKubelet::start(&plane, ns);
    let expected = ["edge-1", "edge-down"];
    wait_for(
        "daemon pods on edge-1 and edge-down",
        Duration::from_secs(30),
        async || {
            let by_node = daemon_pods_by_node(&plane, ns).await;
            (by_node.keys().map(String::as_str).collect::<Vec<_>>() == expected
                && by_node.values().all(|p| p.len() == 1))
            .then_some(())
        },
    )
    .await;
    let by_node = daemon_pods_by_node(&plane, ns).await;
    let pod = &by_node["edge-1"][0];
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "DaemonSet");
    assert!(pod["metadata"]["labels"]["controller-revision-hash"].is_string());
    let tolerations = pod["spec"]["tolerations"].to_string();
    assert!(
        tolerations.contains("node.kubernetes.io/unreachable"),
        "{tolerations}"
    );
    wait_for("daemonset status", Duration::from_secs(20), async || {
        let ds = get_json(
            &plane,
            &format!("/apis/apps/v1/namespaces/{ns}/daemonsets/agent"),
        )
        .await;
        let status = &ds["status"];
        (status["desiredNumberScheduled"] == 2
            && status["currentNumberScheduled"] == 2
            && status["numberReady"] == 2
            && status["updatedNumberScheduled"] == 2
            && status["numberMisscheduled"] == 0)
            .then_some(())
    })
    .await;

    // A node that starts to match gets a pod; one that stops matching loses it.
    plane.kubectl(&["label", "node", "core-1", "role=edge", "--overwrite"]);
    plane.kubectl(&["label", "node", "edge-1", "role=retired", "--overwrite"]);
    let expected = ["core-1", "edge-down"];
    wait_for(
        "daemon pods follow labels",
        Duration::from_secs(30),
        async || {
            let by_node = daemon_pods_by_node(&plane, ns).await;
            (by_node.keys().map(String::as_str).collect::<Vec<_>>() == expected).then_some(())
        },
    )
    .await;

    // A toleration opens the tainted node; a new template rolls pods one by one.
    plane.kubectl(&[
        "-n",
        ns,
        "patch",
        "daemonset",
        "agent",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"spec":{"tolerations":[{"key":"dedicated","operator":"Exists","effect":"NoSchedule"}],"containers":[{"name":"agent","image":"busybox:1.37"}]}}}}"#,
    ]);
    let expected = ["core-1", "edge-down", "edge-tainted"];
    wait_for(
        "updated daemon pods on three nodes",
        Duration::from_secs(60),
        async || {
            let by_node = daemon_pods_by_node(&plane, ns).await;
            let nodes: Vec<&str> = by_node.keys().map(String::as_str).collect();
            let updated = by_node.values().all(|pods| {
                pods.len() == 1 && pods[0]["spec"]["containers"][0]["image"] == "busybox:1.37"
            });
            (nodes == expected && updated).then_some(())
        },
    )
    .await;
    plane.kubectl(&[
        "-n",
        ns,
        "rollout",
        "status",
        "daemonset/agent",
        "--timeout=60s",
    ]);
    drop(kubelet);
}

/// A `skiff-control serve` started with extra environment (the controllers' timings), for
/// the tests that cannot wait out production defaults. Killed on drop.
struct EnvPlane {
    child: std::process::Child,
    _temp: tempfile::TempDir,
    handle: PlaneHandle,
    kubeconfig: std::path::PathBuf,
}

impl EnvPlane {
    fn start(env: &[(&str, &str)]) -> Self {
        use std::io::BufRead as _;
        let temp = tempfile::Builder::new()
            .prefix("skiff-control-")
            .tempdir()
            .expect("temp dir");
        let mut command = std::process::Command::new(integration::binary("skiff-control"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(temp.path())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn skiff-control");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(url) = line.strip_prefix("skiff-control serving ") {
                    let _ = sender.send(url.trim().to_string());
                }
            }
        });
        let url = receiver
            .recv_timeout(Duration::from_secs(30))
            .expect("skiff-control reports its address");
        let kubeconfig = temp.path().join("admin.kubeconfig");
        let config = std::fs::read_to_string(&kubeconfig).expect("kubeconfig");
        let field = |name: &str| {
            config
                .lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
                .expect("kubeconfig field")
        };
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD
            .decode(field("certificate-authority-data:"))
            .expect("CA");
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", field("token:"))
                .parse()
                .expect("header"),
        );
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA"))
            .default_headers(headers)
            .build()
            .expect("client");
        Self {
            child,
            _temp: temp,
            handle: PlaneHandle { url, client },
            kubeconfig,
        }
    }

    /// `skiff-control controllers` against this server, with extra environment.
    fn controllers(&self, env: &[(&str, &str)]) -> KilledOnDrop {
        let mut command = std::process::Command::new(integration::binary("skiff-control"));
        command
            .args(["controllers", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        KilledOnDrop(command.spawn().expect("spawn skiff-control controllers"))
    }
}

impl Drop for EnvPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct KilledOnDrop(std::process::Child);

impl KilledOnDrop {
    /// SIGTERM, as systemd stops a unit; waits for the process to exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).expect("a pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("send SIGTERM");
        self.0.wait().expect("wait for skiff-control")
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn poll<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    wait_for(what, timeout, async || check().await).await
}

async fn create(handle: &PlaneHandle, path: &str, body: Value) {
    let (code, answer) = handle
        .send(reqwest::Method::POST, path, "application/json", &body)
        .await;
    assert!(code == 201 || code == 200, "POST {path}: {code} {answer}");
}

async fn renew_lease(handle: &PlaneHandle, node: &str) {
    let patch = json!({"spec": {"renewTime": now_micro()}});
    handle
        .send(
            reqwest::Method::PATCH,
            &format!("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}"),
            "application/merge-patch+json",
            &patch,
        )
        .await;
}

fn now_micro() -> String {
    now_rfc3339().replace('Z', ".000000Z")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_whose_lease_stops_is_tainted_and_its_pods_replaced() {
    let plane = EnvPlane::start(&[
        ("SKIFF_NODE_MONITOR_GRACE_PERIOD", "3"),
        ("SKIFF_NODE_MONITOR_PERIOD", "0.5"),
        ("SKIFF_DEFAULT_TOLERATION_SECONDS", "2"),
    ]);
    let handle = &plane.handle;
    for node in ["alive", "dying"] {
        create(
            handle,
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
        )
        .await;
        let (code, body) = handle
            .send(
                reqwest::Method::PATCH,
                &format!("/api/v1/nodes/{node}/status"),
                "application/merge-patch+json",
                &json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": now_rfc3339()}]}}),
            )
            .await;
        assert_eq!(code, 200, "{body}");
        create(
            handle,
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                   "metadata": {"name": node, "namespace": "kube-node-lease"},
                   "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": now_micro()}}),
        )
        .await;
    }
    // Both nodes renew, until "dying" stops.
    let dying_alive = Arc::new(AtomicBool::new(true));
    let renewer = {
        let handle = handle.clone();
        let dying_alive = dying_alive.clone();
        tokio::spawn(async move {
            loop {
                renew_lease(&handle, "alive").await;
                if dying_alive.load(Ordering::SeqCst) {
                    renew_lease(&handle, "dying").await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    create(
        handle,
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lifecycle"}}),
    )
    .await;
    create(
        handle,
        "/apis/apps/v1/namespaces/lifecycle/deployments",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
               "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [{"name": "web", "image": "nginx:1.25"}],
                                              "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                                                               "effect": "NoExecute", "tolerationSeconds": 2}]}}}}),
    )
    .await;
    let pods = poll("2 pods", Duration::from_secs(30), async || {
        let pods = handle.items("/api/v1/namespaces/lifecycle/pods").await;
        (pods.len() == 2).then_some(pods)
    })
    .await;
    // Play the scheduler, one pod on each node, unless a real scheduler bound them first.
    for (pod, node) in pods.iter().zip(["alive", "dying"]) {
        let name = pod["metadata"]["name"].as_str().unwrap();
        let body = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                          "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
        let (code, answer) = handle
            .send(
                reqwest::Method::POST,
                &format!("/api/v1/namespaces/lifecycle/pods/{name}/binding"),
                "application/json",
                &body,
            )
            .await;
        assert!(
            code == 201 || code == 200 || code == 409,
            "bind {name}: {code} {answer}"
        );
    }
    let on_dying = poll(
        "a pod bound to dying",
        Duration::from_secs(10),
        async || {
            handle
                .items("/api/v1/namespaces/lifecycle/pods")
                .await
                .iter()
                .find(|p| p["spec"]["nodeName"] == "dying")
                .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        },
    )
    .await;
    // Healthy nodes stay untouched for longer than the grace period.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for node in ["alive", "dying"] {
        let (_, node) = handle.get_json(&format!("/api/v1/nodes/{node}")).await;
        assert!(
            node["spec"]["taints"].as_array().is_none_or(Vec::is_empty),
            "{}",
            node["spec"]
        );
    }

    dying_alive.store(false, Ordering::SeqCst);
    poll(
        "dying is Unknown and tainted unreachable",
        Duration::from_secs(20),
        async || {
            let (_, node) = handle.get_json("/api/v1/nodes/dying").await;
            let ready = node["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned())
                .unwrap_or_default();
            let tainted = node["spec"]["taints"].as_array().is_some_and(|t| {
                t.iter().any(|t| {
                    t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute"
                })
            });
            (ready["status"] == "Unknown" && ready["reason"] == "NodeStatusUnknown" && tainted)
                .then_some(())
        },
    )
    .await;
    // After the (default, here 2 s) toleration the pod is deleted and replaced.
    poll(
        "pod on dying evicted and replaced",
        Duration::from_secs(30),
        async || {
            let pods = handle.items("/api/v1/namespaces/lifecycle/pods").await;
            let evicted = pods
                .iter()
                .find(|p| p["metadata"]["name"] == on_dying.as_str())
                .is_none_or(|p| p["metadata"]["deletionTimestamp"].is_string());
            let active = pods
                .iter()
                .filter(|p| !p["metadata"]["deletionTimestamp"].is_string())
                .count();
            (evicted && active == 2).then_some(())
        },
    )
    .await;
    let (_, alive) = handle.get_json("/api/v1/nodes/alive").await;
    assert!(alive["spec"]["taints"].as_array().is_none_or(Vec::is_empty));
    renewer.abort();
}

async fn lease_holder(handle: &PlaneHandle) -> Option<String> {
    let (code, lease) = handle
        .get_json("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/skiff-controllers")
        .await;
    (code == 200).then(|| {
        lease["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_controllers_take_over_when_the_leader_dies() {
    // The server runs no controllers of its own; two controller processes compete.
    let plane = EnvPlane::start(&[("SKIFF_CONTROLLERS", "off")]);
    let handle = &plane.handle;
    let timings = [
        ("SKIFF_LEADER_LEASE_DURATION", "3"),
        ("SKIFF_LEADER_RENEW_DEADLINE", "2"),
        ("SKIFF_LEADER_RETRY_PERIOD", "0.5"),
    ];
    let mut first = plane.controllers(&timings);
    let leader = poll("a leader", Duration::from_secs(20), async || {
        lease_holder(handle).await
    })
    .await;
    let _second = plane.controllers(&timings);
    create(
        handle,
        "/apis/apps/v1/namespaces/default/deployments",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
               "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [{"name": "web", "image": "nginx:1.25"}]}}}}),
    )
    .await;
    poll(
        "3 pods from the leader",
        Duration::from_secs(30),
        async || (handle.items("/api/v1/namespaces/default/pods").await.len() == 3).then_some(()),
    )
    .await;
    // The standby holds still: still exactly 3 pods, the same holder.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        handle.items("/api/v1/namespaces/default/pods").await.len(),
        3
    );
    assert_eq!(lease_holder(handle).await.as_deref(), Some(leader.as_str()));

    first.kill();
    let successor = poll("a new leader", Duration::from_secs(20), async || {
        lease_holder(handle)
            .await
            .filter(|holder| *holder != leader)
    })
    .await;
    assert_ne!(successor, leader);
    let (code, lease) = handle
        .get_json("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/skiff-controllers")
        .await;
    assert_eq!(code, 200);
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    // The new leader does the work: scale up and see the pods.
    let (code, body) = handle
        .send(
            reqwest::Method::PATCH,
            "/apis/apps/v1/namespaces/default/deployments/web/scale",
            "application/merge-patch+json",
            &json!({"spec": {"replicas": 5}}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    poll(
        "5 pods from the new leader",
        Duration::from_secs(30),
        async || (handle.items("/api/v1/namespaces/default/pods").await.len() == 5).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminated_leader_releases_its_lease_and_the_standby_takes_over_at_once() {
    let plane = EnvPlane::start(&[("SKIFF_CONTROLLERS", "off")]);
    let handle = &plane.handle;
    // A Lease that would take 60 s to expire: only a release explains a quick takeover.
    let timings = [
        ("SKIFF_LEADER_LEASE_DURATION", "60"),
        ("SKIFF_LEADER_RENEW_DEADLINE", "40"),
        ("SKIFF_LEADER_RETRY_PERIOD", "0.5"),
    ];
    let mut first = plane.controllers(&timings);
    let leader = poll("a leader", Duration::from_secs(20), async || {
        lease_holder(handle)
            .await
            .filter(|holder| !holder.is_empty())
    })
    .await;
    let _second = plane.controllers(&timings);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopped_at = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || first.terminate())
        .await
        .expect("terminate");
    assert!(
        status.success(),
        "skiff-control controllers exited with {status} on SIGTERM"
    );
    let successor = poll("the standby leading", Duration::from_secs(10), async || {
        lease_holder(handle)
            .await
            .filter(|holder| !holder.is_empty() && *holder != leader)
    })
    .await;
    // Within the poll's 10 s, far below the 60 s Lease: only a release explains it.
    assert_ne!(successor, leader);
    eprintln!("standby leading {:?} after SIGTERM", stopped_at.elapsed());
}
