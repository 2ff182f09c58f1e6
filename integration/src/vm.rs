//! A real cgroup v2 node as a guest VM, for the tests this hybrid-cgroup host cannot run: a
//! Debian bookworm image made with debootstrap and a QEMU from Debian's packages (both cached
//! under a directory named by a hash of their recipe), booted under TCG with a per-run
//! qcow2 overlay and a second disk carrying the test's files and script.
//!
//! The image holds one unit of ours, `skiff-vm-test.service`: at boot it mounts the second
//! disk (`/dev/vdb`) read-only at [`GUEST_PAYLOAD_DIR`], runs `run.sh` from it with its
//! output on the serial console, and powers the guest off. The host reads the console from
//! a file and picks out the lines that start with [`RESULT_PREFIX`]. QEMU is killed and the
//! run's files removed on drop, failure included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// Where the second disk is mounted in the guest (as `TEST_UNIT` mounts it).
pub const GUEST_PAYLOAD_DIR: &str = "/mnt/skiff";

/// The start of every console line the guest script reports through.
pub const RESULT_PREFIX: &str = "SKIFF-VM ";

/// The guest's Debian release; the host's binaries are linked against bookworm's glibc.
const SUITE: &str = "bookworm";

/// What debootstrap puts into the guest: systemd as init, a kernel with its initrd (virtio
/// is a module), and the container runtime the agent drives.
const GUEST_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "kmod",
    "iproute2",
    "linux-image-amd64",
    "initramfs-tools",
    "containerd",
    "runc",
];

/// Debian's QEMU packages, extracted rather than installed (an installed newer
/// `qemu-utils` conflicts with bookworm's `qemu-system-x86`).
const QEMU_PACKAGES: &[&str] = &["qemu-system-x86", "qemu-system-common", "qemu-system-data"];

/// The unit that runs the payload's script at boot and powers the guest off after it.
const TEST_UNIT: &str = "[Unit]
Description=skiff VM test payload (run.sh from the second disk)
Requires=dev-vdb.device
After=dev-vdb.device local-fs.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p /mnt/skiff && mount -o ro /dev/vdb /mnt/skiff && exec /bin/sh /mnt/skiff/run.sh'
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
";

/// Units masked in the guest: the serial getty would share the console with the script,
/// and the timers would compete for the one emulated CPU.
const MASKED_UNITS: &[&str] = &[
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
];

/// Bumped whenever the image recipe changes in a way the constants above do not show.
const IMAGE_RECIPE_VERSION: u32 = 1;

/// The guest's root file system size (a sparse file; about a third is used).
const ROOT_IMAGE_SIZE: &str = "3G";

/// The host tools the guest tests need, with the Debian package of each.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("setpriv", "util-linux"),
    ("debootstrap", "debootstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("qemu-img", "qemu-utils"),
    ("apt-get", "apt"),
    ("dpkg", "dpkg"),
];

/// Firmware files QEMU loads, with the Debian package of each.
const FIRMWARE: &[(&str, &str)] = &[
    ("/usr/share/seabios/bios-256k.bin", "seabios"),
    ("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu"),
];

/// The directory images and QEMU are cached in: `$SKIFF_VM_CACHE`, else `target/skiff-vm`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SKIFF_VM_CACHE") {
        return PathBuf::from(dir);
    }
    crate::binary_dir()
        .parent()
        .expect("binary dir under target/")
        .join("skiff-vm")
}

/// Fails, naming every missing tool and file with its Debian package, unless the host can
/// build and boot guests.
pub fn require_host_tools() {
    let mut missing = Vec::new();
    for (tool, package) in HOST_TOOLS {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            missing.push(format!("{tool} (Debian package {package})"));
        }
    }
    for (file, package) in FIRMWARE {
        if !Path::new(file).exists() {
            missing.push(format!("{file} (Debian package {package})"));
        }
    }
    assert!(
        missing.is_empty(),
        "the guest VM tests need {}: install them (`cargo xtask deps`)",
        missing.join(", ")
    );
}

