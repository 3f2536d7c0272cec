//! Setup, teardown and reconciliation against the recording fake: the order of host
//! operations, nothing left on any failure, leftovers of dead runs removed.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use gpucell_host::devices::record::Owner;
use gpucell_net::record::{current_netns, NetRecord, Records};
use gpucell_net::{FakeNet, HostNet, NetEnv, NetError, NetworkConfig, NetworkRequest};

const ID: &str = "00112233445566ff";

fn env(fake: Arc<FakeNet>, state: &Path, root: &Path) -> NetEnv {
    NetEnv {
        ops: fake,
        config: NetworkConfig::default(),
        state_dir: state.to_path_buf(),
        proc_dir: "/proc".into(),
        host_root: root.to_path_buf(),
    }
}

fn request() -> NetworkRequest {
    NetworkRequest {
        mode: None,
        publish: vec![],
        allow_cidrs: vec!["192.168.9.0/24".parse().unwrap()],
        egress_rate_bps: Some(10_000_000),
        pod_netns: None,
    }
}

fn dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(
        root.path().join("etc/resolv.conf"),
        "nameserver 127.0.0.53\nnameserver 203.0.113.53\n",
    )
    .unwrap();
    (state, root)
}

#[test]
fn setup_then_teardown_leaves_nothing() {
    let (state, root) = dirs();
    let fake = Arc::new(FakeNet::new());
    let e = env(fake.clone(), state.path(), root.path());
    let mut net = gpucell_net::setup(&e, ID, &request()).unwrap();
    assert_eq!(net.plan.guest_address, Ipv4Addr::new(10, 200, 0, 2));
    assert_eq!(net.plan.egress.dns, vec![Ipv4Addr::new(203, 0, 113, 53)]);
    assert!(net.tap_fd().is_some());
    assert_eq!(
        fake.calls(),
        vec![
            &format!(
                "watch_exit delete table inet gpucell_00112233445566ff {}/net/{ID}.json",
                state.path().display()
            ),
            "create_tap gcn001122334455",
            "configure_tap gcn001122334455 10.200.0.1/30",
            "nft table inet gpucell_00112233445566ff {",
            "limit_ingress gcn001122334455 10000000",
        ]
    );
    assert_eq!(Records::lock(state.path()).unwrap().all().len(), 1);
    // A second sandbox gets the next /30.
    let second = gpucell_net::setup(&e, "ffeeddccbbaa9988", &NetworkRequest::default()).unwrap();
    assert_eq!(second.plan.guest_address, Ipv4Addr::new(10, 200, 0, 6));
    drop(second);
    net.teardown().unwrap();
    assert!(fake.tables.lock().unwrap().is_empty());
    assert!(fake.links.lock().unwrap().is_empty());
    assert!(Records::lock(state.path()).unwrap().all().is_empty());
    assert!(gpucell_net::leftovers(&e).unwrap().is_empty());
}

#[test]
fn forwarding_is_switched_on_when_managed() {
    let (state, root) = dirs();
    let mut off = FakeNet::new();
    off.ip_forward = Some("0".into());
    let off = Arc::new(off);
    let e = env(off.clone(), state.path(), root.path());
    let mut net = gpucell_net::setup(&e, ID, &request()).unwrap();
    assert!(off
        .calls()
        .contains(&"set_sysctl net/ipv4/ip_forward=1".to_string()));
    assert!(
        net.warnings.iter().any(|w| w.contains("ip_forward was 0")),
        "{:?}",
        net.warnings
    );
    net.teardown().unwrap();
    // On, it is left alone.
    let on = Arc::new(FakeNet::new());
    let e = env(on.clone(), state.path(), root.path());
    let mut net = gpucell_net::setup(&e, ID, &request()).unwrap();
    assert!(!on.calls().iter().any(|c| c.starts_with("set_sysctl")));
    assert!(!net.warnings.iter().any(|w| w.contains("ip_forward")));
    net.teardown().unwrap();
}

