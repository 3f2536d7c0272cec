//! `gpucell doctor`'s network checks: what `--network private` needs (tun, nftables,
//! ip_forward), what makes it faster (vhost-net), and what killed runs left behind.
//! A missing need fails only on a node whose `[network] default` is `private`; else it
//! warns, since runs without a network do not need it.

use gpucell_host::doctor::{Check, Status};

use crate::setup::{leftovers, NetEnv};
use crate::spec::NetworkMode;

fn check(id: &str, title: &str, status: Status, detail: String, fix: Option<&str>) -> Check {
    Check {
        id: id.into(),
        title: title.into(),
        status,
        detail,
        fix: fix.map(str::to_string),
    }
}

/// The network checks of `env`'s host (its namespace, its `/dev` and `/proc/sys`).
pub fn checks(env: &NetEnv) -> Vec<Check> {
    let needed = env.config.default == NetworkMode::Private;
    let missing = if needed { Status::Fail } else { Status::Warn };
    let mut out = Vec::new();
    let tun = env.host_root.join("dev/net/tun");
    out.push(if tun.exists() {
        check(
            "net-tun",
            "tun device",
            Status::Pass,
            format!("{} exists", tun.display()),
            None,
        )
    } else {
        check(
            "net-tun",
            "tun device",
            missing,
            format!("{} is missing: sandboxes cannot get a tap", tun.display()),
            Some("load the tun module (modprobe tun)"),
        )
    });
    let vhost = env.host_root.join("dev/vhost-net");
    out.push(if vhost.exists() {
        check(
            "net-vhost",
            "vhost-net",
            Status::Pass,
            format!(
                "{} exists: the NIC's data path runs in the kernel",
                vhost.display()
            ),
            None,
        )
    } else {
        check(
            "net-vhost",
            "vhost-net",
            Status::Warn,
            format!(
                "{} is missing: QEMU moves every packet itself (slower)",
                vhost.display()
            ),
            Some("load the vhost_net module (modprobe vhost_net)"),
        )
    });
    out.push(match env.ops.nft_tables() {
        Ok(_) => check(
            "net-nftables",
            "nftables",
            Status::Pass,
            "nft lists the ruleset".into(),
            None,
        ),
        Err(e) => check(
            "net-nftables",
            "nftables",
            missing,
            gpucell_common::chain_string(&e),
            Some("install nftables (scripts/install-deps.sh) and run as root"),
        ),
    });
    let fwd = env
        .ops
        .sysctl("net/ipv4/ip_forward")
        .unwrap_or_else(|| "unreadable".into());
    out.push(if fwd == "1" {
        check(
            "net-ip-forward",
            "IPv4 forwarding",
            Status::Pass,
            "net.ipv4.ip_forward is 1".into(),
            None,
        )
    } else if env.config.manage_forwarding {
        check(
            "net-ip-forward",
            "IPv4 forwarding",
            Status::Warn,
            format!("net.ipv4.ip_forward is {fwd}: gpucell switches it on at the first private network ([network] manage_forwarding)"),
            Some("sysctl -w net.ipv4.ip_forward=1 and persist it in /etc/sysctl.d to have it on from boot"),
        )
    } else {
        check(
            "net-ip-forward",
            "IPv4 forwarding",
            missing,
            format!("net.ipv4.ip_forward is {fwd} and [network] manage_forwarding is off: sandbox traffic cannot be routed"),
            Some("sysctl -w net.ipv4.ip_forward=1 and persist it in /etc/sysctl.d"),
        )
    });
    out.push(match leftovers(env) {
        Ok(l) if l.is_empty() => check("net-leftovers", "network leftovers", Status::Pass, "no tap, table or record of a dead run".into(), None),
        Ok(l) => check(
            "net-leftovers",
            "network leftovers",
            Status::Warn,
            l.iter().map(|x| format!("{} {}", x.kind, x.name)).collect::<Vec<_>>().join("; "),
            Some("the next `gpucell run --network private` removes those with a record; delete the others with `nft delete table inet NAME` / `ip link del NAME`"),
        ),
        Err(e) => check("net-leftovers", "network leftovers", Status::Warn, gpucell_common::chain_string(&e), Some("install nftables and run as root to inspect")),
    });
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ops::{FakeNet, HostNet};

    fn env(
        fake: FakeNet,
        root: &std::path::Path,
        state: &std::path::Path,
        default: NetworkMode,
    ) -> NetEnv {
        let config = crate::spec::NetworkConfig {
            default,
            ..Default::default()
        };
        NetEnv {
            ops: Arc::new(fake),
            config,
            state_dir: state.to_path_buf(),
            proc_dir: "/proc".into(),
            host_root: root.to_path_buf(),
        }
    }

    #[test]
    fn needs_fail_only_where_private_is_the_default() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let mut fake = FakeNet::new();
        fake.ip_forward = Some("0".into());
        let e = env(fake, root.path(), state.path(), NetworkMode::None);
        let c = checks(&e);
        let status = |c: &[Check], id: &str| c.iter().find(|x| x.id == id).unwrap().status;
        assert_eq!(status(&c, "net-tun"), Status::Warn);
        assert_eq!(status(&c, "net-ip-forward"), Status::Warn);
        assert_eq!(status(&c, "net-nftables"), Status::Pass);
        let mut fake = FakeNet::new();
        fake.ip_forward = Some("0".into());
        fake.nft_apply("table inet gpucell_dead {\n").unwrap();
        let mut e = env(fake, root.path(), state.path(), NetworkMode::Private);
        let c = checks(&e);
        assert_eq!(status(&c, "net-tun"), Status::Fail);
        // gpucell switches forwarding on by itself unless told not to.
        assert_eq!(status(&c, "net-ip-forward"), Status::Warn);
        e.config.manage_forwarding = false;
        let c = checks(&e);
        assert_eq!(status(&c, "net-ip-forward"), Status::Fail);
        assert_eq!(status(&c, "net-vhost"), Status::Warn);
        let l = c.iter().find(|x| x.id == "net-leftovers").unwrap();
        assert!(l.detail.contains("gpucell_dead"), "{}", l.detail);
    }
}
