//! Doctor checks on built hosts and on the H200 capture.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use gpucell_host::doctor::{self, DoctorInput, DoctorReport, KvmProbe, QemuInfo, Status};
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::HostRoot;

fn input() -> DoctorInput {
    DoctorInput {
        kvm_probe: Some(KvmProbe::Usable),
        qemu: Some(QemuInfo::Found {
            path: "/usr/bin/qemu-system-x86_64".into(),
            version: Some("7.2.19".into()),
        }),
    }
}

fn status(r: &DoctorReport, id: &str) -> Status {
    r.check(id)
        .unwrap_or_else(|| panic!("no check {id}: {:#?}", r.checks))
        .status
}

fn ready_host() -> FakeHost {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.add(
        &FakeFunction::rtx4090("0000:01:00.0")
            .driver("vfio-pci")
            .iommu_group(12),
    )
    .unwrap();
    host.add(
        &FakeFunction::rtx4090_audio("0000:01:00.1")
            .driver("vfio-pci")
            .iommu_group(12),
    )
    .unwrap();
    host
}

#[test]
fn ready_host_passes_everything() {
    let host = ready_host();
    let r = doctor::run(&host.root(), &input()).unwrap();
    let failing: Vec<_> = r
        .checks
        .iter()
        .filter(|c| c.status != Status::Pass)
        .collect();
    assert!(failing.is_empty(), "{failing:#?}");
    assert!(r.ready);
    assert_eq!(r.exit_code(), 0);
    assert_eq!(r.summary.pass, r.checks.len());
    let ids: Vec<&str> = r.checks.iter().map(|c| c.id.as_str()).collect();
    for id in [
        "cpu-virtualization",
        "kvm",
        "iommu",
        "interrupt-remapping",
        "acs-override",
        "vfio",
        "gpus",
        "gpu-group:0000:01:00.0",
        "gpu-host-driver:0000:01:00.0",
        "gpu-reset:0000:01:00.0",
        "mmio-window",
        "hugepages",
        "qemu",
    ] {
        assert!(ids.contains(&id), "missing {id} in {ids:?}");
    }
    // 16 MiB BAR0 is 32-bit; 32 GiB + 32 MiB of 64-bit BARs round up to 64 GiB.
    assert!(
        r.check("mmio-window").unwrap().detail.contains("64 GiB"),
        "{:?}",
        r.check("mmio-window")
    );
    assert!(r.check("hugepages").unwrap().detail.contains("64 GiB free"));
}

#[test]
fn host_drivers_warn_but_do_not_fail() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.module("nvidia").unwrap();
    host.add(
        &FakeFunction::rtx4090("0000:01:00.0")
            .driver("nvidia")
            .iommu_group(12),
    )
    .unwrap();
    host.add(
        &FakeFunction::rtx4090_audio("0000:01:00.1")
            .driver("snd_hda_intel")
            .iommu_group(12),
    )
    .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert_eq!(status(&r, "gpu-group:0000:01:00.0"), Status::Warn);
    let drv = r.check("gpu-host-driver:0000:01:00.0").unwrap();
    assert_eq!(drv.status, Status::Warn);
    assert!(
        drv.detail.contains("nvidia")
            && drv
                .fix
                .as_ref()
                .unwrap()
                .contains("gpucell gpu bind 0000:01:00.0")
    );
    assert_eq!(r.exit_code(), 0);
}

#[test]
fn iommu_off_fails_with_an_intel_or_amd_fix() {
    let host = FakeHost::new().unwrap();
    host.cpuinfo("GenuineIntel", "vmx", 2, 46).unwrap();
    host.cmdline("root=/dev/sda1 ro").unwrap();
    host.add(&FakeFunction::rtx4090("0000:01:00.0").driver("nvidia"))
        .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    let iommu = r.check("iommu").unwrap();
    assert_eq!(iommu.status, Status::Fail);
    assert!(
        iommu.fix.as_ref().unwrap().contains("intel_iommu=on"),
        "{iommu:?}"
    );
    assert_eq!(status(&r, "interrupt-remapping"), Status::Fail);
    assert_eq!(status(&r, "vfio"), Status::Fail);
    assert_eq!(status(&r, "gpu-group:0000:01:00.0"), Status::Fail);
    assert_eq!(r.exit_code(), 1);

    host.cpuinfo("AuthenticAMD", "svm", 2, 48).unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert!(r
        .check("iommu")
        .unwrap()
        .fix
        .as_ref()
        .unwrap()
        .contains("amd_iommu=on"));

    host.cmdline("intel_iommu=off").unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert!(r
        .check("iommu")
        .unwrap()
        .fix
        .as_ref()
        .unwrap()
        .contains("remove intel_iommu=off"));
}

