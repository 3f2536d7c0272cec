//! Device allocation on fake host trees: exclusivity, NUMA preference, refusals, reset
//! write sequences, quarantine and release (owners: devices_owners.rs).
#![allow(clippy::unwrap_used)]

mod devices_common;

use devices_common::*;
use gpucell_host::bind::SimulatedKernel;
use gpucell_host::devices::{
    self, Availability, Cleaned, DevicePool, DevicesError, ReleaseOutcome, ResetPolicy,
};
use gpucell_host::pci::PciFunction;
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::HostRoot;

#[test]
fn two_allocations_never_overlap() {
    let host = h100_host(&[(0x10, 0), (0x11, 0), (0x12, 1), (0x13, 1)]);
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let pool = pool(&host, state.path());
    let a = pool
        .allocate("a", &req(Some("2"), &[]), kernel.boxed())
        .unwrap();
    let b = pool
        .allocate("b", &req(Some("2"), &[]), kernel.boxed())
        .unwrap();
    let (ab, bb) = (a.bdfs(), b.bdfs());
    assert_eq!(ab.len(), 2);
    assert_eq!(bb.len(), 2);
    assert!(ab.iter().all(|x| !bb.contains(x)), "{ab:?} vs {bb:?}");
    // Each got one NUMA node.
    for alloc in [&a, &b] {
        let nodes: Vec<_> = alloc.devices().iter().map(|d| d.numa_node).collect();
        assert_eq!(nodes[0], nodes[1], "{nodes:?}");
    }
    // Nothing left: a third sandbox is refused, also for a named busy GPU.
    let err = pool
        .allocate("c", &req(Some("1"), &[]), kernel.boxed())
        .unwrap_err();
    assert!(
        matches!(err, DevicesError::Unavailable { free: 0, .. }),
        "{err}"
    );
    let err = pool
        .allocate("c", &req(Some(&ab[0].to_string()), &[]), kernel.boxed())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "{} is busy (sandbox a, pid {})",
            ab[0],
            std::process::id()
        )),
        "{err}"
    );
    // The records name both sandboxes.
    let recs = devices::allocations(state.path()).unwrap();
    assert_eq!(recs.len(), 4);
    assert_eq!(recs.iter().filter(|r| r.sandbox == "a").count(), 2);
    // No sysfs write was needed: everything was on vfio-pci.
    assert!(kernel.log().is_empty(), "{:?}", kernel.log());
    a.release().unwrap();
    let c = pool
        .allocate("c", &req(Some("2"), &[]), kernel.boxed())
        .unwrap();
    assert_eq!(c.bdfs(), ab);
    drop((b, c));
    assert!(devices::allocations(state.path()).unwrap().is_empty());
}

#[test]
fn assigned_devices_carry_what_the_vm_needs() {
    let host = h100_host(&[(0x10, 1)]);
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let alloc = pool(&host, state.path())
        .allocate("s1", &req(Some("all"), &[]), kernel.boxed())
        .unwrap();
    let d = &alloc.devices()[0];
    assert_eq!(d.bdf, bdf("0000:10:00.0"));
    assert_eq!(d.id_string(), "10de:2330");
    assert_eq!(d.class, 0x030200);
    assert_eq!(d.numa_node, Some(1));
    assert_eq!(d.local_cpus.as_ref().unwrap().to_string(), "16-31");
    assert_eq!(d.iommu_group, 0x10);
    assert_eq!(d.vfio_group, host.root().dev("vfio/16"));
    assert_eq!(d.reset_methods, vec!["flr".to_string()]);
    assert_eq!(d.largest_bar(), 128 << 30);
    assert_eq!(d.mmio64_bytes(), (16 << 20) + (128 << 30) + (32 << 20));
    assert_eq!(alloc.mmio64_bytes(), d.mmio64_bytes());
    assert!(d.companions.is_empty());
    assert_eq!(alloc.sandbox_id(), "s1");
}

