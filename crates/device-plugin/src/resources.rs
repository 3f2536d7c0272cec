//! The node's GPUs as Kubernetes extended resources: one resource per GPU model
//! (`gpucell.io/H200`), named from the GPU database (`data/gpu-architectures.toml`) unless
//! overridden, each GPU a device whose ID is its CDI device name, healthy or not.
//!
//! Everything is read under the host root and the state directory passed in: the PCI
//! functions through [`gpucell_host::gpu::GpuInventory`], the allocator's records through
//! [`gpucell_host::gpu_state::DeviceRecords`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gpucell_host::arch::ArchTable;
use gpucell_host::gpu::{Gpu, GpuInventory, PassthroughState};
use gpucell_host::gpu_state::DeviceRecords;
use gpucell_host::{Bdf, HostRoot};

/// The resource domain used when none is given.
pub const DEFAULT_DOMAIN: &str = "gpucell.io";
/// Longest resource class (the part after the `/`), as Kubernetes allows for a name.
pub const MAX_CLASS_LEN: usize = 63;

/// Errors reading the node's GPUs or checking the naming options.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("cannot read the GPUs under {}", root.display())]
    Inventory {
        root: PathBuf,
        #[source]
        source: gpucell_host::gpu::GpuError,
    },
    #[error("resource name override `{text}` is not DEVICE=NAME with DEVICE a PCI device id such as 2335 or 10de:2335")]
    BadOverride { text: String },
    #[error("resource class `{name}` is not 1-63 characters of A-Z a-z 0-9 _ - starting and ending with a letter or digit")]
    BadClass { name: String },
    #[error("resource domain `{domain}` is not a DNS name such as gpucell.io outside kubernetes.io and k8s.io")]
    BadDomain { domain: String },
    #[error(
        "NVLink clique `{text}` names `{item}`, which is not a PCI address such as 0000:41:00.0"
    )]
    BadClique { text: String, item: String },
}

/// How devices are named, grouped and ordered.
#[derive(Debug, Clone)]
pub struct Naming {
    /// The resource domain (`gpucell.io`).
    pub domain: String,
    /// Resource class by NVIDIA PCI device id, over the database's name.
    pub overrides: BTreeMap<u16, String>,
    /// NVLink cliques: the GPUs of each set are linked to each other. Empty when unknown.
    pub cliques: Vec<Vec<Bdf>>,
}

impl Default for Naming {
    fn default() -> Self {
        Self {
            domain: DEFAULT_DOMAIN.to_owned(),
            overrides: BTreeMap::new(),
            cliques: Vec::new(),
        }
    }
}

impl Naming {
    /// Checks the domain and the override names.
    pub fn validate(&self) -> Result<(), ResourceError> {
        let d = &self.domain;
        let ok = !d.is_empty()
            && d.len() <= 253
            && d.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        // The kubelet refuses extended resources in the Kubernetes domains.
        let reserved = d == "kubernetes.io"
            || d.ends_with(".kubernetes.io")
            || d == "k8s.io"
            || d.ends_with(".k8s.io");
        if !ok || reserved {
            return Err(ResourceError::BadDomain {
                domain: gpucell_host::sysfs::printable(d),
            });
        }
        self.overrides.values().try_for_each(|n| check_class(n))
    }

    /// Parses `DEVICE=NAME` (`2335=H200`, `10de:2335=H200`) into the overrides.
    pub fn add_override(&mut self, text: &str) -> Result<(), ResourceError> {
        let bad = || ResourceError::BadOverride {
            text: gpucell_host::sysfs::printable(text),
        };
        let (dev, name) = text.split_once('=').ok_or_else(bad)?;
        let dev = dev.strip_prefix("10de:").unwrap_or(dev);
        let dev = dev.strip_prefix("0x").unwrap_or(dev);
        let id = u16::from_str_radix(dev, 16).map_err(|_| bad())?;
        check_class(name)?;
        self.overrides.insert(id, name.to_owned());
        Ok(())
    }

    /// Parses a comma-separated list of PCI addresses into one clique.
    pub fn add_clique(&mut self, text: &str) -> Result<(), ResourceError> {
        let mut set = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bdf: Bdf = item.parse().map_err(|_| ResourceError::BadClique {
                text: gpucell_host::sysfs::printable(text),
                item: gpucell_host::sysfs::printable(item),
            })?;
            set.push(bdf);
        }
        if !set.is_empty() {
            self.cliques.push(set);
        }
        Ok(())
    }

    /// The class of a GPU of NVIDIA device id `device`: the override, else the
    /// database's model reduced to its family (`H200 SXM 141GB` → `H200`,
    /// `GeForce RTX 4090` → `RTX-4090`), else the chip range's name, else `nvidia-<id>`.
    pub fn class_of(&self, device: u16) -> String {
        if let Some(name) = self.overrides.get(&device) {
            return name.clone();
        }
        let label = ArchTable::embedded().and_then(|t| t.lookup(device));
        match label {
            Some(m) => {
                let c = family(&m.label);
                if check_class(&c).is_ok() {
                    c
                } else {
                    format!("nvidia-{device:04x}")
                }
            }
            None => format!("nvidia-{device:04x}"),
        }
    }

    /// The clique number of `bdf` (index into [`Naming::cliques`]).
    pub fn clique_of(&self, bdf: Bdf) -> Option<usize> {
        self.cliques.iter().position(|c| c.contains(&bdf))
    }
}

