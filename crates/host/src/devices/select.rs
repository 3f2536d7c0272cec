//! Which functions can be handed out now, and which ones a request gets.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::bdf::Bdf;
use crate::bind::{self, Targets};
use crate::iommu;
use crate::pci::{Driver, PciFunction, PciScan};
use crate::root::HostRoot;
use gpucell_common::chain_string;

use super::record::{format_utc, AllocationFile, QuarantineFile};

/// Whether one function can be handed out now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Availability {
    /// Free. `needs_bind`: it or another endpoint of its group must go to vfio-pci first.
    Free { needs_bind: bool },
    /// A sandbox holds it, or another function of its IOMMU group.
    Busy {
        sandbox: String,
        pid: u32,
        holder: Bdf,
    },
    /// Quarantined after a failed reset or check.
    Quarantined { reason: String, since_unix: u64 },
    /// It cannot be given to a VM; `why` says what to do.
    NotViable { why: String },
}

impl Availability {
    pub fn is_free(&self) -> bool {
        matches!(self, Self::Free { .. })
    }
}

/// A function that could not be handed out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub bdf: Bdf,
    pub availability: Availability,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bdf = self.bdf;
        match &self.availability {
            Availability::Free { .. } => write!(f, "{bdf} is free"),
            Availability::Busy {
                sandbox,
                pid,
                holder,
            } if *holder == bdf => write!(f, "{bdf} is busy (sandbox {sandbox}, pid {pid})"),
            Availability::Busy {
                sandbox,
                pid,
                holder,
            } => write!(
                f,
                "{bdf} is busy ({holder} of its IOMMU group is held by sandbox {sandbox}, pid {pid})"
            ),
            Availability::Quarantined { reason, since_unix } => write!(
                f,
                "{bdf} is quarantined since {} ({reason}); check it, then run `gpucell gpu release {bdf}`",
                format_utc(*since_unix)
            ),
            Availability::NotViable { why } => write!(f, "{bdf} is not viable: {why}"),
        }
    }
}

/// What is known when deciding: the host's functions and the two record files.
pub(super) struct View<'a> {
    pub root: &'a HostRoot,
    pub scan: &'a PciScan,
    pub allocations: &'a AllocationFile,
    pub quarantine: &'a QuarantineFile,
}

impl View<'_> {
    /// Availability of `f`. `named`: the user named it, so it may be taken from a host
    /// driver; functions picked by count are only taken when on vfio-pci or unbound.
    pub fn availability(&self, f: &PciFunction, named: bool) -> Availability {
        let bdf = f.bdf;
        if let Some(q) = self.quarantine.get(bdf) {
            return Availability::Quarantined {
                reason: q.reason.clone(),
                since_unix: q.since_unix,
            };
        }
        if f.is_bridge() {
            return Availability::NotViable {
                why: "it is a PCI bridge; name the device behind it".into(),
            };
        }
        let Some(group) = f.iommu_group else {
            return Availability::NotViable {
                why: "it has no IOMMU group (IOMMU off); see `gpucell doctor`".into(),
            };
        };
        if let Some(a) = self
            .allocations
            .allocations
            .iter()
            .find(|a| a.bdf == bdf || a.iommu_group == group)
        {
            return Availability::Busy {
                sandbox: a.sandbox.clone(),
                pid: a.owner.pid,
                holder: a.bdf,
            };
        }
        let members = match iommu::group_members(self.root, group) {
            Ok(m) => m,
            Err(e) => {
                return Availability::NotViable {
                    why: chain_string(&e),
                }
            }
        };
        // A group of vfio-pci and unbound endpoints is viable, but /dev/vfio/N exists only
        // once vfio-pci holds the function itself: an unbound function still needs binding.
        if iommu::non_vfio_endpoints(self.scan, &members).is_empty() && f.driver.is_vfio() {
            return Availability::Free { needs_bind: false };
        }
        if let (false, Driver::Bound(d)) = (named, &f.driver) {
            if !f.driver.is_vfio() {
                return Availability::NotViable {
                    why: format!(
                        "it is on driver {d}; name it (--gpus {bdf} or --device {bdf}) or run `gpucell gpu bind {bdf}` to hand it to sandboxes"
                    ),
                };
            }
        }
        match bind::plan_bind(self.root, &Targets::Devices(vec![bdf])) {
            Ok(plan) if plan.refusals.is_empty() => Availability::Free { needs_bind: true },
            Ok(plan) => Availability::NotViable {
                why: format!(
                    "its IOMMU group cannot go to vfio-pci: {}",
                    plan.refusals
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            },
            Err(e) => Availability::NotViable {
                why: chain_string(&e),
            },
        }
    }
}

/// Picks `n` of `free` (sorted by address), preferring one NUMA node: the node with the
/// fewest free functions that still has `n` (keeping larger nodes whole for larger
/// requests); when no node has `n`, nodes with the most free functions first.
/// Functions of unknown node count as one more node. `None` when fewer than `n` are free.
pub fn pick_numa(free: &[(Bdf, Option<u32>)], n: usize) -> Option<Vec<Bdf>> {
    if free.len() < n {
        return None;
    }
    let mut nodes: BTreeMap<Option<u32>, Vec<Bdf>> = BTreeMap::new();
    for (bdf, node) in free {
        nodes.entry(*node).or_default().push(*bdf);
    }
    for list in nodes.values_mut() {
        list.sort();
    }
    if let Some(list) = nodes
        .values()
        .filter(|l| l.len() >= n)
        .min_by_key(|l| l.len())
    {
        return Some(list.iter().take(n).copied().collect());
    }
    let mut lists: Vec<&Vec<Bdf>> = nodes.values().collect();
    lists.sort_by_key(|l| std::cmp::Reverse(l.len()));
    Some(lists.into_iter().flatten().take(n).copied().collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn b(i: u8) -> Bdf {
        Bdf::new(0, i, 0, 0).unwrap()
    }

    #[test]
    fn numa_choice() {
        let free = [
            (b(1), Some(0)),
            (b(2), Some(0)),
            (b(3), Some(0)),
            (b(4), Some(1)),
            (b(5), Some(1)),
        ];
        // Two fit on node 1 (2 free) and node 0 (3 free): the tighter node 1.
        assert_eq!(pick_numa(&free, 2).unwrap(), vec![b(4), b(5)]);
        assert_eq!(pick_numa(&free, 3).unwrap(), vec![b(1), b(2), b(3)]);
        // Four span nodes: the larger node first.
        assert_eq!(pick_numa(&free, 4).unwrap(), vec![b(1), b(2), b(3), b(4)]);
        assert_eq!(pick_numa(&free, 6), None);
        assert_eq!(pick_numa(&free, 1).unwrap().len(), 1);
    }
}
