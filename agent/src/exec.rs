//! `kubectl exec` and `kubectl attach` on the node: the remote command protocol over WebSocket
//! (`v5.channel.k8s.io`, `v4.channel.k8s.io`) on an upgraded node API connection, and the
//! command itself, an exec process of the container's containerd task.
//!
//! Every WebSocket message is binary and starts with its channel: 0 stdin, 1 stdout,
//! 2 stderr, 3 the outcome (a `metav1.Status`), 4 terminal resizes (`{"Width","Height"}`),
//! and with v5, 255 closes a stream (`[255, 0]`: stdin is at its end).
//!
//! The process's stdio are FIFOs in `<run_dir>/exec/<exec id>/`, which the shim opens; the
//! directory, the FIFOs and the exec process are removed when the command ends or the
//! client goes away (the process is killed then, as the kubelet's runtime kills it).
//!
//! **Architecture invariant:** a session owns its process: nothing it made outlives it,
//! whichever side ends first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use containerd_client::services::v1::{
    CloseIoRequest, DeleteProcessRequest, ExecProcessRequest, GetContainerRequest, KillRequest,
    ListPidsRequest, ListTasksRequest, ResizePtyRequest, StartRequest, WaitRequest,
};
use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

use crate::containerd::{self, Client};
use crate::logs::{LogOptions, StreamSelection, read_logs};
use crate::node_api::ContainerLogSource;

/// The remote command protocols the node speaks, most preferred first.
pub const PROTOCOLS: [&str; 2] = [PROTOCOL_V5, PROTOCOL_V4];
pub const PROTOCOL_V5: &str = "v5.channel.k8s.io";
pub const PROTOCOL_V4: &str = "v4.channel.k8s.io";

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5 only: `[CLOSE, channel]` ends the client's side of a stream.
pub const CLOSE: u8 = 255;

/// After the process exits, how long its output may still take to arrive: a child it left
/// in the background can hold the pipe open forever.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// How long a killed exec process may take to die.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Output chunks in flight between the FIFO readers and the WebSocket.
const CHUNKS_IN_FLIGHT: usize = 16;
const READ_BUFFER: usize = 32 * 1024;
/// Output of a client-less command kept per stream, as the kubelet keeps of a probe's.
pub const CAPTURED_OUTPUT: usize = 10 * 1024;

/// The start of the ID of every exec process a session makes.
const EXEC_ID_PREFIX: &str = "exec-";

/// What the runc shim says of a process in Tasks.ListPids (`containerd.runc.v1.ProcessDetails`).
#[derive(Clone, PartialEq, prost::Message)]
struct ProcessDetails {
    #[prost(string, tag = "1")]
    exec_id: String,
}

/// The process type URL containerd registers for Tasks.Exec.
const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// PodExecOptions as the node receives them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOptions {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl ExecOptions {
    /// Decodes `command=...&command=...&stdin=1&stdout=1&stderr=1&tty=1` (a boolean is false
    /// only when absent or `0`, `f`, `false`, `n`, `no`, `off`). With a terminal, stderr is
    /// merged into stdout, so it is never a stream of its own.
    pub fn parse(query: &str) -> Result<Self, String> {
        let options = Self::parse_attach(query)?;
        if options.command.is_empty() {
            return Err("you must specify at least one command for the container".to_string());
        }
        Ok(options)
    }

    /// PodAttachOptions: the same, with no command.
    pub fn parse_attach(query: &str) -> Result<Self, String> {
        let mut options = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let on = !(value == "0"
                || ["f", "false", "n", "no", "off"]
                    .iter()
                    .any(|no| value.eq_ignore_ascii_case(no)));
            match key.as_ref() {
                "command" => options.command.push(value.into_owned()),
                "input" | "stdin" => options.stdin |= on,
                "output" | "stdout" => options.stdout |= on,
                "error" | "stderr" => options.stderr |= on,
                "tty" => options.tty |= on,
                _ => {}
            }
        }
        if !(options.stdin || options.stdout || options.stderr) {
            return Err("you must specify at least 1 of stdin, stdout, stderr".to_string());
        }
        if options.tty {
            options.stderr = false;
        }
        Ok(options)
    }
}

/// The protocol to answer with: the first of the client's (`Sec-WebSocket-Protocol`
/// values, comma-separated) that the node speaks.
pub fn negotiate<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    offered
        .into_iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .find_map(|protocol| PROTOCOLS.iter().find(|known| **known == protocol))
        .copied()
}

