//! The one place a QEMU command line is put together.
//!
//! [`qemu_command`] is pure: it reads no file, no environment and no socket, and
//! spawns nothing. Whatever it needs was decided beforehand and is in a
//! [`CommandInput`]: the VM's size and files, the run's socket paths, the host-agent
//! channel, the planned devices ([`crate::devices::plan`]), the user QEMU drops to and
//! whether seccomp is on. The sandbox builds one input per run (the same for a dry
//! run's [`crate::sandbox::Plan`] and for the real run, but for the vsock port), the
//! accelerator probe builds a smaller one (no disk, no channel, no monitor), and the
//! golden tests render theirs through the same function.
//!
//! The guest kernel's command line is, in this order: [`CommandInput::base_cmdline`],
//! `gpucell.channel=`, `gpucell.rootfs=`, `gpucell.vsock_port=`, `gpucell.net=` and
//! `gpucell.dns=`, the extra words, then the devices' words. QEMU devices are the
//! image's disk, the channel's devices, the network device, then the planned devices
//! (root ports, passed functions, memory backend).

use std::path::PathBuf;

use gpucell_protocol::{
    CMDLINE_CHANNEL_KEY, CMDLINE_ROOTFS_KEY, CMDLINE_VSOCK_PORT_KEY, VIRTIO_SERIAL_PORT_NAME,
};
use serde::Serialize;

use crate::args::{
    Accel, ArgsError, Boot, Chardev, Device, Drive, KernelCmdline, Machine, QemuCommand, Resources,
    RunAs, Seccomp,
};
use crate::devices::VmDevices;

/// The kernel command line words every gpucell guest starts with: the console on the
/// first serial port, reboot at once on panic (QEMU runs with `-no-reboot`, so a panic
/// ends the VM), a quiet boot, and no check that the timer interrupt comes through the
/// IO-APIC (`no_timer_check`): a vCPU starved of host CPU, as under TCG with many
/// sandboxes at once, fails that check and the kernel panics ("IO-APIC + timer doesn't
/// work"; 5 of 20 guests did in bench/memory before this word).
pub const BASE_CMDLINE: [&str; 4] = ["console=ttyS0", "panic=-1", "quiet", "no_timer_check"];
/// QEMU id of the image's disk drive.
pub const ROOTFS_DRIVE: &str = "rootfs";
/// QEMU id of a driver flavour's driver disk (the second virtio-blk disk, `/dev/vdb`).
pub const DRIVER_DRIVE: &str = "driver";
/// QEMU id of the serial console's chardev (QEMU's stdout).
pub const CONSOLE_CHARDEV: &str = "console";
/// QEMU id of the QMP monitor's chardev.
pub const QMP_CHARDEV: &str = "qmp";
/// QEMU id of the virtio-serial agent port's chardev.
pub const AGENT_CHARDEV: &str = "agent";
/// QEMU id of the virtio-serial controller.
pub const VIRTIO_SERIAL_ID: &str = "vser0";
/// The vsock port a dry run shows in `gpucell.vsock_port=`: the real port is picked by
/// the host kernel when the run binds its listener (`VMADDR_PORT_ANY`), and the
/// kernel never picks 0 (it hands out ports from 1024 up), so 0 cannot be mistaken
/// for a real port.
pub const VSOCK_PORT_PLACEHOLDER: u32 = 0;

/// The descriptor number QEMU gets the sandbox's tap queue as (after stdio).
pub const TAP_FD: i32 = 3;
/// QEMU id of the sandbox's network backend.
pub const NETDEV_ID: &str = "net0";
/// Kernel command line key of the guest's network: `ADDRESS/PREFIX,GATEWAY,MAC`.
pub const CMDLINE_NET_KEY: &str = "gpucell.net";
/// Kernel command line key of the guest's resolvers, comma-separated.
pub const CMDLINE_DNS_KEY: &str = "gpucell.dns";

/// The sandbox's network device as QEMU and the guest see it: a virtio-net NIC on a
/// tap the host set up (its queue passed as [`TAP_FD`]); the guest's address, gateway
/// and resolvers go on the kernel command line, so the agent configures them at boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetLayout {
    pub mac: String,
    pub vhost: bool,
    pub address: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: std::net::Ipv4Addr,
    pub dns: Vec<std::net::Ipv4Addr>,
}

/// How the host talks to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Serial,
    Vsock,
}

