//! Container logs in the CRI format: where they live, the log driver containerd's shim runs
//! for each container, rotation, and reading them back for `kubectl logs`.
//!
//! - [`cri`]: the record format and how raw output is cut into records.
//! - `writer`: the size-rotated file the driver appends to.
//! - `driver`: `skiff-agent log-driver`, started by the shim through [`driver_uri`].
//! - [`reader`]: [`read_logs`], with the kubelet's options and inotify-driven `follow`.
//!
//! **Architecture invariant:** the driver knows nothing of the agent: it is configured by its
//! one argument, survives the agent's restarts, and never stops reading the container's
//! output (what it cannot write it drops and counts).

pub mod cri;
mod driver;
pub mod reader;
mod writer;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};

use clap::builder::TypedValueParser as _;

pub use cri::Stream;
pub use reader::{LogOptions, LogReadError, LogStream, StreamSelection, read_logs};

/// The directory of a pod's logs: `<root>/<namespace>_<name>_<uid>`, as the kubelet lays it out.
pub fn pod_log_dir(root: &Path, namespace: &str, name: &str, uid: &str) -> PathBuf {
    root.join(format!("{namespace}_{name}_{uid}"))
}

/// The log of one run of a container: `<pod dir>/<container>/<restartCount>.log`.
pub fn container_log_path(
    root: &Path,
    namespace: &str,
    name: &str,
    uid: &str,
    container: &str,
    restart_count: u32,
) -> PathBuf {
    pod_log_dir(root, namespace, name, uid)
        .join(container)
        .join(format!("{restart_count}.log"))
}

/// The log file the driver writes and how it rotates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogDriverSpec {
    pub path: PathBuf,
    /// Rotate once the file would grow past this many bytes.
    pub max_size: u64,
    /// Files kept, the current one included.
    pub max_files: u32,
}

impl LogDriverSpec {
    /// The driver's one argument: `max-size=<bytes>,max-files=<n>,path=<file>`. The path
    /// comes last and runs to the end, so it may hold any byte but NUL.
    pub fn to_arg(&self) -> OsString {
        let mut arg = format!(
            "max-size={},max-files={},path=",
            self.max_size, self.max_files
        )
        .into_bytes();
        arg.extend_from_slice(self.path.as_os_str().as_bytes());
        OsString::from_vec(arg)
    }

    pub fn parse(arg: OsString) -> Result<Self, String> {
        let mut rest = arg.as_bytes();
        let mut max_size = None;
        let mut max_files = None;
        loop {
            let (field, tail) = match rest.iter().position(|&b| b == b'=') {
                Some(eq) => (&rest[..eq], &rest[eq + 1..]),
                None => return Err(format!("expected key=value in {arg:?}")),
            };
            if field == b"path" {
                if tail.is_empty() {
                    return Err("empty path".to_string());
                }
                let path = PathBuf::from(OsStr::from_bytes(tail));
                return Ok(Self {
                    path,
                    max_size: max_size.ok_or("max-size is missing")?,
                    max_files: max_files.ok_or("max-files is missing")?,
                });
            }
            let (value, tail) = match tail.iter().position(|&b| b == b',') {
                Some(comma) => (&tail[..comma], &tail[comma + 1..]),
                None => (tail, &b""[..]),
            };
            let value = std::str::from_utf8(value).map_err(|_| "non-UTF-8 value")?;
            match field {
                b"max-size" => {
                    max_size = Some(
                        value
                            .parse::<u64>()
                            .map_err(|e| format!("max-size {value:?}: {e}"))?,
                    );
                }
                b"max-files" => {
                    max_files = Some(
                        value
                            .parse::<u32>()
                            .map_err(|e| format!("max-files {value:?}: {e}"))?,
                    );
                }
                other => {
                    return Err(format!(
                        "unknown field {:?}",
                        String::from_utf8_lossy(other)
                    ));
                }
            }
            if tail.is_empty() {
                return Err("path is missing".to_string());
            }
            rest = tail;
        }
    }
}

/// Arguments of `skiff-agent log-driver`.
#[derive(clap::Args, Debug)]
pub struct LogDriverArgs {
    /// `max-size=<bytes>,max-files=<n>,path=<file>` (the path last): the one argument a
    /// `binary://` log URI passes (containerd turns each query pair into `key value`).
    #[arg(value_parser = clap::builder::OsStringValueParser::new().try_map(LogDriverSpec::parse))]
    pub spec: LogDriverSpec,
}

/// Runs the log driver until the container's stdout and stderr close.
pub fn run_log_driver(args: LogDriverArgs) -> anyhow::Result<()> {
    driver::run(&args.spec)
}

