//! Reading a container's CRI log for `kubectl logs`, with the kubelet's options: `tailLines`,
//! `sinceSeconds`/`sinceTime`, `timestamps`, `limitBytes`, the `stream` selection and
//! `follow`.
//!
//! Records are joined back into lines: the `P` parts of a line and its final `F` part come
//! out as one line, with one timestamp (its first part's) when asked for; `tailLines` counts
//! such lines. A line left unfinished when its stream closed (a trailing `P`) comes out
//! without a newline, as the container wrote it.
//!
//! Following waits on inotify (a watch on the log's directory) rather than polling; it goes
//! on into the new file when the driver rotates the log, and ends when the caller's
//! `running` flag turns false.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, SeekFrom};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::{AsyncBufReadExt as _, AsyncSeekExt as _, BufReader};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::cri::{MAX_LINE_CONTENT, Stream, Tag, parse_record, write_timestamp};

/// Output is sent in chunks of about this size.
const CHUNK: usize = 32 * 1024;

/// A line still unfinished after this many bytes (a container writing megabytes without a
/// newline) is sent in pieces rather than held whole in memory.
const MAX_PENDING_LINE: usize = 64 * MAX_LINE_CONTENT;

/// After the container stops, a follower keeps reading this long for the driver's last
/// records (the driver reads the pipe independently of the container's exit), unless the
/// driver closes the file first.
const AFTER_EXIT_GRACE: Duration = Duration::from_millis(250);

/// The streams a reader wants (the `stream` option of PodLogOptions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamSelection {
    #[default]
    All,
    Stdout,
    Stderr,
}

impl StreamSelection {
    pub fn includes(self, stream: Stream) -> bool {
        match self {
            StreamSelection::All => true,
            StreamSelection::Stdout => stream == Stream::Stdout,
            StreamSelection::Stderr => stream == Stream::Stderr,
        }
    }
}

/// What to read, as the kubelet reads PodLogOptions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep reading as the container writes, until it stops.
    pub follow: bool,
    /// Prefix each line with its timestamp (RFC 3339, nine fraction digits) and a space.
    pub timestamps: bool,
    /// Start this many lines before the end (`None`: from the start).
    pub tail_lines: Option<u64>,
    /// Only lines written at or after this time.
    pub since: Option<Timestamp>,
    /// Stop after this many bytes of output.
    pub limit_bytes: Option<u64>,
    pub streams: StreamSelection,
}

#[derive(Debug, thiserror::Error)]
pub enum LogReadError {
    #[error("open log file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("read log file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("watch log directory of {path}: {source}")]
    Watch { path: PathBuf, source: io::Error },
}

/// The output of [`read_logs`]: chunks of log text, ending after an error if one happens.
pub type LogStream = ReceiverStream<Result<Bytes, LogReadError>>;

/// Reads the CRI log at `path`. `running` says whether the container still runs: a follower
/// stops once it is false (or its sender is gone) and the file is read to its end; a reader
/// started while it is already false reads to the end and stops, as for `previous`.
///
/// Opening the file and finding the tail happen before this returns, so the caller can
/// answer with an error status; the rest streams from a task of its own that ends when the
/// stream is dropped.
pub async fn read_logs(
    path: &Path,
    options: LogOptions,
    running: watch::Receiver<bool>,
) -> Result<LogStream, LogReadError> {
    let owned_path = path.to_path_buf();
    let tail_lines = options.tail_lines;
    let streams = options.streams;
    let (path, file, meta, start, threshold) = tokio::task::spawn_blocking(move || {
        let open_error = |source| LogReadError::Open {
            path: owned_path.clone(),
            source,
        };
        // A symlink (such as /var/log/containers/*.log) is resolved: the watch and the
        // rotation check are about the real file's directory and name.
        let path = std::fs::canonicalize(&owned_path).map_err(open_error)?;
        let file = File::open(&path).map_err(open_error)?;
        let meta = file.metadata().map_err(open_error)?;
        let (start, threshold) = match tail_lines {
            Some(lines) => tail_start(&file, meta.len(), lines, streams).map_err(|source| {
                LogReadError::Read {
                    path: path.clone(),
                    source,
                }
            })?,
            None => (0, 0),
        };
        Ok::<_, LogReadError>((path, file, meta, start, threshold))
    })
    .await
    .expect("the log open task does not panic")?;

    let mut file = tokio::fs::File::from_std(file);
    file.seek(SeekFrom::Start(start))
        .await
        .map_err(|source| LogReadError::Read {
            path: path.clone(),
            source,
        })?;
    // The watch exists before the first read, so no write between that read and the wait
    // goes unnoticed.
    let watch = if options.follow {
        Some(DirectoryWatch::new(&path)?)
    } else {
        None
    };

    let (sender, receiver) = mpsc::channel(4);
    let remaining = options.limit_bytes;
    let mut reader = Reader {
        path,
        file: BufReader::with_capacity(CHUNK, file),
        identity: (meta.dev(), meta.ino()),
        offset: start,
        carry: Vec::new(),
        threshold,
        options,
        lines: Default::default(),
        out: Vec::with_capacity(CHUNK),
        remaining,
        done: false,
        sender,
    };
    tokio::spawn(async move {
        if let Err(error) = reader.run(watch, running).await {
            let _ = reader.sender.send(Err(error)).await;
        }
    });
    Ok(ReceiverStream::new(receiver))
}