/// The outcome on the error channel: success, or `NonZeroExitCode` with the code as the
/// cause `ExitCode`, which kubectl turns into its own exit code.
pub fn exit_status(command: &[String], code: u32) -> Value {
    if code == 0 {
        return json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "command terminated with non-zero exit code: command '{}' exited with {code}",
            command.join(" ")
        ),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

/// A failure that is no exit code (the command could not be started), as a Status.
pub fn failure_status(message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "InternalError",
        "code": 500,
    })
}

/// A terminal size from the resize channel.
pub fn parse_resize(data: &[u8]) -> Option<(u32, u32)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u32,
        height: u32,
    }
    let size: Size = serde_json::from_slice(data).ok()?;
    Some((size.width, size.height))
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut bytes = BytesMut::with_capacity(data.len() + 1);
    bytes.extend_from_slice(&[channel]);
    bytes.extend_from_slice(data);
    Message::Binary(bytes.freeze())
}

/// The close a session ends with: 1000 (normal), which the client reads as the end of its
/// streams; a close without a code (1005) is an error to it.
fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    Containerd(#[from] containerd::Error),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// Runs exec processes in containers through containerd, their FIFOs under `fifo_dir`.
#[derive(Clone)]
pub struct Executor {
    containerd: Client,
    fifo_dir: PathBuf,
}

/// A started exec process and the node's ends of its stdio.
struct ExecProcess {
    container_id: String,
    exec_id: String,
    stdin: Option<pipe::Sender>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    /// Removes the FIFOs' directory when the session ends, however it ends.
    _fifos: FifoDir,
}

struct FifoDir(PathBuf);

impl Drop for FifoDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.0.display(), %error, "remove exec FIFOs");
        }
    }
}

fn mkfifo(path: &Path) -> anyhow::Result<()> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .with_context(|| format!("create FIFO {}", path.display()))
}

