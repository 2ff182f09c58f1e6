//! Container logs end to end, without root: the real `skiff-agent log-driver` started the way
//! containerd's shim starts it (the argv its `binary://` URI gives, the container's stdout
//! and stderr as fds 3 and 4, a ready pipe as fd 5, `CONTAINER_ID` and
//! `CONTAINER_NAMESPACE` only), and the node API serving what it wrote over HTTPS.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use skiff_agent::logs::cri::{Stream, Tag, parse_record};
use skiff_agent::logs::{self, LogOptions, StreamSelection};
use skiff_agent::node_api::{
    ContainerLogSource, LogLookupError, NodeApi, NodeApiConfig, NodeState, ServingCertificate,
};
use tokio::sync::watch;

/// What containerd does with a `binary://` log URI (Go's `url.Parse` and `Query()`, then
/// `NewBinaryCmd`): the program and its arguments, `key value` per query pair.
fn containerd_argv(uri: &str) -> (PathBuf, Vec<OsString>) {
    fn decode(text: &str, plus_is_space: bool) -> Vec<u8> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("hex digits");
                    out.push(u8::from_str_radix(hex, 16).expect("hex digits"));
                    i += 3;
                }
                b'+' if plus_is_space => {
                    out.push(b' ');
                    i += 1;
                }
                byte => {
                    out.push(byte);
                    i += 1;
                }
            }
        }
        out
    }
    let rest = uri.strip_prefix("binary://").expect("a binary:// URI");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut argv = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        argv.push(OsString::from_vec(decode(key, true)));
        argv.push(OsString::from_vec(decode(value, true)));
    }
    (PathBuf::from(OsString::from_vec(decode(path, false))), argv)
}

