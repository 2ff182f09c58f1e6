//! The exec protocol: finding a plugin's executable in the bin directories, its `CNI_*`
//! environment, running it with the configuration on stdin and a time limit, and turning a
//! failure into the plugin's error object (code, msg, details) or the exec failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::Attachment;
use super::error::{CniError, Command, PluginCall};

/// Every variable of the protocol; the ones a verb does not set are removed from the
/// environment the plugin inherits, so an agent started from a plugin's shell cannot leak
/// its own.
const CNI_VARIABLES: &[&str] = &[
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

/// How many times a spawn that hits ETXTBSY is tried: a plugin binary being replaced, or
/// a fork elsewhere in the process that briefly holds a freshly written file open.
const SPAWN_ATTEMPTS: u32 = 5;

/// The most of a plugin's output an error message quotes.
const MAX_QUOTED_OUTPUT: usize = 4096;

/// `CNI_ARGS`: `KEY=VALUE` pairs joined by `;`. A key or value that would change the
/// meaning of the string (`;` anywhere, `=` or nothing in a key) is refused.
pub fn format_cni_args(args: &[(String, String)]) -> Result<String, CniError> {
    let mut out = Vec::with_capacity(args.len());
    for (key, value) in args {
        if key.is_empty() || key.contains(['=', ';']) || value.contains(';') {
            return Err(CniError::InvalidAttachment {
                reason: format!("CNI_ARGS pair {key:?}={value:?} cannot be encoded"),
            });
        }
        out.push(format!("{key}={value}"));
    }
    Ok(out.join(";"))
}

/// The executable for `plugin`: the first regular file of that name in `bin_dirs`.
pub(crate) fn find_plugin(plugin: &str, bin_dirs: &[PathBuf]) -> Option<PathBuf> {
    bin_dirs
        .iter()
        .map(|dir| dir.join(plugin))
        .find(|path| path.metadata().is_ok_and(|m| m.is_file()))
}

fn search_path(bin_dirs: &[PathBuf]) -> String {
    bin_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// The `CNI_*` variables of one invocation. ADD, CHECK and DEL name an attachment;
/// STATUS, GC and VERSION only the command and the plugin path. `netns` is what
/// `CNI_NETNS` says (empty for a DEL whose namespace is gone).
pub(crate) fn plugin_env(
    command: Command,
    attachment: Option<&Attachment>,
    netns: &str,
    bin_dirs: &[PathBuf],
) -> Result<Vec<(&'static str, String)>, CniError> {
    let mut env = vec![("CNI_COMMAND", command.as_str().to_owned())];
    if let Some(attachment) = attachment {
        env.push(("CNI_CONTAINERID", attachment.container_id.clone()));
        env.push(("CNI_NETNS", netns.to_owned()));
        env.push(("CNI_IFNAME", attachment.ifname.clone()));
        env.push(("CNI_ARGS", format_cni_args(&attachment.cni_args)?));
    }
    env.push(("CNI_PATH", search_path(bin_dirs)));
    Ok(env)
}

/// The spec's error object, printed on stdout by a failing plugin.
#[derive(Deserialize)]
struct ErrorObject {
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    match text.char_indices().nth(MAX_QUOTED_OUTPUT) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

/// What a finished plugin's exit status and output mean: its stdout on success, else its
/// error object, else whatever it printed.
pub(crate) fn interpret_output(
    call: &PluginCall,
    status: std::process::ExitStatus,
    stdout: &[u8],
    stderr: &[u8],
) -> Result<Vec<u8>, CniError> {
    if status.success() {
        return Ok(stdout.to_vec());
    }
    if let Ok(error) = serde_json::from_slice::<ErrorObject>(stdout) {
        return Err(CniError::Plugin {
            call: call.clone(),
            code: error.code,
            msg: error.msg,
            details: error.details,
        });
    }
    let output = match (quote(stdout), quote(stderr)) {
        (out, err) if out.is_empty() && err.is_empty() => "no output".to_owned(),
        (out, err) if out.is_empty() => format!("stderr {err:?}"),
        (out, err) if err.is_empty() => format!("stdout {out:?}"),
        (out, err) => format!("stdout {out:?}, stderr {err:?}"),
    };
    Err(CniError::PluginFailed {
        call: call.clone(),
        status: status.to_string(),
        output,
    })
}

fn spawn(command: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let mut attempt = 1;
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && attempt < SPAWN_ATTEMPTS => {
                std::thread::sleep(Duration::from_millis(20 * u64::from(attempt)));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Runs one plugin and returns its stdout, or why it failed. The plugin runs in its own
/// process group; past `timeout` the whole group (the plugin and any IPAM plugin it
/// delegated to) is killed.
pub(crate) async fn run_plugin(
    call: &PluginCall,
    bin_dirs: &[PathBuf],
    env: &[(&'static str, String)],
    stdin: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, CniError> {
    let path = find_plugin(&call.plugin, bin_dirs).ok_or_else(|| CniError::PluginNotFound {
        call: call.clone(),
        search_path: search_path(bin_dirs),
    })?;
    let exec_error = |path: &Path, source| CniError::Exec {
        call: call.clone(),
        path: path.to_path_buf(),
        source,
    };
    let mut command = tokio::process::Command::new(&path);
    for variable in CNI_VARIABLES {
        command.env_remove(variable);
    }
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = spawn(&mut command).map_err(|e| exec_error(&path, e))?;
    let pid = child.id();
    let pipe = child.stdin.take();
    let exchange = async move {
        let write = async move {
            let Some(mut pipe) = pipe else {
                return Ok(());
            };
            match pipe.write_all(stdin).await {
                // A plugin may answer without reading its configuration (VERSION does).
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => other,
            }
            // Dropping the pipe here closes it: the plugin reads to EOF.
        };
        let (written, output) = tokio::join!(write, child.wait_with_output());
        written.and(output)
    };
    let output = match tokio::time::timeout(timeout, exchange).await {
        Ok(output) => output.map_err(|e| exec_error(&path, e))?,
        Err(_) => {
            // The plugin itself is killed as its handle drops; this reaches its children.
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(CniError::Timeout {
                call: call.clone(),
                timeout,
            });
        }
    };
    if !output.stderr.is_empty() {
        tracing::debug!(
            command = %call.command,
            network = %call.network,
            plugin = %call.plugin,
            stderr = %String::from_utf8_lossy(&output.stderr),
            "CNI plugin stderr"
        );
    }
    interpret_output(call, output.status, &output.stdout, &output.stderr)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn call() -> PluginCall {
        PluginCall {
            command: Command::Add,
            network: "pods".into(),
            plugin: "bridge".into(),
        }
    }

    #[test]
    fn cni_args_are_encoded_or_refused() {
        let args = vec![
            ("IgnoreUnknown".to_owned(), "1".to_owned()),
            ("K8S_POD_NAME".to_owned(), "web-0".to_owned()),
        ];
        assert_eq!(
            format_cni_args(&args).unwrap(),
            "IgnoreUnknown=1;K8S_POD_NAME=web-0"
        );
        assert_eq!(format_cni_args(&[]).unwrap(), "");
        for (k, v) in [("A;B", "1"), ("A=B", "1"), ("", "1"), ("A", "x;y")] {
            assert!(
                format_cni_args(&[(k.into(), v.into())]).is_err(),
                "{k:?}={v:?}"
            );
        }
    }

    #[test]
    fn environment_per_verb() {
        let bins = vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")];
        let mut attachment = Attachment::new("c1", "eth0", Some("/ns".into()));
        attachment.cni_args = vec![("IgnoreUnknown".into(), "1".into())];
        let env = plugin_env(Command::Add, Some(&attachment), "/ns", &bins).unwrap();
        assert_eq!(
            env,
            [
                ("CNI_COMMAND", "ADD".to_owned()),
                ("CNI_CONTAINERID", "c1".to_owned()),
                ("CNI_NETNS", "/ns".to_owned()),
                ("CNI_IFNAME", "eth0".to_owned()),
                ("CNI_ARGS", "IgnoreUnknown=1".to_owned()),
                ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni".to_owned()),
            ]
        );
        let env = plugin_env(Command::Gc, None, "", &bins).unwrap();
        assert_eq!(
            env,
            [
                ("CNI_COMMAND", "GC".to_owned()),
                ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni".to_owned()),
            ]
        );
    }

    #[test]
    fn plugins_are_found_in_order() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        std::fs::write(second.path().join("bridge"), "").unwrap();
        std::fs::create_dir(first.path().join("bridge-dir")).unwrap();
        let bins = vec![first.path().to_path_buf(), second.path().to_path_buf()];
        assert_eq!(
            find_plugin("bridge", &bins),
            Some(second.path().join("bridge"))
        );
        std::fs::write(first.path().join("bridge"), "").unwrap();
        assert_eq!(
            find_plugin("bridge", &bins),
            Some(first.path().join("bridge"))
        );
        assert_eq!(find_plugin("bridge-dir", &bins), None);
        assert_eq!(find_plugin("absent", &bins), None);
    }

    #[test]
    fn failures_become_the_error_object_or_the_output() {
        let failed = std::process::ExitStatus::from_raw(1 << 8);
        let err = interpret_output(
            &call(),
            failed,
            br#"{"cniVersion": "1.0.0", "code": 7, "msg": "bad", "details": "why"}"#,
            b"",
        )
        .unwrap_err();
        assert_eq!(err.code(), Some(7));
        assert_eq!(
            err.to_string(),
            "ADD network pods plugin bridge: error 7: bad (why)"
        );
        let err = interpret_output(&call(), failed, b"", b"panic: oops\n").unwrap_err();
        assert_eq!(err.code(), None);
        assert_eq!(
            err.to_string(),
            "ADD network pods plugin bridge: exit status: 1 with no error object: stderr \"panic: oops\""
        );
        let killed = std::process::ExitStatus::from_raw(9);
        let err = interpret_output(&call(), killed, b"", b"").unwrap_err();
        assert!(err.to_string().contains("no output"), "{err}");
        let ok = std::process::ExitStatus::from_raw(0);
        assert_eq!(
            interpret_output(&call(), ok, b"{}", b"noise").unwrap(),
            b"{}"
        );
    }
}