impl ChannelKind {
    /// The value of `gpucell.channel=` on the kernel command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Serial => "serial",
            ChannelKind::Vsock => "vsock",
        }
    }
}

/// The host-agent channel as QEMU and the guest see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelLayout {
    /// A virtio-serial port backed by a unix socket QEMU listens on.
    Serial { socket: PathBuf },
    /// A vhost-vsock device with guest CID `cid`; the agent connects to host port
    /// `port` (`None` writes no `gpucell.vsock_port=` word: the agent's default port).
    Vsock { cid: u32, port: Option<u32> },
}

impl ChannelLayout {
    pub fn kind(&self) -> ChannelKind {
        match self {
            ChannelLayout::Serial { .. } => ChannelKind::Serial,
            ChannelLayout::Vsock { .. } => ChannelKind::Vsock,
        }
    }
}

/// Everything [`qemu_command`] renders, decided beforehand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandInput {
    pub qemu: PathBuf,
    /// `-name` and QEMU's process name (`gpucell-<run id>` for a sandbox).
    pub name: String,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The first kernel command line words ([`BASE_CMDLINE`] for gpucell's guests).
    pub base_cmdline: Vec<String>,
    /// The image's filesystem, attached read-only as the only virtio-blk disk.
    pub disk: Option<PathBuf>,
    /// A driver flavour's driver disk (erofs), attached read-only after the image's.
    pub driver_disk: Option<PathBuf>,
    /// `gpucell.rootfs=<fstype>`: the guest loads only this filesystem's modules.
    pub rootfs_fstype: Option<String>,
    /// The guest's serial console on QEMU's stdout.
    pub console: bool,
    /// The unix socket of the QMP monitor.
    pub qmp_socket: Option<PathBuf>,
    pub channel: Option<ChannelLayout>,
    /// Passed functions, memory backend, 64-bit hole, CPU model and kernel words.
    pub devices: VmDevices,
    /// The user QEMU drops to once its devices are open, as this QEMU spells it.
    pub run_as: Option<RunAs>,
    /// `-sandbox on,...` (allowing set*uid only when QEMU drops to `run_as`).
    pub seccomp: bool,
    /// Kernel command line words after gpucell's own.
    pub extra_cmdline: Vec<String>,
    /// The network device; `None`: no network device at all (`--network none`).
    pub net: Option<NetLayout>,
}

impl CommandInput {
    /// A bare VM: the given kernel and initrd with [`BASE_CMDLINE`] and the console on
    /// stdout; no disk, monitor, channel, devices, user switch or seccomp. Callers set
    /// what they need on top.
    pub fn bare(
        qemu: PathBuf,
        name: String,
        accel: Accel,
        kernel: PathBuf,
        initrd: PathBuf,
    ) -> Self {
        CommandInput {
            qemu,
            name,
            accel,
            cpus: 1,
            memory_mib: 256,
            kernel,
            initrd,
            base_cmdline: BASE_CMDLINE.iter().map(|w| w.to_string()).collect(),
            disk: None,
            driver_disk: None,
            rootfs_fstype: None,
            console: true,
            qmp_socket: None,
            channel: None,
            devices: VmDevices::none(accel),
            run_as: None,
            seccomp: false,
            extra_cmdline: Vec::new(),
            net: None,
        }
    }
}

/// The QEMU invocation for `input`. Refuses words that could split the kernel command
/// line, relative or non-UTF-8 paths, and out-of-range vCPU or memory sizes.
pub fn qemu_command(input: &CommandInput) -> Result<QemuCommand, ArgsError> {
    let cmdline = kernel_cmdline(input)?;
    let chardevs = chardevs(input)?;
    let resources = Resources {
        cpus: input.cpus,
        memory_mib: input.memory_mib,
    };
    resources.validate()?;
    let mut drives = match &input.disk {
        Some(disk) => vec![Drive::new(ROOTFS_DRIVE, disk, true)?],
        None => Vec::new(),
    };
    if let Some(d) = &input.driver_disk {
        drives.push(Drive::new(DRIVER_DRIVE, d, true)?);
    }
    Ok(QemuCommand {
        binary: input.qemu.clone(),
        name: input.name.clone(),
        machine: Machine {
            pci_hole64_size: input.devices.hole64,
        },
        accel: input.accel,
        cpu: input.devices.cpu.clone(),
        resources,
        boot: Some(Boot::new(&input.kernel, &input.initrd, cmdline)?),
        start_paused: false,
        drives,
        chardevs,
        devices: devices(input),
        qmp: input.qmp_socket.as_ref().map(|_| QMP_CHARDEV.to_string()),
        serial: input.console.then(|| CONSOLE_CHARDEV.to_string()),
        seccomp: input.seccomp.then_some(Seccomp {
            allow_setuid: input.run_as.is_some(),
        }),
        run_as: input.run_as.clone(),
    })
}

