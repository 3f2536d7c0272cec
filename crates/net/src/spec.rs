//! What a run asks of the network (`--network`, `-p/--publish`, `--allow-cidr`,
//! `--egress-rate`) and what the node's configuration file says (`[network]`), parsed
//! and checked with errors that name the flag or key.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;

/// Default sandbox address range: one /30 per sandbox (network, gateway, guest,
/// broadcast), 16384 sandboxes.
pub const DEFAULT_RANGE: &str = "10.200.0.0/16";
/// Prefix of each sandbox's subnet inside the range.
pub const SANDBOX_PREFIX: u8 = 30;
/// Most ports one run may publish.
pub const MAX_PUBLISH: usize = 64;
/// Most `--allow-cidr` exceptions one run may give.
pub const MAX_ALLOW: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("--network {0:?}: use `private` or `none`")]
    BadMode(String),
    #[error("--publish {0:?}: use HOST_PORT:GUEST_PORT[/tcp|udp] with ports 1-65535 (e.g. 8080:80, 5353:53/udp)")]
    BadPublish(String),
    #[error("--publish {0:?}: a host address is not supported; published ports answer on every host address")]
    PublishAddress(String),
    #[error("--publish: host port {0} is given twice")]
    PublishTwice(String),
    #[error("--egress-rate {0:?}: use bits per second with k, m or g (e.g. 100m, 1g, 500k)")]
    BadRate(String),
    #[error("--{flag}: {count} given, over the limit of {limit}")]
    TooMany {
        flag: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("--allow-cidr")]
    Allow(#[source] crate::cidr::CidrError),
    #[error("{0} needs --network private")]
    NeedsPrivate(&'static str),
    #[error("{0} cannot be combined with a pod network namespace (pod_netns): the pod's network belongs to its CNI plugin")]
    NotWithPod(&'static str),
    #[error("pod_netns {0:?} must be an absolute path to a network namespace file")]
    BadPodNetns(std::path::PathBuf),
}

/// `--network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A virtio-net device on a tap of its own, egress through the host under the
    /// egress policy, reachable only on published ports.
    Private,
    /// No network device at all (loopback only).
    None,
}

impl FromStr for NetworkMode {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "private" => Ok(NetworkMode::Private),
            "none" => Ok(NetworkMode::None),
            _ => Err(SpecError::BadMode(s.chars().take(64).collect())),
        }
    }
}

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `-p HOST_PORT:GUEST_PORT[/tcp|udp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Publish {
    pub host_port: u16,
    pub guest_port: u16,
    pub proto: Proto,
}

impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host_port, self.guest_port, self.proto)
    }
}

impl FromStr for Publish {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SpecError::BadPublish(s.chars().take(64).collect());
        let t = s.trim();
        let (ports, proto) = match t.rsplit_once('/') {
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((p, "udp")) => (p, Proto::Udp),
            Some(_) => return Err(bad()),
            None => (t, Proto::Tcp),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (h, g) = match parts.as_slice() {
            [h, g] => (*h, *g),
            [_, _, _] => return Err(SpecError::PublishAddress(s.chars().take(64).collect())),
            _ => return Err(bad()),
        };
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n != 0 && p.chars().all(|c| c.is_ascii_digit()))
        };
        Ok(Publish {
            host_port: port(h).ok_or_else(bad)?,
            guest_port: port(g).ok_or_else(bad)?,
            proto,
        })
    }
}

/// Parses `--egress-rate`: bits per second, with `k`, `m`, `g` (decimal, as tc does;
/// a trailing `bit`/`bps` is ignored). Returns bits per second.
pub fn parse_rate(s: &str) -> Result<u64, SpecError> {
    let bad = || SpecError::BadRate(s.chars().take(64).collect());
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("bit")
        .or_else(|| t.strip_suffix("bps"))
        .unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1_000),
        Some('m') => (&t[..t.len() - 1], 1_000_000),
        Some('g') => (&t[..t.len() - 1], 1_000_000_000),
        Some(c) if c.is_ascii_digit() => (t, 1),
        _ => return Err(bad()),
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let bits = n.checked_mul(mult).ok_or_else(bad)?;
    // Below 8 kbit/s nothing useful gets through; above 1 Tbit/s is a typo.
    if !(8_000..=1_000_000_000_000).contains(&bits) {
        return Err(bad());
    }
    Ok(bits)
}

/// The network part of a run request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    /// `private` or `none`; unset: the node's `[network] default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<NetworkMode>,
    /// Ports opened on the host to the workload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<Publish>,
    /// Egress exceptions to the refused ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_cidrs: Vec<Cidr>,
    /// Egress bandwidth limit, bits per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_rate_bps: Option<u64>,
    /// A pod's network namespace (e.g. `/var/run/netns/cni-…`, from the OCI spec of a
    /// containerd task): the VM is attached to the interface there (module `pod`)
    /// instead of gpucell's private network. Excludes `mode`, `publish`, `allow_cidrs`
    /// and `egress_rate_bps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_netns: Option<std::path::PathBuf>,
}

