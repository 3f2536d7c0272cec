//! IOMMU, interrupt remapping, ACS override and VFIO module checks.

use crate::cmdline::KernelCmdline;
use crate::gpu::GpuInventory;
use crate::root::HostRoot;
use crate::sysfs;
use gpucell_common::chain_string;

use super::cpu::{CpuInfo, CpuVendor};
use super::Check;

/// ECAP bit 3 of an Intel VT-d unit: interrupt remapping supported.
const INTEL_ECAP_IR: u64 = 1 << 3;

pub(super) fn checks(root: &HostRoot, cpu: &CpuInfo, inv: &GpuInventory) -> Vec<Check> {
    let cmdline = KernelCmdline::read(root).map_err(|e| chain_string(&e));
    let units: Vec<String> = sysfs::list_dir_opt(&root.sys("class/iommu"))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| n.into_string().ok())
        .collect();
    let groups = crate::iommu::group_count(root).unwrap_or(0);
    vec![
        iommu_on(root, cpu, &cmdline, &units, groups, inv),
        interrupt_remapping(root, &cmdline, &units, groups),
        acs_override(&cmdline),
        vfio(root),
    ]
}

fn iommu_on(
    root: &HostRoot,
    cpu: &CpuInfo,
    cmdline: &Result<KernelCmdline, String>,
    units: &[String],
    groups: usize,
    inv: &GpuInventory,
) -> Check {
    const ID: &str = "iommu";
    const TITLE: &str = "IOMMU";
    let cmd_detail = match cmdline {
        Ok(c) => {
            let words: Vec<String> = ["intel_iommu", "amd_iommu", "iommu"]
                .iter()
                .filter_map(|k| c.get(k).map(|v| format!("{k}={}", v.unwrap_or(""))))
                .collect();
            if words.is_empty() {
                "no IOMMU parameters on the kernel command line".to_string()
            } else {
                format!("kernel command line: {}", words.join(" "))
            }
        }
        Err(e) => e.clone(),
    };
    let unit_detail = if units.is_empty() {
        "no units under sys/class/iommu".to_string()
    } else {
        format!("units {}", units.join(","))
    };
    if groups > 0 {
        return Check::pass(
            ID,
            TITLE,
            format!("{groups} groups under sys/kernel/iommu_groups; {unit_detail}; {cmd_detail}"),
        );
    }
    let off = cmdline.as_ref().ok().and_then(|c| {
        ["intel_iommu", "amd_iommu"]
            .into_iter()
            .find(|k| c.get(k) == Some(Some("off")))
    });
    let fix = match (off, cpu.vendor) {
        (Some(k), _) => format!("remove {k}=off from the kernel command line and reboot"),
        (None, Some(CpuVendor::Amd)) => {
            "enable the IOMMU (AMD-Vi) in the firmware setup; add amd_iommu=on iommu=pt to the kernel command line (`gpucell host plan`) and reboot".to_string()
        }
        (None, Some(CpuVendor::Intel)) => {
            "enable VT-d in the firmware setup; add intel_iommu=on iommu=pt to the kernel command line (`gpucell host plan`) and reboot".to_string()
        }
        _ => "enable the IOMMU (VT-d / AMD-Vi) in the firmware and add intel_iommu=on or amd_iommu=on, with iommu=pt, to the kernel command line".to_string(),
    };
    let gpu_note = if inv.gpus.is_empty() {
        String::new()
    } else {
        format!("; {} GPU(s) cannot be passed through", inv.gpus.len())
    };
    Check::fail(
        ID,
        TITLE,
        format!(
            "no IOMMU groups under {}; {unit_detail}; {cmd_detail}{gpu_note}",
            root.iommu_groups_dir().display()
        ),
        fix,
    )
}

