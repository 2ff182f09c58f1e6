//! `skiff-agent log-driver`: the process containerd's shim starts for each container through
//! a `binary://` log URI (containerd's `NewBinaryIO`). It inherits the container's stdout
//! pipe as fd 3, its stderr pipe as fd 4 and a pipe to signal readiness on as fd 5, and
//! writes both streams into one CRI log file until both pipes reach end of file.
//!
//! It is a child of the shim, not of the agent, so it lives through the agent's restarts.
//! It never stops reading: a record that cannot be written is dropped and counted, so a full
//! disk never blocks the container on a full pipe.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

use super::LogDriverSpec;
use super::cri::{LineSplitter, MAX_LINE_CONTENT, Stream, Tag, encode_record};
use super::writer::RotatingLogFile;

/// The descriptors containerd's `NewBinaryIO` passes (as `ExtraFiles`).
const STDOUT_FD: i32 = 3;
const STDERR_FD: i32 = 4;
const READY_FD: i32 = 5;

/// After SIGTERM (the shim's "flush and exit" once it has closed the pipes), how long the
/// driver keeps draining before it exits; the shim kills it after 12 s.
const TERM_DRAIN: Duration = Duration::from_secs(2);

const READ_BUFFER: usize = 64 * 1024;

enum Event {
    StreamClosed,
    Terminated,
}

pub(super) fn run(spec: &LogDriverSpec) -> anyhow::Result<()> {
    // SIGTERM and SIGINT are taken by a thread of ours (sigwait) rather than ending the
    // process at once: threads inherit the mask, so block them before spawning any.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;

    // Which descriptors were inherited is decided before this process opens anything, so a
    // descriptor number it opens itself is never taken for an inherited one.
    let inherited = [STDOUT_FD, STDERR_FD, READY_FD].map(fd_is_open);
    let stdout = inherited[0].then(|| open_inherited(STDOUT_FD, false));
    let stderr = inherited[1].then(|| open_inherited(STDERR_FD, false));

    let log = Arc::new(Mutex::new(RotatingLogFile::open(
        &spec.path,
        spec.max_size,
        spec.max_files,
    )));

    if inherited[2] {
        signal_ready();
    }

    let (events, event_receiver) = mpsc::channel();
    let mut streams = 0;
    for (input, stream, fd) in [
        (stdout, Stream::Stdout, STDOUT_FD),
        (stderr, Stream::Stderr, STDERR_FD),
    ] {
        match input {
            Some(Ok(input)) => {
                streams += 1;
                let log = log.clone();
                let events = events.clone();
                std::thread::Builder::new()
                    .name(stream.as_str().to_string())
                    .spawn(move || {
                        pump(input, stream, &log);
                        let _ = events.send(Event::StreamClosed);
                    })?;
            }
            Some(Err(error)) => eprintln!("skiff-agent log-driver: open fd {fd}: {error}"),
            None => {}
        }
    }
    {
        let events = events.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if signals.wait().is_ok() {
                    let _ = events.send(Event::Terminated);
                }
            })?;
    }
    drop(events);

    let mut closed = 0;
    let mut deadline: Option<Instant> = None;
    while closed < streams {
        let event = match deadline {
            None => event_receiver.recv().ok(),
            Some(deadline) => event_receiver
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok(),
        };
        match event {
            Some(Event::StreamClosed) => closed += 1,
            Some(Event::Terminated) => deadline = Some(Instant::now() + TERM_DRAIN),
            None => break,
        }
    }

    let log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if log.dropped_records() > 0 {
        eprintln!(
            "skiff-agent log-driver: {} records of {} dropped (last error: {})",
            log.dropped_records(),
            log.path().display(),
            log.last_error().unwrap_or("none")
        );
    }
    Ok(())
}

/// Reads one stream until end of file, writing its records as they complete.
fn pump(mut input: File, stream: Stream, log: &Mutex<RotatingLogFile>) {
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut splitter = LineSplitter::new(MAX_LINE_CONTENT);
    let mut batch = Vec::with_capacity(READ_BUFFER + 4096);
    let mut record_ends = Vec::new();
    loop {
        let read = match input.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                eprintln!("skiff-agent log-driver: read {}: {error}", stream.as_str());
                break;
            }
        };
        let now = jiff::Timestamp::now();
        batch.clear();
        record_ends.clear();
        splitter.push(&buffer[..read], |tag, content| {
            encode_record(&mut batch, now, stream, tag, content);
            record_ends.push(batch.len());
        });
        write(log, &batch, &record_ends);
    }
    batch.clear();
    record_ends.clear();
    let now = jiff::Timestamp::now();
    splitter.finish(|tag: Tag, content| {
        encode_record(&mut batch, now, stream, tag, content);
        record_ends.push(batch.len());
    });
    write(log, &batch, &record_ends);
}

fn write(log: &Mutex<RotatingLogFile>, batch: &[u8], record_ends: &[usize]) {
    if record_ends.is_empty() {
        return;
    }
    log.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .write_records(batch, record_ends);
}

fn fd_is_open(fd: i32) -> bool {
    std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_ok()
}

/// Opens an inherited pipe end through `/proc/self/fd` (a new open file description of the
/// same pipe, which needs no unsafe code), then closes the inherited descriptor.
///
/// The open is non-blocking because opening a pipe this way goes through FIFO semantics:
/// a blocking read-open waits for a writer, which may already be gone. Reads then block.
fn open_inherited(fd: i32, write: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{fd}"))?;
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )?;
    // The number was inherited (checked before this process opened anything), so it is not
    // one of this process's own files.
    let _ = nix::unistd::close(fd);
    Ok(file)
}

/// Tells the shim the driver is ready: one byte on fd 5, then the pipe closed.
fn signal_ready() {
    match open_inherited(READY_FD, true) {
        Ok(mut ready) => {
            if let Err(error) = ready.write_all(b"\n") {
                eprintln!("skiff-agent log-driver: signal ready on fd {READY_FD}: {error}");
            }
        }
        Err(error) => eprintln!("skiff-agent log-driver: open fd {READY_FD}: {error}"),
    }
}
