//! GPU inventory and passthrough states on built bare-metal trees and the H200 capture.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use gpucell_host::arch::Architecture;
use gpucell_host::gpu::{CompanionKind, GpuInventory, PassthroughState};
use gpucell_host::pci::Driver;
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::{Bdf, HostRoot};

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";

/// Bare-metal Intel host, RTX 4090 + audio in group 12 behind a root port in group 1.
fn rtx4090_host(gpu_driver: &str, audio_driver: &str) -> FakeHost {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.add(&FakeFunction::root_port("0000:00:01.0").iommu_group(1))
        .unwrap();
    host.add(
        &FakeFunction::rtx4090(GPU)
            .behind("0000:00:01.0")
            .driver(gpu_driver)
            .iommu_group(12)
            .numa_node(0)
            .local_cpulist("0-15"),
    )
    .unwrap();
    host.add(
        &FakeFunction::rtx4090_audio(AUDIO)
            .behind("0000:00:01.0")
            .driver(audio_driver)
            .iommu_group(12)
            .numa_node(0),
    )
    .unwrap();
    host
}

#[test]
fn rtx4090_bound_to_vfio_is_ready() {
    let host = rtx4090_host("vfio-pci", "vfio-pci");
    let inv = GpuInventory::read(&host.root()).unwrap();
    assert!(inv.warnings.is_empty(), "{:?}", inv.warnings);
    assert!(inv.iommu_groups_present);
    assert_eq!(inv.acs_override, None);
    assert_eq!(inv.gpus.len(), 1);
    let g = &inv.gpus[0];
    assert_eq!(g.bdf, bdf(GPU));
    assert_eq!(g.id, "10de:2684");
    assert_eq!(g.name, "AD102 [GeForce RTX 4090]");
    assert_eq!(g.architecture, Some(Architecture::Ada));
    assert_eq!(
        g.largest_bar.as_ref().map(|b| (b.index, b.size)),
        Some((1, 32 << 30))
    );
    assert_eq!(g.iommu_group, Some(12));
    assert_eq!(g.group_members, vec![bdf(GPU), bdf(AUDIO)]);
    assert_eq!(g.companions.len(), 1);
    assert_eq!(g.companions[0].bdf, bdf(AUDIO));
    assert_eq!(g.companions[0].kind, CompanionKind::Audio);
    assert_eq!(g.companions[0].id, "10de:22ba");
    assert_eq!(g.numa_node, Some(0));
    assert_eq!(
        g.reset_methods.as_deref(),
        Some(&["flr".to_string(), "bus".to_string()][..])
    );
    assert_eq!(g.passthrough, PassthroughState::Ready);
}

#[test]
fn rtx4090_on_host_drivers_needs_bind() {
    let host = rtx4090_host("nvidia", "snd_hda_intel");
    let inv = GpuInventory::read(&host.root()).unwrap();
    let g = &inv.gpus[0];
    let PassthroughState::NeedsBind { functions } = &g.passthrough else {
        panic!("expected needs-bind, got {:?}", g.passthrough);
    };
    let got: Vec<(String, Driver)> = functions
        .iter()
        .map(|m| (m.bdf.to_string(), m.driver.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (GPU.to_string(), Driver::Bound("nvidia".into())),
            (AUDIO.to_string(), Driver::Bound("snd_hda_intel".into())),
        ]
    );
    assert_eq!(g.passthrough.name(), "needs-bind");
}

#[test]
fn unbound_gpu_with_vfio_audio_needs_bind_for_the_gpu_only() {
    let host = rtx4090_host("vfio-pci", "vfio-pci");
    host.unbind(bdf(GPU)).unwrap();
    let inv = GpuInventory::read(&host.root()).unwrap();
    let PassthroughState::NeedsBind { functions } = &inv.gpus[0].passthrough else {
        panic!("{:?}", inv.gpus[0].passthrough);
    };
    assert_eq!(functions.len(), 1);
    assert_eq!(functions[0].bdf, bdf(GPU));
    assert_eq!(functions[0].driver, Driver::Unbound);
}

#[test]
fn unrelated_device_in_the_group_makes_it_not_viable() {
    let host = rtx4090_host("vfio-pci", "vfio-pci");
    // An NVMe disk bound to nvme, a bridge on pcieport and an unbound endpoint share group 12.
    host.add(
        &FakeFunction::nvme("0000:02:00.0")
            .driver("nvme")
            .iommu_group(12),
    )
    .unwrap();
    host.add(&FakeFunction::root_port("0000:00:1c.0").iommu_group(12))
        .unwrap();
    host.add(&FakeFunction::nvme("0000:03:00.0").iommu_group(12))
        .unwrap();
    let inv = GpuInventory::read(&host.root()).unwrap();
    let g = &inv.gpus[0];
    assert_eq!(g.group_members.len(), 5);
    let PassthroughState::GroupNotViable { blockers } = &g.passthrough else {
        panic!("expected group-not-viable, got {:?}", g.passthrough);
    };
    assert_eq!(blockers.len(), 1, "{blockers:?}");
    assert_eq!(blockers[0].bdf, bdf("0000:02:00.0"));
    assert_eq!(blockers[0].driver, Driver::Bound("nvme".into()));
    assert_eq!(blockers[0].id.as_deref(), Some("144d:a808"));

    // Unbinding the disk makes the group viable again.
    host.unbind(bdf("0000:02:00.0")).unwrap();
    let inv = GpuInventory::read(&host.root()).unwrap();
    assert_eq!(inv.gpus[0].passthrough, PassthroughState::Ready);
}

