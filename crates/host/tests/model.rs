//! The PCI model read from the real H200 capture and from built trees, including bad input.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use gpucell_host::bar::BarKind;
use gpucell_host::pci::{Driver, PciFunction, PciScan};
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::{Bdf, HostRoot};

fn h200_root() -> HostRoot {
    HostRoot::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hosts/h200x4-vm"),
    )
}

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

#[test]
fn h200_capture_reads_every_function() {
    let scan = PciScan::read(&h200_root()).unwrap();
    assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    assert_eq!(scan.functions.len(), 10);
    let gpus: Vec<&PciFunction> = scan.nvidia_gpus().collect();
    let addrs: Vec<String> = gpus.iter().map(|g| g.bdf.to_string()).collect();
    assert_eq!(
        addrs,
        [
            "0000:00:06.0",
            "0000:00:07.0",
            "0000:00:08.0",
            "0000:00:09.0"
        ]
    );
    let g = gpus[0];
    assert_eq!((g.vendor, g.device, g.class), (0x10de, 0x2335, 0x030200));
    assert_eq!(
        (g.subsystem_vendor, g.subsystem_device, g.revision),
        (Some(0x10de), Some(0x18bf), Some(0xa1))
    );
    assert_eq!(g.driver, Driver::Bound("nvidia".into()));
    assert_eq!(g.driver_override, None);
    assert_eq!(g.iommu_group, None);
    assert_eq!(g.numa_node, None);
    assert_eq!(
        g.local_cpus.as_ref().map(|c| c.to_string()).as_deref(),
        Some("0-63")
    );
    assert_eq!(g.link.speed.as_deref(), Some("32.0 GT/s PCIe"));
    assert_eq!(g.link.width, Some(16));
    assert_eq!(g.link.max_speed.as_deref(), Some("32.0 GT/s PCIe"));
    assert_eq!(g.link.max_width, Some(16));
    assert!(!g.link.is_degraded_width());
    assert_eq!(g.reset_methods.as_deref(), Some(&["flr".to_string()][..]));
    let bar = g.largest_bar().unwrap();
    assert_eq!(
        (bar.index, bar.size, bar.kind),
        (2, 256 << 30, BarKind::Memory)
    );
    assert!(g.warnings.is_empty(), "{:?}", g.warnings);
    // The host bridge has no driver link.
    assert_eq!(
        scan.get(bdf("0000:00:00.0")).unwrap().driver,
        Driver::Unbound
    );
    assert!(!scan.get(bdf("0000:00:00.0")).unwrap().is_bridge());
}

#[test]
fn lookup_of_a_missing_function_names_it() {
    let err = PciFunction::read(&h200_root(), bdf("0000:42:00.0")).unwrap_err();
    assert!(err.to_string().contains("0000:42:00.0"), "{err}");
}

#[test]
fn no_pci_bus_is_an_error_naming_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let err = PciScan::read(&HostRoot::new(dir.path())).unwrap_err();
    assert!(err.to_string().contains("sys/bus/pci/devices"), "{err}");
}

#[test]
fn built_tree_has_kernel_links() {
    let host = FakeHost::new().unwrap();
    host.add(&FakeFunction::root_port("0000:00:01.0").iommu_group(1))
        .unwrap();
    host.add(
        &FakeFunction::rtx4090("0000:01:00.0")
            .behind("0000:00:01.0")
            .driver("nvidia")
            .iommu_group(12)
            .numa_node(1),
    )
    .unwrap();
    let link = std::fs::read_link(host.join("sys/bus/pci/devices/0000:01:00.0")).unwrap();
    assert_eq!(
        link,
        PathBuf::from("../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0")
    );
    let dir = host.join("sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0");
    // Links resolve for real.
    assert!(dir
        .join("driver")
        .canonicalize()
        .unwrap()
        .ends_with("sys/bus/pci/drivers/nvidia"));
    assert!(dir
        .join("iommu_group")
        .canonicalize()
        .unwrap()
        .ends_with("sys/kernel/iommu_groups/12"));
    let back = host
        .join("sys/bus/pci/drivers/nvidia/0000:01:00.0")
        .canonicalize()
        .unwrap();
    assert_eq!(back, dir.canonicalize().unwrap());
    let member = host
        .join("sys/kernel/iommu_groups/12/devices/0000:01:00.0")
        .canonicalize()
        .unwrap();
    assert_eq!(member, dir.canonicalize().unwrap());

    let f = PciFunction::read(&host.root(), bdf("0000:01:00.0")).unwrap();
    assert_eq!(f.driver.name(), Some("nvidia"));
    assert_eq!(f.iommu_group, Some(12));
    assert_eq!(f.numa_node, Some(1));
    assert_eq!(f.largest_bar().unwrap().size, 32 << 30);
    assert!(PciFunction::read(&host.root(), bdf("0000:00:01.0"))
        .unwrap()
        .is_bridge());

    host.write(
        "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/current_link_width",
        "8\n",
    )
    .unwrap();
    let f = PciFunction::read(&host.root(), bdf("0000:01:00.0")).unwrap();
    assert_eq!((f.link.width, f.link.max_width), (Some(8), Some(16)));
    assert!(f.link.is_degraded_width());

    host.bind(bdf("0000:01:00.0"), "vfio-pci").unwrap();
    assert!(!host
        .join("sys/bus/pci/drivers/nvidia/0000:01:00.0")
        .exists());
    let f = PciFunction::read(&host.root(), bdf("0000:01:00.0")).unwrap();
    assert!(f.driver.is_vfio());
}