fn mkfifo(path: &Path) {
    integration::require_tool("mkfifo", "install coreutils");
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// A log driver started as the shim starts it; killed on drop if still running.
struct Driver {
    child: Child,
    stdout: Option<File>,
    stderr: Option<File>,
    /// What the driver wrote on its ready pipe before closing it.
    ready: Vec<u8>,
}

impl Driver {
    fn start(fifo_dir: &Path, log: &Path, max_size: u64, max_files: u32) -> Self {
        let binary = integration::binary("skiff-agent");
        let uri = logs::driver_uri(&binary, log, max_size, max_files);
        let (program, argv) = containerd_argv(&uri);
        assert_eq!(program, binary);
        assert_eq!(
            argv.len(),
            2,
            "one query pair, so Go's map order cannot matter"
        );
        let [out, err, ready] = ["out", "err", "ready"].map(|name| fifo_dir.join(name));
        for fifo in [&out, &err, &ready] {
            mkfifo(fifo);
        }
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<"$FIFO_OUT" 4<"$FIFO_ERR" 5>"$FIFO_READY""#)
            .arg(&program)
            .args(&argv)
            .env_clear()
            .env("CONTAINER_ID", "c0ffee")
            .env("CONTAINER_NAMESPACE", "skiff")
            .env("FIFO_OUT", &out)
            .env("FIFO_ERR", &err)
            .env("FIFO_READY", &ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        // The shell opens the FIFOs in this order; each open waits for the other end.
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let stdout = OpenOptions::new().write(true).open(&out).expect("open out");
            let stderr = OpenOptions::new().write(true).open(&err).expect("open err");
            let mut ready_pipe = File::open(&ready).expect("open ready");
            let mut ready = Vec::new();
            ready_pipe.read_to_end(&mut ready).expect("read ready");
            let _ = sender.send((stdout, stderr, ready));
        });
        let Ok((stdout, stderr, ready)) = receiver.recv_timeout(Duration::from_secs(10)) else {
            let _ = child.kill();
            let output = child.wait_with_output().expect("driver output");
            panic!(
                "the log driver did not take its pipes and signal ready within 10 s: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        Self {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
            ready,
        }
    }

    fn write(&mut self, stream: Stream, bytes: &[u8]) {
        let pipe = match stream {
            Stream::Stdout => self.stdout.as_mut(),
            Stream::Stderr => self.stderr.as_mut(),
        };
        pipe.expect("the stream is open")
            .write_all(bytes)
            .expect("write to the driver");
    }

    fn close(&mut self, stream: Stream) {
        match stream {
            Stream::Stdout => self.stdout = None,
            Stream::Stderr => self.stderr = None,
        }
    }

    /// Waits for the driver to exit on its own; returns its status and stderr.
    fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the driver") {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return (status, stderr);
            }
            assert!(
                Instant::now() < deadline,
                "the log driver did not exit within {timeout:?} of its streams closing"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The records of a CRI log file, checking every line's shape on the way.
fn read_records(path: &Path) -> Vec<(Stream, Tag, Vec<u8>)> {
    let contents = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(contents.is_empty() || contents.ends_with(b"\n"));
    contents
        .split_inclusive(|&b| b == b'\n')
        .map(|line| {
            // RFC 3339 in UTC with nine fraction digits, as the kubelet prints them.
            let stamp = std::str::from_utf8(&line[..30]).expect("ASCII timestamp");
            let shape_ok = stamp.len() == 30
                && stamp.as_bytes()[10] == b'T'
                && stamp.as_bytes()[19] == b'.'
                && stamp.ends_with('Z')
                && line[30] == b' ';
            assert!(
                shape_ok,
                "timestamp shape: {:?}",
                String::from_utf8_lossy(line)
            );
            let record = parse_record(line).expect("a CRI record");
            (record.stream, record.tag, record.content.to_vec())
        })
        .collect()
}

fn of_stream(records: &[(Stream, Tag, Vec<u8>)], stream: Stream) -> Vec<(Tag, Vec<u8>)> {
    records
        .iter()
        .filter(|(s, _, _)| *s == stream)
        .map(|(_, tag, content)| (*tag, content.clone()))
        .collect()
}

#[test]
fn driver_writes_both_streams_as_cri_records_and_exits_at_eof() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = logs::container_log_path(
        &dir.path().join("pods"),
        "default",
        "web",
        "uid-1",
        "app",
        0,
    );
    let mut driver = Driver::start(dir.path(), &log, 10 * 1024 * 1024, 5);
    assert_eq!(
        driver.ready.len(),
        1,
        "one ready byte, then the pipe closed"
    );

    let long_line = vec![b'x'; 40_000];
    driver.write(Stream::Stdout, b"hello\n");
    driver.write(Stream::Stderr, b"warn 1\r\n");
    driver.write(Stream::Stdout, &long_line);
    driver.write(Stream::Stdout, b"\n");
    driver.write(Stream::Stderr, b"warn 2\n");
    driver.write(Stream::Stdout, b"no newline at the end");
    driver.close(Stream::Stdout);
    // One stream closed is not the end: the driver still reads the other.
    std::thread::sleep(Duration::from_millis(100));
    driver.write(Stream::Stderr, b"after stdout closed\n");
    driver.close(Stream::Stderr);
    let (status, stderr) = driver.wait(Duration::from_secs(10));
    assert!(status.success(), "driver failed: {status} {stderr}");

    let records = read_records(&log);
    let x = |n| vec![b'x'; n];
    assert_eq!(
        of_stream(&records, Stream::Stdout),
        vec![
            (Tag::Full, b"hello".to_vec()),
            (Tag::Partial, x(16 * 1024)),
            (Tag::Partial, x(16 * 1024)),
            (Tag::Full, x(40_000 - 32 * 1024)),
            // containerd's CRI logger writes the unterminated end of a stream as partial.
            (Tag::Partial, b"no newline at the end".to_vec()),
        ]
    );
    assert_eq!(
        of_stream(&records, Stream::Stderr),
        vec![
            (Tag::Full, b"warn 1".to_vec()),
            (Tag::Full, b"warn 2".to_vec()),
            (Tag::Full, b"after stdout closed".to_vec()),
        ]
    );

    // Read back, the stdout stream is exactly what the container wrote (the CR aside).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stdout = runtime.block_on(async {
        let options = LogOptions {
            streams: StreamSelection::Stdout,
            ..Default::default()
        };
        let (_, stopped) = watch::channel(false);
        let mut stream = logs::read_logs(&log, options, stopped).await.expect("read");
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.expect("chunk"));
        }
        out
    });
    let mut expected = b"hello\n".to_vec();
    expected.extend_from_slice(&long_line);
    expected.extend_from_slice(b"\nno newline at the end");
    assert_eq!(stdout, expected);
}

