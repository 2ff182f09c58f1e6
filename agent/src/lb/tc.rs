//! The load balancer for clients outside the node: loads `tc.o` (NodePort, externalIP and
//! LoadBalancer-IP translation with connection tracking in `ct4`) so that it shares the
//! service maps pinned by the socket datapath, and attaches its programs to the ingress and
//! egress of the node's external interfaces, in any network namespace.
//!
//! The attachments are tcx links (kernel ≥ 6.6), pinned under
//! `<bpffs_dir>/tc/<netns inode>/<ingress|egress>/<interface>`, so the datapath keeps
//! working while the agent is down and a restarted agent swaps its new programs into the
//! same links atomically (`BPF_LINK_UPDATE`). On older kernels aya falls back to netlink
//! `cls_bpf` filters, which cannot be pinned: they stay on the interface after the agent
//! exits, are found again by program name, and are replaced with a short gap.
//!
//! Every function here blocks on netlink and `bpf()`; call them from a plain thread or
//! `spawn_blocking`. Namespace changes happen only on short-lived threads of their own.

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapError};
use aya::pin::PinError;
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{self, SchedClassifierLink};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfError, EbpfLoader};
use skiff_ebpf::lb::{CT_MAP, TC_EGRESS_PROGRAM, TC_INGRESS_PROGRAM};

/// Where on an interface a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The program of `tc.o` that runs here.
    pub fn program(self) -> &'static str {
        match self {
            Direction::Ingress => TC_INGRESS_PROGRAM,
            Direction::Egress => TC_EGRESS_PROGRAM,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Direction::Ingress => TcAttachType::Ingress,
            Direction::Egress => TcAttachType::Egress,
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error("read pinned map {}: {source}", path.display())]
    PinnedMap { path: PathBuf, source: MapError },
    #[error("pinned map {} has {what} {found}, tc.o needs {expected}", path.display())]
    PinnedMapMismatch {
        path: PathBuf,
        what: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("load tc.o with maps pinned under {}: {source}", bpffs_dir.display())]
    LoadObject {
        bpffs_dir: PathBuf,
        source: Box<EbpfError>,
    },
    #[error("program {program} missing from tc.o")]
    MissingProgram { program: &'static str },
    #[error("load program {program} of tc.o: {source}")]
    LoadProgram {
        program: &'static str,
        source: ProgramError,
    },
    #[error("add clsact qdisc to {interface}: {source}")]
    AddQdisc {
        interface: String,
        source: io::Error,
    },
    #[error("attach {program} to {interface} {direction}: {source}")]
    Attach {
        interface: String,
        direction: Direction,
        program: &'static str,
        source: ProgramError,
    },
    #[error("pin tc link of {interface} {direction} at {}: {source}", path.display())]
    PinLink {
        interface: String,
        direction: Direction,
        path: PathBuf,
        source: PinError,
    },
    #[error("create tc link pin directory {}: {source}", path.display())]
    PinDir { path: PathBuf, source: io::Error },
    #[error("open tc link pin {}: {source}", path.display())]
    OpenPin { path: PathBuf, source: LinkError },
    #[error("remove tc link pin {}: {source}", path.display())]
    Unpin { path: PathBuf, source: io::Error },
    #[error("detach {program} from {interface} {direction}: {source}")]
    Detach {
        interface: String,
        direction: Direction,
        program: &'static str,
        source: io::Error,
    },
    #[error("network namespace {}: {source}", path.display())]
    Netns {
        path: PathBuf,
        source: crate::sandbox::SandboxError,
    },
    #[error("identify the network namespace of a tc thread: {source}")]
    NetnsId { source: io::Error },
}

/// `tc.o`, loaded, its maps shared with the pins under `bpffs_dir`.
pub struct TcDatapath {
    ebpf: Ebpf,
    bpffs_dir: PathBuf,
}

impl std::fmt::Debug for TcDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcDatapath")
            .field("bpffs_dir", &self.bpffs_dir)
            .finish_non_exhaustive()
    }
}