#[test]
fn unrelated_device_in_group_fails() {
    let host = ready_host();
    host.add(
        &FakeFunction::nvme("0000:02:00.0")
            .driver("nvme")
            .iommu_group(12),
    )
    .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    let c = r.check("gpu-group:0000:01:00.0").unwrap();
    assert_eq!(c.status, Status::Fail);
    assert!(c.detail.contains("0000:02:00.0 (nvme)"), "{c:?}");
    assert!(!r.ready);
}

#[test]
fn missing_reset_method_fails() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.add(
        &FakeFunction::h100("0000:1b:00.0")
            .no_reset_method()
            .driver("vfio-pci")
            .iommu_group(3),
    )
    .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert_eq!(status(&r, "gpu-reset:0000:1b:00.0"), Status::Fail);
}

#[test]
fn interrupt_remapping_evidence() {
    let host = ready_host();
    // Capability without remapped interrupts in use: warn.
    host.write(
        "proc/interrupts",
        "  24:  10  PCI-MSI 65536-edge  nvme0q0\n",
    )
    .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert_eq!(status(&r, "interrupt-remapping"), Status::Warn);
    // No capability either: fail.
    host.intel_iommu_unit("dmar0", 0xd2008c40660462, 0xf050d2)
        .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert_eq!(status(&r, "interrupt-remapping"), Status::Fail);
    // Active, but VFIO told to accept unsafe interrupts: warn.
    host.write("proc/interrupts", " 24: 1 IR-PCI-MSI 65536-edge nvme0q0\n")
        .unwrap();
    host.write(
        "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
        "Y\n",
    )
    .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert_eq!(status(&r, "interrupt-remapping"), Status::Warn);
}

#[test]
fn acs_override_warns() {
    let host = ready_host();
    host.cmdline("intel_iommu=on pcie_acs_override=downstream")
        .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert_eq!(status(&r, "acs-override"), Status::Warn);
}

#[test]
fn mmio_window_beyond_address_bits_fails() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.cpuinfo("GenuineIntel", "vmx", 2, 39).unwrap();
    for (i, b) in [
        "0000:1b:00.0",
        "0000:2b:00.0",
        "0000:3b:00.0",
        "0000:4b:00.0",
    ]
    .iter()
    .enumerate()
    {
        host.add(
            &FakeFunction::h100(b)
                .driver("vfio-pci")
                .iommu_group(i as u32),
        )
        .unwrap();
    }
    let r = doctor::run(&host.root(), &input()).unwrap();
    let c = r.check("mmio-window").unwrap();
    // 4 x (128 GiB + 48 MiB -> 256 GiB) = 1 TiB > 2^38.
    assert_eq!(c.status, Status::Fail, "{c:?}");
    assert!(c.detail.contains("1 TiB"), "{c:?}");
    host.cpuinfo("GenuineIntel", "vmx", 2, 46).unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert_eq!(status(&r, "mmio-window"), Status::Pass);
}

#[test]
fn kvm_probe_results() {
    let host = ready_host();
    let mut inp = input();
    inp.kvm_probe = Some(KvmProbe::Unusable("emulation failure".into()));
    let r = doctor::run(&host.root(), &inp).unwrap();
    let c = r.check("kvm").unwrap();
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("TCG") && c.detail.contains("emulation failure"));
    inp.kvm_probe = Some(KvmProbe::NotRun("not built yet".into()));
    assert_eq!(
        status(&doctor::run(&host.root(), &inp).unwrap(), "kvm"),
        Status::Warn
    );
    host.remove("dev/kvm").unwrap();
    inp.kvm_probe = Some(KvmProbe::Usable);
    let r = doctor::run(&host.root(), &inp).unwrap();
    assert!(r.check("kvm").unwrap().detail.contains("TCG"));
}

#[test]
fn no_hugepages_and_no_qemu() {
    let host = ready_host();
    host.write(
        "sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages",
        "0\n",
    )
    .unwrap();
    let mut inp = input();
    inp.qemu = Some(QemuInfo::NotFound);
    let r = doctor::run(&host.root(), &inp).unwrap();
    assert_eq!(status(&r, "hugepages"), Status::Warn);
    let q = r.check("qemu").unwrap();
    assert_eq!(q.status, Status::Fail);
    assert!(q.detail.contains("not under --host-root"), "{q:?}");
}

