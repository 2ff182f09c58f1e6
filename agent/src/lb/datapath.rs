//! The kernel side of the load balancer as the agent holds it: the socket object loaded with
//! its maps pinned by name under the bpffs directory (reused when already there), and cgroup
//! links pinned under `<bpffs_dir>/links/`, so the datapath keeps serving while the agent is
//! down. A restarted agent points the pinned links at its freshly loaded programs with
//! `BPF_LINK_UPDATE`: there is never a moment without a program on the hook.

use std::fs;
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use aya::programs::CgroupSockAddr;
use aya::{Ebpf, EbpfLoader};
use skiff_ebpf::lb::{
    AFFINITY_MAP, BACKEND_STATS_MAP, BACKENDS_MAP, Lb4Backend, Lb4FrontendName, Lb4Key,
    Lb4ReverseNat, Lb4Service, LbBackendStats, NAMES_MAP, REVERSE_SK_MAP, REVNAT_MAP, SERVICES_MAP,
    SK_FORWARD_MAP, SOCK_MAPS, SOCK_PROGRAMS,
};
use skiff_ebpf::sys::{self, SockAddrAttachType};

use super::LbError;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Map sizes (max entries), set at first load. Maps already pinned keep their size: resizing
/// means removing the pins, which interrupts the datapath, so the agent only warns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Frontend slots: one per frontend plus one per backend of each frontend.
    pub services: u32,
    /// Backends, one per (frontend, endpoint); also the size of the per-backend counters.
    pub backends: u32,
    /// Translated sockets remembered for recvmsg/getpeername, and unconnected UDP flows
    /// kept on their backend (two LRU maps of this size).
    pub reverse_sk: u32,
    /// ClientIP affinity entries (LRU).
    pub affinity: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: 262_144,
            backends: 131_072,
            reverse_sk: 262_144,
            affinity: 65_536,
        }
    }
}

/// The maps the programmer writes, typed.
pub struct Maps {
    pub services: HashMap<MapData, Lb4Key, Lb4Service>,
    pub backends: HashMap<MapData, u32, Lb4Backend>,
    pub revnat: HashMap<MapData, u16, Lb4ReverseNat>,
    pub names: HashMap<MapData, u16, Lb4FrontendName>,
    pub stats: PerCpuArray<MapData, LbBackendStats>,
    pub sizes: MapSizes,
    /// Descriptors of the same maps for batch writes (aya's typed maps keep theirs private).
    pub batch: BatchFds,
}

/// Second descriptors of the maps the programmer writes in batches.
pub struct BatchFds {
    pub services: std::os::fd::OwnedFd,
    pub backends: std::os::fd::OwnedFd,
    pub revnat: std::os::fd::OwnedFd,
    pub names: std::os::fd::OwnedFd,
}

impl BatchFds {
    fn open(bpffs_dir: &Path) -> Result<Self, LbError> {
        let open = |name: &str| {
            let path = bpffs_dir.join(name);
            sys::obj_get(&path).map_err(|source| LbError::Io {
                call: "open pinned map",
                path,
                source,
            })
        };
        Ok(Self {
            services: open(SERVICES_MAP)?,
            backends: open(BACKENDS_MAP)?,
            revnat: open(REVNAT_MAP)?,
            names: open(NAMES_MAP)?,
        })
    }
}

/// The loaded socket programs and their maps.
pub struct Datapath {
    bpffs_dir: PathBuf,
    ebpf: Ebpf,
    maps: Option<Maps>,
}

/// Where systemd mounts the machine's bpffs at boot.
const SYSTEM_BPFFS: &str = "/sys/fs/bpf";

/// Makes `dir` a directory on a bpffs: created inside the bpffs that holds it already
/// (`/sys/fs/bpf/skiff` on a systemd host), or with a bpffs mounted at `/sys/fs/bpf` when
/// `dir` is below it and nothing is mounted there yet (as systemd would), or with a bpffs
/// instance of its own mounted at `dir`.
pub fn ensure_bpffs(dir: &Path) -> Result<(), LbError> {
    let system = Path::new(SYSTEM_BPFFS);
    if !dir.exists() && dir.starts_with(system) && system.is_dir() && !is_bpffs(system)? {
        mount_bpffs(system)?;
    }
    fs::create_dir_all(dir).map_err(|source| LbError::Io {
        call: "create",
        path: dir.to_owned(),
        source,
    })?;
    if is_bpffs(dir)? {
        return Ok(());
    }
    mount_bpffs(dir)
}

fn mount_bpffs(dir: &Path) -> Result<(), LbError> {
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| LbError::Io {
        call: "mount bpffs at",
        path: dir.to_owned(),
        source: errno.into(),
    })
}

fn is_bpffs(dir: &Path) -> Result<bool, LbError> {
    let stat = nix::sys::statfs::statfs(dir).map_err(|errno| LbError::Io {
        call: "statfs",
        path: dir.to_owned(),
        source: errno.into(),
    })?;
    #[allow(
        clippy::useless_conversion,
        reason = "the field's type differs between libcs"
    )]
    let magic = i64::from(stat.filesystem_type().0);
    Ok(magic == BPF_FS_MAGIC)
}

