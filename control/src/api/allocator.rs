//! Service address allocation: ClusterIPs from the service CIDR and NodePorts from their
//! range, handed out at create time as kube-apiserver does.
//!
//! The allocation tables live in memory and are rebuilt from the stored Services at start;
//! the API server takes an allocation before it writes a Service and gives it back if the
//! write fails, so nothing leaks on an error.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::sync::Mutex;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (address, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid CIDR {s:?}: missing '/'"))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|e| format!("invalid CIDR {s:?}: {e}"))?;
        let prefix_len: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("invalid CIDR {s:?}: bad prefix length"))?;
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0);
        Ok(Self {
            network: Ipv4Addr::from(u32::from(address) & mask),
            prefix_len,
        })
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl Ipv4Cidr {
    fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    pub fn contains(&self, address: Ipv4Addr) -> bool {
        let offset = u64::from(u32::from(address).wrapping_sub(u32::from(self.network)));
        u32::from(address) >= u32::from(self.network) && offset < self.size()
    }

    /// The addresses a Service may get: all but the network and broadcast addresses.
    fn usable(&self) -> RangeInclusive<u32> {
        let first = u32::from(self.network);
        let last = (u64::from(first) + self.size() - 1) as u32;
        if self.size() <= 2 {
            first..=last
        } else {
            first + 1..=last - 1
        }
    }

    /// The first usable address, which kube-apiserver gives the `kubernetes` Service.
    pub fn first_usable(&self) -> Ipv4Addr {
        Ipv4Addr::from(*self.usable().start())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AllocationError {
    #[error("failed to allocate IP {0}: provided IP is already allocated")]
    IpInUse(Ipv4Addr),
    #[error(
        "failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {range}"
    )]
    IpOutOfRange { ip: Ipv4Addr, range: Ipv4Cidr },
    #[error("failed to allocate a serviceIP: range is full")]
    IpRangeFull,
    #[error("provided port is already allocated")]
    PortInUse(u16),
    #[error("provided port is not in the valid range. The range of valid ports is {}-{}", .range.start(), .range.end())]
    PortOutOfRange {
        port: u16,
        range: RangeInclusive<u16>,
    },
    #[error("range is full")]
    PortRangeFull,
}

pub struct ServiceAllocator {
    cidr: Ipv4Cidr,
    node_ports: RangeInclusive<u16>,
    used_ips: Mutex<HashSet<u32>>,
    used_ports: Mutex<HashSet<u16>>,
}

impl ServiceAllocator {
    pub fn new(cidr: Ipv4Cidr, node_ports: RangeInclusive<u16>) -> Self {
        Self {
            cidr,
            node_ports,
            used_ips: Mutex::new(HashSet::new()),
            used_ports: Mutex::new(HashSet::new()),
        }
    }

    pub fn cidr(&self) -> Ipv4Cidr {
        self.cidr
    }

    pub fn node_port_range(&self) -> RangeInclusive<u16> {
        self.node_ports.clone()
    }

    /// Takes `requested`, or a random free address when `None`.
    pub fn allocate_ip(&self, requested: Option<Ipv4Addr>) -> Result<Ipv4Addr, AllocationError> {
        let mut used = self.used_ips.lock().unwrap_or_else(|e| e.into_inner());
        let usable = self.cidr.usable();
        if let Some(ip) = requested {
            if !usable.contains(&u32::from(ip)) {
                return Err(AllocationError::IpOutOfRange {
                    ip,
                    range: self.cidr,
                });
            }
            if !used.insert(u32::from(ip)) {
                return Err(AllocationError::IpInUse(ip));
            }
            return Ok(ip);
        }
        let count = u64::from(usable.end() - usable.start()) + 1;
        let start = rand::rng().random_range(0..count);
        for step in 0..count {
            let candidate = usable.start() + ((start + step) % count) as u32;
            if used.insert(candidate) {
                return Ok(Ipv4Addr::from(candidate));
            }
        }
        Err(AllocationError::IpRangeFull)
    }

    pub fn release_ip(&self, ip: Ipv4Addr) {
        self.used_ips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&u32::from(ip));
    }

    pub fn allocate_port(&self, requested: Option<u16>) -> Result<u16, AllocationError> {
        let mut used = self.used_ports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(port) = requested {
            if !self.node_ports.contains(&port) {
                return Err(AllocationError::PortOutOfRange {
                    port,
                    range: self.node_ports.clone(),
                });
            }
            if !used.insert(port) {
                return Err(AllocationError::PortInUse(port));
            }
            return Ok(port);
        }
        let first = u32::from(*self.node_ports.start());
        let count = u32::from(*self.node_ports.end()) - first + 1;
        let start = rand::rng().random_range(0..count);
        for step in 0..count {
            let candidate = (first + (start + step) % count) as u16;
            if used.insert(candidate) {
                return Ok(candidate);
            }
        }
        Err(AllocationError::PortRangeFull)
    }

    pub fn release_port(&self, port: u16) {
        self.used_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_masks_host_bits() {
        let cidr: Ipv4Cidr = "10.96.3.7/12".parse().unwrap();
        assert_eq!(cidr.to_string(), "10.96.0.0/12");
        assert_eq!(cidr.first_usable(), Ipv4Addr::new(10, 96, 0, 1));
        assert!(cidr.contains(Ipv4Addr::new(10, 111, 255, 255)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 112, 0, 0)));
        assert!("10.0.0.0".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn ips_are_unique_until_the_range_is_full() {
        let allocator = ServiceAllocator::new("10.0.0.0/29".parse().unwrap(), 30000..=30001);
        let mut seen = HashSet::new();
        for _ in 0..6 {
            let ip = allocator.allocate_ip(None).unwrap();
            assert!(seen.insert(ip));
            assert_ne!(ip, Ipv4Addr::new(10, 0, 0, 0));
            assert_ne!(ip, Ipv4Addr::new(10, 0, 0, 7));
        }
        assert_eq!(
            allocator.allocate_ip(None),
            Err(AllocationError::IpRangeFull)
        );
        let one = *seen.iter().next().unwrap();
        assert_eq!(
            allocator.allocate_ip(Some(one)),
            Err(AllocationError::IpInUse(one))
        );
        allocator.release_ip(one);
        assert_eq!(allocator.allocate_ip(Some(one)), Ok(one));
        assert!(matches!(
            allocator.allocate_ip(Some(Ipv4Addr::new(10, 1, 0, 1))),
            Err(AllocationError::IpOutOfRange { .. })
        ));
    }

    #[test]
    fn ports_are_unique_until_the_range_is_full() {
        let allocator = ServiceAllocator::new("10.0.0.0/24".parse().unwrap(), 30000..=30001);
        let a = allocator.allocate_port(None).unwrap();
        let b = allocator.allocate_port(None).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            allocator.allocate_port(None),
            Err(AllocationError::PortRangeFull)
        );
        assert_eq!(
            allocator.allocate_port(Some(a)),
            Err(AllocationError::PortInUse(a))
        );
        assert!(matches!(
            allocator.allocate_port(Some(80)),
            Err(AllocationError::PortOutOfRange { .. })
        ));
    }
}
