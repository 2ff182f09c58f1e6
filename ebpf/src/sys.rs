//! The `bpf()` commands that aya 0.13 has no public API for: a cgroup link for a
//! socket-address program that outlives the agent must be created as a link, pinned, found
//! again after a restart, and pointed at the new program (`BPF_LINK_UPDATE`), atomically
//! (aya creates such links but neither exposes their descriptor nor pins them); and
//! `BPF_MAP_UPDATE_BATCH`, which writes thousands of entries in one call when a node
//! programs every Service at once.
#![allow(
    unsafe_code,
    reason = "raw bpf() syscalls; each call says why it is sound"
)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `enum bpf_attach_type` values of the socket-address hooks skiff attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum SockAddrAttachType {
    Connect4 = 10,
    Sendmsg4 = 14,
    Recvmsg4 = 19,
    Getpeername4 = 29,
}

/// The part of `union bpf_attr` each command reads, zero-padded to a size the kernel
/// accepts (it requires the bytes it knows beyond ours to be zero).
#[repr(C, align(8))]
#[derive(Default)]
struct Attr {
    words: [u32; 16],
}

fn bpf(command: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialized, writable buffer of `size_of::<Attr>()` bytes
    // laid out as the command's member of `union bpf_attr`; the kernel reads it (and for
    // batches writes back `count`), and reads through the pointers in it, which the callers
    // keep alive and correctly sized for the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn owned_fd(raw: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us for a new object; nothing
    // else owns it.
    unsafe { OwnedFd::from_raw_fd(raw as i32) }
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `BPF_LINK_CREATE` of `program` on the cgroup directory `cgroup`. Links coexist with
/// other programs on the same hook (as `BPF_F_ALLOW_MULTI` attachments do).
pub fn cgroup_link_create(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: SockAddrAttachType,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    attr.words[0] = program.as_raw_fd() as u32;
    attr.words[1] = cgroup.as_raw_fd() as u32;
    attr.words[2] = attach_type as u32;
    bpf(BPF_LINK_CREATE, &mut attr).map(owned_fd)
}

/// `BPF_LINK_UPDATE`: the link runs `program` from now on, with no moment without one.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.words[0] = link.as_raw_fd() as u32;
    attr.words[1] = program.as_raw_fd() as u32;
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `BPF_OBJ_PIN` of any bpf object descriptor at `path` on a bpffs.
pub fn obj_pin(object: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = path_cstring(path)?;
    let mut attr = Attr::default();
    let pointer = path.as_ptr() as u64;
    attr.words[0] = pointer as u32;
    attr.words[1] = (pointer >> 32) as u32;
    attr.words[2] = object.as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// `BPF_OBJ_GET`: a descriptor for the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = path_cstring(path)?;
    let mut attr = Attr::default();
    let pointer = path.as_ptr() as u64;
    attr.words[0] = pointer as u32;
    attr.words[1] = (pointer >> 32) as u32;
    bpf(BPF_OBJ_GET, &mut attr).map(owned_fd)
}

/// `BPF_MAP_UPDATE_BATCH`: writes `keys[i] → values[i]` into the map, in order, in one call.
/// On failure, says how many were written before the error (those stay written).
pub fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len()).map_err(|_| {
        (
            0,
            io::Error::new(io::ErrorKind::InvalidInput, "batch too large"),
        )
    })?;
    let mut attr = Attr::default();
    let keys_pointer = keys.as_ptr() as u64;
    let values_pointer = values.as_ptr() as u64;
    attr.words[4] = keys_pointer as u32;
    attr.words[5] = (keys_pointer >> 32) as u32;
    attr.words[6] = values_pointer as u32;
    attr.words[7] = (values_pointer >> 32) as u32;
    attr.words[8] = count;
    attr.words[9] = map.as_raw_fd() as u32;
    match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => Ok(()),
        // The kernel leaves in `count` how many entries it wrote.
        Err(error) => Err((attr.words[8] as usize, error)),
    }
}
