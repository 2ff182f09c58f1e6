//! `batch/v1` Jobs end to end: the real kubectl against the control plane, whose Job
//! controller and scheduler place the pods on a real `skiff-agent` running busybox in
//! containerd. A Job runs its completions two at a time and completes, a failing one stops at
//! its backoff limit, an Indexed one gives each pod its index, a suspended one waits, one
//! past its deadline fails, a finished one with a TTL goes away, deleting a Job takes its
//! pods with it, and an invalid Job is refused with the field named.

use std::time::{Duration, Instant};

use integration::ControlPlane;
use integration::pod_cluster::{IMAGE, PodCluster};
use serde_json::Value;

/// A Job manifest: `spec` is the YAML under `spec:` (two spaces in), `command` the shell
/// script its one container runs, with restartPolicy Never.
fn job_manifest(name: &str, spec: &str, command: &str) -> String {
    format!(
        "apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
spec:
{spec}
  template:
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: {IMAGE}
        command: [\"sh\", \"-c\", {command:?}]
"
    )
}

fn job(plane: &ControlPlane, name: &str) -> Value {
    serde_json::from_str(&plane.kubectl(&["get", "job", name, "-o", "json"])).expect("job JSON")
}

/// The pods of Job `name`, found by the label the server added to its template.
fn job_pods(plane: &ControlPlane, name: &str) -> Vec<Value> {
    let selector = format!("batch.kubernetes.io/job-name={name}");
    let list: Value =
        serde_json::from_str(&plane.kubectl(&["get", "pods", "-l", &selector, "-o", "json"]))
            .expect("pod list JSON");
    list["items"].as_array().cloned().unwrap_or_default()
}

/// `kubectl wait --for=condition=<condition> job/<name>`, failing with the Job, its pods
/// and the agent's log when it times out.
fn wait_for_condition(cluster: &PodCluster, name: &str, condition: &str, timeout: Duration) {
    let output = cluster.plane.kubectl_output(&[
        "wait",
        &format!("--for=condition={condition}"),
        &format!("--timeout={}s", timeout.as_secs()),
        &format!("job/{name}"),
    ]);
    if !output.status.success() {
        let pods: Vec<String> = job_pods(&cluster.plane, name)
            .iter()
            .map(|pod| format!("{} {}", pod["metadata"]["name"], pod["status"]))
            .collect();
        panic!(
            "kubectl wait --for=condition={condition} job/{name} failed: {}\njob status: {:#}\npods:\n{}\nagent log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            job(&cluster.plane, name)["status"],
            pods.join("\n"),
            cluster.node.log()
        );
    }
}

fn condition<'a>(job: &'a Value, type_: &str) -> Option<&'a Value> {
    job["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn phases(pods: &[Value]) -> Vec<String> {
    let mut phases: Vec<String> = pods
        .iter()
        .map(|pod| pod["status"]["phase"].as_str().unwrap_or("").to_string())
        .collect();
    phases.sort();
    phases
}