/// A line being put together from its records.
#[derive(Default)]
struct PendingLine {
    content: Vec<u8>,
    /// The timestamp of its first record.
    first_timestamp: Option<Timestamp>,
    /// The file offset of its latest record.
    last_offset: u64,
    /// Set once a piece of an overlong line went out: whether the line was selected (and its
    /// timestamp written).
    decided: Option<bool>,
}

struct Reader {
    path: PathBuf,
    file: BufReader<tokio::fs::File>,
    /// Device and inode of the open file, to notice a rotation.
    identity: (u64, u64),
    /// Offset in the file of the first byte of `carry`.
    offset: u64,
    /// A line read only partly (its writer is mid-write).
    carry: Vec<u8>,
    /// Only lines whose last record is at or after this offset are output: what `tailLines`
    /// selected in the first file.
    threshold: u64,
    options: LogOptions,
    lines: [PendingLine; 2],
    out: Vec<u8>,
    remaining: Option<u64>,
    /// The byte limit is reached or the client went away.
    done: bool,
    sender: mpsc::Sender<Result<Bytes, LogReadError>>,
}

enum Wake {
    /// The directory changed; `writer_closed` when a writer closed the log file itself.
    Changed {
        writer_closed: bool,
    },
    /// The running flag changed or the grace period ended.
    Other,
    ClientGone,
}

impl Reader {
    async fn run(
        &mut self,
        mut watch: Option<DirectoryWatch>,
        mut running: watch::Receiver<bool>,
    ) -> Result<(), LogReadError> {
        let was_running = is_running(&running);
        let mut stop_at: Option<Instant> = None;
        loop {
            self.read_available().await?;
            if self.done || !self.options.follow {
                break;
            }
            if self.switch_if_rotated().await? {
                continue;
            }
            self.send_out().await;
            if self.done {
                return Ok(());
            }
            if !is_running(&running) {
                match stop_at {
                    None if !was_running => break,
                    None => stop_at = Some(Instant::now() + AFTER_EXIT_GRACE),
                    Some(at) if Instant::now() >= at => break,
                    Some(_) => {}
                }
            }
            let Some(watch) = watch.as_mut() else {
                break;
            };
            match watch
                .wait(&self.path, &mut running, &self.sender, stop_at)
                .await?
            {
                Wake::Changed { writer_closed } => {
                    if writer_closed && !is_running(&running) {
                        // The driver has exited: everything is in the file.
                        stop_at = Some(Instant::now());
                    }
                }
                Wake::Other => {}
                Wake::ClientGone => return Ok(()),
            }
        }
        self.finish().await;
        Ok(())
    }

