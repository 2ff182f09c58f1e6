//! Pods run for real: the control plane, a private containerd with runc, and `skiff-agent`
//! driven by kubectl. Each test starts its own of all three and cleans up everything.

use std::time::{Duration, Instant};

use integration::oci_image::ImageBuilder;
use integration::pod_cluster::{IMAGE, PodCluster, condition, phase};
use serde_json::Value;

integration::pod_cluster_wrapper!(
    /// The shared one-node cluster, with this file's own checks.
    Cluster
);

fn cluster() -> Cluster {
    cluster_with(&[])
}

fn cluster_with(agent_args: &[&str]) -> Cluster {
    Cluster(PodCluster::start(agent_args))
}

impl Cluster {
    /// Starts `count` long-running pods named `<prefix>-<i>` and returns their container
    /// IDs once all run.
    fn start_steady_pods(&self, prefix: &str, count: usize) -> Vec<String> {
        let manifests: Vec<String> = (0..count)
            .map(|i| {
                self.pod_manifest(
                    &format!("{prefix}-{i}"),
                    &format!(
                        "  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {IMAGE}\n    command: [\"sh\", \"-c\", \"while true; do sleep 1; done\"]\n"
                    ),
                )
            })
            .collect();
        self.apply(&manifests.join("---\n"));
        (0..count)
            .map(|i| {
                let pod = self.wait_for_pod_within(
                    &format!("{prefix}-{i}"),
                    "Running",
                    Duration::from_secs(60),
                    |pod| phase(pod) == "Running",
                );
                pod["status"]["containerStatuses"][0]["containerID"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    /// Checks that the pods `start_steady_pods` started still run the same containers.
    fn assert_steady(&self, prefix: &str, ids: &[String]) {
        for (i, id) in ids.iter().enumerate() {
            let pod = self.pod(&format!("{prefix}-{i}"));
            let container = &pod["status"]["containerStatuses"][0];
            assert_eq!(phase(&pod), "Running", "{:#}", pod["status"]);
            assert_eq!(
                container["restartCount"],
                0,
                "{prefix}-{i} restarted:\n{}",
                self.node.log()
            );
            assert_eq!(container["containerID"].as_str().unwrap(), id);
        }
    }

    /// No address of the node's subnet is still reserved by IPAM.
    fn assert_no_ip_reservations(&self) {
        let reservations: Vec<_> = integration::files_under(&self.node.state_dir.join("ipam"))
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&self.node.subnet))
            })
            .collect();
        assert!(
            reservations.is_empty(),
            "IP reservations leaked: {reservations:?}"
        );
    }
}

