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
use gpucell_sandbox::args::{Accel, Device, KernelCmdline, Machine, QemuCommand, Resources};
use gpucell_sandbox::devices::{self, PassthroughDevice};
use gpucell_sandbox::memory::MemoryBackend;

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

/// The command the sandbox builds for `passed`, reduced to the parts devices change.
fn command(
    accel: Accel,
    memory_mib: u64,
    passed: &[PassthroughDevice],
    memory: MemoryBackend,
) -> QemuCommand {
    let hole = devices::hole64_size(passed);
    let bits = hole
        .map(|h| devices::required_phys_bits(memory_mib, h))
        .unwrap_or(0);
    let mut cmdline = KernelCmdline::new();
    cmdline.push("console=ttyS0").unwrap();
    if !passed.is_empty() {
        for w in devices::KERNEL_PARAMS {
            cmdline.push(w).unwrap();
        }
    }
    let mut devs = devices::wiring(passed).unwrap();
    devs.push(Device::Memory(memory));
    QemuCommand {
        binary: "/usr/bin/qemu-system-x86_64".into(),
        name: "gpucell-0123456789abcdef".into(),
        machine: Machine {
            pci_hole64_size: hole,
        },
        accel,
        cpu: devices::cpu_for(accel, bits),
        resources: Resources {
            cpus: 4,
            memory_mib,
        },
        boot: Some(
            gpucell_sandbox::args::Boot::new(
                Path::new("/var/lib/gpucell/guest/default/vmlinux"),
                Path::new("/var/lib/gpucell/guest/default/initramfs.cpio.gz"),
                cmdline,
            )
            .unwrap(),
        ),
        start_paused: false,
        drives: vec![],
        chardevs: vec![],
        devices: devs,
        qmp: None,
        serial: None,
        seccomp: None,
        run_as: None,
    }
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
    let cmd = command(
        Accel::Kvm,
        8192,
        &passed,
        MemoryBackend::Ram {
            size_mib: 8192,
            threads: 2,
        },
    );
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
    let cmd = command(
        Accel::Kvm,
        65536,
        &passed,
        MemoryBackend::Ram {
            size_mib: 65536,
            threads: 2,
        },
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
        &passed,
        MemoryBackend::Ram {
            size_mib: 65536,
            threads: 2,
        },
    );
    assert!(tcg.args().contains(&format!("max,phys-bits={bits}")));
}

#[test]
fn memory_backends() {
    let huge = command(
        Accel::Kvm,
        4096,
        &[],
        MemoryBackend::HugePages {
            size_mib: 4096,
            mem_path: "/dev/hugepages".into(),
            threads: 4,
        },
    );
    check("hugepages", &huge);
    let args = huge.args();
    assert!(!args.iter().any(|a| a.contains("pci-hole64")));
    assert!(!args.iter().any(|a| a.contains("pci=realloc")));
    let ram = command(
        Accel::Tcg,
        1024,
        &[],
        MemoryBackend::Ram {
            size_mib: 1024,
            threads: 2,
        },
    );
    check("prealloc", &ram);
    assert!(ram.args().contains(
        &"memory-backend-ram,id=ram,size=1024M,prealloc=on,prealloc-threads=2".to_string()
    ));
}