    /// Reads and processes every complete line up to the end of the current file.
    async fn read_available(&mut self) -> Result<(), LogReadError> {
        while !self.done {
            let read = self
                .file
                .read_until(b'\n', &mut self.carry)
                .await
                .map_err(|source| LogReadError::Read {
                    path: self.path.clone(),
                    source,
                })?;
            if read == 0 || self.carry.last() != Some(&b'\n') {
                // End of file, possibly inside a line whose rest is not written yet.
                return Ok(());
            }
            let line = std::mem::take(&mut self.carry);
            self.process_line(self.offset, &line);
            self.offset += line.len() as u64;
            self.carry = line;
            self.carry.clear();
            if self.out.len() >= CHUNK {
                self.send_out().await;
            }
        }
        Ok(())
    }

    /// After a rotation the path names a new file: finishes the old one and opens the new.
    async fn switch_if_rotated(&mut self) -> Result<bool, LogReadError> {
        let Ok(meta) = tokio::fs::metadata(&self.path).await else {
            // Between the rename and the new file's creation; the creation wakes the watch.
            return Ok(false);
        };
        if (meta.dev(), meta.ino()) == self.identity {
            return Ok(false);
        }
        // The driver wrote its last record to the old file before renaming it.
        self.read_available().await?;
        self.take_carry();
        let file = match tokio::fs::File::open(&self.path).await {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(LogReadError::Open {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let meta = file.metadata().await.map_err(|source| LogReadError::Read {
            path: self.path.clone(),
            source,
        })?;
        self.identity = (meta.dev(), meta.ino());
        self.file = BufReader::with_capacity(CHUNK, file);
        self.offset = 0;
        self.threshold = 0;
        Ok(true)
    }

    /// The end: a last line without its newline is read as it is (as the kubelet does), and
    /// lines whose stream closed unfinished come out without a newline.
    async fn finish(&mut self) {
        self.take_carry();
        let mut unfinished: Vec<usize> = (0..self.lines.len())
            .filter(|&index| self.lines[index].first_timestamp.is_some())
            .collect();
        unfinished.sort_by_key(|&index| self.lines[index].last_offset);
        for index in unfinished {
            let offset = self.lines[index].last_offset;
            self.emit(index, offset, false);
        }
        self.send_out().await;
    }

    fn take_carry(&mut self) {
        if !self.carry.is_empty() {
            let line = std::mem::take(&mut self.carry);
            self.process_line(self.offset, &line);
            self.offset += line.len() as u64;
        }
    }

    fn process_line(&mut self, offset: u64, line: &[u8]) {
        if self.done {
            return;
        }
        // Lines that do not parse are skipped, as the kubelet skips them.
        let Ok(record) = parse_record(line) else {
            return;
        };
        if !self.options.streams.includes(record.stream) {
            return;
        }
        let index = record.stream.index();
        let pending = &mut self.lines[index];
        if pending.first_timestamp.is_none() {
            pending.first_timestamp = Some(record.timestamp);
        }
        pending.last_offset = offset;
        pending.content.extend_from_slice(record.content);
        match record.tag {
            Tag::Full => self.emit(index, offset, true),
            Tag::Partial if pending.content.len() >= MAX_PENDING_LINE => {
                self.emit(index, offset, false)
            }
            Tag::Partial => {}
        }
    }

    /// Outputs the pending line of a stream (or the piece of it held so far).
    fn emit(&mut self, index: usize, end_offset: u64, complete: bool) {
        let mut pending = std::mem::take(&mut self.lines[index]);
        let timestamp = pending
            .first_timestamp
            .expect("a pending line has a first record");
        let selected = pending.decided.unwrap_or_else(|| {
            end_offset >= self.threshold
                && self.options.since.is_none_or(|since| timestamp >= since)
        });
        if selected {
            if self.options.timestamps && pending.decided.is_none() {
                let mut prefix = Vec::with_capacity(31);
                write_timestamp(&mut prefix, timestamp);
                prefix.push(b' ');
                self.put(&prefix);
            }
            self.put(&pending.content);
            if complete {
                self.put(b"\n");
            }
        }
        if !complete {
            // The rest of an overlong line follows the decision taken for its start.
            pending.content.clear();
            pending.decided = Some(selected);
            self.lines[index] = pending;
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        if self.done {
            return;
        }
        let take = match self.remaining {
            Some(remaining) => bytes
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX)),
            None => bytes.len(),
        };
        self.out.extend_from_slice(&bytes[..take]);
        if let Some(remaining) = self.remaining.as_mut() {
            *remaining -= take as u64;
            if *remaining == 0 {
                self.done = true;
            }
        }
    }

    async fn send_out(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.out, Vec::with_capacity(CHUNK)));
        if self.sender.send(Ok(chunk)).await.is_err() {
            // The client went away.
            self.done = true;
        }
    }
}

