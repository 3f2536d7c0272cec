//! Golden tests of the passthrough part of QEMU command lines: devices allocated on a
//! fake RTX 4090 host, the four H200s of `tests/fixtures/hosts/h200x4-vm` read with
//! gpucell-host's model, and the memory backends. Regenerate with
//! `GPUCELL_UPDATE_GOLDEN=1 cargo test -p gpucell-sandbox --test golden_devices`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use gpucell_host::bind::SimulatedKernel;
use gpucell_host::devices::{AssignedDevice, DevicePool, DeviceRequest};
use gpucell_host::pci::PciScan;
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::HostRoot;
use gpucell_sandbox::args::{Accel, QemuCommand};
use gpucell_sandbox::command::{qemu_command, CommandInput};
use gpucell_sandbox::devices::{self, DeviceSetup, PassthroughDevice};

const GIB: u64 = 1 << 30;

fn check(name: &str, cmd: &QemuCommand) {
    let rendered = cmd.args().join("\n") + "\n";
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/{name}.args"));
    if std::env::var_os("GPUCELL_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &rendered).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with GPUCELL_UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(rendered, want, "{name}: differs from {}", path.display());
}

/// A host root with `cpuinfo` reporting `phys_bits` address bits and a hugetlbfs of
/// 2 MiB pages at /dev/hugepages with `free` pages.
fn host_root(phys_bits: u32, free: u64) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let w = |rel: &str, text: String| {
        let p = d.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    w(
        "proc/cpuinfo",
        format!("processor\t: 0\naddress sizes\t: {phys_bits} bits physical, 48 bits virtual\n"),
    );
    w(
        "proc/self/mounts",
        "hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n".into(),
    );
    w("proc/meminfo", "Hugepagesize:       2048 kB\n".into());
    w(
        "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
        format!("{free}\n"),
    );
    d
}

fn setup(passed: Vec<PassthroughDevice>, hugepages: bool) -> DeviceSetup {
    DeviceSetup {
        devices: passed,
        hugepages,
        memory: Default::default(),
        pin_cpus: false,
        wait: std::time::Duration::from_secs(10),
    }
}

/// The command the sandbox builds, reduced to the parts devices change, from the same
/// [`devices::plan`] and [`qemu_command`] the sandbox uses.
fn command(accel: Accel, memory_mib: u64, setup: &DeviceSetup, root: &Path) -> QemuCommand {
    let mut input = CommandInput::bare(
        "/usr/bin/qemu-system-x86_64".into(),
        "gpucell-0123456789abcdef".into(),
        accel,
        "/var/lib/gpucell/guest/default/vmlinux".into(),
        "/var/lib/gpucell/guest/default/initramfs.cpio.gz".into(),
    );
    input.cpus = 4;
    input.memory_mib = memory_mib;
    input.base_cmdline = vec!["console=ttyS0".into()];
    input.console = false;
    input.devices = devices::plan(setup, accel, 4, memory_mib, root).unwrap();
    qemu_command(&input).unwrap()
}

fn count(args: &[String], prefix: &str) -> usize {
    args.iter().filter(|a| a.starts_with(prefix)).count()
}

#[test]
fn rtx4090_with_audio_companion_passes_only_the_gpu() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.mkdir("sys/bus/pci/drivers/vfio-pci").unwrap();
    for f in [
        FakeFunction::rtx4090("0000:01:00.0"),
        FakeFunction::rtx4090_audio("0000:01:00.1"),
    ] {
        let f = f
            .driver("vfio-pci")
            .driver_override("vfio-pci")
            .iommu_group(1)
            .numa_node(0)
            .local_cpulist("0-3");
        host.add(&f).unwrap();
    }
    host.dev_node("vfio/1").unwrap();
    let state = tempfile::tempdir().unwrap();
    let pool = DevicePool::new(host.root(), state.path()).with_process_root(HostRoot::new("/"));
    let req = DeviceRequest::parse(Some("all"), &[] as &[&str]).unwrap();
    let alloc = pool
        .allocate(
            "golden",
            &req,
            Box::new(SimulatedKernel::new(host.root()).create_vfio_nodes()),
        )
        .unwrap();
    let passed: Vec<PassthroughDevice> = alloc.devices().iter().map(Into::into).collect();
    assert_eq!(passed.len(), 1, "{passed:?}");
    assert_eq!(passed[0].host_bdf, "0000:01:00.0");
    assert_eq!(passed[0].companions, vec!["0000:01:00.1".to_string()]);
    assert_eq!(passed[0].local_cpus, vec![0, 1, 2, 3]);
    let root = host_root(46, 0);
    let cmd = command(Accel::Kvm, 8192, &setup(passed.clone(), false), root.path());
    let args = cmd.args();
    assert_eq!(count(&args, "vfio-pci,"), 1);
    assert!(!args.iter().any(|a| a.contains("01:00.1")), "{args:?}");
    // 32 GiB + 32 MiB of 64-bit BARs round up to 64 GiB.
    assert_eq!(devices::hole64_size(&passed), Some(160 * GIB));
    check("rtx4090-passthrough", &cmd);
    drop(alloc);
}