impl NetworkRequest {
    /// The mode this run gets on a node whose default is `default`; checks the rest.
    pub fn resolve(&self, default: NetworkMode) -> Result<NetworkMode, SpecError> {
        if let Some(ns) = &self.pod_netns {
            return self.check_pod(ns);
        }
        let mode = self.mode.unwrap_or(default);
        if self.publish.len() > MAX_PUBLISH {
            return Err(SpecError::TooMany {
                flag: "publish",
                count: self.publish.len(),
                limit: MAX_PUBLISH,
            });
        }
        if self.allow_cidrs.len() > MAX_ALLOW {
            return Err(SpecError::TooMany {
                flag: "allow-cidr",
                count: self.allow_cidrs.len(),
                limit: MAX_ALLOW,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.publish {
            if !seen.insert((p.host_port, p.proto)) {
                return Err(SpecError::PublishTwice(format!(
                    "{}/{}",
                    p.host_port, p.proto
                )));
            }
        }
        if mode == NetworkMode::None {
            if !self.publish.is_empty() {
                return Err(SpecError::NeedsPrivate("--publish"));
            }
            if !self.allow_cidrs.is_empty() {
                return Err(SpecError::NeedsPrivate("--allow-cidr"));
            }
            if self.egress_rate_bps.is_some() {
                return Err(SpecError::NeedsPrivate("--egress-rate"));
            }
        }
        if let Some(r) = self.egress_rate_bps {
            parse_rate(&r.to_string())?;
        }
        Ok(mode)
    }
}

impl NetworkRequest {
    /// A pod's namespace: nothing of gpucell's own network may be asked for with it. The
    /// mode is `none` for gpucell's private network (the pod's is attached instead).
    fn check_pod(&self, ns: &std::path::Path) -> Result<NetworkMode, SpecError> {
        if !ns.is_absolute() || ns.as_os_str().len() > 4096 {
            return Err(SpecError::BadPodNetns(ns.to_path_buf()));
        }
        let asked = [
            ("--network", self.mode.is_some()),
            ("--publish", !self.publish.is_empty()),
            ("--allow-cidr", !self.allow_cidrs.is_empty()),
            ("--egress-rate", self.egress_rate_bps.is_some()),
        ];
        match asked.iter().find(|(_, set)| *set) {
            Some((flag, _)) => Err(SpecError::NotWithPod(flag)),
            None => Ok(NetworkMode::None),
        }
    }
}

/// `[network]` in the node's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The mode of a run that asks for none. Built in: `private` (as docker's default
    /// bridge); `none` gives sandboxes no network unless a run asks for one.
    #[serde(default = "default_mode")]
    pub default: NetworkMode,
    /// Switch `net.ipv4.ip_forward` on when a private network needs it and it is off
    /// (default true, as docker does). False: refuse such a run and leave the host's
    /// forwarding to its operator.
    #[serde(default = "yes")]
    pub manage_forwarding: bool,
    /// Where sandbox addresses come from: one /30 per sandbox.
    #[serde(default = "default_range")]
    pub range: Cidr,
    /// Resolvers given to guests; empty: the host's own (`/etc/resolv.conf`), but for
    /// loopback ones, which a guest cannot reach.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Egress exceptions every sandbox of this node gets.
    #[serde(default)]
    pub allow_cidrs: Vec<Cidr>,
    /// Use vhost-net when `/dev/vhost-net` exists (default true).
    #[serde(default = "yes")]
    pub vhost: bool,
}

fn default_mode() -> NetworkMode {
    NetworkMode::Private
}

fn default_range() -> Cidr {
    Cidr::new(Ipv4Addr::new(10, 200, 0, 0), 16).unwrap_or(Cidr::host(Ipv4Addr::UNSPECIFIED))
}

fn yes() -> bool {
    true
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            default: default_mode(),
            range: default_range(),
            dns: Vec::new(),
            allow_cidrs: Vec::new(),
            vhost: true,
            manage_forwarding: true,
        }
    }
}

