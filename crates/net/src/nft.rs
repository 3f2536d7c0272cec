//! The nftables rules of one sandbox, rendered as one `nft -f` script (pure), applied
//! and removed as a whole table (`inet gpucell_<run id>`).
//!
//! Every sandbox owns one table with its own base chains. nftables runs every table's
//! chains on a hook: an `accept` here lets the packet go on to other tables, a `drop`
//! or `reject` is final. So a sandbox's table only ever narrows what the host allows,
//! and deleting the table removes exactly this sandbox's rules.

use std::fmt::Write;

use crate::policy::NetPlan;
use crate::spec::Proto;

/// The ruleset that creates `plan.table`. `nft -f` applies a script atomically: the
/// table appears whole or not at all.
pub fn ruleset(plan: &NetPlan) -> String {
    let tap = &plan.tap;
    let guest = plan.guest_address;
    let set = |v: Vec<String>| format!("{{ {} }}", v.join(", "));
    let hard = set(plan.egress.hard().iter().map(ToString::to_string).collect());
    let soft = set(plan.egress.soft().iter().map(ToString::to_string).collect());
    let mut s = String::new();
    let _ = writeln!(s, "table inet {} {{", plan.table);
    // From the sandbox: spoofing, IPv6, other sandboxes and the host (whatever the
    // exceptions), then resolvers, exceptions, refused ranges; the rest is public.
    let _ = writeln!(s, "\tchain from_sandbox {{");
    let _ = writeln!(s, "\t\tmeta nfproto ipv6 drop");
    let _ = writeln!(s, "\t\tip saddr != {guest} drop");
    let _ = writeln!(s, "\t\tct state established,related accept");
    let _ = writeln!(s, "\t\tip daddr {hard} reject with icmpx admin-prohibited");
    if !plan.egress.dns.is_empty() {
        let dns = set(plan.egress.dns.iter().map(ToString::to_string).collect());
        let _ = writeln!(
            s,
            "\t\tip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 accept"
        );
    }
    if !plan.egress.exceptions.is_empty() {
        let ex = set(plan
            .egress
            .exceptions
            .iter()
            .map(ToString::to_string)
            .collect());
        let _ = writeln!(s, "\t\tip daddr {ex} accept");
    }
    let _ = writeln!(s, "\t\tip daddr {soft} reject with icmpx admin-prohibited");
    let _ = writeln!(s, "\t\taccept");
    let _ = writeln!(s, "\t}}");
    // To the sandbox: replies and published ports only.
    let _ = writeln!(s, "\tchain to_sandbox {{");
    let _ = writeln!(s, "\t\tmeta nfproto ipv6 drop");
    let _ = writeln!(s, "\t\tct state established,related accept");
    let _ = writeln!(s, "\t\tip daddr {guest} ct status dnat accept");
    let _ = writeln!(s, "\t\tdrop");
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "\tchain forward {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook forward priority filter - 1; policy accept;"
    );
    let _ = writeln!(s, "\t\tiifname \"{tap}\" jump from_sandbox");
    let _ = writeln!(s, "\t\toifname \"{tap}\" jump to_sandbox");
    let _ = writeln!(s, "\t}}");
    // The host itself (every address it has, the gateway included): replies only.
    let _ = writeln!(s, "\tchain input {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook input priority filter - 1; policy accept;"
    );
    let _ = writeln!(
        s,
        "\t\tiifname \"{tap}\" ct state established,related accept"
    );
    let _ = writeln!(
        s,
        "\t\tiifname \"{tap}\" reject with icmpx admin-prohibited"
    );
    let _ = writeln!(s, "\t}}");
    publish_chains(&mut s, plan);
    let _ = writeln!(s, "\tchain postrouting {{");
    let _ = writeln!(
        s,
        "\t\ttype nat hook postrouting priority srcnat; policy accept;"
    );
    let _ = writeln!(s, "\t\tip saddr {guest} oifname != \"{tap}\" masquerade");
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");
    s
}

/// Published ports: DNAT of the host's own addresses, from outside (prerouting) and
/// from the host itself (output).
fn publish_chains(s: &mut String, plan: &NetPlan) {
    let guest = plan.guest_address;
    // `dstnat` (-100) is a name nft knows only on prerouting.
    for chain in ["prerouting", "output"] {
        let _ = writeln!(s, "\tchain {chain} {{");
        let _ = writeln!(s, "\t\ttype nat hook {chain} priority -100; policy accept;");
        for p in &plan.publish {
            let proto = match p.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            let _ = writeln!(
                s,
                "\t\tfib daddr type local {proto} dport {} dnat ip to {guest}:{}",
                p.host_port, p.guest_port
            );
        }
        let _ = writeln!(s, "\t}}");
    }
}

/// The script that removes `table`.
pub fn delete_table(table: &str) -> String {
    format!("delete table inet {table}\n")
}

/// Table names in `nft -j list tables` output that belong to gpucell (family inet,
/// name with [`crate::policy::TABLE_PREFIX`]).
pub fn gpucell_tables(json: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .cloned()
        .unwrap_or_default();
    items
        .iter()
        .filter_map(|i| i.get("table"))
        .filter(|t| t.get("family").and_then(|f| f.as_str()) == Some("inet"))
        .filter_map(|t| t.get("name").and_then(|n| n.as_str()))
        .filter(|n| n.starts_with(crate::policy::TABLE_PREFIX))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::{EgressPolicy, NetPlan};

    #[test]
    fn golden_ruleset() {
        let egress = EgressPolicy::new(
            "10.200.0.0/16".parse().unwrap(),
            &["198.51.100.2".parse().unwrap()],
            &["192.168.7.0/24".parse().unwrap()],
            &["203.0.113.53".parse().unwrap()],
            None,
        );
        let plan = NetPlan::new(
            "00112233445566ff",
            "10.200.0.0/16".parse().unwrap(),
            0,
            false,
            vec!["8080:80".parse().unwrap(), "5353:53/udp".parse().unwrap()],
            egress,
        )
        .unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/ruleset.nft");
        if std::env::var_os("GPUCELL_BLESS").is_some() {
            std::fs::write(path, ruleset(&plan)).unwrap();
        }
        assert_eq!(ruleset(&plan), std::fs::read_to_string(path).unwrap());
    }

    #[test]
    fn lists_only_gpucell_inet_tables() {
        let j = r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
            {"table":{"family":"inet","name":"gpucell_0011","handle":1}},
            {"table":{"family":"ip","name":"gpucell_0022","handle":2}},
            {"table":{"family":"inet","name":"filter","handle":3}}]}"#;
        assert_eq!(gpucell_tables(j), vec!["gpucell_0011".to_string()]);
        assert!(gpucell_tables("not json").is_empty());
    }
}
