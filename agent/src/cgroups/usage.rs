//! Usage read from the cgroup's own files (`cpu.stat`, `memory.current`,
//! `memory.events`, `pids.current`): the agent's only collector. A file that does not
//! exist (its controller is not enabled there) is `None`, not an error.

use std::path::Path;

use super::CgroupError;
use super::fs::{CgroupFs, read_optional};

/// `cpu.stat`. The three usage counters exist in every cgroup; the throttling ones only
/// where the `cpu` controller is enabled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuStat {
    pub usage_usec: u64,
    pub user_usec: u64,
    pub system_usec: u64,
    pub nr_periods: Option<u64>,
    pub nr_throttled: Option<u64>,
    pub throttled_usec: Option<u64>,
}

/// The OOM counters of `memory.events` (this cgroup and its descendants).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    /// Times the cgroup hit its memory limit and the OOM killer was considered.
    pub oom: u64,
    /// Processes the OOM killer killed in it.
    pub oom_kill: u64,
}

/// What a pod or container cgroup has used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu: Option<CpuStat>,
    /// `memory.current`, in bytes.
    pub memory_current: Option<u64>,
    pub memory_events: Option<MemoryEvents>,
    /// `pids.current`.
    pub pids_current: Option<u64>,
}

/// `key value` lines, as `cpu.stat` and `memory.events` hold them.
fn flat_keyed(text: &str) -> impl Iterator<Item = (&str, Option<u64>)> {
    text.lines().filter_map(|line| {
        let (key, value) = line.split_once(' ')?;
        Some((key, value.trim().parse().ok()))
    })
}

/// Parses the text of `cpu.stat`; `None` when a usage counter is missing.
pub fn parse_cpu_stat(text: &str) -> Option<CpuStat> {
    let (mut usage, mut user, mut system) = (None, None, None);
    let mut stat = CpuStat::default();
    for (key, value) in flat_keyed(text) {
        match key {
            "usage_usec" => usage = value,
            "user_usec" => user = value,
            "system_usec" => system = value,
            "nr_periods" => stat.nr_periods = value,
            "nr_throttled" => stat.nr_throttled = value,
            "throttled_usec" => stat.throttled_usec = value,
            _ => {}
        }
    }
    stat.usage_usec = usage?;
    stat.user_usec = user?;
    stat.system_usec = system?;
    Some(stat)
}

/// Parses the text of `memory.events`; `None` when the OOM counters are missing.
pub fn parse_memory_events(text: &str) -> Option<MemoryEvents> {
    let (mut oom, mut oom_kill) = (None, None);
    for (key, value) in flat_keyed(text) {
        match key {
            "oom" => oom = value,
            "oom_kill" => oom_kill = value,
            _ => {}
        }
    }
    Some(MemoryEvents {
        oom: oom?,
        oom_kill: oom_kill?,
    })
}

fn parse_or_error<T>(
    dir: &Path,
    file: &str,
    text: Option<String>,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, CgroupError> {
    text.map(|text| {
        parse(&text).ok_or_else(|| CgroupError::Parse {
            path: dir.join(file),
            what: format!("unexpected content {:?}", text.trim_end()),
        })
    })
    .transpose()
}

/// Reads the usage files of the cgroup at `dir`, which must exist.
pub(crate) fn read_usage(fs: &dyn CgroupFs, dir: &Path) -> Result<Usage, CgroupError> {
    if !fs.is_dir(dir) {
        return Err(CgroupError::io(
            "read usage of",
            dir,
            std::io::Error::from_raw_os_error(nix::errno::Errno::ENOENT as i32),
        ));
    }
    let number = |text: &str| text.trim().parse::<u64>().ok();
    Ok(Usage {
        cpu: parse_or_error(
            dir,
            "cpu.stat",
            read_optional(fs, &dir.join("cpu.stat"))?,
            parse_cpu_stat,
        )?,
        memory_current: parse_or_error(
            dir,
            "memory.current",
            read_optional(fs, &dir.join("memory.current"))?,
            number,
        )?,
        memory_events: parse_or_error(
            dir,
            "memory.events",
            read_optional(fs, &dir.join("memory.events"))?,
            parse_memory_events,
        )?,
        pids_current: parse_or_error(
            dir,
            "pids.current",
            read_optional(fs, &dir.join("pids.current"))?,
            number,
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_stat_without_the_cpu_controller() {
        // A cgroup of the hybrid development machines' v2 mount.
        let text = "usage_usec 1520\nuser_usec 1000\nsystem_usec 520\nnice_usec 0\n";
        let stat = parse_cpu_stat(text).unwrap();
        assert_eq!(
            (stat.usage_usec, stat.user_usec, stat.system_usec),
            (1520, 1000, 520)
        );
        assert_eq!(
            (stat.nr_periods, stat.nr_throttled, stat.throttled_usec),
            (None, None, None)
        );
    }

    #[test]
    fn cpu_stat_with_the_cpu_controller() {
        let text = "usage_usec 90000\nuser_usec 80000\nsystem_usec 10000\n\
                    core_sched.force_idle_usec 0\nnr_periods 120\nnr_throttled 37\n\
                    throttled_usec 455123\nnr_bursts 0\nburst_usec 0\n";
        let stat = parse_cpu_stat(text).unwrap();
        assert_eq!(stat.nr_periods, Some(120));
        assert_eq!(stat.nr_throttled, Some(37));
        assert_eq!(stat.throttled_usec, Some(455_123));
        assert_eq!(parse_cpu_stat("nr_periods 1\n"), None);
    }

    #[test]
    fn memory_events_oom_counters() {
        let text = "low 0\nhigh 12\nmax 40\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(
            parse_memory_events(text),
            Some(MemoryEvents {
                oom: 2,
                oom_kill: 1
            })
        );
        assert_eq!(parse_memory_events("low 0\n"), None);
    }
}
