//! The OCI runtime spec of one container of a pod: process (command, args, env, the user
//! [`super::user`] resolved, capabilities, rlimits), the pod's namespaces and cgroup,
//! mounts and the hardening defaults containerd gives every container. Pure: everything
//! it needs is passed in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, SecurityContext};
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilities, LinuxDeviceCgroup, LinuxNamespace,
    LinuxNamespaceType, LinuxResources, Mount, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

/// The capabilities every container gets unless its securityContext says otherwise:
/// containerd's (and Docker's) default set.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Paths hidden from unprivileged containers (containerd's list).
const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

/// Paths read-only for unprivileged containers (containerd's list).
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

use super::user::Identity;

/// What the image says about how to run it (from its config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// A host path mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// Where the pod's shared namespaces live (bind-mounted by the sandbox). `None`: the pod
/// has no namespace of that kind of its own (`hostNetwork` pods have no network and no
/// UTS namespace); the spec then has no entry for it, so runc shares its own, the node's.
#[derive(Debug, Clone, Default)]
pub struct PodNamespaces {
    pub net: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
}

/// Everything the spec of one container is built from.
pub struct ContainerSpecInput<'a> {
    pub container: &'a Container,
    pub image: &'a ImageDefaults,
    /// The container's environment, resolved (env, envFrom, downward API), in order.
    pub env: &'a [(String, String)],
    pub namespaces: &'a PodNamespaces,
    /// The container's cgroup, relative to the cgroup2 mount root.
    pub cgroups_path: &'a str,
    /// Volume mounts, /etc/hosts, /etc/resolv.conf, /etc/hostname, termination log.
    pub mounts: &'a [BindMount],
    pub hostname: &'a str,
    /// Who the process runs as, resolved against the image's files ([`super::user`]).
    pub user: &'a Identity,
    /// The process's `oom_score_adj` (the kubelet's QoS policy,
    /// [`crate::cgroups::container_oom_score_adj`]).
    pub oom_score_adj: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("container {container}: no command given and the image has no entrypoint or cmd")]
    NoCommand { container: String },
    #[error("container {container}: build the runtime spec: {source}")]
    Oci {
        container: String,
        source: oci_spec::OciSpecError,
    },
}

/// Expands `$(VAR)` references with the container's environment as the kubelet does:
/// `$$` escapes a dollar, and a reference to an unknown variable stays as written.
pub fn expand(text: &str, env: &BTreeMap<&str, &str>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(position) = rest.find('$') {
        out.push_str(&rest[..position]);
        let after = &rest[position + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The process arguments, with Kubernetes' rules for command and args over the image's
/// entrypoint and cmd.
pub fn process_args(
    container: &Container,
    image: &ImageDefaults,
    env: &BTreeMap<&str, &str>,
) -> Vec<String> {
    let command = container.command.as_deref().unwrap_or_default();
    let args = container.args.as_deref().unwrap_or_default();
    let expand_all = |items: &[String]| {
        items
            .iter()
            .map(|item| expand(item, env))
            .collect::<Vec<_>>()
    };
    match (command.is_empty(), args.is_empty()) {
        (false, _) => [expand_all(command), expand_all(args)].concat(),
        (true, false) => [image.entrypoint.clone(), expand_all(args)].concat(),
        (true, true) => [image.entrypoint.clone(), image.cmd.clone()].concat(),
    }
}

fn capability(name: &str) -> Option<Capability> {
    let name = name.trim().to_ascii_uppercase();
    let name = if name.starts_with("CAP_") {
        name
    } else {
        format!("CAP_{name}")
    };
    serde_json::from_value(serde_json::Value::String(name)).ok()
}

fn all_capabilities() -> Vec<Capability> {
    // Every capability the kernel has that the spec's enum names.
    [
        "AUDIT_CONTROL",
        "AUDIT_READ",
        "AUDIT_WRITE",
        "BLOCK_SUSPEND",
        "BPF",
        "CHECKPOINT_RESTORE",
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "IPC_LOCK",
        "IPC_OWNER",
        "KILL",
        "LEASE",
        "LINUX_IMMUTABLE",
        "MAC_ADMIN",
        "MAC_OVERRIDE",
        "MKNOD",
        "NET_ADMIN",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_RAW",
        "PERFMON",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_CHROOT",
        "SYS_MODULE",
        "SYS_NICE",
        "SYS_PACCT",
        "SYS_PTRACE",
        "SYS_RAWIO",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "SYSLOG",
        "WAKE_ALARM",
    ]
    .into_iter()
    .filter_map(capability)
    .collect()
}

/// The capability set after the securityContext's add and drop (drop "ALL" empties it).
fn capabilities(security: Option<&SecurityContext>, privileged: bool) -> Vec<Capability> {
    if privileged {
        return all_capabilities();
    }
    let adjust = security.and_then(|s| s.capabilities.as_ref());
    let drop: Vec<String> = adjust
        .and_then(|c| c.drop.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|name| {
            name.to_ascii_uppercase()
                .trim_start_matches("CAP_")
                .to_string()
        })
        .collect();
    let mut names: Vec<String> = if drop.iter().any(|name| name == "ALL") {
        Vec::new()
    } else {
        DEFAULT_CAPABILITIES
            .iter()
            .filter(|name| !drop.iter().any(|dropped| dropped == *name))
            .map(|name| name.to_string())
            .collect()
    };
    for added in adjust.and_then(|c| c.add.clone()).unwrap_or_default() {
        let added = added
            .to_ascii_uppercase()
            .trim_start_matches("CAP_")
            .to_string();
        if added == "ALL" {
            return all_capabilities();
        }
        if !names.contains(&added) {
            names.push(added);
        }
    }
    names.iter().filter_map(|name| capability(name)).collect()
}

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Mount {
    let mut mount = Mount::default();
    mount.set_destination(PathBuf::from(destination));
    mount.set_typ(Some(kind.to_string()));
    mount.set_source(Some(PathBuf::from(source)));
    mount.set_options(Some(options.iter().map(|o| o.to_string()).collect()));
    mount
}

/// The filesystems every container gets, as containerd's default spec has them.
fn default_mounts(privileged: bool) -> Vec<Mount> {
    let sys_mode = if privileged { "rw" } else { "ro" };
    vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sys_mode],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", sys_mode],
        ),
    ]
}

