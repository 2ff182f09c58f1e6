//! Rust mirrors of `include/lb.h`: map names, flags, and the `#[repr(C)]` keys and values,
//! with their sizes and field offsets asserted at compile time against the C layout.
//!
//! Addresses and ports are kept in network byte order exactly as the kernel sees them;
//! the constructors and accessors take and give `Ipv4Addr` and host-order ports.
#![allow(
    unsafe_code,
    reason = "aya::Pod is an unsafe trait; each impl says why it holds"
)]

use std::mem::{offset_of, size_of};
use std::net::Ipv4Addr;

/// Map names, also their file names under the agent's bpffs directory.
pub const SERVICES_MAP: &str = "lb4_services";
pub const BACKENDS_MAP: &str = "lb4_backends";
pub const REVNAT_MAP: &str = "lb4_revnat";
pub const REVERSE_SK_MAP: &str = "lb4_reverse_sk";
pub const AFFINITY_MAP: &str = "lb_affinity";
pub const BACKEND_STATS_MAP: &str = "lb_be_stats";
pub const NAMES_MAP: &str = "lb4_names";
pub const SK_FORWARD_MAP: &str = "lb4_sk_fwd";

/// Program names in the socket object, in attach order.
pub const SOCK_PROGRAMS: [&str; 4] = [
    "skiff_connect4",
    "skiff_sendmsg4",
    "skiff_recvmsg4",
    "skiff_getpeername4",
];

pub const SCOPE_INTERNAL: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

pub const SVC_AFFINITY: u8 = 1 << 0;
pub const SVC_NODEPORT: u8 = 1 << 1;
pub const SVC_EXTERNAL_IP: u8 = 1 << 2;
pub const SVC_LOCAL: u8 = 1 << 3;

pub const BACKEND_TERMINATING: u8 = 1 << 0;
pub const BACKEND_LOCAL: u8 = 1 << 1;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

fn be_address(address: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(address.octets())
}

fn address_of(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

/// `struct lb4_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4Key {
    pub address: u32,
    pub dport: u16,
    pub backend_slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}

impl Lb4Key {
    pub fn new(address: Ipv4Addr, port: u16, proto: u8, scope: u8, backend_slot: u16) -> Self {
        Self {
            address: be_address(address),
            dport: port.to_be(),
            backend_slot,
            proto,
            scope,
            pad: [0; 2],
        }
    }

    pub fn address(&self) -> Ipv4Addr {
        address_of(self.address)
    }

    pub fn port(&self) -> u16 {
        u16::from_be(self.dport)
    }

    /// The same frontend at another slot.
    pub fn with_slot(mut self, backend_slot: u16) -> Self {
        self.backend_slot = backend_slot;
        self
    }
}

/// `struct lb4_service`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Service {
    pub backend_id: u32,
    pub count: u16,
    pub rev_nat_index: u16,
    pub affinity_timeout: u32,
    pub flags: u8,
    pub pad: [u8; 3],
}

/// `struct lb4_backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4Backend {
    pub address: u32,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

impl Lb4Backend {
    pub fn new(address: Ipv4Addr, port: u16, proto: u8, flags: u8) -> Self {
        Self {
            address: be_address(address),
            port: port.to_be(),
            proto,
            flags,
        }
    }

    pub fn address(&self) -> Ipv4Addr {
        address_of(self.address)
    }

    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// `struct lb4_reverse_nat`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4ReverseNat {
    pub address: u32,
    pub port: u16,
    pub pad: u16,
}

impl Lb4ReverseNat {
    pub fn new(address: Ipv4Addr, port: u16) -> Self {
        Self {
            address: be_address(address),
            port: port.to_be(),
            pad: 0,
        }
    }

