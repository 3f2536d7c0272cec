//! The content of the files gpucell owns: modules to load at boot, module load order,
//! and the per-device udev rule. Only typed values (PCI addresses, ids, module names from
//! a fixed list) go into them, never text read from the host.

use std::collections::BTreeSet;

use crate::bdf::Bdf;

/// `/etc/modules-load.d/gpucell-vfio.conf`.
pub const MODULES_LOAD_PATH: &str = "modules-load.d/gpucell-vfio.conf";
/// `/etc/modprobe.d/gpucell-vfio.conf`.
pub const MODPROBE_PATH: &str = "modprobe.d/gpucell-vfio.conf";
/// `/etc/udev/rules.d/80-gpucell-vfio.rules`.
pub const UDEV_RULES_PATH: &str = "udev/rules.d/80-gpucell-vfio.rules";
/// `/etc/default/grub`.
pub const GRUB_PATH: &str = "default/grub";

/// Host drivers that must wait for vfio-pci, so that vfio-pci claims the devices whose
/// `driver_override` the udev rule set before they do.
pub const GPU_DRIVERS: [&str; 2] = ["nvidia", "nouveau"];

/// A PCI function written into the udev rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleDevice {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// The GPU this function belongs with (itself for the GPU).
    pub gpu: Bdf,
}

pub fn modules_load() -> String {
    "# Written by `gpucell host apply`: load VFIO at boot so GPUs can be given to microVMs.\n\
     vfio\n\
     vfio_iommu_type1\n\
     vfio_pci\n"
        .to_owned()
}

/// `companions`: drivers of functions that share a GPU's group (`snd_hda_intel`, ...).
/// `ids`: `vendor:device` pairs for `options vfio-pci ids=` (ids mode only).
pub fn modprobe(companions: &BTreeSet<&'static str>, ids: &BTreeSet<(u16, u16)>) -> String {
    let mut out = String::from(
        "# Written by `gpucell host apply`: load vfio-pci before the host drivers of GPUs and\n\
         # their companion functions, so vfio-pci claims the devices given to it.\n",
    );
    for d in GPU_DRIVERS.iter().chain(companions.iter()) {
        out.push_str(&format!("softdep {d} pre: vfio-pci\n"));
    }
    if !ids.is_empty() {
        out.push_str(
            "# Claims EVERY device with these ids, not only the selected ones (--ids-mode).\n",
        );
        let list: Vec<String> = ids
            .iter()
            .map(|(v, d)| format!("{v:04x}:{d:04x}"))
            .collect();
        out.push_str(&format!("options vfio-pci ids={}\n", list.join(",")));
    }
    out
}

pub fn udev_rules(devices: &[RuleDevice]) -> String {
    let mut out = String::from(
        "# Written by `gpucell host apply`: hand these PCI functions to vfio-pci at boot.\n\
         # A PCI address can change when cards are moved or added: re-run `gpucell host plan`.\n\
         # The first rule of each function sets driver_override before its driver module loads.\n\
         # The second one moves it when a driver loaded for another device took it first.\n",
    );
    for d in devices {
        let role = if d.bdf == d.gpu {
            "GPU".to_owned()
        } else {
            format!("same IOMMU group as {}", d.gpu)
        };
        out.push_str(&format!(
            "# {} {:04x}:{:04x} ({role})\n",
            d.bdf, d.vendor, d.device
        ));
        out.push_str(&format!(
            "ACTION==\"add\", SUBSYSTEM==\"pci\", KERNEL==\"{}\", ATTR{{driver_override}}=\"vfio-pci\"\n",
            d.bdf
        ));
        out.push_str(&format!(
            "ACTION==\"add\", SUBSYSTEM==\"pci\", KERNEL==\"{bdf}\", DRIVER==\"?*\", DRIVER!=\"vfio-pci\", \
             RUN+=\"/bin/sh -c 'echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; echo {bdf} > /sys/bus/pci/drivers_probe'\"\n",
            bdf = d.bdf
        ));
    }
    out
}
