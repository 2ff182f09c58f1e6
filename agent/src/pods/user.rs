//! Who a container's process runs as: the image's `User` (`name`, `uid`, `name:group`,
//! `uid:group`, `name:gid`, `uid:gid`) or the securityContext's `runAsUser`/`runAsGroup`,
//! resolved against the `/etc/passwd` and `/etc/group` of the container's own root
//! filesystem, with the additional GIDs of the user's group memberships (containerd's
//! `WithUser` and `WithAdditionalGIDs`), and the kubelet's `runAsNonRoot` check.
//!
//! Pure but for reading the two files under a root directory passed in; mounting the
//! container's snapshot to get that directory is [`super::rootfs_view`]'s.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// A user or a group as the image or the pod names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Id {
    Numeric(u32),
    Name(String),
}

impl Id {
    fn parse(text: &str) -> Self {
        text.parse()
            .map_or_else(|_| Self::Name(text.to_string()), Self::Numeric)
    }
}

/// Who the container asks to run as, before its root filesystem is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRequest {
    pub user: Id,
    /// The group when one is given (runAsGroup, or the image's `:group`); otherwise the
    /// user's primary group from `/etc/passwd`.
    pub group: Option<Id>,
    /// The pod's supplementalGroups, added after the user's own groups.
    pub supplemental_groups: Vec<u32>,
}

/// The resolved process identity, as the OCI spec's `process.user` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// The primary GID first, then the groups `/etc/group` lists the user in, then the
    /// pod's supplementalGroups.
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The kubelet's runAsNonRoot refusals (CreateContainerConfigError).
    #[error("{0}")]
    NonRoot(String),
    #[error("invalid user {user:?} in the image config: more than one ':'")]
    Invalid { user: String },
    #[error("{field}: {value} is not a valid id")]
    OutOfRange { field: &'static str, value: i64 },
    #[error("unable to find user {name}: no matching entries in passwd file")]
    UnknownUser { name: String },
    #[error("unable to find group {name}: no matching entries in group file")]
    UnknownGroup { name: String },
    #[error("read {path} in the container's root filesystem {root}: {errno}")]
    Read {
        root: PathBuf,
        path: &'static str,
        errno: Errno,
    },
}

/// The effective runAsNonRoot, runAsUser and runAsGroup: the container's over the pod's.
fn effective(pod: &Pod, container: &Container) -> (Option<bool>, Option<i64>, Option<i64>) {
    let own = container.security_context.as_ref();
    let pod_level = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.security_context.as_ref());
    let non_root = own
        .and_then(|s| s.run_as_non_root)
        .or_else(|| pod_level.and_then(|s| s.run_as_non_root));
    let user = own
        .and_then(|s| s.run_as_user)
        .or_else(|| pod_level.and_then(|s| s.run_as_user));
    let group = own
        .and_then(|s| s.run_as_group)
        .or_else(|| pod_level.and_then(|s| s.run_as_group));
    (non_root, user, group)
}

/// Splits the image's `User` into its user and optional group; an empty user part is
/// root, as containerd reads `:group`.
fn parse_image_user(text: &str) -> Result<(Id, Option<Id>), UserError> {
    let mut parts = text.split(':');
    let user = parts.next().unwrap_or_default();
    let group = parts.next();
    if parts.next().is_some() {
        return Err(UserError::Invalid {
            user: text.to_string(),
        });
    }
    let user = if user.is_empty() {
        Id::Numeric(0)
    } else {
        Id::parse(user)
    };
    Ok((user, group.filter(|g| !g.is_empty()).map(Id::parse)))
}

fn id_in_range(field: &'static str, value: i64) -> Result<u32, UserError> {
    u32::try_from(value).map_err(|_| UserError::OutOfRange { field, value })
}

