//! Reads the load balancer's pinned maps as they are, without the agent: what `agentctl lb`
//! prints and `agentctl explain` compares with the API. Opening a pin takes a new
//! descriptor to the same map; nothing is written.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use serde::Serialize;
use skiff_ebpf::lb::{
    BACKEND_LOCAL, BACKEND_STATS_MAP, BACKEND_TERMINATING, BACKENDS_MAP, IPPROTO_TCP, IPPROTO_UDP,
    Lb4Backend, Lb4FrontendName, Lb4Key, Lb4Service, LbBackendStats, NAMES_MAP, SCOPE_EXTERNAL,
    SERVICES_MAP, SVC_AFFINITY, SVC_LOCAL,
};

use super::LbError;
use super::datapath::typed;

/// Everything the maps hold, frontend by frontend.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub frontends: Vec<FrontendView>,
    /// Entries in use and capacity of the two maps that can fill up.
    pub services_map: Usage,
    pub backends_map: Usage,
    /// Inconsistencies found (a slot or backend missing): a crash mid-change, repaired by
    /// the agent's next apply.
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub entries: usize,
    pub max_entries: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct FrontendView {
    /// `namespace/name[:port] Kind`, as the agent named it.
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub address: Ipv4Addr,
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// `internal` (this node and its pods) or `external` (from outside, tc).
    pub scope: &'static str,
    pub rev_nat_index: u16,
    /// ClientIP affinity timeout in seconds.
    pub affinity_timeout_seconds: Option<u32>,
    /// Backends restricted to this node by a traffic policy.
    pub local_only: bool,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub slot: u16,
    pub address: Ipv4Addr,
    pub port: u16,
    pub terminating: bool,
    pub local: bool,
    /// Connections (and first datagrams) translated to this backend since it was added.
    pub connections: u64,
}

impl FrontendView {
    /// `address:port/PROTO`, how tables print a frontend.
    pub fn endpoint(&self) -> String {
        format!("{}:{}/{}", self.address, self.port, self.protocol)
    }
}

fn open(bpffs_dir: &Path, name: &'static str) -> Result<MapData, LbError> {
    let path = bpffs_dir.join(name);
    MapData::from_pin(&path).map_err(|source| LbError::Map {
        map: name,
        operation: "open pin",
        source: Box::new(source),
    })
}

fn read_error(map: &'static str, source: aya::maps::MapError) -> LbError {
    LbError::Map {
        map,
        operation: "read",
        source: Box::new(source),
    }
}

/// Reads every frontend with its backends and counters from the pins under `bpffs_dir`.
pub fn read(bpffs_dir: &Path) -> Result<Snapshot, LbError> {
    let services_data = open(bpffs_dir, SERVICES_MAP)?;
    let services_max = services_data
        .info()
        .map(|info| info.max_entries())
        .unwrap_or(0);
    let backends_data = open(bpffs_dir, BACKENDS_MAP)?;
    let backends_max = backends_data
        .info()
        .map(|info| info.max_entries())
        .unwrap_or(0);
    let services: BpfHashMap<MapData, Lb4Key, Lb4Service> =
        typed(SERVICES_MAP, Map::HashMap(services_data))?;
    let backends: BpfHashMap<MapData, u32, Lb4Backend> =
        typed(BACKENDS_MAP, Map::HashMap(backends_data))?;
    let names: BpfHashMap<MapData, u16, Lb4FrontendName> =
        typed(NAMES_MAP, Map::HashMap(open(bpffs_dir, NAMES_MAP)?))?;
    let stats: PerCpuArray<MapData, LbBackendStats> = typed(
        BACKEND_STATS_MAP,
        Map::PerCpuArray(open(bpffs_dir, BACKEND_STATS_MAP)?),
    )?;

    let mut entries = Vec::new();
    let mut slots = HashMap::new();
    for item in services.iter() {
        let (key, value) = item.map_err(|source| read_error(SERVICES_MAP, source))?;
        if key.backend_slot == 0 {
            entries.push((key, value));
        } else {
            slots.insert(key, value.backend_id);
        }
    }
    let mut backend_values = HashMap::new();
    for item in backends.iter() {
        let (id, value) = item.map_err(|source| read_error(BACKENDS_MAP, source))?;
        backend_values.insert(id, value);
    }
    let mut problems = Vec::new();
    let mut frontends = Vec::with_capacity(entries.len());
    for (key, entry) in entries {
        let name = names
            .get(&entry.rev_nat_index, 0)
            .map(|name| name.as_str().to_owned())
            .unwrap_or_default();
        let (namespace, service) = super::programmer::owner_of(&name);
        let mut view = FrontendView {
            name,
            namespace,
            service,
            address: key.address(),
            port: key.port(),
            protocol: match key.proto {
                IPPROTO_TCP => "TCP",
                IPPROTO_UDP => "UDP",
                _ => "?",
            },
            scope: if key.scope == SCOPE_EXTERNAL {
                "external"
            } else {
                "internal"
            },
            rev_nat_index: entry.rev_nat_index,
            affinity_timeout_seconds: (entry.flags & SVC_AFFINITY != 0)
                .then_some(entry.affinity_timeout),
            local_only: entry.flags & SVC_LOCAL != 0,
            backends: Vec::with_capacity(usize::from(entry.count)),
        };
        for slot in 1..=entry.count {
            let Some(&id) = slots.get(&key.with_slot(slot)) else {
                problems.push(format!("{}: slot {slot} missing", view.endpoint()));
                continue;
            };
            let Some(backend) = backend_values.get(&id) else {
                problems.push(format!(
                    "{}: slot {slot} names backend {id}, which is missing",
                    view.endpoint()
                ));
                continue;
            };
            let connections = stats
                .get(&id, 0)
                .map(|per_cpu| per_cpu.iter().map(|stats| stats.connections).sum())
                .unwrap_or(0);
            view.backends.push(BackendView {
                id,
                slot,
                address: backend.address(),
                port: backend.port(),
                terminating: backend.flags & BACKEND_TERMINATING != 0,
                local: backend.flags & BACKEND_LOCAL != 0,
                connections,
            });
        }
        frontends.push(view);
    }
    frontends.sort_by(|a, b| {
        (
            &a.namespace,
            &a.service,
            a.address,
            a.port,
            a.protocol,
            a.scope,
        )
            .cmp(&(
                &b.namespace,
                &b.service,
                b.address,
                b.port,
                b.protocol,
                b.scope,
            ))
    });
    Ok(Snapshot {
        services_map: Usage {
            entries: frontends.len() + slots.len(),
            max_entries: services_max,
        },
        backends_map: Usage {
            entries: backend_values.len(),
            max_entries: backends_max,
        },
        frontends,
        problems,
    })
}

