//! A real OCI registry for tests: Debian's `docker-registry` (distribution 2.8) on
//! 127.0.0.1 with a free port and a temp storage directory, killed on drop; images are
//! pushed to it with `skopeo copy` from OCI layouts.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require_tool;

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running registry; killed on drop.
pub struct Registry {
    child: Option<Child>,
    temp: tempfile::TempDir,
    /// `127.0.0.1:<port>`, the registry's name in image references.
    pub address: String,
    log: PathBuf,
}

impl Registry {
    /// A registry that serves anyone.
    pub fn start() -> Self {
        Self::start_with(false, None)
    }

    /// A registry that wants Basic credentials (htpasswd) for everything; skiff has none,
    /// so every pull is refused with 401.
    pub fn start_with_basic_auth() -> Self {
        Self::start_with(true, None)
    }

    /// A registry that wants Basic credentials and knows one user, `username` with
    /// `password` (its htpasswd entry bcrypt-hashed by Python's `crypt`, whose libxcrypt
    /// makes `$2b$` hashes). Push to it with [`Registry::push_layout_as`].
    pub fn start_with_user(username: &str, password: &str) -> Self {
        Self::start_with(true, Some((username, password)))
    }

    fn start_with(basic_auth: bool, user: Option<(&str, &str)>) -> Self {
        require_tool(
            "docker-registry",
            "install Debian's docker-registry (`cargo xtask deps`)",
        );
        let temp = tempfile::Builder::new()
            .prefix("skiff-registry-")
            .tempdir()
            .expect("temp dir for the registry");
        if let Some((username, password)) = user {
            std::fs::write(
                temp.path().join("htpasswd"),
                format!("{username}:{}\n", bcrypt_hash(password)),
            )
            .expect("write htpasswd");
        }
        // The port is picked free and then given to the registry: another process may take
        // it in between, so a registry that dies at start is retried on a new port.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("free port")
                .port();
            let address = format!("127.0.0.1:{port}");
            let config = temp.path().join("config.yml");
            let auth = if basic_auth {
                // The registry creates the file with a random password when it is missing.
                format!(
                    "auth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n",
                    temp.path().join("htpasswd").display()
                )
            } else {
                String::new()
            };
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: {address}\n\
                     {auth}",
                    temp.path().join("storage").display()
                ),
            )
            .expect("write registry config");
            let log = temp.path().join("registry.log");
            let log_file = std::fs::File::create(&log).expect("registry log");
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log file"))
                .stderr(log_file)
                .spawn()
                .expect("spawn docker-registry");
            if wait_ready(&address, &mut child, &log) {
                return Self {
                    child: Some(child),
                    temp,
                    address,
                    log,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start on a free port in 5 tries");
    }

    /// The status code of a plain `GET path`, or `None` if nothing answered.
    pub fn get_status(&self, path: &str) -> Option<u16> {
        get_status(&self.address, path)
    }

    /// `<address>/<name>`: how pods name an image of this registry.
    pub fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.address)
    }

    /// Pushes the image `tag` of the OCI layout at `layout` as `<address>/<name>` with
    /// skopeo (`name` carries the tag: `app:v1`).
    pub fn push_layout(&self, layout: &Path, tag: &str, name: &str) {
        self.push(layout, tag, name, None);
    }

    /// [`Registry::push_layout`] to a registry that wants `username:password`.
    pub fn push_layout_as(&self, layout: &Path, tag: &str, name: &str, credentials: &str) {
        self.push(layout, tag, name, Some(credentials));
    }

    fn push(&self, layout: &Path, tag: &str, name: &str, credentials: Option<&str>) {
        require_tool("skopeo", "install Debian's skopeo (`cargo xtask deps`)");
        let mut command = Command::new("skopeo");
        command.args(["copy", "--insecure-policy", "--dest-tls-verify=false"]);
        if let Some(credentials) = credentials {
            command.arg(format!("--dest-creds={credentials}"));
        }
        let output = command
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}", self.reference(name)))
            .env("TMPDIR", self.temp.path())
            .stdin(Stdio::null())
            .output()
            .expect("run skopeo");
        assert!(
            output.status.success(),
            "skopeo copy to {} failed ({}): {}{}",
            self.reference(name),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "registry log ({}):\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        self.kill();
    }
}

/// Waits until `GET /v2/` answers; false if the registry died (its port was taken).
fn wait_ready(address: &str, child: &mut Child, log: &Path) -> bool {
    let started = Instant::now();
    loop {
        // 200, or 401 for a registry with authentication.
        if let Some(200 | 401) = get_status(address, "/v2/") {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        assert!(
            started.elapsed() < START_TIMEOUT,
            "docker-registry did not answer on {address} within {START_TIMEOUT:?}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A bcrypt hash of `password` as htpasswd files hold them.
fn bcrypt_hash(password: &str) -> String {
    require_tool(
        "python3",
        "install python3 (it hashes the test registry's password)",
    );
    let output = Command::new("python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
            password,
        ])
        .output()
        .expect("run python3");
    let hash = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        output.status.success() && hash.starts_with("$2"),
        "bcrypt with python3's crypt failed: {hash} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    hash
}

fn get_status(address: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `skopeo copy --insecure-policy SOURCE DEST` (for example an OCI layout to an OCI
/// or Docker archive) and fails the test if it fails.
pub fn skopeo_copy(source: &str, destination: &str) {
    require_tool("skopeo", "install Debian's skopeo (`cargo xtask deps`)");
    let output = Command::new("skopeo")
        .args(["copy", "--insecure-policy", source, destination])
        .stdin(Stdio::null())
        .output()
        .expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo copy {source} {destination} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
