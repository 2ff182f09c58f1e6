//! `kubectl exec` end to end: the real kubectl (WebSocket, `v5.channel.k8s.io`) against
//! skiff-control, which passes the upgrade of `pods/{name}/exec` on to the node API of a real
//! `skiff-agent` and splices the two connections; the agent runs the command as an exec
//! process of the container's containerd task (real containerd and runc) with FIFOs for its
//! stdio. Each test starts its own control plane, containerd and node and removes them all.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration::pod_cluster::{IMAGE, PodCluster};
use serde_json::Value;

integration::pod_cluster_wrapper!(
    /// The shared one-node cluster, with this file's exec helpers.
    Cluster
);

/// A pod of two long-running containers that tell themselves apart by `$WHO`.
fn cluster_with_pod() -> Cluster {
    let cluster = Cluster(PodCluster::start(&[]));
    cluster.apply_pod(
        "box",
        &format!(
            r#"  containers:
  - name: main
    image: {IMAGE}
    command: ["sleep", "3600"]
    env: [{{name: WHO, value: main}}]
  - name: side
    image: {IMAGE}
    command: ["sleep", "3600"]
    env: [{{name: WHO, value: side}}]
"#
        ),
    );
    cluster.wait_for_pod("box", "both containers running", |pod| {
        (0..2)
            .all(|index| pod["status"]["containerStatuses"][index]["state"]["running"].is_object())
    });
    cluster
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Cluster {
    /// `kubectl exec ARGS` with `input` on its stdin (or none).
    fn exec(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let mut command = self.plane.kubectl_command();
        command.arg("exec").args(args);
        let Some(input) = input else {
            return command.output().expect("run kubectl exec");
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl exec");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = input.to_vec();
        // A writer of its own, so a large input never blocks against unread output.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let output = child.wait_with_output().expect("kubectl exec output");
        writer.join().expect("stdin writer");
        output
    }

    /// `kubectl exec ARGS`, which must succeed; its stdout.
    fn exec_ok(&self, args: &[&str], input: Option<&[u8]>) -> String {
        let output = self.exec(args, input);
        assert!(
            output.status.success(),
            "kubectl exec {} failed ({}): {}\nagent log:\n{}",
            args.join(" "),
            output.status,
            text(&output.stderr),
            self.node.log()
        );
        text(&output.stdout)
    }

    /// The containerd ID of a container of pod `box`.
    fn container_id(&self, index: usize) -> String {
        let pod: Value = self.pod("box");
        let id = pod["status"]["containerStatuses"][index]["containerID"]
            .as_str()
            .expect("a container ID");
        id.split_once("://").expect("runtime://id").1.to_string()
    }

    /// The processes containerd runs in a container's task (`ctr tasks ps`: a header,
    /// then one line per process).
    fn task_processes(&self, container_id: &str) -> usize {
        let listing = self.containerd.ctr(&["tasks", "ps", container_id]);
        listing
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .count()
    }

    /// What the agent's exec directory holds (FIFO directories of live sessions).
    fn exec_dirs(&self) -> Vec<String> {
        list(&self.node.run_dir.join("exec"))
    }

    /// Starts `kubectl exec box -c main -- sleep 1000` (with `-i` and a stdin if
    /// `interactive`), its output discarded; returns it and the ID of container `main` once
    /// the exec process runs there beside the container's own.
    fn start_sleeping_exec(&self, interactive: bool) -> (Child, String) {
        let mut command = self.plane.kubectl_command();
        command.arg("exec");
        if interactive {
            command.arg("-i").stdin(Stdio::piped());
        }
        let kubectl = command
            .args(["box", "-c", "main", "--", "sleep", "1000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run kubectl exec");
        let id = self.container_id(0);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.task_processes(&id) < 2 {
            assert!(
                Instant::now() < deadline,
                "the exec process never started\nagent log:\n{}",
                self.node.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        (kubectl, id)
    }

    /// Waits until no exec process is left in either container and no FIFO directory.
    fn wait_nothing_left(&self) {
        let ids = [self.container_id(0), self.container_id(1)];
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let processes: Vec<usize> = ids.iter().map(|id| self.task_processes(id)).collect();
            let dirs = self.exec_dirs();
            if processes == [1, 1] && dirs.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "exec left processes {processes:?} (1 per container expected) or FIFO dirs {dirs:?}\nagent log:\n{}",
                self.node.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn list(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| {
                entry
                    .expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn exec_prints_output_passes_exit_codes_and_stdin_and_leaves_nothing() {
    let cluster = cluster_with_pod();

    assert_eq!(
        cluster.exec_ok(&["box", "-c", "main", "--", "echo", "hello"], None),
        "hello\n"
    );
    // `-c` picks the container: each has its own environment.
    assert_eq!(
        cluster.exec_ok(&["box", "-c", "side", "--", "sh", "-c", "echo $WHO"], None),
        "side\n"
    );
    assert_eq!(
        cluster.exec_ok(&["box", "-c", "main", "--", "sh", "-c", "echo $WHO"], None),
        "main\n"
    );

    // stdout and stderr apart, and the exit code becomes kubectl's.
    let output = cluster.exec(
        &[
            "box",
            "-c",
            "main",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        None,
    );
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "out\n");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("err\n"), "{stderr}");
    assert!(
        stderr.contains("command terminated with exit code 3"),
        "{stderr}"
    );

    // stdin, to its end: `cat` returns it whole, and a large input goes through too.
    let input = b"line one\nline two\n";
    assert_eq!(
        cluster.exec_ok(&["-i", "box", "-c", "main", "--", "cat"], Some(input)),
        "line one\nline two\n"
    );
    let large: Vec<u8> = (0..1_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(
        cluster
            .exec_ok(&["-i", "box", "-c", "main", "--", "wc", "-c"], Some(&large))
            .trim(),
        "1000000"
    );
    assert_eq!(
        cluster
            .exec_ok(&["-i", "box", "-c", "main", "--", "cat"], Some(&large))
            .len(),
        large.len()
    );

    // A command that never reads its input still ends, whatever the client sends.
    let many: Vec<u8> = vec![b'x'; 8_000_000];
    let started = Instant::now();
    let output = cluster.exec(&["-i", "box", "-c", "main", "--", "true"], Some(&many));
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(started.elapsed() < Duration::from_secs(30));

    // A command that cannot run is kubectl's error, not a hang.
    let output = cluster.exec(&["box", "-c", "main", "--", "/no/such/binary"], None);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    eprintln!("a missing binary: {stderr}");
    assert!(
        stderr.contains("/no/such/binary"),
        "the error does not name the binary: {stderr}"
    );

    cluster.wait_nothing_left();
}

#[test]
fn exec_refusals_are_kubectls_errors() {
    let cluster = cluster_with_pod();
    // A container that has finished while its pod runs on.
    cluster.apply_pod(
        "half",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: done
    image: {IMAGE}
    command: ["true"]
  - name: main
    image: {IMAGE}
    command: ["sleep", "3600"]
"#
        ),
    );
    cluster.wait_for_pod("half", "done exited, main running", |pod| {
        let statuses = &pod["status"]["containerStatuses"];
        statuses[0]["state"]["terminated"].is_object()
            && statuses[1]["state"]["running"].is_object()
    });
    let output = cluster.exec(&["half", "-c", "done", "--", "echo", "hi"], None);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("unable to upgrade connection: container not found (\"done\")"),
        "{stderr}"
    );
    assert_eq!(
        cluster.exec_ok(&["half", "-c", "main", "--", "echo", "hi"], None),
        "hi\n"
    );

    // A request that is no upgrade is refused before any node is asked.
    let (status, body) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let response = cluster
                .plane
                .http()
                .get(format!(
                    "{}/api/v1/namespaces/default/pods/half/exec?command=ls&stdout=true&container=main",
                    cluster.plane.url
                ))
                .send()
                .await
                .expect("send request");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("a Status"))
        });
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["kind"], "Status");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Upgrade request required"),
        "{body}"
    );

    // A client that speaks only SPDY is told so by name.
    let output = cluster
        .plane
        .kubectl_command()
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .args(["exec", "half", "-c", "main", "--", "echo", "hi"])
        .output()
        .expect("run kubectl exec");
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("SPDY is not supported"), "{stderr}");

    let output = cluster.exec(&["nope", "--", "echo", "hi"], None);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("Error from server (NotFound): pods \"nope\" not found"),
        "{stderr}"
    );
    let output = cluster.exec(&["box", "-c", "db", "--", "echo", "hi"], None);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("container db"), "{stderr}");
    cluster.wait_nothing_left();
}

