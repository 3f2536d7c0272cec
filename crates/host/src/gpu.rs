//! GPUs of a host, their companion functions, and whether each can be passed through.

use std::fmt;

use serde::Serialize;

use crate::arch::{ArchTable, Architecture};
use crate::bar::{Bar, BarKind};
use crate::bdf::Bdf;
use crate::cmdline::KernelCmdline;
use crate::iommu::{self, GroupMember};
use crate::pci::{self, Driver, PciError, PciFunction, PciScan};
use crate::root::HostRoot;
use gpucell_common::chain_string;

/// Errors building the GPU inventory (only a missing PCI bus is fatal).
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("cannot list the host's PCI functions")]
    Scan(#[source] PciError),
}

/// What a companion function is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompanionKind {
    /// HDMI/DisplayPort audio (class 0x0403).
    Audio,
    /// USB-C host controller (class 0x0c03).
    Usb,
    /// USB-C UCSI controller (class 0x0c80).
    Ucsi,
    Other,
}

impl fmt::Display for CompanionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Audio => "audio",
            Self::Usb => "usb",
            Self::Ucsi => "ucsi",
            Self::Other => "other",
        })
    }
}

/// Another function of the GPU's slot (same domain, bus and device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Companion {
    pub bdf: Bdf,
    /// `vendor:device`.
    pub id: String,
    pub kind: CompanionKind,
    pub driver: Driver,
    pub iommu_group: Option<u32>,
}

/// Whether a GPU can be handed to a VM now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum PassthroughState {
    /// Bound to vfio-pci and its IOMMU group is viable.
    Ready,
    /// The GPU, or a companion in its group, must be bound to vfio-pci first
    /// (`gpucell gpu bind`). `functions` lists them with their current driver.
    NeedsBind { functions: Vec<GroupMember> },
    /// Devices that are neither the GPU nor its companions share its IOMMU group and are
    /// bound to other drivers: VFIO cannot take the group until they are moved or unbound.
    GroupNotViable { blockers: Vec<GroupMember> },
    /// The function has no IOMMU group: the IOMMU is off or does not cover it.
    NoIommu,
}

impl PassthroughState {
    /// The short name used in tables and JSON (`ready`, `needs-bind`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::NeedsBind { .. } => "needs-bind",
            Self::GroupNotViable { .. } => "group-not-viable",
            Self::NoIommu => "no-iommu",
        }
    }
}

/// One GPU and what gpucell needs to know to pass it through.
#[derive(Debug, Clone, Serialize)]
pub struct Gpu {
    pub bdf: Bdf,
    /// `vendor:device`, e.g. `10de:2684`.
    pub id: String,
    /// From the PCI ID database, or the id when unknown.
    pub name: String,
    pub architecture: Option<Architecture>,
    /// The largest BAR, which decides the VM's 64-bit MMIO window.
    pub largest_bar: Option<Bar>,
    /// Sum of the GPU's memory BARs in bytes.
    pub mmio_bytes: Option<u64>,
    pub iommu_group: Option<u32>,
    /// Every function in the GPU's IOMMU group, the GPU included.
    pub group_members: Vec<Bdf>,
    pub companions: Vec<Companion>,
    pub driver: Driver,
    pub numa_node: Option<u32>,
    pub reset_methods: Option<Vec<String>>,
    pub passthrough: PassthroughState,
    /// The full function record.
    pub function: PciFunction,
}

/// All NVIDIA GPUs of a host.
#[derive(Debug)]
pub struct GpuInventory {
    pub gpus: Vec<Gpu>,
    /// True when the kernel made IOMMU groups.
    pub iommu_groups_present: bool,
    /// The `pcie_acs_override` value when the kernel command line has it.
    pub acs_override: Option<String>,
    /// Things that could not be read, each naming its file; the inventory is still usable.
    pub warnings: Vec<String>,
    /// The scan the inventory was built from.
    pub scan: PciScan,
}