impl NetworkConfig {
    /// Checks the values: `Err((key, problem))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.range.prefix() > 28 {
            return Err((
                "network.range",
                format!(
                    "{} is too small: give at least a /28 (each sandbox takes a /30)",
                    self.range
                ),
            ));
        }
        for d in &self.dns {
            if d.is_loopback() || d.is_unspecified() || d.is_multicast() {
                return Err(("network.dns", format!("{d} cannot be reached from a guest")));
            }
        }
        if self.allow_cidrs.iter().any(|c| c.overlaps(&self.range)) {
            return Err((
                "network.allow_cidrs",
                format!(
                    "an exception overlaps the sandbox range {}: sandboxes never reach each other",
                    self.range
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn publish_parses_like_docker() {
        let p: Publish = "8080:80".parse().unwrap();
        assert_eq!((p.host_port, p.guest_port, p.proto), (8080, 80, Proto::Tcp));
        let p: Publish = "5353:53/udp".parse().unwrap();
        assert_eq!(p.to_string(), "5353:53/udp");
        for bad in [
            "80",
            "0:80",
            "80:0",
            "x:80",
            "80:80/sctp",
            "70000:80",
            "+1:80",
            "",
        ] {
            assert!(
                matches!(bad.parse::<Publish>(), Err(SpecError::BadPublish(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "127.0.0.1:80:80".parse::<Publish>(),
            Err(SpecError::PublishAddress(_))
        ));
    }

    #[test]
    fn rates_are_bits_per_second() {
        assert_eq!(parse_rate("100m").unwrap(), 100_000_000);
        assert_eq!(parse_rate("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("500kbit").unwrap(), 500_000);
        assert_eq!(parse_rate("64000").unwrap(), 64_000);
        for bad in ["", "fast", "1", "m", "-5m", "99999999999g"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pod_namespace_excludes_gpucells_own_network() {
        let mut r = NetworkRequest {
            pod_netns: Some("/var/run/netns/cni-1".into()),
            ..Default::default()
        };
        assert_eq!(r.resolve(NetworkMode::Private), Ok(NetworkMode::None));
        r.egress_rate_bps = Some(1_000_000);
        assert_eq!(
            r.resolve(NetworkMode::Private),
            Err(SpecError::NotWithPod("--egress-rate"))
        );
        r.egress_rate_bps = None;
        r.mode = Some(NetworkMode::Private);
        assert_eq!(
            r.resolve(NetworkMode::None),
            Err(SpecError::NotWithPod("--network"))
        );
        r.mode = None;
        r.pod_netns = Some("netns/relative".into());
        assert!(matches!(
            r.resolve(NetworkMode::None),
            Err(SpecError::BadPodNetns(_))
        ));
    }

    #[test]
    fn none_refuses_what_needs_a_network() {
        let mut r = NetworkRequest {
            publish: vec!["80:80".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(r.resolve(NetworkMode::Private), Ok(NetworkMode::Private));
        assert_eq!(
            r.resolve(NetworkMode::None),
            Err(SpecError::NeedsPrivate("--publish"))
        );
        r.mode = Some(NetworkMode::Private);
        assert_eq!(r.resolve(NetworkMode::None), Ok(NetworkMode::Private));
        r.publish.push("80:81".parse().unwrap());
        assert!(matches!(
            r.resolve(NetworkMode::None),
            Err(SpecError::PublishTwice(_))
        ));
        // The same host port over both protocols is two ports.
        r.publish[1] = "80:81/udp".parse().unwrap();
        assert!(r.resolve(NetworkMode::None).is_ok());
    }

    #[test]
    fn config_defaults_and_checks() {
        let c = NetworkConfig::default();
        assert_eq!(c.default, NetworkMode::Private);
        assert!(c.manage_forwarding);
        assert_eq!(c.range.to_string(), DEFAULT_RANGE);
        assert!(c.validate().is_ok());
        let c = NetworkConfig {
            range: "10.0.0.0/30".parse().unwrap(),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "network.range");
        let c = NetworkConfig {
            dns: vec![Ipv4Addr::LOCALHOST],
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "network.dns");
        let c = NetworkConfig {
            allow_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "network.allow_cidrs");
    }
}