/// Hex SHA-256 of `parts`, each length-prefixed so that boundaries count.
fn recipe_hash(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs `command`, failing the test with its output unless it succeeds.
fn run(command: &mut Command, what: &str) -> String {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {command:?}\nstdout: {}\nstderr: {}",
        output.status,
        tail(&String::from_utf8_lossy(&output.stdout), 40),
        tail(&String::from_utf8_lossy(&output.stderr), 40),
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The Debian mirror the host's apt uses for `suite` (`$SKIFF_VM_MIRROR` overrides), read
/// from `/etc/apt/sources.list` and `/etc/apt/sources.list.d/` in both the one-line and the
/// deb822 formats; `deb.debian.org` when none names the suite.
pub fn debian_mirror(suite: &str) -> String {
    if let Ok(mirror) = std::env::var("SKIFF_VM_MIRROR") {
        return mirror;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        if let Some(mirror) = mirror_in_sources(&text, suite) {
            return mirror;
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// The first URI of `text` (a sources file, either format) that serves `suite` with the
/// `main` component.
fn mirror_in_sources(text: &str, suite: &str) -> Option<String> {
    // One-line format: `deb [options] URI SUITE COMPONENTS...`.
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut words = rest.split_whitespace().peekable();
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for word in words.by_ref() {
                if word.ends_with(']') {
                    break;
                }
            }
        }
        let fields: Vec<&str> = words.collect();
        if fields.len() >= 3 && fields[1] == suite && fields[2..].contains(&"main") {
            return Some(fields[0].to_string());
        }
    }
    // deb822 format: paragraphs of `Key: value` separated by blank lines.
    for paragraph in text.split("\n\n") {
        let field = |key: &str| {
            paragraph.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                (name.trim().eq_ignore_ascii_case(key)).then(|| value.trim().to_string())
            })
        };
        let types = field("Types").unwrap_or_default();
        let suites = field("Suites").unwrap_or_default();
        let components = field("Components").unwrap_or_default();
        if types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == suite)
            && components.split_whitespace().any(|c| c == "main")
            && let Some(uris) = field("URIs")
            && let Some(uri) = uris.split_whitespace().next()
        {
            return Some(uri.to_string());
        }
    }
    None
}

/// A directory being built next to its final place in the cache: renamed into place when
/// complete, else unmounted (debootstrap mounts /proc and /sys inside its target) and
/// removed on drop.
struct BuildDir {
    path: PathBuf,
    done: bool,
}

impl BuildDir {
    fn new(final_dir: &Path) -> Self {
        let path = final_dir.with_extension(format!("building-{}", std::process::id()));
        let mut build = BuildDir { path, done: false };
        build.remove();
        std::fs::create_dir_all(&build.path)
            .unwrap_or_else(|e| panic!("create {}: {e}", build.path.display()));
        build
    }

    /// Moves the finished directory into place (a concurrent build that finished first
    /// wins; ours is then removed).
    fn finish(mut self, final_dir: &Path) {
        unmount_under(&self.path);
        if std::fs::rename(&self.path, final_dir).is_ok() {
            self.done = true;
        }
    }

    fn remove(&mut self) {
        if !self.path.exists() {
            return;
        }
        if unmount_under(&self.path) {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            eprintln!(
                "left {} in place: mounts under it could not be removed",
                self.path.display()
            );
        }
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if !self.done {
            self.remove();
        }
    }
}

/// Unmounts everything mounted at or under `dir`, deepest first; true when nothing is left
/// (so the tree may be removed without reaching into a mounted file system).
fn unmount_under(dir: &Path) -> bool {
    let mounts = || -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut found: Vec<PathBuf> = text
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .map(|point| PathBuf::from(point.replace("\\040", " ")))
            .filter(|point| point.starts_with(dir))
            .collect();
        found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        found
    };
    for point in mounts() {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(&point)
            .stderr(Stdio::null())
            .status();
    }
    mounts().is_empty()
}

/// QEMU from Debian's packages, extracted into the cache.
pub struct Qemu {
    pub binary: PathBuf,
    /// Directories for `-L`, searched in order.
    pub firmware_dirs: Vec<PathBuf>,
}