impl GpuInventory {
    /// Reads the host's PCI functions and IOMMU groups and classifies every NVIDIA GPU.
    #[tracing::instrument(skip_all, fields(root = %root.path().display()))]
    pub fn read(root: &HostRoot) -> Result<Self, GpuError> {
        let scan = PciScan::read(root).map_err(GpuError::Scan)?;
        let mut warnings: Vec<String> = scan.problems.iter().map(|e| chain_string(e)).collect();
        let iommu_groups_present = iommu::groups_present(root).unwrap_or_else(|e| {
            warnings.push(chain_string(&e));
            false
        });
        let acs_override = match KernelCmdline::read(root) {
            Ok(c) => c.acs_override().map(str::to_owned),
            Err(e) => {
                warnings.push(format!(
                    "{}; cannot tell whether pcie_acs_override is set",
                    chain_string(&e)
                ));
                None
            }
        };
        let table = ArchTable::embedded();
        let mut gpus = Vec::new();
        for f in scan.nvidia_gpus() {
            for w in &f.warnings {
                warnings.push(format!("GPU {}: {w}", f.bdf));
            }
            let group_members = match f.iommu_group {
                None => Vec::new(),
                Some(g) => iommu::group_members(root, g).unwrap_or_else(|e| {
                    warnings.push(format!(
                        "{}; using the functions' own iommu_group links",
                        chain_string(&e)
                    ));
                    scan.group_members(g).map(|m| m.bdf).collect()
                }),
            };
            let companions: Vec<Companion> = scan
                .slot_siblings(f.bdf)
                .map(|s| Companion {
                    bdf: s.bdf,
                    id: s.id_string(),
                    kind: companion_kind(s),
                    driver: s.driver.clone(),
                    iommu_group: s.iommu_group,
                })
                .collect();
            let passthrough = classify(&scan, f, &companions, &group_members);
            gpus.push(Gpu {
                bdf: f.bdf,
                id: f.id_string(),
                name: crate::names::device_name(f.vendor, f.device),
                architecture: table
                    .and_then(|t| t.lookup(f.device))
                    .map(|m| m.architecture),
                largest_bar: f.largest_bar().cloned(),
                mmio_bytes: f.bars.as_ref().map(|bars| {
                    bars.iter()
                        .filter(|b| b.kind == BarKind::Memory)
                        .fold(0u64, |acc, b| acc.saturating_add(b.size))
                }),
                iommu_group: f.iommu_group,
                group_members,
                companions,
                driver: f.driver.clone(),
                numa_node: f.numa_node,
                reset_methods: f.reset_methods.clone(),
                passthrough,
                function: f.clone(),
            });
        }
        tracing::debug!(
            gpus = gpus.len(),
            warnings = warnings.len(),
            "GPU inventory read"
        );
        Ok(Self {
            gpus,
            iommu_groups_present,
            acs_override,
            warnings,
            scan,
        })
    }

    /// The GPU at `bdf`.
    pub fn get(&self, bdf: Bdf) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.bdf == bdf)
    }
}

fn companion_kind(f: &PciFunction) -> CompanionKind {
    match f.class_code() {
        pci::CLASS_HDA => CompanionKind::Audio,
        pci::CLASS_USB => CompanionKind::Usb,
        pci::CLASS_SERIAL_BUS_OTHER => CompanionKind::Ucsi,
        _ => CompanionKind::Other,
    }
}

/// Decides a GPU's passthrough state from its group members' drivers.
fn classify(
    scan: &PciScan,
    gpu: &PciFunction,
    companions: &[Companion],
    members: &[Bdf],
) -> PassthroughState {
    if gpu.iommu_group.is_none() {
        return PassthroughState::NoIommu;
    }
    let ours = |b: Bdf| b == gpu.bdf || companions.iter().any(|c| c.bdf == b);
    let (mut to_bind, blockers): (Vec<GroupMember>, Vec<GroupMember>) =
        iommu::non_vfio_endpoints(scan, members)
            .into_iter()
            .partition(|m| ours(m.bdf));
    if !blockers.is_empty() {
        return PassthroughState::GroupNotViable { blockers };
    }
    // An unbound GPU keeps the group viable but still has to be bound to be used.
    if !gpu.driver.is_vfio() && !to_bind.iter().any(|m| m.bdf == gpu.bdf) {
        to_bind.insert(
            0,
            GroupMember {
                bdf: gpu.bdf,
                id: Some(gpu.id_string()),
                driver: gpu.driver.clone(),
            },
        );
    }
    if to_bind.is_empty() {
        PassthroughState::Ready
    } else {
        to_bind.sort_by_key(|m| m.bdf);
        PassthroughState::NeedsBind { functions: to_bind }
    }
}
