//! Golden tests of rendered QEMU command lines: `tests/golden/<name>.args`, one
//! argument per line. Regenerate with `GPUCELL_UPDATE_GOLDEN=1 cargo test -p gpucell-sandbox --test golden`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use gpucell_sandbox::accel::{probe_command, ProbeInput};
use gpucell_sandbox::args::{Accel, Device, QemuCommand, RunAs};
use gpucell_sandbox::command::{qemu_command, ChannelLayout, CommandInput};

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

const RUN_DIR: &str = "/var/lib/gpucell/run/0123456789abcdef";

/// What the sandbox renders for a 2-vCPU, 1 GiB VM booting the default guest with an
/// erofs image, a QMP monitor in its run directory, seccomp and `-runas nobody`.
fn input(accel: Accel, channel: Option<ChannelLayout>) -> CommandInput {
    let mut i = CommandInput::bare(
        "/usr/bin/qemu-system-x86_64".into(),
        "gpucell-0123456789abcdef".into(),
        accel,
        "/var/lib/gpucell/guest/default/vmlinux".into(),
        "/var/lib/gpucell/guest/default/initramfs.cpio.gz".into(),
    );
    i.cpus = 2;
    i.memory_mib = 1024;
    i.disk = Some("/var/lib/gpucell/images/sha256-ab/rootfs.erofs".into());
    i.qmp_socket = Some(Path::new(RUN_DIR).join("qmp.sock"));
    i.channel = channel;
    i.seccomp = true;
    i.run_as = Some(RunAs::Runas("nobody".into()));
    i
}

#[test]
fn tcg_with_virtio_serial_channel() {
    let channel = ChannelLayout::Serial {
        socket: Path::new(RUN_DIR).join("agent.sock"),
    };
    let cmd = qemu_command(&input(Accel::Tcg, Some(channel))).unwrap();
    check("tcg-serial", &cmd);
}

#[test]
fn kvm_with_vsock_channel_and_large_pci_hole() {
    let channel = ChannelLayout::Vsock {
        cid: 1234,
        port: None,
    };
    let mut i = input(Accel::Kvm, Some(channel));
    i.devices.hole64 = Some(1 << 40);
    // Two GPUs, each cold-plugged on its own root port.
    i.devices
        .devices
        .extend(Device::vfio_on_root_port(0, "0000:17:00.0").unwrap());
    i.devices
        .devices
        .extend(Device::vfio_on_root_port(1, "0000:3D:00.0").unwrap());
    assert!(Device::vfio_on_root_port(2, "17:00.0").is_err());
    assert!(Device::vfio_on_root_port(2, "0000:17:00.0,x=y").is_err());
    i.run_as = Some(RunAs::RunWith("gpucell-qemu".into()));
    check("kvm-vsock", &qemu_command(&i).unwrap());
}

#[test]
fn unprivileged_probe_without_disk() {
    let mut i = input(Accel::Kvm, None);
    i.extra_cmdline = vec!["gpucell.probe=1".into()];
    i.disk = None;
    i.qmp_socket = None;
    i.run_as = None;
    check("probe", &qemu_command(&i).unwrap());
}

/// The accelerator probe's own command, as `probe_boot` spawns it.
#[test]
fn the_accelerator_probe_boots_only_the_guest() {
    let probe = ProbeInput::new(
        Path::new("/usr/bin/qemu-system-x86_64"),
        Path::new("/var/lib/gpucell/guest/default/vmlinux"),
        Path::new("/var/lib/gpucell/guest/default/initramfs.cpio.gz"),
        Path::new("/"),
        None,
    );
    let cmd = qemu_command(&probe_command(&probe, Accel::Kvm)).unwrap();
    check("accel-probe", &cmd);
}

#[test]
fn memlock_is_raised_only_for_vfio_and_covers_guest_memory() {
    let channel = ChannelLayout::Serial {
        socket: Path::new(RUN_DIR).join("agent.sock"),
    };
    let mut cmd = qemu_command(&input(Accel::Kvm, Some(channel))).unwrap();
    assert_eq!(gpucell_sandbox::process::memlock_limit(&cmd), None);
    cmd.devices
        .extend(Device::vfio_on_root_port(0, "0000:01:00.0").unwrap());
    let limit = gpucell_sandbox::process::memlock_limit(&cmd).unwrap();
    assert!(limit >= 1024 << 20, "{limit} must cover 1 GiB of guest RAM");
    cmd.resources.memory_mib = 65536;
    let big = gpucell_sandbox::process::memlock_limit(&cmd).unwrap();
    assert!(big >= 64 << 30 && big > limit, "{big}");
}
