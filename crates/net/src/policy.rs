//! The egress policy and the per-sandbox plan: names, addresses and the rules, decided
//! without touching the host, so that `--dry-run` prints exactly what a run applies.

use std::net::Ipv4Addr;

use serde::Serialize;

use crate::cidr::Cidr;
use crate::spec::{Publish, SANDBOX_PREFIX};

/// Prefix of every sandbox tap's name (`gcn` + 12 hex digits of the run id).
pub const TAP_PREFIX: &str = "gcn";
/// Prefix of every sandbox's nftables table (`gpucell_` + the run id), in family `inet`.
pub const TABLE_PREFIX: &str = "gpucell_";

/// One refused destination range and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    pub cidr: Cidr,
    pub why: String,
}

/// What a sandbox may reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EgressPolicy {
    /// Always `public`: everything not refused below.
    pub default: &'static str,
    /// Refused destinations, in the order the rules check them (`--allow-cidr` cannot
    /// open the sandbox range or the host itself).
    pub refused: Vec<Refused>,
    /// `--allow-cidr` and the node's `[network] allow_cidrs`.
    pub exceptions: Vec<Cidr>,
    /// Resolvers the guest is given: port 53 (udp and tcp) to them is allowed.
    pub dns: Vec<Ipv4Addr>,
    /// Egress bandwidth limit, bits per second.
    pub rate_bps: Option<u64>,
    /// `refused`: IPv6 is not routed for sandboxes at all.
    pub ipv6: &'static str,
}

/// The fixed refused ranges, with their reason.
pub const ALWAYS_REFUSED: &[(&str, &str)] = &[
    ("169.254.169.254/32", "cloud metadata service"),
    ("0.0.0.0/8", "\"this\" network"),
    ("10.0.0.0/8", "private network (RFC 1918)"),
    ("172.16.0.0/12", "private network (RFC 1918)"),
    ("192.168.0.0/16", "private network (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved and broadcast"),
];

impl EgressPolicy {
    /// The policy of a sandbox of `range` on a host with `host_addrs`, with these
    /// exceptions and resolvers.
    pub fn new(
        range: Cidr,
        host_addrs: &[Ipv4Addr],
        exceptions: &[Cidr],
        dns: &[Ipv4Addr],
        rate_bps: Option<u64>,
    ) -> EgressPolicy {
        let mut refused = vec![Refused {
            cidr: range,
            why: "other sandboxes (the sandbox range)".into(),
        }];
        for a in host_addrs {
            refused.push(Refused {
                cidr: Cidr::host(*a),
                why: "this host's own address".into(),
            });
        }
        for (c, why) in ALWAYS_REFUSED {
            if let Ok(cidr) = c.parse() {
                refused.push(Refused {
                    cidr,
                    why: (*why).into(),
                });
            }
        }
        let mut exceptions = exceptions.to_vec();
        exceptions.sort();
        exceptions.dedup();
        EgressPolicy {
            default: "public",
            refused,
            exceptions,
            dns: dns.to_vec(),
            rate_bps,
            ipv6: "refused",
        }
    }

    /// Whether a packet from the sandbox to `ip:port` would pass (the same order as the
    /// rules: sandbox range and host first, then DNS, exceptions, refused ranges).
    pub fn allows(&self, ip: Ipv4Addr, dns_port: bool) -> bool {
        if self.hard().iter().any(|c| c.contains(ip)) {
            return false;
        }
        if dns_port && self.dns.contains(&ip) {
            return true;
        }
        if self.exceptions.iter().any(|c| c.contains(ip)) {
            return true;
        }
        !self.refused.iter().any(|r| r.cidr.contains(ip))
    }

    /// The refused ranges an exception cannot open (the sandbox range, the host).
    pub fn hard(&self) -> Vec<Cidr> {
        let fixed = ALWAYS_REFUSED.len().min(self.refused.len());
        self.refused[..self.refused.len() - fixed]
            .iter()
            .map(|r| r.cidr)
            .collect()
    }

    /// The refused ranges an exception can open.
    pub fn soft(&self) -> Vec<Cidr> {
        let hard = self.hard().len();
        self.refused.iter().skip(hard).map(|r| r.cidr).collect()
    }
}

/// One sandbox's network, as a run sets it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetPlan {
    pub mode: &'static str,
    /// The host-side tap.
    pub tap: String,
    /// The nftables table (family inet) holding every rule of this sandbox.
    pub table: String,
    /// The sandbox's /30.
    pub subnet: Cidr,
    /// The host side of the tap: the guest's default gateway.
    pub gateway: Ipv4Addr,
    pub guest_address: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: String,
    /// Whether QEMU uses vhost-net for the device.
    pub vhost: bool,
    pub publish: Vec<Publish>,
    pub egress: EgressPolicy,
}