#[test]
fn numa_preference_takes_the_tightest_node_that_fits() {
    let host = h100_host(&[(0x10, 0), (0x11, 0), (0x20, 1), (0x21, 1), (0x22, 1)]);
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let pool = pool(&host, state.path());
    let two = pool
        .allocate("two", &req(Some("2"), &[]), kernel.boxed())
        .unwrap();
    assert_eq!(two.bdfs(), vec![bdf("0000:10:00.0"), bdf("0000:11:00.0")]);
    let three = pool
        .allocate("three", &req(Some("3"), &[]), kernel.boxed())
        .unwrap();
    assert!(three.devices().iter().all(|d| d.numa_node == Some(1)));
    drop((two, three));
    // Four span two nodes: the larger node whole, then the other.
    let four = pool
        .allocate("four", &req(Some("4"), &[]), kernel.boxed())
        .unwrap();
    let nodes: Vec<_> = four
        .devices()
        .iter()
        .map(|d| d.numa_node.unwrap())
        .collect();
    assert_eq!(nodes.iter().filter(|n| **n == 1).count(), 3, "{nodes:?}");
}

#[test]
fn refusal_names_every_device_and_why() {
    let host = h100_host(&[(0x10, 0), (0x11, 0)]);
    // A GPU on the nvidia driver: not taken by count.
    host.add(
        &FakeFunction::h100("0000:12:00.0")
            .driver("nvidia")
            .iommu_group(0x12),
    )
    .unwrap();
    // A GPU without IOMMU group.
    host.add(&FakeFunction::h100("0000:13:00.0").driver("vfio-pci"))
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    kernel.fail_reset(bdf("0000:11:00.0"));
    let pool = pool(&host, state.path());
    // 11 gets quarantined: allocated, then its reset fails on release.
    let q = pool
        .allocate("q", &req(Some("0000:11:00.0"), &[]), kernel.boxed())
        .unwrap();
    let report = q.release().unwrap();
    assert_eq!(report.quarantined.len(), 1);
    let busy = pool
        .allocate("busy", &req(Some("1"), &[]), kernel.boxed())
        .unwrap();
    assert_eq!(busy.bdfs(), vec![bdf("0000:10:00.0")]);
    let err = pool
        .allocate("want2", &req(Some("2"), &[]), kernel.boxed())
        .unwrap_err();
    let DevicesError::Unavailable { free, refusals, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(*free, 0);
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.starts_with("cannot give 2 GPUs: 0 free; "), "{msg}");
    assert!(msg.contains("0000:10:00.0 is busy (sandbox busy"), "{msg}");
    assert!(msg.contains("0000:11:00.0 is quarantined since"), "{msg}");
    assert!(msg.contains("reset failed"), "{msg}");
    assert!(msg.contains("`gpucell gpu release 0000:11:00.0`"), "{msg}");
    assert!(
        msg.contains("0000:12:00.0 is not viable: it is on driver nvidia"),
        "{msg}"
    );
    assert!(
        msg.contains("0000:13:00.0 is not viable: it has no IOMMU group"),
        "{msg}"
    );
    assert_eq!(refusals.len(), 4);
    assert!(matches!(
        refusals[1].availability,
        Availability::Quarantined { .. }
    ));
    // Nothing was recorded for the refused sandbox.
    let recs = devices::allocations(state.path()).unwrap();
    assert!(recs.iter().all(|r| r.sandbox != "want2"));
}

#[test]
fn release_resets_with_one_write_each_and_returns_to_the_pool() {
    let host = h100_host(&[(0x10, 0), (0x11, 0)]);
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let pool = pool(&host, state.path());
    let a = pool
        .allocate("a", &req(Some("2"), &[]), kernel.boxed())
        .unwrap();
    assert!(kernel.log().is_empty());
    let report = a.release().unwrap();
    assert_eq!(
        kernel.log(),
        vec![reset_write("0000:10:00.0"), reset_write("0000:11:00.0")]
    );
    assert_eq!(report.returned.len(), 2);
    assert_eq!(
        report.returned[0].1,
        Cleaned::Reset {
            methods: vec!["flr".into()]
        }
    );
    assert!(report.quarantined.is_empty());
    assert!(devices::allocations(state.path()).unwrap().is_empty());
    assert!(devices::quarantined(state.path()).unwrap().is_empty());
    // A guard dropped without release resets too.
    kernel.clear();
    drop(
        pool.allocate("b", &req(Some("1"), &[]), kernel.boxed())
            .unwrap(),
    );
    assert_eq!(kernel.log(), vec![reset_write("0000:10:00.0")]);
    assert!(devices::allocations(state.path()).unwrap().is_empty());
}

