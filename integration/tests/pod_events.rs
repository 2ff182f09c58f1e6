//! The agent's Events end to end: a real `skiff-agent` runs pods through a private
//! containerd against a real control plane, and the real kubectl finds what the node did
//! (`kubectl get events`, `kubectl describe pod`). Each test starts its own control plane,
//! containerd and node and removes them all.

use std::time::{Duration, Instant};

use integration::pod_cluster::{IMAGE, PodCluster};
use serde_json::Value;

integration::pod_cluster_wrapper!(
    /// The shared one-node cluster, with this file's own checks.
    Cluster
);

fn cluster() -> Cluster {
    Cluster(PodCluster::start(&[]))
}

impl Cluster {
    /// `kubectl get events --field-selector SELECTOR -o json`: the events.
    fn events(&self, selector: &str) -> Vec<Value> {
        let text =
            self.plane
                .kubectl(&["get", "events", "--field-selector", selector, "-o", "json"]);
        let list: Value = serde_json::from_str(&text).expect("event list JSON");
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until the events of `selector` include one with each `(reason, message)`
    /// (events are posted in the background); returns them all.
    fn wait_for_events(&self, selector: &str, expected: &[(&str, &str)]) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let events = self.events(selector);
            let missing: Vec<_> = expected
                .iter()
                .filter(|(reason, message)| find(&events, reason, message).is_none())
                .collect();
            if missing.is_empty() {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "no events {missing:?} for {selector} within 30 s\nevents: {}\nagent log:\n{}",
                summary(&events),
                self.node.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn find<'a>(events: &'a [Value], reason: &str, message: &str) -> Option<&'a Value> {
    events
        .iter()
        .find(|event| event["reason"] == reason && event["message"] == message)
}

/// The events one per line (type, reason, object, count, message) for failure messages.
fn summary(events: &[Value]) -> String {
    events
        .iter()
        .map(|event| {
            format!(
                "{} {} {}/{} x{}: {}",
                event["type"].as_str().unwrap_or("-"),
                event["reason"].as_str().unwrap_or("-"),
                event["involvedObject"]["name"].as_str().unwrap_or("-"),
                event["involvedObject"]["fieldPath"].as_str().unwrap_or(""),
                event["count"],
                event["message"].as_str().unwrap_or("-"),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_pod_that_runs_then_is_deleted_shows_its_container_events_and_the_node_its_start() {
    let cluster = cluster();
    let node = cluster.node.name.clone();

    // The node: Starting, and the cgroup controllers it cannot enforce limits with
    // exactly when its Ready condition says some limits are not enforced.
    let node_selector = format!("involvedObject.kind=Node,involvedObject.name={node}");
    let events = cluster.wait_for_events(&node_selector, &[("Starting", "Starting kubelet.")]);
    let starting = find(&events, "Starting", "Starting kubelet.").unwrap();
    assert_eq!(starting["type"], "Normal");
    assert_eq!(starting["metadata"]["namespace"], "default");
    assert_eq!(starting["involvedObject"]["uid"], node.as_str());
    assert_eq!(starting["source"]["component"], "kubelet");
    assert_eq!(starting["source"]["host"], node.as_str());
    let node_object: Value =
        serde_json::from_str(&cluster.plane.kubectl(&["get", "node", &node, "-o", "json"]))
            .expect("node JSON");
    let ready_message = node_object["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_string();
    let unavailable: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "CgroupControllersUnavailable")
        .collect();
    if ready_message.contains("limits not enforced") {
        assert_eq!(unavailable.len(), 1, "{}", summary(&events));
        assert_eq!(unavailable[0]["type"], "Warning");
        let message = unavailable[0]["message"].as_str().unwrap();
        assert!(
            message.starts_with("cgroup controllers not available on this node: "),
            "{message}"
        );
        // Every limit the Ready condition names is named in the event too.
        let limits = ready_message
            .split("limits not enforced on this node: ")
            .nth(1)
            .unwrap();
        for limit in limits.split("; ") {
            let setting = limit.split(':').next().unwrap();
            assert!(message.contains(setting), "{setting} not in {message}");
        }
    } else {
        assert!(unavailable.is_empty(), "{}", summary(&events));
    }

    cluster.apply_pod(
        "web",
        &format!(
            r#"  terminationGracePeriodSeconds: 5
  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"]
"#
        ),
    );
    let pod = cluster.wait_for_pod("web", "Running", |pod| pod["status"]["phase"] == "Running");
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let selector = "involvedObject.name=web";
    let events = cluster.wait_for_events(
        selector,
        &[
            (
                "Pulled",
                &format!("Container image \"{IMAGE}\" already present on machine"),
            ),
            ("Created", "Created container: app"),
            ("Started", "Started container app"),
        ],
    );
    let started = find(&events, "Started", "Started container app").unwrap();
    assert_eq!(
        started["involvedObject"],
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": "default",
            "name": "web",
            "uid": uid,
            "resourceVersion": started["involvedObject"]["resourceVersion"],
            "fieldPath": "spec.containers{app}",
        })
    );
    assert_eq!(started["type"], "Normal");
    assert_eq!(started["count"], 1);
    assert_eq!(started["reportingComponent"], "kubelet");
    assert_eq!(started["reportingInstance"], node.as_str());
    let name = started["metadata"]["name"].as_str().unwrap();
    let suffix = name
        .strip_prefix("web.")
        .expect("event named after the pod");
    assert!(
        suffix.len() == 16 && suffix.chars().all(|c| c.is_ascii_hexdigit()),
        "{name}"
    );
    assert!(started["firstTimestamp"].is_string() && started["lastTimestamp"].is_string());

    // kubectl describe finds them the way it searches (name, namespace, kind and uid).
    let describe = cluster.plane.kubectl(&["describe", "pod", "web"]);
    assert!(
        describe.contains("Started container app") && describe.contains("kubelet"),
        "{describe}"
    );

    let output = cluster
        .plane
        .kubectl_output(&["delete", "pod", "web", "--timeout=60s"]);
    assert!(
        output.status.success(),
        "kubectl delete failed: {}\nagent log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.node.log()
    );
    let events = cluster.wait_for_events(selector, &[("Killing", "Stopping container app")]);
    let killing = find(&events, "Killing", "Stopping container app").unwrap();
    assert_eq!(killing["type"], "Normal");
    assert_eq!(
        killing["involvedObject"]["fieldPath"],
        "spec.containers{app}"
    );
    // Nothing went wrong, so nothing is a warning.
    assert!(
        events.iter().all(|e| e["type"] == "Normal"),
        "{}",
        summary(&events)
    );
}

#[test]
fn a_crash_looping_pod_shows_one_back_off_warning_per_back_off() {
    let cluster = cluster();
    cluster.apply_pod(
        "crash",
        &format!(
            r#"  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "exit 3"]
"#
        ),
    );
    let pod = cluster.wait_for_pod("crash", "CrashLoopBackOff", |pod| {
        pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    });
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    let back_off = format!("Back-off restarting failed container app in pod crash_default({uid})");
    let selector = "involvedObject.name=crash";
    cluster.wait_for_events(
        selector,
        &[("BackOff", &back_off), ("Started", "Started container app")],
    );
    // The worker wakes many times during the 10 s back-off (its own status writes, for
    // one); the back-off is still one event, seen once.
    std::thread::sleep(Duration::from_secs(3));
    let events = cluster.events(selector);
    let back_offs: Vec<&Value> = events.iter().filter(|e| e["reason"] == "BackOff").collect();
    assert_eq!(back_offs.len(), 1, "{}", summary(&events));
    assert_eq!(back_offs[0]["type"], "Warning");
    assert_eq!(back_offs[0]["count"], 1, "{}", summary(&events));
    assert_eq!(
        back_offs[0]["involvedObject"]["fieldPath"],
        "spec.containers{app}"
    );
    // The two starts so far are one event counted twice.
    let started = find(&events, "Started", "Started container app").unwrap();
    assert!(started["count"].as_u64() >= Some(2), "{}", summary(&events));
}

#[test]
fn failed_probes_and_pulls_show_warnings() {
    let cluster = cluster();
    // A liveness probe that always fails: Unhealthy, then the kubelet's Killing message.
    cluster.apply_pod(
        "sick",
        &format!(
            r#"  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "while true; do sleep 0.1; done"]
    livenessProbe:
      exec: {{command: ["cat", "/tmp/alive"]}}
      periodSeconds: 1
      failureThreshold: 1
"#
        ),
    );
    // An image that is not there and may not be pulled, and one whose registry refuses
    // connections.
    cluster.apply_pod(
        "never",
        r#"  containers:
  - name: app
    image: skiff.test/missing:1
    imagePullPolicy: Never
"#,
    );
    cluster.apply_pod(
        "unreachable",
        r#"  containers:
  - name: app
    image: 127.0.0.1:1/missing:1
"#,
    );

    let events = cluster.wait_for_events(
        "involvedObject.name=sick",
        &[
            (
                "Unhealthy",
                "Liveness probe failed: command [\"cat\", \"/tmp/alive\"] exited with code 1",
            ),
            (
                "Killing",
                "Container app failed liveness probe, will be restarted",
            ),
        ],
    );
    let unhealthy = events.iter().find(|e| e["reason"] == "Unhealthy").unwrap();
    assert_eq!(unhealthy["type"], "Warning");
    assert_eq!(
        unhealthy["involvedObject"]["fieldPath"],
        "spec.containers{app}"
    );

    let events = cluster.wait_for_events(
        "involvedObject.name=never",
        &[
            (
                "ErrImageNeverPull",
                "Container image \"skiff.test/missing:1\" is not present with pull policy of Never",
            ),
            ("Failed", "Error: ErrImageNeverPull"),
        ],
    );
    assert!(
        events
            .iter()
            .filter(|e| e["reason"] != "Pulling")
            .all(|e| e["type"] == "Warning" && e["reason"] != "BackOff"),
        "{}",
        summary(&events)
    );

    let events = cluster.wait_for_events(
        "involvedObject.name=unreachable",
        &[
            ("Pulling", "Pulling image \"127.0.0.1:1/missing:1\""),
            ("Failed", "Error: ErrImagePull"),
            (
                "BackOff",
                "Back-off pulling image \"127.0.0.1:1/missing:1\"",
            ),
        ],
    );
    let failed = events
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Failed to pull image \"127.0.0.1:1/missing:1\": "))
        })
        .unwrap_or_else(|| panic!("no pull failure: {}", summary(&events)));
    assert_eq!(failed["reason"], "Failed");
    assert_eq!(failed["type"], "Warning");
    // As the kubelet has it, the pull back-off is Normal: the failures are the warnings.
    let back_off = find(
        &events,
        "BackOff",
        "Back-off pulling image \"127.0.0.1:1/missing:1\"",
    )
    .unwrap();
    assert_eq!(back_off["type"], "Normal");
}
