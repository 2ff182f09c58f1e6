//! What every `cargo xtask bench` shares: percentiles, verdicts, a child process killed on
//! drop, a response checked for success, CPU time of a process.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Linux's `USER_HZ`: the unit of the CPU times in `/proc/<pid>/stat` and `/proc/stat`.
pub const TICKS_PER_SECOND: f64 = 100.0;

/// Nearest-rank percentile of sorted `values` (zero when there are none).
pub fn percentile(sorted: &[Duration], percent: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Nearest-rank percentile of sorted `values`, in milliseconds (NaN when there are none, so
/// an empty phase never reads as a fast one).
pub fn percentile_ms(sorted: &[Duration], percent: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    ms(percentile(sorted, percent))
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// How a figure compares with its target, as the benches print it.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

/// Reads the whole response and fails, with the body, unless its status is a success.
pub async fn expect_success(response: reqwest::Response, what: &str) -> anyhow::Result<Vec<u8>> {
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("{what}: read the response"))?;
    anyhow::ensure!(
        status.is_success(),
        "{what}: {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(body.to_vec())
}

/// [`expect_success`], then the body decoded as JSON.
pub async fn expect_json(
    response: reqwest::Response,
    what: &str,
) -> anyhow::Result<serde_json::Value> {
    let body = expect_success(response, what).await?;
    serde_json::from_slice(&body).with_context(|| format!("{what}: decode the response"))
}

/// User plus system CPU seconds `pid` has used so far (0 when unreadable).
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after "(comm)" start at field 3 (state); utime is field 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / TICKS_PER_SECOND
}

/// A child process killed on drop, with its stdout lines forwarded to a channel and its
/// stderr written to a log file.
pub struct Process {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Process {
    pub fn start(command: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let log_file =
            fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("start {command:?}"))?;
        let stdout = child.stdout.take().context("child's stdout")?;
        let (sender, lines) = std::sync::mpsc::channel();
        // Keeps draining stdout so that the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        Ok(Self { child, lines })
    }

    /// Waits for a stdout line starting with `prefix` and returns the rest of it.
    pub fn wait_for_line(
        &self,
        prefix: &str,
        timeout: Duration,
        log: &Path,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_string());
                    }
                }
                Err(_) => anyhow::bail!(
                    "no {prefix:?} line within {} s; see {}",
                    timeout.as_secs(),
                    log.display()
                ),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&values, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 99.0), Duration::ZERO);
        assert!(percentile_ms(&[], 50.0).is_nan());
        assert_eq!(percentile_ms(&values, 100.0), 100.0);
    }

    #[test]
    fn cpu_seconds_are_read_from_proc() {
        // Burns CPU until /proc shows some: a parse that always gave 0 would never end.
        let mut spins = 0u64;
        while process_cpu_seconds(std::process::id()) == 0.0 {
            spins = std::hint::black_box(spins + 1);
        }
        assert_eq!(process_cpu_seconds(u32::MAX), 0.0, "no such process");
    }
}