#[test]
fn a_job_runs_its_completions_and_its_pods_go_with_it() {
    let cluster = PodCluster::start(&[]);
    let started = Instant::now();
    cluster.apply(&job_manifest(
        "counter",
        "  completions: 3\n  parallelism: 2",
        "echo done",
    ));
    wait_for_condition(&cluster, "counter", "complete", Duration::from_secs(120));
    let elapsed = started.elapsed();

    let job = job(&cluster.plane, "counter");
    let status = &job["status"];
    assert_eq!(status["succeeded"], 3, "{status:#}");
    assert!(status["failed"].is_null(), "{status:#}");
    assert!(status["active"].is_null(), "{status:#}");
    assert!(status["startTime"].is_string() && status["completionTime"].is_string());
    let complete = condition(&job, "Complete").expect("Complete condition");
    assert_eq!(complete["status"], "True");
    assert_eq!(complete["reason"], "CompletionsReached");
    assert_eq!(
        condition(&job, "SuccessCriteriaMet").unwrap()["status"],
        "True"
    );
    // The server generated the selector from the uid and labelled the template with it.
    let uid = job["metadata"]["uid"].as_str().unwrap();
    assert_eq!(
        job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
        uid
    );
    assert_eq!(job["spec"]["backoffLimit"], 6);
    assert_eq!(job["spec"]["completionMode"], "NonIndexed");

    let table = cluster.plane.kubectl(&["get", "jobs"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "STATUS", "COMPLETIONS", "DURATION", "AGE"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..3], ["counter", "Complete", "3/3"], "{table}");

    // Exactly three pods ran, each owned by the Job, and each printed its line.
    let pods = job_pods(&cluster.plane, "counter");
    assert_eq!(phases(&pods), ["Succeeded"; 3], "{pods:#?}");
    for pod in &pods {
        let owner = &pod["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["uid"], &owner["controller"]),
            (&Value::from("Job"), &Value::from(uid), &Value::from(true))
        );
        assert!(
            pod["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("counter-")
        );
        let logs = cluster
            .plane
            .kubectl(&["logs", pod["metadata"]["name"].as_str().unwrap()]);
        assert_eq!(logs.trim(), "done");
    }
    // kubectl finds a pod of the Job through its selector.
    assert_eq!(
        cluster.plane.kubectl(&["logs", "job/counter"]).trim(),
        "done"
    );
    eprintln!("3 completions, 2 at a time, in {elapsed:?}");

    // Deleting the Job deletes its pods (the garbage collector follows ownerReferences).
    cluster.plane.kubectl(&["delete", "job", "counter"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !job_pods(&cluster.plane, "counter").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the Job's pods are still there 60 s after it was deleted: {:#?}",
            job_pods(&cluster.plane, "counter")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_failing_job_stops_at_its_backoff_limit() {
    let cluster = PodCluster::start(&[]);
    cluster.apply(&job_manifest("failing", "  backoffLimit: 1", "exit 3"));
    // One failure is allowed (and replaced after a 10 s back-off); the second fails the Job.
    wait_for_condition(&cluster, "failing", "failed", Duration::from_secs(120));
    let job = job(&cluster.plane, "failing");
    let failed = condition(&job, "Failed").expect("Failed condition");
    assert_eq!(failed["status"], "True");
    assert_eq!(failed["reason"], "BackoffLimitExceeded");
    assert_eq!(
        failed["message"],
        "Job has reached the specified backoff limit"
    );
    assert_eq!(condition(&job, "FailureTarget").unwrap()["status"], "True");
    assert!(condition(&job, "Complete").is_none());
    assert_eq!(job["status"]["failed"], 2, "{:#}", job["status"]);
    assert!(job["status"]["completionTime"].is_null());
    // restartPolicy Never: no container restarted, the controller made a second pod.
    let pods = job_pods(&cluster.plane, "failing");
    assert_eq!(phases(&pods), ["Failed", "Failed"], "{pods:#?}");
    for pod in &pods {
        let terminated = &pod["status"]["containerStatuses"][0]["state"]["terminated"];
        assert_eq!(terminated["exitCode"], 3, "{:#}", pod["status"]);
    }
    let table = cluster.plane.kubectl(&["get", "job", "failing"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..3], ["failing", "Failed", "0/1"], "{table}");
}

#[test]
fn an_indexed_job_gives_each_pod_its_index() {
    let cluster = PodCluster::start(&[]);
    cluster.apply(&job_manifest(
        "indexed",
        "  completions: 3\n  parallelism: 3\n  completionMode: Indexed",
        "echo index=$JOB_COMPLETION_INDEX host=$(hostname)",
    ));
    wait_for_condition(&cluster, "indexed", "complete", Duration::from_secs(120));
    let job = job(&cluster.plane, "indexed");
    assert_eq!(
        job["status"]["completedIndexes"], "0-2",
        "{:#}",
        job["status"]
    );
    assert_eq!(job["status"]["succeeded"], 3);
    let mut lines: Vec<String> = job_pods(&cluster.plane, "indexed")
        .iter()
        .map(|pod| {
            let name = pod["metadata"]["name"].as_str().unwrap();
            let index = &pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"];
            assert!(name.starts_with(&format!("indexed-{}-", index.as_str().unwrap())));
            cluster.plane.kubectl(&["logs", name]).trim().to_string()
        })
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "index=0 host=indexed-0",
            "index=1 host=indexed-1",
            "index=2 host=indexed-2"
        ]
    );
}

/// Waits until `check` holds, failing with `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what} not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn suspend_deadline_and_ttl_after_finished() {
    let cluster = PodCluster::start(&[]);
    let plane = &cluster.plane;

    // A suspended Job makes no pod until it is resumed.
    cluster.apply(&job_manifest(
        "paused",
        "  completions: 1\n  suspend: true",
        "echo resumed",
    ));
    wait_until("the Suspended condition", Duration::from_secs(30), || {
        condition(&job(plane, "paused"), "Suspended").is_some_and(|c| c["status"] == "True")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(job_pods(plane, "paused").is_empty());
    let paused = job(plane, "paused");
    assert!(
        paused["status"]["startTime"].is_null(),
        "{:#}",
        paused["status"]
    );
    let table = plane.kubectl(&["get", "job", "paused"]);
    assert!(
        table.lines().nth(1).unwrap().contains("Suspended"),
        "{table}"
    );
    plane.kubectl(&[
        "patch",
        "job",
        "paused",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ]);
    wait_for_condition(&cluster, "paused", "complete", Duration::from_secs(60));
    let resumed = condition(&job(plane, "paused"), "Suspended")
        .cloned()
        .unwrap();
    assert_eq!(
        (&resumed["status"], &resumed["reason"]),
        (&Value::from("False"), &Value::from("JobResumed"))
    );

    // A Job past its deadline fails and its running pod is stopped before it is marked so.
    cluster.apply(&job_manifest(
        "slow",
        "  activeDeadlineSeconds: 2",
        "sleep 60",
    ));
    wait_for_condition(&cluster, "slow", "failed", Duration::from_secs(60));
    let slow = job(plane, "slow");
    assert_eq!(
        condition(&slow, "Failed").unwrap()["reason"],
        "DeadlineExceeded"
    );
    assert!(
        job_pods(plane, "slow").is_empty(),
        "{:#?}",
        job_pods(plane, "slow")
    );

    // A finished Job with a TTL of 0 is deleted at once, and its pods with it.
    cluster.apply(&job_manifest(
        "ephemeral",
        "  ttlSecondsAfterFinished: 0",
        "echo bye",
    ));
    wait_until(
        "the finished Job's deletion",
        Duration::from_secs(60),
        || {
            !plane
                .kubectl_output(&["get", "job", "ephemeral"])
                .status
                .success()
        },
    );
    wait_until(
        "the deleted Job's pods to go",
        Duration::from_secs(60),
        || job_pods(plane, "ephemeral").is_empty(),
    );
}

#[test]
fn kubectl_refuses_a_job_whose_pods_restart_always() {
    // Only the API is needed: the Job never gets as far as a pod.
    let plane = ControlPlane::start();
    let manifest = job_manifest("forever", "  completions: 1", "echo never")
        .replace("restartPolicy: Never", "restartPolicy: Always");
    let output = plane.kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(!output.status.success(), "an Always Job was accepted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("spec.template.spec.restartPolicy")
            && stderr.contains("Unsupported value: \"Always\"")
            && stderr.contains("is invalid"),
        "{stderr}"
    );
    assert!(
        !plane
            .kubectl_output(&["get", "job", "forever"])
            .status
            .success()
    );

    // What kubectl's own generator sends is accepted and defaulted as upstream does.
    plane.kubectl(&["create", "job", "made", "--image", IMAGE, "--", "true"]);
    let made = job(&plane, "made");
    let uid = made["metadata"]["uid"].as_str().unwrap();
    for label in ["batch.kubernetes.io/controller-uid", "controller-uid"] {
        assert_eq!(made["spec"]["template"]["metadata"]["labels"][label], uid);
        assert_eq!(made["metadata"]["labels"][label], uid);
    }
    for label in ["batch.kubernetes.io/job-name", "job-name"] {
        assert_eq!(
            made["spec"]["template"]["metadata"]["labels"][label],
            "made"
        );
    }
    assert_eq!(
        (&made["spec"]["completions"], &made["spec"]["parallelism"]),
        (&Value::from(1), &Value::from(1))
    );
    assert_eq!(made["spec"]["podReplacementPolicy"], "TerminatingOrFailed");
    let described = plane.kubectl(&["describe", "job", "made"]);
    assert!(
        described.contains("Completions:") && described.contains("Pods Statuses:"),
        "{described}"
    );
    // The template may not change under a running Job.
    let output =
        plane.kubectl_output(&["set", "image", "job/made", &format!("made={IMAGE}-other")]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("spec.template: Invalid value"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let discovery = plane.kubectl(&["api-resources", "--api-group=batch"]);
    assert!(
        discovery
            .lines()
            .any(|line| line.split_whitespace().collect::<Vec<_>>()
                == ["jobs", "batch/v1", "true", "Job"]),
        "{discovery}"
    );
}
