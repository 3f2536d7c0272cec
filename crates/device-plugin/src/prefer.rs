//! GetPreferredAllocation: which of the available GPUs a container should get. GPUs on the
//! same NUMA node come first, then, within it, GPUs of the same NVLink clique (where the
//! cliques are known); the devices the kubelet must include always come first.

use std::collections::BTreeMap;

use crate::resources::PluginDevice;

/// Picks `size` device IDs from `available`: every ID of `must_include` first, then the
/// rest from the NUMA node (then clique) the must-include devices sit on, or else from
/// the smallest NUMA node (then clique) that can hold all that is still needed, so that
/// large nodes stay whole. IDs the plugin does not know are ignored. Deterministic.
pub fn preferred(
    devices: &[PluginDevice],
    available: &[String],
    must_include: &[String],
    size: usize,
) -> Vec<String> {
    let known = |id: &String| devices.iter().find(|d| &d.id == id);
    let mut chosen: Vec<&PluginDevice> = Vec::new();
    for id in must_include {
        if let Some(d) = known(id) {
            if !chosen.iter().any(|c| c.id == d.id) {
                chosen.push(d);
            }
        }
    }
    let mut candidates: Vec<&PluginDevice> = available
        .iter()
        .filter_map(known)
        .filter(|d| !chosen.iter().any(|c| c.id == d.id))
        .collect();
    candidates.sort_by(|a, b| a.id.cmp(&b.id));
    candidates.dedup_by(|a, b| a.id == b.id);
    let need = size.saturating_sub(chosen.len());
    let numa = chosen
        .first()
        .map(|d| d.numa_node)
        .unwrap_or_else(|| best_fit(&candidates, need, |d| d.numa_node));
    let on_numa: Vec<&PluginDevice> = candidates
        .iter()
        .copied()
        .filter(|d| d.numa_node == numa)
        .collect();
    let clique = chosen
        .iter()
        .find_map(|d| d.clique)
        .or_else(|| best_fit(&on_numa, need, |d| d.clique));
    candidates.sort_by_key(|d| {
        (
            d.numa_node != numa,
            clique.is_none() || d.clique != clique,
            d.bdf,
        )
    });
    chosen.extend(candidates.into_iter().take(need));
    chosen.truncate(size.max(must_include.len()));
    chosen.into_iter().map(|d| d.id.clone()).collect()
}

/// The key (NUMA node or clique) whose group of candidates best fits `need`: the
/// smallest group that holds all of it, else the largest group. `None` keys (unknown)
/// never win over a known one of the same fit.
fn best_fit<K: Ord + Copy>(
    candidates: &[&PluginDevice],
    need: usize,
    key: impl Fn(&PluginDevice) -> Option<K>,
) -> Option<K> {
    let mut groups: BTreeMap<Option<K>, usize> = BTreeMap::new();
    for d in candidates {
        *groups.entry(key(d)).or_default() += 1;
    }
    let fitting = groups
        .iter()
        .filter(|(k, n)| k.is_some() && **n >= need)
        .min_by_key(|(_, n)| **n);
    if let Some((k, _)) = fitting {
        return *k;
    }
    groups
        .iter()
        .filter(|(k, _)| k.is_some())
        .max_by_key(|(_, n)| **n)
        .and_then(|(k, _)| *k)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::resources::{device_id, Health};

    fn dev(addr: &str, numa: Option<u32>, clique: Option<usize>) -> PluginDevice {
        let bdf = addr.parse().unwrap();
        PluginDevice {
            id: device_id(bdf),
            bdf,
            iommu_group: Some(1),
            numa_node: numa,
            clique,
            health: Health::Healthy,
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|a| device_id(a.parse().unwrap())).collect()
    }

    /// Two NUMA nodes; node 0 has 3 GPUs (two linked), node 1 has 2 (linked).
    fn node() -> Vec<PluginDevice> {
        vec![
            dev("0000:01:00.0", Some(0), None),
            dev("0000:02:00.0", Some(0), Some(0)),
            dev("0000:03:00.0", Some(0), Some(0)),
            dev("0000:81:00.0", Some(1), Some(1)),
            dev("0000:82:00.0", Some(1), Some(1)),
        ]
    }

    #[test]
    fn two_gpus_come_from_the_smallest_node_that_fits() {
        let d = node();
        let all = ids(&[
            "0000:01:00.0",
            "0000:02:00.0",
            "0000:03:00.0",
            "0000:81:00.0",
            "0000:82:00.0",
        ]);
        assert_eq!(
            preferred(&d, &all, &[], 2),
            ids(&["0000:81:00.0", "0000:82:00.0"])
        );
        // Three only fit on node 0.
        assert_eq!(
            preferred(&d, &all, &[], 3),
            ids(&["0000:02:00.0", "0000:03:00.0", "0000:01:00.0"])
        );
    }

    #[test]
    fn must_include_decides_the_node_and_clique() {
        let d = node();
        let all = ids(&[
            "0000:01:00.0",
            "0000:02:00.0",
            "0000:03:00.0",
            "0000:81:00.0",
            "0000:82:00.0",
        ]);
        let must = ids(&["0000:03:00.0"]);
        assert_eq!(
            preferred(&d, &all, &must, 2),
            ids(&["0000:03:00.0", "0000:02:00.0"])
        );
        // Beyond one node: the rest spills over to the other.
        let got = preferred(&d, &all, &must, 4);
        assert_eq!(got.len(), 4);
        assert_eq!(
            got[..3],
            ids(&["0000:03:00.0", "0000:02:00.0", "0000:01:00.0"])
        );
    }

    #[test]
    fn clique_wins_within_a_node_and_unknown_ids_are_ignored() {
        let d = node();
        let avail = ids(&["0000:01:00.0", "0000:02:00.0", "0000:03:00.0"]);
        assert_eq!(
            preferred(&d, &avail, &[], 2),
            ids(&["0000:02:00.0", "0000:03:00.0"])
        );
        let mut with_unknown = avail.clone();
        with_unknown.push("bogus".into());
        assert_eq!(preferred(&d, &with_unknown, &[], 5).len(), 3);
    }
}
