//! host-local IPAM: reservations as files under `dataDir/<network>`, one file per address
//! holding `containerID\r\nifname`, serialized by an exclusive flock on `lock`.
//!
//! The on-disk layout is host-local's own, so a node can move between skiff-cni and the
//! reference plugins without losing or duplicating reservations.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::config::{IpamConf, Range};
use crate::error::{CniError, CniResult, ErrorCode};
use crate::result::IpConfig;

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
const LINE_BREAK: &str = "\r\n";

pub fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub fn u128_to_ip(n: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

fn io_error(what: &str, path: &Path, err: impl std::fmt::Display) -> CniError {
    CniError::new(
        ErrorCode::IoFailure,
        format!("{what} {}: {err}", path.display()),
    )
}

/// The allocation directory of one network, held under its exclusive lock for as long as
/// this value lives.
pub struct IpamStore {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl IpamStore {
    /// Creates the directory if needed and takes the lock, waiting for other plugin runs.
    pub fn lock(dir: &Path) -> CniResult<IpamStore> {
        fs::create_dir_all(dir).map_err(|e| io_error("create ipam directory", dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io_error("open ipam lock", &lock_path, e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_error("lock ipam directory", dir, errno))?;
        Ok(IpamStore {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    /// Reserves one address from each range set for `container_id`/`ifname`: the
    /// requested address that falls in the set if there is one, else the next free one.
    /// On any error nothing stays reserved. host-local's rules hold: a second ADD for an
    /// attachment that already holds an address in a range set is refused, and every
    /// requested address must land in a distinct range set.
    pub fn allocate(
        &self,
        conf: &IpamConf,
        container_id: &str,
        ifname: &str,
        requested: &[IpAddr],
    ) -> CniResult<Vec<IpConfig>> {
        let unavailable = |msg: String| CniError::new(ErrorCode::AddressUnavailable, msg);
        let mut wanted: Vec<Option<IpAddr>> = vec![None; conf.range_sets.len()];
        for ip in requested {
            let Some(set_idx) = conf
                .range_sets
                .iter()
                .position(|set| set.iter().any(|r| r.contains(*ip)))
            else {
                return Err(unavailable(format!(
                    "requested IP address {ip} is not in any range set"
                )));
            };
            if wanted[set_idx].replace(*ip).is_some() {
                return Err(unavailable(format!(
                    "requested IP addresses {} and {ip} fall in the same range set",
                    wanted[set_idx].map(|w| w.to_string()).unwrap_or_default()
                )));
            }
        }
        let existing = self.find(container_id, ifname)?;
        let mut reserved: Vec<IpAddr> = Vec::new();
        let mut out = Vec::new();
        for (set_idx, set) in conf.range_sets.iter().enumerate() {
            if let Some(ip) = existing
                .iter()
                .find(|ip| set.iter().any(|r| r.contains(**ip)))
            {
                self.rollback(&reserved);
                return Err(CniError::new(
                    ErrorCode::DuplicateAllocation,
                    format!(
                        "{ip} has been allocated to {container_id}/{ifname}, duplicate allocation is not allowed"
                    ),
                ));
            }
            let allocated = match wanted[set_idx] {
                Some(ip) => self.reserve_requested(set, ip, container_id, ifname),
                None => self.allocate_in_set(set_idx, set, container_id, ifname),
            };
            match allocated {
                Ok((ip, range)) => {
                    reserved.push(ip);
                    out.push(IpConfig {
                        interface: None,
                        address: ipnet::IpNet::new(ip, range.subnet.prefix_len())
                            .expect("prefix length comes from a parsed subnet"),
                        gateway: range.gateway,
                    });
                }
                Err(e) => {
                    self.rollback(&reserved);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn rollback(&self, reserved: &[IpAddr]) {
        for ip in reserved {
            // Best effort: a leftover file is reclaimed by the next GC.
            let _ = fs::remove_file(self.dir.join(ip.to_string()));
        }
    }

    fn reserve_requested<'a>(
        &self,
        set: &'a [Range],
        ip: IpAddr,
        container_id: &str,
        ifname: &str,
    ) -> CniResult<(IpAddr, &'a Range)> {
        let range = set
            .iter()
            .find(|r| r.contains(ip))
            .expect("the caller matched the address to this set");
        if range.gateway == Some(ip) {
            return Err(CniError::new(
                ErrorCode::AddressUnavailable,
                format!("requested IP address {ip} is the subnet's gateway"),
            ));
        }
        let path = self.dir.join(ip.to_string());
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut file) => {
                let content = format!("{container_id}{LINE_BREAK}{ifname}");
                if let Err(e) = file.write_all(content.as_bytes()) {
                    let _ = fs::remove_file(&path);
                    return Err(io_error("write reservation", &path, e));
                }
                Ok((ip, range))
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(CniError::new(
                ErrorCode::AddressUnavailable,
                format!("requested IP address {ip} is already allocated"),
            )),
            Err(e) => Err(io_error("create reservation", &path, e)),
        }
    }

    fn allocate_in_set<'a>(
        &self,
        set_idx: usize,
        set: &'a [Range],
        container_id: &str,
        ifname: &str,
    ) -> CniResult<(IpAddr, &'a Range)> {
        let last_path = self.dir.join(format!("{LAST_RESERVED_PREFIX}{set_idx}"));
        let last_reserved: Option<IpAddr> = fs::read_to_string(&last_path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        // Walk the set's addresses in order, starting just after the last one handed out,
        // so that a released address is not reused at once (as host-local does).
        let total: u128 = set
            .iter()
            .map(|r| ip_to_u128(r.end) - ip_to_u128(r.start) + 1)
            .sum();
        let start_pos = last_reserved
            .and_then(|ip| position_in_set(set, ip))
            .map_or(0, |p| (p + 1) % total);
        let content = format!("{container_id}{LINE_BREAK}{ifname}");
        let mut pos = start_pos;
        for _ in 0..total {
            let (ip, range) = ip_at_position(set, pos);
            pos = (pos + 1) % total;
            if range.gateway == Some(ip) {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut file) => {
                    if let Err(e) = file.write_all(content.as_bytes()) {
                        let _ = fs::remove_file(&path);
                        return Err(io_error("write reservation", &path, e));
                    }
                    // Losing this hint only changes where the next search starts.
                    let _ = fs::write(&last_path, ip.to_string());
                    return Ok((ip, range));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_error("create reservation", &path, e)),
            }
        }
        let ranges: Vec<String> = set
            .iter()
            .map(|r| format!("{}-{}", r.start, r.end))
            .collect();
        Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "no IP addresses available in range set: {}",
                ranges.join(",")
            ),
        ))
    }

    /// Every reservation file: (address, container id, ifname). Files that do not parse
    /// as a reservation (a torn write after a crash) come back with an empty id.
    pub fn reservations(&self) -> CniResult<Vec<(IpAddr, String, String)>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("read ipam directory", &self.dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("read ipam directory", &self.dir, e))?;
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<IpAddr>().ok()) else {
                continue;
            };
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let mut lines = text.lines();
            let id = lines.next().unwrap_or("").trim().to_owned();
            let ifname = lines.next().unwrap_or("").trim().to_owned();
            out.push((ip, id, ifname));
        }
        Ok(out)
    }

    /// The addresses reserved for an attachment. A reservation written without an
    /// interface name (old host-local) matches any interface of the container.
    pub fn find(&self, container_id: &str, ifname: &str) -> CniResult<Vec<IpAddr>> {
        Ok(self
            .reservations()?
            .into_iter()
            .filter(|(_, id, ifn)| id == container_id && (ifn == ifname || ifn.is_empty()))
            .map(|(ip, _, _)| ip)
            .collect())
    }

    /// Releases an attachment's addresses; releasing nothing is not an error.
    pub fn release(&self, container_id: &str, ifname: &str) -> CniResult<Vec<IpAddr>> {
        let ips = self.find(container_id, ifname)?;
        for ip in &ips {
            let path = self.dir.join(ip.to_string());
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove reservation", &path, e)),
            }
        }
        Ok(ips)
    }

    /// Releases every reservation whose attachment is not in `valid`; returns them.
    pub fn gc(&self, valid: &[(String, String)]) -> CniResult<Vec<IpAddr>> {
        let mut released = Vec::new();
        for (ip, id, ifname) in self.reservations()? {
            let keep = valid
                .iter()
                .any(|(vid, vif)| *vid == id && (*vif == ifname || ifname.is_empty()));
            if !keep {
                let path = self.dir.join(ip.to_string());
                match fs::remove_file(&path) {
                    Ok(()) => released.push(ip),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("remove reservation", &path, e)),
                }
            }
        }
        Ok(released)
    }

    /// How many addresses each range set still has free (STATUS).
    pub fn free_counts(&self, conf: &IpamConf) -> CniResult<Vec<u128>> {
        let reserved = self.reservations()?;
        Ok(conf
            .range_sets
            .iter()
            .map(|set| {
                let size: u128 = set
                    .iter()
                    .map(|r| {
                        let n = ip_to_u128(r.end) - ip_to_u128(r.start) + 1;
                        n - u128::from(r.gateway.is_some_and(|g| r.contains(g)))
                    })
                    .sum();
                let used = reserved
                    .iter()
                    .filter(|(ip, _, _)| set.iter().any(|r| r.contains(*ip)))
                    .count() as u128;
                size.saturating_sub(used)
            })
            .collect())
    }
}