#[test]
fn failed_check_quarantines_until_release() {
    let host = h100_host(&[(0x10, 0)]);
    let gpu = bdf("0000:10:00.0");
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    kernel.dies_on_reset(gpu);
    let pool = pool(&host, state.path());
    let a = pool
        .allocate("a", &req(Some("1"), &[]), kernel.boxed())
        .unwrap();
    let report = a.release().unwrap();
    assert_eq!(kernel.log(), vec![reset_write("0000:10:00.0")]);
    assert!(report.returned.is_empty());
    let q = &report.quarantined[0];
    assert_eq!(q.bdf, gpu);
    assert!(
        q.reason.contains("does not answer") && q.reason.contains("ffff:ffff"),
        "{}",
        q.reason
    );
    assert_eq!(q.sandbox.as_deref(), Some("a"));
    assert_eq!(
        devices::quarantined(state.path()).unwrap(),
        report.quarantined
    );
    // Refused, by count and by name.
    let err = pool
        .allocate("b", &req(Some("1"), &[]), kernel.boxed())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("quarantined") && err.contains("gpucell gpu release 0000:10:00.0"),
        "{err}"
    );
    let err = pool
        .allocate("b", &req(None, &["0000:10:00.0"]), kernel.boxed())
        .unwrap_err();
    assert!(matches!(err, DevicesError::Unavailable { .. }), "{err}");
    // Release checks the config space: still ffff, so refused without --force.
    let mut k = kernel.clone();
    let err = pool.release_device(gpu, false, &mut k).unwrap_err();
    assert!(matches!(err, DevicesError::StillFailing { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(devices::quarantined(state.path()).unwrap().len(), 1);
    // Fixed (the operator reset it): released, allocatable again.
    write_config(&host, gpu, 0x10de, 0x2330);
    let out = pool.release_device(gpu, false, &mut k).unwrap();
    assert_eq!(
        out,
        ReleaseOutcome::Unquarantined {
            bdf: gpu,
            forced: false
        }
    );
    assert!(devices::quarantined(state.path()).unwrap().is_empty());
    let again = pool
        .allocate("c", &req(Some("1"), &[]), kernel.boxed())
        .unwrap();
    assert_eq!(again.bdfs(), vec![gpu]);
    // Releasing a held device is refused, naming its sandbox; an idle one is a no-op.
    let err = pool
        .release_device(gpu, false, &mut k)
        .unwrap_err()
        .to_string();
    assert!(err.contains("in use by sandbox c"), "{err}");
    std::mem::forget(again);
    let other = bdf("0000:99:00.0");
    assert_eq!(
        pool.release_device(other, false, &mut k).unwrap(),
        ReleaseOutcome::NotHeld { bdf: other }
    );
}

#[test]
fn forced_release_skips_the_check() {
    let host = h100_host(&[(0x10, 0)]);
    let gpu = bdf("0000:10:00.0");
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    kernel.fail_reset(gpu);
    let pool = pool(&host, state.path());
    pool.allocate("a", &req(Some("1"), &[]), kernel.boxed())
        .unwrap()
        .release()
        .unwrap();
    std::fs::remove_file(host.root().pci_device(&gpu).join("config")).unwrap();
    let mut k = kernel.clone();
    assert!(pool.release_device(gpu, false, &mut k).is_err());
    assert_eq!(
        pool.release_device(gpu, true, &mut k).unwrap(),
        ReleaseOutcome::Unquarantined {
            bdf: gpu,
            forced: true
        }
    );
}

fn edu_host() -> FakeHost {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.mkdir("sys/bus/pci/drivers/vfio-pci").unwrap();
    add(
        &host,
        FakeFunction::new("0000:00:04.0", 0x1234, 0x11e8, 0x00ff00)
            .driver("vfio-pci")
            .iommu_group(3)
            .bar(0, 1 << 20, gpucell_host::testing::BAR_MEM32),
    );
    host
}

#[test]
fn no_reset_method_quarantines_unless_the_policy_allows_it() {
    let host = edu_host();
    let edu = bdf("0000:00:04.0");
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let strict = pool(&host, state.path());
    // `--gpus 1` finds no GPU on this host; the edu device is named with --device.
    let err = strict
        .allocate("g", &req(Some("1"), &[]), kernel.boxed())
        .unwrap_err();
    assert!(
        matches!(err, DevicesError::Unavailable { free: 0, .. }),
        "{err}"
    );
    let a = strict
        .allocate("a", &req(None, &["0000:00:04.0"]), kernel.boxed())
        .unwrap();
    assert!(a.devices()[0].reset_methods.is_empty());
    let report = a.release().unwrap();
    assert!(
        kernel.log().is_empty(),
        "no reset to write: {:?}",
        kernel.log()
    );
    let reason = &report.quarantined[0].reason;
    assert!(
        reason.contains("no reset method")
            && reason.contains("1234:11e8")
            && reason.contains("policy.toml"),
        "{reason}"
    );
    let mut k = kernel.clone();
    strict.release_device(edu, false, &mut k).unwrap();
    // policy.toml lists it: checked only, returned.
    std::fs::write(
        state.path().join("devices/policy.toml"),
        "allow_no_reset = [\"1234:11e8\"]\n",
    )
    .unwrap();
    let report = strict
        .allocate("b", &req(None, &["0000:00:04.0"]), kernel.boxed())
        .unwrap()
        .release()
        .unwrap();
    assert_eq!(report.returned, vec![(edu, Cleaned::CheckedOnly)]);
    // The same through the API.
    let api = DevicePool::new(host.root(), state.path())
        .with_process_root(HostRoot::new("/"))
        .with_policy(ResetPolicy {
            allow_no_reset: vec![(0x1234, 0x11e8)],
        });
    let report = api
        .allocate("c", &req(None, &["0000:00:04.0"]), kernel.boxed())
        .unwrap()
        .release()
        .unwrap();
    assert!(report.quarantined.is_empty());
    assert!(kernel.log().is_empty());
}

#[test]
fn an_unbound_named_device_is_bound_before_it_is_passed() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.mkdir("sys/bus/pci/drivers/vfio-pci").unwrap();
    // No driver at all: the group is viable, but only vfio-pci makes /dev/vfio/N.
    add(
        &host,
        FakeFunction::new("0000:00:05.0", 0x1234, 0x11e8, 0x00ff00)
            .iommu_group(4)
            .bar(0, 1 << 20, gpucell_host::testing::BAR_MEM32),
    );
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let a = pool(&host, state.path())
        .allocate("u", &req(None, &["0000:00:05.0"]), kernel.boxed())
        .unwrap();
    let log = format!("{:?}", kernel.log());
    assert!(
        log.contains("0000:00:05.0/driver_override") && log.contains("drivers_probe"),
        "the unbound function must go to vfio-pci: {log}"
    );
    let f = PciFunction::read(&host.root(), bdf("0000:00:05.0")).unwrap();
    assert!(f.driver.is_vfio(), "{:?}", f.driver);
    // The binding is timed on its own (a phase of `gpucell run --json`).
    assert!(a.bind_time() > std::time::Duration::ZERO);
    drop(a);
    // Already on vfio-pci: nothing to bind, no bind time. (A fresh state directory:
    // without a reset method the function was quarantined on release above.)
    let state = tempfile::tempdir().unwrap();
    let a = pool(&host, state.path())
        .allocate("v", &req(None, &["0000:00:05.0"]), kernel.boxed())
        .unwrap();
    assert_eq!(a.bind_time(), std::time::Duration::ZERO);
    drop(a);
}

#[test]
fn named_devices_are_bound_with_their_group_and_companions_not_passed() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.mkdir("sys/bus/pci/drivers/vfio-pci").unwrap();
    add(
        &host,
        FakeFunction::rtx4090("0000:01:00.0")
            .driver("nvidia")
            .iommu_group(12),
    );
    add(
        &host,
        FakeFunction::rtx4090_audio("0000:01:00.1")
            .driver("snd_hda_intel")
            .iommu_group(12),
    );
    // A second card already on vfio-pci, its audio still on snd_hda_intel.
    add(
        &host,
        FakeFunction::rtx4090("0000:02:00.0")
            .driver("vfio-pci")
            .iommu_group(13),
    );
    add(
        &host,
        FakeFunction::rtx4090_audio("0000:02:00.1")
            .driver("snd_hda_intel")
            .iommu_group(13),
    );
    let state = tempfile::tempdir().unwrap();
    let sim = SimulatedKernel::new(host.root())
        .native_driver(bdf("0000:01:00.0"), "nvidia")
        .native_driver(bdf("0000:01:00.1"), "snd_hda_intel")
        .create_vfio_nodes();
    let kernel = Kernel::with_sim(&host, sim);
    let pool = pool(&host, state.path());
    // By count only the card already on vfio-pci is taken; its audio gets bound.
    let one = pool
        .allocate("one", &req(Some("1"), &[]), kernel.boxed())
        .unwrap();
    assert_eq!(one.bdfs(), vec![bdf("0000:02:00.0")]);
    assert_eq!(one.devices()[0].companions, vec![bdf("0000:02:00.1")]);
    let d = |s: &str| {
        (
            format!("sys/bus/pci/devices/{s}/driver_override"),
            "vfio-pci".to_string(),
        )
    };
    // The GPU is on vfio-pci without override (gets one, so a reprobe keeps it there);
    // its audio is moved.
    assert_eq!(
        kernel.log(),
        vec![
            d("0000:02:00.0"),
            d("0000:02:00.1"),
            (
                "sys/bus/pci/devices/0000:02:00.1/driver/unbind".into(),
                "0000:02:00.1".into()
            ),
            ("sys/bus/pci/drivers_probe".into(), "0000:02:00.1".into()),
        ]
    );
    let err = pool
        .allocate("two", &req(Some("1"), &[]), kernel.boxed())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0000:01:00.0 is not viable: it is on driver nvidia"),
        "{err}"
    );
    // Named, the first card is taken from nvidia with its audio.
    kernel.clear();
    let named = pool
        .allocate("two", &req(Some("0000:01:00.0"), &[]), kernel.boxed())
        .unwrap();
    assert_eq!(named.bdfs(), vec![bdf("0000:01:00.0")]);
    assert_eq!(named.devices()[0].companions, vec![bdf("0000:01:00.1")]);
    assert_eq!(kernel.log().len(), 6, "{:?}", kernel.log());
    let root = host.root();
    for b in ["0000:01:00.0", "0000:01:00.1"] {
        assert!(
            PciFunction::read(&root, bdf(b)).unwrap().driver.is_vfio(),
            "{b}"
        );
    }
    // Bind records exist so `gpucell gpu unbind` can undo.
    assert_eq!(
        gpucell_host::bind::record::recorded(state.path())
            .unwrap()
            .len(),
        4
    );
    // Release resets only the passed functions.
    kernel.clear();
    named.release().unwrap();
    assert_eq!(kernel.log(), vec![reset_write("0000:01:00.0")]);
    drop(one);
}