#[test]
fn driver_rotates_by_size_and_keeps_max_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("pods").join("app").join("0.log");
    let mut driver = Driver::start(dir.path(), &log, 2000, 3);
    // 200 records of 90 bytes (30 + " stdout F " + 49 + newline): about 9 files' worth.
    for i in 0..200 {
        driver.write(
            Stream::Stdout,
            format!("line-{i:03} {}\n", "y".repeat(40)).as_bytes(),
        );
    }
    driver.close(Stream::Stdout);
    driver.close(Stream::Stderr);
    let (status, stderr) = driver.wait(Duration::from_secs(10));
    assert!(status.success(), "driver failed: {status} {stderr}");

    let log_dir = log.parent().expect("log dir");
    let mut names: Vec<String> = std::fs::read_dir(log_dir)
        .expect("list logs")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .into_string()
                .expect("UTF-8")
        })
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "current + 2 rotated: {names:?}");
    assert_eq!(names[0], "0.log");
    for rotated in &names[1..] {
        let stamp = rotated.strip_prefix("0.log.").expect("rotated name");
        // The kubelet's YYYYMMDD-HHMMSS, with nanoseconds when two rotations share a second.
        assert!(
            stamp.len() >= 15 && stamp.as_bytes()[8] == b'-',
            "{rotated}"
        );
    }
    // Oldest first: the rotated files in name order, then the current one. What is kept is
    // the newest lines, with no gap and none repeated.
    let mut kept = Vec::new();
    for name in names[1..].iter().chain(&names[..1]) {
        let path = log_dir.join(name);
        let size = std::fs::metadata(&path).expect("stat").len();
        assert!(size <= 2000, "{name} is {size} bytes");
        for (_, tag, content) in read_records(&path) {
            assert_eq!(tag, Tag::Full);
            kept.push(String::from_utf8(content).expect("UTF-8"));
        }
    }
    let first: usize = kept[0][5..8].parse().expect("line number");
    let expected: Vec<String> = (first..200)
        .map(|i| format!("line-{i:03} {}", "y".repeat(40)))
        .collect();
    assert_eq!(kept, expected);
    assert!(
        kept.len() > 40,
        "three files hold more than {} lines",
        kept.len()
    );
}

#[test]
fn driver_never_blocks_the_container_when_it_cannot_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A regular file where the pod's log directory should be: every open fails, even as root.
    let blocker = dir.path().join("pods");
    std::fs::write(&blocker, "").expect("blocker");
    let log = blocker.join("app").join("0.log");
    let mut driver = Driver::start(dir.path(), &log, 1024 * 1024, 2);
    let mut stdout = driver.stdout.take().expect("stdout");
    // Far more than a pipe holds: only a driver that keeps reading lets this finish.
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let line = [b'z'; 1023];
        for _ in 0..4096 {
            stdout.write_all(&line).expect("write");
            stdout.write_all(b"\n").expect("write");
        }
        drop(stdout);
        let _ = sender.send(());
    });
    receiver
        .recv_timeout(Duration::from_secs(20))
        .expect("4 MiB written through the driver within 20 s");
    driver.close(Stream::Stderr);
    let (status, stderr) = driver.wait(Duration::from_secs(10));
    assert!(status.success(), "driver failed: {status} {stderr}");
    assert!(
        stderr.contains("4096 records") && stderr.contains("dropped"),
        "the driver reports what it dropped: {stderr}"
    );
}