/// The guest kernel's command line, in the order the module documentation gives.
fn kernel_cmdline(input: &CommandInput) -> Result<KernelCmdline, ArgsError> {
    let mut cmdline = KernelCmdline::new();
    for w in &input.base_cmdline {
        cmdline.push(w.clone())?;
    }
    if let Some(channel) = &input.channel {
        let kind = channel.kind().as_str();
        cmdline.push(format!("{CMDLINE_CHANNEL_KEY}={kind}"))?;
    }
    // Only this image's filesystem modules are loaded at boot.
    if let Some(fstype) = &input.rootfs_fstype {
        cmdline.push(format!("{CMDLINE_ROOTFS_KEY}={fstype}"))?;
    }
    if let Some(ChannelLayout::Vsock {
        port: Some(port), ..
    }) = &input.channel
    {
        cmdline.push(format!("{CMDLINE_VSOCK_PORT_KEY}={port}"))?;
    }
    if let Some(n) = &input.net {
        let (a, p, g, m) = (n.address, n.prefix_len, n.gateway, &n.mac);
        cmdline.push(format!("{CMDLINE_NET_KEY}={a}/{p},{g},{m}"))?;
        if !n.dns.is_empty() {
            let dns: Vec<String> = n.dns.iter().map(ToString::to_string).collect();
            cmdline.push(format!("{CMDLINE_DNS_KEY}={}", dns.join(",")))?;
        }
    }
    for w in &input.extra_cmdline {
        cmdline.push(w.clone())?;
    }
    for w in &input.devices.cmdline {
        cmdline.push(*w)?;
    }
    Ok(cmdline)
}

/// The console, the QMP monitor and the virtio-serial agent port, as there are.
fn chardevs(input: &CommandInput) -> Result<Vec<Chardev>, ArgsError> {
    let mut out = Vec::new();
    if input.console {
        out.push(Chardev::stdio(CONSOLE_CHARDEV)?);
    }
    if let Some(qmp) = &input.qmp_socket {
        out.push(Chardev::socket_server(QMP_CHARDEV, qmp)?);
    }
    if let Some(ChannelLayout::Serial { socket }) = &input.channel {
        out.push(Chardev::socket_server(AGENT_CHARDEV, socket)?);
    }
    Ok(out)
}