#[test]
fn group_member_that_cannot_be_read_blocks() {
    let host = rtx4090_host("vfio-pci", "vfio-pci");
    host.add(&FakeFunction::nvme("0000:02:00.0").iommu_group(12))
        .unwrap();
    host.remove("sys/devices/pci0000:02/0000:02:00.0/vendor")
        .unwrap();
    let inv = GpuInventory::read(&host.root()).unwrap();
    let PassthroughState::GroupNotViable { blockers } = &inv.gpus[0].passthrough else {
        panic!("{:?}", inv.gpus[0].passthrough);
    };
    assert_eq!(blockers[0].driver, Driver::Unknown);
    assert!(
        inv.warnings
            .iter()
            .any(|w| w.contains("0000:02:00.0/vendor")),
        "{:?}",
        inv.warnings
    );
}

#[test]
fn iommu_off_gives_no_iommu() {
    let host = FakeHost::new().unwrap();
    host.cmdline("root=/dev/sda1").unwrap();
    host.add(&FakeFunction::rtx4090(GPU).driver("nvidia"))
        .unwrap();
    host.add(&FakeFunction::rtx4090_audio(AUDIO).driver("snd_hda_intel"))
        .unwrap();
    let inv = GpuInventory::read(&host.root()).unwrap();
    assert!(!inv.iommu_groups_present);
    assert_eq!(inv.gpus[0].passthrough, PassthroughState::NoIommu);
    assert!(inv.gpus[0].group_members.is_empty());
}

#[test]
fn two_gpus_on_two_numa_nodes() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.add(
        &FakeFunction::h100("0000:1b:00.0")
            .driver("vfio-pci")
            .iommu_group(30)
            .numa_node(0)
            .local_cpulist("0-31"),
    )
    .unwrap();
    host.add(
        &FakeFunction::h100("0000:9c:00.0")
            .driver("vfio-pci")
            .iommu_group(90)
            .numa_node(1)
            .local_cpulist("32-63"),
    )
    .unwrap();
    let inv = GpuInventory::read(&host.root()).unwrap();
    let nodes: Vec<(String, Option<u32>, String)> = inv
        .gpus
        .iter()
        .map(|g| {
            (
                g.bdf.to_string(),
                g.numa_node,
                g.function.local_cpus.as_ref().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        vec![
            ("0000:1b:00.0".into(), Some(0), "0-31".into()),
            ("0000:9c:00.0".into(), Some(1), "32-63".into())
        ]
    );
    assert!(inv
        .gpus
        .iter()
        .all(|g| g.passthrough == PassthroughState::Ready && g.companions.is_empty()));
    assert_eq!(inv.gpus[0].architecture, Some(Architecture::Hopper));
    assert_eq!(inv.gpus[0].mmio_bytes, Some((128 << 30) + (48 << 20)));
}

#[test]
fn acs_override_is_reported() {
    let host = rtx4090_host("vfio-pci", "vfio-pci");
    host.cmdline("intel_iommu=on pcie_acs_override=downstream,multifunction")
        .unwrap();
    let inv = GpuInventory::read(&host.root()).unwrap();
    assert_eq!(
        inv.acs_override.as_deref(),
        Some("downstream,multifunction")
    );
}

#[test]
fn h200_capture_has_four_gpus_without_iommu() {
    let root = HostRoot::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hosts/h200x4-vm"),
    );
    let inv = GpuInventory::read(&root).unwrap();
    assert_eq!(inv.gpus.len(), 4);
    assert!(!inv.iommu_groups_present);
    // The capture has no /proc: the inventory says it could not check the command line.
    assert!(
        inv.warnings.iter().any(|w| w.contains("proc/cmdline")),
        "{:?}",
        inv.warnings
    );
    for g in &inv.gpus {
        assert_eq!(g.name, "GH100 [H200 SXM 141GB]");
        assert_eq!(g.architecture, Some(Architecture::Hopper));
        assert_eq!(g.largest_bar.as_ref().unwrap().size, 256 << 30);
        assert_eq!(g.driver, Driver::Bound("nvidia".into()));
        assert_eq!(g.passthrough, PassthroughState::NoIommu);
        assert!(g.companions.is_empty());
    }
}