#[test]
fn bad_requests_and_records_are_clear_errors() {
    let host = h100_host(&[(0x10, 0)]);
    add(
        &host,
        FakeFunction::nvme("0000:05:00.0")
            .driver("vfio-pci")
            .iommu_group(5),
    );
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let pool = pool(&host, state.path());
    let err = pool
        .allocate("a", &req(Some("0000:05:00.0"), &[]), kernel.boxed())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not an NVIDIA GPU") && err.contains("--device 0000:05:00.0"),
        "{err}"
    );
    let err = pool
        .allocate("a", &req(None, &["0000:77:00.0"]), kernel.boxed())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no PCI function 0000:77:00.0"), "{err}");
    let err = pool
        .allocate("../x", &req(Some("1"), &[]), kernel.boxed())
        .unwrap_err()
        .to_string();
    assert!(err.contains("sandbox id"), "{err}");
    let a = pool
        .allocate("a", &req(Some("1"), &[]), kernel.boxed())
        .unwrap();
    let err = pool
        .allocate("a", &req(None, &["0000:05:00.0"]), kernel.boxed())
        .unwrap_err();
    assert!(matches!(err, DevicesError::SandboxExists { .. }), "{err}");
    std::mem::forget(a);
    // A damaged record stops allocation (fail closed), naming the file.
    std::fs::write(
        state.path().join("devices/allocations.json"),
        "{\"version\":1,",
    )
    .unwrap();
    let err = pool
        .allocate("b", &req(None, &["0000:05:00.0"]), kernel.boxed())
        .unwrap_err()
        .to_string();
    assert!(err.contains("allocations.json is damaged"), "{err}");
    // An empty request allocates nothing.
    std::fs::remove_file(state.path().join("devices/allocations.json")).unwrap();
    let none = pool.allocate("c", &req(None, &[]), kernel.boxed()).unwrap();
    assert!(none.devices().is_empty());
    assert!(devices::allocations(state.path()).unwrap().is_empty());
}

