//! `kubectl logs` end to end: the real kubectl against skiff-control, which passes
//! `pods/{name}/log` on to the node API of a real `skiff-agent` (authenticating with a client
//! certificate of the cluster CA, which the agent trusts through `--client-ca-file`), which
//! reads the CRI logs its containers (real containerd and runc) wrote. Each test starts its
//! own control plane, containerd and node and removes them all.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration::ControlPlane;
use integration::pod_cluster::{IMAGE, PodCluster};
use serde_json::Value;

integration::pod_cluster_wrapper!(
    /// The shared one-node cluster, with this file's log helpers.
    Cluster
);

fn cluster() -> Cluster {
    // The harness gives the agent the control plane's CA (`--client-ca-file`): the API
    // server's client certificate for node APIs is signed by it.
    Cluster(PodCluster::start(&[]))
}

impl Cluster {
    /// `kubectl logs ARGS`: (success, stdout, stderr).
    fn logs(&self, args: &[&str]) -> (bool, String, String) {
        let mut full = vec!["logs"];
        full.extend_from_slice(args);
        let output = self.plane.kubectl_output(&full);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// `kubectl logs ARGS`, which must succeed; its stdout.
    fn logs_ok(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.logs(args);
        assert!(
            ok,
            "kubectl logs {} failed: {stderr}\nagent log:\n{}",
            args.join(" "),
            self.node.log()
        );
        stdout
    }

    /// Waits until `kubectl logs ARGS` prints `expected` (the container may still be
    /// writing it).
    fn wait_for_logs(&self, args: &[&str], expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, stdout, stderr) = self.logs(args);
            if ok && stdout == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kubectl logs {} never printed {expected:?}; last: {stdout:?} {stderr}\nagent log:\n{}",
                args.join(" "),
                self.node.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A raw API GET with the admin token: (status code, JSON body).
    fn api_get(&self, path: &str) -> (u16, Value) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let response = self
                .plane
                .http()
                .get(format!("{}{path}", self.plane.url))
                .send()
                .await
                .expect("send request");
            let status = response.status().as_u16();
            let body = response.json().await.expect("JSON body");
            (status, body)
        })
    }
}

fn running(pod: &Value, container: usize) -> bool {
    pod["status"]["containerStatuses"][container]["state"]["running"].is_object()
}

/// A running `kubectl logs -f`, read line by line; killed on drop.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn start(plane: &ControlPlane, args: &[&str]) -> Self {
        let mut child = plane
            .kubectl_command()
            .arg("logs")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run kubectl logs -f");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    fn next_line(&self, what: &str) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("kubectl logs -f printed no {what} within 20 s"))
    }

    /// Waits for kubectl to end on its own.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `2024-05-01T10:00:00.123456789Z text`: RFC 3339 in UTC with nine fraction digits.
fn split_timestamp(line: &str) -> (&str, &str) {
    let (timestamp, text) = line
        .split_once(' ')
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    let bytes = timestamp.as_bytes();
    let shape_ok = bytes.len() == 30
        && bytes.iter().enumerate().all(|(index, byte)| match index {
            4 | 7 => *byte == b'-',
            10 => *byte == b'T',
            13 | 16 => *byte == b':',
            19 => *byte == b'.',
            29 => *byte == b'Z',
            _ => byte.is_ascii_digit(),
        });
    assert!(shape_ok, "not an RFC 3339 nanosecond timestamp: {line:?}");
    (timestamp, text)
}

