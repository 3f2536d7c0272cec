//! QEMU command lines from typed structs.
//!
//! Every piece of the command line is a small struct implementing [`ToArgs`]; a
//! [`QemuCommand`] holds them all and renders them in one fixed order, so a golden
//! file of the rendered arguments pins down exactly what gpucell asks QEMU for.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("{what} path {path:?} is not valid UTF-8; move it to a plain path")]
    NonUtf8Path { what: &'static str, path: PathBuf },
    #[error("{what} path {path:?} is not absolute")]
    RelativePath { what: &'static str, path: PathBuf },
    #[error("QEMU id {0:?} must be 1-32 characters of [A-Za-z0-9_-] starting with a letter")]
    BadId(String),
    #[error("kernel command line word {0:?} contains whitespace, quotes or control characters")]
    BadCmdlineWord(String),
    #[error("{0} vCPUs requested: use 1 to 255")]
    BadCpus(u32),
    #[error("{0} MiB of memory requested: use at least 64 MiB")]
    BadMemory(u64),
    #[error("PCI address {0:?} is not a full BDF like 0000:01:00.0")]
    BadBdf(String),
    #[error("accelerator {0:?} is unknown: use kvm or tcg")]
    UnknownAccel(String),
}

/// Something that renders itself as QEMU arguments.
pub trait ToArgs {
    fn to_args(&self, out: &mut Vec<String>);
}

/// Escapes a value inside a QEMU `key=value,...` option string (commas are doubled).
pub fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn utf8_abs<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, ArgsError> {
    if !path.is_absolute() {
        return Err(ArgsError::RelativePath {
            what,
            path: path.to_path_buf(),
        });
    }
    path.to_str().ok_or_else(|| ArgsError::NonUtf8Path {
        what,
        path: path.to_path_buf(),
    })
}

fn check_id(id: &str) -> Result<(), ArgsError> {
    let ok = !id.is_empty()
        && id.len() <= 32
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ArgsError::BadId(id.to_string()))
    }
}

/// The accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl FromStr for Accel {
    type Err = ArgsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(ArgsError::UnknownAccel(s.to_string())),
        }
    }
}

/// Size of TCG's translated-code buffer in MiB. QEMU's default (1 GiB in system mode)
/// lets a boot touch ~55 MiB of it, and all of a smaller buffer ends up resident: it is
/// most of a TCG sandbox's host memory beyond guest RAM (bench/memory). 16 MiB boots as
/// fast as 32 (the floor's boot, 3 rounds: 0.97-1.06 s vs 0.89-1.09 s); 8 MiB was ~20%
/// slower. KVM has no such buffer.
pub const TCG_TB_SIZE_MIB: u32 = 16;

impl ToArgs for Accel {
    fn to_args(&self, out: &mut Vec<String>) {
        let accel = match self {
            Accel::Kvm => self.to_string(),
            Accel::Tcg => format!("tcg,tb-size={TCG_TB_SIZE_MIB}"),
        };
        out.extend(["-accel".into(), accel]);
    }
}

/// `-machine q35[,...]`: q35 because device passthrough needs PCI Express.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Size of the 64-bit PCI hole in bytes (large GPU BARs need more than the default).
    pub pci_hole64_size: Option<u64>,
}

impl ToArgs for Machine {
    fn to_args(&self, out: &mut Vec<String>) {
        out.extend(["-machine".into(), "q35".into()]);
        if let Some(size) = self.pci_hole64_size {
            out.extend([
                "-global".into(),
                format!("q35-pcihost.pci-hole64-size={size}"),
            ]);
        }
    }
}

/// `-cpu MODEL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cpu {
    /// The host's CPU (KVM only).
    Host,
    /// Every feature the accelerator can emulate (TCG).
    Max,
    /// The host's CPU with the host's physical address bits (KVM, large PCI holes).
    HostPhysBits,
    /// `max` with this many physical address bits (TCG, large PCI holes).
    MaxPhysBits(u8),
}

