//! The socket load balancer on the real kernel: the agent's datapath and programmer
//! (`skiff_agent::lb`) program pinned maps under a private bpffs and attach the socket hooks
//! to a cgroup of the test's own; a client process in that cgroup and in a client network
//! namespace reaches backend "pods" (namespaces on a bridge, made by the test) through
//! service addresses. Root only.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use integration::lbnet::{self, Exchange, HeldConnection, TestBpffs, TestCgroup, Topology};
use skiff_agent::lb::datapath::{Datapath, MapSizes};
use skiff_agent::lb::desired::{Backend, Frontend, FrontendKey, FrontendKind, Proto, Scope, ServicePortRef};
use skiff_agent::lb::programmer::Programmer;

const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 8080;

fn sizes() -> MapSizes {
    MapSizes {
        services: 65_536,
        backends: 65_536,
        reverse_sk: 16_384,
        affinity: 1_024,
    }
}

fn frontend(address: Ipv4Addr, port: u16, proto: Proto, name: &str, backends: &[u8]) -> Frontend {
    Frontend {
        key: FrontendKey {
            address,
            port,
            proto,
            scope: Scope::Internal,
        },
        kind: FrontendKind::ClusterIp,
        service: ServicePortRef {
            namespace: "default".into(),
            name: name.into(),
            port_name: String::new(),
        },
        affinity_timeout: None,
        local_only: false,
        backends: backends
            .iter()
            .map(|&index| Backend {
                address: lbnet::pod_address(index),
                port: PORT,
                terminating: false,
                local: true,
            })
            .collect(),
    }
}

struct Setup {
    topology: Topology,
    cgroup: TestCgroup,
    bpffs: TestBpffs,
    programmer: Programmer,
}

impl Setup {
    fn new(n_backends: u8) -> Self {
        integration::require_root("the load balancer tests load BPF programs and make network namespaces");
        let topology = Topology::new(n_backends);
        topology.serve(PORT);
        let cgroup = TestCgroup::new();
        let bpffs = TestBpffs::new();
        let mut datapath = Datapath::load(bpffs.path(), &sizes()).expect("load the socket programs");
        datapath.attach_cgroup(&cgroup.path).expect("attach the socket hooks");
        let programmer = Programmer::new(datapath).expect("adopt the maps");
        Self {
            topology,
            cgroup,
            bpffs,
            programmer,
        }
    }

    fn client(&self, to: SocketAddr, mode: &str, count: usize) -> Vec<Exchange> {
        lbnet::client(&self.cgroup.path, &self.topology.client_netns(), to, mode, count)
    }
}

/// How many exchanges each backend answered; panics on any error.
fn spread(exchanges: &[Exchange], service: SocketAddr) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for exchange in exchanges {
        match exchange {
            Exchange::Reply { peer, backend } => {
                assert_eq!(*peer, service, "the socket must show the service address, not the backend's");
                *counts.entry(backend.clone()).or_default() += 1;
            }
            Exchange::Error(error) => panic!("exchange failed: {error}"),
        }
    }
    counts
}

/// True when `counts` (over `n` backends) is a plausible uniform draw: Pearson's chi-square
/// below the 0.999 quantile for n-1 degrees of freedom (n ≤ 5).
fn roughly_even(counts: &BTreeMap<String, usize>, n: usize) -> bool {
    let total: usize = counts.values().sum();
    let expected = total as f64 / n as f64;
    let chi_square: f64 = counts
        .values()
        .map(|&count| (count as f64 - expected).powi(2) / expected)
        .sum();
    let critical = [0.0, 10.83, 13.82, 16.27, 18.47][n - 1];
    counts.len() == n && chi_square < critical
}

#[test]
fn tcp_and_udp_reach_every_backend_evenly_and_see_the_service_address() {
    let mut setup = Setup::new(3);
    let stats = setup
        .programmer
        .apply_all(vec![
            frontend(SERVICE_IP, 80, Proto::Tcp, "web", &[1, 2, 3]),
            frontend(SERVICE_IP, 53, Proto::Udp, "web", &[1, 2, 3]),
        ])
        .expect("program the service");
    assert_eq!(stats.frontends_added, 2);

    let tcp_service = SocketAddr::from((SERVICE_IP, 80));
    let tcp = spread(&setup.client(tcp_service, "tcp", 3000), tcp_service);
    assert!(roughly_even(&tcp, 3), "3000 TCP connections not spread evenly: {tcp:?}");

    let udp_service = SocketAddr::from((SERVICE_IP, 53));
    let udp = spread(&setup.client(udp_service, "udp", 600), udp_service);
    assert!(roughly_even(&udp, 3), "600 UDP exchanges not spread evenly: {udp:?}");

    // The programmer reads back what it wrote: applying the same state writes nothing.
    let again = setup
        .programmer
        .apply_all(vec![
            frontend(SERVICE_IP, 80, Proto::Tcp, "web", &[1, 2, 3]),
            frontend(SERVICE_IP, 53, Proto::Udp, "web", &[1, 2, 3]),
        ])
        .expect("apply again");
    assert!(again.is_noop(), "{again:?}");
    drop(setup.bpffs);
}
