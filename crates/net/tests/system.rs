//! The real host operations (tun, rtnetlink, nft, tc) in a network namespace of the
//! test's own, on a thread of its own (a network namespace is per thread): nothing
//! touches the machine's own namespace.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use gpucell_net::{HostNet, NetEnv, NetworkConfig, NetworkRequest, SystemNet};

fn skip() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    if std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("no nft (scripts/install-deps.sh installs nftables)".into());
    }
    None
}

#[test]
fn real_setup_and_teardown_in_a_private_namespace() {
    if let Some(why) = skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_path_buf();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let ops = Arc::new(SystemNet::default());
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        let env = NetEnv {
            ops: ops.clone(),
            config: NetworkConfig::default(),
            state_dir,
            proc_dir: "/proc".into(),
            host_root: "/".into(),
        };
        let req = NetworkRequest {
            publish: vec!["18080:80".parse().unwrap()],
            ..Default::default()
        };
        let mut net = gpucell_net::setup(&env, "0123456789abcdef", &req).unwrap();
        assert!(ops
            .links()
            .unwrap()
            .contains(&"gcn0123456789ab".to_string()));
        assert!(ops
            .host_addresses()
            .unwrap()
            .contains(&"10.200.0.1".parse().unwrap()));
        let tables = ops.nft_tables().unwrap();
        assert!(tables.contains("gpucell_0123456789abcdef"), "{tables}");
        police(ops.as_ref());
        net.teardown().unwrap();
        assert!(!ops.links().unwrap().iter().any(|l| l.starts_with("gcn")));
        assert!(!ops.nft_tables().unwrap().contains("gpucell_"));
        assert!(gpucell_net::leftovers(&env).unwrap().is_empty());
    })
    .join()
    .unwrap();
}

/// The tc policer on the sandbox's tap, where this kernel has it; else the refusal
/// must say what is missing.
fn police(ops: &SystemNet) {
    match ops.limit_ingress("gcn0123456789ab", 50_000_000) {
        Ok(()) => {
            let tc = std::process::Command::new("tc")
                .args(["filter", "show", "dev", "gcn0123456789ab", "ingress"])
                .output()
                .unwrap();
            let tc = String::from_utf8_lossy(&tc.stdout);
            assert!(tc.contains("police") && tc.contains("50Mbit"), "{tc}");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("cls_u32") && msg.contains("--egress-rate"),
                "{msg}"
            );
            eprintln!("this kernel has no tc policer: {msg}");
        }
    }
}