    pub fn address(&self) -> Ipv4Addr {
        address_of(self.address)
    }

    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// `struct lb4_reverse_sk_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4ReverseSkKey {
    pub cookie: u64,
    pub address: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct lb4_reverse_sk_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4ReverseSkValue {
    pub address: u32,
    pub port: u16,
    pub rev_nat_index: u16,
}

/// `struct lb4_sk_backend`, keyed by [`Lb4ReverseSkKey`] with the frontend's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4SkBackend {
    pub backend_id: u32,
    pub address: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct lb_affinity_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbAffinityKey {
    pub client: u64,
    pub rev_nat_index: u16,
    pub scope: u8,
    pub pad: [u8; 5],
}

/// `struct lb_affinity_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbAffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

/// `struct lb4_frontend_name`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lb4FrontendName {
    pub name: [u8; 128],
}

impl Lb4FrontendName {
    /// `text`, cut at 128 bytes on a character boundary.
    pub fn new(text: &str) -> Self {
        let mut name = [0; 128];
        let mut end = text.len().min(name.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        name[..end].copy_from_slice(&text.as_bytes()[..end]);
        Self { name }
    }

    pub fn as_str(&self) -> &str {
        let end = self
            .name
            .iter()
            .position(|&byte| byte == 0)
            .unwrap_or(self.name.len());
        std::str::from_utf8(&self.name[..end]).unwrap_or("<not utf-8>")
    }
}

/// `struct lb_backend_stats`, one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbBackendStats {
    pub connections: u64,
}

// SAFETY: every type below is `#[repr(C)]`, made only of integers and integer arrays with
// explicit padding fields (no implicit padding, checked by the size asserts), so any bit
// pattern is a valid value and every byte is initialized.
unsafe impl aya::Pod for Lb4Key {}
// SAFETY: as above.
unsafe impl aya::Pod for Lb4Service {}
// SAFETY: as above.
unsafe impl aya::Pod for Lb4Backend {}
// SAFETY: as above.
unsafe impl aya::Pod for Lb4ReverseNat {}
// SAFETY: as above.
unsafe impl aya::Pod for Lb4ReverseSkKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Lb4ReverseSkValue {}
// SAFETY: as above.
unsafe impl aya::Pod for LbAffinityKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Lb4SkBackend {}
// SAFETY: as above.
unsafe impl aya::Pod for LbAffinityValue {}
// SAFETY: as above.
unsafe impl aya::Pod for LbBackendStats {}
// SAFETY: as above.
unsafe impl aya::Pod for Lb4FrontendName {}

macro_rules! assert_layout {
    ($type:ty, $size:expr, $($field:ident @ $offset:expr),*) => {
        const _: () = assert!(size_of::<$type>() == $size);
        $(const _: () = assert!(offset_of!($type, $field) == $offset);)*
    };
}

assert_layout!(Lb4Key, 12, address @ 0, dport @ 4, backend_slot @ 6, proto @ 8, scope @ 9, pad @ 10);
assert_layout!(Lb4Service, 16, backend_id @ 0, count @ 4, rev_nat_index @ 6, affinity_timeout @ 8, flags @ 12, pad @ 13);
assert_layout!(Lb4Backend, 8, address @ 0, port @ 4, proto @ 6, flags @ 7);
assert_layout!(Lb4ReverseNat, 8, address @ 0, port @ 4, pad @ 6);
assert_layout!(Lb4ReverseSkKey, 16, cookie @ 0, address @ 8, port @ 12, pad @ 14);
assert_layout!(Lb4ReverseSkValue, 8, address @ 0, port @ 4, rev_nat_index @ 6);
assert_layout!(Lb4SkBackend, 12, backend_id @ 0, address @ 4, port @ 8, pad @ 10);
assert_layout!(LbAffinityKey, 16, client @ 0, rev_nat_index @ 8, scope @ 10, pad @ 11);
assert_layout!(LbAffinityValue, 16, last_used_ns @ 0, backend_id @ 8, pad @ 12);
assert_layout!(LbBackendStats, 8, connections @ 0);
assert_layout!(Lb4FrontendName, 128, name @ 0);