/// The H200s of the capture as the allocator would hand them out.
fn h200s() -> Vec<PassthroughDevice> {
    let root = HostRoot::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hosts/h200x4-vm"),
    );
    let scan = PciScan::read(&root).unwrap();
    scan.nvidia_gpus()
        .map(|f| {
            let d = AssignedDevice {
                bdf: f.bdf,
                vendor: f.vendor,
                device: f.device,
                class: f.class,
                bars: f.bars.clone().unwrap_or_default(),
                numa_node: f.numa_node,
                local_cpus: f.local_cpus.clone(),
                iommu_group: f.iommu_group.unwrap_or(0),
                vfio_group: PathBuf::from("/dev/vfio/0"),
                companions: vec![],
                reset_methods: vec![],
            };
            PassthroughDevice::from(&d)
        })
        .collect()
}

#[test]
fn h200x4_gets_four_root_ports_and_a_hole_for_four_256_gib_bars() {
    let passed = h200s();
    assert_eq!(passed.len(), 4, "{passed:?}");
    for d in &passed {
        assert!(d.mmio64_bytes >= 256 * GIB, "{d:?}");
    }
    let hole = devices::hole64_size(&passed).unwrap();
    assert!(hole >= 4 * 256 * GIB, "hole {hole}");
    // Each device's 256 GiB + 48 MiB rounds to 512 GiB: 4 x 512 + 512 + 32 GiB.
    assert_eq!(hole, (4 * 512 + 512 + 32) * GIB);
    let bits = devices::required_phys_bits(65536, hole);
    assert!(bits > devices::DEFAULT_PHYS_BITS);
    assert!(devices::phys_bits_warning(bits, hole)
        .unwrap()
        .contains("beyond 1 TiB"));
    let root = host_root(46, 0);
    let cmd = command(
        Accel::Kvm,
        65536,
        &setup(passed.clone(), false),
        root.path(),
    );
    let args = cmd.args();
    assert_eq!(count(&args, "pcie-root-port,"), 4);
    assert_eq!(count(&args, "vfio-pci,"), 4);
    assert!(args.contains(&format!("q35-pcihost.pci-hole64-size={hole}")));
    assert!(args.contains(&"host,host-phys-bits=on".to_string()));
    check("h200x4-passthrough", &cmd);
    // Under TCG the CPU model says the bits itself.
    let tcg = command(
        Accel::Tcg,
        65536,
        &setup(passed.clone(), false),
        root.path(),
    );
    assert!(tcg.args().contains(&format!("max,phys-bits={bits}")));
    // A host CPU with 39 address bits (many desktop CPUs) cannot hold that hole under
    // KVM: refused before anything starts, naming both numbers.
    let small = host_root(39, 0);
    let err = devices::plan(&setup(passed, false), Accel::Kvm, 4, 65536, small.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("needs {bits} physical address bits")),
        "{err}"
    );
    assert!(err.contains("has 39"), "{err}");
}

/// QEMU's `edu` (1234:11e8): a generic PCI function with one 1 MiB 32-bit BAR, as the
/// nested test host passes with `--device`.
fn edu() -> PassthroughDevice {
    PassthroughDevice {
        host_bdf: "0000:00:05.0".into(),
        vendor: 0x1234,
        device: 0x11e8,
        class: 0x00ff00,
        mmio64_bytes: 0,
        numa_node: None,
        local_cpus: vec![],
        companions: vec![],
    }
}

#[test]
fn memory_backends() {
    // Hugepages without a device: no hole, no PCI kernel words.
    let root = host_root(46, 2048);
    let huge = command(Accel::Kvm, 4096, &setup(vec![], true), root.path());
    check("hugepages", &huge);
    let args = huge.args();
    assert!(!args.iter().any(|a| a.contains("pci-hole64")));
    assert!(!args.iter().any(|a| a.contains("pci=realloc")));
    assert!(args.iter().any(|a| a
        .starts_with("memory-backend-file,id=ram,size=4096M,mem-path=/dev/hugepages,prealloc=on")));
    // Too few free pages: refused.
    let few = host_root(46, 100);
    let err = devices::plan(&setup(vec![], true), Accel::Kvm, 4, 4096, few.path()).unwrap_err();
    assert!(err.to_string().contains("2048 pages"), "{err}");

    // A generic device under TCG: preallocated RAM, its root port, no hole (too few
    // reserved hugepages for 1 GiB, so 4 KiB pages).
    let ram = command(Accel::Tcg, 1024, &setup(vec![edu()], false), few.path());
    check("prealloc", &ram);
    let args = ram.args();
    assert!(args.contains(
        &"memory-backend-ram,id=ram,size=1024M,prealloc=on,prealloc-threads=4".to_string()
    ));
    assert!(args.contains(&"vfio-pci,host=0000:00:05.0,bus=rp0".to_string()));
    assert!(!args.iter().any(|a| a.contains("pci-hole64")));
    assert!(args.contains(&"max".to_string()));
    // Enough reserved 2 MiB pages: `hugepage_size = "auto"` takes them, through a memfd,
    // with the node's preallocation threads.
    let mut huge_setup = setup(vec![edu()], false);
    huge_setup.memory.prealloc_threads = Some(8);
    let memfd = command(Accel::Tcg, 1024, &huge_setup, root.path());
    check("prealloc-hugetlb", &memfd);
    assert!(memfd.args().contains(
        &"memory-backend-memfd,id=ram,size=1024M,hugetlb=on,hugetlbsize=2M,prealloc=on,prealloc-threads=8"
            .to_string()
    ));
    // Nothing passed, nothing asked: the VM is unchanged.
    let plain = devices::plan(&setup(vec![], false), Accel::Kvm, 1, 512, root.path()).unwrap();
    assert!(plain.devices.is_empty() && plain.cmdline.is_empty() && plain.hole64.is_none());
}
