//! PCI functions as sysfs shows them: ids, class, driver, IOMMU group, NUMA, link, reset
//! and BARs. Read from `<root>/sys/bus/pci/devices/<bdf>/`.
//!
//! Identity attributes (`vendor`, `device`, `class`) are required: a function whose identity
//! cannot be read is an error naming the file. Every other attribute is optional: when it
//! is missing or unreadable the field is `None`/unknown and, when it was present but bad,
//! a message naming the file is kept in [`PciFunction::warnings`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bar::{self, Bar};
use crate::bdf::Bdf;
use crate::root::HostRoot;
use crate::sysfs::{self, SysfsError};

/// PCI class code of a PCI-to-PCI bridge (base 0x06, subclass 0x04).
pub const CLASS_PCI_BRIDGE: u16 = 0x0604;
/// VGA-compatible display controller.
pub const CLASS_VGA: u16 = 0x0300;
/// 3D controller (data-center GPUs).
pub const CLASS_3D: u16 = 0x0302;
/// High Definition Audio (GPU HDMI/DP audio).
pub const CLASS_HDA: u16 = 0x0403;
/// USB controller (USB-C on some GeForce cards).
pub const CLASS_USB: u16 = 0x0c03;
/// Serial bus controller, other (the USB-C UCSI function on RTX 20 cards).
pub const CLASS_SERIAL_BUS_OTHER: u16 = 0x0c80;
/// NVIDIA's PCI vendor id.
pub const VENDOR_NVIDIA: u16 = 0x10de;

/// Errors reading the PCI functions of a host.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("no PCI bus under {}: is --host-root right, and is sysfs mounted?", path.display())]
    NoBus {
        path: PathBuf,
        #[source]
        source: SysfsError,
    },
    #[error("no PCI function {bdf} on this host (looked for {})", path.display())]
    NoSuchFunction { bdf: Bdf, path: PathBuf },
    #[error("PCI function {bdf}: cannot read its identity")]
    Identity {
        bdf: Bdf,
        #[source]
        source: SysfsError,
    },
    #[error("{} is not a PCI address; skipped", path.display())]
    BadEntry {
        path: PathBuf,
        #[source]
        source: crate::bdf::BdfError,
    },
}

/// The kernel driver bound to a function, from its `driver` link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "name", rename_all = "kebab-case")]
pub enum Driver {
    /// No `driver` link: no driver bound.
    Unbound,
    /// Bound to the named driver.
    Bound(String),
    /// The link exists but could not be read (see the function's warnings).
    Unknown,
}

impl Driver {
    /// The driver's name, when one is bound and known.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Bound(n) => Some(n),
            _ => None,
        }
    }

    /// True when bound to `vfio-pci` or a vendor variant of it (`nvgrace-gpu-vfio-pci`,
    /// `mlx5_vfio_pci`, ...), all of which give the device to VFIO.
    pub fn is_vfio(&self) -> bool {
        self.name()
            .is_some_and(|n| n == "vfio-pci" || n.ends_with("vfio-pci") || n.ends_with("vfio_pci"))
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unbound => f.write_str("none"),
            Self::Bound(n) => f.write_str(n),
            Self::Unknown => f.write_str("unknown"),
        }
    }
}

/// A CPU list such as `0-15,32-47`, from `local_cpulist`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(Vec<(u32, u32)>);

impl CpuList {
    /// Parses the kernel's list format; `None` when malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let mut ranges = Vec::new();
        for part in text.trim().split(',') {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
                None => {
                    let n = part.parse().ok()?;
                    (n, n)
                }
            };
            if a > b || ranges.len() >= 4096 {
                return None;
            }
            ranges.push((a, b));
        }
        Some(Self(ranges))
    }

    /// The inclusive ranges.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.0
    }

    /// Number of CPUs in the list.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|(a, b)| u64::from(b - a) + 1).sum()
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (a, b)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for CpuList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// PCIe link state, from `current_link_*` and `max_link_*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    /// As the kernel prints it, e.g. `32.0 GT/s PCIe`; `None` when unknown.
    pub speed: Option<String>,
    /// Lane count; `None` when unknown.
    pub width: Option<u8>,
    /// What the device supports, in the same forms.
    pub max_speed: Option<String>,
    pub max_width: Option<u8>,
}