#[test]
fn a_client_that_goes_away_takes_its_process_with_it() {
    let cluster = cluster_with_pod();
    let (mut kubectl, _) = cluster.start_sleeping_exec(true);
    assert_eq!(cluster.exec_dirs().len(), 1, "one session, one FIFO dir");
    kubectl.kill().expect("kill kubectl");
    let _ = kubectl.wait();
    cluster.wait_nothing_left();
}

#[test]
fn an_exec_the_agent_lost_in_a_crash_is_ended_when_it_comes_back() {
    let mut cluster = cluster_with_pod();
    let (mut kubectl, id) = cluster.start_sleeping_exec(false);
    // kill -9 of the agent: the session dies with it, the process and FIFOs stay.
    cluster.0.node.kill();
    let _ = kubectl.kill();
    let _ = kubectl.wait();
    assert_eq!(cluster.task_processes(&id), 2);
    let PodCluster { node, plane, .. } = &mut cluster.0;
    node.restart(plane);
    cluster.wait_nothing_left();
    let log = cluster.node.log();
    assert!(log.contains("ending an orphaned exec process"), "{log}");
}

#[test]
fn exec_with_a_terminal() {
    let cluster = cluster_with_pod();
    // kubectl wants a real terminal for `-t` with `-i`; script(1) gives it one.
    integration::require_tool("script", "install util-linux");
    // The terminal's size is set first, so kubectl has one to send on the resize channel;
    // the command waits for it to arrive.
    let kubectl = format!(
        "stty cols 123 rows 45; kubectl --kubeconfig {} exec -it box -c main -- sh -c \
         'tty; for i in $(seq 100); do s=$(stty size 2>/dev/null); case \"$s\" in \"\"|\"0 0\") sleep 0.1;; *) break;; esac; done; echo size $s; echo $((6 * 7))'",
        cluster.plane.kubeconfig.display()
    );
    let output = Command::new("script")
        .args(["-qec", &kubectl, "/dev/null"])
        .env("HOME", cluster.plane.data_dir.join("home"))
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "kubectl exec -it failed ({}): {stdout} {}\nagent log:\n{}",
        output.status,
        text(&output.stderr),
        cluster.node.log()
    );
    assert!(stdout.contains("/dev/pts/"), "no terminal: {stdout:?}");
    assert!(stdout.contains("size 45 123"), "no resize: {stdout:?}");
    assert!(stdout.contains("42"), "{stdout:?}");
    cluster.wait_nothing_left();
}