impl Executor {
    /// An executor over `containerd` whose FIFOs live under `fifo_dir` (which must be
    /// visible to containerd's shims, as the agent's run directory is). No session
    /// outlives the agent, so whatever a killed agent left in `fifo_dir` is removed.
    pub fn new(containerd: Client, fifo_dir: PathBuf) -> Self {
        if let Err(error) = std::fs::remove_dir_all(&fifo_dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %fifo_dir.display(), %error, "remove stale exec FIFOs");
        }
        Self {
            containerd,
            fifo_dir,
        }
    }

    /// Creates and starts `options.command` in the task of `container_id` with the streams
    /// `options` asks for.
    async fn start(
        &self,
        container_id: &str,
        options: &ExecOptions,
    ) -> Result<ExecProcess, ExecError> {
        let container = self
            .containerd
            .containers()
            .get(GetContainerRequest {
                id: container_id.to_string(),
            })
            .await
            .map_err(containerd::call_error("Containers.Get"))?
            .into_inner()
            .container
            .context("containerd returned no container")?;
        let spec: oci_spec::runtime::Spec =
            serde_json::from_slice(&container.spec.context("container has no spec")?.value)
                .context("decode the container's runtime spec")?;
        let mut process = spec
            .process()
            .clone()
            .context("container spec has no process")?;
        process.set_args(Some(options.command.clone()));
        process.set_terminal(Some(options.tty));

        let exec_id = format!("{EXEC_ID_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let dir = self.fifo_dir.join(&exec_id);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let fifos = FifoDir(dir.clone());
        let path = |name: &str, wanted: bool| wanted.then(|| dir.join(name));
        let stdin_path = path("stdin", options.stdin);
        let stdout_path = path("stdout", options.stdout);
        let stderr_path = path("stderr", options.stderr && !options.tty);
        for fifo in [&stdin_path, &stdout_path, &stderr_path]
            .into_iter()
            .flatten()
        {
            mkfifo(fifo)?;
        }
        // The node's ends are open before the shim opens its own, so the shim never waits
        // and no output is written before a reader is there. A reader opened before any
        // writer sees no end of file until a writer has come and gone; stdin is opened
        // read-write so that opening it never fails for want of a reader.
        let open_reader = |path: &Option<PathBuf>| -> anyhow::Result<Option<pipe::Receiver>> {
            path.as_ref()
                .map(|path| {
                    pipe::OpenOptions::new()
                        .open_receiver(path)
                        .with_context(|| format!("open {}", path.display()))
                })
                .transpose()
        };
        let stdout = open_reader(&stdout_path)?;
        let stderr = open_reader(&stderr_path)?;
        let stdin = stdin_path
            .as_ref()
            .map(|path| {
                pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(path)
                    .with_context(|| format!("open {}", path.display()))
            })
            .transpose()?;
        let text = |path: &Option<PathBuf>| {
            path.as_ref()
                .map(|path| path.display().to_string())
                .unwrap_or_default()
        };
        let request = ExecProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.clone(),
            stdin: text(&stdin_path),
            stdout: text(&stdout_path),
            stderr: text(&stderr_path),
            terminal: options.tty,
            spec: Some(prost_types::Any {
                type_url: PROCESS_TYPE_URL.to_string(),
                value: serde_json::to_vec(&process).context("encode the exec process")?,
            }),
        };
        self.containerd
            .tasks()
            .exec(request)
            .await
            .map_err(containerd::call_error("Tasks.Exec"))?;
        let started = self
            .containerd
            .tasks()
            .start(StartRequest {
                container_id: container_id.to_string(),
                exec_id: exec_id.clone(),
            })
            .await
            .map_err(containerd::call_error("Tasks.Start"));
        if let Err(error) = started {
            self.delete(container_id, &exec_id).await;
            return Err(error.into());
        }
        Ok(ExecProcess {
            container_id: container_id.to_string(),
            exec_id,
            stdin,
            stdout,
            stderr,
            _fifos: fifos,
        })
    }

    /// Runs `command` in the task of `container_id` without a client, as an exec probe
    /// does: returns its exit code and the start of its output (stdout then stderr, at most
    /// [`CAPTURED_OUTPUT`] bytes each; the rest is read and dropped so the process never
    /// blocks on a full pipe). A process still running after `timeout` is killed and the
    /// call fails. The process and its FIFOs are gone when this returns.
    pub async fn run(
        &self,
        container_id: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<(u32, Vec<u8>), ExecError> {
        let options = ExecOptions {
            command: command.to_vec(),
            stdout: true,
            stderr: true,
            ..ExecOptions::default()
        };
        let mut process = self.start(container_id, &options).await?;
        let exec_id = process.exec_id.clone();
        let capture = |receiver: Option<pipe::Receiver>| {
            tokio::spawn(async move {
                let mut kept = Vec::new();
                let Some(mut receiver) = receiver else {
                    return kept;
                };
                let mut buffer = vec![0; READ_BUFFER];
                while let Ok(read @ 1..) = receiver.read(&mut buffer).await {
                    let room = CAPTURED_OUTPUT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buffer[..read.min(room)]);
                }
                kept
            })
        };
        let stdout = capture(process.stdout.take());
        let stderr = capture(process.stderr.take());
        let waited = tokio::time::timeout(
            timeout,
            self.wait(container_id.to_string(), exec_id.clone()),
        )
        .await;
        let result = match waited {
            Ok(Ok(code)) => {
                let mut output = Vec::new();
                for reader in [stdout, stderr] {
                    // A child left in the background may hold the pipe open: what came
                    // in time is enough.
                    if let Ok(Ok(part)) = tokio::time::timeout(OUTPUT_DRAIN, reader).await {
                        output.extend_from_slice(&part);
                    }
                }
                Ok((code, output))
            }
            Ok(Err(error)) => Err(error),
            Err(_) => {
                self.kill(container_id, &exec_id).await;
                let wait = self.wait(container_id.to_string(), exec_id.clone());
                let _ = tokio::time::timeout(KILL_WAIT, wait).await;
                Err(ExecError::Other(anyhow::anyhow!(
                    "command timed out after {timeout:?}"
                )))
            }
        };
        self.delete(container_id, &exec_id).await;
        result
    }

    /// Ends the exec processes of sessions a killed agent left behind (their clients are
    /// gone with its connections): kills and deletes every exec process whose ID is one
    /// this module makes. Exec probes (which [`Executor::run`] makes) go too; other clients' processes are left alone.
    pub async fn remove_orphans(&self) {
        let tasks = match self
            .containerd
            .tasks()
            .list(ListTasksRequest::default())
            .await
        {
            Ok(response) => response.into_inner().tasks,
            Err(status) => {
                tracing::warn!(error = %status.message(), "list tasks for orphaned exec processes");
                return;
            }
        };
        for task in tasks {
            let container_id = if task.container_id.is_empty() {
                task.id
            } else {
                task.container_id
            };
            let request = ListPidsRequest {
                container_id: container_id.clone(),
            };
            let Ok(pids) = self.containerd.tasks().list_pids(request).await else {
                continue;
            };
            for process in pids.into_inner().processes {
                let Some(exec_id) = process
                    .info
                    .and_then(|info| ProcessDetails::decode(info.value.as_slice()).ok())
                    .map(|details| details.exec_id)
                    .filter(|exec_id| exec_id.starts_with(EXEC_ID_PREFIX))
                else {
                    continue;
                };
                tracing::info!(container_id, exec_id, "ending an orphaned exec process");
                self.kill(&container_id, &exec_id).await;
                let wait = self.wait(container_id.clone(), exec_id.clone());
                let _ = tokio::time::timeout(KILL_WAIT, wait).await;
                self.delete(&container_id, &exec_id).await;
            }
        }
    }

    async fn delete(&self, container_id: &str, exec_id: &str) {
        let request = DeleteProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
        };
        if let Err(status) = self.containerd.tasks().delete_process(request).await
            && status.code() != tonic::Code::NotFound
        {
            tracing::warn!(container_id, exec_id, error = %status.message(), "delete exec process");
        }
    }

    async fn wait(&self, container_id: String, exec_id: String) -> Result<u32, ExecError> {
        let response = self
            .containerd
            .tasks()
            .wait(WaitRequest {
                container_id,
                exec_id,
            })
            .await
            .map_err(containerd::call_error("Tasks.Wait"))?;
        Ok(response.into_inner().exit_status)
    }

    async fn kill(&self, container_id: &str, exec_id: &str) {
        let request = KillRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            signal: nix::sys::signal::Signal::SIGKILL as u32,
            all: false,
        };
        if let Err(status) = self.containerd.tasks().kill(request).await {
            tracing::debug!(container_id, exec_id, error = %status.message(), "kill exec process");
        }
    }

    async fn resize(&self, container_id: &str, exec_id: &str, width: u32, height: u32) {
        let request = ResizePtyRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            width,
            height,
        };
        if let Err(status) = self.containerd.tasks().resize_pty(request).await {
            tracing::debug!(container_id, exec_id, error = %status.message(), "resize exec terminal");
        }
    }

    async fn close_stdin(&self, container_id: &str, exec_id: &str) {
        let request = CloseIoRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stdin: true,
        };
        if let Err(status) = self.containerd.tasks().close_io(request).await {
            tracing::debug!(container_id, exec_id, error = %status.message(), "close exec stdin");
        }
    }

    /// Serves one exec session on an upgraded connection that speaks `protocol`: starts
    /// the command, passes the streams both ways until it exits, then sends its outcome
    /// and closes. A client that goes away first has its process killed.
    pub async fn serve<S>(
        &self,
        socket: S,
        protocol: &'static str,
        container_id: &str,
        options: ExecOptions,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let websocket = WebSocketStream::from_raw_socket(socket, Role::Server, None).await;
        let (mut sink, mut incoming) = websocket.split();
        let mut process = match self.start(container_id, &options).await {
            Ok(process) => process,
            Err(error) => {
                let message = format!("error executing command in container: {error}");
                tracing::info!(container_id, %message, "exec failed");
                let status = failure_status(&message).to_string();
                let _ = sink.send(frame(ERROR, status.as_bytes())).await;
                let _ = sink.send(normal_close()).await;
                let _ = sink.close().await;
                return;
            }
        };
        let container_id = process.container_id.clone();
        let exec_id = process.exec_id.clone();
        tracing::debug!(container_id, exec_id, command = ?options.command, "exec started");

        let (output_sender, mut output) = mpsc::channel::<(u8, Bytes)>(CHUNKS_IN_FLIGHT);
        let mut readers = Vec::new();
        for (channel, receiver) in [
            (STDOUT, process.stdout.take()),
            (STDERR, process.stderr.take()),
        ] {
            if let Some(receiver) = receiver {
                readers.push(tokio::spawn(read_output(
                    channel,
                    receiver,
                    output_sender.clone(),
                )));
            }
        }
        drop(output_sender);
        // Stdin is written by a task of its own, so a process that does not read its input
        // never stops its output from flowing.
        let mut stdin = process.stdin.take().map(|sender| {
            let (input, received) = mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
            let writer = tokio::spawn(write_input(
                sender,
                received,
                self.clone(),
                container_id.clone(),
                exec_id.clone(),
            ));
            (input, writer)
        });
        let mut exited = Box::pin(self.wait(container_id.clone(), exec_id.clone()));

        let mut closing_stdin = None;
        let outcome = loop {
            tokio::select! {
                message = incoming.next() => match message {
                    Some(Ok(Message::Binary(data))) => match data.first() {
                        Some(&STDIN) => {
                            if let Some((input, _)) = &stdin {
                                // A process that exits without reading its input must not
                                // leave the session waiting for room in the queue.
                                let refused = tokio::select! {
                                    sent = input.send(data.slice(1..)) => sent.is_err(),
                                    code = &mut exited => break Some(code),
                                };
                                if refused {
                                    stdin = None;
                                }
                            }
                        }
                        Some(&RESIZE) => {
                            if let Some((width, height)) = parse_resize(&data[1..]) {
                                self.resize(&container_id, &exec_id, width, height).await;
                            }
                        }
                        Some(&CLOSE) if protocol == PROTOCOL_V5 => {
                            if data.get(1) == Some(&STDIN)
                                && let Some((input, writer)) = stdin.take()
                            {
                                // Without a sender the writer finishes what is queued,
                                // then closes the process's stdin.
                                drop(input);
                                closing_stdin = Some(writer);
                            }
                        }
                        _ => {}
                    },
                    Some(Ok(Message::Close(_)) | Err(_)) | None => {
                        break None;
                    }
                    Some(Ok(_)) => {}
                },
                Some((channel, data)) = output.recv() => {
                    if sink.send(frame(channel, &data)).await.is_err() {
                        break None;
                    }
                }
                code = &mut exited => break Some(code),
            }
        };

        if let Some((input, writer)) = stdin.take() {
            drop(input);
            writer.abort();
        }
        if let Some(writer) = closing_stdin {
            writer.abort();
        }
        match outcome {
            Some(code) => {
                // What the process wrote before it exited is still on its way.
                let drained = tokio::time::timeout(OUTPUT_DRAIN, async {
                    while let Some((channel, data)) = output.recv().await {
                        if sink.send(frame(channel, &data)).await.is_err() {
                            return;
                        }
                    }
                })
                .await;
                if drained.is_err() {
                    tracing::debug!(container_id, exec_id, "exec output still open after exit");
                }
                let status = match code {
                    Ok(code) => exit_status(&options.command, code),
                    Err(error) => {
                        failure_status(&format!("error executing command in container: {error}"))
                    }
                };
                let _ = sink.send(frame(ERROR, status.to_string().as_bytes())).await;
                let _ = sink.send(normal_close()).await;
                let _ = sink.close().await;
            }
            None => {
                tracing::debug!(container_id, exec_id, "exec client went away: killing");
                self.kill(&container_id, &exec_id).await;
                let _ = tokio::time::timeout(KILL_WAIT, &mut exited).await;
            }
        }
        for reader in readers {
            reader.abort();
        }
        self.delete(&container_id, &exec_id).await;
        drop(process);
        tracing::debug!(container_id, exec_id, "exec ended");
    }
}

