//! What `gpu list` says about each GPU: its passthrough state read from sysfs
//! ([`crate::gpu::PassthroughState`]) joined with the device records of the state
//! directory (allocations and quarantine, [`crate::devices`]).

use std::path::Path;

use serde::Serialize;

use crate::bdf::Bdf;
use crate::devices::{self, AllocationEntry, QuarantineEntry};
use crate::gpu::{Gpu, PassthroughState};
use crate::iommu::GroupMember;

/// The allocation and quarantine records of a state directory, as `gpu list` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceRecords {
    pub allocations: Vec<AllocationEntry>,
    pub quarantine: Vec<QuarantineEntry>,
    /// A record file that could not be read or is damaged, naming it; its entries are
    /// then unknown (listed as none).
    pub warnings: Vec<String>,
}

impl DeviceRecords {
    /// Reads `<state>/devices/{quarantine,allocations}.json` without locking or creating
    /// anything. A damaged file is a warning here, not a failure: listing must still work.
    pub fn read(state_dir: &Path) -> Self {
        let mut records = Self::default();
        match devices::quarantined(state_dir) {
            Ok(q) => records.quarantine = q,
            Err(e) => records.warnings.push(gpucell_common::chain_string(&e)),
        }
        match devices::allocations(state_dir) {
            Ok(a) => records.allocations = a,
            Err(e) => records.warnings.push(gpucell_common::chain_string(&e)),
        }
        records
    }

    pub fn allocation_of(&self, bdf: Bdf) -> Option<&AllocationEntry> {
        self.allocations.iter().find(|a| a.bdf == bdf)
    }

    pub fn quarantine_of(&self, bdf: Bdf) -> Option<&QuarantineEntry> {
        self.quarantine.iter().find(|q| q.bdf == bdf)
    }
}

/// The sandbox that holds a GPU, from its allocation record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub sandbox: String,
    pub pid: u32,
    pub since_unix: u64,
}

/// Why and since when a GPU is quarantined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quarantine {
    pub reason: String,
    pub since_unix: u64,
    /// The sandbox that had it last, when known.
    pub sandbox: Option<String>,
}

/// A GPU's state for `gpu list`: one of the sysfs passthrough states, unless the records
/// say a sandbox holds it or it is quarantined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum GpuState {
    /// Bound to vfio-pci, its IOMMU group viable, not held, not quarantined.
    Ready,
    /// The GPU, or a companion in its group, must be bound to vfio-pci first.
    NeedsBind { functions: Vec<GroupMember> },
    /// Other devices of its IOMMU group are bound to other drivers.
    GroupNotViable { blockers: Vec<GroupMember> },
    /// No IOMMU group: the IOMMU is off or does not cover it.
    NoIommu,
    /// A sandbox holds it (its record may name a process that has died: the next
    /// allocation reclaims it). `passthrough` is what sysfs says underneath.
    Allocated {
        holder: Holder,
        passthrough: PassthroughState,
    },
    /// Not handed out until `gpucell gpu release`. `holder`: an allocation record that
    /// names it too (normally none).
    Quarantined {
        quarantine: Quarantine,
        holder: Option<Holder>,
    },
}

impl GpuState {
    /// Joins `gpu`'s passthrough state with the records: quarantine first, then allocation.
    pub fn of(gpu: &Gpu, records: &DeviceRecords) -> Self {
        let holder = records.allocation_of(gpu.bdf).map(|a| Holder {
            sandbox: a.sandbox.clone(),
            pid: a.owner.pid,
            since_unix: a.since_unix,
        });
        if let Some(q) = records.quarantine_of(gpu.bdf) {
            return Self::Quarantined {
                quarantine: Quarantine {
                    reason: q.reason.clone(),
                    since_unix: q.since_unix,
                    sandbox: q.sandbox.clone(),
                },
                holder,
            };
        }
        if let Some(holder) = holder {
            return Self::Allocated {
                holder,
                passthrough: gpu.passthrough.clone(),
            };
        }
        match &gpu.passthrough {
            PassthroughState::Ready => Self::Ready,
            PassthroughState::NeedsBind { functions } => Self::NeedsBind {
                functions: functions.clone(),
            },
            PassthroughState::GroupNotViable { blockers } => Self::GroupNotViable {
                blockers: blockers.clone(),
            },
            PassthroughState::NoIommu => Self::NoIommu,
        }
    }

    /// The short name used in tables and JSON: `ready`, `needs-bind`,
    /// `group-not-viable`, `no-iommu`, `allocated` or `quarantined`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::NeedsBind { .. } => "needs-bind",
            Self::GroupNotViable { .. } => "group-not-viable",
            Self::NoIommu => "no-iommu",
            Self::Allocated { .. } => "allocated",
            Self::Quarantined { .. } => "quarantined",
        }
    }

    /// The functions the state is about: those to bind (`needs-bind`), those blocking the
    /// group (`group-not-viable`), the same underneath an allocation; none otherwise.
    pub fn functions(&self) -> &[GroupMember] {
        let passthrough = match self {
            Self::NeedsBind { functions } => return functions,
            Self::GroupNotViable { blockers } => return blockers,
            Self::Allocated { passthrough, .. } => passthrough,
            Self::Ready | Self::NoIommu | Self::Quarantined { .. } => return &[],
        };
        match passthrough {
            PassthroughState::NeedsBind { functions } => functions,
            PassthroughState::GroupNotViable { blockers } => blockers,
            PassthroughState::Ready | PassthroughState::NoIommu => &[],
        }
    }

    /// The sandbox holding it, from the allocation record.
    pub fn holder(&self) -> Option<&Holder> {
        match self {
            Self::Allocated { holder, .. } => Some(holder),
            Self::Quarantined { holder, .. } => holder.as_ref(),
            _ => None,
        }
    }

    pub fn quarantine(&self) -> Option<&Quarantine> {
        match self {
            Self::Quarantined { quarantine, .. } => Some(quarantine),
            _ => None,
        }
    }
}