/// Running, as far as the flag says: a sender that is gone means the container is gone.
fn is_running(running: &watch::Receiver<bool>) -> bool {
    *running.borrow() && running.has_changed().is_ok()
}

/// An inotify watch on the log's directory: it sees writes to the file, the rename of a
/// rotation, the creation of the new file and the driver closing the file, whichever file
/// the name points at.
///
/// A thread of its own blocks reading the inotify descriptor and wakes the follower through
/// a `Notify` (tokio can only poll a raw descriptor through `unsafe` registration). Dropping
/// the watch removes it, which wakes the thread with `IN_IGNORED` and ends it.
struct DirectoryWatch {
    inotify: Arc<Inotify>,
    descriptor: WatchDescriptor,
    shared: Arc<WatchShared>,
}

#[derive(Default)]
struct WatchShared {
    wake: Notify,
    /// A writer closed the log file itself (the driver exited) since the last wait.
    writer_closed: AtomicBool,
    stopping: AtomicBool,
    error: Mutex<Option<io::Error>>,
}

impl DirectoryWatch {
    fn new(path: &Path) -> Result<Self, LogReadError> {
        let watch_error = |source: io::Error| LogReadError::Watch {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let inotify = Arc::new(
            Inotify::init(InitFlags::IN_CLOEXEC).map_err(|errno| watch_error(errno.into()))?,
        );
        let descriptor = inotify
            .add_watch(
                dir,
                AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_MOVED_FROM
                    | AddWatchFlags::IN_DELETE
                    | AddWatchFlags::IN_CLOSE_WRITE,
            )
            .map_err(|errno| watch_error(errno.into()))?;
        let shared = Arc::new(WatchShared::default());
        let file_name = path.file_name().unwrap_or_default().to_owned();
        let thread_inotify = inotify.clone();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("log-follow".into())
            .spawn(move || watch_thread(&thread_inotify, &thread_shared, &file_name))
            .map_err(watch_error)?;
        Ok(Self {
            inotify,
            descriptor,
            shared,
        })
    }

    async fn wait(
        &mut self,
        path: &Path,
        running: &mut watch::Receiver<bool>,
        sender: &mpsc::Sender<Result<Bytes, LogReadError>>,
        stop_at: Option<Instant>,
    ) -> Result<Wake, LogReadError> {
        // A receiver whose sender is gone reports a change at once, forever.
        let flag_alive = running.has_changed().is_ok();
        tokio::select! {
            _ = self.shared.wake.notified() => {
                if let Some(source) = self.shared.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Err(LogReadError::Watch { path: path.to_path_buf(), source });
                }
                let writer_closed = self.shared.writer_closed.swap(false, Ordering::SeqCst);
                Ok(Wake::Changed { writer_closed })
            }
            _ = running.changed(), if flag_alive => Ok(Wake::Other),
            _ = sender.closed() => Ok(Wake::ClientGone),
            _ = tokio::time::sleep_until(stop_at.unwrap_or_else(Instant::now)), if stop_at.is_some() => {
                Ok(Wake::Other)
            }
        }
    }
}

impl Drop for DirectoryWatch {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Fails only when the kernel removed the watch already (the directory is gone), in
        // which case the thread got IN_IGNORED and ended.
        let _ = self.inotify.rm_watch(self.descriptor);
    }
}