impl Cpu {
    pub fn for_accel(accel: Accel) -> Cpu {
        match accel {
            Accel::Kvm => Cpu::Host,
            Accel::Tcg => Cpu::Max,
        }
    }
}

impl ToArgs for Cpu {
    fn to_args(&self, out: &mut Vec<String>) {
        let model = match self {
            Cpu::Host => "host".to_string(),
            Cpu::Max => "max".to_string(),
            Cpu::HostPhysBits => "host,host-phys-bits=on".to_string(),
            Cpu::MaxPhysBits(bits) => format!("max,phys-bits={bits}"),
        };
        out.extend(["-cpu".into(), model]);
    }
}

/// `-smp N` and `-m SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub cpus: u32,
    pub memory_mib: u64,
}

impl Resources {
    pub fn validate(&self) -> Result<(), ArgsError> {
        if self.cpus == 0 || self.cpus > 255 {
            return Err(ArgsError::BadCpus(self.cpus));
        }
        if self.memory_mib < 64 {
            return Err(ArgsError::BadMemory(self.memory_mib));
        }
        Ok(())
    }
}

impl ToArgs for Resources {
    fn to_args(&self, out: &mut Vec<String>) {
        out.extend([
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            format!("{}M", self.memory_mib),
        ]);
    }
}

/// The kernel command line: words without whitespace or quotes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline(Vec<String>);

impl KernelCmdline {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a word (`quiet`, `key=value`), refusing anything that could split or quote.
    pub fn push(&mut self, word: impl Into<String>) -> Result<&mut Self, ArgsError> {
        let word = word.into();
        let bad = word.is_empty()
            || word
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\'');
        if bad {
            return Err(ArgsError::BadCmdlineWord(word));
        }
        self.0.push(word);
        Ok(self)
    }

    pub fn words(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for KernelCmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(" "))
    }
}

/// Direct kernel boot: `-kernel`, `-initrd`, `-append`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: KernelCmdline,
}

impl Boot {
    pub fn new(kernel: &Path, initrd: &Path, cmdline: KernelCmdline) -> Result<Self, ArgsError> {
        Ok(Self {
            kernel: utf8_abs("kernel", kernel)?.to_string(),
            initrd: utf8_abs("initrd", initrd)?.to_string(),
            cmdline,
        })
    }
}

impl ToArgs for Boot {
    fn to_args(&self, out: &mut Vec<String>) {
        out.extend([
            "-kernel".into(),
            self.kernel.clone(),
            "-initrd".into(),
            self.initrd.clone(),
            "-append".into(),
            self.cmdline.to_string(),
        ]);
    }
}

/// A raw disk image, attached by a device that names `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    pub id: String,
    pub path: String,
    pub readonly: bool,
}

impl Drive {
    pub fn new(id: &str, path: &Path, readonly: bool) -> Result<Self, ArgsError> {
        check_id(id)?;
        Ok(Self {
            id: id.to_string(),
            path: utf8_abs("disk image", path)?.to_string(),
            readonly,
        })
    }
}

impl ToArgs for Drive {
    fn to_args(&self, out: &mut Vec<String>) {
        let ro = if self.readonly { "on" } else { "off" };
        out.extend([
            "-drive".into(),
            format!(
                "file={},if=none,id={},format=raw,readonly={ro}",
                escape_opt(&self.path),
                self.id
            ),
        ]);
    }
}

/// A character device backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chardev {
    /// A unix socket QEMU listens on (without waiting for a client).
    SocketServer { id: String, path: String },
    /// QEMU's stdout (stdin is /dev/null); `signal=off` so ^C is not QEMU's to handle.
    Stdio { id: String },
}

impl Chardev {
    pub fn socket_server(id: &str, path: &Path) -> Result<Self, ArgsError> {
        check_id(id)?;
        Ok(Chardev::SocketServer {
            id: id.to_string(),
            path: utf8_abs("socket", path)?.to_string(),
        })
    }