impl Datapath {
    /// Loads the socket programs; their maps are created and pinned under `bpffs_dir`, or
    /// reused from there (with their contents) when a previous agent pinned them.
    pub fn load(bpffs_dir: &Path, sizes: &MapSizes) -> Result<Self, LbError> {
        if !is_bpffs(bpffs_dir)? {
            return Err(LbError::Io {
                call: "pin maps under",
                path: bpffs_dir.to_owned(),
                source: std::io::Error::other("not a bpffs mount (see --bpffs-dir)"),
            });
        }
        check_pinned_layouts(bpffs_dir)?;
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(bpffs_dir)
            .set_max_entries(SERVICES_MAP, sizes.services)
            .set_max_entries(REVNAT_MAP, sizes.services)
            .set_max_entries(NAMES_MAP, sizes.services)
            .set_max_entries(BACKENDS_MAP, sizes.backends)
            .set_max_entries(BACKEND_STATS_MAP, sizes.backends)
            .set_max_entries(REVERSE_SK_MAP, sizes.reverse_sk)
            .set_max_entries(SK_FORWARD_MAP, sizes.reverse_sk)
            .set_max_entries(AFFINITY_MAP, sizes.affinity)
            .load(skiff_ebpf::SOCK_OBJECT)
            .map_err(|source| LbError::Load {
                object: "socket",
                bpffs_dir: bpffs_dir.to_owned(),
                source: Box::new(source),
            })?;
        for name in SOCK_PROGRAMS {
            let program = sock_program(&mut ebpf, name)?;
            program.load().map_err(|source| LbError::Program {
                what: format!("load {name}"),
                source: Box::new(source),
            })?;
        }
        let maps = take_maps(&mut ebpf, bpffs_dir, sizes)?;
        Ok(Self {
            bpffs_dir: bpffs_dir.to_owned(),
            ebpf,
            maps: Some(maps),
        })
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// The typed maps, once: the programmer owns them from then on.
    pub fn take_maps(&mut self) -> Option<Maps> {
        self.maps.take()
    }

    /// Attaches the four socket hooks to the cgroup v2 directory `cgroup_dir` (and so to
    /// every cgroup below it). Links are pinned under `<bpffs_dir>/links/cgroup-<inode>/`;
    /// links already pinned there are pointed at this agent's programs instead.
    pub fn attach_cgroup(&mut self, cgroup_dir: &Path) -> Result<(), LbError> {
        let cgroup = fs::File::open(cgroup_dir).map_err(|source| LbError::Io {
            call: "open cgroup",
            path: cgroup_dir.to_owned(),
            source,
        })?;
        let links_dir = self.links_dir(cgroup_dir)?;
        fs::create_dir_all(&links_dir).map_err(|source| LbError::Io {
            call: "create",
            path: links_dir.clone(),
            source,
        })?;
        for (name, attach_type) in SOCK_PROGRAMS.into_iter().zip(ATTACH_TYPES) {
            let program = sock_program(&mut self.ebpf, name)?;
            let program_fd = program.fd().map_err(|source| LbError::Program {
                what: format!("descriptor of {name}"),
                source: Box::new(source),
            })?;
            let pin = links_dir.join(name);
            match sys::obj_get(&pin) {
                Ok(link) => {
                    sys::link_update(link.as_fd(), program_fd.as_fd()).map_err(|source| {
                        LbError::Io {
                            call: "BPF_LINK_UPDATE",
                            path: pin.clone(),
                            source,
                        }
                    })?
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    let link =
                        sys::cgroup_link_create(program_fd.as_fd(), cgroup.as_fd(), attach_type)
                            .map_err(|source| LbError::Io {
                                call: "BPF_LINK_CREATE on cgroup",
                                path: cgroup_dir.to_owned(),
                                source,
                            })?;
                    sys::obj_pin(link.as_fd(), &pin).map_err(|source| LbError::Io {
                        call: "pin link at",
                        path: pin.clone(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(LbError::Io {
                        call: "BPF_OBJ_GET",
                        path: pin,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Detaches the socket hooks from `cgroup_dir` by removing the pinned links.
    pub fn detach_cgroup(&mut self, cgroup_dir: &Path) -> Result<(), LbError> {
        let links_dir = self.links_dir(cgroup_dir)?;
        detach_links(&links_dir)
    }

    fn links_dir(&self, cgroup_dir: &Path) -> Result<PathBuf, LbError> {
        let inode = fs::metadata(cgroup_dir)
            .map_err(|source| LbError::Io {
                call: "stat cgroup",
                path: cgroup_dir.to_owned(),
                source,
            })?
            .ino();
        Ok(links_dir(&self.bpffs_dir).join(format!("cgroup-{inode}")))
    }
}

/// Refuses pins left by a build with other map layouts: reusing them would make the
/// programs read garbage. (aya reuses a pin by name without comparing.)
fn check_pinned_layouts(bpffs_dir: &Path) -> Result<(), LbError> {
    for name in SOCK_MAPS {
        let Some((key_size, value_size)) = skiff_ebpf::lb::map_layout(name) else {
            continue;
        };
        let path = bpffs_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| LbError::Map {
            map: name,
            operation: "inspect pin",
            source: Box::new(source),
        })?;
        let pinned = (info.key_size() as usize, info.value_size() as usize);
        if pinned != (key_size, value_size) {
            return Err(LbError::Datapath(format!(
                "map {name} pinned at {} has key/value sizes {pinned:?}, this agent needs ({key_size}, {value_size}): \
                 remove the pins (agentctl lb reset) to start over",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Where the links for every attach point are pinned.
pub fn links_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join("links")
}

/// Removes the pinned links in `links_dir` (detaching them) and the directory.
fn detach_links(links_dir: &Path) -> Result<(), LbError> {
    let entries = match fs::read_dir(links_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(LbError::Io {
                call: "read",
                path: links_dir.to_owned(),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        fs::remove_file(&path).map_err(|source| LbError::Io {
            call: "unpin link",
            path: path.clone(),
            source,
        })?;
    }
    fs::remove_dir(links_dir).map_err(|source| LbError::Io {
        call: "remove",
        path: links_dir.to_owned(),
        source,
    })
}

/// Removes everything the load balancer pinned under `bpffs_dir`: links (detaching the
/// programs) and maps. The datapath stops; for `agentctl lb reset` and tests.
pub fn remove_pins(bpffs_dir: &Path) -> Result<(), LbError> {
    let links = links_dir(bpffs_dir);
    if let Ok(entries) = fs::read_dir(&links) {
        for entry in entries.flatten() {
            detach_links(&entry.path())?;
        }
        let _ = fs::remove_dir(&links);
    }
    for name in SOCK_MAPS {
        let path = bpffs_dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LbError::Io {
                    call: "unpin map",
                    path,
                    source,
                });
            }
        }
    }
    Ok(())
}

const ATTACH_TYPES: [SockAddrAttachType; 4] = [
    SockAddrAttachType::Connect4,
    SockAddrAttachType::Sendmsg4,
    SockAddrAttachType::Recvmsg4,
    SockAddrAttachType::Getpeername4,
];

fn sock_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSockAddr, LbError> {
    let program = ebpf.program_mut(name).ok_or_else(|| {
        LbError::Datapath(format!("program {name} missing from the socket object"))
    })?;
    program.try_into().map_err(|source| LbError::Program {
        what: format!("{name} as a cgroup socket-address program"),
        source: Box::new(source),
    })
}

fn take_maps(ebpf: &mut Ebpf, bpffs_dir: &Path, configured: &MapSizes) -> Result<Maps, LbError> {
    let mut take = |name: &'static str| -> Result<Map, LbError> {
        ebpf.take_map(name)
            .ok_or_else(|| LbError::Datapath(format!("map {name} missing from the socket object")))
    };
    let services: HashMap<MapData, Lb4Key, Lb4Service> = typed(SERVICES_MAP, take(SERVICES_MAP)?)?;
    let backends: HashMap<MapData, u32, Lb4Backend> = typed(BACKENDS_MAP, take(BACKENDS_MAP)?)?;
    let revnat = typed(REVNAT_MAP, take(REVNAT_MAP)?)?;
    let names = typed(NAMES_MAP, take(NAMES_MAP)?)?;
    let stats = typed(BACKEND_STATS_MAP, take(BACKEND_STATS_MAP)?)?;
    // Pinned maps keep the size they were created with.
    let sizes = MapSizes {
        services: pinned_max_entries(bpffs_dir, SERVICES_MAP)?,
        backends: pinned_max_entries(bpffs_dir, BACKENDS_MAP)?,
        ..configured.clone()
    };
    if sizes != *configured {
        tracing::warn!(
            configured = ?configured,
            pinned = ?sizes,
            "the pinned load balancer maps keep their size; remove the pins (agentctl lb reset) to resize"
        );
    }
    Ok(Maps {
        services,
        backends,
        revnat,
        names,
        stats,
        sizes,
        batch: BatchFds::open(bpffs_dir)?,
    })
}

fn pinned_max_entries(bpffs_dir: &Path, name: &'static str) -> Result<u32, LbError> {
    MapData::from_pin(bpffs_dir.join(name))
        .and_then(|map| map.info())
        .map(|info| info.max_entries())
        .map_err(|source| LbError::Map {
            map: name,
            operation: "info",
            source: Box::new(source),
        })
}

/// Converts an untyped map into its typed view.
pub fn typed<T>(name: &'static str, map: Map) -> Result<T, LbError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(|source| LbError::Map {
        map: name,
        operation: "open",
        source: Box::new(source),
    })
}