#[test]
fn attach_follows_the_containers_own_output_until_it_exits() {
    let cluster = Cluster(PodCluster::start(&[]));
    cluster.apply_pod(
        "ticker",
        &format!(
            r#"  restartPolicy: Never
  containers:
  - name: main
    image: {IMAGE}
    command: ["sh", "-c", "i=0; while [ $i -lt 30 ]; do echo tick $i; echo tock $i >&2; i=$((i+1)); sleep 0.2; done"]
"#
        ),
    );
    cluster.wait_for_pod("ticker", "running", |pod| {
        pod["status"]["containerStatuses"][0]["state"]["running"].is_object()
    });
    let started = Instant::now();
    let output = cluster
        .plane
        .kubectl_command()
        .args(["attach", "ticker", "-c", "main"])
        .output()
        .expect("run kubectl attach");
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(
        output.status.success(),
        "kubectl attach failed ({}): {stderr}\nagent log:\n{}",
        output.status,
        cluster.node.log()
    );
    // What the container writes while attached, on each stream, and the end with the
    // container's (about 6 s after it started).
    assert!(stdout.contains("tick 29\n"), "{stdout:?}");
    assert!(stderr.contains("tock 29\n"), "{stderr:?}");
    assert!(!stdout.contains("tock"), "stderr on stdout: {stdout:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
}