impl Qemu {
    /// Extracts Debian's QEMU into the cache unless it is there, and checks that it runs
    /// (naming the shared libraries it misses).
    pub fn get() -> Qemu {
        let key = recipe_hash(QEMU_PACKAGES);
        let dir = cache_root().join(format!("qemu-{key}"));
        if !dir.join("root/usr/bin/qemu-system-x86_64").exists() {
            let started = Instant::now();
            std::fs::create_dir_all(cache_root()).expect("create the VM cache dir");
            let build = BuildDir::new(&dir);
            let debs = build.path.join("debs");
            std::fs::create_dir_all(&debs).expect("create the deb dir");
            let download = || {
                Command::new("apt-get")
                    .arg("download")
                    .args(QEMU_PACKAGES)
                    .current_dir(&debs)
                    .stdin(Stdio::null())
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            // A machine whose package lists were never fetched knows no qemu-system-x86.
            if !download() {
                run(
                    Command::new("apt-get").args(["update", "-qq"]),
                    "apt-get update",
                );
                run(
                    Command::new("apt-get")
                        .arg("download")
                        .args(QEMU_PACKAGES)
                        .current_dir(&debs),
                    "apt-get download of Debian's QEMU",
                );
            }
            for deb in std::fs::read_dir(&debs)
                .expect("read the deb dir")
                .flatten()
            {
                run(
                    Command::new("dpkg")
                        .arg("-x")
                        .arg(deb.path())
                        .arg(build.path.join("root")),
                    "dpkg -x of a QEMU package",
                );
            }
            let _ = std::fs::remove_dir_all(&debs);
            build.finish(&dir);
            eprintln!(
                "vm: extracted Debian's QEMU into {} in {:.1} s",
                dir.display(),
                started.elapsed().as_secs_f64()
            );
        }
        let binary = dir.join("root/usr/bin/qemu-system-x86_64");
        let ldd = run(Command::new("ldd").arg(&binary), "ldd of QEMU");
        let missing: Vec<&str> = ldd
            .lines()
            .filter(|l| l.contains("not found"))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(
            missing.is_empty(),
            "QEMU ({}) misses the shared libraries {missing:?}: install their Debian packages \
             (`cargo xtask deps` lists them: libcapstone4, libfdt1, libpmem1, librdmacm1, \
             libibverbs1, libslirp0, libvdeplug2)",
            binary.display()
        );
        Qemu {
            binary,
            firmware_dirs: vec![
                dir.join("root/usr/share/qemu"),
                PathBuf::from("/usr/share/seabios"),
                PathBuf::from("/usr/lib/ipxe/qemu"),
            ],
        }
    }
}

/// The cached guest: a raw ext4 root image, the kernel and its initrd.
pub struct GuestImage {
    pub dir: PathBuf,
    pub root_image: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The cached image for the current recipe, built first if missing (debootstrap from
    /// the host's Debian mirror, then `mkfs.ext4 -d`).
    pub fn get() -> GuestImage {
        let version = IMAGE_RECIPE_VERSION.to_string();
        let mut parts = vec![SUITE, &version, TEST_UNIT, ROOT_IMAGE_SIZE];
        parts.extend(GUEST_PACKAGES);
        parts.extend(MASKED_UNITS);
        let dir = cache_root().join(format!("guest-{SUITE}-{}", recipe_hash(&parts)));
        let image = GuestImage {
            root_image: dir.join("root.img"),
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            dir: dir.clone(),
        };
        if image.root_image.exists() && image.kernel.exists() && image.initrd.exists() {
            return image;
        }
        std::fs::create_dir_all(cache_root()).expect("create the VM cache dir");
        let build = BuildDir::new(&dir);
        let rootfs = build.path.join("rootfs");
        let mirror = debian_mirror(SUITE);
        let started = Instant::now();
        run(
            Command::new("debootstrap")
                .arg("--variant=minbase")
                .arg(format!("--include={}", GUEST_PACKAGES.join(",")))
                .arg(SUITE)
                .arg(&rootfs)
                .arg(&mirror),
            &format!("debootstrap of Debian {SUITE} from {mirror}"),
        );
        eprintln!(
            "vm: debootstrap from {mirror} took {:.1} s",
            started.elapsed().as_secs_f64()
        );
        customize(&rootfs);
        let boot = rootfs.join("boot");
        let find_boot_file = |prefix: &str| -> PathBuf {
            std::fs::read_dir(&boot)
                .expect("read the guest's /boot")
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
                })
                .unwrap_or_else(|| panic!("no {prefix}* in the guest's /boot"))
        };
        for (prefix, name) in [("vmlinuz-", "vmlinuz"), ("initrd.img-", "initrd.img")] {
            std::fs::copy(find_boot_file(prefix), build.path.join(name))
                .unwrap_or_else(|e| panic!("copy the guest's {name}: {e}"));
        }
        let started = Instant::now();
        assert!(
            unmount_under(&rootfs),
            "mounts left under {} after debootstrap",
            rootfs.display()
        );
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "skiff-root", "-d"])
                .arg(&rootfs)
                .arg(build.path.join("root.img"))
                .arg(ROOT_IMAGE_SIZE),
            "mkfs.ext4 of the guest's root image",
        );
        eprintln!(
            "vm: mkfs.ext4 of the root image took {:.1} s",
            started.elapsed().as_secs_f64()
        );
        std::fs::remove_dir_all(&rootfs)
            .unwrap_or_else(|e| panic!("remove {}: {e}", rootfs.display()));
        build.finish(&dir);
        image
    }
}