/// Reduces a product name to its family: `H200 SXM 141GB` → `H200`, `L40S` → `L40S`,
/// `GeForce RTX 2080 Ti Rev. A` → `RTX-2080-Ti`, a chip range `TU10x/TU117` → `TU10x-TU117`.
pub fn family(label: &str) -> String {
    let tokens: Vec<&str> = label
        .split_whitespace()
        .filter(|t| !t.eq_ignore_ascii_case("GeForce"))
        .collect();
    let mut parts: Vec<&str> = Vec::new();
    let mut rest = tokens.iter();
    if let Some(first) = rest.next() {
        parts.push(first);
        if !first.bytes().any(|b| b.is_ascii_digit()) {
            if let Some(next) = rest.next() {
                parts.push(next);
            }
        }
    }
    if let Some(next) = rest.next() {
        if next.eq_ignore_ascii_case("Ti") || next.eq_ignore_ascii_case("SUPER") {
            parts.push(next);
        }
    }
    let joined = parts.join("-");
    joined
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Checks a resource class: what both Kubernetes (a qualified name) and CDI (a class)
/// accept.
pub fn check_class(name: &str) -> Result<(), ResourceError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_CLASS_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric);
    if ok {
        Ok(())
    } else {
        Err(ResourceError::BadClass {
            name: gpucell_host::sysfs::printable(name),
        })
    }
}

/// The device ID of the GPU at `bdf`, which is also its CDI device name:
/// the address with `:` as `-` (`0000-41-00.0`).
pub fn device_id(bdf: Bdf) -> String {
    bdf.to_string().replace(':', "-")
}

/// The address a device ID names, if it is one.
pub fn bdf_of_id(id: &str) -> Option<Bdf> {
    id.replace('-', ":").parse().ok()
}

/// Why a device is unhealthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// The reason, for the log.
    Unhealthy(String),
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Self::Healthy)
    }
    /// The value the device plugin API uses: `Healthy` or `Unhealthy`.
    pub fn api_str(&self) -> &'static str {
        match self {
            Self::Healthy => "Healthy",
            Self::Unhealthy(_) => "Unhealthy",
        }
    }
}

/// One GPU as a device of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginDevice {
    /// The device ID = CDI device name (`0000-41-00.0`).
    pub id: String,
    pub bdf: Bdf,
    pub iommu_group: Option<u32>,
    pub numa_node: Option<u32>,
    pub clique: Option<usize>,
    pub health: Health,
}

impl PluginDevice {
    /// The host's VFIO group node (`/dev/vfio/<group>`), as the container runtime sees it.
    pub fn vfio_node(&self) -> Option<PathBuf> {
        self.iommu_group
            .map(|g| PathBuf::from(format!("/dev/vfio/{g}")))
    }
}

/// The devices of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// `gpucell.io/H200`: the extended resource name and the CDI kind.
    pub name: String,
    /// `H200`.
    pub class: String,
    pub devices: Vec<PluginDevice>,
}

/// Reads the node's GPUs and groups them into resources, with their health.
pub fn discover(
    root: &HostRoot,
    state_dir: &Path,
    naming: &Naming,
) -> Result<Vec<Resource>, ResourceError> {
    let inv = GpuInventory::read(root).map_err(|source| ResourceError::Inventory {
        root: root.path().to_owned(),
        source,
    })?;
    for w in &inv.warnings {
        tracing::debug!("{w}");
    }
    let records = DeviceRecords::read(state_dir);
    for w in &records.warnings {
        tracing::warn!("{w}");
    }
    // A damaged record file stops the allocator (fail closed): no GPU can be handed out.
    let damaged = records.warnings.first().cloned();
    let mut by_class: BTreeMap<String, Vec<PluginDevice>> = BTreeMap::new();
    for gpu in &inv.gpus {
        let class = naming.class_of(gpu.function.device);
        by_class.entry(class).or_default().push(PluginDevice {
            id: device_id(gpu.bdf),
            bdf: gpu.bdf,
            iommu_group: gpu.iommu_group,
            numa_node: gpu.numa_node,
            clique: naming.clique_of(gpu.bdf),
            health: match &damaged {
                Some(w) => Health::Unhealthy(format!("device records unreadable: {w}")),
                None => health_of(root, gpu, &records),
            },
        });
    }
    Ok(by_class
        .into_iter()
        .map(|(class, mut devices)| {
            devices.sort_by_key(|d| d.bdf);
            Resource {
                name: format!("{}/{class}", naming.domain),
                class,
                devices,
            }
        })
        .collect())
}