fn watch_thread(inotify: &Inotify, shared: &WatchShared, file_name: &OsStr) {
    loop {
        match inotify.read_events() {
            Ok(events) => {
                if events.iter().any(|event| {
                    event.mask.contains(AddWatchFlags::IN_CLOSE_WRITE)
                        && event.name.as_deref() == Some(file_name)
                }) {
                    shared.writer_closed.store(true, Ordering::SeqCst);
                }
                let ignored = events
                    .iter()
                    .any(|event| event.mask.contains(AddWatchFlags::IN_IGNORED));
                if ignored || shared.stopping.load(Ordering::SeqCst) {
                    // Wake the follower a last time: with the directory gone nothing more
                    // will come, and a stopping follower does not care.
                    shared.wake.notify_one();
                    return;
                }
                shared.wake.notify_one();
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => {
                *shared.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(errno.into());
                shared.wake.notify_one();
                return;
            }
        }
    }
}

/// Where to start reading for the last `lines` lines (of the selected streams), and the
/// offset a line's last record must reach to be among them: `(start, threshold)`.
///
/// The file is read backwards from its last complete line. A line is its `P` records and the
/// `F` that ends it; the last record of a stream counts as a line end even when it is a `P`
/// (its stream closed mid-line, or the rest is not written yet). Records of the other stream
/// interleave, so reading goes on until every selected line's first record is found; lines
/// seen after `start` that end before `threshold` are not among the last `lines`.
pub(crate) fn tail_start(
    file: &File,
    len: u64,
    lines: u64,
    streams: StreamSelection,
) -> io::Result<(u64, u64)> {
    let mut backwards = LinesBackwards::new(file, len)?;
    let complete_len = backwards.complete_len();
    let mut start = complete_len;
    let mut threshold = complete_len;
    if lines == 0 {
        return Ok((start, threshold));
    }
    let mut ends = 0;
    let mut open = [false; 2];
    let mut seen = [false; 2];
    while let Some((offset, line)) = backwards.next_line()? {
        let Ok(record) = parse_record(&line) else {
            continue;
        };
        if !streams.includes(record.stream) {
            continue;
        }
        let index = record.stream.index();
        let is_end = record.tag == Tag::Full || !seen[index];
        seen[index] = true;
        if is_end {
            if ends == lines {
                // The end of a line before the selected ones: this stream's selected lines
                // all start after it.
                open[index] = false;
                if !open.contains(&true) {
                    break;
                }
                continue;
            }
            ends += 1;
            threshold = offset;
            open[index] = true;
            start = offset;
        } else if open[index] {
            start = offset;
        }
    }
    Ok((start, threshold))
}

/// The complete lines of a file from last to first, read in blocks.
struct LinesBackwards<'f> {
    file: &'f File,
    /// Offset of `buffer[0]` in the file.
    buffer_start: u64,
    /// File bytes from `buffer_start`, ending just after a newline (or empty).
    buffer: Vec<u8>,
}

const BACKWARDS_BLOCK: u64 = 64 * 1024;

impl<'f> LinesBackwards<'f> {
    fn new(file: &'f File, len: u64) -> io::Result<Self> {
        let mut lines = Self {
            file,
            buffer_start: len,
            buffer: Vec::new(),
        };
        // Drop a last line that has no newline yet: it is still being written.
        loop {
            if let Some(newline) = lines.buffer.iter().rposition(|&b| b == b'\n') {
                lines.buffer.truncate(newline + 1);
                break;
            }
            if lines.buffer_start == 0 {
                lines.buffer.clear();
                break;
            }
            lines.load_block()?;
        }
        Ok(lines)
    }

    fn complete_len(&self) -> u64 {
        self.buffer_start + self.buffer.len() as u64
    }

    fn load_block(&mut self) -> io::Result<()> {
        let size = BACKWARDS_BLOCK.min(self.buffer_start);
        let mut block = vec![0u8; size as usize];
        self.file
            .read_exact_at(&mut block, self.buffer_start - size)?;
        block.extend_from_slice(&self.buffer);
        self.buffer = block;
        self.buffer_start -= size;
        Ok(())
    }

