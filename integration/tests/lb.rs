//! The socket load balancer on the real kernel: the agent's datapath and programmer
//! (`skiff_agent::lb`) program pinned maps under a private bpffs and attach the socket hooks
//! to a cgroup of the test's own; a client process in that cgroup and in a client network
//! namespace reaches backend "pods" (namespaces on a bridge, made by the test) through
//! service addresses. Root only.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use integration::lbnet::{self, Exchange, HeldConnection, TestBpffs, TestCgroup, Topology};
use skiff_agent::lb::LbError;
use skiff_agent::lb::datapath::{Datapath, MapSizes};
use skiff_agent::lb::desired::{
    Backend, Frontend, FrontendKey, FrontendKind, Proto, Scope, ServicePortRef,
};
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
        integration::require_root(
            "the load balancer tests load BPF programs and make network namespaces",
        );
        let topology = Topology::new(n_backends);
        topology.serve(PORT);
        let cgroup = TestCgroup::new();
        let bpffs = TestBpffs::new();
        let mut datapath =
            Datapath::load(bpffs.path(), &sizes()).expect("load the socket programs");
        datapath
            .attach_cgroup(&cgroup.path)
            .expect("attach the socket hooks");
        let programmer = Programmer::new(datapath).expect("adopt the maps");
        Self {
            topology,
            cgroup,
            bpffs,
            programmer,
        }
    }

    fn client(&self, to: SocketAddr, mode: &str, count: usize) -> Vec<Exchange> {
        lbnet::client(
            &self.cgroup.path,
            &self.topology.client_netns(),
            to,
            mode,
            count,
        )
    }
}