/// The disk, the channel's devices, then the planned devices.
fn devices(input: &CommandInput) -> Vec<Device> {
    let mut out = Vec::new();
    if input.disk.is_some() {
        out.push(Device::VirtioBlk {
            drive: ROOTFS_DRIVE.into(),
        });
    }
    if input.driver_disk.is_some() {
        out.push(Device::VirtioBlk {
            drive: DRIVER_DRIVE.into(),
        });
    }
    match &input.channel {
        Some(ChannelLayout::Vsock { cid, .. }) => {
            out.push(Device::VhostVsock { guest_cid: *cid });
        }
        Some(ChannelLayout::Serial { .. }) => {
            out.push(Device::VirtioSerial {
                id: VIRTIO_SERIAL_ID.into(),
            });
            out.push(Device::VirtSerialPort {
                chardev: AGENT_CHARDEV.into(),
                name: VIRTIO_SERIAL_PORT_NAME.into(),
            });
        }
        None => {}
    }
    if let Some(n) = &input.net {
        out.push(Device::TapNetdev {
            id: NETDEV_ID.into(),
            fd: TAP_FD,
            vhost: n.vhost,
        });
        out.push(Device::VirtioNet {
            netdev: NETDEV_ID.into(),
            mac: n.mac.clone(),
        });
    }
    out.extend(input.devices.devices.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Cpu;

    fn input() -> CommandInput {
        let mut i = CommandInput::bare(
            "/usr/bin/qemu-system-x86_64".into(),
            "gpucell-0123456789abcdef".into(),
            Accel::Tcg,
            "/g/vmlinux".into(),
            "/g/initrd".into(),
        );
        i.disk = Some("/img/rootfs.erofs".into());
        i.rootfs_fstype = Some("erofs".into());
        i.qmp_socket = Some("/run/x/qmp.sock".into());
        i
    }

    fn append(cmd: &QemuCommand) -> String {
        cmd.boot.as_ref().unwrap().cmdline.to_string()
    }

    #[test]
    fn kernel_words_come_in_a_fixed_order() {
        let mut i = input();
        i.channel = Some(ChannelLayout::Vsock {
            cid: 7,
            port: Some(1234),
        });
        i.extra_cmdline = vec!["debug".into()];
        i.devices.cmdline = vec!["pci=realloc"];
        let cmd = qemu_command(&i).unwrap();
        assert_eq!(
            append(&cmd),
            "console=ttyS0 panic=-1 quiet no_timer_check gpucell.channel=vsock gpucell.rootfs=erofs \
             gpucell.vsock_port=1234 debug pci=realloc"
        );
        let args = cmd.args();
        assert!(args.contains(&"vhost-vsock-pci,guest-cid=7".to_string()));
        assert!(!args.iter().any(|a| a.contains("agent")), "{args:?}");
        // No port: no port word.
        i.channel = Some(ChannelLayout::Vsock { cid: 7, port: None });
        assert!(!append(&qemu_command(&i).unwrap()).contains("vsock_port"));
    }

    #[test]
    fn serial_channel_adds_its_socket_and_port() {
        let mut i = input();
        i.channel = Some(ChannelLayout::Serial {
            socket: "/run/x/agent.sock".into(),
        });
        i.seccomp = true;
        let cmd = qemu_command(&i).unwrap();
        assert_eq!(cmd.chardevs.len(), 3);
        assert_eq!(cmd.devices.len(), 3);
        assert_eq!(
            cmd.seccomp,
            Some(Seccomp {
                allow_setuid: false
            })
        );
        assert!(append(&cmd).contains("gpucell.channel=serial"));
    }

    #[test]
    fn the_network_device_and_its_kernel_words() {
        let mut i = input();
        i.net = Some(NetLayout {
            mac: "52:54:00:01:23:45".into(),
            vhost: false,
            address: "10.200.0.2".parse().unwrap(),
            prefix_len: 30,
            gateway: "10.200.0.1".parse().unwrap(),
            dns: vec!["203.0.113.53".parse().unwrap(), "1.1.1.1".parse().unwrap()],
        });
        let cmd = qemu_command(&i).unwrap();
        assert!(append(&cmd).ends_with(
            "gpucell.net=10.200.0.2/30,10.200.0.1,52:54:00:01:23:45 gpucell.dns=203.0.113.53,1.1.1.1"
        ));
        let args = cmd.args().join(" ");
        assert!(
            args.contains("-netdev tap,id=net0,fd=3,vhost=off -device virtio-net-pci,netdev=net0,mac=52:54:00:01:23:45,romfile="),
            "{args}"
        );
        i.net = None;
        let args = qemu_command(&i).unwrap().args().join(" ");
        assert!(
            !args.contains("netdev") && !append(&qemu_command(&i).unwrap()).contains("gpucell.net")
        );
    }

    #[test]
    fn a_bare_vm_has_only_the_console() {
        let i = CommandInput::bare(
            "/q".into(),
            "probe".into(),
            Accel::Kvm,
            "/k".into(),
            "/i".into(),
        );
        let cmd = qemu_command(&i).unwrap();
        assert!(cmd.drives.is_empty() && cmd.devices.is_empty() && cmd.qmp.is_none());
        assert_eq!(cmd.serial.as_deref(), Some(CONSOLE_CHARDEV));
        assert_eq!(cmd.cpu, Cpu::Host);
        assert_eq!(append(&cmd), "console=ttyS0 panic=-1 quiet no_timer_check");
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut i = input();
        i.extra_cmdline = vec!["a b".into()];
        assert!(matches!(
            qemu_command(&i),
            Err(ArgsError::BadCmdlineWord(_))
        ));
        let mut i = input();
        i.cpus = 0;
        assert!(matches!(qemu_command(&i), Err(ArgsError::BadCpus(0))));
        let mut i = input();
        i.disk = Some("relative.img".into());
        assert!(matches!(
            qemu_command(&i),
            Err(ArgsError::RelativePath { .. })
        ));
        let mut i = input();
        i.channel = Some(ChannelLayout::Serial {
            socket: "agent.sock".into(),
        });
        assert!(matches!(
            qemu_command(&i),
            Err(ArgsError::RelativePath { .. })
        ));
    }
}