#[test]
fn logs_print_tail_timestamps_and_follow_until_the_container_exits() {
    let cluster = cluster();
    let temp = tempfile::tempdir().expect("temp dir");
    let trigger = temp.path().join("trigger");
    std::fs::create_dir(&trigger).expect("trigger dir");
    cluster.apply_pod(
        "web",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "echo one; echo two; sleep 0.2; echo three >&2; while [ ! -e /trigger/go ]; do sleep 0.05; done; echo late"]
    volumeMounts:
    - {{name: trigger, mountPath: /trigger}}
  volumes:
  - name: trigger
    hostPath: {{path: {trigger}, type: Directory}}
"#,
            trigger = trigger.display()
        ),
    );
    cluster.wait_for_pod("web", "running", |pod| running(pod, 0));
    // stdout and stderr, in the order written (the driver reads the two pipes apart, so
    // the container pauses before it changes stream).
    cluster.wait_for_logs(&["web"], "one\ntwo\nthree\n");

    assert_eq!(cluster.logs_ok(&["web", "--tail", "1"]), "three\n");
    assert_eq!(
        cluster.logs_ok(&["web", "-c", "app", "--tail=2"]),
        "two\nthree\n"
    );
    assert_eq!(cluster.logs_ok(&["web", "--limit-bytes", "5"]), "one\nt");
    assert_eq!(
        cluster.logs_ok(&["web", "--since", "1h"]),
        "one\ntwo\nthree\n"
    );
    assert_eq!(
        cluster.logs_ok(&["web", "--since-time", "2099-01-01T00:00:00Z"]),
        ""
    );
    let stamped = cluster.logs_ok(&["web", "--timestamps"]);
    let lines: Vec<(&str, &str)> = stamped.lines().map(split_timestamp).collect();
    assert_eq!(
        lines.iter().map(|(_, text)| *text).collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    assert!(
        lines.windows(2).all(|pair| pair[0].0 <= pair[1].0),
        "timestamps out of order: {stamped}"
    );

    // `-f` prints what is there, then what the container writes after the call started,
    // and ends by itself when the container exits.
    let mut follower = Follower::start(&cluster.plane, &["-f", "web"]);
    for expected in ["one", "two", "three"] {
        assert_eq!(follower.next_line(expected), expected);
    }
    assert!(
        follower
            .lines
            .recv_timeout(Duration::from_millis(300))
            .is_err(),
        "nothing more before the trigger"
    );
    std::fs::write(trigger.join("go"), "").expect("pull the trigger");
    assert_eq!(follower.next_line("late line"), "late");
    let status = follower
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| {
            panic!(
                "kubectl logs -f still following 20 s after the container exited\nagent log:\n{}",
                cluster.node.log()
            )
        });
    assert!(status.success(), "kubectl logs -f ended with {status}");
    cluster.wait_for_pod("web", "Succeeded", |pod| {
        pod["status"]["phase"] == "Succeeded"
    });
    assert_eq!(cluster.logs_ok(&["web"]), "one\ntwo\nthree\nlate\n");

    // The node API behind the proxy refuses anyone without a certificate or token.
    let node: Value = serde_json::from_str(&cluster.plane.kubectl(&[
        "get",
        "node",
        &cluster.node.name,
        "-o",
        "json",
    ]))
    .expect("node JSON");
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .expect("the node reports its API port");
    assert_ne!(port, 0, "the node reports the port it bound, not 0");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // The node's serving certificate is self-signed; this client checks nothing of it.
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .expect("HTTP client");
        let url = |path: &str| format!("https://127.0.0.1:{port}{path}");
        let health = client.get(url("/healthz")).send().await.expect("healthz");
        assert_eq!(health.status().as_u16(), 200);
        let logs = client
            .get(url("/containerLogs/default/web/app"))
            .send()
            .await
            .expect("containerLogs");
        assert_eq!(logs.status().as_u16(), 401);
    });
}