/// Serves `kubectl attach` without stdin: the container's own stdout and stderr from the
/// end of its log as they are written, until the container stops (then a success status)
/// or the client goes away. The log driver holds the process's pipes, so the log is where
/// its output is.
pub async fn serve_attach<S>(socket: S, log: ContainerLogSource, options: ExecOptions)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let websocket = WebSocketStream::from_raw_socket(socket, Role::Server, None).await;
    let (mut sink, mut incoming) = websocket.split();
    let mut followers = Vec::new();
    // With a terminal, stderr goes to stdout (the only stream the client reads).
    for (channel, wanted, streams) in [
        (STDOUT, options.stdout, StreamSelection::Stdout),
        (STDERR, options.stderr, StreamSelection::Stderr),
        (STDOUT, options.tty, StreamSelection::Stderr),
    ] {
        if !wanted {
            continue;
        }
        let follow = LogOptions {
            follow: true,
            tail_lines: Some(0),
            streams,
            ..LogOptions::default()
        };
        match read_logs(&log.path, follow, log.running.clone()).await {
            Ok(stream) => followers.push(stream.map(move |chunk| (channel, chunk)).boxed()),
            Err(error) => {
                let status = failure_status(&format!("attach: {error}")).to_string();
                let _ = sink.send(frame(ERROR, status.as_bytes())).await;
                let _ = sink.send(normal_close()).await;
                return;
            }
        }
    }
    let mut output = futures::stream::select_all(followers);
    loop {
        tokio::select! {
            message = incoming.next() => match message {
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            chunk = output.next() => match chunk {
                Some((channel, Ok(data))) => {
                    if sink.send(frame(channel, &data)).await.is_err() {
                        return;
                    }
                }
                Some((_, Err(error))) => {
                    tracing::debug!(%error, "attach: log read failed");
                    break;
                }
                None => break,
            },
        }
    }
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
    let _ = sink.send(frame(ERROR, status.to_string().as_bytes())).await;
    let _ = sink.send(normal_close()).await;
    let _ = sink.close().await;
}