/// How many exchanges each backend answered; panics on any error.
fn spread(exchanges: &[Exchange], service: SocketAddr) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for exchange in exchanges {
        match exchange {
            Exchange::Reply { peer, backend } => {
                assert_eq!(
                    *peer, service,
                    "the socket must show the service address, not the backend's"
                );
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
    assert!(
        roughly_even(&tcp, 3),
        "3000 TCP connections not spread evenly: {tcp:?}"
    );

    let udp_service = SocketAddr::from((SERVICE_IP, 53));
    let udp = spread(&setup.client(udp_service, "udp", 3000), udp_service);
    assert!(
        roughly_even(&udp, 3),
        "3000 UDP exchanges not spread evenly: {udp:?}"
    );

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

/// The stdout of `bpftool <args> <path>`, whatever its exit status (as the tests read it).
fn bpftool(args: &[&str], path: &Path) -> String {
    let output = std::process::Command::new("bpftool")
        .args(args)
        .arg(path)
        .output()
        .expect("run bpftool");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The pinned maps carry BTF, so `bpftool map dump` shows named fields and agentctl can
/// describe them while the agent is down.
#[test]
fn the_pinned_maps_carry_btf() {
    integration::require_root("the load balancer tests load BPF programs");
    integration::require_tool("bpftool", "apt-get install bpftool");
    let bpffs = TestBpffs::new();
    let _datapath = Datapath::load(bpffs.path(), &sizes()).expect("load the socket programs");
    for map in [
        skiff_ebpf::lb::SERVICES_MAP,
        skiff_ebpf::lb::BACKENDS_MAP,
        skiff_ebpf::lb::REVNAT_MAP,
        skiff_ebpf::lb::AFFINITY_MAP,
        skiff_ebpf::lb::BACKEND_STATS_MAP,
        skiff_ebpf::lb::NAMES_MAP,
    ] {
        let shown = bpftool(&["-j", "map", "show", "pinned"], &bpffs.path().join(map));
        let shown: serde_json::Value = serde_json::from_str(&shown)
            .unwrap_or_else(|error| panic!("bpftool map show {map}: {error}: {shown:?}"));
        assert!(
            shown["btf_id"].as_u64().is_some_and(|id| id > 0),
            "{map} has no BTF: {shown}"
        );
    }
}

fn backend_of(exchange: &Exchange) -> &str {
    match exchange {
        Exchange::Reply { backend, .. } => backend,
        Exchange::Error(error) => panic!("exchange failed: {error}"),
    }
}

#[test]
fn a_removed_backend_gets_no_new_connections_while_its_open_ones_keep_working() {
    let mut setup = Setup::new(3);
    let service = SocketAddr::from((SERVICE_IP, 80));
    setup
        .programmer
        .apply_all(vec![frontend(
            SERVICE_IP,
            80,
            Proto::Tcp,
            "web",
            &[1, 2, 3],
        )])
        .expect("program the service");
    // Open connections until one lands on b3, the backend about to go.
    let mut held = Vec::new();
    let mut on_b3 = None;
    for _ in 0..60 {
        let mut connection =
            HeldConnection::open(&setup.cgroup.path, &setup.topology.client_netns(), service);
        if backend_of(&connection.ask()) == "b3" {
            on_b3 = Some(connection);
            break;
        }
        held.push(connection);
    }
    let mut on_b3 = on_b3.expect("no connection reached b3 in 60 tries");

    let started = std::time::Instant::now();
    setup
        .programmer
        .apply_service(
            "default",
            "web",
            vec![frontend(SERVICE_IP, 80, Proto::Tcp, "web", &[1, 2])],
        )
        .expect("remove b3");
    // How long the removal took is the bench's figure (`cargo xtask bench lb`), not an
    // assertion: what matters here is that once applied, no new connection reaches b3.
    eprintln!("removal applied in {:?}", started.elapsed());

    let after = setup.client(service, "tcp", 300);
    let counts = spread(&after, service);
    assert!(
        !counts.contains_key("b3"),
        "a new connection reached the removed backend: {counts:?}"
    );
    assert_eq!(counts.len(), 2, "{counts:?}");
    // The open connection to b3 is untouched, as are those to the backends that stay.
    for _ in 0..3 {
        assert_eq!(backend_of(&on_b3.ask()), "b3");
    }
    for connection in &mut held {
        let before = connection.first_line.clone();
        assert!(
            matches!(connection.ask(), Exchange::Reply { .. }),
            "{before}"
        );
    }
}

#[test]
fn client_ip_affinity_sticks_and_a_service_without_endpoints_refuses() {
    let mut setup = Setup::new(3);
    let sticky = SocketAddr::from((SERVICE_IP, 80));
    let sticky_udp = SocketAddr::from((SERVICE_IP, 53));
    let empty = SocketAddr::from((SERVICE_IP, 81));
    let mut affine = frontend(SERVICE_IP, 80, Proto::Tcp, "sticky", &[1, 2, 3]);
    affine.affinity_timeout = Some(10_800);
    setup
        .programmer
        .apply_all(vec![
            affine,
            frontend(SERVICE_IP, 53, Proto::Udp, "sticky", &[1, 2, 3]),
            frontend(SERVICE_IP, 81, Proto::Tcp, "empty", &[]),
        ])
        .expect("program the services");
    let counts = spread(&setup.client(sticky, "tcp", 200), sticky);
    assert_eq!(
        counts.len(),
        1,
        "ClientIP affinity must keep one backend: {counts:?}"
    );
    // Affinity belongs to a frontend: UDP from the same client to a frontend without it
    // still reaches every backend.
    let udp = spread(&setup.client(sticky_udp, "udp", 90), sticky_udp);
    assert_eq!(udp.len(), 3, "UDP has no affinity here: {udp:?}");
    let refused = setup.client(empty, "tcp", 1);
    assert!(
        matches!(&refused[0], Exchange::Error(error) if error.contains("not permitted") || error.contains("refused")),
        "{refused:?}"
    );
}

/// `timeoutSeconds: 1`: connections in quick succession stay on one backend; once the
/// client has been idle past the timeout, its next connection is a fresh random choice, so
/// over several idle periods the client lands on more than one backend.
#[test]
fn client_ip_affinity_expires_after_its_timeout() {
    let mut setup = Setup::new(3);
    let sticky = SocketAddr::from((SERVICE_IP, 80));
    let mut affine = frontend(SERVICE_IP, 80, Proto::Tcp, "sticky", &[1, 2, 3]);
    affine.affinity_timeout = Some(1);
    setup
        .programmer
        .apply_all(vec![affine])
        .expect("program the service");
    // With 3 backends, 10 idle periods all ending on the same backend has a probability
    // of 3 x (1/3)^10, about 1 in 20 000.
    let mut chosen = std::collections::BTreeSet::new();
    for period in 0..10 {
        let counts = spread(&setup.client(sticky, "tcp", 10), sticky);
        assert_eq!(
            counts.len(),
            1,
            "within the timeout the affinity holds (period {period}): {counts:?}"
        );
        chosen.extend(counts.into_keys());
        // Idle for longer than the timeout (and than the kernel clock's granularity).
        std::thread::sleep(Duration::from_millis(1_500));
    }
    assert!(
        chosen.len() > 1,
        "an expired affinity must let the client reach another backend: {chosen:?}"
    );
}

#[test]
fn hairpin_a_backend_reaches_its_own_service() {
    let mut setup = Setup::new(1);
    let service = SocketAddr::from((SERVICE_IP, 80));
    setup
        .programmer
        .apply_all(vec![frontend(SERVICE_IP, 80, Proto::Tcp, "self", &[1])])
        .expect("program the service");
    let backend_netns = setup.topology.pods[1].path();
    let exchanges = lbnet::client(&setup.cgroup.path, &backend_netns, service, "tcp", 20);
    assert_eq!(spread(&exchanges, service).get("b1"), Some(&20));
}

#[test]
fn a_new_agent_adopts_the_pinned_maps_and_traffic_never_stops() {
    let mut setup = Setup::new(2);
    let service = SocketAddr::from((SERVICE_IP, 80));
    let desired = || vec![frontend(SERVICE_IP, 80, Proto::Tcp, "web", &[1, 2])];
    setup
        .programmer
        .apply_all(desired())
        .expect("program the service");

    // Requests run without pause while the "agent" goes away and a new one starts.
    let cgroup = setup.cgroup.path.clone();
    let netns = setup.topology.client_netns();
    let traffic = std::thread::spawn(move || lbnet::client(&cgroup, &netns, service, "tcp", 1500));
    std::thread::sleep(Duration::from_millis(100));
    let Setup {
        topology,
        cgroup,
        bpffs,
        programmer,
    } = setup;
    // Dropping the programmer closes every descriptor the agent held: only the pins remain.
    drop(programmer);
    std::thread::sleep(Duration::from_millis(100));
    let mut datapath = Datapath::load(bpffs.path(), &sizes()).expect("reload with the pinned maps");
    datapath
        .attach_cgroup(&cgroup.path)
        .expect("re-attach: the pinned links are updated in place");
    let mut programmer = Programmer::new(datapath).expect("adopt");
    let stats = programmer
        .apply_all(desired())
        .expect("apply the same desired state");
    assert!(
        stats.is_noop(),
        "a restarted agent rewrote unchanged maps: {stats:?}"
    );

    let exchanges = traffic.join().expect("traffic thread");
    let counts = spread(&exchanges, service);
    assert_eq!(counts.values().sum::<usize>(), 1500, "{counts:?}");
    // Still one program per hook: the links were updated, not added.
    let listing = bpftool(&["cgroup", "show"], &cgroup.path);
    assert_eq!(listing.matches("skiff_connect4").count(), 1, "{listing}");

    // `agentctl lb reset`: the pins go, the hooks detach, the service no longer resolves.
    drop(programmer);
    skiff_agent::lb::datapath::remove_pins(bpffs.path()).expect("remove the pins");
    // `maps.debug` and `progs.debug` are the kernel's own (bpf_preload), in every bpffs.
    let remaining: Vec<_> = std::fs::read_dir(bpffs.path())
        .expect("read bpffs")
        .flatten()
        .filter(|entry| !entry.file_name().to_string_lossy().ends_with(".debug"))
        .collect();
    assert!(remaining.is_empty(), "pins left: {remaining:?}");
    let listing = bpftool(&["cgroup", "show"], &cgroup.path);
    assert!(!listing.contains("skiff_"), "{listing}");
    drop(topology);
}

#[test]
fn ten_thousand_services_with_four_endpoints_each_fit_and_work() {
    let mut setup = Setup::new(4);
    let frontends: Vec<Frontend> = (0..10_000u32)
        .map(|index| {
            let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + index);
            frontend(
                address,
                80,
                Proto::Tcp,
                &format!("svc-{index}"),
                &[1, 2, 3, 4],
            )
        })
        .collect();
    let started = std::time::Instant::now();
    let stats = setup
        .programmer
        .apply_all(frontends.clone())
        .expect("program 10 000 services");
    eprintln!(
        "programmed 10 000 services x 4 endpoints in {:?}: {stats:?}",
        started.elapsed()
    );
    assert_eq!(
        (stats.frontends_added, stats.backends_added),
        (10_000, 40_000)
    );
    // Written in batches: the maps hold exactly the desired state.
    let snapshot = skiff_agent::lb::inspect::read(setup.bpffs.path()).expect("read the maps");
    assert!(
        snapshot.problems.is_empty(),
        "{:?}",
        snapshot.problems.first()
    );
    let differences = skiff_agent::lb::inspect::compare(&frontends, &snapshot.frontends);
    assert!(differences.is_empty(), "{:?}", differences.first());
    // And a second apply of the same state writes nothing.
    assert!(
        setup
            .programmer
            .apply_all(frontends)
            .expect("apply again")
            .is_noop()
    );
    for index in [0u32, 4_999, 9_999] {
        let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + index);
        let service = SocketAddr::from((address, 80));
        let counts = spread(&setup.client(service, "tcp", 40), service);
        assert_eq!(counts.values().sum::<usize>(), 40, "{counts:?}");
    }
}

#[test]
fn a_full_map_is_reported_and_leaves_nothing_half_written() {
    integration::require_root("the load balancer tests load BPF programs");
    let bpffs = TestBpffs::new();
    let small = MapSizes {
        services: 8,
        backends: 64,
        reverse_sk: 64,
        affinity: 64,
    };
    let datapath = Datapath::load(bpffs.path(), &small).expect("load");
    let mut programmer = Programmer::new(datapath).expect("adopt");
    // Each frontend takes 1 + 3 entries of lb4_services: the third does not fit.
    let frontends: Vec<Frontend> = (1..=3u8)
        .map(|index| {
            frontend(
                Ipv4Addr::new(10, 96, 1, index),
                80,
                Proto::Tcp,
                &format!("s{index}"),
                &[1, 2, 3],
            )
        })
        .collect();
    let error = programmer
        .apply_all(frontends)
        .expect_err("the map is full");
    assert!(
        matches!(&error, LbError::MapFull { map: "lb4_services", max_entries: 8, frontend, .. } if frontend.contains("default/s3")),
        "{error}"
    );
    assert!(error.to_string().contains("--lb-max-services"), "{error}");
    let entries = bpftool(
        &["map", "dump", "pinned"],
        &bpffs.path().join("lb4_services"),
    )
    .matches("\"key\"")
    .count();
    assert_eq!(
        entries, 8,
        "two whole frontends (2 x 4 entries), nothing of the third"
    );
    let entries = bpftool(
        &["map", "dump", "pinned"],
        &bpffs.path().join("lb4_backends"),
    )
    .matches("\"key\"")
    .count();
    assert_eq!(entries, 6, "the third frontend's backends were rolled back");
}

#[test]
fn any_sequence_of_changes_leaves_the_maps_equal_to_the_desired_state() {
    integration::require_root("the load balancer tests load BPF programs");
    let bpffs = TestBpffs::new();
    let datapath = Datapath::load(bpffs.path(), &sizes()).expect("load");
    let mut programmer = Programmer::new(datapath).expect("adopt");
    // A small deterministic generator: every step picks, per frontend, a random subset of
    // twelve backends, random terminating flags and random affinity.
    let mut state: u64 = 0x5eed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for step in 0..60 {
        let mut frontends = Vec::new();
        for service in 0..4u8 {
            if next() % 5 == 0 {
                continue; // this Service is absent at this step
            }
            let chosen: Vec<u8> = (1..=12u8).filter(|_| next() % 2 == 0).collect();
            let mut wanted = frontend(
                Ipv4Addr::new(10, 96, 2, service),
                80,
                Proto::Tcp,
                &format!("s{service}"),
                &chosen,
            );
            for backend in &mut wanted.backends {
                backend.terminating = next() % 4 == 0;
            }
            wanted.affinity_timeout = (next() % 3 == 0).then_some(60);
            frontends.push(wanted);
        }
        programmer.apply_all(frontends.clone()).expect("apply");
        let snapshot = skiff_agent::lb::inspect::read(bpffs.path()).expect("read the maps");
        assert!(
            snapshot.problems.is_empty(),
            "step {step}: {:?}",
            snapshot.problems
        );
        let differences = skiff_agent::lb::inspect::compare(&frontends, &snapshot.frontends);
        assert!(differences.is_empty(), "step {step}: {differences:?}");
        let backends: usize = frontends.iter().map(|f| f.backends.len()).sum();
        assert_eq!(
            snapshot.backends_map.entries, backends,
            "step {step}: leaked backends"
        );
    }
}

#[test]
fn an_unconnected_udp_socket_keeps_its_flow_on_one_backend_until_it_goes() {
    let mut setup = Setup::new(3);
    let service = SocketAddr::from((SERVICE_IP, 53));
    setup
        .programmer
        .apply_all(vec![frontend(
            SERVICE_IP,
            53,
            Proto::Udp,
            "dns",
            &[1, 2, 3],
        )])
        .expect("program the service");
    let flow = spread(&setup.client(service, "udp-flow", 50), service);
    assert_eq!(
        flow.len(),
        1,
        "one socket's datagrams must stay on one backend: {flow:?}"
    );
    // New sockets still spread.
    let spread_out = spread(&setup.client(service, "udp", 300), service);
    assert_eq!(spread_out.len(), 3, "{spread_out:?}");
    // A flow whose backend leaves the service moves to one that stays, and stays there.
    let mut socket = HeldConnection::open_mode(
        &setup.cgroup.path,
        &setup.topology.client_netns(),
        service,
        "udp-hold",
    );
    let first = backend_of(&socket.ask()).to_owned();
    let others: Vec<u8> = (1..=3u8)
        .filter(|index| format!("b{index}") != first)
        .collect();
    setup
        .programmer
        .apply_service(
            "default",
            "dns",
            vec![frontend(SERVICE_IP, 53, Proto::Udp, "dns", &others)],
        )
        .expect("remove the flow's backend");
    let moved = backend_of(&socket.ask()).to_owned();
    assert_ne!(moved, first, "datagrams still reach the removed backend");
    for _ in 0..10 {
        assert_eq!(
            backend_of(&socket.ask()),
            moved,
            "the moved flow must stay on its new backend"
        );
    }
}