impl UserRequest {
    /// Who the container runs as: runAsUser replaces the image's whole `User` (as the
    /// kubelet passes it to the runtime); runAsGroup replaces only the group.
    ///
    /// Fails with the kubelet's own words when runAsNonRoot cannot hold: runAsUser 0, an
    /// image that runs as root (no `User`, or uid 0), or an image user given by name,
    /// which the kubelet cannot verify without the image's files and refuses whatever the
    /// name resolves to (`verifyRunAsNonRoot`).
    ///
    /// One deliberate difference: the kubelet drops the image's `:group` (it hands the
    /// runtime only the user, kubernetes/kubernetes#61967); skiff keeps it, as containerd's
    /// and Docker's `User` handling do.
    pub fn new(
        pod: &Pod,
        container: &Container,
        image_user: Option<&str>,
    ) -> Result<Self, UserError> {
        let (run_as_non_root, run_as_user, run_as_group) = effective(pod, container);
        let (image_user, image_group) = parse_image_user(image_user.unwrap_or_default())?;
        if run_as_non_root == Some(true) {
            let what = match (run_as_user, &image_user) {
                (Some(0), _) => Some("container's runAsUser breaks non-root policy".to_string()),
                (Some(_), _) => None,
                (None, Id::Numeric(0)) => {
                    Some("container has runAsNonRoot and image will run as root".to_string())
                }
                (None, Id::Name(name)) => Some(format!(
                    "container has runAsNonRoot and image has non-numeric user ({name}), cannot \
                     verify user is non-root"
                )),
                (None, Id::Numeric(_)) => None,
            };
            if let Some(what) = what {
                return Err(UserError::NonRoot(format!(
                    "{what} (pod: {:?}, container: {})",
                    super::pod_ref(pod),
                    container.name
                )));
            }
        }
        let (user, mut group) = match run_as_user {
            Some(uid) => (Id::Numeric(id_in_range("runAsUser", uid)?), None),
            None => (image_user, image_group),
        };
        if let Some(gid) = run_as_group {
            group = Some(Id::Numeric(id_in_range("runAsGroup", gid)?));
        }
        let supplemental_groups = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.security_context.as_ref())
            .and_then(|s| s.supplemental_groups.as_deref())
            .unwrap_or_default()
            .iter()
            .filter_map(|&g| u32::try_from(g).ok())
            .collect();
        Ok(Self {
            user,
            group,
            supplemental_groups,
        })
    }

    /// The identity in the container whose root filesystem is at `root`.
    pub fn resolve(&self, root: &Path) -> Result<Identity, UserError> {
        let passwd = read_in_root(root, "/etc/passwd")?;
        let passwd = passwd.as_deref().map(parse_passwd).unwrap_or_default();
        let groups = read_in_root(root, "/etc/group")?;
        let groups = groups.as_deref().map(parse_group).unwrap_or_default();

        // containerd's WithUserID: a uid with no passwd entry runs with GID 0; a name must
        // be there.
        let (uid, mut gid, name) = match &self.user {
            Id::Numeric(uid) => match passwd.iter().find(|entry| entry.uid == *uid) {
                Some(entry) => (*uid, entry.gid, Some(entry.name.as_str())),
                None => (*uid, 0, None),
            },
            Id::Name(name) => match passwd.iter().find(|entry| &entry.name == name) {
                Some(entry) => (entry.uid, entry.gid, Some(entry.name.as_str())),
                None => return Err(UserError::UnknownUser { name: name.clone() }),
            },
        };
        match &self.group {
            None => {}
            Some(Id::Numeric(number)) => gid = *number,
            Some(Id::Name(group)) => {
                gid = groups
                    .iter()
                    .find(|entry| &entry.name == group)
                    .map(|entry| entry.gid)
                    .ok_or_else(|| UserError::UnknownGroup {
                        name: group.clone(),
                    })?;
            }
        }
        // containerd's WithAdditionalGIDs: the groups listing the user as a member, but
        // not one named as the user; the primary GID leads the list (its fix of
        // CVE-2023-25173), the pod's supplementalGroups follow (WithSupplementalGroups).
        let mut additional_gids = vec![gid];
        if let Some(name) = name {
            additional_gids.extend(
                groups
                    .iter()
                    .filter(|group| group.name != name && group.members.iter().any(|m| m == name))
                    .map(|group| group.gid),
            );
        }
        additional_gids.extend(&self.supplemental_groups);
        let mut seen = std::collections::BTreeSet::new();
        additional_gids.retain(|g| seen.insert(*g));
        Ok(Identity {
            uid,
            gid,
            additional_gids,
        })
    }
}

/// One `/etc/passwd` line: `name:password:uid:gid:gecos:home:shell`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

/// One `/etc/group` line: `name:password:gid:member,member`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// The fields of the file's lines; blank lines and comments are skipped.
fn lines(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split(':').collect())
}

