//! The log file the driver appends CRI records to, rotated by size as the kubelet's
//! container log manager does: the full file is renamed to `<file>.<YYYYMMDD-HHMMSS>` and a
//! new one started; at most `max_files` files are kept, the current one included.
//!
//! Writing never fails towards the caller: a record that cannot be written is dropped and
//! counted, so the container's output keeps being read whatever the disk does.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jiff::Timestamp;

/// How long after a failed open the driver tries again (each try costs syscalls per record
/// otherwise, while the disk is full or the directory gone).
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct RotatingLogFile {
    path: PathBuf,
    max_size: u64,
    max_files: u32,
    file: Option<File>,
    size: u64,
    last_open_attempt: Option<Instant>,
    dropped_records: u64,
    last_error: Option<String>,
}

impl RotatingLogFile {
    /// Opens (creating it and its directory) the log file for appending. A failure is not an
    /// error: records are dropped until a later attempt succeeds.
    pub fn open(path: &Path, max_size: u64, max_files: u32) -> Self {
        let mut log = Self {
            path: path.to_path_buf(),
            max_size,
            max_files,
            file: None,
            size: 0,
            last_open_attempt: None,
            dropped_records: 0,
            last_error: None,
        };
        log.try_open();
        log
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records dropped because they could not be written.
    pub fn dropped_records(&self) -> u64 {
        self.dropped_records
    }

    /// The last write, open or rotation failure, if any.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Appends whole records: `data` holds them back to back and `record_ends` the offset
    /// just past each. The file is rotated between records, never inside one.
    pub fn write_records(&mut self, data: &[u8], record_ends: &[usize]) {
        let mut chunk_start = 0;
        let mut chunk_end = 0;
        for &end in record_ends {
            let record_len = (end - chunk_end) as u64;
            let written_and_chunk = self.size + (chunk_end - chunk_start) as u64;
            if written_and_chunk > 0 && written_and_chunk + record_len > self.max_size {
                self.write_chunk(
                    &data[chunk_start..chunk_end],
                    chunk_records(record_ends, chunk_start, chunk_end),
                );
                self.rotate();
                chunk_start = chunk_end;
            }
            chunk_end = end;
        }
        self.write_chunk(
            &data[chunk_start..chunk_end],
            chunk_records(record_ends, chunk_start, chunk_end),
        );
    }

    fn write_chunk(&mut self, chunk: &[u8], records: u64) {
        if chunk.is_empty() {
            return;
        }
        if self.file.is_none() {
            let due = self
                .last_open_attempt
                .is_none_or(|at| at.elapsed() >= REOPEN_INTERVAL);
            if due {
                self.try_open();
            }
        }
        let Some(file) = self.file.as_mut() else {
            self.dropped_records += records;
            return;
        };
        // One write per chunk with O_APPEND: a reader sees whole records or a torn last one
        // that it reads again once complete.
        match file.write_all(chunk) {
            Ok(()) => self.size += chunk.len() as u64,
            Err(error) => {
                // The file may have been written partly; its real size decides rotation.
                if let Ok(meta) = file.metadata() {
                    self.size = meta.len();
                }
                self.dropped_records += records;
                self.note_error(format!("write {}: {error}", self.path.display()));
            }
        }
    }

    fn try_open(&mut self) {
        self.last_open_attempt = Some(Instant::now());
        match open_append(&self.path) {
            Ok(file) => {
                self.size = file.metadata().map(|m| m.len()).unwrap_or(0);
                self.file = Some(file);
            }
            Err(error) => {
                self.file = None;
                self.note_error(format!("open {}: {error}", self.path.display()));
            }
        }
    }

    /// Renames the current file aside, starts a new one and removes the oldest rotated files
    /// beyond `max_files`.
    fn rotate(&mut self) {
        // Nothing is written to the old file after its rename: a reader that follows the log
        // drains the old file to its end and then switches to the new one.
        let newest_rotated = rotated_files(&self.path)
            .ok()
            .and_then(|mut rotated| rotated.pop());
        let rotated = rotated_name(&self.path, Timestamp::now(), newest_rotated.as_deref());
        if let Err(error) = std::fs::rename(&self.path, &rotated) {
            self.note_error(format!(
                "rotate {} to {}: {error}",
                self.path.display(),
                rotated.display()
            ));
            // Try again after another max_size bytes rather than on every record.
            self.size = 0;
            return;
        }
        self.file = None;
        self.size = 0;
        self.try_open();
        if let Err(error) = remove_excess_rotated(&self.path, self.max_files) {
            self.note_error(format!(
                "remove old rotated logs of {}: {error}",
                self.path.display()
            ));
        }
    }

    fn note_error(&mut self, message: String) {
        // The driver's stderr is the shim's (usually /dev/null): report once per new error.
        if self.last_error.as_deref() != Some(message.as_str()) {
            eprintln!("skiff-agent log-driver: {message}");
        }
        self.last_error = Some(message);
    }
}

fn chunk_records(record_ends: &[usize], chunk_start: usize, chunk_end: usize) -> u64 {
    record_ends
        .iter()
        .filter(|&&end| end > chunk_start && end <= chunk_end)
        .count() as u64
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// `<file>.<YYYYMMDD-HHMMSS>`, the kubelet's name for a rotated log. When that name would not
/// sort after the newest rotated file (a second rotation within the same second), the
/// nanoseconds are added (`.<nnnnnnnnn>`, fixed width), so that names always sort in rotation
/// order and the oldest file is the one removed.
pub(crate) fn rotated_name(path: &Path, now: Timestamp, newest_rotated: Option<&Path>) -> PathBuf {
    let civil = jiff::tz::Offset::UTC.to_datetime(now);
    let stamp = format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        civil.year(),
        civil.month(),
        civil.day(),
        civil.hour(),
        civil.minute(),
        civil.second()
    );
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(&stamp);
    let candidate = PathBuf::from(&name);
    if newest_rotated.is_none_or(|newest| candidate.as_path() > newest) {
        return candidate;
    }
    name.push(format!(".{:09}", civil.subsec_nanosecond()));
    PathBuf::from(name)
}

/// The rotated files of `path`, oldest first.
pub(crate) fn rotated_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(base)) = (path.parent(), path.file_name()) else {
        return Ok(Vec::new());
    };
    let mut prefix = base.to_owned();
    prefix.push(".");
    let prefix = prefix.as_encoded_bytes().to_vec();
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.as_encoded_bytes();
            name.starts_with(&prefix) && !name.ends_with(b".tmp")
        })
        .map(|entry| entry.path())
        .collect();
    rotated.sort();
    Ok(rotated)
}