impl TcDatapath {
    /// Loads `tc.o` with its maps pinned by name under `bpffs_dir`: maps already pinned
    /// there (by the socket datapath, or by an earlier agent) are reused with their size,
    /// the others are created and pinned. `ct4` gets `ct_max_entries` when it is created;
    /// a pinned `ct4` keeps its size (resize by removing the pin while nothing is attached).
    /// Load the socket datapath first, so that the shared maps carry its configured sizes.
    pub fn load(bpffs_dir: &Path, ct_max_entries: u32) -> Result<TcDatapath, TcError> {
        let mut loader = EbpfLoader::new();
        loader.map_pin_path(bpffs_dir);
        for name in skiff_ebpf::lb::TC_MAPS {
            let Some((key_size, value_size)) = skiff_ebpf::lb::map_layout(name) else {
                continue;
            };
            let path = bpffs_dir.join(name);
            if !path.exists() {
                if name == CT_MAP {
                    loader.set_max_entries(name, ct_max_entries);
                }
                continue;
            }
            let max_entries = pinned_max_entries(&path, key_size, value_size)?;
            loader.set_max_entries(name, max_entries);
        }
        let mut ebpf =
            loader
                .load(skiff_ebpf::TC_OBJECT)
                .map_err(|source| TcError::LoadObject {
                    bpffs_dir: bpffs_dir.to_path_buf(),
                    source: Box::new(source),
                })?;
        for direction in Direction::BOTH {
            let program = classifier(&mut ebpf, direction.program())?;
            program.load().map_err(|source| TcError::LoadProgram {
                program: direction.program(),
                source,
            })?;
        }
        Ok(TcDatapath {
            ebpf,
            bpffs_dir: bpffs_dir.to_path_buf(),
        })
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// Attaches the ingress and egress programs to each of `interfaces` in the network
    /// namespace at `netns` (a `/proc/<pid>/ns/net` or `ip netns` file; `None`: the
    /// agent's). An interface that already has skiff's pinned links gets this object's
    /// programs swapped in without a gap. Idempotent.
    pub fn attach(&mut self, netns: Option<&Path>, interfaces: &[&str]) -> Result<(), TcError> {
        let bpffs_dir = self.bpffs_dir.clone();
        let ebpf = &mut self.ebpf;
        in_netns(netns, move || {
            let pin_dir = link_pin_dir(&bpffs_dir)?;
            for direction in Direction::BOTH {
                let dir = pin_dir.join(direction.as_str());
                std::fs::create_dir_all(&dir)
                    .map_err(|source| TcError::PinDir { path: dir, source })?;
            }
            for interface in interfaces {
                add_clsact(interface)?;
                for direction in Direction::BOTH {
                    let program = classifier(ebpf, direction.program())?;
                    let pin = link_pin_path(&pin_dir, interface, direction);
                    attach_one(program, interface, direction, &pin)?;
                }
            }
            Ok(())
        })?
    }
}

/// Removes skiff's tc programs from `interfaces` in the network namespace at `netns`
/// (`None`: the agent's): unpins their tcx links, which detaches them, and deletes netlink
/// filters of the same names. Interfaces without them, or gone, are fine.
pub fn detach(bpffs_dir: &Path, netns: Option<&Path>, interfaces: &[&str]) -> Result<(), TcError> {
    in_netns(netns, || {
        let pin_dir = link_pin_dir(bpffs_dir)?;
        for interface in interfaces {
            for direction in Direction::BOTH {
                let pin = link_pin_path(&pin_dir, interface, direction);
                if pin.exists() {
                    // Unpinning drops the last reference to the link: the kernel detaches it.
                    let link = PinnedLink::from_pin(&pin).map_err(|source| TcError::OpenPin {
                        path: pin.clone(),
                        source,
                    })?;
                    drop(link.unpin().map_err(|source| TcError::Unpin {
                        path: pin.clone(),
                        source,
                    })?);
                    continue;
                }
                detach_netlink(interface, direction)?;
            }
        }
        // The directories go once their last link does; a failure only leaves one empty.
        for direction in Direction::BOTH {
            let _ = std::fs::remove_dir(pin_dir.join(direction.as_str()));
        }
        let _ = std::fs::remove_dir(&pin_dir);
        Ok(())
    })?
}

/// Runs `f` on a new thread that entered the network namespace at `netns` (`None`: stays
/// in the caller's), and returns what it returns. Sockets `f` creates stay in that
/// namespace wherever they are used later. The thread ends with `f`, so no thread of the
/// process is left in another namespace.
pub fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> T + Send) -> Result<T, TcError> {
    match netns {
        Some(path) => crate::sandbox::run_in_namespace(path, crate::sandbox::Namespace::Net, f)
            .map_err(|source| TcError::Netns {
                path: path.to_path_buf(),
                source,
            }),
        None => Ok(std::thread::scope(|scope| {
            scope
                .spawn(f)
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })),
    }
}

fn pinned_max_entries(path: &Path, key_size: usize, value_size: usize) -> Result<u32, TcError> {
    let map_error = |source| TcError::PinnedMap {
        path: path.to_path_buf(),
        source,
    };
    let info = MapData::from_pin(path)
        .and_then(|map| map.info())
        .map_err(map_error)?;
    for (what, found, expected) in [
        ("key size", info.key_size(), key_size),
        ("value size", info.value_size(), value_size),
    ] {
        let expected = u32::try_from(expected).expect("map layouts are small");
        if found != expected {
            return Err(TcError::PinnedMapMismatch {
                path: path.to_path_buf(),
                what,
                found,
                expected,
            });
        }
    }
    Ok(info.max_entries())
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, TcError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(TcError::MissingProgram { program: name })?;
    program.try_into().map_err(|source| TcError::LoadProgram {
        program: name,
        source,
    })
}

