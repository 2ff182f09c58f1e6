//! The scheduler inside `skiff-control serve`, seen through the real kubectl, with hollow
//! nodes (`skiff_control::sim`) standing in for nodes: placement, spreading, cordons,
//! selectors, taints, host ports, and the reasons a pod that fits nowhere reports.

use std::time::{Duration, Instant};

use integration::ControlPlane;
use serde_json::Value;
use skiff_control::sim::SimOptions;

/// Hollow nodes run in this test process on their own runtime, stopped on drop.
struct HollowNodes {
    runtime: Option<tokio::runtime::Runtime>,
}

impl HollowNodes {
    /// Registers `count` hollow nodes named `hollow-node-{i}` and waits until kubectl
    /// shows them all Ready.
    fn start(plane: &ControlPlane, count: usize) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("hollow nodes' runtime");
        let kubeconfig = plane.kubeconfig.clone();
        runtime.spawn(async move {
            let file = kube::config::Kubeconfig::read_from(&kubeconfig).expect("read kubeconfig");
            let config = kube::Config::from_custom_kubeconfig(
                file,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .expect("load kubeconfig");
            let client = kube::Client::try_from(config).expect("kube client");
            let options = SimOptions {
                nodes: count,
                concurrency: 8,
                ..SimOptions::default()
            };
            if let Err(error) = skiff_control::sim::run(client, options).await {
                eprintln!("hollow nodes stopped: {error:#}");
            }
        });
        wait_for(plane, "all hollow nodes Ready", || {
            let nodes = get_json(plane, &["get", "nodes", "-o", "json"]);
            let ready = nodes["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| {
                    n["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .count();
            ready == count
        });
        Self {
            runtime: Some(runtime),
        }
    }
}

impl Drop for HollowNodes {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn get_json(plane: &ControlPlane, args: &[&str]) -> Value {
    serde_json::from_str(&plane.kubectl(args)).expect("kubectl prints JSON")
}

/// Polls `done` until it holds, failing the test after 30 s.
fn wait_for(plane: &ControlPlane, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        if Instant::now() > deadline {
            let pods = plane.kubectl(&["get", "pods", "-A", "-o", "wide"]);
            panic!("timed out waiting for {what}; pods:\n{pods}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn apply(plane: &ControlPlane, manifest: &str) {
    let output = plane.kubectl_stdin(&["apply", "-f", "-"], manifest);
    assert!(
        output.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A pod manifest named `name` asking for `cpu` and `memory`, with `extra` spec lines
/// (indented four spaces) added.
fn pod(name: &str, cpu: &str, memory: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: sched-test}}
spec:
{extra}
  containers:
  - name: app
    image: registry.k8s.io/pause:3.10
    resources:
      requests: {{cpu: "{cpu}", memory: "{memory}"}}
"#
    )
}

/// The node each of `names` is bound to, once all are bound.
fn wait_bound(plane: &ControlPlane, names: &[String]) -> Vec<String> {
    let mut nodes = Vec::new();
    wait_for(plane, "pods bound", || {
        nodes = names
            .iter()
            .map(|name| {
                plane
                    .kubectl(&["get", "pod", name, "-o", "jsonpath={.spec.nodeName}"])
                    .trim()
                    .to_string()
            })
            .collect();
        nodes.iter().all(|n| !n.is_empty())
    });
    nodes
}

fn pod_scheduled_condition(plane: &ControlPlane, name: &str) -> Value {
    let pod = get_json(plane, &["get", "pod", name, "-o", "json"]);
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "PodScheduled")
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until pod `name` reports PodScheduled=False with exactly `message`.
fn wait_unschedulable(plane: &ControlPlane, name: &str, message: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = pod_scheduled_condition(plane, name);
        if last["status"] == "False"
            && last["reason"] == "Unschedulable"
            && last["message"] == message
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pod {name}: want PodScheduled=False with {message:?}, got {last}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn failed_scheduling_messages(plane: &ControlPlane, name: &str) -> Vec<String> {
    let selector = format!("involvedObject.name={name},reason=FailedScheduling");
    let events = get_json(
        plane,
        &["get", "events", "--field-selector", &selector, "-o", "json"],
    );
    events["items"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|e| {
            assert_eq!(e["type"], "Warning");
            assert_eq!(e["source"]["component"], "default-scheduler");
            assert_eq!(e["involvedObject"]["kind"], "Pod");
        })
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn pods_spread_over_nodes_and_hollow_nodes_run_them() {
    let plane = ControlPlane::start();
    let _nodes = HollowNodes::start(&plane, 3);
    let names: Vec<String> = (0..9).map(|i| format!("web-{i}")).collect();
    for name in &names {
        apply(&plane, &pod(name, "500m", "64Mi", ""));
    }
    let mut nodes = wait_bound(&plane, &names);
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "pods landed on {nodes:?}");
    for node in &nodes {
        let on_node = plane.kubectl(&[
            "get",
            "pods",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "name",
        ]);
        assert_eq!(on_node.lines().count(), 3, "pods on {node}: {on_node}");
    }
    // The hollow nodes report the pods Running with an address from their range.
    wait_for(&plane, "pods Running", || {
        let pods = get_json(&plane, &["get", "pods", "-o", "json"]);
        pods["items"].as_array().unwrap().iter().all(|p| {
            p["status"]["phase"] == "Running"
                && p["status"]["podIP"]
                    .as_str()
                    .is_some_and(|ip| ip.starts_with("10."))
        })
    });
    let condition = pod_scheduled_condition(&plane, "web-0");
    assert_eq!(condition["status"], "True");
    // Deleting a pod completes: the hollow node finishes the graceful deletion.
    plane.kubectl(&["delete", "pod", "web-0", "--timeout=30s"]);
}

#[test]
fn a_pod_that_fits_nowhere_reports_why_and_is_retried() {
    let plane = ControlPlane::start();
    let _nodes = HollowNodes::start(&plane, 3);
    plane.kubectl(&["taint", "nodes", "hollow-node-2", "dedicated=db:NoSchedule"]);
    apply(&plane, &pod("huge", "100m", "64Gi", ""));
    let why = "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: db}, \
               2 Insufficient memory. preemption: 0/3 nodes are available: \
               3 Preemption is not helpful for scheduling.";
    wait_unschedulable(&plane, "huge", why);
    wait_for(&plane, "a FailedScheduling event", || {
        failed_scheduling_messages(&plane, "huge").contains(&why.to_string())
    });
    let described = plane.kubectl(&["describe", "pod", "huge"]);
    assert!(described.contains("FailedScheduling"), "{described}");

    // A node change makes the scheduler look again: without the taint, the reason changes.
    plane.kubectl(&[
        "taint",
        "nodes",
        "hollow-node-2",
        "dedicated=db:NoSchedule-",
    ]);
    let why = "0/3 nodes are available: 3 Insufficient memory. preemption: 0/3 nodes are \
               available: 3 Preemption is not helpful for scheduling.";
    wait_unschedulable(&plane, "huge", why);
    assert_eq!(
        plane
            .kubectl(&["get", "pod", "huge", "-o", "jsonpath={.spec.nodeName}"])
            .trim(),
        ""
    );
}

#[test]
fn a_cordoned_node_gets_nothing() {
    let plane = ControlPlane::start();
    let _nodes = HollowNodes::start(&plane, 3);
    plane.kubectl(&["cordon", "hollow-node-1"]);
    let names: Vec<String> = (0..8).map(|i| format!("app-{i}")).collect();
    for name in &names {
        apply(&plane, &pod(name, "100m", "64Mi", ""));
    }
    let placed = wait_bound(&plane, &names);
    assert!(
        placed.iter().all(|n| n != "hollow-node-1"),
        "a pod landed on the cordoned node: {placed:?}"
    );
    // With every node cordoned, a pod says so.
    plane.kubectl(&["cordon", "hollow-node-0"]);
    plane.kubectl(&["cordon", "hollow-node-2"]);
    apply(&plane, &pod("late", "100m", "64Mi", ""));
    wait_unschedulable(
        &plane,
        "late",
        "0/3 nodes are available: 3 node(s) were unschedulable. preemption: 0/3 nodes are \
         available: 3 Preemption is not helpful for scheduling.",
    );
    // Uncordoning is a node change: the waiting pod is placed.
    plane.kubectl(&["uncordon", "hollow-node-2"]);
    assert_eq!(wait_bound(&plane, &["late".to_string()]), ["hollow-node-2"]);
}

#[test]
fn node_selectors_affinity_and_taints_are_honored() {
    let plane = ControlPlane::start();
    let _nodes = HollowNodes::start(&plane, 3);
    plane.kubectl(&["label", "nodes", "hollow-node-1", "disk=ssd"]);
    plane.kubectl(&["taint", "nodes", "hollow-node-0", "dedicated=db:NoSchedule"]);

    apply(
        &plane,
        &pod("wants-ssd", "100m", "64Mi", "  nodeSelector: {disk: ssd}"),
    );
    apply(
        &plane,
        &pod(
            "wants-not-1",
            "100m",
            "64Mi",
            r#"  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
        - matchExpressions:
          - {key: disk, operator: DoesNotExist}
          - {key: kubernetes.io/hostname, operator: NotIn, values: [hollow-node-0]}"#,
        ),
    );
    apply(
        &plane,
        &pod(
            "tolerates-db",
            "100m",
            "64Mi",
            r#"  nodeSelector: {kubernetes.io/hostname: hollow-node-0}
  tolerations:
  - {key: dedicated, operator: Equal, value: db, effect: NoSchedule}"#,
        ),
    );
    let plain: Vec<String> = (0..6).map(|i| format!("plain-{i}")).collect();
    for name in &plain {
        apply(&plane, &pod(name, "100m", "64Mi", ""));
    }
    let placed = wait_bound(
        &plane,
        &[
            "wants-ssd".to_string(),
            "wants-not-1".to_string(),
            "tolerates-db".to_string(),
        ],
    );
    assert_eq!(placed, ["hollow-node-1", "hollow-node-2", "hollow-node-0"]);
    let placed = wait_bound(&plane, &plain);
    assert!(
        placed.iter().all(|n| n != "hollow-node-0"),
        "a pod without the toleration landed on the tainted node: {placed:?}"
    );

    apply(
        &plane,
        &pod("wants-gpu", "100m", "64Mi", "  nodeSelector: {gpu: a100}"),
    );
    wait_unschedulable(
        &plane,
        "wants-gpu",
        "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: db}, \
         2 node(s) didn't match Pod's node affinity/selector. preemption: 0/3 nodes are \
         available: 3 Preemption is not helpful for scheduling.",
    );
}

#[test]
fn host_ports_conflict() {
    let plane = ControlPlane::start();
    let _nodes = HollowNodes::start(&plane, 2);
    let with_port = |name: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  containers:
  - name: app
    image: registry.k8s.io/pause:3.10
    ports:
    - {{containerPort: 80, hostPort: 8080}}
"#
        )
    };
    apply(&plane, &with_port("port-a"));
    apply(&plane, &with_port("port-b"));
    let mut placed = wait_bound(&plane, &["port-a".to_string(), "port-b".to_string()]);
    placed.sort();
    assert_eq!(placed, ["hollow-node-0", "hollow-node-1"]);

    apply(&plane, &with_port("port-c"));
    let why = "0/2 nodes are available: 2 node(s) didn't have free ports for the requested \
               pod ports. preemption: 0/2 nodes are available: 2 Preemption is not helpful \
               for scheduling.";
    wait_unschedulable(&plane, "port-c", why);
    wait_for(&plane, "a FailedScheduling event", || {
        failed_scheduling_messages(&plane, "port-c").contains(&why.to_string())
    });

    // Freeing the port (the hollow node completes the deletion) lets the waiting pod in.
    let freed_node = plane
        .kubectl(&["get", "pod", "port-a", "-o", "jsonpath={.spec.nodeName}"])
        .trim()
        .to_string();
    plane.kubectl(&["delete", "pod", "port-a", "--timeout=30s"]);
    assert_eq!(wait_bound(&plane, &["port-c".to_string()]), [freed_node]);
}
