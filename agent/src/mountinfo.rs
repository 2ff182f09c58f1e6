//! `/proc/<pid>/mountinfo` (proc(5)): the one parser the agent uses to find the cgroup2
//! mount, the mounts under a pod's directory, and whether a path is a mount point.

use std::path::{Path, PathBuf};

/// One line: `id parent major:minor root mount-point options [optional...] - fstype source
/// super-options`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The path inside the mounted filesystem that is mounted (`/` mostly).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fstype: String,
}

/// Parses one line; `None` for a malformed one.
pub fn parse_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').filter(|f| !f.is_empty()).collect();
    let separator = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    Some(MountEntry {
        root: PathBuf::from(unescape(fields.get(3)?)),
        mount_point: PathBuf::from(unescape(fields.get(4)?)),
        fstype: (*fields.get(separator + 1)?).to_string(),
    })
}

/// Every well-formed line of a mountinfo text.
pub fn parse(text: &str) -> impl Iterator<Item = MountEntry> + '_ {
    text.lines().filter_map(parse_line)
}

/// The mount points at or below `dir`.
pub fn mounts_under(text: &str, dir: &Path) -> Vec<PathBuf> {
    parse(text)
        .map(|entry| entry.mount_point)
        .filter(|mount_point| mount_point.starts_with(dir))
        .collect()
}

/// Whether `path` is a mount point in this process's mount namespace.
pub fn is_mount_point(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|text| parse(&text).any(|entry| entry.mount_point == path))
}

/// The kernel writes space, tab, newline and backslash in mountinfo paths as `\040`,
/// `\011`, `\012` and `\134`.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
25 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
32 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw
40 25 0:4 net:[4026532182] /run/skiff/pods/u\\0401/ns/net rw shared:4 - nsfs nsfs rw
";

    #[test]
    fn lines_parse_with_escapes() {
        let entries: Vec<MountEntry> = parse(TEXT).collect();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].fstype, "cgroup2");
        assert_eq!(entries[1].mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(
            entries[2].mount_point,
            Path::new("/run/skiff/pods/u 1/ns/net")
        );
        assert_eq!(entries[2].root, Path::new("net:[4026532182]"));
        assert_eq!(
            mounts_under(TEXT, Path::new("/run/skiff/pods")),
            [PathBuf::from("/run/skiff/pods/u 1/ns/net")]
        );
        assert!(parse_line("garbage").is_none());
    }
}