#[test]
fn garbled_inputs_do_not_panic() {
    let host = ready_host();
    host.write("proc/cpuinfo", [0xff, 0xfe, 0x00]).unwrap();
    host.write("proc/cmdline", [0xc3, 0x28]).unwrap();
    host.write(
        "sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages",
        "lots\n",
    )
    .unwrap();
    host.write("sys/class/iommu/dmar0/intel-iommu/ecap", "\n")
        .unwrap();
    host.write("sys/devices/pci0000:01/0000:01:00.0/resource", "nonsense\n")
        .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert!(r
        .check("cpu-virtualization")
        .unwrap()
        .detail
        .contains("proc/cpuinfo"));
    assert!(r
        .check("acs-override")
        .unwrap()
        .detail
        .contains("proc/cmdline"));
    assert!(r
        .check("hugepages")
        .unwrap()
        .detail
        .contains("nr_hugepages"));
    assert!(r.check("mmio-window").unwrap().detail.contains("unknown"));
}

#[test]
fn missing_root_is_a_doctor_error() {
    let err = doctor::run(&HostRoot::new("/nonexistent/gpucell-root"), &input()).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/gpucell-root"));
}

#[test]
fn h200_capture_is_not_ready() {
    let root = HostRoot::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hosts/h200x4-vm"),
    );
    let r = doctor::run(&root, &input()).unwrap();
    assert_eq!(r.exit_code(), 1);
    assert_eq!(status(&r, "iommu"), Status::Fail);
    assert_eq!(status(&r, "gpu-reset:0000:00:06.0"), Status::Pass);
    assert_eq!(status(&r, "gpu-host-driver:0000:00:06.0"), Status::Warn);
    let w = r.check("mmio-window").unwrap();
    // 4 x (256 GiB + 48 MiB -> 512 GiB) = 2 TiB; no cpuinfo in the capture.
    assert!(w.detail.contains("2 TiB"), "{w:?}");
    assert_eq!(w.status, Status::Warn);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["schema"], "gpucell.doctor/v1");
    assert_eq!(json["ready"], false);
    assert!(json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["status"].is_string() && c["id"].is_string()));
}

#[test]
fn nvswitches_are_pointed_out() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.add(
        &FakeFunction::h100("0000:1b:00.0")
            .driver("vfio-pci")
            .iommu_group(3),
    )
    .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert!(r.check("nvswitch").is_none());
    // H100 NVSwitch (10de:22a3), class 0x068000.
    host.add(&FakeFunction::new("0000:05:00.0", 0x10de, 0x22a3, 0x068000).iommu_group(9))
        .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    let c = r.check("nvswitch").unwrap();
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("0000:05:00.0"));
}

#[test]
fn amd_host_with_iommu_and_remapping_passes() {
    let host = FakeHost::new().unwrap();
    host.cpuinfo("AuthenticAMD", "fpu svm lm", 2, 48).unwrap();
    host.cmdline("root=/dev/nvme0n1p2 amd_iommu=on iommu=pt")
        .unwrap();
    host.amd_iommu_unit("ivhd0").unwrap();
    for m in ["vfio", "vfio_pci", "iommufd"] {
        host.module(m).unwrap();
    }
    host.dev_node("kvm").unwrap();
    host.dev_node("vfio/vfio").unwrap();
    host.add(
        &FakeFunction::h100("0000:41:00.0")
            .driver("vfio-pci")
            .iommu_group(40),
    )
    .unwrap();
    // No IR-* chips yet: the unit can remap, so only a warning.
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert_eq!(status(&r, "iommu"), Status::Pass);
    assert_eq!(status(&r, "vfio"), Status::Pass, "{:?}", r.check("vfio"));
    assert_eq!(status(&r, "interrupt-remapping"), Status::Warn);
    host.write("proc/interrupts", " 40: 7 IR-PCI-MSI 1048576-edge ahci\n")
        .unwrap();
    let r = doctor::run(&host.root(), &input()).unwrap();
    assert_eq!(status(&r, "interrupt-remapping"), Status::Pass);
    assert_eq!(status(&r, "hugepages"), Status::Warn);
    assert!(r.ready, "{:#?}", r.checks);
}
