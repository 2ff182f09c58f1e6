//! The agent's cgroup v2 manager on this machine's real cgroup2 mount (root only): pod
//! and container cgroups under a subtree of the test's own, a process placed in one, its
//! usage, the settings the hierarchy cannot enforce (compared with what its
//! `cgroup.controllers` offers, not with a hard-coded host), and removal that kills.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use skiff_agent::cgroups::{
    Cgroup2Mount, CgroupConfig, CgroupManager, Controller, PodCgroup, QosClass, find_cgroup2_mount,
};

fn require_root() {
    integration::require_root("the cgroup tests create cgroups");
}

fn cgroup2_mount() -> Cgroup2Mount {
    find_cgroup2_mount(Path::new("/proc/self/mountinfo"))
        .expect("these tests need a cgroup2 file system mounted on this machine")
}

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// A uniquely named cgroup directly under the mount, for one test. On drop (failure
/// included) everything in it is killed and its cgroups are removed, with code of the
/// test's own rather than the manager's.
struct TestSubtree {
    dir: PathBuf,
    name: String,
}

impl TestSubtree {
    fn new(mount: &Path) -> Self {
        let name = unique("skiff-test");
        TestSubtree {
            dir: mount.join(&name),
            name,
        }
    }
}

impl Drop for TestSubtree {
    fn drop(&mut self) {
        if !self.dir.exists() {
            return;
        }
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let events =
                std::fs::read_to_string(self.dir.join("cgroup.events")).unwrap_or_default();
            if !events.contains("populated 1") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Err(error) = remove_bottom_up(&self.dir) {
            eprintln!("leaked test cgroup {}: {error}", self.dir.display());
        }
    }
}