/// Passes one output FIFO to the session until its end of file.
async fn read_output(channel: u8, mut receiver: pipe::Receiver, output: mpsc::Sender<(u8, Bytes)>) {
    let mut buffer = BytesMut::with_capacity(READ_BUFFER);
    loop {
        buffer.reserve(READ_BUFFER);
        match receiver.read_buf(&mut buffer).await {
            Ok(0) => return,
            Ok(_) => {
                if output
                    .send((channel, buffer.split().freeze()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(error) => {
                tracing::debug!(channel, %error, "read exec output");
                return;
            }
        }
    }
}

/// Writes what the client sends to the process's stdin FIFO; when the client's stdin ends,
/// closes the FIFO and tells the shim to close the process's stdin.
async fn write_input(
    mut sender: pipe::Sender,
    mut input: mpsc::Receiver<Bytes>,
    executor: Executor,
    container_id: String,
    exec_id: String,
) {
    while let Some(data) = input.recv().await {
        if let Err(error) = sender.write_all(&data).await {
            tracing::debug!(%error, "write exec stdin");
            break;
        }
    }
    drop(sender);
    executor.close_stdin(&container_id, &exec_id).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_decode_as_the_kubelet_decodes_them() {
        let options =
            ExecOptions::parse("command=sh&command=-c&command=echo+hi&stdin=1&stdout=true&tty=0")
                .unwrap();
        assert_eq!(options.command, ["sh", "-c", "echo hi"]);
        assert!(options.stdin && options.stdout && !options.stderr && !options.tty);
        // A terminal merges stderr into stdout.
        let tty = ExecOptions::parse("command=sh&stdout=1&stderr=1&tty=1").unwrap();
        assert!(tty.tty && tty.stdout && !tty.stderr);
        assert_eq!(
            ExecOptions::parse("stdout=1").unwrap_err(),
            "you must specify at least one command for the container"
        );
        assert_eq!(
            ExecOptions::parse("command=ls&stdout=false").unwrap_err(),
            "you must specify at least 1 of stdin, stdout, stderr"
        );
    }

    #[test]
    fn the_first_offered_protocol_the_node_speaks_wins() {
        assert_eq!(
            negotiate(["v5.channel.k8s.io, v4.channel.k8s.io,v3.channel.k8s.io"]),
            Some(PROTOCOL_V5)
        );
        assert_eq!(
            negotiate(["v3.channel.k8s.io", "v4.channel.k8s.io"]),
            Some(PROTOCOL_V4)
        );
        assert_eq!(negotiate(["channel.k8s.io", "base64.channel.k8s.io"]), None);
        assert_eq!(negotiate([]), None);
    }

    #[test]
    fn outcomes_are_statuses_kubectl_reads_exit_codes_from() {
        let command = ["sh".to_string(), "-c".to_string(), "exit 3".to_string()];
        assert_eq!(exit_status(&command, 0)["status"], "Success");
        let failed = exit_status(&command, 3);
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        assert_eq!(failure_status("boom")["message"], "boom");
    }

    #[test]
    fn resizes_and_frames() {
        assert_eq!(parse_resize(br#"{"Width":80,"Height":24}"#), Some((80, 24)));
        assert_eq!(parse_resize(b"nonsense"), None);
        assert_eq!(
            frame(STDOUT, b"hi"),
            Message::Binary(Bytes::from_static(b"\x01hi"))
        );
    }
}
