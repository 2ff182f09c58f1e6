//! The agent as a systemd service on a real cgroup v2 node, with memory and cpu limits
//! (root only): this host's cgroups are hybrid and it has no systemd, so the test boots a
//! Debian guest under QEMU (`integration::vm`) that runs containerd, `skiff-control`, the
//! real kubectl and `skiff-agent` installed as an operator installs it, from the shipped
//! unit (`agent/systemd/skiff-agent.service`, flags in `/etc/default/skiff-agent`). It
//! checks there that the unit is active with the agent in its cgroup's `agent` leaf, that
//! pods' cgroups are under the unit's delegated cgroup, that a pod limited to 32 Mi which
//! allocates 64 Mi is `OOMKilled`, that a pod limited to 100m cpu is throttled (`cpu.max`,
//! `cpu.stat`), and that `systemctl restart skiff-agent` leaves a running container alone
//! (same container and process, restartCount 0) and the new agent adopts it.
//!
//! The guest image and QEMU are built once and cached (`target/skiff-vm/`); the first run
//! spends about four minutes on debootstrap on the shared development machine, a later one
//! about three minutes in all, two of them in the guest (its boot under TCG about 35 s),
//! and seven while other builds load both cores. Timings are printed, never asserted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use integration::oci_image::ImageBuilder;
use integration::vm::{self, GuestImage, Payload, Qemu, Vm};

/// The whole guest run, boot included: TCG is slow and the machine is shared.
const GUEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The agent unit's cgroup in the guest, relative to the cgroup2 mount.
const AGENT_CGROUP: &str = "system.slice/skiff-agent.service";

/// The pods unit's delegated cgroup in the guest, relative to the cgroup2 mount.
const PODS_CGROUP: &str = "system.slice/skiff-pods.service";

/// The units as the repository ships them, installed into the guest as they are.
const AGENT_UNIT: &str = include_str!("../../agent/systemd/skiff-agent.service");
const PODS_UNIT: &str = include_str!("../../agent/systemd/skiff-pods.service");

/// The guest's script: starts the node with the agent as a systemd service, runs the two
/// pods, restarts the agent, reports on the console.
const GUEST_SCRIPT: &str = r#"#!/bin/sh
# Runs at boot in the guest (skiff-vm-test.service) with the payload disk at $P. Every
# line for the host starts with "SKIFF-VM "; "done" is the last one.
set -u
P=/mnt/skiff
W=/var/lib/skiff-vm
export HOME=/root PATH="$P:$PATH" KUBECONFIG=$W/control/admin.kubeconfig
# The pods unit's cgroup, relative to /sys/fs/cgroup, once it runs.
CG=