    /// The previous line (without its newline) and its offset.
    fn next_line(&mut self) -> io::Result<Option<(u64, Vec<u8>)>> {
        if self.buffer.is_empty() {
            return Ok(None);
        }
        loop {
            let body = &self.buffer[..self.buffer.len() - 1];
            if let Some(newline) = body.iter().rposition(|&b| b == b'\n') {
                let line = body[newline + 1..].to_vec();
                let offset = self.buffer_start + newline as u64 + 1;
                self.buffer.truncate(newline + 1);
                return Ok(Some((offset, line)));
            }
            if self.buffer_start == 0 {
                let line = body.to_vec();
                self.buffer.clear();
                return Ok(Some((0, line)));
            }
            self.load_block()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::cri::encode_record;
    use futures::StreamExt as _;
    use std::io::Write as _;

    const STDOUT: Stream = Stream::Stdout;
    const STDERR: Stream = Stream::Stderr;
    const P: Tag = Tag::Partial;
    const F: Tag = Tag::Full;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + second).unwrap()
    }

    fn records(records: &[(i64, Stream, Tag, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(second, stream, tag, content) in records {
            encode_record(&mut out, at(second), stream, tag, content.as_bytes());
        }
        out
    }

    fn log_file(contents: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, contents).unwrap();
        (dir, path)
    }

    fn stopped() -> watch::Receiver<bool> {
        watch::channel(false).1
    }

    async fn collect(mut stream: LogStream) -> String {
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        String::from_utf8(out).unwrap()
    }

    async fn read(path: &Path, options: LogOptions) -> String {
        collect(read_logs(path, options, stopped()).await.unwrap()).await
    }

    /// A sample with interleaved streams and partial lines:
    /// stdout "one", stderr "e1", stdout "two-long" (in three parts, with a stderr line in
    /// between), stdout "three", stderr "e2" left unfinished.
    fn sample() -> Vec<u8> {
        records(&[
            (0, STDOUT, F, "one"),
            (1, STDERR, F, "e1"),
            (2, STDOUT, P, "two-"),
            (3, STDOUT, P, "lo"),
            (4, STDERR, F, "e-mid"),
            (5, STDOUT, F, "ng"),
            (6, STDOUT, F, "three"),
            (7, STDERR, P, "e2"),
        ])
    }

    #[tokio::test]
    async fn joins_partial_lines_and_keeps_unfinished_ones_unterminated() {
        let (_dir, path) = log_file(&sample());
        assert_eq!(
            read(&path, LogOptions::default()).await,
            "one\ne1\ne-mid\ntwo-long\nthree\ne2"
        );
    }

    #[tokio::test]
    async fn timestamps_prefix_each_line_with_its_first_part() {
        let (_dir, path) = log_file(&sample());
        let options = LogOptions {
            timestamps: true,
            streams: StreamSelection::Stdout,
            ..Default::default()
        };
        let expected = format!(
            "{} one\n{} two-long\n{} three\n",
            crate::logs::cri::format_timestamp(at(0)),
            crate::logs::cri::format_timestamp(at(2)),
            crate::logs::cri::format_timestamp(at(6)),
        );
        assert_eq!(read(&path, options).await, expected);
        assert!(expected.starts_with("2023-11-14T22:13:20.000000000Z one\n"));
    }

    #[tokio::test]
    async fn tail_counts_whole_lines_across_interleaving() {
        let (_dir, path) = log_file(&sample());
        let tail = |lines| LogOptions {
            tail_lines: Some(lines),
            ..Default::default()
        };
        assert_eq!(read(&path, tail(0)).await, "");
        assert_eq!(read(&path, tail(1)).await, "e2");
        assert_eq!(read(&path, tail(2)).await, "three\ne2");
        // The third-last line is "two-long", whose parts start before "e-mid" (fourth-last).
        assert_eq!(read(&path, tail(3)).await, "two-long\nthree\ne2");
        assert_eq!(read(&path, tail(4)).await, "e-mid\ntwo-long\nthree\ne2");
        assert_eq!(
            read(&path, tail(100)).await,
            "one\ne1\ne-mid\ntwo-long\nthree\ne2"
        );
        let stdout_tail = LogOptions {
            tail_lines: Some(2),
            streams: StreamSelection::Stdout,
            ..Default::default()
        };
        assert_eq!(read(&path, stdout_tail).await, "two-long\nthree\n");
    }

    #[tokio::test]
    async fn tail_reads_backwards_across_blocks() {
        let mut contents = Vec::new();
        for i in 0..5000 {
            encode_record(
                &mut contents,
                at(i),
                STDOUT,
                F,
                format!("line {i}").as_bytes(),
            );
        }
        assert!(contents.len() as u64 > 2 * BACKWARDS_BLOCK);
        let (_dir, path) = log_file(&contents);
        let options = LogOptions {
            tail_lines: Some(3000),
            ..Default::default()
        };
        let out = read(&path, options).await;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3000);
        assert_eq!(lines[0], "line 2000");
        assert_eq!(lines[2999], "line 4999");
    }