// Connection tracking of the tc programs (`tc.c`, the `ct4` section of `include/lb.h`).

/// The tc programs' connection-tracking map (LRU hash), both directions of every flow.
pub const CT_MAP: &str = "ct4";

/// Program names in the tc object, attached to an external interface's ingress and egress.
pub const TC_INGRESS_PROGRAM: &str = "skiff_tc_ingress";
pub const TC_EGRESS_PROGRAM: &str = "skiff_tc_egress";

/// The maps `tc.o` uses: the shared service maps and its own `ct4`.
pub const TC_MAPS: [&str; 5] = [
    SERVICES_MAP,
    BACKENDS_MAP,
    AFFINITY_MAP,
    BACKEND_STATS_MAP,
    CT_MAP,
];

/// Every map the socket object pins.
pub const SOCK_MAPS: [&str; 8] = [
    SERVICES_MAP,
    BACKENDS_MAP,
    REVNAT_MAP,
    REVERSE_SK_MAP,
    AFFINITY_MAP,
    BACKEND_STATS_MAP,
    NAMES_MAP,
    SK_FORWARD_MAP,
];

/// Key and value sizes of every pinned map as this build lays them out. A pin with other
/// sizes was made by another build; reusing it would make the programs read garbage (aya
/// reuses a pin by name without comparing).
pub const MAP_LAYOUTS: [(&str, usize, usize); 9] = [
    (SERVICES_MAP, size_of::<Lb4Key>(), size_of::<Lb4Service>()),
    (BACKENDS_MAP, size_of::<u32>(), size_of::<Lb4Backend>()),
    (REVNAT_MAP, size_of::<u16>(), size_of::<Lb4ReverseNat>()),
    (NAMES_MAP, size_of::<u16>(), size_of::<Lb4FrontendName>()),
    (
        REVERSE_SK_MAP,
        size_of::<Lb4ReverseSkKey>(),
        size_of::<Lb4ReverseSkValue>(),
    ),
    (
        SK_FORWARD_MAP,
        size_of::<Lb4ReverseSkKey>(),
        size_of::<Lb4SkBackend>(),
    ),
    (
        AFFINITY_MAP,
        size_of::<LbAffinityKey>(),
        size_of::<LbAffinityValue>(),
    ),
    (
        BACKEND_STATS_MAP,
        size_of::<u32>(),
        size_of::<LbBackendStats>(),
    ),
    (CT_MAP, size_of::<Ct4Key>(), size_of::<Ct4Value>()),
];

/// The key and value sizes of the map `name`, from [`MAP_LAYOUTS`].
pub fn map_layout(name: &str) -> Option<(usize, usize)> {
    MAP_LAYOUTS
        .iter()
        .find(|(map, _, _)| *map == name)
        .map(|&(_, key_size, value_size)| (key_size, value_size))
}

/// `ct4`'s default size (`LB_MAX_CT`); a SNATed flow takes two entries.
pub const CT_DEFAULT_MAX_ENTRIES: u32 = 262_144;

pub const CT_DIR_ORIGINAL: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

pub const CT_F_SNAT: u8 = 1 << 0;
pub const CT_F_CLOSING: u8 = 1 << 1;

/// `struct ct4_key`: a packet's tuple as it reaches tc, before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub pad: [u8; 2],
}

impl Ct4Key {
    pub fn new(source: (Ipv4Addr, u16), destination: (Ipv4Addr, u16), proto: u8, dir: u8) -> Self {
        Self {
            saddr: be_address(source.0),
            daddr: be_address(destination.0),
            sport: source.1.to_be(),
            dport: destination.1.to_be(),
            proto,
            dir,
            pad: [0; 2],
        }
    }

    pub fn source(&self) -> (Ipv4Addr, u16) {
        (address_of(self.saddr), u16::from_be(self.sport))
    }

    pub fn destination(&self) -> (Ipv4Addr, u16) {
        (address_of(self.daddr), u16::from_be(self.dport))
    }
}

