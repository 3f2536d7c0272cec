//! Golden tests of rendered QEMU command lines: `tests/golden/<name>.args`, one
//! argument per line. Regenerate with `GPUCELL_UPDATE_GOLDEN=1 cargo test -p gpucell-sandbox --test golden`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use gpucell_sandbox::args::{
    Accel, Boot, Chardev, Cpu, Device, Drive, KernelCmdline, Machine, QemuCommand, Resources,
    RunAs, Seccomp,
};

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
    assert_eq!(
        rendered,
        want,
        "{name}: rendered arguments differ from {}",
        path.display()
    );
}

fn cmdline(channel: &str) -> KernelCmdline {
    let mut c = KernelCmdline::new();
    for w in ["console=ttyS0", "panic=-1", "quiet", channel] {
        c.push(w).unwrap();
    }
    c
}

fn base(accel: Accel, channel: &str) -> QemuCommand {
    let run = Path::new("/var/lib/gpucell/run/0123456789abcdef");
    QemuCommand {
        binary: "/usr/bin/qemu-system-x86_64".into(),
        name: "gpucell-0123456789abcdef".into(),
        machine: Machine {
            pci_hole64_size: None,
        },
        accel,
        cpu: Cpu::for_accel(accel),
        resources: Resources {
            cpus: 2,
            memory_mib: 1024,
        },
        boot: Some(
            Boot::new(
                Path::new("/var/lib/gpucell/guest/default/vmlinux"),
                Path::new("/var/lib/gpucell/guest/default/initramfs.cpio.gz"),
                cmdline(channel),
            )
            .unwrap(),
        ),
        start_paused: false,
        drives: vec![Drive::new(
            "rootfs",
            Path::new("/var/lib/gpucell/images/sha256-ab/rootfs.erofs"),
            true,
        )
        .unwrap()],
        chardevs: vec![
            Chardev::stdio("console").unwrap(),
            Chardev::socket_server("qmp", &run.join("qmp.sock")).unwrap(),
        ],
        devices: vec![Device::VirtioBlk {
            drive: "rootfs".into(),
        }],
        qmp: Some("qmp".into()),
        serial: Some("console".into()),
        seccomp: Some(Seccomp { allow_setuid: true }),
        run_as: Some(RunAs::Runas("nobody".into())),
    }
}

#[test]
fn tcg_with_virtio_serial_channel() {
    let mut cmd = base(Accel::Tcg, "gpucell.channel=serial");
    let run = Path::new("/var/lib/gpucell/run/0123456789abcdef");
    cmd.chardevs
        .push(Chardev::socket_server("agent", &run.join("agent.sock")).unwrap());
    cmd.devices
        .push(Device::VirtioSerial { id: "vser0".into() });
    cmd.devices.push(Device::VirtSerialPort {
        chardev: "agent".into(),
        name: gpucell_protocol::VIRTIO_SERIAL_PORT_NAME.into(),
    });
    check("tcg-serial", &cmd);
}

#[test]
fn kvm_with_vsock_channel_and_large_pci_hole() {
    let mut cmd = base(Accel::Kvm, "gpucell.channel=vsock");
    cmd.machine.pci_hole64_size = Some(1 << 40);
    cmd.devices.push(Device::VhostVsock { guest_cid: 1234 });
    // Two GPUs, each cold-plugged on its own root port.
    cmd.devices
        .extend(Device::vfio_on_root_port(0, "0000:17:00.0").unwrap());
    cmd.devices
        .extend(Device::vfio_on_root_port(1, "0000:3D:00.0").unwrap());
    assert!(Device::vfio_on_root_port(2, "17:00.0").is_err());
    assert!(Device::vfio_on_root_port(2, "0000:17:00.0,x=y").is_err());
    cmd.run_as = Some(RunAs::RunWith("gpucell-qemu".into()));
    check("kvm-vsock", &cmd);
}

#[test]
fn unprivileged_probe_without_disk() {
    let mut cmd = base(Accel::Kvm, "gpucell.probe=1");
    cmd.drives.clear();
    cmd.devices.clear();
    cmd.chardevs.truncate(1);
    cmd.qmp = None;
    cmd.seccomp = Some(Seccomp {
        allow_setuid: false,
    });
    cmd.run_as = None;
    check("probe", &cmd);
}

#[test]
fn memlock_is_raised_only_for_vfio_and_covers_guest_memory() {
    let mut cmd = base(Accel::Kvm, "gpucell.channel=serial");
    assert_eq!(gpucell_sandbox::process::memlock_limit(&cmd), None);
    cmd.devices
        .extend(Device::vfio_on_root_port(0, "0000:01:00.0").unwrap());
    let limit = gpucell_sandbox::process::memlock_limit(&cmd).unwrap();
    assert!(limit >= 1024 << 20, "{limit} must cover 1 GiB of guest RAM");
    cmd.resources.memory_mib = 65536;
    let big = gpucell_sandbox::process::memlock_limit(&cmd).unwrap();
    assert!(big >= 64 << 30 && big > limit, "{big}");
}