/// The names of run `id`'s tap and table.
pub fn names(id: &str) -> (String, String) {
    let short: String = id.chars().take(12).collect();
    (
        format!("{TAP_PREFIX}{short}"),
        format!("{TABLE_PREFIX}{id}"),
    )
}

/// A locally administered MAC from the run id (`52:54:00` is QEMU's prefix).
pub fn mac_for(id: &str) -> String {
    let hex: Vec<char> = id.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let mut out = String::from("52:54:00");
    for i in 0..3 {
        let a = hex.get(2 * i).copied().unwrap_or('0');
        let b = hex.get(2 * i + 1).copied().unwrap_or('0');
        out.push(':');
        out.push(a.to_ascii_lowercase());
        out.push(b.to_ascii_lowercase());
    }
    out
}

impl NetPlan {
    /// The plan of run `id` in slot `slot` of `range`: `None` when the slot is past the
    /// range's end.
    pub fn new(
        id: &str,
        range: Cidr,
        slot: u64,
        vhost: bool,
        publish: Vec<Publish>,
        egress: EgressPolicy,
    ) -> Option<NetPlan> {
        let subnet = range.subnet(SANDBOX_PREFIX, slot)?;
        let (tap, table) = names(id);
        Some(NetPlan {
            mode: "private",
            tap,
            table,
            gateway: subnet.nth(1)?,
            guest_address: subnet.nth(2)?,
            prefix_len: SANDBOX_PREFIX,
            subnet,
            mac: mac_for(id),
            vhost,
            publish,
            egress,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn policy(exceptions: &[&str]) -> EgressPolicy {
        let ex: Vec<Cidr> = exceptions.iter().map(|c| c.parse().unwrap()).collect();
        EgressPolicy::new(
            "10.200.0.0/16".parse().unwrap(),
            &[ip("198.51.100.2")],
            &ex,
            &[ip("192.168.1.1")],
            None,
        )
    }

    #[test]
    fn public_only_by_default() {
        let p = policy(&[]);
        assert!(p.allows(ip("203.0.113.10"), false));
        assert!(p.allows(ip("8.8.8.8"), false));
        for refused in [
            "192.168.1.20",
            "10.1.2.3",
            "172.20.0.1",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "169.254.1.1",
            "224.0.0.251",
            "255.255.255.255",
            "10.200.0.6",
            "198.51.100.2",
            "0.0.0.0",
        ] {
            assert!(!p.allows(ip(refused), false), "{refused}");
        }
        // DNS to the given resolver only, on port 53.
        assert!(p.allows(ip("192.168.1.1"), true));
        assert!(!p.allows(ip("192.168.1.1"), false));
        assert_eq!(p.refused[0].cidr.to_string(), "10.200.0.0/16");
        assert_eq!(p.ipv6, "refused");
    }

    #[test]
    fn exceptions_open_ranges_but_not_sandboxes_or_the_host() {
        let p = policy(&["192.168.5.0/24", "10.0.0.0/8", "198.51.100.0/24"]);
        assert!(p.allows(ip("192.168.5.9"), false));
        assert!(!p.allows(ip("192.168.6.9"), false));
        assert!(p.allows(ip("10.1.1.1"), false));
        assert!(!p.allows(ip("10.200.0.6"), false));
        assert!(!p.allows(ip("198.51.100.2"), false));
        assert_eq!(p.hard().len(), 2);
    }

    #[test]
    fn plan_names_and_addresses() {
        let id = "0123456789abcdef";
        let p = NetPlan::new(
            id,
            "10.200.0.0/16".parse().unwrap(),
            3,
            false,
            vec![],
            policy(&[]),
        )
        .unwrap();
        assert_eq!(p.tap, "gcn0123456789ab");
        assert!(p.tap.len() <= 15);
        assert_eq!(p.table, "gpucell_0123456789abcdef");
        assert_eq!(p.subnet.to_string(), "10.200.0.12/30");
        assert_eq!(
            (p.gateway, p.guest_address),
            (ip("10.200.0.13"), ip("10.200.0.14"))
        );
        assert_eq!(p.mac, "52:54:00:01:23:45");
        assert!(NetPlan::new(
            id,
            "10.0.0.0/28".parse().unwrap(),
            4,
            false,
            vec![],
            policy(&[])
        )
        .is_none());
    }
}