/// The `binary://` log URI that makes containerd's shim run `<agent_binary> log-driver
/// <spec>` with the container's output. Pass it as both the task's stdout and stderr.
///
/// containerd turns every query pair into two arguments in Go map order (random), so the
/// URI has exactly one pair: `log-driver=<spec>`, percent-encoded.
pub fn driver_uri(agent_binary: &Path, log_path: &Path, max_size: u64, max_files: u32) -> String {
    let spec = LogDriverSpec {
        path: log_path.to_path_buf(),
        max_size,
        max_files,
    };
    format!(
        "binary://{}?log-driver={}",
        percent_encode(agent_binary.as_os_str().as_bytes(), true),
        percent_encode(spec.to_arg().as_bytes(), false)
    )
}

/// Percent-encodes all but RFC 3986's unreserved characters (and `/` in a path). Go's
/// `url.Parse` decodes it back to the same bytes, in the path and in the query (where `+`
/// would mean a space, so it is encoded too).
fn percent_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &byte in bytes {
        let plain = byte.is_ascii_alphanumeric()
            || matches!(byte, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && byte == b'/');
        if plain {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    /// What containerd does with a `binary://` URI (Go's `url.Parse` and `Query()`, then
    /// `NewBinaryCmd`): the program path and its arguments.
    fn containerd_argv(uri: &str) -> (PathBuf, Vec<OsString>) {
        fn decode(text: &str, plus_is_space: bool) -> Vec<u8> {
            let bytes = text.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                match bytes[i] {
                    b'%' => {
                        let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                        out.push(u8::from_str_radix(hex, 16).unwrap());
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
        let rest = uri.strip_prefix("binary://").expect("binary scheme");
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        assert!(!query.contains(';'), "Go rejects ';' in a query");
        let mut argv = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            argv.push(OsString::from_vec(decode(key, true)));
            argv.push(OsString::from_vec(decode(value, true)));
        }
        (PathBuf::from(OsString::from_vec(decode(path, false))), argv)
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(clap::Subcommand)]
    enum Command {
        LogDriver(LogDriverArgs),
    }

    #[test]
    fn layout_is_the_kubelets() {
        let root = Path::new("/var/log/pods");
        assert_eq!(
            pod_log_dir(root, "default", "web-1", "1234-abcd"),
            Path::new("/var/log/pods/default_web-1_1234-abcd")
        );
        assert_eq!(
            container_log_path(root, "default", "web-1", "1234-abcd", "nginx", 3),
            Path::new("/var/log/pods/default_web-1_1234-abcd/nginx/3.log")
        );
    }

    #[test]
    fn uri_round_trips_through_containerd_argv() {
        let binary = Path::new("/opt/skiff dir/bin/skiff-agent+x");
        let log = Path::new("/var/log/pods/ns_p,o d%_uid/c&=?#;/0.log");
        let uri = driver_uri(binary, log, 10 * 1024 * 1024, 5);
        assert!(uri.starts_with("binary:///opt/skiff%20dir/bin/skiff-agent%2Bx?log-driver="));
        let (program, argv) = containerd_argv(&uri);
        assert_eq!(program, binary);
        assert_eq!(argv.len(), 2, "one key, one value: {argv:?}");
        let mut full = vec![OsString::from("skiff-agent")];
        full.extend(argv);
        let cli = Cli::try_parse_from(full).expect("the driver parses its URI's argv");
        let Command::LogDriver(args) = cli.command;
        assert_eq!(
            args.spec,
            LogDriverSpec {
                path: log.to_path_buf(),
                max_size: 10 * 1024 * 1024,
                max_files: 5
            }
        );
    }

    #[test]
    fn non_utf8_paths_survive() {
        let log = PathBuf::from(OsString::from_vec(b"/tmp/\xff\xfe/0.log".to_vec()));
        let (_, argv) = containerd_argv(&driver_uri(Path::new("/a"), &log, 1, 2));
        assert_eq!(LogDriverSpec::parse(argv[1].clone()).unwrap().path, log);
    }

    #[test]
    fn bad_specs_are_refused() {
        for bad in [
            "",
            "path=",
            "max-size=1,path=/x",
            "max-files=1,path=/x",
            "max-size=x,max-files=1,path=/x",
            "max-size=1,max-files=1",
            "color=red,max-size=1,max-files=1,path=/x",
        ] {
            assert!(LogDriverSpec::parse(bad.into()).is_err(), "{bad:?}");
        }
        let spec = LogDriverSpec::parse("max-files=2,max-size=7,path=/a,b=c".into()).unwrap();
        assert_eq!(
            (spec.path, spec.max_size, spec.max_files),
            (PathBuf::from("/a,b=c"), 7, 2)
        );
    }
}