fn remove_bottom_up(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_bottom_up(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// A child process killed and reaped on drop if the test did not get that far.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn sleep() -> Self {
        let child = Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        ChildGuard(Some(child))
    }

    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    /// Waits for the child to exit (bounded) and returns the signal that ended it.
    fn wait_for_signal(&mut self) -> Option<i32> {
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait().expect("wait for sleep") {
                return status.signal();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sleep {} was not killed", child.id());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn list(cpu: &str, memory: &str) -> Option<std::collections::BTreeMap<String, Quantity>> {
    let mut list = std::collections::BTreeMap::new();
    if !cpu.is_empty() {
        list.insert("cpu".to_string(), Quantity(cpu.into()));
    }
    if !memory.is_empty() {
        list.insert("memory".to_string(), Quantity(memory.into()));
    }
    Some(list)
}

/// A one-container pod; `(cpu, memory)` requests and limits, "" for absent.
fn pod(uid: &str, requests: (&str, &str), limits: (&str, &str)) -> Pod {
    let mut pod = Pod::default();
    pod.metadata.name = Some("cgroup-test".into());
    pod.metadata.namespace = Some("default".into());
    pod.metadata.uid = Some(uid.into());
    pod.spec = Some(PodSpec {
        containers: vec![Container {
            name: "app".into(),
            resources: Some(ResourceRequirements {
                requests: list(requests.0, requests.1),
                limits: list(limits.0, limits.1),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    });
    pod
}

/// The controllers the hierarchy's root offers, which decide what can be enforced.
fn root_controllers(mount: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(mount.join("cgroup.controllers"))
        .expect("read cgroup.controllers of the mount")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn open(mount: &Cgroup2Mount, subtree: &TestSubtree) -> CgroupManager {
    let mut config = CgroupConfig::new(&mount.mount_point, &subtree.name);
    config.resources.pod_pids_limit = Some(64);
    config.kill_timeout = Duration::from_secs(5);
    CgroupManager::open(config).expect("open the cgroup manager")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim_end()
        .to_string()
}

#[test]
fn a_pod_runs_in_its_cgroup_and_is_killed_with_it() {
    require_root();
    let mount = cgroup2_mount();
    let subtree = TestSubtree::new(&mount.mount_point);
    let manager = open(&mount, &subtree);

    // What cannot be enforced is exactly what the hierarchy does not offer.
    let offered = root_controllers(&mount.mount_point);
    let missing: BTreeSet<Controller> = Controller::ALL
        .into_iter()
        .filter(|c| !offered.contains(c.name()))
        .collect();
    let reported: BTreeSet<Controller> =
        manager.unenforced().iter().map(|u| u.controller).collect();
    assert_eq!(reported, missing, "{:?}", manager.unenforced_message());
    for unenforced in manager.unenforced() {
        assert_eq!(
            unenforced.to_string(),
            format!(
                "{}: the {} controller is not available in the cgroup v2 hierarchy at {}",
                unenforced.setting,
                unenforced.controller,
                mount.mount_point.display()
            )
        );
    }
    for controller in Controller::ALL {
        assert_eq!(
            manager.is_enforced(controller),
            !missing.contains(&controller)
        );
    }
    if let Some(message) = manager.unenforced_message() {
        eprintln!("unenforced on this host: {message}");
    }

    // Pod and container cgroups, with the files of the enforced controllers written.
    let uid = unique("uid");
    let burstable = pod(&uid, ("100m", "64Mi"), ("200m", "128Mi"));
    let applied = manager.apply_pod(&burstable).expect("apply the pod cgroup");
    let cgroup = PodCgroup::of(&burstable).unwrap();
    assert_eq!(cgroup.qos(), QosClass::Burstable);
    let pod_dir = subtree.dir.join(format!("kubepods/burstable/pod{uid}"));
    assert_eq!(applied.cgroup, pod_dir);
    assert!(pod_dir.is_dir());
    for setting in &applied.written {
        assert_eq!(read(&pod_dir.join(setting.file)), setting.value);
    }
    let unenforced: BTreeSet<Controller> =
        applied.unenforced.iter().map(|u| u.controller).collect();
    assert_eq!(unenforced, missing);
    if manager.is_enforced(Controller::Cpu) {
        assert_eq!(read(&pod_dir.join("cpu.max")), "20000 100000");
    }

    let applied = manager
        .apply_container(&burstable, "app")
        .expect("apply the container cgroup");
    let container_dir = pod_dir.join("app");
    assert_eq!(applied.cgroup, container_dir);
    assert!(container_dir.is_dir());
    if manager.is_enforced(Controller::Memory) {
        assert_eq!(read(&container_dir.join("memory.max")), "134217728");
    }
    let cgroups_path = manager.container_cgroups_path(&cgroup, "app").unwrap();
    assert_eq!(
        cgroups_path,
        Path::new("/")
            .join(&subtree.name)
            .join(format!("kubepods/burstable/pod{uid}/app"))
    );

    // A process placed in the container's cgroup shows there in /proc.
    let mut sleep = ChildGuard::sleep();
    manager
        .add_process(&cgroup, "app", sleep.pid())
        .expect("place the process");
    let proc_cgroup = read(Path::new(&format!("/proc/{}/cgroup", sleep.pid())));
    let expected = mount.root.join(cgroups_path.strip_prefix("/").unwrap());
    assert!(
        proc_cgroup
            .lines()
            .any(|line| line == format!("0::{}", expected.display())),
        "{proc_cgroup}"
    );
    assert_eq!(
        read(&container_dir.join("cgroup.procs")),
        sleep.pid().to_string()
    );

    // Usage from the same files; a missing controller's files are None.
    for usage in [
        manager.container_usage(&cgroup, "app").unwrap(),
        manager.pod_usage(&cgroup).unwrap(),
    ] {
        assert!(usage.cpu.is_some(), "cpu.stat is a core file");
        let enforced = |c| manager.is_enforced(c);
        assert_eq!(usage.memory_current.is_some(), enforced(Controller::Memory));
        assert_eq!(usage.memory_events.is_some(), enforced(Controller::Memory));
        assert_eq!(usage.pids_current.is_some(), enforced(Controller::Pids));
        if let Some(pids) = usage.pids_current {
            assert_eq!(pids, 1);
        }
        let throttling = usage.cpu.unwrap().nr_throttled;
        assert_eq!(throttling.is_some(), enforced(Controller::Cpu));
    }

    // A restarted agent finds the pod and its container.
    assert_eq!(manager.list_pods().unwrap(), std::slice::from_ref(&cgroup));
    assert_eq!(manager.list_containers(&cgroup).unwrap(), ["app"]);

    // Applying again is harmless; a resize updates what is enforced.
    manager.apply_pod(&burstable).unwrap();
    let resized = pod(&uid, ("500m", "64Mi"), ("1", "256Mi"));
    manager.apply_pod(&resized).unwrap();
    manager.apply_container(&resized, "app").unwrap();
    if manager.is_enforced(Controller::Cpu) {
        assert_eq!(read(&pod_dir.join("cpu.max")), "100000 100000");
    }

    // Removal kills the process and removes the tree; removing again is fine.
    manager.remove_pod(&cgroup).expect("remove the pod cgroup");
    assert_eq!(sleep.wait_for_signal(), Some(9), "sleep ends by SIGKILL");
    assert!(!pod_dir.exists());
    manager
        .remove_pod(&cgroup)
        .expect("remove a removed pod cgroup");
    assert!(manager.list_pods().unwrap().is_empty());
}

#[test]
fn tiers_hold_their_pods_and_a_container_is_removed_alone() {
    require_root();
    let mount = cgroup2_mount();
    let subtree = TestSubtree::new(&mount.mount_point);
    let manager = open(&mount, &subtree);

    let guaranteed = pod(&unique("g"), ("250m", "32Mi"), ("250m", "32Mi"));
    let best_effort = pod(&unique("b"), ("", ""), ("", ""));
    for pod in [&guaranteed, &best_effort] {
        manager.apply_pod(pod).unwrap();
        manager.apply_container(pod, "app").unwrap();
    }
    let guaranteed_cgroup = PodCgroup::of(&guaranteed).unwrap();
    let best_effort_cgroup = PodCgroup::of(&best_effort).unwrap();
    assert_eq!(guaranteed_cgroup.qos(), QosClass::Guaranteed);
    assert_eq!(best_effort_cgroup.qos(), QosClass::BestEffort);
    assert!(
        manager
            .pod_dir(&guaranteed_cgroup)
            .starts_with(subtree.dir.join("kubepods"))
    );
    assert_eq!(
        manager.pod_dir(&best_effort_cgroup).parent().unwrap(),
        subtree.dir.join("kubepods/besteffort")
    );
    assert_eq!(
        manager.list_pods().unwrap(),
        [guaranteed_cgroup.clone(), best_effort_cgroup.clone()]
    );
    manager
        .update_qos_tiers(&[guaranteed.clone(), best_effort.clone()])
        .unwrap();

    let mut sleep = ChildGuard::sleep();
    manager
        .add_process(&best_effort_cgroup, "app", sleep.pid())
        .unwrap();
    manager
        .remove_container(&best_effort_cgroup, "app")
        .expect("remove the container cgroup");
    assert_eq!(sleep.wait_for_signal(), Some(9));
    assert!(
        manager
            .list_containers(&best_effort_cgroup)
            .unwrap()
            .is_empty()
    );
    assert!(manager.pod_dir(&best_effort_cgroup).is_dir());

    for cgroup in [&guaranteed_cgroup, &best_effort_cgroup] {
        manager.remove_pod(cgroup).unwrap();
    }
    assert!(manager.list_pods().unwrap().is_empty());
}