    pub fn stdio(id: &str) -> Result<Self, ArgsError> {
        check_id(id)?;
        Ok(Chardev::Stdio { id: id.to_string() })
    }
}

impl ToArgs for Chardev {
    fn to_args(&self, out: &mut Vec<String>) {
        let spec = match self {
            Chardev::SocketServer { id, path } => format!(
                "socket,id={id},path={},server=on,wait=off",
                escape_opt(path)
            ),
            Chardev::Stdio { id } => format!("stdio,id={id},signal=off"),
        };
        out.extend(["-chardev".into(), spec]);
    }
}

/// A guest device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    VirtioBlk {
        drive: String,
    },
    VirtioSerial {
        id: String,
    },
    VirtSerialPort {
        chardev: String,
        name: String,
    },
    VhostVsock {
        guest_cid: u32,
    },
    /// A PCIe root port, one per passed-through device (`chassis` and `slot` unique).
    PcieRootPort {
        id: String,
        chassis: u8,
        slot: u8,
    },
    /// A host PCI function passed through by VFIO, cold-plugged on root port `bus`.
    VfioPci {
        host: String,
        bus: String,
    },
    /// The guest RAM backend (`-object` plus `-machine memory-backend=`).
    Memory(MemoryBackend),
    /// `-netdev tap` on a tap queue QEMU inherits as descriptor `fd`.
    TapNetdev {
        id: String,
        fd: i32,
        vhost: bool,
    },
    /// A virtio-net NIC on netdev `netdev`.
    VirtioNet {
        netdev: String,
        mac: String,
    },
}

impl Device {
    /// A VFIO device on its own new root port `rpN`; `host` must be a full BDF
    /// (`0000:01:00.0`).
    pub fn vfio_on_root_port(n: u8, host: &str) -> Result<[Device; 2], ArgsError> {
        let ok = host.len() == 12
            && host.chars().enumerate().all(|(i, c)| match i {
                4 | 7 => c == ':',
                10 => c == '.',
                _ => c.is_ascii_hexdigit(),
            });
        if !ok {
            return Err(ArgsError::BadBdf(host.to_string()));
        }
        let id = format!("rp{n}");
        Ok([
            Device::PcieRootPort {
                id: id.clone(),
                chassis: n.saturating_add(1),
                slot: n.saturating_add(1),
            },
            Device::VfioPci {
                host: host.to_ascii_lowercase(),
                bus: id,
            },
        ])
    }
}

impl ToArgs for Device {
    fn to_args(&self, out: &mut Vec<String>) {
        let spec = match self {
            Device::VirtioBlk { drive } => format!("virtio-blk-pci,drive={drive}"),
            Device::VirtioSerial { id } => format!("virtio-serial-pci,id={id}"),
            Device::VirtSerialPort { chardev, name } => {
                format!("virtserialport,chardev={chardev},name={}", escape_opt(name))
            }
            Device::VhostVsock { guest_cid } => format!("vhost-vsock-pci,guest-cid={guest_cid}"),
            Device::PcieRootPort { id, chassis, slot } => {
                format!("pcie-root-port,id={id},chassis={chassis},slot={slot}")
            }
            Device::VfioPci { host, bus } => format!("vfio-pci,host={host},bus={bus}"),
            Device::Memory(m) => return m.to_args(out),
            Device::TapNetdev { id, fd, vhost } => {
                let vhost = if *vhost { "on" } else { "off" };
                out.extend([
                    "-netdev".into(),
                    format!("tap,id={},fd={fd},vhost={vhost}", escape_opt(id)),
                ]);
                return;
            }
            // No option ROM: the guest boots its kernel directly, never from the
            // network, and a host without QEMU's ROM files could not start it.
            Device::VirtioNet { netdev, mac } => format!(
                "virtio-net-pci,netdev={},mac={},romfile=",
                escape_opt(netdev),
                escape_opt(mac)
            ),
        };
        out.extend(["-device".into(), spec]);
    }
}

/// The QEMU object id of the guest RAM backend.
pub const BACKEND_ID: &str = "ram";