/// A GPU is healthy when it is not quarantined, sysfs says it can be passed through
/// (bound to vfio-pci, its IOMMU group viable) and its `/dev/vfio/<group>` node exists.
/// Held by a sandbox is healthy: the kubelet counts its own allocations.
pub fn health_of(root: &HostRoot, gpu: &Gpu, records: &DeviceRecords) -> Health {
    if let Some(q) = records.quarantine_of(gpu.bdf) {
        return Health::Unhealthy(format!("quarantined: {}", q.reason));
    }
    match &gpu.passthrough {
        PassthroughState::Ready => {}
        other => {
            return Health::Unhealthy(format!(
                "not ready for passthrough ({}); see `gpucell gpu list`",
                other.name()
            ))
        }
    }
    match gpu.iommu_group {
        Some(g) => {
            let node = root.dev(&format!("vfio/{g}"));
            if node.exists() {
                Health::Healthy
            } else {
                Health::Unhealthy(format!("{} does not exist", node.display()))
            }
        }
        None => Health::Unhealthy("no IOMMU group".to_owned()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn families_from_the_database() {
        let n = Naming::default();
        assert_eq!(n.class_of(0x2335), "H200");
        assert_eq!(n.class_of(0x233b), "H200");
        assert_eq!(n.class_of(0x2330), "H100");
        assert_eq!(n.class_of(0x2684), "RTX-4090");
        assert_eq!(n.class_of(0x26b9), "L40S");
        assert_eq!(family("GeForce RTX 2080 Ti Rev. A"), "RTX-2080-Ti");
        assert_eq!(family("TU10x/TU117"), "TU10x-TU117");
        assert_eq!(n.class_of(0x0001), "nvidia-0001");
    }

    #[test]
    fn overrides_and_their_errors() {
        let mut n = Naming::default();
        n.add_override("10de:2335=H200-SXM").unwrap();
        n.add_override("2684=gaming").unwrap();
        assert_eq!(n.class_of(0x2335), "H200-SXM");
        assert_eq!(n.class_of(0x2684), "gaming");
        for bad in [
            "2335", "zz=H200", "2335=", "2335=-x", "2335=a/b", "2335=a b",
        ] {
            let e = n.add_override(bad).unwrap_err();
            assert!(!e.to_string().is_empty(), "{bad}");
        }
        n.domain = "Gpucell.io".into();
        assert!(n.validate().is_err());
        n.domain = "gpu.kubernetes.io".into();
        assert!(n.validate().is_err());
        n.domain = "example.com".into();
        n.validate().unwrap();
    }

    #[test]
    fn health_from_sysfs_and_records_failing_closed() {
        use gpucell_host::testing::{FakeFunction, FakeHost};
        let host = FakeHost::bare_metal_intel().unwrap();
        let gpu = |a: &str, g: u32| {
            FakeFunction::new(a, 0x10de, 0x2335, 0x030200)
                .driver("vfio-pci")
                .iommu_group(g)
        };
        host.add(&gpu("0000:41:00.0", 41)).unwrap();
        host.add(&gpu("0000:42:00.0", 42)).unwrap();
        host.add(
            &FakeFunction::new("0000:43:00.0", 0x10de, 0x2335, 0x030200)
                .driver("nvidia")
                .iommu_group(43),
        )
        .unwrap();
        host.dev_node("vfio/41").unwrap();
        let state = tempfile::tempdir().unwrap();
        let found = discover(&host.root(), state.path(), &Naming::default()).unwrap();
        let health: Vec<_> = found[0].devices.iter().map(|d| d.health.clone()).collect();
        assert_eq!(health[0], Health::Healthy);
        assert!(
            matches!(&health[1], Health::Unhealthy(w) if w.contains("/dev/vfio/42")),
            "{health:?}"
        );
        assert!(
            matches!(&health[2], Health::Unhealthy(w) if w.contains("needs-bind")),
            "{health:?}"
        );
        std::fs::create_dir_all(state.path().join("devices")).unwrap();
        std::fs::write(state.path().join("devices/quarantine.json"), "{garbage").unwrap();
        let found = discover(&host.root(), state.path(), &Naming::default()).unwrap();
        assert!(found[0]
            .devices
            .iter()
            .all(|d| matches!(&d.health, Health::Unhealthy(w) if w.contains("quarantine.json"))));
    }

    #[test]
    fn device_ids_round_trip_and_cliques_parse() {
        let b: Bdf = "0000:41:00.0".parse().unwrap();
        assert_eq!(device_id(b), "0000-41-00.0");
        assert_eq!(bdf_of_id("0000-41-00.0"), Some(b));
        assert_eq!(bdf_of_id("../etc"), None);
        let mut n = Naming::default();
        n.add_clique("0000:41:00.0, 0000:42:00.0").unwrap();
        assert_eq!(n.clique_of(b), Some(0));
        assert!(n.add_clique("0000:41:00.0,nope").is_err());
    }
}