fn one_gpu() -> (FakeHost, Bdf) {
    let host = FakeHost::new().unwrap();
    host.add(
        &FakeFunction::rtx4090("0000:01:00.0")
            .driver("nvidia")
            .iommu_group(12),
    )
    .unwrap();
    (host, bdf("0000:01:00.0"))
}

const DIR: &str = "sys/devices/pci0000:01/0000:01:00.0";

#[test]
fn missing_or_garbled_identity_is_an_error_naming_the_file() {
    for (file, content) in [
        ("vendor", None),
        ("device", Some(&b"\n"[..])),
        ("class", Some(&b"0xnope\n"[..])),
        ("vendor", Some(&[0xff, 0xfe][..])),
        ("vendor", Some(&b"0x10000\n"[..])),
    ] {
        let (host, b) = one_gpu();
        match content {
            None => host.remove(&format!("{DIR}/{file}")).unwrap(),
            Some(c) => host.write(&format!("{DIR}/{file}"), c).unwrap(),
        }
        let err = PciFunction::read(&host.root(), b).unwrap_err();
        let chain = gpucell_common::chain_string(&err);
        assert!(
            chain.contains(&format!("0000:01:00.0/{file}")),
            "{file}: {chain}"
        );
        // A scan skips the function and reports it.
        let scan = PciScan::read(&host.root()).unwrap();
        assert!(scan.functions.is_empty());
        assert_eq!(scan.problems.len(), 1);
    }
}

#[test]
fn bad_optional_attributes_become_unknown_with_a_warning() {
    let (host, b) = one_gpu();
    host.write(&format!("{DIR}/numa_node"), "banana\n").unwrap();
    host.write(&format!("{DIR}/revision"), "").unwrap();
    host.write(&format!("{DIR}/resource"), "0x1 0x0 0x200\n")
        .unwrap();
    host.write(&format!("{DIR}/local_cpulist"), [0xc3, 0x28])
        .unwrap();
    host.write(&format!("{DIR}/current_link_width"), "-3\n")
        .unwrap();
    host.remove(&format!("{DIR}/reset_method")).unwrap();
    // iommu_group pointing at something that is not a group number.
    host.symlink(
        &format!("{DIR}/iommu_group"),
        "../../../kernel/iommu_groups/x",
    )
    .unwrap();
    let f = PciFunction::read(&host.root(), b).unwrap();
    assert_eq!(f.numa_node, None);
    assert_eq!(f.revision, None);
    assert_eq!(f.bars, None);
    assert_eq!(f.local_cpus, None);
    assert_eq!(f.link.width, None);
    assert_eq!(f.reset_methods, None);
    assert_eq!(f.iommu_group, None);
    let w = f.warnings.join("\n");
    for file in [
        "numa_node",
        "revision",
        "resource",
        "local_cpulist",
        "current_link_width",
        "iommu_group",
    ] {
        assert!(
            w.contains(&format!("0000:01:00.0/{file}")),
            "no warning for {file}: {w}"
        );
    }
}

#[test]
fn dangling_driver_link_still_names_the_driver() {
    let (host, b) = one_gpu();
    host.symlink(&format!("{DIR}/driver"), "../../../bus/pci/drivers/gone")
        .unwrap();
    let f = PciFunction::read(&host.root(), b).unwrap();
    assert_eq!(f.driver, Driver::Bound("gone".into()));
}

#[test]
fn driver_link_that_is_not_a_link_is_unknown() {
    let (host, b) = one_gpu();
    host.remove(&format!("{DIR}/driver")).unwrap();
    host.mkdir(&format!("{DIR}/driver")).unwrap();
    let f = PciFunction::read(&host.root(), b).unwrap();
    assert_eq!(f.driver, Driver::Unknown);
    assert!(
        f.warnings.iter().any(|w| w.contains("0000:01:00.0/driver")),
        "{:?}",
        f.warnings
    );
}

#[test]
fn non_address_entries_are_reported_not_fatal() {
    let (host, _) = one_gpu();
    host.mkdir("sys/bus/pci/devices/not-a-bdf").unwrap();
    let scan = PciScan::read(&host.root()).unwrap();
    assert_eq!(scan.functions.len(), 1);
    assert_eq!(scan.problems.len(), 1);
    assert!(scan.problems[0].to_string().contains("not-a-bdf"));
}
