//! Per-GPU checks (group viability, host driver, reset) and the VM's MMIO window.

use crate::bar::{human_size, BarKind};
use crate::gpu::{Gpu, GpuInventory, PassthroughState};
use crate::iommu::GroupMember;
use crate::root::HostRoot;

use super::cpu::CpuInfo;
use super::Check;

/// PCI class "bridge, other": what NVSwitches report.
const CLASS_OTHER_BRIDGE: u16 = 0x0680;

/// Host drivers that must not hold a GPU meant for passthrough.
const HOST_GPU_DRIVERS: [&str; 2] = ["nvidia", "nouveau"];

pub(super) fn checks(root: &HostRoot, cpu: &CpuInfo, inv: &GpuInventory) -> Vec<Check> {
    if inv.gpus.is_empty() {
        return vec![Check::warn(
            "gpus",
            "GPUs",
            "no NVIDIA GPU (vendor 0x10de, class 0x0300/0x0302) under sys/bus/pci/devices",
            "sandboxes without GPUs still run; for GPUs check that the cards are seated and visible in lspci",
        )];
    }
    let mut out = vec![Check::pass(
        "gpus",
        "GPUs",
        format!(
            "{} NVIDIA GPU(s): {}",
            inv.gpus.len(),
            inv.gpus
                .iter()
                .map(|g| g.bdf.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )];
    let modules: Vec<&str> = HOST_GPU_DRIVERS
        .into_iter()
        .filter(|m| root.sys(&format!("module/{m}")).is_dir())
        .collect();
    for g in &inv.gpus {
        out.push(group(g));
        out.push(host_driver(g, &modules));
        out.push(reset(g));
    }
    out.push(mmio_window(cpu, &inv.gpus));
    if let Some(c) = nvswitch(inv) {
        out.push(c);
    }
    out
}

/// NVSwitches (NVIDIA bridges of class 0x0680 on HGX boards) link the GPUs; a VM holding
/// GPUs without their switches gets no NVLink between them.
fn nvswitch(inv: &GpuInventory) -> Option<Check> {
    let switches: Vec<String> = inv
        .scan
        .functions
        .iter()
        .filter(|f| f.vendor == crate::pci::VENDOR_NVIDIA && f.class_code() == CLASS_OTHER_BRIDGE)
        .map(|f| f.bdf.to_string())
        .collect();
    if switches.is_empty() {
        return None;
    }
    Some(Check::warn(
        "nvswitch",
        "NVSwitch",
        format!("{} NVSwitch(es): {}", switches.len(), switches.join(", ")),
        "pass the NVSwitches into the VM with their GPUs, or run Fabric Manager in shared mode on the host; otherwise GPUs in a VM have no NVLink between them",
    ))
}

fn members(ms: &[GroupMember]) -> String {
    ms.iter()
        .map(|m| format!("{} ({})", m.bdf, m.driver))
        .collect::<Vec<_>>()
        .join(", ")
}

fn group(g: &Gpu) -> Check {
    let id = format!("gpu-group:{}", g.bdf);
    let title = format!("{} IOMMU group", g.bdf);
    let group = g.iommu_group.map(|n| n.to_string()).unwrap_or_default();
    match &g.passthrough {
        PassthroughState::Ready => Check::pass(
            id,
            title,
            format!("group {group} ({} functions) viable; GPU on {}", g.group_members.len(), g.driver),
        ),
        PassthroughState::NeedsBind { functions } => Check::warn(
            id,
            title,
            format!("group {group} viable once these are on vfio-pci: {}", members(functions)),
            format!("gpucell gpu bind {}", g.bdf),
        ),
        PassthroughState::GroupNotViable { blockers } => Check::fail(
            id,
            title,
            format!("group {group} also holds devices bound to other drivers: {}", members(blockers)),
            "move the GPU to a slot with its own IOMMU group (ACS-capable root port), or unbind those devices; pcie_acs_override only hides the problem",
        ),
        PassthroughState::NoIommu => Check::fail(
            id,
            title,
            "no IOMMU group",
            "turn the IOMMU on (see the iommu check)",
        ),
    }
}

fn host_driver(g: &Gpu, modules: &[&str]) -> Check {
    let id = format!("gpu-host-driver:{}", g.bdf);
    let title = format!("{} host driver", g.bdf);
    let loaded = if modules.is_empty() {
        String::new()
    } else {
        format!("; host modules loaded: {}", modules.join(", "))
    };
    let fix = format!(
        "gpucell gpu bind {} moves it to vfio-pci; `gpucell host plan` keeps nvidia/nouveau off GPUs meant for passthrough at boot",
        g.bdf
    );
    match g.driver.name() {
        Some(d) if HOST_GPU_DRIVERS.iter().any(|h| d.starts_with(h)) => Check::warn(
            id,
            title,
            format!("bound to the host's {d} driver{loaded}"),
            fix,
        ),
        Some(_) if g.driver.is_vfio() => {
            Check::pass(id, title, format!("bound to {}{loaded}", g.driver))
        }
        Some(d) => Check::warn(id, title, format!("bound to {d}{loaded}"), fix),
        None => match &g.driver {
            crate::pci::Driver::Unknown => Check::warn(
                id,
                title,
                "driver link unreadable",
                "check the function's driver link in sysfs",
            ),
            _ if !modules.is_empty() => Check::warn(
                id,
                title,
                format!("unbound{loaded}: a host driver may claim it"),
                fix,
            ),
            _ => Check::pass(id, title, "unbound; no host GPU driver loaded"),
        },
    }
}

fn reset(g: &Gpu) -> Check {
    let id = format!("gpu-reset:{}", g.bdf);
    let title = format!("{} reset", g.bdf);
    match g.reset_methods.as_deref() {
        Some(methods) if !methods.is_empty() => {
            let list = methods.join(",");
            if methods.iter().any(|m| m == "flr") {
                Check::pass(id, title, format!("reset_method: {list}"))
            } else {
                Check::pass(
                    id,
                    title,
                    format!("reset_method: {list} (no function-level reset; a bus reset also resets the other functions of the slot)"),
                )
            }
        }
        _ => Check::fail(
            id,
            title,
            "no reset method (reset_method missing or empty)",
            "without a reset the GPU cannot be cleaned between tenants: use a GPU or slot that supports FLR or bus reset, and a kernel of 5.15 or newer",
        ),
    }
}

/// The 64-bit MMIO a GPU needs: its 64-bit memory BARs, rounded up to a power of two
/// (each GPU sits behind its own root port, whose window is aligned to its size).
pub fn gpu_window(g: &Gpu) -> Option<u64> {
    let bars = g.function.bars.as_ref()?;
    let sum = bars
        .iter()
        .filter(|b| b.kind == BarKind::Memory && b.is_64bit)
        .fold(0u64, |acc, b| acc.saturating_add(b.size));
    if sum == 0 {
        return Some(0);
    }
    Some(sum.checked_next_power_of_two().unwrap_or(u64::MAX))
}

fn mmio_window(cpu: &CpuInfo, gpus: &[Gpu]) -> Check {
    const ID: &str = "mmio-window";
    const TITLE: &str = "64-bit MMIO window";
    let mut total: u64 = 0;
    let mut parts = Vec::new();
    for g in gpus {
        match gpu_window(g) {
            Some(w) => {
                total = total.saturating_add(w);
                parts.push(format!("{} {}", g.bdf, human_size(w)));
            }
            None => {
                return Check::warn(
                    ID,
                    TITLE,
                    format!("BARs of {} unknown (resource unreadable)", g.bdf),
                    "make the GPU's sysfs resource file readable",
                )
            }
        }
    }
    let need = format!(
        "all GPUs in one VM need a {} window ({})",
        human_size(total),
        parts.join(", ")
    );
    let Some(bits) = cpu.phys_bits else {
        return Check::warn(
            ID,
            TITLE,
            format!("{need}; host physical address bits unknown (no \"address sizes\" in /proc/cpuinfo)"),
            "check the CPU's physical address width: the window must fit in the upper half of it",
        );
    };
    // Guest RAM and the 32-bit hole take the lower addresses; require the window to fit in
    // the upper half of the physical address space.
    let half = 1u128 << (bits - 1);
    if u128::from(total) <= half {
        Check::pass(
            ID,
            TITLE,
            format!(
                "{need}; host has {bits} physical address bits ({} addressable)",
                human_size((1u128 << bits).min(u128::from(u64::MAX)) as u64)
            ),
        )
    } else {
        Check::fail(
            ID,
            TITLE,
            format!("{need}; host has only {bits} physical address bits"),
            "give each VM fewer GPUs, or use a CPU with more physical address bits",
        )
    }
}