/// One way the maps differ from what the API asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// `address:port/PROTO scope`.
    pub frontend: String,
    pub what: String,
}

/// Compares the frontends the API asks for (`desired`, from [`super::desired`]) with those
/// the maps hold for the same Service (`actual`), naming every difference.
pub fn compare(desired: &[super::desired::Frontend], actual: &[FrontendView]) -> Vec<Difference> {
    use super::desired::{Proto, Scope};
    let label = |address: Ipv4Addr, port: u16, protocol: &str, scope: &str| {
        format!("{address}:{port}/{protocol} {scope}")
    };
    let mut differences = Vec::new();
    let mut matched = vec![false; actual.len()];
    let index: HashMap<(Ipv4Addr, u16, &str, &str), usize> = actual
        .iter()
        .enumerate()
        .map(|(position, view)| {
            (
                (view.address, view.port, view.protocol, view.scope),
                position,
            )
        })
        .collect();
    for frontend in desired {
        let protocol = match frontend.key.proto {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        };
        let scope = match frontend.key.scope {
            Scope::Internal => "internal",
            Scope::External => "external",
        };
        let name = label(frontend.key.address, frontend.key.port, protocol, scope);
        let found = index
            .get(&(frontend.key.address, frontend.key.port, protocol, scope))
            .copied();
        let Some(index) = found else {
            differences.push(Difference {
                frontend: name,
                what: "missing from the maps".into(),
            });
            continue;
        };
        matched[index] = true;
        let view = &actual[index];
        let mut note = |what: String| {
            differences.push(Difference {
                frontend: name.clone(),
                what,
            });
        };
        if view.affinity_timeout_seconds != frontend.affinity_timeout {
            note(format!(
                "session affinity: API {:?}, maps {:?}",
                frontend.affinity_timeout, view.affinity_timeout_seconds
            ));
        }
        if view.local_only != frontend.local_only {
            note(format!(
                "traffic policy Local: API {}, maps {}",
                frontend.local_only, view.local_only
            ));
        }
        for backend in &frontend.backends {
            match view
                .backends
                .iter()
                .find(|held| (held.address, held.port) == (backend.address, backend.port))
            {
                None => note(format!(
                    "backend {}:{} missing from the maps",
                    backend.address, backend.port
                )),
                Some(held) if held.terminating != backend.terminating => note(format!(
                    "backend {}:{} terminating: API {}, maps {}",
                    backend.address, backend.port, backend.terminating, held.terminating
                )),
                Some(_) => {}
            }
        }
        for held in &view.backends {
            if !frontend
                .backends
                .iter()
                .any(|backend| (backend.address, backend.port) == (held.address, held.port))
            {
                note(format!(
                    "backend {}:{} in the maps but not in the API",
                    held.address, held.port
                ));
            }
        }
    }
    for (view, matched) in actual.iter().zip(matched) {
        if !matched {
            differences.push(Difference {
                frontend: label(view.address, view.port, view.protocol, view.scope),
                what: "in the maps but not asked for by the API".into(),
            });
        }
    }
    differences
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::desired::{
        Backend, Frontend, FrontendKey, FrontendKind, Proto, Scope, ServicePortRef,
    };

    fn desired(backends: &[(u8, bool)]) -> Frontend {
        Frontend {
            key: FrontendKey {
                address: Ipv4Addr::new(10, 96, 0, 1),
                port: 80,
                proto: Proto::Tcp,
                scope: Scope::Internal,
            },
            kind: FrontendKind::ClusterIp,
            service: ServicePortRef {
                namespace: "default".into(),
                name: "web".into(),
                port_name: String::new(),
            },
            affinity_timeout: None,
            local_only: false,
            backends: backends
                .iter()
                .map(|&(last, terminating)| Backend {
                    address: Ipv4Addr::new(10, 244, 0, last),
                    port: 8080,
                    terminating,
                    local: true,
                })
                .collect(),
        }
    }

    fn held(backends: &[u8]) -> FrontendView {
        FrontendView {
            name: "default/web ClusterIP".into(),
            namespace: "default".into(),
            service: "web".into(),
            address: Ipv4Addr::new(10, 96, 0, 1),
            port: 80,
            protocol: "TCP",
            scope: "internal",
            rev_nat_index: 1,
            affinity_timeout_seconds: None,
            local_only: false,
            backends: backends
                .iter()
                .enumerate()
                .map(|(index, &last)| BackendView {
                    id: u32::from(last),
                    slot: u16::try_from(index + 1).unwrap(),
                    address: Ipv4Addr::new(10, 244, 0, last),
                    port: 8080,
                    terminating: false,
                    local: true,
                    connections: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn equal_states_have_no_difference() {
        assert!(compare(&[desired(&[(1, false), (2, false)])], &[held(&[2, 1])]).is_empty());
    }

    #[test]
    fn every_difference_is_named() {
        let mut api = desired(&[(1, false), (3, true)]);
        api.affinity_timeout = Some(10_800);
        let differences = compare(&[api], &[held(&[1, 2])]);
        let whats: Vec<&str> = differences.iter().map(|d| d.what.as_str()).collect();
        assert_eq!(
            whats,
            [
                "session affinity: API Some(10800), maps None",
                "backend 10.244.0.3:8080 missing from the maps",
                "backend 10.244.0.2:8080 in the maps but not in the API",
            ]
        );
        assert!(
            differences
                .iter()
                .all(|d| d.frontend == "10.96.0.1:80/TCP internal")
        );
        let missing = compare(&[desired(&[])], &[]);
        assert_eq!(missing[0].what, "missing from the maps");
        let extra = compare(&[], &[held(&[1])]);
        assert_eq!(extra[0].what, "in the maps but not asked for by the API");
    }
}

/// One connection tracked by the tc programs (NodePort and external IPs from outside).
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionView {
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    pub client: std::net::SocketAddrV4,
    pub frontend: std::net::SocketAddrV4,
    pub backend: std::net::SocketAddrV4,
    /// The node address and port the client was translated to (policy Cluster with a
    /// backend on another node).
    pub snat: Option<std::net::SocketAddrV4>,
    /// `namespace/name[:port] Kind` of the frontend.
    pub service: String,
    pub closing: bool,
    /// Seconds since the flow's last packet (kept to a second's precision by the program).
    pub idle_seconds: u64,
}

/// The tracked connections, one per flow (the original direction's entry), or `None` when
/// no `ct4` map is pinned (the tc programs were never loaded on this node).
pub fn read_connections(bpffs_dir: &Path) -> Result<Option<Vec<ConnectionView>>, LbError> {
    use skiff_ebpf::lb::{CT_DIR_ORIGINAL, CT_F_CLOSING, CT_F_SNAT, CT_MAP, Ct4Key, Ct4Value};
    if !bpffs_dir.join(CT_MAP).exists() {
        return Ok(None);
    }
    let ct: BpfHashMap<MapData, Ct4Key, Ct4Value> =
        typed(CT_MAP, Map::LruHashMap(open(bpffs_dir, CT_MAP)?))?;
    let names: BpfHashMap<MapData, u16, Lb4FrontendName> =
        typed(NAMES_MAP, Map::HashMap(open(bpffs_dir, NAMES_MAP)?))?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|now| now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
        .unwrap_or(0);
    let socket = |(address, port): (Ipv4Addr, u16)| std::net::SocketAddrV4::new(address, port);
    let mut connections = Vec::new();
    for item in ct.iter() {
        let (key, value) = item.map_err(|source| read_error(CT_MAP, source))?;
        if key.dir != CT_DIR_ORIGINAL {
            continue;
        }
        connections.push(ConnectionView {
            protocol: match key.proto {
                IPPROTO_TCP => "TCP",
                IPPROTO_UDP => "UDP",
                _ => "?",
            },
            client: socket(key.source()),
            frontend: socket(key.destination()),
            backend: socket(value.destination()),
            snat: (value.flags & CT_F_SNAT != 0).then(|| socket(value.source())),
            service: names
                .get(&value.rev_nat_index, 0)
                .map(|name| name.as_str().to_owned())
                .unwrap_or_default(),
            closing: value.flags & CT_F_CLOSING != 0,
            idle_seconds: now.saturating_sub(value.last_seen_ns) / 1_000_000_000,
        });
    }
    connections.sort_by_key(|connection| (connection.frontend, connection.client));
    Ok(Some(connections))
}