/// `-object memory-backend-...,id=ram,...` and `-machine memory-backend=ram`.
///
/// Preallocation touches every page: `prealloc-threads` (QEMU's default for a backend
/// object is 1) spreads it over several threads (see `crate::memory::MemoryOptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBackend {
    /// Anonymous memory, preallocated.
    Ram { size_mib: u64, threads: u32 },
    /// Files on a hugetlbfs mount, preallocated.
    HugePages {
        size_mib: u64,
        mem_path: String,
        threads: u32,
    },
    /// Reserved hugetlb pages of `page_kib` through a memfd (no hugetlbfs mount needed),
    /// preallocated.
    HugeMemfd {
        size_mib: u64,
        page_kib: u64,
        threads: u32,
    },
}

/// A page size as QEMU's size properties take it: `1G`, `2M`, else KiB.
fn page_size_arg(page_kib: u64) -> String {
    if page_kib.is_multiple_of(1024 * 1024) {
        format!("{}G", page_kib / (1024 * 1024))
    } else if page_kib.is_multiple_of(1024) {
        format!("{}M", page_kib / 1024)
    } else {
        format!("{page_kib}K")
    }
}

impl ToArgs for MemoryBackend {
    fn to_args(&self, out: &mut Vec<String>) {
        let spec = match self {
            MemoryBackend::Ram { size_mib, threads } => format!(
                "memory-backend-ram,id={BACKEND_ID},size={size_mib}M,prealloc=on,prealloc-threads={}",
                threads.max(&1)
            ),
            MemoryBackend::HugePages {
                size_mib,
                mem_path,
                threads,
            } => format!(
                "memory-backend-file,id={BACKEND_ID},size={size_mib}M,mem-path={},prealloc=on,prealloc-threads={},share=off",
                escape_opt(mem_path),
                threads.max(&1)
            ),
            MemoryBackend::HugeMemfd {
                size_mib,
                page_kib,
                threads,
            } => format!(
                "memory-backend-memfd,id={BACKEND_ID},size={size_mib}M,hugetlb=on,hugetlbsize={},prealloc=on,prealloc-threads={}",
                page_size_arg(*page_kib),
                threads.max(&1)
            ),
        };
        out.extend([
            "-object".into(),
            spec,
            "-machine".into(),
            format!("memory-backend={BACKEND_ID}"),
        ]);
    }
}

/// `-sandbox on,...`: QEMU's seccomp filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seccomp {
    /// Allow set*uid/set*gid: QEMU needs them once to drop to `-runas`; the drop is
    /// permanent, so allowing them costs nothing afterwards.
    pub allow_setuid: bool,
}

impl ToArgs for Seccomp {
    fn to_args(&self, out: &mut Vec<String>) {
        let elevate = if self.allow_setuid { "allow" } else { "deny" };
        out.extend([
            "-sandbox".into(),
            format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"),
        ]);
    }
}

/// The unprivileged user QEMU switches to once its devices are open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    /// `-runas USER` (QEMU < 9.1).
    Runas(String),
    /// `-run-with user=USER` (QEMU >= 9.1).
    RunWith(String),
}

impl ToArgs for RunAs {
    fn to_args(&self, out: &mut Vec<String>) {
        match self {
            RunAs::Runas(u) => out.extend(["-runas".into(), u.clone()]),
            RunAs::RunWith(u) => {
                out.extend(["-run-with".into(), format!("user={}", escape_opt(u))])
            }
        }
    }
}

/// A whole QEMU invocation. Rendered in a fixed order by [`ToArgs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCommand {
    pub binary: PathBuf,
    pub name: String,
    pub machine: Machine,
    pub accel: Accel,
    pub cpu: Cpu,
    pub resources: Resources,
    /// Direct kernel boot; `None` leaves the firmware to boot nothing (QMP tests).
    pub boot: Option<Boot>,
    /// `-S`: stay paused until QMP `cont`.
    pub start_paused: bool,
    pub drives: Vec<Drive>,
    pub chardevs: Vec<Chardev>,
    pub devices: Vec<Device>,
    /// Chardev id of the QMP monitor.
    pub qmp: Option<String>,
    /// Chardev id of the serial console (ttyS0).
    pub serial: Option<String>,
    pub seccomp: Option<Seccomp>,
    pub run_as: Option<RunAs>,
}