#[test]
fn allocate_waiting_retries_until_a_device_is_released() {
    let host = h100_host(&[(0x10, 0)]);
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let pool = pool(&host, state.path());
    let held = pool
        .allocate("first", &req(Some("1"), &[]), kernel.boxed())
        .unwrap();
    // Without waiting: refused at once.
    let t = std::time::Instant::now();
    let err = pool
        .allocate_waiting(
            "second",
            &req(Some("1"), &[]),
            kernel.boxed(),
            std::time::Duration::ZERO,
        )
        .unwrap_err();
    assert!(matches!(err, DevicesError::Unavailable { .. }), "{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(400));
        held.release().unwrap();
    });
    let got = pool
        .allocate_waiting(
            "second",
            &req(Some("1"), &[]),
            kernel.boxed(),
            std::time::Duration::from_secs(20),
        )
        .unwrap();
    assert_eq!(got.bdfs(), vec![bdf("0000:10:00.0")]);
    releaser.join().unwrap();
}

#[test]
fn config_check_reads_real_config_space() {
    // Read-only: every PCI function of this machine must answer with the ids sysfs shows.
    let root = HostRoot::new("/");
    let Ok(scan) = gpucell_host::pci::PciScan::read(&root) else {
        eprintln!("skipped: no PCI bus in /sys on this machine");
        return;
    };
    if scan.functions.is_empty() {
        eprintln!("skipped: no PCI function in /sys on this machine");
        return;
    }
    for f in &scan.functions {
        devices::reset::check_config(&root, f.bdf, (f.vendor, f.device))
            .unwrap_or_else(|e| panic!("{}: {e}", f.bdf));
        let wrong = (f.vendor, f.device.wrapping_add(1));
        let err = devices::reset::check_config(&root, f.bdf, wrong).unwrap_err();
        assert!(
            matches!(err, devices::ResetError::IdentityChanged { .. }),
            "{}: {err}",
            f.bdf
        );
    }
}

#[test]
fn a_group_the_host_uses_is_not_viable_and_nothing_is_written() {
    // The GPU is on vfio-pci, but an NVMe disk the host uses shares its group.
    let host = h100_host(&[(0x10, 0)]);
    add(
        &host,
        FakeFunction::nvme("0000:10:00.1")
            .driver("nvme")
            .iommu_group(0x10),
    );
    let nvme_dir = host.function_rel_dir(bdf("0000:10:00.1"));
    host.mkdir(&format!("{nvme_dir}/nvme/nvme0/nvme0n1"))
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let pool = pool(&host, state.path());
    for r in [req(Some("1"), &[]), req(Some("0000:10:00.0"), &[])] {
        let err = pool
            .allocate("s", &r, kernel.boxed())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("0000:10:00.0 is not viable: its IOMMU group cannot go to vfio-pci")
                && err.contains("0000:10:00.1"),
            "{err}"
        );
    }
    assert!(kernel.log().is_empty(), "{:?}", kernel.log());
    assert!(devices::allocations(state.path()).unwrap().is_empty());
}