fn position_in_set(set: &[Range], ip: IpAddr) -> Option<u128> {
    let mut offset = 0;
    for r in set {
        if r.contains(ip) {
            return Some(offset + ip_to_u128(ip) - ip_to_u128(r.start));
        }
        offset += ip_to_u128(r.end) - ip_to_u128(r.start) + 1;
    }
    None
}

fn ip_at_position(set: &[Range], mut pos: u128) -> (IpAddr, &Range) {
    for r in set {
        let len = ip_to_u128(r.end) - ip_to_u128(r.start) + 1;
        if pos < len {
            return (u128_to_ip(ip_to_u128(r.start) + pos, r.start.is_ipv4()), r);
        }
        pos -= len;
    }
    unreachable!("position is always taken modulo the set's size")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_netconf;

    impl IpamStore {
        fn allocate_any(&self, c: &IpamConf, id: &str, ifname: &str) -> CniResult<Vec<IpConfig>> {
            self.allocate(c, id, ifname, &[])
        }
    }

    #[test]
    fn requested_addresses_are_honoured_or_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(
            tmp.path(),
            r#""ranges":[[{"subnet":"10.9.0.0/24"}],[{"subnet":"fd09::/120"}]]"#,
        );
        let store = IpamStore::lock(&c.network_dir).unwrap();
        let want: IpAddr = "10.9.0.77".parse().unwrap();
        let got = store.allocate(&c, "c1", "eth0", &[want]).unwrap();
        assert_eq!(got[0].address.addr(), want);
        assert_eq!(got[1].address.addr().to_string(), "fd09::2");
        let code = |ips: &[&str]| {
            let ips: Vec<IpAddr> = ips.iter().map(|i| i.parse().unwrap()).collect();
            store.allocate(&c, "c2", "eth0", &ips).unwrap_err().code
        };
        assert_eq!(code(&["10.9.0.77"]), ErrorCode::AddressUnavailable);
        assert_eq!(code(&["10.9.0.1"]), ErrorCode::AddressUnavailable);
        assert_eq!(code(&["10.10.0.5"]), ErrorCode::AddressUnavailable);
        assert_eq!(
            code(&["10.9.0.5", "10.9.0.6"]),
            ErrorCode::AddressUnavailable
        );
        // Nothing was left by the refusals.
        assert_eq!(store.reservations().unwrap().len(), 2);
    }
    use std::collections::HashSet;

    fn conf(dir: &Path, ipam: &str) -> IpamConf {
        let text = format!(
            r#"{{"cniVersion":"1.0.0","name":"net","ipam":{{"dataDir":{:?},{ipam}}}}}"#,
            dir.to_str().unwrap()
        );
        parse_netconf(text.as_bytes()).unwrap().ipam
    }

    #[test]
    fn allocates_in_order_skipping_gateway_and_releases() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(tmp.path(), r#""subnet":"10.9.0.0/29""#);
        let store = IpamStore::lock(&c.network_dir).unwrap();
        let a = store.allocate_any(&c, "c1", "eth0").unwrap();
        assert_eq!(a[0].address.to_string(), "10.9.0.2/29");
        assert_eq!(a[0].gateway.unwrap().to_string(), "10.9.0.1");
        let b = store.allocate_any(&c, "c2", "eth0").unwrap();
        assert_eq!(b[0].address.to_string(), "10.9.0.3/29");
        let on_disk = fs::read_to_string(c.network_dir.join("10.9.0.2")).unwrap();
        assert_eq!(on_disk, "c1\r\neth0");
        assert_eq!(store.release("c1", "eth0").unwrap().len(), 1);
        assert!(store.release("c1", "eth0").unwrap().is_empty());
        // The released address is not reused at once.
        let c3 = store.allocate_any(&c, "c3", "eth0").unwrap();
        assert_eq!(c3[0].address.to_string(), "10.9.0.4/29");
    }

    #[test]
    fn duplicate_allocation_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(tmp.path(), r#""subnet":"10.9.0.0/29""#);
        let store = IpamStore::lock(&c.network_dir).unwrap();
        store.allocate_any(&c, "c1", "eth0").unwrap();
        let err = store.allocate_any(&c, "c1", "eth0").unwrap_err();
        assert_eq!(err.code, ErrorCode::DuplicateAllocation);
        // Another interface of the same container is a different attachment.
        store.allocate_any(&c, "c1", "eth1").unwrap();
    }

    #[test]
    fn exhaustion_is_try_again_later_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        // Two range sets: the first has room, the second only one address.
        let c = conf(
            tmp.path(),
            r#""ranges":[[{"subnet":"10.9.0.0/24"}],[{"subnet":"10.8.0.0/30"}]]"#,
        );
        let store = IpamStore::lock(&c.network_dir).unwrap();
        assert_eq!(store.free_counts(&c).unwrap(), vec![253, 1]);
        store.allocate_any(&c, "c1", "eth0").unwrap();
        let err = store.allocate_any(&c, "c2", "eth0").unwrap_err();
        assert_eq!(err.code, ErrorCode::TryAgainLater);
        assert!(err.msg.contains("no IP addresses available"), "{}", err.msg);
        // The address taken from the first set was given back.
        assert_eq!(store.reservations().unwrap().len(), 2);
        assert_eq!(store.free_counts(&c).unwrap(), vec![252, 0]);
    }

    #[test]
    fn multi_range_set_spans_both_ranges() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(
            tmp.path(),
            r#""ranges":[[{"subnet":"10.7.0.0/30"},{"subnet":"10.7.1.0/30"}]]"#,
        );
        let store = IpamStore::lock(&c.network_dir).unwrap();
        let got: Vec<String> = (0..2)
            .map(|i| {
                store.allocate_any(&c, &format!("c{i}"), "eth0").unwrap()[0]
                    .address
                    .to_string()
            })
            .collect();
        assert_eq!(got, ["10.7.0.2/30", "10.7.1.2/30"]);
        assert_eq!(
            store.allocate_any(&c, "c9", "eth0").unwrap_err().code,
            ErrorCode::TryAgainLater
        );
    }

    #[test]
    fn gc_keeps_only_valid_attachments_and_torn_files_go() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(tmp.path(), r#""subnet":"10.9.0.0/24""#);
        let store = IpamStore::lock(&c.network_dir).unwrap();
        for i in 0..5 {
            store.allocate_any(&c, &format!("c{i}"), "eth0").unwrap();
        }
        // A crash between create and write leaves an empty reservation.
        fs::write(c.network_dir.join("10.9.0.200"), "").unwrap();
        let released = store
            .gc(&[("c1".into(), "eth0".into()), ("c3".into(), "eth0".into())])
            .unwrap();
        assert_eq!(released.len(), 4);
        let left: HashSet<String> = store
            .reservations()
            .unwrap()
            .into_iter()
            .map(|r| r.1)
            .collect();
        assert_eq!(left, HashSet::from(["c1".to_string(), "c3".to_string()]));
        assert!(c.network_dir.join("lock").exists());
    }

    #[test]
    fn concurrent_allocations_are_distinct() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(
            tmp.path(),
            r#""ranges":[[{"subnet":"10.6.0.0/24"},{"subnet":"10.6.1.0/25"}]]"#,
        );
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    (0..40)
                        .map(|i| {
                            // Each allocation opens its own lock, as separate processes do.
                            let store = IpamStore::lock(&c.network_dir).unwrap();
                            store
                                .allocate_any(&c, &format!("c{t}-{i}"), "eth0")
                                .unwrap()[0]
                                .address
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(all.len(), 320);
        assert_eq!(distinct.len(), 320);
    }

    #[test]
    fn legacy_reservation_without_ifname_is_released_by_id() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(tmp.path(), r#""subnet":"10.9.0.0/24""#);
        let store = IpamStore::lock(&c.network_dir).unwrap();
        fs::write(c.network_dir.join("10.9.0.9"), "old").unwrap();
        assert_eq!(store.release("old", "eth0").unwrap().len(), 1);
    }
}