fn remove_excess_rotated(path: &Path, max_files: u32) -> io::Result<()> {
    let keep = max_files.saturating_sub(1) as usize;
    let rotated = rotated_files(path)?;
    let excess = rotated.len().saturating_sub(keep);
    for old in &rotated[..excess] {
        match std::fs::remove_file(old) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(lines: &[&str]) -> (Vec<u8>, Vec<usize>) {
        let mut data = Vec::new();
        let mut ends = Vec::new();
        for line in lines {
            data.extend_from_slice(line.as_bytes());
            data.push(b'\n');
            ends.push(data.len());
        }
        (data, ends)
    }

    #[test]
    fn rotates_by_size_and_keeps_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app").join("0.log");
        let mut log = RotatingLogFile::open(&path, 100, 3);
        // 30 records of 20 bytes (19 + newline): 5 per file, so 6 files' worth.
        for i in 0..30 {
            let line = format!("record-{i:03}-xxxxxxxx");
            assert_eq!(line.len(), 19);
            let (data, ends) = records(&[&line]);
            log.write_records(&data, &ends);
        }
        assert_eq!(log.dropped_records(), 0);
        let rotated = rotated_files(&path).unwrap();
        assert_eq!(rotated.len(), 2, "{rotated:?}");
        let current = std::fs::read_to_string(&path).unwrap();
        assert_eq!(current.lines().count(), 5);
        assert!(current.starts_with("record-025"));
        // The kept rotated files are the newest, in name order.
        let newest_rotated = std::fs::read_to_string(&rotated[1]).unwrap();
        assert!(newest_rotated.starts_with("record-020"), "{newest_rotated}");
        let older = std::fs::read_to_string(&rotated[0]).unwrap();
        assert!(older.starts_with("record-015"), "{older}");
        for file in rotated.iter().chain([&path]) {
            assert!(std::fs::metadata(file).unwrap().len() <= 100);
        }
        // Files of other restarts of the container are not this log's rotations.
        std::fs::write(dir.path().join("app").join("1.log"), "x").unwrap();
        assert_eq!(rotated_files(&path).unwrap().len(), 2);
    }

    #[test]
    fn rotates_between_records_of_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log = RotatingLogFile::open(&path, 25, 10);
        let (data, ends) = records(&["aaaaaaaaa", "bbbbbbbbb", "ccccccccc", "ddddddddd"]);
        log.write_records(&data, &ends);
        let rotated = rotated_files(&path).unwrap();
        assert_eq!(rotated.len(), 1);
        assert_eq!(
            std::fs::read_to_string(&rotated[0]).unwrap(),
            "aaaaaaaaa\nbbbbbbbbb\n"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "ccccccccc\nddddddddd\n"
        );
    }

    #[test]
    fn one_file_means_no_rotated_copies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log = RotatingLogFile::open(&path, 10, 1);
        for _ in 0..5 {
            let (data, ends) = records(&["0123456789"]);
            log.write_records(&data, &ends);
        }
        assert!(rotated_files(&path).unwrap().is_empty());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0123456789\n");
    }

    #[test]
    fn unwritable_path_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where the directory should be: open fails, even for root.
        let blocker = dir.path().join("pod");
        std::fs::write(&blocker, "").unwrap();
        let path = blocker.join("app").join("0.log");
        let mut log = RotatingLogFile::open(&path, 1000, 2);
        let (data, ends) = records(&["one", "two"]);
        log.write_records(&data, &ends);
        log.write_records(&data, &ends);
        assert_eq!(log.dropped_records(), 4);
        assert!(log.last_error().unwrap().contains("0.log"));
        // Once the path is usable again, writing resumes (after the retry interval).
        std::fs::remove_file(&blocker).unwrap();
        log.last_open_attempt = Some(Instant::now() - REOPEN_INTERVAL);
        log.write_records(&data, &ends);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        assert_eq!(log.dropped_records(), 4);
    }

    #[test]
    fn rotated_names_sort_in_rotation_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let now: Timestamp = "2024-03-01T10:20:30.000000042Z".parse().unwrap();
        let first = rotated_name(&path, now, None);
        assert_eq!(first, dir.path().join("0.log.20240301-102030"));
        let second = rotated_name(&path, now, Some(&first));
        assert_eq!(second, dir.path().join("0.log.20240301-102030.000000042"));
        // Even when the plain name of that second is gone (removed as the oldest), a later
        // rotation in that second sorts after the newest.
        let later: Timestamp = "2024-03-01T10:20:30.5Z".parse().unwrap();
        let third = rotated_name(&path, later, Some(&second));
        assert_eq!(third, dir.path().join("0.log.20240301-102030.500000000"));
        let next_second = rotated_name(
            &path,
            "2024-03-01T10:20:31Z".parse().unwrap(),
            Some(&second),
        );
        assert_eq!(next_second, dir.path().join("0.log.20240301-102031"));
        let mut names = vec![
            next_second.clone(),
            third.clone(),
            second.clone(),
            first.clone(),
        ];
        names.sort();
        assert_eq!(names, vec![first, second, third, next_second]);
    }
}