#[test]
fn refusals_leave_nothing() {
    let (state, root) = dirs();
    let mut off = FakeNet::new();
    off.ip_forward = Some("0".into());
    let mut e = env(Arc::new(off), state.path(), root.path());
    e.config.manage_forwarding = false;
    let err = gpucell_net::setup(&e, ID, &request()).err().unwrap();
    assert!(matches!(err, NetError::IpForwardOff(_)), "{err}");
    assert!(err.to_string().contains("ip_forward"));

    let mut off = FakeNet::new();
    off.ip_forward = Some("0".into());
    off.fail_on = Some("set_sysctl");
    let e = env(Arc::new(off), state.path(), root.path());
    let err = gpucell_net::setup(&e, ID, &request()).err().unwrap();
    assert!(matches!(err, NetError::EnableForwarding(..)), "{err}");

    let mut failing = FakeNet::new();
    failing.fail_on = Some("nft_apply");
    let failing = Arc::new(failing);
    let e = env(failing.clone(), state.path(), root.path());
    assert!(gpucell_net::setup(&e, ID, &request()).is_err());
    assert!(
        failing.links.lock().unwrap().is_empty(),
        "{:?}",
        failing.calls()
    );
    assert!(Records::lock(state.path()).unwrap().all().is_empty());
}

#[test]
fn a_killed_runs_leftovers_are_reported_then_removed() {
    let (state, root) = dirs();
    let fake = Arc::new(FakeNet::new());
    let e = env(fake.clone(), state.path(), root.path());
    // What a `kill -9`ed run leaves: its record (owner gone) and its table.
    let dead = NetRecord {
        run_id: "aaaaaaaaaaaaaaaa".into(),
        owner: Owner {
            pid: u32::MAX - 1,
            start_time: 1,
        },
        netns: current_netns(Path::new("/proc")),
        tap: "gcnaaaaaaaaaaaa".into(),
        table: "gpucell_aaaaaaaaaaaaaaaa".into(),
        slot: 0,
        guest: Ipv4Addr::new(10, 200, 0, 2),
        publish: vec!["8080:80".parse().unwrap()],
    };
    Records::lock(state.path()).unwrap().write(&dead).unwrap();
    fake.nft_apply("table inet gpucell_aaaaaaaaaaaaaaaa {\n}\n")
        .unwrap();
    fake.nft_apply("table inet gpucell_bbbbbbbbbbbbbbbb {\n}\n")
        .unwrap();
    let found = gpucell_net::leftovers(&e).unwrap();
    let kinds: Vec<&str> = found.iter().map(|l| l.kind).collect();
    assert_eq!(kinds, vec!["record", "table", "table"], "{found:?}");
    // The next setup removes the dead run's table and record (the unknown table is
    // only reported: no record says it is gpucell's to remove).
    let mut req = request();
    req.publish = vec!["8080:80".parse().unwrap()];
    req.publish[0].host_port = 0;
    let net = gpucell_net::setup(&e, ID, &NetworkRequest::default()).unwrap();
    assert_eq!(net.reconciled.len(), 1);
    assert_eq!(
        net.plan.guest_address,
        Ipv4Addr::new(10, 200, 0, 2),
        "slot reused"
    );
    let tables = fake.tables.lock().unwrap().clone();
    assert!(
        !tables.contains(&"gpucell_aaaaaaaaaaaaaaaa".to_string()),
        "{tables:?}"
    );
}

#[test]
fn a_port_published_by_another_sandbox_names_it() {
    let (state, root) = dirs();
    let fake = Arc::new(FakeNet::new());
    let e = env(fake, state.path(), root.path());
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let req = NetworkRequest {
        publish: vec![format!("{port}:80").parse().unwrap()],
        ..Default::default()
    };
    let first = gpucell_net::setup(&e, ID, &req).unwrap();
    let err = gpucell_net::setup(&e, "ffeeddccbbaa9988", &req)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(ID) && err.contains(&port.to_string()), "{err}");
    drop(first);
    let again = gpucell_net::setup(&e, "ffeeddccbbaa9988", &req).unwrap();
    drop(again);
}

#[test]
fn dry_plan_reserves_nothing() {
    let (state, root) = dirs();
    let fake = Arc::new(FakeNet::new());
    let e = env(fake.clone(), state.path(), root.path());
    let p = gpucell_net::plan(&e, ID, &request()).unwrap();
    assert_eq!(p.plan.tap, "gcn001122334455");
    assert!(fake.calls().is_empty());
    assert!(Records::lock(state.path()).unwrap().all().is_empty());
}