impl Link {
    /// True when the link trained narrower than the device supports (e.g. x8 of x16), a
    /// sign of a bad riser or slot that halves host-to-GPU bandwidth.
    pub fn is_degraded_width(&self) -> bool {
        matches!((self.width, self.max_width), (Some(w), Some(m)) if w < m)
    }
}

/// One PCI function of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciFunction {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// 24-bit class code: base class, subclass, programming interface.
    pub class: u32,
    pub subsystem_vendor: Option<u16>,
    pub subsystem_device: Option<u16>,
    pub revision: Option<u8>,
    pub driver: Driver,
    /// `driver_override`; `None` when unset (`(null)`) or unreadable.
    pub driver_override: Option<String>,
    /// IOMMU group number; `None` when the function has no group (IOMMU off) or the link
    /// is unreadable.
    pub iommu_group: Option<u32>,
    /// NUMA node; `None` when the kernel reports none (-1) or it is unknown.
    pub numa_node: Option<u32>,
    pub local_cpus: Option<CpuList>,
    pub link: Link,
    /// Reset methods the kernel can use, in its order (`flr`, `pm`, `bus`, ...). `None`
    /// when `reset_method` is absent (the kernel knows no reset for the function, or is
    /// older than 5.15) or unreadable.
    pub reset_methods: Option<Vec<String>>,
    /// Implemented BARs; `None` when `resource` is missing or unreadable.
    pub bars: Option<Vec<Bar>>,
    /// Optional attributes that were present but could not be read, each naming its file.
    pub warnings: Vec<String>,
}

impl PciFunction {
    /// Reads one function. Errors when it does not exist or its identity is unreadable.
    pub fn read(root: &HostRoot, bdf: Bdf) -> Result<Self, PciError> {
        let dir = root.pci_device(&bdf);
        if std::fs::symlink_metadata(&dir).is_err() {
            return Err(PciError::NoSuchFunction { bdf, path: dir });
        }
        let (vendor, device, class) = read_identity(&dir, bdf)?;
        let mut r = OptionalReader {
            dir: &dir,
            warnings: Vec::new(),
        };
        let subsystem_vendor = r.hex::<u16>("subsystem_vendor", "a 16-bit vendor id");
        let subsystem_device = r.hex::<u16>("subsystem_device", "a 16-bit device id");
        let revision = r.hex::<u8>("revision", "an 8-bit revision");
        let driver = r.driver();
        let driver_override = r.text("driver_override").filter(|v| v != "(null)");
        let iommu_group = r.iommu_group();
        let numa_node = r.numa_node();
        let local_cpus = r.local_cpus();
        let link = r.link();
        let reset_methods = r.text("reset_method").map(|t| {
            t.split_whitespace()
                .take(16)
                .map(sysfs::printable)
                .collect::<Vec<_>>()
        });
        let bars = r.bars();
        Ok(Self {
            bdf,
            vendor,
            device,
            class,
            subsystem_vendor,
            subsystem_device,
            revision,
            driver,
            driver_override,
            iommu_group,
            numa_node,
            local_cpus,
            link,
            reset_methods,
            bars,
            warnings: r.warnings,
        })
    }

    /// Base class and subclass, e.g. `0x0302` for a 3D controller.
    pub fn class_code(&self) -> u16 {
        (self.class >> 8) as u16
    }

    /// True for a PCI-to-PCI bridge (class 0x0604), which VFIO group viability ignores.
    pub fn is_bridge(&self) -> bool {
        self.class_code() == CLASS_PCI_BRIDGE
    }

    /// True for an NVIDIA display controller of class 0x0300xx (VGA) or 0x0302xx (3D).
    pub fn is_nvidia_gpu(&self) -> bool {
        self.vendor == VENDOR_NVIDIA && matches!(self.class_code(), CLASS_VGA | CLASS_3D)
    }

    /// The largest memory BAR, if any is known.
    pub fn largest_bar(&self) -> Option<&Bar> {
        self.bars.as_ref()?.iter().max_by_key(|b| b.size)
    }

    /// `vendor:device` as lspci prints it, e.g. `10de:2684`.
    pub fn id_string(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor, self.device)
    }
}

