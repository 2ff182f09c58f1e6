//! Sidecar containers (init containers with `restartPolicy: Always`) end to end: the control
//! plane, a private containerd with runc and a real `skiff-agent`. A sidecar starts before
//! the app containers (after its startup probe passes, if it has one), shares the pod's
//! volumes with them, restarts whatever the pod's restartPolicy, does not keep a finished
//! pod from completing, and is stopped after the app containers when the pod is deleted.

use std::time::Duration;

use integration::pod_cluster::{IMAGE, PodCluster, condition, phase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value;

#[test]
fn a_sidecar_starts_first_feeds_the_app_through_an_empty_dir_and_stops_last() {
    let mut cluster = PodCluster::start(&[]);
    let host_dir = tempfile::tempdir().expect("temp dir");
    // The sidecar writes its message only after a while; its startup probe passes once the
    // message is there, so the app container, which reads it first thing, finds it.
    cluster.apply_pod(
        "fed",
        &format!(
            r#"  terminationGracePeriodSeconds: 10
  initContainers:
  - name: feeder
    image: {IMAGE}
    restartPolicy: Always
    command: ["sh", "-c", "trap 'echo feeder >> /host/stopped; exit 0' TERM; sleep 2; echo hello from the sidecar > /shared/message; while true; do sleep 0.1; done"]
    startupProbe:
      exec: {{command: ["cat", "/shared/message"]}}
      periodSeconds: 1
      failureThreshold: 30
    readinessProbe:
      exec: {{command: ["cat", "/shared/message"]}}
      periodSeconds: 1
    volumeMounts:
    - {{name: shared, mountPath: /shared}}
    - {{name: host, mountPath: /host}}
  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "cat /shared/message || echo no message; trap 'echo app >> /host/stopped; exit 0' TERM; while true; do sleep 0.1; done"]
    volumeMounts:
    - {{name: shared, mountPath: /shared}}
    - {{name: host, mountPath: /host}}
  volumes:
  - {{name: shared, emptyDir: {{}}}}
  - {{name: host, hostPath: {{path: {host}, type: Directory}}}}
"#,
            host = host_dir.path().display()
        ),
    );
    let pod = cluster.wait_for_pod("fed", "Running and Ready", |pod| {
        phase(pod) == "Running" && condition(pod, "Ready") == "True"
    });
    let lines = cluster.wait_for_output(&pod, "app", 0, "hello from the sidecar", |line| {
        line == "hello from the sidecar"
    });
    assert!(!lines.contains(&"no message".to_string()), "{lines:?}");
    let sidecar = &pod["status"]["initContainerStatuses"][0];
    assert_eq!(sidecar["name"], "feeder");
    assert_eq!(sidecar["started"], true, "{sidecar:#}");
    assert_eq!(sidecar["ready"], true, "{sidecar:#}");
    assert!(sidecar["state"]["running"].is_object(), "{sidecar:#}");
    assert_eq!(sidecar["restartCount"], 0);
    assert_eq!(condition(&pod, "Initialized"), "True");
    // The app container started only once the sidecar's startup probe had passed.
    let started_at = |status: &Value| {
        serde_json::from_value::<Time>(status["state"]["running"]["startedAt"].clone())
            .expect("startedAt")
            .0
    };
    let app = &pod["status"]["containerStatuses"][0];
    assert!(
        started_at(app) >= started_at(sidecar) + Duration::from_secs(2),
        "app {app:#}\nsidecar {sidecar:#}"
    );

    // A restarted agent adopts both containers: nothing restarts, the pod stays ready.
    let ids = |pod: &Value| {
        [
            pod["status"]["initContainerStatuses"][0]["containerID"].clone(),
            pod["status"]["containerStatuses"][0]["containerID"].clone(),
        ]
    };
    let before = ids(&pod);
    cluster.node.kill();
    std::thread::sleep(Duration::from_millis(500));
    let PodCluster { node, plane, .. } = &mut cluster;
    node.restart(plane);
    std::thread::sleep(Duration::from_secs(4));
    let pod = cluster.wait_for_pod("fed", "Ready after the agent restart", |pod| {
        condition(pod, "Ready") == "True"
    });
    assert_eq!(ids(&pod), before, "{:#}", pod["status"]);

    // Deletion stops the app container first, then the sidecar.
    cluster
        .plane
        .kubectl(&["delete", "pod", "fed", "--wait=false"]);
    cluster.wait_gone("fed", Duration::from_secs(40));
    let stopped = std::fs::read_to_string(host_dir.path().join("stopped")).unwrap_or_default();
    assert_eq!(
        stopped,
        "app\nfeeder\n",
        "agent log:\n{}",
        cluster.node.log()
    );
}

#[test]
fn a_never_pod_succeeds_when_its_app_exits_while_its_restarted_sidecar_runs() {
    let cluster = PodCluster::start(&[]);
    // Only `Always` makes an init container a sidecar; the API server refuses the rest.
    let refused = cluster.plane.kubectl_stdin(
        &["apply", "-f", "-"],
        &cluster.pod_manifest(
            "refused",
            &format!(
                "  initContainers:\n  - name: setup\n    image: {IMAGE}\n    restartPolicy: OnFailure\n  containers:\n  - name: main\n    image: {IMAGE}\n"
            ),
        ),
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains(
            "spec.initContainers[0].restartPolicy: Unsupported value: \"OnFailure\": supported values: \"Always\""
        ),
        "{stderr}"
    );
    // The sidecar's first run fails; it restarts although the pod's policy is Never. The
    // app container waits for the second run, reads what it wrote, and exits 0 while the
    // sidecar still runs.
    cluster.apply_pod(
        "batch",
        &format!(
            r#"  restartPolicy: Never
  terminationGracePeriodSeconds: 10
  initContainers:
  - name: helper
    image: {IMAGE}
    restartPolicy: Always
    command: ["sh", "-c", "echo run >> /shared/runs; if [ $(wc -l < /shared/runs) -lt 2 ]; then sleep 1; exit 3; fi; echo second run > /shared/message; trap 'exit 0' TERM; while true; do sleep 0.1; done"]
    volumeMounts: [{{name: shared, mountPath: /shared}}]
  containers:
  - name: main
    image: {IMAGE}
    command: ["sh", "-c", "until [ -f /shared/message ]; do sleep 0.1; done; cat /shared/message"]
    volumeMounts: [{{name: shared, mountPath: /shared}}]
  volumes:
  - {{name: shared, emptyDir: {{}}}}
"#
        ),
    );
    let pod = cluster.wait_for_pod("batch", "Succeeded", |pod| phase(pod) == "Succeeded");
    let main = &pod["status"]["containerStatuses"][0];
    assert_eq!(main["state"]["terminated"]["exitCode"], 0, "{main:#}");
    assert_eq!(main["restartCount"], 0);
    let sidecar = &pod["status"]["initContainerStatuses"][0];
    assert_eq!(sidecar["restartCount"], 1, "{sidecar:#}");
    assert!(
        sidecar["state"]["terminated"].is_object(),
        "the sidecar was stopped: {sidecar:#}"
    );
    assert_eq!(sidecar["lastState"]["terminated"]["exitCode"], 3);
    assert_eq!(condition(&pod, "Ready"), "False");
    cluster.wait_for_output(&pod, "main", 0, "second run", |line| line == "second run");
}