#[test]
fn driver_drains_for_a_while_after_sigterm_then_exits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("pods").join("app").join("0.log");
    let mut driver = Driver::start(dir.path(), &log, 1024 * 1024, 2);
    driver.write(Stream::Stdout, b"before\n");
    // The shim sends SIGTERM when it tears the task down, then kills after 12 s. The driver
    // keeps reading for a short while (here its pipes even stay open) and exits cleanly.
    let status = Command::new("kill")
        .args(["-TERM", &driver.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let signalled = Instant::now();
    driver.write(Stream::Stderr, b"after\n");
    let (status, stderr) = driver.wait(Duration::from_secs(10));
    assert!(status.success(), "driver failed: {status} {stderr}");
    let waited = signalled.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "exited {waited:?} after SIGTERM"
    );
    let records = read_records(&log);
    assert_eq!(
        of_stream(&records, Stream::Stdout),
        vec![(Tag::Full, b"before".to_vec())]
    );
    assert_eq!(
        of_stream(&records, Stream::Stderr),
        vec![(Tag::Full, b"after".to_vec())]
    );
}

/// One pod `web` in `default` with container `app`, whose log the test's driver writes.
struct NodeFixture {
    log: PathBuf,
    running: watch::Receiver<bool>,
}

impl NodeState for NodeFixture {
    fn pods(&self) -> Vec<Pod> {
        let mut pod = Pod::default();
        pod.metadata.name = Some("web".into());
        pod.metadata.namespace = Some("default".into());
        pod.metadata.uid = Some("uid-1".into());
        vec![pod]
    }

    fn container_log(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        previous: bool,
    ) -> Result<ContainerLogSource, LogLookupError> {
        if (namespace, pod) != ("default", "web") {
            return Err(LogLookupError::PodNotFound { pod: pod.into() });
        }
        if container != "app" {
            return Err(LogLookupError::ContainerNotFound {
                pod: pod.into(),
                container: container.into(),
            });
        }
        if previous {
            return Err(LogLookupError::previous_not_found(container, pod));
        }
        Ok(ContainerLogSource {
            path: self.log.clone(),
            running: self.running.clone(),
        })
    }
}