#[test]
fn a_pod_runs_with_its_network_cgroup_and_logs_then_deletes_cleanly() {
    let cluster = cluster();
    cluster.apply(&cluster.pod_manifest(
        "web",
        &format!(
            r#"  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "echo hello from $(POD_NAME); trap 'echo got TERM; exit 0' TERM; while true; do sleep 0.1; done"]
    env:
    - name: POD_NAME
      valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
    resources:
      requests: {{cpu: 100m, memory: 32Mi}}
      limits: {{cpu: 200m, memory: 64Mi}}
"#
        ),
    ));
    let pod =
        cluster.wait_for_pod_within("web", "Running and Ready", Duration::from_secs(60), |pod| {
            phase(pod) == "Running" && condition(pod, "Ready") == "True"
        });
    let status = &pod["status"];
    let ip = status["podIP"].as_str().expect("podIP");
    assert!(
        ip.starts_with(&format!("{}.", cluster.node.subnet)),
        "pod IP {ip} outside the node's subnet"
    );
    assert_eq!(status["hostIP"], "127.0.0.1");
    assert_eq!(status["qosClass"], "Burstable");
    let container = &status["containerStatuses"][0];
    assert!(
        container["containerID"]
            .as_str()
            .unwrap()
            .starts_with("containerd://")
    );
    assert!(
        container["imageID"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(container["restartCount"], 0);
    assert!(container["state"]["running"]["startedAt"].is_string());

    // The output is in the CRI log file.
    let log_path = cluster.log_file(&pod, "app", 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains("hello from web")) {
        assert!(
            Instant::now() < deadline,
            "no output in {}",
            log_path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines()
            .next()
            .unwrap()
            .contains(" stdout F hello from web"),
        "{log}"
    );

    // The pod's cgroup exists, in the burstable tier, with the container's process in it.
    let cgroups = cluster.node.pod_cgroups();
    assert_eq!(cgroups.len(), 1, "{cgroups:?}");
    assert!(cgroups[0].parent().unwrap().ends_with("burstable"));
    let procs = std::fs::read_to_string(cgroups[0].join("app").join("cgroup.procs")).unwrap();
    assert!(
        !procs.trim().is_empty(),
        "no process in the container cgroup"
    );
    // The kernel's OOM killer ranks it as the kubelet would a burstable container: between
    // guaranteed (-997) and best-effort (1000) ones, not with containerd's own -998.
    let pid = procs.lines().next().unwrap().trim();
    let oom_score_adj: i32 = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        (3..=999).contains(&oom_score_adj),
        "burstable container's oom_score_adj is {oom_score_adj}"
    );

    // Deletion: SIGTERM reaches the container, then everything is released.
    cluster
        .plane
        .kubectl(&["delete", "pod", "web", "--wait=false"]);
    cluster.wait_gone("web", Duration::from_secs(30));
    assert!(
        cluster.node.pod_cgroups().is_empty(),
        "pod cgroup left behind"
    );
    let sandboxes = skiff_agent::sandbox::list(&cluster.node.run_dir).unwrap();
    assert!(sandboxes.is_empty(), "sandbox left behind: {sandboxes:?}");
    cluster.assert_no_ip_reservations();
    assert!(!log_path.exists(), "log of a deleted pod left behind");
    drop(cluster.containerd.ctr(&["containers", "list"]));
}

#[test]
fn a_crashing_container_restarts_with_growing_back_off() {
    let cluster = cluster();
    cluster.apply(&cluster.pod_manifest(
        "crash",
        &format!(
            r#"  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "echo attempt; exit 3"]
"#
        ),
    ));
    let pod = cluster.wait_for_pod_within(
        "crash",
        "CrashLoopBackOff",
        Duration::from_secs(30),
        |pod| {
            pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                == "CrashLoopBackOff"
        },
    );
    let container = &pod["status"]["containerStatuses"][0];
    assert_eq!(container["lastState"]["terminated"]["exitCode"], 3);
    assert_eq!(container["lastState"]["terminated"]["reason"], "Error");
    let message = container["state"]["waiting"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("back-off 10s restarting failed container=app pod=crash_default("),
        "{message}"
    );
    assert_eq!(phase(&pod), "Running");
    // After the 10 s back-off it restarts, and the next wait is 20 s.
    let pod = cluster.wait_for_pod_within(
        "crash",
        "the back-off doubling",
        Duration::from_secs(30),
        |pod| {
            pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("back-off 20s"))
        },
    );
    assert!(
        pod["status"]["containerStatuses"][0]["restartCount"]
            .as_u64()
            .unwrap()
            >= 2
    );
}

#[test]
fn probes_restart_unhealthy_containers_and_gate_readiness() {
    let cluster = cluster();
    cluster.apply(&cluster.pod_manifest(
        "probed",
        &format!(
            r#"  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "sleep 2; echo ok > /tmp/ready; sleep 4; rm /tmp/ready; sleep 1000"]
    readinessProbe:
      exec: {{command: ["cat", "/tmp/ready"]}}
      periodSeconds: 1
      failureThreshold: 1
  - name: doomed
    image: {IMAGE}
    command: ["sh", "-c", "sleep 1000"]
    livenessProbe:
      exec: {{command: ["false"]}}
      initialDelaySeconds: 1
      periodSeconds: 1
      failureThreshold: 2
"#
        ),
    ));
    let ready = |pod: &Value| {
        pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "app")
            .is_some_and(|c| c["ready"] == true)
    };
    cluster.wait_for_pod_within("probed", "app ready", Duration::from_secs(30), ready);
    cluster.wait_for_pod_within(
        "probed",
        "app unready again",
        Duration::from_secs(30),
        |pod| !ready(pod) && phase(pod) == "Running",
    );
    let pod = cluster.wait_for_pod_within(
        "probed",
        "doomed restarted by its liveness probe",
        Duration::from_secs(30),
        |pod| {
            pod["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["name"] == "doomed")
                .is_some_and(|c| c["restartCount"].as_u64().unwrap_or(0) >= 1)
        },
    );
    assert_eq!(condition(&pod, "Ready"), "False");
}

#[test]
fn killing_the_agent_restarts_no_container() {
    const PODS: usize = 20;
    let mut cluster = cluster();
    let ids = cluster.start_steady_pods("steady", PODS);
    cluster.node.kill();
    std::thread::sleep(Duration::from_millis(500));
    let PodCluster { node, plane, .. } = &mut cluster.0;
    node.restart(plane);
    // Give the new agent time to look at every pod, then check nothing moved.
    std::thread::sleep(Duration::from_secs(3));
    cluster.assert_steady("steady", &ids);
}

#[test]
fn containerd_restarts_and_pods_keep_running_without_leaks() {
    let mut cluster = cluster();
    let ids = cluster.start_steady_pods("calm", 3);
    cluster.containerd.kill_daemon();
    std::thread::sleep(Duration::from_secs(2));
    cluster.containerd.restart_daemon();
    std::thread::sleep(Duration::from_secs(3));
    cluster.assert_steady("calm", &ids);
    // A new pod still starts, and deleting everything leaves no IP reserved.
    cluster.apply(&cluster.pod_manifest(
        "after",
        &format!(
            "  containers:\n  - name: app\n    image: {IMAGE}\n    command: [\"sleep\", \"1000\"]\n"
        ),
    ));
    cluster.wait_for_pod_within("after", "Running", Duration::from_secs(60), |pod| {
        phase(pod) == "Running"
    });
    cluster.plane.kubectl(&[
        "delete",
        "pods",
        "--all",
        "--grace-period=1",
        "--wait=false",
    ]);
    for name in ["calm-0", "calm-1", "calm-2", "after"] {
        cluster.wait_gone(name, Duration::from_secs(30));
    }
    cluster.assert_no_ip_reservations();
    assert!(cluster.node.pod_cgroups().is_empty(), "pod cgroups leaked");
}

#[test]
fn images_are_pulled_and_a_missing_one_backs_off_with_the_registry_reason() {
    let registry = integration::registry::Registry::start();
    let layout = tempfile::tempdir().expect("temp dir");
    ImageBuilder::busybox().write_layout(layout.path(), "2");
    registry.push_layout(layout.path(), "2", "tools/busybox:2");
    let cluster = cluster_with(&["--insecure-registry", &registry.address]);
    let pulled = registry.reference("tools/busybox:2");
    let missing = registry.reference("tools/nope:1");
    cluster.apply(&cluster.pod_manifest(
        "pulled",
        &format!("  containers:\n  - name: app\n    image: {pulled}\n    command: [\"sleep\", \"1000\"]\n"),
    ));
    cluster.apply(&cluster.pod_manifest(
        "missing",
        &format!("  containers:\n  - name: app\n    image: {missing}\n"),
    ));
    let pod = cluster.wait_for_pod_within("pulled", "Running", Duration::from_secs(60), |pod| {
        phase(pod) == "Running"
    });
    assert!(
        pod["status"]["containerStatuses"][0]["imageID"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    let waiting = |pod: &Value| pod["status"]["containerStatuses"][0]["state"]["waiting"].clone();
    // ErrImagePull shows between two pulls only for an instant; the back-off that follows
    // carries the registry's reason.
    let pod = cluster.wait_for_pod_within(
        "missing",
        "ImagePullBackOff",
        Duration::from_secs(30),
        |pod| waiting(pod)["reason"] == "ImagePullBackOff",
    );
    let message = waiting(&pod)["message"].as_str().unwrap().to_string();
    assert!(
        message.starts_with(&format!(
            "Back-off 10s pulling image \"{missing}\": ErrImagePull: "
        )) && message.contains("manifest unknown"),
        "{message}"
    );
    assert_eq!(phase(&pod), "Pending");
}

#[test]
fn image_pull_secrets_authenticate_pulls_and_a_wrong_password_backs_off_with_the_401() {
    use base64::Engine as _;
    let registry = integration::registry::Registry::start_with_user("puller", "s3cret-pw");
    let layout = tempfile::tempdir().expect("temp dir");
    ImageBuilder::busybox().write_layout(layout.path(), "3");
    registry.push_layout_as(layout.path(), "3", "private/busybox:3", "puller:s3cret-pw");
    let cluster = cluster_with(&["--insecure-registry", &registry.address]);
    let image = registry.reference("private/busybox:3");
    let address = &registry.address;
    let base64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    // A dockerconfigjson secret as `kubectl create secret docker-registry` makes it, a
    // legacy dockercfg one given through the ServiceAccount, and one with a wrong password.
    cluster.plane.kubectl(&[
        "create",
        "secret",
        "docker-registry",
        "good",
        &format!("--docker-server={address}"),
        "--docker-username=puller",
        "--docker-password=s3cret-pw",
    ]);
    let dockercfg = |password: &str| {
        base64(
            &serde_json::json!({ address.as_str(): {"auth": base64(&format!("puller:{password}"))} })
                .to_string(),
        )
    };
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: legacy\ntype: kubernetes.io/dockercfg\ndata:\n  .dockercfg: {}\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: wrong\ntype: kubernetes.io/dockercfg\ndata:\n  .dockercfg: {}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: puller\nimagePullSecrets:\n- name: legacy\n",
        dockercfg("s3cret-pw"),
        dockercfg("not-the-password"),
    ));
    let pod = |name: &str, extra: &str| {
        cluster.apply_pod(
            name,
            &format!(
                "{extra}  containers:\n  - name: app\n    image: {image}\n    imagePullPolicy: Always\n    command: [\"sleep\", \"1000\"]\n"
            ),
        )
    };
    pod("private", "  imagePullSecrets:\n  - name: good\n");
    pod("by-account", "  serviceAccountName: puller\n");
    pod("refused", "  imagePullSecrets:\n  - name: wrong\n");
    for name in ["private", "by-account"] {
        cluster.wait_for_pod(name, "Running", |pod| phase(pod) == "Running");
    }
    let waiting = |pod: &Value| pod["status"]["containerStatuses"][0]["state"]["waiting"].clone();
    let pod = cluster.wait_for_pod("refused", "ImagePullBackOff", |pod| {
        waiting(pod)["reason"] == "ImagePullBackOff"
    });
    let message = waiting(&pod)["message"].as_str().unwrap().to_string();
    assert!(
        message.starts_with(&format!(
            "Back-off 10s pulling image \"{image}\": ErrImagePull: pull {image}: unauthorized: "
        )) && message.ends_with("(401)"),
        "{message}"
    );
}

#[test]
fn volumes_env_and_init_containers_reach_the_container_and_stop_runs_pre_stop_then_term() {
    let cluster = cluster();
    let host_dir = tempfile::tempdir().expect("temp dir");
    cluster.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  greeting: hello\n  mode: fast\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\nstringData:\n  token: s3cret\n",
    );
    cluster.apply(&cluster.pod_manifest(
        "full",
        &format!(
            r#"  terminationGracePeriodSeconds: 10
  initContainers:
  - name: prepare
    image: {IMAGE}
    command: ["sh", "-c", "echo initialized > /work/init.txt"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  containers:
  - name: app
    image: {IMAGE}
    command: ["sh", "-c", "cat /work/init.txt; echo CFG=$CFG_greeting; echo TOKEN=$TOKEN; echo IP=$MY_IP; cat /etc/settings/mode; echo; cat /etc/creds/token; echo; cat /etc/podinfo/labels; echo; trap 'echo term >> /host/events; exit 0' TERM; while true; do sleep 0.1; done"]
    envFrom: [{{prefix: CFG_, configMapRef: {{name: settings}}}}]
    env:
    - {{name: TOKEN, valueFrom: {{secretKeyRef: {{name: creds, key: token}}}}}}
    - {{name: MY_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
    lifecycle:
      preStop:
        exec: {{command: ["sh", "-c", "echo prestop >> /host/events"]}}
    volumeMounts:
    - {{name: work, mountPath: /work}}
    - {{name: settings, mountPath: /etc/settings}}
    - {{name: creds, mountPath: /etc/creds}}
    - {{name: podinfo, mountPath: /etc/podinfo}}
    - {{name: host, mountPath: /host}}
  volumes:
  - {{name: work, emptyDir: {{}}}}
  - {{name: settings, configMap: {{name: settings}}}}
  - {{name: creds, secret: {{secretName: creds}}}}
  - {{name: podinfo, downwardAPI: {{items: [{{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}]}}}}
  - {{name: host, hostPath: {{path: {host}, type: Directory}}}}
"#,
            host = host_dir.path().display()
        ),
    ));
    let pod = cluster.wait_for_pod_within("full", "Running", Duration::from_secs(60), |pod| {
        phase(pod) == "Running"
    });
    let init = &pod["status"]["initContainerStatuses"][0];
    assert_eq!(
        init["state"]["terminated"]["reason"], "Completed",
        "{init:#}"
    );
    assert_eq!(condition(&pod, "Initialized"), "True");
    let ip = pod["status"]["podIP"].as_str().unwrap().to_string();
    let log_path = cluster.log_file(&pod, "app", 0);
    let expected = [
        "initialized".to_string(),
        "CFG=hello".to_string(),
        "TOKEN=s3cret".to_string(),
        format!("IP={ip}"),
        "fast".to_string(),
        "s3cret".to_string(),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter_map(|line| line.splitn(4, ' ').nth(3))
            .collect();
        if expected.iter().all(|e| lines.contains(&e.as_str())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "container output {lines:?} lacks {expected:?}\n{}",
            cluster.node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Deletion runs the preStop hook, then SIGTERM, in that order.
    cluster
        .plane
        .kubectl(&["delete", "pod", "full", "--wait=false"]);
    cluster.wait_gone("full", Duration::from_secs(30));
    let events = std::fs::read_to_string(host_dir.path().join("events")).unwrap_or_default();
    assert_eq!(events, "prestop\nterm\n");
}

#[test]
fn memory_pressure_evicts_best_effort_first_and_guaranteed_last() {
    // A threshold no machine meets: the node is under memory pressure from the start.
    let cluster = cluster_with(&[
        "--eviction-hard",
        "memory.available<100Ti",
        "--eviction-interval-seconds",
        "2",
    ]);
    let pod = |name: &str, resources: &str| {
        cluster.pod_manifest(
            name,
            &format!(
                "  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {IMAGE}\n    command: [\"sleep\", \"1000\"]\n    resources: {resources}\n"
            ),
        )
    };
    let manifests = [
        pod(
            "guaranteed",
            "{requests: {cpu: 100m, memory: 32Mi}, limits: {cpu: 100m, memory: 32Mi}}",
        ),
        pod("burstable", "{requests: {memory: 16Mi}}"),
        pod("besteffort", "{}"),
    ]
    .join("---\n");
    cluster.apply(&manifests);
    let evicted = |name: &str| {
        let pod = cluster.pod(name);
        pod["status"]["reason"] == "Evicted" && phase(&pod) == "Failed"
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !evicted("besteffort") {
        assert!(
            !evicted("burstable") && !evicted("guaranteed"),
            "evicted out of order"
        );
        assert!(
            Instant::now() < deadline,
            "nothing evicted:\n{}",
            cluster.node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pod = cluster.pod("besteffort");
    assert_eq!(
        pod["status"]["message"],
        "The node was low on resource: memory. "
    );
    while !evicted("burstable") {
        assert!(
            !evicted("guaranteed"),
            "guaranteed evicted before burstable"
        );
        assert!(
            Instant::now() < deadline,
            "burstable not evicted:\n{}",
            cluster.node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let node: Value = serde_json::from_str(&cluster.plane.kubectl(&[
        "get",
        "node",
        &cluster.node.name,
        "-o",
        "json",
    ]))
    .unwrap();
    let pressure = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "MemoryPressure")
        .unwrap()
        .clone();
    assert_eq!(pressure["status"], "True", "{pressure:#}");
    // The evicted pods' containers are gone with their cgroups.
    let deadline = Instant::now() + Duration::from_secs(15);
    while cluster.node.pod_cgroups().len() > 1 {
        assert!(
            Instant::now() < deadline,
            "evicted pods still hold cgroups: {:?}",
            cluster.node.pod_cgroups()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_image_user_given_by_name_resolves_in_the_image_and_unknown_or_unverifiable_ones_fail() {
    let cluster = cluster();
    // Images whose config names their user, with passwd and group files of their own.
    let images = tempfile::tempdir().expect("temp dir");
    let passwd: &[u8] = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    let group: &[u8] = b"root:x:0:\nwheel:x:10:root,app\nstaff:x:50:\napp:x:1000:\n";
    for (name, user) in [("named", "app:staff"), ("ghost", "ghost")] {
        let archive = images.path().join(format!("{name}.tar"));
        ImageBuilder::busybox()
            .layer(&[("etc/passwd", passwd), ("etc/group", group)])
            .user(user)
            .write_archive(&archive, "1");
        cluster.node.import_image(
            &cluster.containerd,
            &archive,
            &format!("skiff.test/{name}:1"),
        );
    }
    let pod = |image: &str, security: &str| {
        format!(
            "  terminationGracePeriodSeconds: 1\n{security}  containers:\n  - name: app\n    \
             image: skiff.test/{image}:1\n    imagePullPolicy: Never\n    command: [\"sh\", \
             \"-c\", \"id; sleep 1000\"]\n"
        )
    };
    cluster.apply_pod("named", &pod("named", ""));
    cluster.apply_pod("ghost", &pod("ghost", ""));
    cluster.apply_pod(
        "strict",
        &pod("named", "  securityContext:\n    runAsNonRoot: true\n"),
    );

    // The name and the group resolve in the image's files; the user's memberships are
    // its additional groups.
    let named = cluster.wait_for_pod("named", "Running", |pod| phase(pod) == "Running");
    let lines = cluster.wait_for_output(&named, "app", 0, "id's output", |line| {
        line.starts_with("uid=")
    });
    let id = lines.iter().find(|line| line.starts_with("uid=")).unwrap();
    assert!(
        id.starts_with("uid=1000(app) gid=50(staff) groups="),
        "{id}"
    );
    assert!(id.contains("10(wheel)") && id.contains("50(staff)"), "{id}");

    let waiting = |name: &str, reason: &'static str| {
        cluster.wait_for_pod(name, reason, move |pod| {
            pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == reason
        })["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let message = waiting("ghost", "CreateContainerError");
    assert!(
        message.contains("unable to find user ghost: no matching entries in passwd file"),
        "{message}"
    );
    let message = waiting("strict", "CreateContainerConfigError");
    assert!(
        message.starts_with(
            "container has runAsNonRoot and image has non-numeric user (app), cannot verify \
             user is non-root"
        ),
        "{message}"
    );

    // A failed start leaves no root filesystem behind: the only active snapshot is the
    // running container's, and the read-only views are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snapshots = cluster.containerd.ctr(&["snapshots", "ls"]);
        let active = snapshots.lines().filter(|l| l.contains("Active")).count();
        if active == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{active} active snapshots for one running container:\n{snapshots}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let views = cluster.node.run_dir.join("rootfs-views");
    let leftovers: Vec<_> = std::fs::read_dir(&views)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .collect();
    assert!(leftovers.is_empty(), "mount points left: {leftovers:?}");
}