/// The pin directory of the calling thread's network namespace: interface names are only
/// unique within one.
fn link_pin_dir(bpffs_dir: &Path) -> Result<PathBuf, TcError> {
    let netns = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|source| TcError::NetnsId { source })?;
    Ok(bpffs_dir.join("tc").join(netns.ino().to_string()))
}

/// bpffs refuses names with a dot, which interface names may have (`eth0.100`, a VLAN);
/// they cannot have a colon, so a colon stands for the dot.
fn link_pin_path(pin_dir: &Path, interface: &str, direction: Direction) -> PathBuf {
    pin_dir
        .join(direction.as_str())
        .join(interface.replace('.', ":"))
}

/// Adds the clsact qdisc that netlink filters need (tcx links do not); one already there
/// is fine.
fn add_clsact(interface: &str) -> Result<(), TcError> {
    match tc::qdisc_add_clsact(interface) {
        Err(error) if error.kind() != io::ErrorKind::AlreadyExists => Err(TcError::AddQdisc {
            interface: interface.to_owned(),
            source: error,
        }),
        _ => Ok(()),
    }
}

fn attach_one(
    program: &mut SchedClassifier,
    interface: &str,
    direction: Direction,
    pin: &Path,
) -> Result<(), TcError> {
    let attach_error = |source| TcError::Attach {
        interface: interface.to_owned(),
        direction,
        program: direction.program(),
        source,
    };
    if pin.exists() {
        if let Some(link) = pinned_link(pin)? {
            // BPF_LINK_UPDATE: the interface never runs without a program.
            match program.attach_to_link(link) {
                Ok(link_id) => {
                    // The pin holds the link; the program's copy of the descriptor can go.
                    drop(program.take_link(link_id).map_err(attach_error)?);
                    return Ok(());
                }
                // A link whose interface was deleted is defunct: replace it below.
                Err(error) => tracing::info!(
                    interface,
                    %direction,
                    %error,
                    "replacing a tc link that cannot be updated"
                ),
            }
        }
        std::fs::remove_file(pin).map_err(|source| TcError::Unpin {
            path: pin.to_path_buf(),
            source,
        })?;
    } else {
        // Netlink filters of an earlier agent (old kernels) would otherwise run twice.
        detach_netlink(interface, direction)?;
    }
    let link_id = program
        .attach(interface, direction.attach_type())
        .map_err(attach_error)?;
    let link = program.take_link(link_id).map_err(attach_error)?;
    if <&FdLink>::try_from(&link).is_err() {
        // A netlink filter cannot be pinned; dropping `link` would remove it, so it is
        // forgotten instead, and `detach` finds the filter by program name.
        std::mem::forget(link);
        return Ok(());
    }
    let link = FdLink::try_from(link).expect("checked to be a tcx link");
    link.pin(pin).map_err(|source| TcError::PinLink {
        interface: interface.to_owned(),
        direction,
        path: pin.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// The tcx link pinned at `pin`, or `None` when the pin holds something else.
fn pinned_link(pin: &Path) -> Result<Option<SchedClassifierLink>, TcError> {
    let link = PinnedLink::from_pin(pin).map_err(|source| TcError::OpenPin {
        path: pin.to_path_buf(),
        source,
    })?;
    Ok(SchedClassifierLink::try_from(FdLink::from(link)).ok())
}

fn detach_netlink(interface: &str, direction: Direction) -> Result<(), TcError> {
    match tc::qdisc_detach_program(interface, direction.attach_type(), direction.program()) {
        Ok(()) => Ok(()),
        // No such filter, no clsact qdisc, or no such interface: nothing to detach.
        Err(error)
            if error.kind() == io::ErrorKind::NotFound
                || error.raw_os_error() == Some(nix::libc::EINVAL)
                || error.raw_os_error() == Some(nix::libc::ENODEV) =>
        {
            Ok(())
        }
        Err(source) => Err(TcError::Detach {
            interface: interface.to_owned(),
            direction,
            program: direction.program(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_named_by_interface_and_direction() {
        let dir = Path::new("/bpf/tc/4026531840");
        assert_eq!(
            link_pin_path(dir, "eth0", Direction::Ingress),
            Path::new("/bpf/tc/4026531840/ingress/eth0")
        );
        assert_eq!(
            link_pin_path(dir, "eth0.100", Direction::Egress),
            Path::new("/bpf/tc/4026531840/egress/eth0:100")
        );
        assert_eq!(Direction::Ingress.program(), "skiff_tc_ingress");
    }

    #[test]
    fn in_netns_without_a_namespace_runs_on_its_own_thread() {
        let caller = std::thread::current().id();
        let other = in_netns(None, || std::thread::current().id()).expect("run");
        assert_ne!(caller, other);
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let error = in_netns(Some(Path::new("/nonexistent/netns")), || ()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "network namespace /nonexistent/netns: open /nonexistent/netns: No such file or directory (os error 2)"
        );
    }
}