/// What the image gets besides debootstrap's packages: a hostname, the test unit, masked
/// units, and no fstab (the kernel mounts the root read-write).
fn customize(rootfs: &Path) {
    let write = |path: &str, text: &str| {
        let path = rootfs.join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("create guest dir");
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    };
    write("etc/hostname", "skiff-vm\n");
    write("etc/hosts", "127.0.0.1 localhost\n127.0.1.1 skiff-vm\n");
    write("etc/systemd/system/skiff-vm-test.service", TEST_UNIT);
    let symlink = |target: &str, link: &str| {
        let link = rootfs.join(link);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("create guest dir");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
    };
    symlink(
        "/etc/systemd/system/skiff-vm-test.service",
        "etc/systemd/system/multi-user.target.wants/skiff-vm-test.service",
    );
    for unit in MASKED_UNITS {
        symlink("/dev/null", &format!("etc/systemd/system/{unit}"));
    }
}

/// Files for the guest's second disk, `run.sh` among them.
pub struct Payload {
    dir: tempfile::TempDir,
}

impl Default for Payload {
    fn default() -> Self {
        Self::new()
    }
}

impl Payload {
    pub fn new() -> Payload {
        Payload {
            dir: tempfile::Builder::new()
                .prefix("skiff-vm-payload-")
                .tempdir()
                .expect("temp dir for the VM payload"),
        }
    }

    /// The directory the files go to (for writers that want a path).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds the host file `source` as `name` (executable bits kept): a hard link when it is
    /// on the same file system (mkfs only reads it), else a copy.
    pub fn copy(&self, name: &str, source: &Path) -> &Self {
        let target = self.dir.path().join(name);
        if std::fs::hard_link(source, &target).is_err() {
            std::fs::copy(source, &target)
                .unwrap_or_else(|e| panic!("copy {} into the VM payload: {e}", source.display()));
        }
        self
    }

    /// Writes `text` as the executable file `name`.
    pub fn script(&self, name: &str, text: &str) -> &Self {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write a payload script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod a payload script");
        self
    }

    /// An ext4 image of the files at `image`, with room to spare.
    fn write_image(&self, image: &Path) {
        let bytes: u64 = std::fs::read_dir(self.dir.path())
            .expect("read the payload dir")
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        let megabytes = bytes / (1 << 20) + bytes / (1 << 20) / 8 + 32;
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "skiff-payload", "-d"])
                .arg(self.dir.path())
                .arg(image)
                .arg(format!("{megabytes}M")),
            "mkfs.ext4 of the VM payload",
        );
    }
}

/// A booted guest: QEMU under TCG with a qcow2 overlay on the cached root image and the
/// payload disk; killed, and its files removed, on drop.
pub struct Vm {
    child: Option<Child>,
    run_dir: tempfile::TempDir,
    console: PathBuf,
    started: Instant,
}