#[test]
fn previous_shows_the_run_before_the_restart() {
    let cluster = cluster();
    // Crashes on its first run, runs on its second (the emptyDir outlives the container).
    cluster.apply_pod(
        "once",
        &format!(
            r#"  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "if [ -e /data/ran ]; then echo second run; while true; do sleep 1; done; else touch /data/ran; echo first run; exit 1; fi"]
    volumeMounts:
    - {{name: data, mountPath: /data}}
  volumes:
  - name: data
    emptyDir: {{}}
"#
        ),
    );
    // Crashes every time.
    cluster.apply_pod(
        "crash",
        &format!(
            r#"  restartPolicy: Always
  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "echo run; exit 1"]
"#
        ),
    );

    // While the crashed run waits to be restarted, its log is both the current and the
    // previous one, as the kubelet shows it.
    cluster.wait_for_pod("crash", "CrashLoopBackOff", |pod| {
        pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    });
    assert_eq!(cluster.logs_ok(&["crash", "--previous"]), "run\n");
    assert_eq!(
        cluster
            .logs_ok(&["crash", "-p", "--timestamps"])
            .split_once(' ')
            .map(|(_, text)| text),
        Some("run\n")
    );
    assert_eq!(cluster.logs_ok(&["crash"]), "run\n");

    // After the 10 s back-off the second run runs: the previous run is the first.
    cluster.wait_for_pod("once", "the second run running", |pod| {
        running(pod, 0) && pod["status"]["containerStatuses"][0]["restartCount"] == 1
    });
    cluster.wait_for_logs(&["once"], "second run\n");
    assert_eq!(cluster.logs_ok(&["once", "--previous"]), "first run\n");

    // A container that never restarted has no previous run: the kubelet's words come back.
    cluster.apply_pod(
        "steady",
        &format!(
            r#"  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "echo up; while true; do sleep 1; done"]
"#
        ),
    );
    cluster.wait_for_pod("steady", "running", |pod| running(pod, 0));
    let (ok, _, stderr) = cluster.logs(&["steady", "--previous"]);
    assert!(!ok);
    assert!(
        stderr.contains(
            "Error from server (BadRequest): previous terminated container \"app\" in pod \"steady\" not found"
        ),
        "{stderr}"
    );
}

#[test]
fn containers_are_chosen_and_missing_pods_are_not_found() {
    let cluster = cluster();
    cluster.apply_pod(
        "multi",
        &format!(
            r#"  containers:
  - name: a
    image: {IMAGE}
    command: ["sh", "-c", "echo from a; while true; do sleep 1; done"]
  - name: b
    image: {IMAGE}
    command: ["sh", "-c", "echo from b; while true; do sleep 1; done"]
"#
        ),
    );
    cluster.wait_for_pod("multi", "both running", |pod| {
        running(pod, 0) && running(pod, 1)
    });
    cluster.wait_for_logs(&["multi", "-c", "b"], "from b\n");
    cluster.wait_for_logs(&["multi", "-c", "a"], "from a\n");

    // kubectl picks the first container itself and says so.
    let (ok, stdout, stderr) = cluster.logs(&["multi"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "from a\n");
    assert!(
        stderr.contains("Defaulted container \"a\" out of: a, b"),
        "{stderr}"
    );
    // A client that names none gets kube-apiserver's refusal.
    let (code, status) = cluster.api_get("/api/v1/namespaces/default/pods/multi/log");
    assert_eq!(code, 400, "{status}");
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "BadRequest");
    assert_eq!(
        status["message"],
        "a container name must be specified for pod multi, choose one of: [a b]"
    );
    let (code, status) = cluster.api_get("/api/v1/namespaces/default/pods/multi/log?container=c");
    assert_eq!(code, 400, "{status}");
    assert_eq!(status["message"], "container c is not valid for pod multi");

    // A pod that does not exist.
    let (ok, _, stderr) = cluster.logs(&["missing"]);
    assert!(!ok);
    assert!(
        stderr.contains("(NotFound): pods \"missing\" not found"),
        "{stderr}"
    );
    let (code, status) = cluster.api_get("/api/v1/namespaces/default/pods/missing/log");
    assert_eq!(code, 404, "{status}");
    assert_eq!(status["reason"], "NotFound");
    assert_eq!(status["message"], "pods \"missing\" not found");

    // pods/log is in discovery, with only `get`.
    let (code, resources) = cluster.api_get("/api/v1");
    assert_eq!(code, 200);
    let log = resources["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|resource| resource["name"] == "pods/log")
        .expect("pods/log in discovery");
    assert_eq!(log["verbs"], serde_json::json!(["get"]));
}