impl QemuCommand {
    pub fn args(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(64);
        self.to_args(&mut out);
        out
    }
}

impl ToArgs for QemuCommand {
    fn to_args(&self, out: &mut Vec<String>) {
        out.extend([
            "-name".into(),
            format!(
                "{},process={}",
                escape_opt(&self.name),
                escape_opt(&self.name)
            ),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
        ]);
        self.machine.to_args(out);
        self.accel.to_args(out);
        self.cpu.to_args(out);
        self.resources.to_args(out);
        if let Some(b) = &self.boot {
            b.to_args(out);
        }
        if self.start_paused {
            out.push("-S".into());
        }
        for c in &self.chardevs {
            c.to_args(out);
        }
        if let Some(id) = &self.serial {
            out.extend(["-serial".into(), format!("chardev:{id}")]);
        }
        if let Some(id) = &self.qmp {
            out.extend(["-mon".into(), format!("chardev={id},mode=control")]);
        }
        for d in &self.drives {
            d.to_args(out);
        }
        for d in &self.devices {
            d.to_args(out);
        }
        out.extend(["-nic".into(), "none".into()]);
        if let Some(s) = &self.seccomp {
            s.to_args(out);
        }
        if let Some(r) = &self.run_as {
            r.to_args(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_in_paths_are_escaped() {
        let d = Drive::new("rootfs", Path::new("/a,b/disk.img"), true).unwrap();
        let mut out = Vec::new();
        d.to_args(&mut out);
        assert_eq!(
            out[1],
            "file=/a,,b/disk.img,if=none,id=rootfs,format=raw,readonly=on"
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(matches!(
            Drive::new("root fs", Path::new("/x"), true),
            Err(ArgsError::BadId(_))
        ));
        assert!(matches!(
            Drive::new("rootfs", Path::new("rel/x"), true),
            Err(ArgsError::RelativePath { .. })
        ));
        let mut c = KernelCmdline::new();
        assert!(c.push("a b").is_err());
        assert!(c.push("x=\"y\"").is_err());
        assert!(c.push("").is_err());
        assert!(c.push("console=ttyS0").is_ok());
        assert!(Resources {
            cpus: 0,
            memory_mib: 512
        }
        .validate()
        .is_err());
        assert!(Resources {
            cpus: 1,
            memory_mib: 16
        }
        .validate()
        .is_err());
        assert_eq!("KVM".parse::<Accel>().unwrap(), Accel::Kvm);
        assert!("xen".parse::<Accel>().is_err());
    }

    #[test]
    fn memory_backends_render_threads_and_page_size() {
        let render = |m: MemoryBackend| {
            let mut out = Vec::new();
            m.to_args(&mut out);
            out
        };
        assert_eq!(
            render(MemoryBackend::HugeMemfd {
                size_mib: 4096,
                page_kib: 2048,
                threads: 8
            }),
            [
                "-object",
                "memory-backend-memfd,id=ram,size=4096M,hugetlb=on,hugetlbsize=2M,prealloc=on,prealloc-threads=8",
                "-machine",
                "memory-backend=ram"
            ]
        );
        assert!(render(MemoryBackend::HugeMemfd {
            size_mib: 65536,
            page_kib: 1024 * 1024,
            threads: 0
        })[1]
            .ends_with(",hugetlbsize=1G,prealloc=on,prealloc-threads=1"));
        assert_eq!(
            render(MemoryBackend::Ram {
                size_mib: 1024,
                threads: 6
            })[1],
            "memory-backend-ram,id=ram,size=1024M,prealloc=on,prealloc-threads=6"
        );
        assert_eq!(page_size_arg(64), "64K");
    }
}