async fn wait_for_lines(path: &Path, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let count = std::fs::read(path)
            .map(|c| c.iter().filter(|&&b| b == b'\n').count())
            .unwrap_or(0);
        if count >= lines {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {count} of {lines} lines",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads a streaming response until `expected` has come whole.
async fn expect_chunks<B: AsRef<[u8]>>(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<B>> + Unpin),
    expected: &str,
) {
    let mut seen = String::new();
    while seen.len() < expected.len() {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("waited 10 s for {expected:?}, got {seen:?}"))
            .expect("the response goes on")
            .expect("a chunk");
        seen.push_str(std::str::from_utf8(chunk.as_ref()).expect("UTF-8"));
    }
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_api_serves_and_follows_the_drivers_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = logs::container_log_path(
        &dir.path().join("pods"),
        "default",
        "web",
        "uid-1",
        "app",
        0,
    );
    let fifo_dir = dir.path().to_path_buf();
    let driver_log = log.clone();
    let mut driver =
        tokio::task::spawn_blocking(move || Driver::start(&fifo_dir, &driver_log, 1024 * 1024, 2))
            .await
            .expect("start the driver");
    driver.write(Stream::Stdout, b"first\nsecond\n");
    wait_for_lines(&log, 2).await;

    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, "node-api-token,ops,1\n").expect("token file");
    let (running, running_receiver) = watch::channel(true);
    let api = NodeApi::bind(
        NodeApiConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            serving_certificate: ServingCertificate::SelfSigned {
                hosts: vec!["127.0.0.1".into()],
            },
            client_ca_file: None,
            token_file: Some(tokens),
        },
        Arc::new(NodeFixture {
            log: log.clone(),
            running: running_receiver,
        }),
    )
    .await
    .expect("bind the node API");
    let base = format!("https://127.0.0.1:{}", api.local_addr().port());
    let ca = reqwest::Certificate::from_pem(api.serving_ca_pem().expect("self-signed").as_bytes())
        .expect("CA PEM");
    let server = tokio::spawn(api.run());
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .expect("client");
    let get = |path: &str, token: bool| {
        let request = client.get(format!("{base}{path}"));
        if token {
            request.bearer_auth("node-api-token")
        } else {
            request
        }
    };

    let healthz = get("/healthz", false).send().await.expect("healthz");
    assert_eq!(healthz.status().as_u16(), 200);
    assert_eq!(healthz.text().await.expect("body"), "ok");
    assert_eq!(
        get("/pods", false)
            .send()
            .await
            .expect("pods")
            .status()
            .as_u16(),
        401
    );
    let logs_path = "/containerLogs/default/web/app";
    assert_eq!(
        get(logs_path, false)
            .send()
            .await
            .expect("logs")
            .status()
            .as_u16(),
        401
    );

    let pods: serde_json::Value = get("/pods", true)
        .send()
        .await
        .expect("pods")
        .json()
        .await
        .expect("PodList JSON");
    assert_eq!(pods["kind"], "PodList");
    assert_eq!(pods["apiVersion"], "v1");
    assert_eq!(pods["items"][0]["metadata"]["uid"], "uid-1");

    let all = get(logs_path, true).send().await.expect("logs");
    assert_eq!(all.status().as_u16(), 200);
    assert_eq!(all.text().await.expect("body"), "first\nsecond\n");
    let tail = get(&format!("{logs_path}?tailLines=1&timestamps=true"), true)
        .send()
        .await
        .expect("tail")
        .text()
        .await
        .expect("body");
    let (stamp, line) = tail.split_once(' ').expect("a timestamp prefix");
    assert_eq!(line, "second\n");
    assert!(stamp.len() == 30 && stamp.ends_with('Z'), "{stamp}");
    let missing = get("/containerLogs/default/web/db", true)
        .send()
        .await
        .expect("404");
    assert_eq!(missing.status().as_u16(), 404);
    assert_eq!(
        missing.text().await.expect("body"),
        "container \"db\" not found in pod \"web\""
    );

    // Follow: what the container writes next arrives on the open response.
    let follow = get(&format!("{logs_path}?follow=true&tailLines=1"), true)
        .send()
        .await
        .expect("follow");
    assert_eq!(follow.status().as_u16(), 200);
    let mut body = follow.bytes_stream();
    expect_chunks(&mut body, "second\n").await;
    driver.write(Stream::Stdout, b"third\n");
    expect_chunks(&mut body, "third\n").await;
    driver.write(Stream::Stderr, b"to stderr\n");
    expect_chunks(&mut body, "to stderr\n").await;

    // The container exits: its pipes close, the driver exits, the agent marks it stopped,
    // and the response ends with the last words.
    driver.write(Stream::Stdout, b"last words");
    driver.close(Stream::Stdout);
    driver.close(Stream::Stderr);
    let (status, stderr) =
        tokio::task::spawn_blocking(move || driver.wait(Duration::from_secs(10)))
            .await
            .expect("driver wait");
    assert!(status.success(), "driver failed: {status} {stderr}");
    running.send(false).expect("mark stopped");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = body.next().await {
            rest.extend_from_slice(&chunk.expect("chunk"));
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the follow did not end once the container stopped"
    );
    assert_eq!(String::from_utf8(rest).expect("UTF-8"), "last words");
    server.abort();
}