    #[tokio::test]
    async fn since_keeps_lines_started_at_or_after() {
        let (_dir, path) = log_file(&sample());
        let options = LogOptions {
            since: Some(at(3)),
            ..Default::default()
        };
        // "two-long" started at 2: out, although its last part is later.
        assert_eq!(read(&path, options).await, "e-mid\nthree\ne2");
    }

    #[tokio::test]
    async fn limit_bytes_cuts_the_output() {
        let (_dir, path) = log_file(&sample());
        let options = |limit| LogOptions {
            limit_bytes: Some(limit),
            ..Default::default()
        };
        assert_eq!(read(&path, options(6)).await, "one\ne1");
        assert_eq!(read(&path, options(1)).await, "o");
        let with_timestamps = LogOptions {
            timestamps: true,
            limit_bytes: Some(10),
            ..Default::default()
        };
        assert_eq!(read(&path, with_timestamps).await, "2023-11-14");
    }

    #[tokio::test]
    async fn bad_lines_are_skipped_and_a_torn_last_line_is_read() {
        let mut contents = records(&[(0, STDOUT, F, "a")]);
        contents.extend_from_slice(b"not a cri line\n");
        contents.extend_from_slice(&records(&[(1, STDERR, F, "b")]));
        // The writer was cut off mid-record (a full disk): what is there is read.
        let last = records(&[(2, STDOUT, F, "c")]);
        contents.extend_from_slice(&last[..last.len() - 1]);
        let (_dir, path) = log_file(&contents);
        assert_eq!(read(&path, LogOptions::default()).await, "a\nb\nc\n");
        // Cut inside its header, it cannot be parsed and is skipped.
        let (_dir, path) = log_file(&contents[..contents.len() - 5]);
        assert_eq!(read(&path, LogOptions::default()).await, "a\nb\n");
    }