say() { echo "SKIFF-VM $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
dump() {
    echo "----- pods"; kubectl get pods -o yaml 2>&1 | tail -n 80
    echo "----- node"; kubectl get node vm -o yaml 2>&1 | tail -n 40
    echo "----- agent unit"; systemctl status skiff-agent --no-pager 2>&1 | tail -n 30
    echo "----- agent log"; journalctl -u skiff-agent --no-pager 2>&1 | tail -n 60
    echo "----- control log"; tail -n 20 $W/control.log
    echo "----- containerd"; journalctl -u containerd --no-pager 2>&1 | tail -n 20
}
die() { say "error $*"; dump; say done; exit 1; }
# wait_for SECONDS COMMAND...: true once COMMAND succeeds, false after SECONDS.
wait_for() {
    end=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -ge "$end" ] && return 1
        sleep 1
    done
}
field() { kubectl get "$1" "$2" -o "jsonpath=$3" 2>/dev/null; }
node_ready() { [ "$(field node vm '{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
pod_dir() {
    uid=$(field pod "$1" '{.metadata.uid}')
    find /sys/fs/cgroup$CG/kubepods -maxdepth 2 -type d -name "pod$uid" | head -n 1
}
stat_of() { awk -v k="$2" '$1 == k { print $2 }' "$1"; }
unit() { systemctl show -p "$1" --value skiff-agent; }
pods_unit() { systemctl show -p "$1" --value skiff-pods; }
cgroup_of() { sed -n 's/^0:://p' "/proc/$1/cgroup"; }
# The words of a file joined by commas ("-" when it has none).
words() { w=$(tr -s ' \n' ',' < "$1" | sed 's/^,//; s/,$//'); echo "${w:--}"; }

say boot uptime=$(now) kernel=$(uname -r) fs=$(stat -fc %T /sys/fs/cgroup) controllers=$(tr ' ' , < /sys/fs/cgroup/cgroup.controllers) systemd=$(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
mkdir -p $W

t=$(now)
systemctl start containerd || die "systemctl start containerd failed"
wait_for 120 test -S /run/containerd/containerd.sock || die "containerd socket missing after 120 s"
say timing containerd=$(since $t)

t=$(now)
RUST_LOG=warn $P/skiff-control serve --listen 127.0.0.1:6443 --data-dir $W/control > $W/control.log 2>&1 &
wait_for 180 grep -q "skiff-control serving" $W/control.log || die "skiff-control did not serve within 180 s"
say timing control=$(since $t)

mkdir -p /etc/cni/net.d
cat > /etc/cni/net.d/10-skiff.conflist <<EOF
{"cniVersion": "1.1.0", "name": "skiff", "plugins": [{"type": "skiff-cni", "bridge": "skiff0",
 "isGateway": true, "ipMasq": false, "ipam": {"type": "host-local", "subnet": "10.88.0.0/24",
 "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
# The agent as an operator installs it: the binary, the shipped units unchanged, the flags
# (no --cgroup-root: the agent takes the pods unit's delegated cgroup) in /etc/default.
ln -s $P/skiff-agent /usr/local/bin/skiff-agent
install -m 0644 $P/skiff-agent.service $P/skiff-pods.service /etc/systemd/system/
verify=$(systemd-analyze verify --man=no /etc/systemd/system/skiff-agent.service /etc/systemd/system/skiff-pods.service 2>&1 | tr -s ' \n' '_')
say verify output=${verify:-none}
cat > /etc/default/skiff-agent <<EOF
RUST_LOG=info
SKIFF_AGENT_ARGS="--node-name vm --kubeconfig $KUBECONFIG --node-ip 127.0.0.1 --pod-cidr 10.88.0.0/24 --cni-conf-dir /etc/cni/net.d --cni-bin-dir $P --node-api-listen 127.0.0.1:10250 --client-ca-file $W/control/pki/ca.crt --service-lb=false --eviction-hard=memory.available<1Mi --status-report-seconds 5"
EOF
systemctl daemon-reload || die "systemctl daemon-reload failed"
t=$(now)
# Type=notify: returns once the agent sent READY=1 (registered, serving); skiff-pods
# (BindsTo=, After=) has started before it.
systemctl start skiff-agent || die "systemctl start skiff-agent failed"
say timing agent_started=$(since $t)
wait_for 240 node_ready || die "node vm not Ready within 240 s"
say timing agent_ready=$(since $t)
CG=$(pods_unit ControlGroup)
main=$(unit MainPID)
holder=$(pods_unit MainPID)
say unit active=$(systemctl is-active skiff-agent) type=$(unit Type) cgroup=$(unit ControlGroup) agent_cgroup=$(cgroup_of $main) agent_children=$(find /sys/fs/cgroup$(unit ControlGroup) -mindepth 1 -type d | wc -l)
say pods-unit active=$(systemctl is-active skiff-pods) delegate=$(pods_unit Delegate) cgroup=$CG holder_cgroup=$(cgroup_of $holder) unit_procs=$(words /sys/fs/cgroup$CG/cgroup.procs) subtree_control=$(words /sys/fs/cgroup$CG/cgroup.subtree_control)
say node ready=True
say node-message "$(field node vm '{.status.conditions[?(@.type=="Ready")].message}')"

t=$(now)
agentctl image import --cgroup-root "$CG" --name skiff.test/busybox $P/busybox.tar || die "agentctl image import failed"
agentctl image list --cgroup-root "$CG"
say timing image_import=$(since $t)

# (a) 32 Mi limit, 64 Mi allocated by dd's buffer: the kernel kills it in its cgroup. The
# pod restarts it (OnFailure), so the pod's cgroup, with the oom_kill count in its
# memory.events, stays to be read (the agent removes a finished pod's cgroup).
t=$(now)
kubectl apply -f - <<EOF || die "kubectl apply of pod oom failed"
apiVersion: v1
kind: Pod
metadata:
  name: oom
spec:
  nodeName: vm
  hostNetwork: true
  restartPolicy: OnFailure
  containers:
  - name: hog
    image: skiff.test/busybox:1
    imagePullPolicy: Never
    command: ["/bin/busybox", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]
    resources:
      limits:
        memory: 32Mi
EOF
# The last termination: the current state's, else lastState's (after a restart).
terminated() {
    value=$(field pod oom "{.status.containerStatuses[0].state.terminated.$1}")
    [ -n "$value" ] || value=$(field pod oom "{.status.containerStatuses[0].lastState.terminated.$1}")
    echo "$value"
}
oom_done() { [ -n "$(terminated reason)" ]; }
wait_for 300 oom_done || die "pod oom did not terminate within 300 s"
reason=$(terminated reason)
code=$(terminated exitCode)
dir=$(pod_dir oom)
if [ -n "$dir" ]; then
    memory_max=$(cat $dir/memory.max)
    oom_kill=$(stat_of $dir/memory.events oom_kill)
else
    memory_max=no-pod-cgroup oom_kill=no-pod-cgroup dir=none
fi
say oom reason=$reason exit_code=$code pod_memory_max=$memory_max oom_kill=$oom_kill pod_cgroup=$dir seconds=$(since $t)
kubectl delete pod oom --wait=false

# (b) 100m cpu limit, a busy loop: cpu.max is 10 ms per 100 ms, and the loop is throttled.
t=$(now)
kubectl apply -f - <<EOF || die "kubectl apply of pod spin failed"
apiVersion: v1
kind: Pod
metadata:
  name: spin
spec:
  nodeName: vm
  hostNetwork: true
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: spin
    image: skiff.test/busybox:1
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "while :; do :; done"]
    resources:
      limits:
        cpu: 100m
EOF
spin_running() { [ "$(field pod spin '{.status.phase}')" = Running ]; }
wait_for 300 spin_running || die "pod spin not Running within 300 s"
dir=$(pod_dir spin)
[ -n "$dir" ] || die "no cgroup for pod spin under /sys/fs/cgroup$CG/kubepods"
usage0=$(stat_of $dir/cpu.stat usage_usec); t0=$(now)
sleep 10
usage1=$(stat_of $dir/cpu.stat usage_usec)
share=$(awk -v u="$((usage1 - usage0))" -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", u / 1e6 / (b - a) }')
container_max=$(tr ' ' / < $dir/spin/cpu.max 2>/dev/null || echo none)
say cpu pod_cpu_max=$(tr ' ' / < $dir/cpu.max) container_cpu_max=$container_max nr_periods=$(stat_of $dir/cpu.stat nr_periods) nr_throttled=$(stat_of $dir/cpu.stat nr_throttled) throttled_usec=$(stat_of $dir/cpu.stat throttled_usec) cpu_share=$share pod_cgroup=$dir seconds=$(since $t)

# (c) systemctl restart skiff-agent while spin runs: the unit signals the agent alone.
status() { field pod spin "{.status.containerStatuses[0].$1}"; }
id0=$(status containerID); count0=$(status restartCount); procs0=$(words $dir/spin/cgroup.procs)
main0=$(unit MainPID); holder0=$(pods_unit MainPID)
t=$(now)
systemctl restart skiff-agent || die "systemctl restart skiff-agent failed"
say timing agent_restart=$(since $t)
main1=$(unit MainPID)
# Room for the new agent's first pass over the adopted pod and its status report.
sleep 5
say restart active=$(systemctl is-active skiff-agent) main_pid_changed=$([ "$main0" != "$main1" ] && echo yes || echo no) agent_cgroup=$(cgroup_of $main1) pods_active=$(systemctl is-active skiff-pods) holder_same=$([ "$holder0" = "$(pods_unit MainPID)" ] && echo yes || echo no) id_before=$id0 id_after=$(status containerID) restart_count_before=$count0 restart_count_after=$(status restartCount) running_after=$([ -n "$(status state.running.startedAt)" ] && echo yes || echo no) procs_before=$procs0 procs_after=$(words $dir/spin/cgroup.procs) seconds=$(since $t)
# Only an agent that adopted the pod stops it and removes its cgroup.
t=$(now)
kubectl delete pod spin --timeout=120s >/dev/null 2>&1
gone() { [ ! -d "$dir" ] && ! kubectl get pod spin >/dev/null 2>&1; }
if wait_for 120 gone; then adopted=yes; else adopted=no; fi
say adopt deleted_after_restart=$adopted seconds=$(since $t)

say timing total=$(now)
say done
"#;

#[test]
fn memory_and_cpu_limits_are_enforced_on_a_cgroup_v2_guest() {
    integration::require_root("the guest VM test builds a root file system with debootstrap");
    vm::require_host_tools();

    let started = Instant::now();
    let qemu = Qemu::get();
    let image = GuestImage::get();
    eprintln!(
        "vm: guest image and QEMU ready in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        image.dir.display()
    );

    let preparing = Instant::now();
    let payload = Payload::new();
    for binary in ["skiff-control", "skiff-agent", "agentctl", "skiff-cni"] {
        payload.copy(binary, &integration::binary(binary));
    }
    payload.copy("kubectl", &versioned_kubectl());
    payload.script("skiff-agent.service", AGENT_UNIT);
    payload.script("skiff-pods.service", PODS_UNIT);
    ImageBuilder::busybox().write_archive(&payload.path().join("busybox.tar"), "1");
    payload.script("run.sh", GUEST_SCRIPT);
    eprintln!(
        "vm: payload (binaries, kubectl, busybox image, script) ready in {:.1} s",
        preparing.elapsed().as_secs_f64()
    );

    let mut guest = Vm::boot(&qemu, &image, &payload, 1024);
    let results = guest.wait_for_result("done", GUEST_TIMEOUT);
    let total = guest.elapsed();
    guest.shut_down(Duration::from_secs(30));
    eprintln!(
        "vm: guest run took {:.1} s, {:.1} s with its power-off",
        total.as_secs_f64(),
        guest.elapsed().as_secs_f64()
    );

    let find = |name: &str| {
        results
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(String::as_str)
    };
    if let Some(error) = find("error") {
        panic!("the guest failed: {error}\n{}", guest_console_tail(&guest));
    }
    let boot = vm::fields(find("boot").expect("the guest's boot line"));
    assert_eq!(
        value(&boot, "fs"),
        "cgroup2fs",
        "the guest is not a pure cgroup v2 node"
    );
    let message = find("node-message").unwrap_or_default();
    assert!(
        !message.contains("memory.max") && !message.contains("cpu.max"),
        "the agent reports limits it cannot enforce on the guest: {message}"
    );

    let verify = vm::fields(find("verify").expect("the guest's verify line"));
    assert_eq!(
        value(&verify, "output"),
        "none",
        "systemd-analyze verify of the shipped units"
    );
    let unit = vm::fields(find("unit").expect("the guest's unit line"));
    assert_eq!(
        value(&unit, "active"),
        "active",
        "skiff-agent.service: {unit:?}"
    );
    assert_eq!(
        value(&unit, "type"),
        "notify",
        "skiff-agent.service: {unit:?}"
    );
    assert_eq!(
        value(&unit, "agent_cgroup"),
        format!("/{AGENT_CGROUP}"),
        "skiff-agent.service: {unit:?}"
    );
    assert_eq!(
        value(&unit, "agent_children"),
        "0",
        "the agent made cgroups under its own unit's: {unit:?}"
    );
    let pods_unit = vm::fields(find("pods-unit").expect("the guest's pods-unit line"));
    assert_eq!(
        value(&pods_unit, "active"),
        "active",
        "skiff-pods.service: {pods_unit:?}"
    );
    assert_eq!(
        value(&pods_unit, "cgroup"),
        format!("/{PODS_CGROUP}"),
        "skiff-pods.service: {pods_unit:?}"
    );
    assert_eq!(
        value(&pods_unit, "holder_cgroup"),
        format!("/{PODS_CGROUP}/holder"),
        "the holder did not move into its leaf: {pods_unit:?}"
    );
    assert_eq!(
        value(&pods_unit, "unit_procs"),
        "-",
        "processes left in the pods unit's own cgroup: {pods_unit:?}"
    );
    let subtree_control: Vec<&str> = value(&pods_unit, "subtree_control").split(',').collect();
    for controller in ["cpu", "memory", "pids"] {
        assert!(
            subtree_control.contains(&controller),
            "{controller} not enabled for the pods unit's children: {pods_unit:?}"
        );
    }
    let under_pods_unit = |line: &BTreeMap<String, String>| {
        value(line, "pod_cgroup").starts_with(&format!("/sys/fs/cgroup/{PODS_CGROUP}/kubepods/"))
    };

    let oom = vm::fields(find("oom").expect("the guest's oom line"));
    assert!(
        under_pods_unit(&oom),
        "pod oom's cgroup is not under the pods unit's: {oom:?}"
    );
    assert_eq!(value(&oom, "reason"), "OOMKilled", "pod oom: {oom:?}");
    assert_eq!(value(&oom, "exit_code"), "137", "pod oom: {oom:?}");
    assert_eq!(
        value(&oom, "pod_memory_max"),
        (32 << 20).to_string(),
        "pod oom: {oom:?}"
    );
    let oom_kills: u64 = value(&oom, "oom_kill")
        .parse()
        .unwrap_or_else(|_| panic!("no oom_kill count from the pod's cgroup: {oom:?}"));
    assert!(
        oom_kills > 0,
        "no oom_kill in the pod's memory.events: {oom:?}"
    );

    let cpu = vm::fields(find("cpu").expect("the guest's cpu line"));
    assert_eq!(
        value(&cpu, "pod_cpu_max"),
        "10000/100000",
        "pod spin: {cpu:?}"
    );
    assert_eq!(
        value(&cpu, "container_cpu_max"),
        "10000/100000",
        "pod spin: {cpu:?}"
    );
    let count = |key: &str| -> u64 {
        value(&cpu, key)
            .parse()
            .unwrap_or_else(|_| panic!("{key} in {cpu:?}"))
    };
    assert!(count("nr_throttled") > 0, "pod spin not throttled: {cpu:?}");
    assert!(
        count("throttled_usec") > 0,
        "pod spin not throttled: {cpu:?}"
    );
    assert!(
        under_pods_unit(&cpu),
        "pod spin's cgroup is not under the pods unit's: {cpu:?}"
    );

    let restart = vm::fields(find("restart").expect("the guest's restart line"));
    assert_eq!(
        value(&restart, "active"),
        "active",
        "after the restart: {restart:?}"
    );
    assert_eq!(
        value(&restart, "main_pid_changed"),
        "yes",
        "systemctl restart did not restart the agent: {restart:?}"
    );
    assert_eq!(
        value(&restart, "agent_cgroup"),
        format!("/{AGENT_CGROUP}"),
        "{restart:?}"
    );
    assert_eq!(value(&restart, "pods_active"), "active", "{restart:?}");
    assert_eq!(
        value(&restart, "holder_same"),
        "yes",
        "restarting the agent restarted skiff-pods.service: {restart:?}"
    );
    assert!(
        value(&restart, "id_before").starts_with("containerd://"),
        "pod spin had no container ID before the restart: {restart:?}"
    );
    assert_eq!(
        value(&restart, "id_after"),
        value(&restart, "id_before"),
        "the agent's restart replaced the container: {restart:?}"
    );
    assert_eq!(
        value(&restart, "restart_count_after"),
        "0",
        "the agent's restart restarted the container: {restart:?}"
    );
    assert_eq!(value(&restart, "running_after"), "yes", "{restart:?}");
    assert_ne!(value(&restart, "procs_before"), "-", "{restart:?}");
    assert_eq!(
        value(&restart, "procs_after"),
        value(&restart, "procs_before"),
        "the container's processes changed across the agent's restart: {restart:?}"
    );
    let adopt = vm::fields(find("adopt").expect("the guest's adopt line"));
    assert_eq!(
        value(&adopt, "deleted_after_restart"),
        "yes",
        "the restarted agent did not stop and remove the pod it should have adopted: \
         {adopt:?}"
    );
}

/// A result field, or "(missing)" so that the assertion shows the whole line.
fn value<'a>(fields: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    fields.get(key).map_or("(missing)", String::as_str)
}

/// The kubectl release the dispatcher on PATH would run against skiff-control (which
/// reports v1.31): the guest has no dispatcher, so it gets that binary itself.
fn versioned_kubectl() -> std::path::PathBuf {
    integration::require_tool("kubectl", "the real kubectl must be on PATH");
    let output = std::process::Command::new("sh")
        .args(["-c", "command -v kubectl"])
        .output()
        .expect("find kubectl");
    let path = std::path::PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let dispatcher = std::fs::canonicalize(&path).unwrap_or(path);
    let release = dispatcher.with_file_name("kubectl.1.31");
    assert!(
        release.exists(),
        "{} not found: the guest needs the kubectl release the dispatcher {} runs for v1.31",
        release.display(),
        dispatcher.display()
    );
    release
}

fn guest_console_tail(guest: &Vm) -> String {
    let console = guest.console();
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(150)..].join("\n")
}