/// The required identity of the function in `dir`: vendor, device and class code, each
/// checked against its width.
fn read_identity(dir: &Path, bdf: Bdf) -> Result<(u16, u16, u32), PciError> {
    let identity = |name: &str, what: &'static str| -> Result<u64, PciError> {
        sysfs::read_hex::<u64>(&dir.join(name), what)
            .map_err(|source| PciError::Identity { bdf, source })
    };
    let vendor = identity("vendor", "a 16-bit vendor id")?;
    let device = identity("device", "a 16-bit device id")?;
    let class = identity("class", "a 24-bit class code")?;
    let check = |v: u64, max: u64, name: &str, what: &'static str| {
        if v > max {
            Err(PciError::Identity {
                bdf,
                source: SysfsError::garbled(&dir.join(name), &format!("{v:#x}"), what),
            })
        } else {
            Ok(v)
        }
    };
    let vendor = check(vendor, 0xffff, "vendor", "a 16-bit vendor id")? as u16;
    let device = check(device, 0xffff, "device", "a 16-bit device id")? as u16;
    let class = check(class, 0xff_ffff, "class", "a 24-bit class code")? as u32;
    Ok((vendor, device, class))
}

struct OptionalReader<'a> {
    dir: &'a Path,
    warnings: Vec<String>,
}

impl OptionalReader<'_> {
    fn warn(&mut self, err: SysfsError) {
        tracing::debug!("{err}");
        self.warnings.push(gpucell_common::chain_string(&err));
    }

    fn text(&mut self, name: &str) -> Option<String> {
        match sysfs::read_text_opt(&self.dir.join(name)) {
            Ok(v) => v,
            Err(e) => {
                self.warn(e);
                None
            }
        }
    }

    /// `current_link_speed`-style text; `Unknown` (no link) is `None`.
    fn link_speed(&mut self, name: &str) -> Option<String> {
        self.text(name)
            .filter(|s| !s.eq_ignore_ascii_case("unknown"))
            .map(|s| sysfs::printable(&s))
    }

    /// `current_link_width`-style lane count; 0 (no link) is `None`.
    fn link_width(&mut self, name: &str) -> Option<u8> {
        let t = self.text(name)?;
        match t.parse::<u8>() {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(_) => {
                self.warn(SysfsError::garbled(
                    &self.dir.join(name),
                    &t,
                    "a lane count",
                ));
                None
            }
        }
    }

    fn hex<T: TryFrom<u64>>(&mut self, name: &str, expected: &'static str) -> Option<T> {
        let path = self.dir.join(name);
        let text = self.text(name)?;
        match sysfs::parse_hex(&path, &text, expected) {
            Ok(v) => Some(v),
            Err(e) => {
                self.warn(e);
                None
            }
        }
    }

    /// The `driver` link.
    fn driver(&mut self) -> Driver {
        match sysfs::link_name(&self.dir.join("driver")) {
            Ok(None) => Driver::Unbound,
            Ok(Some(name)) => Driver::Bound(name),
            Err(e) => {
                self.warn(e);
                Driver::Unknown
            }
        }
    }

    /// The number the `iommu_group` link names.
    fn iommu_group(&mut self) -> Option<u32> {
        match sysfs::link_name(&self.dir.join("iommu_group")) {
            Ok(None) => None,
            Ok(Some(name)) => match name.parse::<u32>() {
                Ok(n) => Some(n),
                Err(_) => {
                    self.warn(SysfsError::garbled(
                        &self.dir.join("iommu_group"),
                        &name,
                        "a link to a numbered group",
                    ));
                    None
                }
            },
            Err(e) => {
                self.warn(e);
                None
            }
        }
    }

    /// `numa_node`; -1 (no node) is `None`.
    fn numa_node(&mut self) -> Option<u32> {
        let t = self.text("numa_node")?;
        match t.parse::<i64>() {
            Ok(-1) => None,
            Ok(n) if (0..=i64::from(u16::MAX)).contains(&n) => Some(n as u32),
            _ => {
                self.warn(SysfsError::garbled(
                    &self.dir.join("numa_node"),
                    &t,
                    "a node number or -1",
                ));
                None
            }
        }
    }

    /// `local_cpulist`.
    fn local_cpus(&mut self) -> Option<CpuList> {
        let t = self.text("local_cpulist")?;
        let list = CpuList::parse(&t);
        if list.is_none() {
            self.warn(SysfsError::garbled(
                &self.dir.join("local_cpulist"),
                &t,
                "a CPU list like 0-15,32-47",
            ));
        }
        list
    }

    /// Current and maximum link speed and width.
    fn link(&mut self) -> Link {
        Link {
            speed: self.link_speed("current_link_speed"),
            width: self.link_width("current_link_width"),
            max_speed: self.link_speed("max_link_speed"),
            max_width: self.link_width("max_link_width"),
        }
    }

    /// The BARs from `resource`; a missing file is `None` without a warning.
    fn bars(&mut self) -> Option<Vec<Bar>> {
        let resource_path = self.dir.join("resource");
        match sysfs::read_raw(&resource_path) {
            Ok(text) => match bar::parse_resource(&resource_path, &text) {
                Ok(bars) => Some(bars),
                Err(e) => {
                    self.warn(e);
                    None
                }
            },
            Err(e) if e.is_not_found() => None,
            Err(e) => {
                self.warn(e);
                None
            }
        }
    }
}

