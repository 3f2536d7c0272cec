//! IPv4 networks (`a.b.c.d/n`) as the policy, the address range and `--allow-cidr` use
//! them. IPv6 is refused here, with a message: sandbox networks are IPv4 only
//! (docs/network.md).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IPv4 network: write a.b.c.d/n (n from 0 to 32)")]
    Bad(String),
    #[error("{0:?} is an IPv6 network: sandbox networks are IPv4 only, IPv6 is refused (see docs/network.md)")]
    Ipv6(String),
    #[error("{0:?} has host bits set: the network is {1}")]
    HostBits(String, Cidr),
}

/// An IPv4 network: its first address and prefix length, host bits clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl Cidr {
    /// The network `addr/prefix`, host bits cleared; `None` when prefix > 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Cidr> {
        (prefix <= 32).then(|| Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// One address as a /32.
    pub fn host(addr: Ipv4Addr) -> Cidr {
        Cidr { addr, prefix: 32 }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// How many addresses the network holds.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// The `n`-th address of the network (`None` past its end).
    pub fn nth(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + n as u32))
    }

    /// The `n`-th subnet of prefix `prefix` inside this network.
    pub fn subnet(&self, prefix: u8, n: u64) -> Option<Cidr> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let step = 1u64 << (32 - u32::from(prefix));
        let first = self.nth(n.checked_mul(step)?)?;
        Cidr::new(first, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `a.b.c.d/n`, or a bare address (a /32). Host bits must be clear.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let bad = || CidrError::Bad(s.chars().take(64).collect());
        if t.contains(':') {
            return Err(CidrError::Ipv6(s.chars().take(64).collect()));
        }
        let (a, p) = t.split_once('/').unwrap_or((t, "32"));
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        if p.is_empty() || p.len() > 2 || !p.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        let c = Cidr::new(addr, prefix).ok_or_else(bad)?;
        if c.addr != addr {
            return Err(CidrError::HostBits(s.chars().take(64).collect(), c));
        }
        Ok(c)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_prints_and_contains() {
        let c: Cidr = "10.200.0.0/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.200.0.0/16");
        assert!(c.contains("10.200.255.1".parse().unwrap()));
        assert!(!c.contains("10.201.0.1".parse().unwrap()));
        assert_eq!(c.size(), 65536);
        assert_eq!(c.subnet(30, 1).unwrap().to_string(), "10.200.0.4/30");
        assert_eq!(c.subnet(30, 16384), None);
        let h: Cidr = "169.254.169.254".parse().unwrap();
        assert_eq!(h.prefix(), 32);
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!(c.overlaps(&"10.0.0.0/8".parse().unwrap()));
        assert!(!c.overlaps(&"192.168.0.0/16".parse().unwrap()));
    }

    #[test]
    fn refuses_bad_ipv6_and_host_bits() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/008",
        ] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(CidrError::Bad(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "fd00::/8".parse::<Cidr>(),
            Err(CidrError::Ipv6(_))
        ));
        let e = "10.0.0.1/8".parse::<Cidr>().unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
    }
}