fn bind(mount_spec: &BindMount) -> Mount {
    let mut options = vec!["rbind", "rprivate"];
    options.push(if mount_spec.read_only { "ro" } else { "rw" });
    let source = mount_spec.source.to_string_lossy();
    mount(&mount_spec.destination, "bind", &source, &options)
}

/// Builds the runtime spec of one container.
pub fn container_spec(input: &ContainerSpecInput<'_>) -> Result<Spec, SpecError> {
    let container = input.container;
    let name = container.name.as_str();
    let oci = |source| SpecError::Oci {
        container: name.to_string(),
        source,
    };
    let env_map: BTreeMap<&str, &str> = input
        .env
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    let args = process_args(container, input.image, &env_map);
    if args.is_empty() {
        return Err(SpecError::NoCommand {
            container: name.to_string(),
        });
    }

    // Environment: the image's, then PATH if the image has none, then the pod's (later wins
    // in execve's view, but keep one entry per name so `env` shows what Kubernetes set).
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: &str| {
        if let Some(entry) = env.iter_mut().find(|(k, _)| k == key) {
            entry.1 = value.to_string();
        } else {
            env.push((key.to_string(), value.to_string()));
        }
    };
    set(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    for entry in &input.image.env {
        if let Some((key, value)) = entry.split_once('=') {
            set(key, value);
        }
    }
    set("HOSTNAME", input.hostname);
    for (key, value) in input.env {
        set(key, value);
    }
    let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();

    let security = container.security_context.as_ref();
    let privileged = security.and_then(|s| s.privileged).unwrap_or(false);
    let user = UserBuilder::default()
        .uid(input.user.uid)
        .gid(input.user.gid)
        .additional_gids(input.user.additional_gids.clone())
        .build()
        .map_err(oci)?;

    let caps: oci_spec::runtime::Capabilities =
        capabilities(security, privileged).into_iter().collect();
    let mut capability_sets = LinuxCapabilities::default();
    capability_sets.set_bounding(Some(caps.clone()));
    capability_sets.set_effective(Some(caps.clone()));
    capability_sets.set_permitted(Some(caps));
    capability_sets.set_inheritable(None);
    capability_sets.set_ambient(None);

    // Kubernetes' allowPrivilegeEscalation defaults to true; false maps to no_new_privs.
    let no_new_privileges = !privileged
        && security
            .and_then(|s| s.allow_privilege_escalation)
            .is_some_and(|allow| !allow);
    let working_dir = container
        .working_dir
        .clone()
        .filter(|dir| !dir.is_empty())
        .or_else(|| {
            input
                .image
                .working_dir
                .clone()
                .filter(|dir| !dir.is_empty())
        })
        .unwrap_or_else(|| "/".to_string());
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(args)
        .env(env)
        .cwd(working_dir)
        .user(user)
        .capabilities(capability_sets)
        .no_new_privileges(no_new_privileges)
        .oom_score_adj(input.oom_score_adj)
        // No rlimits: the container inherits the runtime's (containerd's unit sets them,
        // e.g. LimitNOFILE), as containerd's CRI plugin does; raising a hard limit above
        // the runtime's own fails without CAP_SYS_RESOURCE in the host.
        .rlimits(Vec::new())
        .build()
        .map_err(oci)?;

    let namespace = |typ, path: Option<&Path>| {
        let mut namespace = LinuxNamespace::default();
        namespace.set_typ(typ);
        namespace.set_path(path.map(Path::to_path_buf));
        namespace
    };
    let pod_namespaces = &input.namespaces;
    let joined = [
        (LinuxNamespaceType::Network, &pod_namespaces.net),
        (LinuxNamespaceType::Ipc, &pod_namespaces.ipc),
        (LinuxNamespaceType::Uts, &pod_namespaces.uts),
    ];
    let mut namespaces = vec![
        namespace(LinuxNamespaceType::Pid, None),
        namespace(LinuxNamespaceType::Mount, None),
    ];
    namespaces.extend(
        joined
            .into_iter()
            .filter_map(|(typ, path)| Some(namespace(typ, Some(path.as_deref()?)))),
    );
    namespaces.push(namespace(LinuxNamespaceType::Cgroup, None));
    // Limits are written by the agent into the cgroup itself; the runtime only places the
    // process and applies the device rules (deny all but the defaults it adds).
    let mut resources = LinuxResources::default();
    let mut deny_all = LinuxDeviceCgroup::default();
    deny_all.set_allow(privileged);
    deny_all.set_access(Some("rwm".to_string()));
    resources.set_devices(Some(vec![deny_all]));
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(input.cgroups_path))
        .resources(resources)
        .build()
        .map_err(oci)?;
    if privileged {
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
    } else {
        linux.set_masked_paths(Some(MASKED_PATHS.iter().map(|p| p.to_string()).collect()));
        linux.set_readonly_paths(Some(READONLY_PATHS.iter().map(|p| p.to_string()).collect()));
    }

    let read_only_root = security
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false);
    let root = RootBuilder::default()
        .path("rootfs")
        .readonly(read_only_root)
        .build()
        .map_err(oci)?;

    let mut mounts = default_mounts(privileged);
    mounts.extend(input.mounts.iter().map(bind));
    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_root(Some(root));
    // runc refuses a hostname without a UTS namespace of the container's own: a pod that
    // shares the node's has the node's hostname, and HOSTNAME in its environment says so.
    spec.set_hostname(
        pod_namespaces
            .uts
            .is_some()
            .then(|| input.hostname.to_string()),
    );
    spec.set_mounts(Some(mounts));
    spec.set_linux(Some(linux));
    spec.set_annotations(None);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    fn pod(containers: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u1"},
            "spec": {"containers": containers},
        }))
        .unwrap()
    }

    #[test]
    fn variables_expand_as_the_kubelet_expands_them() {
        let env = BTreeMap::from([("A", "1"), ("B", "two")]);
        assert_eq!(expand("$(A)-$(B)", &env), "1-two");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(MISSING)", &env), "$(MISSING)");
        assert_eq!(expand("cost $5", &env), "cost $5");
        assert_eq!(expand("$(A", &env), "$(A");
    }

    #[test]
    fn command_and_args_override_the_image_as_kubernetes_says() {
        let image = ImageDefaults {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            ..Default::default()
        };
        let env = BTreeMap::from([("X", "x")]);
        let container = |value| serde_json::from_value::<Container>(value).unwrap();
        let both = container(json!({"name": "c", "command": ["/bin/sh"], "args": ["-c", "$(X)"]}));
        assert_eq!(process_args(&both, &image, &env), ["/bin/sh", "-c", "x"]);
        let args_only = container(json!({"name": "c", "args": ["a"]}));
        assert_eq!(process_args(&args_only, &image, &env), ["/entry", "a"]);
        let command_only = container(json!({"name": "c", "command": ["/run"]}));
        assert_eq!(process_args(&command_only, &image, &env), ["/run"]);
        let neither = container(json!({"name": "c"}));
        assert_eq!(process_args(&neither, &image, &env), ["/entry", "default"]);
    }

    #[test]
    fn capabilities_follow_add_and_drop() {
        let security: SecurityContext = serde_json::from_value(
            json!({"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "CAP_KILL"]}}),
        )
        .unwrap();
        let caps = capabilities(Some(&security), false);
        assert_eq!(caps, vec![Capability::NetAdmin, Capability::Kill]);
        let defaults = capabilities(None, false);
        assert_eq!(defaults.len(), DEFAULT_CAPABILITIES.len());
        assert!(capabilities(None, true).contains(&Capability::SysAdmin));
    }

    #[test]
    fn spec_joins_the_pod_namespaces_and_cgroup() {
        let pod = pod(
            json!([{"name": "app", "image": "busybox", "command": ["sleep", "1"],
            "securityContext": {"runAsUser": 1000, "readOnlyRootFilesystem": true}}]),
        );
        let container = &pod.spec.as_ref().unwrap().containers[0];
        let namespaces = PodNamespaces {
            net: Some("/run/skiff/pods/u1/ns/net".into()),
            ipc: Some("/run/skiff/pods/u1/ns/ipc".into()),
            uts: Some("/run/skiff/pods/u1/ns/uts".into()),
        };
        let mounts = [BindMount {
            source: "/run/skiff/pods/u1/hosts".into(),
            destination: "/etc/hosts".into(),
            read_only: false,
        }];
        let user = Identity {
            uid: 1000,
            gid: 1000,
            additional_gids: vec![1000, 10],
        };
        let spec = container_spec(&ContainerSpecInput {
            oom_score_adj: 1000,
            container,
            image: &ImageDefaults::default(),
            env: &[("GREETING".into(), "hi".into())],
            namespaces: &namespaces,
            cgroups_path: "/skiff/kubepods/besteffort/podu1/app",
            mounts: &mounts,
            hostname: "web",
            user: &user,
        })
        .unwrap();
        let value = serde_json::to_value(&spec).unwrap();
        assert_eq!(value["process"]["args"], json!(["sleep", "1"]));
        assert_eq!(
            value["process"]["user"],
            json!({"uid": 1000, "gid": 1000, "additionalGids": [1000, 10]})
        );
        assert!(
            value["process"]["env"]
                .as_array()
                .unwrap()
                .contains(&json!("GREETING=hi"))
        );
        assert_eq!(value["root"]["readonly"], true);
        assert_eq!(
            value["linux"]["cgroupsPath"],
            "/skiff/kubepods/besteffort/podu1/app"
        );
        let net = value["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|ns| ns["type"] == "network")
            .unwrap();
        assert_eq!(net["path"], "/run/skiff/pods/u1/ns/net");
        assert_eq!(value["hostname"], "web");
        assert!(value["linux"]["resources"].get("memory").is_none());
        let hosts = value["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/etc/hosts")
            .unwrap();
        assert_eq!(hosts["source"], "/run/skiff/pods/u1/hosts");
    }

    #[test]
    fn a_host_network_pod_joins_only_its_ipc_namespace() {
        let pod = pod(json!([{"name": "app", "image": "busybox", "command": ["true"]}]));
        let namespaces = PodNamespaces {
            ipc: Some("/run/skiff/pods/u1/ns/ipc".into()),
            ..PodNamespaces::default()
        };
        let spec = container_spec(&ContainerSpecInput {
            oom_score_adj: 1000,
            container: &pod.spec.as_ref().unwrap().containers[0],
            image: &ImageDefaults::default(),
            env: &[],
            namespaces: &namespaces,
            cgroups_path: "/x",
            mounts: &[],
            hostname: "node-1",
            user: &Identity::default(),
        })
        .unwrap();
        let value = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            value["linux"]["namespaces"],
            json!([
                {"type": "pid"},
                {"type": "mount"},
                {"type": "ipc", "path": "/run/skiff/pods/u1/ns/ipc"},
                {"type": "cgroup"},
            ])
        );
        assert!(value.get("hostname").is_none(), "{value}");
        assert!(
            value["process"]["env"]
                .as_array()
                .unwrap()
                .contains(&json!("HOSTNAME=node-1"))
        );
    }
}