fn interrupt_remapping(
    root: &HostRoot,
    cmdline: &Result<KernelCmdline, String>,
    units: &[String],
    groups: usize,
) -> Check {
    const ID: &str = "interrupt-remapping";
    const TITLE: &str = "Interrupt remapping";
    let unsafe_path = root.sys("module/vfio_iommu_type1/parameters/allow_unsafe_interrupts");
    let unsafe_on = sysfs::read_text_opt(&unsafe_path)
        .ok()
        .flatten()
        .is_some_and(|v| v == "Y" || v == "1");
    if groups == 0 {
        return Check::fail(
            ID,
            TITLE,
            "no IOMMU, so no interrupt remapping",
            "turn the IOMMU on (see the iommu check)",
        );
    }
    if let Ok(c) = cmdline {
        if c.get("intremap") == Some(Some("off")) {
            return Check::fail(
                ID,
                TITLE,
                "intremap=off on the kernel command line",
                "remove intremap=off and reboot: without remapping a guest can forge interrupts",
            );
        }
    }
    // Evidence it is in use: interrupt chips of remapped interrupts are named `IR-...`
    // (IR-PCI-MSI, IR-IO-APIC) in /proc/interrupts.
    let interrupts = root.proc("interrupts");
    let active = sysfs::read_raw(&interrupts)
        .map(|t| t.split_whitespace().any(|w| w.starts_with("IR-")))
        .unwrap_or(false);
    // Capability: an Intel unit's ecap IR bit, or any AMD unit (AMD-Vi always remaps).
    let mut capable = Vec::new();
    for u in units {
        let ecap = root.sys(&format!("class/iommu/{u}/intel-iommu/ecap"));
        if let Ok(text) = sysfs::read_text(&ecap) {
            if sysfs::parse_hex::<u64>(&ecap, &text, "a hex capability word")
                .is_ok_and(|v| v & INTEL_ECAP_IR != 0)
            {
                capable.push(u.clone());
            }
        } else if root.sys(&format!("class/iommu/{u}/amd-iommu")).is_dir() {
            capable.push(u.clone());
        }
    }
    let unsafe_fix = format!(
        "set allow_unsafe_interrupts=0 for vfio_iommu_type1 ({}): it lets a guest forge interrupts",
        unsafe_path.display()
    );
    if active {
        if unsafe_on {
            return Check::warn(ID, TITLE, "remapped interrupts in /proc/interrupts, but vfio_iommu_type1 allow_unsafe_interrupts=Y", unsafe_fix);
        }
        return Check::pass(
            ID,
            TITLE,
            "remapped (IR-*) interrupt chips in /proc/interrupts",
        );
    }
    if !capable.is_empty() {
        return Check::warn(
            ID,
            TITLE,
            format!(
                "IOMMU units {} support remapping, but /proc/interrupts shows no IR-* interrupt chips",
                capable.join(",")
            ),
            "check that x2APIC/interrupt remapping is enabled in the firmware and not disabled on the kernel command line",
        );
    }
    Check::fail(
        ID,
        TITLE,
        "no remapped interrupts in /proc/interrupts and no IOMMU unit advertising remapping under sys/class/iommu",
        "VFIO refuses devices without interrupt remapping (allow_unsafe_interrupts would let a guest forge interrupts): enable interrupt remapping / x2APIC in the firmware or use a platform that has it",
    )
}

fn acs_override(cmdline: &Result<KernelCmdline, String>) -> Check {
    const ID: &str = "acs-override";
    const TITLE: &str = "ACS override";
    match cmdline {
        Err(e) => Check::warn(ID, TITLE, format!("unknown: {e}"), "make /proc/cmdline readable so doctor can check it"),
        Ok(c) => match c.acs_override() {
            Some(v) => Check::warn(
                ID,
                TITLE,
                format!("pcie_acs_override={v} on the kernel command line: IOMMU groups are split without real isolation"),
                "remove pcie_acs_override on hosts that run untrusted workloads; a GPU could reach devices in what looks like another group",
            ),
            None => Check::pass(ID, TITLE, "pcie_acs_override not set; IOMMU groups reflect the hardware"),
        },
    }
}

fn vfio(root: &HostRoot) -> Check {
    const ID: &str = "vfio";
    const TITLE: &str = "VFIO modules";
    let has = |m: &str| root.sys(&format!("module/{m}")).is_dir();
    let mut missing = Vec::new();
    for m in ["vfio", "vfio_pci"] {
        if !has(m) {
            missing.push(format!("module {m}"));
        }
    }
    // The container backend: the legacy type1 driver or iommufd's compatibility layer.
    if !has("vfio_iommu_type1") && !has("iommufd") {
        missing.push("module vfio_iommu_type1 (or iommufd)".to_string());
    }
    let container = root.dev("vfio/vfio");
    if std::fs::symlink_metadata(&container).is_err() {
        missing.push(container.display().to_string());
    }
    if missing.is_empty() {
        Check::pass(
            ID,
            TITLE,
            "vfio, vfio_pci and the IOMMU backend loaded; /dev/vfio/vfio present",
        )
    } else {
        Check::fail(
            ID,
            TITLE,
            format!("missing: {}", missing.join(", ")),
            "modprobe vfio-pci (it loads vfio and vfio_iommu_type1); `gpucell host plan` makes it load at boot",
        )
    }
}
