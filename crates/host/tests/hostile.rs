//! Every attribute of a function, and the links around it, filled with hostile content:
//! reading must give the field as unknown or an error naming the file, never a panic.
#![allow(clippy::unwrap_used)]

use gpucell_host::gpu::GpuInventory;
use gpucell_host::pci::{Driver, PciFunction, PciScan};
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::Bdf;

const DIR: &str = "sys/devices/pci0000:01/0000:01:00.0";
const IDENTITY: [&str; 3] = ["vendor", "device", "class"];
const OPTIONAL: [&str; 11] = [
    "subsystem_vendor",
    "subsystem_device",
    "revision",
    "driver_override",
    "numa_node",
    "local_cpulist",
    "current_link_speed",
    "current_link_width",
    "reset_method",
    "resource",
    "iommu_group",
];

fn garbage() -> Vec<Vec<u8>> {
    vec![
        b"".to_vec(),
        b"\n\n\n".to_vec(),
        vec![0xff, 0xfe, 0xfd, 0x00],
        b"0x".to_vec(),
        b"-1\n".to_vec(),
        b"-99999999999999999999\n".to_vec(),
        b"0xffffffffffffffffffffffff\n".to_vec(),
        b"18446744073709551616\n".to_vec(),
        b"0-4294967295,4294967295-0\n".to_vec(),
        b"0x1 0x2 0x3 0x4\n0x5\n".to_vec(),
        "\u{202e}0x10de\u{0}\n".as_bytes().to_vec(),
        vec![b'9'; 100_000],
        vec![b'\n'; 10_000],
    ]
}

fn host() -> FakeHost {
    let host = FakeHost::new().unwrap();
    host.cmdline("intel_iommu=on").unwrap();
    host.add(
        &FakeFunction::rtx4090("0000:01:00.0")
            .driver("nvidia")
            .iommu_group(12)
            .numa_node(0)
            .local_cpulist("0-7"),
    )
    .unwrap();
    host.add(
        &FakeFunction::rtx4090_audio("0000:01:00.1")
            .driver("snd_hda_intel")
            .iommu_group(12),
    )
    .unwrap();
    host
}

fn bdf() -> Bdf {
    "0000:01:00.0".parse().unwrap()
}

#[test]
fn garbage_in_identity_files_is_an_error_naming_the_file() {
    for name in IDENTITY {
        for g in garbage() {
            let host = host();
            host.write(&format!("{DIR}/{name}"), &g).unwrap();
            match PciFunction::read(&host.root(), bdf()) {
                Ok(f) => panic!("{name}={:?} accepted: {f:?}", String::from_utf8_lossy(&g)),
                Err(e) => {
                    let chain = gpucell_common::chain_string(&e);
                    assert!(chain.contains(&format!("0000:01:00.0/{name}")), "{chain}");
                }
            }
            // The whole inventory still works, without that function.
            let inv = GpuInventory::read(&host.root()).unwrap();
            assert!(inv.get(bdf()).is_none());
        }
    }
}

#[test]
fn garbage_in_optional_files_is_unknown_or_named() {
    for name in OPTIONAL {
        for g in garbage() {
            let host = host();
            let path = format!("{DIR}/{name}");
            if name == "iommu_group" {
                // A directory where a link should be, or a link to garbage.
                host.remove(&path).unwrap();
                if g.is_empty() {
                    host.mkdir(&path).unwrap();
                } else {
                    let target =
                        String::from_utf8_lossy(&g[..g.len().min(200)]).replace(['/', '\0'], "_");
                    host.symlink(&path, &format!("../../../kernel/iommu_groups/{target}"))
                        .unwrap();
                }
            } else {
                host.write(&path, &g).unwrap();
            }
            let f = PciFunction::read(&host.root(), bdf()).unwrap();
            let text = String::from_utf8_lossy(&g).trim().to_string();
            let changed = match name {
                "subsystem_vendor" => f.subsystem_vendor.is_none(),
                "subsystem_device" => f.subsystem_device.is_none(),
                "revision" => f.revision.is_none(),
                "driver_override" => f.driver_override.as_deref() != Some("vfio-pci"),
                "numa_node" => f.numa_node.is_none(),
                "local_cpulist" => f.local_cpus.is_none(),
                "current_link_speed" => true,
                "current_link_width" => f.link.width.is_none(),
                "reset_method" => true,
                "resource" => f.bars.is_none() || text.is_empty(),
                "iommu_group" => f.iommu_group.is_none(),
                _ => unreachable!(),
            };
            assert!(changed, "{name}={text:?} gave a value: {f:?}");
            // Anything reported names the file, and messages stay short.
            for w in &f.warnings {
                assert!(w.contains("0000:01:00.0/"), "{w}");
                assert!(w.len() < 1000, "warning too long: {} bytes", w.len());
            }
            let inv = GpuInventory::read(&host.root()).unwrap();
            assert!(inv.get(bdf()).is_some());
        }
    }
}

#[test]
fn hostile_links() {
    let host = host();
    // A driver link whose target is not UTF-8.
    host.remove(&format!("{DIR}/driver")).unwrap();
    let mut bytes = b"../../../bus/pci/drivers/x".to_vec();
    bytes.extend([0xff, 0xfe]);
    let target = <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(bytes);
    std::os::unix::fs::symlink(&target, host.join(&format!("{DIR}/driver"))).unwrap();
    let f = PciFunction::read(&host.root(), bdf()).unwrap();
    assert_eq!(f.driver, Driver::Unknown);
    assert!(f.warnings.iter().any(|w| w.contains("0000:01:00.0/driver")));

    // A device entry that is a symlink loop, and one pointing nowhere.
    host.symlink("sys/bus/pci/devices/0000:07:00.0", "0000:07:00.0")
        .unwrap();
    host.symlink(
        "sys/bus/pci/devices/0000:08:00.0",
        "../../../devices/pci0000:08/gone",
    )
    .unwrap();
    let scan = PciScan::read(&host.root()).unwrap();
    assert_eq!(scan.functions.len(), 2);
    assert_eq!(scan.problems.len(), 2, "{:?}", scan.problems);
    // An IOMMU group directory with entries that are not addresses.
    host.mkdir("sys/kernel/iommu_groups/12/devices/not-a-device")
        .unwrap();
    let inv = GpuInventory::read(&host.root()).unwrap();
    assert_eq!(inv.get(bdf()).unwrap().group_members.len(), 2);
}