impl Vm {
    /// Boots `image` with `payload` as its second disk. `memory_mib` of RAM, one vCPU.
    pub fn boot(qemu: &Qemu, image: &GuestImage, payload: &Payload, memory_mib: u32) -> Vm {
        let preparing = Instant::now();
        let run_dir = tempfile::Builder::new()
            .prefix("skiff-vm-run-")
            .tempdir()
            .expect("temp dir for the VM run");
        let overlay = run_dir.path().join("root.qcow2");
        run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&image.root_image)
                .arg(&overlay),
            "qemu-img create of the root overlay",
        );
        let payload_image = run_dir.path().join("payload.img");
        payload.write_image(&payload_image);
        let console = run_dir.path().join("console.log");
        // QEMU dies with the test's thread even when the test process is killed outright
        // (a timeout, ^C), so no emulated guest is left spinning a core; Drop kills it on
        // every other path.
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&qemu.binary);
        for dir in &qemu.firmware_dirs {
            command.arg("-L").arg(dir);
        }
        command
            .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "1"])
            .args(["-m", &memory_mib.to_string()])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args([
                "-append",
                "console=ttyS0 root=/dev/vda rw panic=-1 systemd.show_status=1",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2,cache=unsafe",
                overlay.display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                payload_image.display()
            ))
            .args(["-display", "none", "-monitor", "none", "-nic", "none"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-no-reboot")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(run_dir.path().join("qemu.stderr"))
                    .expect("QEMU stderr file"),
            );
        eprintln!(
            "vm: overlay and payload disk made in {:.1} s",
            preparing.elapsed().as_secs_f64()
        );
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start setpriv {}: {e}", qemu.binary.display()));
        Vm {
            child: Some(child),
            run_dir,
            console,
            started: Instant::now(),
        }
    }

    /// The console output so far.
    pub fn console(&self) -> String {
        let bytes = std::fs::read(&self.console).unwrap_or_default();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    /// The result lines so far (without [`RESULT_PREFIX`]), in order.
    pub fn results(&self) -> Vec<String> {
        self.console()
            .lines()
            .filter_map(|line| line.find(RESULT_PREFIX).map(|at| &line[at..]))
            .map(|line| line[RESULT_PREFIX.len()..].trim().to_string())
            .collect()
    }

    /// Waits until a result line starts with `first_word` (or QEMU exits), printing each
    /// result line as it comes with the time since boot; fails after `timeout` with the
    /// console's end.
    pub fn wait_for_result(&mut self, first_word: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut printed = 0;
        loop {
            let results = self.results();
            for line in &results[printed..] {
                eprintln!(
                    "vm: [{:6.1} s] {line}",
                    self.started.elapsed().as_secs_f64()
                );
            }
            printed = results.len();
            if results
                .iter()
                .any(|l| l.split_whitespace().next() == Some(first_word))
            {
                return results;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "QEMU exited ({status}) before the guest reported {first_word:?}\nQEMU \
                     stderr: {}\nconsole (end):\n{}",
                    std::fs::read_to_string(self.run_dir.path().join("qemu.stderr"))
                        .unwrap_or_default(),
                    tail(&self.console(), 150)
                );
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not report {first_word:?} within {timeout:?}\nconsole (end):\n{}",
                tail(&self.console(), 150)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Seconds since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits up to `timeout` for the guest to power off, then kills QEMU either way.
    pub fn shut_down(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if let Some(child) = self.child.as_mut() {
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The run's directory (overlay, payload image, console log).
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parses a result line's `key=value` words (the first word, the check's name, excluded).
pub fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .skip(1)
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mirror_in_both_formats() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
                      URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirror_in_sources(deb822, "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let one_line = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib\n";
        assert_eq!(
            mirror_in_sources(one_line, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_in_sources(
                "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n",
                "bookworm"
            ),
            None
        );
    }

    #[test]
    fn parses_result_fields() {
        let parsed = fields("oom reason=OOMKilled exit_code=137");
        assert_eq!(parsed["reason"], "OOMKilled");
        assert_eq!(parsed["exit_code"], "137");
    }

    #[test]
    fn recipe_hashes_see_boundaries() {
        assert_ne!(recipe_hash(&["ab", "c"]), recipe_hash(&["a", "bc"]));
    }
}