/// All PCI functions of a host, and the entries that could not be read.
#[derive(Debug, Default)]
pub struct PciScan {
    /// Readable functions, sorted by address.
    pub functions: Vec<PciFunction>,
    /// Entries skipped because their address or identity was unreadable.
    pub problems: Vec<PciError>,
}

impl PciScan {
    /// Reads every function under `<root>/sys/bus/pci/devices`.
    pub fn read(root: &HostRoot) -> Result<Self, PciError> {
        let dir = root.pci_devices_dir();
        let names = sysfs::list_dir(&dir).map_err(|source| PciError::NoBus {
            path: dir.clone(),
            source,
        })?;
        let mut scan = Self::default();
        for name in names {
            let path = dir.join(&name);
            let bdf = match name.to_string_lossy().parse::<Bdf>() {
                Ok(b) => b,
                Err(source) => {
                    scan.problems.push(PciError::BadEntry { path, source });
                    continue;
                }
            };
            match PciFunction::read(root, bdf) {
                Ok(f) => scan.functions.push(f),
                Err(e) => {
                    tracing::debug!("{}", gpucell_common::chain_string(&e));
                    scan.problems.push(e);
                }
            }
        }
        scan.functions.sort_by_key(|f| f.bdf);
        Ok(scan)
    }

    /// The function at `bdf`, if it was read.
    pub fn get(&self, bdf: Bdf) -> Option<&PciFunction> {
        self.functions
            .binary_search_by_key(&bdf, |f| f.bdf)
            .ok()
            .and_then(|i| self.functions.get(i))
    }

    /// Functions in IOMMU group `group`, from the functions' own `iommu_group` links.
    pub fn group_members(&self, group: u32) -> impl Iterator<Item = &PciFunction> {
        self.functions
            .iter()
            .filter(move |f| f.iommu_group == Some(group))
    }

    /// The other functions of `bdf`'s slot (same domain, bus and device).
    pub fn slot_siblings(&self, bdf: Bdf) -> impl Iterator<Item = &PciFunction> {
        self.functions
            .iter()
            .filter(move |f| f.bdf != bdf && f.bdf.same_slot(&bdf))
    }

    /// NVIDIA GPUs (class 0x0300/0x0302).
    pub fn nvidia_gpus(&self) -> impl Iterator<Item = &PciFunction> {
        self.functions.iter().filter(|f| f.is_nvidia_gpu())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        let l = CpuList::parse("0-15,32-47,63").unwrap();
        assert_eq!(l.count(), 33);
        assert_eq!(l.to_string(), "0-15,32-47,63");
        for bad in ["", "a", "3-1", "0-", "1,,2", "-1"] {
            assert!(CpuList::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn vfio_driver_names() {
        assert!(Driver::Bound("vfio-pci".into()).is_vfio());
        assert!(Driver::Bound("nvgrace-gpu-vfio-pci".into()).is_vfio());
        assert!(!Driver::Bound("nvidia".into()).is_vfio());
        assert!(!Driver::Unbound.is_vfio());
        assert!(!Driver::Unknown.is_vfio());
    }
}
