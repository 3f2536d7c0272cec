//! A small fake host for device tests: sysfs and /dev/vfio entries of an RTX 4090 and
//! its HDMI audio function, written into a temp dir (GPU hardware cannot exist here).
#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::fs::symlink;
use std::path::Path;

pub fn write(root: &Path, rel: &str, content: impl AsRef<[u8]>) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

pub fn link(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    symlink(target, p).unwrap();
}

/// One function at `0000:01:00.<func>` on vfio-pci in IOMMU group 1.
pub fn add_function(root: &Path, func: u8, device: u16, class: u32, bars: &[(u64, u64, u64)]) {
    let bdf = format!("0000:01:00.{func}");
    let dir = format!("sys/devices/pci0000:01/{bdf}");
    let attr = |name: &str, value: String| write(root, &format!("{dir}/{name}"), value + "\n");
    attr("vendor", "0x10de".into());
    attr("device", format!("{device:#06x}"));
    attr("class", format!("{class:#08x}"));
    attr("driver_override", "vfio-pci".into());
    attr("numa_node", "0".into());
    attr("local_cpulist", "0-1".into());
    attr("reset_method", "flr".into());
    let mut resource = String::new();
    for i in 0..13 {
        let (start, size, flags) = bars.get(i).copied().unwrap_or((0, 0, 0));
        let end = if size == 0 { 0 } else { start + size - 1 };
        resource.push_str(&format!("{start:#018x} {end:#018x} {flags:#018x}\n"));
    }
    write(root, &format!("{dir}/resource"), resource);
    let mut config = vec![0u8; 64];
    config[0..2].copy_from_slice(&0x10deu16.to_le_bytes());
    config[2..4].copy_from_slice(&device.to_le_bytes());
    write(root, &format!("{dir}/config"), config);
    write(root, &format!("{dir}/reset"), "");
    link(
        root,
        &format!("sys/bus/pci/devices/{bdf}"),
        &format!("../../../devices/pci0000:01/{bdf}"),
    );
    link(
        root,
        &format!("{dir}/driver"),
        "../../../bus/pci/drivers/vfio-pci",
    );
    link(
        root,
        &format!("sys/bus/pci/drivers/vfio-pci/{bdf}"),
        &format!("../../../../devices/pci0000:01/{bdf}"),
    );
    link(
        root,
        &format!("{dir}/iommu_group"),
        "../../../kernel/iommu_groups/1",
    );
    link(
        root,
        &format!("sys/kernel/iommu_groups/1/devices/{bdf}"),
        &format!("../../../../devices/pci0000:01/{bdf}"),
    );
}

/// A host with an RTX 4090 (`0000:01:00.0`) and its HDMI audio (`0000:01:00.1`), both
/// on vfio-pci, alone in IOMMU group 1.
pub fn fake_4090_host(root: &Path) {
    fake_gpu_host(root, 0x2684);
}

/// A host with one NVIDIA GPU of PCI device id `device` (`0000:01:00.0`: an H200 is
/// 0x2335, an RTX 4090 0x2684, an RTX 5090 0x2b85) and an HDMI audio function
/// (`0000:01:00.1`), both on vfio-pci, alone in IOMMU group 1.
pub fn fake_gpu_host(root: &Path, device: u16) {
    write(root, "proc/cmdline", "root=/dev/sda1 intel_iommu=on\n");
    write(root, "dev/vfio/vfio", "");
    write(root, "dev/vfio/1", "");
    const MEM64_PREF: u64 = 0x14220c;
    add_function(
        root,
        0,
        device,
        0x030000,
        &[
            (0xf000_0000, 16 << 20, 0x40200),
            (0x40_0000_0000, 32 << 30, MEM64_PREF),
            (0, 0, 0),
            (0x48_0000_0000, 32 << 20, MEM64_PREF),
        ],
    );
    add_function(
        root,
        1,
        0x22ba,
        0x040300,
        &[(0xf100_0000, 16 << 10, 0x40200)],
    );
}
