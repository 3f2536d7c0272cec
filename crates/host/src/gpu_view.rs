//! The stable, flat record of `gpucell gpu list --json` (schema `gpucell.gpu-list/v1`,
//! documented in docs/host-discovery.md). Field names only ever get added. The CLI
//! prints it through `serde_json::Value`, so keys come out sorted.

use serde::Serialize;

use crate::bar::human_size;
use crate::devices::record::format_utc;
use crate::gpu::{Gpu, GpuInventory};
use crate::gpu_state::{DeviceRecords, GpuState, Holder, Quarantine};
use crate::iommu::GroupMember;
use crate::pci::Driver;

/// Schema name of [`GpuList`].
pub const GPU_LIST_SCHEMA: &str = "gpucell.gpu-list/v1";

/// The whole `gpu list` answer.
#[derive(Debug, Clone, Serialize)]
pub struct GpuList {
    pub schema: &'static str,
    /// True when the kernel made IOMMU groups.
    pub iommu_groups_present: bool,
    /// Value of `pcie_acs_override` on the kernel command line, when present.
    pub acs_override: Option<String>,
    /// Host-wide problems, each naming the file it came from.
    pub warnings: Vec<String>,
    pub gpus: Vec<GpuRow>,
}

/// One GPU.
#[derive(Debug, Clone, Serialize)]
pub struct GpuRow {
    pub bdf: String,
    /// `vendor:device`, lower-case hex.
    pub id: String,
    pub name: String,
    pub architecture: Option<String>,
    pub largest_bar: Option<BarRow>,
    pub mmio_bytes: Option<u64>,
    pub iommu_group: Option<u32>,
    pub group_members: Vec<String>,
    pub companions: Vec<CompanionRow>,
    /// Bound driver name; `null` when unbound or unknown (see `driver_state`).
    pub driver: Option<String>,
    /// `bound`, `unbound` or `unknown`.
    pub driver_state: &'static str,
    pub driver_override: Option<String>,
    pub numa_node: Option<u32>,
    pub local_cpus: Option<String>,
    pub link_speed: Option<String>,
    pub link_width: Option<u8>,
    pub link_max_speed: Option<String>,
    pub link_max_width: Option<u8>,
    /// `null` when the kernel lists none or `reset_method` is unreadable.
    pub reset_methods: Option<Vec<String>>,
    pub passthrough: PassthroughRow,
    /// This function's unreadable attributes.
    pub warnings: Vec<String>,
    /// Its quarantine record, or `null`.
    pub quarantine: Option<QuarantineRow>,
    /// Its allocation record, or `null`.
    pub allocation: Option<AllocationRow>,
    /// The typed state the row was made from.
    #[serde(skip)]
    pub state: GpuState,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuarantineRow {
    pub reason: String,
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub since: String,
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AllocationRow {
    pub sandbox: String,
    pub pid: u32,
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub since: String,
}

impl From<&Quarantine> for QuarantineRow {
    fn from(q: &Quarantine) -> Self {
        Self {
            reason: q.reason.clone(),
            since: format_utc(q.since_unix),
            sandbox: q.sandbox.clone(),
        }
    }
}

impl From<&Holder> for AllocationRow {
    fn from(h: &Holder) -> Self {
        Self {
            sandbox: h.sandbox.clone(),
            pid: h.pid,
            since: format_utc(h.since_unix),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BarRow {
    pub index: u8,
    pub bytes: u64,
    pub human: String,
    pub is_64bit: bool,
    pub prefetchable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompanionRow {
    pub bdf: String,
    pub id: String,
    /// `audio`, `usb`, `ucsi` or `other`.
    pub kind: String,
    pub driver: Option<String>,
    pub driver_state: &'static str,
    pub iommu_group: Option<u32>,
}

/// Passthrough state and the functions it is about.
#[derive(Debug, Clone, Serialize)]
pub struct PassthroughRow {
    /// `ready`, `needs-bind`, `group-not-viable`, `no-iommu`, `allocated` or
    /// `quarantined` ([`GpuState::name`]).
    pub state: &'static str,
    /// For `needs-bind`: the GPU and companions to bind to vfio-pci. For
    /// `group-not-viable`: the other devices in the group bound to other drivers.
    /// For `allocated`: the same, from sysfs underneath the allocation ([`GpuState::functions`]).
    pub functions: Vec<MemberRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberRow {
    pub bdf: String,
    pub id: Option<String>,
    pub driver: Option<String>,
    pub driver_state: &'static str,
}

/// `bound` / `unbound` / `unknown`.
pub fn driver_state(d: &Driver) -> &'static str {
    match d {
        Driver::Bound(_) => "bound",
        Driver::Unbound => "unbound",
        Driver::Unknown => "unknown",
    }
}

fn member_row(m: &GroupMember) -> MemberRow {
    MemberRow {
        bdf: m.bdf.to_string(),
        id: m.id.clone(),
        driver: m.driver.name().map(str::to_owned),
        driver_state: driver_state(&m.driver),
    }
}

impl GpuRow {
    /// The row of `g`, its state joined with `records`.
    pub fn new(g: &Gpu, records: &DeviceRecords) -> Self {
        let state = GpuState::of(g, records);
        Self {
            bdf: g.bdf.to_string(),
            id: g.id.clone(),
            name: g.name.clone(),
            architecture: g.architecture.map(|a| a.to_string()),
            largest_bar: g.largest_bar.as_ref().map(|b| BarRow {
                index: b.index,
                bytes: b.size,
                human: human_size(b.size),
                is_64bit: b.is_64bit,
                prefetchable: b.prefetchable,
            }),
            mmio_bytes: g.mmio_bytes,
            iommu_group: g.iommu_group,
            group_members: g.group_members.iter().map(|b| b.to_string()).collect(),
            companions: g
                .companions
                .iter()
                .map(|c| CompanionRow {
                    bdf: c.bdf.to_string(),
                    id: c.id.clone(),
                    kind: c.kind.to_string(),
                    driver: c.driver.name().map(str::to_owned),
                    driver_state: driver_state(&c.driver),
                    iommu_group: c.iommu_group,
                })
                .collect(),
            driver: g.driver.name().map(str::to_owned),
            driver_state: driver_state(&g.driver),
            driver_override: g.function.driver_override.clone(),
            numa_node: g.numa_node,
            local_cpus: g.function.local_cpus.as_ref().map(|c| c.to_string()),
            link_speed: g.function.link.speed.clone(),
            link_width: g.function.link.width,
            link_max_speed: g.function.link.max_speed.clone(),
            link_max_width: g.function.link.max_width,
            reset_methods: g.reset_methods.clone(),
            passthrough: PassthroughRow {
                state: state.name(),
                functions: state.functions().iter().map(member_row).collect(),
            },
            warnings: g.function.warnings.clone(),
            quarantine: state.quarantine().map(QuarantineRow::from),
            allocation: state.holder().map(AllocationRow::from),
            state,
        }
    }
}

impl GpuList {
    /// The `gpu list` answer: every GPU of `inv` joined with `records`; the records'
    /// warnings follow the inventory's.
    pub fn new(inv: &GpuInventory, records: &DeviceRecords) -> Self {
        let mut warnings = inv.warnings.clone();
        warnings.extend(records.warnings.iter().cloned());
        Self {
            schema: GPU_LIST_SCHEMA,
            iommu_groups_present: inv.iommu_groups_present,
            acs_override: inv.acs_override.clone(),
            warnings,
            gpus: inv.gpus.iter().map(|g| GpuRow::new(g, records)).collect(),
        }
    }
}

/// The list without records: every GPU in its sysfs state.
impl From<&GpuInventory> for GpuList {
    fn from(inv: &GpuInventory) -> Self {
        Self::new(inv, &DeviceRecords::default())
    }
}