/// `struct ct4_value`: the tuple the packet gets, and the flow it belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ct4Value {
    pub last_seen_ns: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub backend_id: u32,
    pub rev_nat_index: u16,
    pub flags: u8,
    pub pad: [u8; 5],
}

impl Ct4Value {
    pub fn source(&self) -> (Ipv4Addr, u16) {
        (address_of(self.saddr), u16::from_be(self.sport))
    }

    pub fn destination(&self) -> (Ipv4Addr, u16) {
        (address_of(self.daddr), u16::from_be(self.dport))
    }
}

// SAFETY: `#[repr(C)]`, integers and integer arrays only, explicit padding (size asserted
// below), so every bit pattern is valid and every byte initialized.
unsafe impl aya::Pod for Ct4Key {}
// SAFETY: as above.
unsafe impl aya::Pod for Ct4Value {}

assert_layout!(Ct4Key, 16, saddr @ 0, daddr @ 4, sport @ 8, dport @ 10, proto @ 12, dir @ 13, pad @ 14);
assert_layout!(Ct4Value, 32, last_seen_ns @ 0, saddr @ 8, daddr @ 12, sport @ 16, dport @ 18, backend_id @ 20, rev_nat_index @ 24, flags @ 26, pad @ 27);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_network_order() {
        let key = Lb4Key::new(
            Ipv4Addr::new(10, 96, 0, 1),
            443,
            IPPROTO_TCP,
            SCOPE_INTERNAL,
            0,
        );
        // The kernel compares bytes: the address and port must sit in memory big-endian.
        assert_eq!(key.address.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(key.dport.to_ne_bytes(), [1, 187]);
        assert_eq!(key.address(), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(key.port(), 443);
        assert_eq!(key.with_slot(3).backend_slot, 3);
        let backend = Lb4Backend::new(Ipv4Addr::new(10, 244, 1, 7), 8080, IPPROTO_UDP, 0);
        assert_eq!(
            (backend.address(), backend.port()),
            (Ipv4Addr::new(10, 244, 1, 7), 8080)
        );
    }

    #[test]
    fn the_socket_object_has_btf_maps_and_programs() {
        let object = aya_obj_names(SOCK_OBJECT_FOR_TEST);
        for name in SOCK_MAPS.into_iter().chain(SOCK_PROGRAMS) {
            assert!(object.contains(name), "{name} missing from sock.o");
        }
    }

    use crate::SOCK_OBJECT as SOCK_OBJECT_FOR_TEST;

    /// The symbol names in an ELF object, found by their bytes in its string table: enough
    /// to see that clang kept every map and program, without an ELF parser.
    fn aya_obj_names(object: &[u8]) -> String {
        String::from_utf8_lossy(object).into_owned()
    }
}

#[cfg(test)]
mod ct_tests {
    use super::*;

    #[test]
    fn ct_keys_keep_network_order() {
        let key = Ct4Key::new(
            (Ipv4Addr::new(192, 0, 2, 7), 40000),
            (Ipv4Addr::new(10, 0, 0, 1), 30080),
            IPPROTO_TCP,
            CT_DIR_ORIGINAL,
        );
        assert_eq!(key.saddr.to_ne_bytes(), [192, 0, 2, 7]);
        assert_eq!(key.dport.to_ne_bytes(), 30080u16.to_be_bytes());
        assert_eq!(key.source(), (Ipv4Addr::new(192, 0, 2, 7), 40000));
        assert_eq!(key.destination(), (Ipv4Addr::new(10, 0, 0, 1), 30080));
    }

    #[test]
    fn the_tc_object_has_its_maps_and_programs() {
        let object = String::from_utf8_lossy(crate::TC_OBJECT);
        for name in TC_MAPS
            .into_iter()
            .chain([TC_INGRESS_PROGRAM, TC_EGRESS_PROGRAM])
        {
            assert!(object.contains(name), "{name} missing from tc.o");
        }
    }
}