    #[tokio::test]
    async fn a_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = read_logs(&dir.path().join("0.log"), LogOptions::default(), stopped())
            .await
            .unwrap_err();
        assert!(matches!(error, LogReadError::Open { .. }), "{error}");
        assert!(error.to_string().contains("0.log"));
    }

    async fn next_text(stream: &mut LogStream) -> String {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a chunk within 10 s")
            .expect("the stream goes on")
            .unwrap();
        String::from_utf8(chunk.to_vec()).unwrap()
    }

    /// Reads until `expected` has been seen whole (chunks may split it).
    async fn expect_text(stream: &mut LogStream, expected: &str) {
        let mut seen = String::new();
        while seen.len() < expected.len() {
            seen.push_str(&next_text(stream).await);
        }
        assert_eq!(seen, expected);
    }

    fn append(path: &Path, contents: &[u8]) {
        let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        file.write_all(contents).unwrap();
    }

    #[tokio::test]
    async fn follow_waits_for_new_lines_and_stops_when_the_container_stops() {
        let (_dir, path) = log_file(&records(&[(0, STDOUT, F, "old"), (1, STDOUT, F, "last")]));
        let (running, receiver) = watch::channel(true);
        let options = LogOptions {
            follow: true,
            tail_lines: Some(1),
            ..Default::default()
        };
        let mut stream = read_logs(&path, options, receiver).await.unwrap();
        expect_text(&mut stream, "last\n").await;

        append(&path, &records(&[(2, STDOUT, P, "new ")]));
        append(&path, &records(&[(3, STDOUT, F, "line")]));
        expect_text(&mut stream, "new line\n").await;

        // A record written in two pieces comes out once complete.
        let record = records(&[(4, STDERR, F, "torn")]);
        append(&path, &record[..10]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        append(&path, &record[10..]);
        expect_text(&mut stream, "torn\n").await;

        running.send(false).unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(10), collect(stream))
            .await
            .expect("the follow ends once the container stops");
        assert_eq!(rest, "");
    }

    #[tokio::test]
    async fn follow_reads_what_was_written_before_the_stop() {
        let (_dir, path) = log_file(b"");
        let (running, receiver) = watch::channel(true);
        let options = LogOptions {
            follow: true,
            ..Default::default()
        };
        let stream = read_logs(&path, options, receiver).await.unwrap();
        // The last words, and a stream closed mid-line, just as the container stops.
        append(
            &path,
            &records(&[(0, STDOUT, F, "bye"), (1, STDERR, P, "no newline")]),
        );
        running.send(false).unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(10), collect(stream))
            .await
            .unwrap();
        assert_eq!(rest, "bye\nno newline");
    }

    #[tokio::test]
    async fn follow_of_a_stopped_container_reads_to_the_end() {
        let (_dir, path) = log_file(&sample());
        let options = LogOptions {
            follow: true,
            ..Default::default()
        };
        let out = tokio::time::timeout(Duration::from_secs(5), read(&path, options))
            .await
            .expect("no waiting for a stopped container");
        assert_eq!(out, "one\ne1\ne-mid\ntwo-long\nthree\ne2");
    }

    #[tokio::test]
    async fn a_dropped_sender_means_stopped() {
        let (_dir, path) = log_file(&records(&[(0, STDOUT, F, "x")]));
        let (running, receiver) = watch::channel(true);
        let options = LogOptions {
            follow: true,
            ..Default::default()
        };
        let mut stream = read_logs(&path, options, receiver).await.unwrap();
        expect_text(&mut stream, "x\n").await;
        drop(running);
        let rest = tokio::time::timeout(Duration::from_secs(10), collect(stream))
            .await
            .unwrap();
        assert_eq!(rest, "");
    }

    #[tokio::test]
    async fn follow_goes_on_into_the_rotated_file() {
        let (dir, path) = log_file(&records(&[(0, STDOUT, F, "before")]));
        let (running, receiver) = watch::channel(true);
        let options = LogOptions {
            follow: true,
            ..Default::default()
        };
        let mut stream = read_logs(&path, options, receiver).await.unwrap();
        expect_text(&mut stream, "before\n").await;

        // What the driver does: last records to the old file, rename, new file.
        append(
            &path,
            &records(&[(1, STDOUT, P, "split "), (2, STDOUT, F, "old tail")]),
        );
        std::fs::rename(&path, dir.path().join("0.log.20240101-000000")).unwrap();
        std::fs::write(&path, records(&[(3, STDOUT, F, "after")])).unwrap();
        expect_text(&mut stream, "split old tail\nafter\n").await;

        // A partial line carried across the rotation is joined too.
        append(&path, &records(&[(4, STDERR, P, "across ")]));
        std::fs::rename(&path, dir.path().join("0.log.20240101-000001")).unwrap();
        std::fs::write(&path, records(&[(5, STDERR, F, "files")])).unwrap();
        expect_text(&mut stream, "across files\n").await;

        running.send(false).unwrap();
        assert_eq!(collect(stream).await, "");
    }

    #[tokio::test]
    async fn follow_through_a_symlink_watches_the_real_file() {
        let (dir, path) = log_file(&records(&[(0, STDOUT, F, "a")]));
        let links = dir.path().join("containers");
        std::fs::create_dir(&links).unwrap();
        let link = links.join("web_default_app-0123.log");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let (running, receiver) = watch::channel(true);
        let options = LogOptions {
            follow: true,
            ..Default::default()
        };
        let mut stream = read_logs(&link, options, receiver).await.unwrap();
        expect_text(&mut stream, "a\n").await;
        append(&path, &records(&[(1, STDOUT, F, "b")]));
        expect_text(&mut stream, "b\n").await;
        running.send(false).unwrap();
        assert_eq!(collect(stream).await, "");
    }
}