/// Entries whose ids do not parse are skipped (rather than read as 0, which would make a
/// broken line root).
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    lines(text)
        .filter_map(|fields| {
            Some(PasswdEntry {
                name: fields.first()?.to_string(),
                uid: fields.get(2)?.parse().ok()?,
                gid: fields.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    lines(text)
        .filter_map(|fields| {
            Some(GroupEntry {
                name: fields.first()?.to_string(),
                gid: fields.get(2)?.parse().ok()?,
                members: fields
                    .get(3)
                    .map(|list| {
                        list.split(',')
                            .map(str::trim)
                            .filter(|m| !m.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// The file at `path` as the container sees it, `None` when it does not exist. Resolved
/// with `RESOLVE_IN_ROOT`, so an image's symlinks (absolute or `..`) stay inside `root`
/// and never make the agent read a file of the node.
fn read_in_root(root: &Path, path: &'static str) -> Result<Option<String>, UserError> {
    let error = |errno| UserError::Read {
        root: root.to_path_buf(),
        path,
        errno,
    };
    let root_dir = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(error)?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let file = match nix::fcntl::openat2(&root_dir, path, how) {
        Ok(fd) => std::fs::File::from(fd),
        Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(None),
        Err(errno) => return Err(error(errno)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE)
        .read_to_end(&mut bytes)
        .map_err(|e| {
            error(Errno::from_raw(
                e.raw_os_error().unwrap_or(Errno::EIO as i32),
            ))
        })?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// How much of `/etc/passwd` or `/etc/group` is read, so that an image cannot make the
/// agent read without end. (A FIFO there opens without blocking, `O_NONBLOCK`, and reads
/// empty: it has no writer.)
const MAX_FILE_SIZE: u64 = 16 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(security: serde_json::Value, container_security: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u1"},
            "spec": {
                "securityContext": security,
                "containers": [{"name": "app", "image": "x", "securityContext": container_security}],
            },
        }))
        .unwrap()
    }

    fn request(pod: &Pod, image_user: Option<&str>) -> Result<UserRequest, UserError> {
        UserRequest::new(pod, &pod.spec.as_ref().unwrap().containers[0], image_user)
    }

    /// A root filesystem with the usual busybox-like passwd and group files.
    fn rootfs() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n\
             # a comment\n\
             \n\
             app:x:1000:1000::/home/app:/bin/sh\n\
             broken:x:notanumber:1::/:/bin/false\n\
             nobody:x:65534:65534:nobody:/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(
            root.path().join("etc/group"),
            "root:x:0:\nwheel:x:10:root,app\nstaff:x:50:app\napp:x:1000:app\n\
             nogroup:x:65533:\nnobody:x:65534:\n",
        )
        .unwrap();
        root
    }

    fn resolve(image_user: &str) -> Result<Identity, UserError> {
        let root = rootfs();
        let pod = pod(json!({}), json!({}));
        request(&pod, Some(image_user))?.resolve(root.path())
    }

    #[test]
    fn every_form_of_image_user_resolves_against_the_image_files() {
        let identity = |uid, gid, additional_gids: &[u32]| Identity {
            uid,
            gid,
            additional_gids: additional_gids.to_vec(),
        };
        // A name: its uid and primary group, and the groups that list it (not the one
        // named after it).
        assert_eq!(
            resolve("app").unwrap(),
            identity(1000, 1000, &[1000, 10, 50])
        );
        assert_eq!(resolve("nobody").unwrap(), identity(65534, 65534, &[65534]));
        assert_eq!(
            resolve("nobody:nogroup").unwrap(),
            identity(65534, 65533, &[65533])
        );
        assert_eq!(resolve("app:staff").unwrap(), identity(1000, 50, &[50, 10]));
        assert_eq!(
            resolve("1000:staff").unwrap(),
            identity(1000, 50, &[50, 10])
        );
        assert_eq!(
            resolve("app:4242").unwrap(),
            identity(1000, 4242, &[4242, 10, 50])
        );
        assert_eq!(
            resolve("1000:4242").unwrap(),
            identity(1000, 4242, &[4242, 10, 50])
        );
        // A uid with no passwd entry runs with GID 0 and no groups to look up.
        assert_eq!(resolve("4000").unwrap(), identity(4000, 0, &[0]));
        // No user at all is root, with root's memberships.
        assert_eq!(resolve("").unwrap(), identity(0, 0, &[0, 10]));
    }

    #[test]
    fn unknown_names_fail_with_the_name() {
        let error = resolve("ghost").unwrap_err();
        assert_eq!(
            error.to_string(),
            "unable to find user ghost: no matching entries in passwd file"
        );
        let error = resolve("app:ghosts").unwrap_err();
        assert_eq!(
            error.to_string(),
            "unable to find group ghosts: no matching entries in group file"
        );
        // A line whose uid does not parse is no user.
        assert!(matches!(
            resolve("broken").unwrap_err(),
            UserError::UnknownUser { .. }
        ));
        assert!(matches!(
            resolve("a:b:c").unwrap_err(),
            UserError::Invalid { .. }
        ));
    }

    #[test]
    fn an_image_without_passwd_runs_numeric_users_and_refuses_names() {
        let root = tempfile::tempdir().unwrap();
        let pod = pod(json!({}), json!({}));
        let numeric = request(&pod, Some("1234:5")).unwrap();
        assert_eq!(
            numeric.resolve(root.path()).unwrap(),
            Identity {
                uid: 1234,
                gid: 5,
                additional_gids: vec![5],
            }
        );
        let named = request(&pod, Some("nobody")).unwrap();
        assert!(matches!(
            named.resolve(root.path()).unwrap_err(),
            UserError::UnknownUser { .. }
        ));
    }

    #[test]
    fn run_as_user_and_group_override_the_image_and_supplemental_groups_follow() {
        let root = rootfs();
        let pod = pod(
            json!({"runAsUser": 1000, "supplementalGroups": [3000, 10]}),
            json!({"runAsGroup": 2000}),
        );
        let identity = request(&pod, Some("nobody:nogroup"))
            .unwrap()
            .resolve(root.path())
            .unwrap();
        assert_eq!(
            identity,
            Identity {
                uid: 1000,
                gid: 2000,
                additional_gids: vec![2000, 10, 50, 3000],
            }
        );
        // runAsUser replaces the image's group too: the passwd entry's gid is used.
        let pod = super::tests::pod(json!({}), json!({"runAsUser": 65534}));
        let identity = request(&pod, Some("app:staff"))
            .unwrap()
            .resolve(root.path())
            .unwrap();
        assert_eq!((identity.uid, identity.gid), (65534, 65534));
    }

    #[test]
    fn symlinks_in_the_image_stay_inside_its_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("passwd"), "evil:x:0:0::/:/bin/sh\n").unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        // An absolute link to a file of the node, as an image may carry one.
        std::os::unix::fs::symlink(
            outside.path().join("passwd"),
            root.path().join("etc/passwd"),
        )
        .unwrap();
        let pod = pod(json!({}), json!({}));
        let error = request(&pod, Some("evil"))
            .unwrap()
            .resolve(root.path())
            .unwrap_err();
        assert!(matches!(error, UserError::UnknownUser { .. }), "{error}");
        // A link inside the image is followed.
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd.real"),
            "app:x:7:8::/:/bin/sh\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd.real", root.path().join("etc/passwd")).unwrap();
        let identity = request(&pod, Some("app"))
            .unwrap()
            .resolve(root.path())
            .unwrap();
        assert_eq!((identity.uid, identity.gid), (7, 8));
    }

    #[test]
    fn run_as_non_root_is_verified_as_the_kubelet_does() {
        let message = |pod: &Pod, user: Option<&str>| match request(pod, user) {
            Ok(_) => None,
            Err(UserError::NonRoot(message)) => Some(message),
            Err(other) => panic!("unexpected {other}"),
        };
        let non_root = pod(json!({"runAsNonRoot": true}), json!({}));
        assert_eq!(
            message(&non_root, Some("nobody")).as_deref(),
            Some(
                "container has runAsNonRoot and image has non-numeric user (nobody), cannot \
                 verify user is non-root (pod: \"web_default(u1)\", container: app)"
            )
        );
        assert_eq!(
            message(&non_root, None).as_deref(),
            Some(
                "container has runAsNonRoot and image will run as root (pod: \
                 \"web_default(u1)\", container: app)"
            )
        );
        assert!(
            message(&non_root, Some("0:100"))
                .unwrap()
                .starts_with("container has runAsNonRoot and image will run as root")
        );
        assert_eq!(message(&non_root, Some("1000")), None);
        assert_eq!(message(&non_root, Some("1000:staff")), None);
        // runAsUser decides when set, whatever the image says.
        let explicit = pod(json!({"runAsNonRoot": true}), json!({"runAsUser": 1000}));
        assert_eq!(message(&explicit, Some("nobody")), None);
        let root = pod(json!({"runAsNonRoot": true, "runAsUser": 0}), json!({}));
        assert!(
            message(&root, Some("1000"))
                .unwrap()
                .starts_with("container's runAsUser breaks non-root policy")
        );
        // The container's false overrides the pod's true.
        let allowed = pod(
            json!({"runAsNonRoot": true}),
            json!({"runAsNonRoot": false}),
        );
        assert_eq!(message(&allowed, Some("nobody")), None);
    }
}
