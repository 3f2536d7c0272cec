//! One microVM running one workload, from start to a clean end.
//!
//! ```text
//! plan (no side effects) ─► run dir ─► channel ─► QEMU (boots at once) ─► QMP ready
//!   ─► pin vCPUs ─► agent connects ─► relay (hello, run, output, exit)
//!   ─► guest powers off ─► QEMU exits ─► outcome
//! ```
//! The plan ([`Sandbox::plan`]) decides everything the command line needs and gives
//! every refusal that can be given before anything starts; a run uses the same plan,
//! so a dry run shows what runs.
//! Every exit path — success, error, signal, QEMU killed, timeout — drops the guards
//! in reverse order: QEMU's process group is killed and reaped, then the run directory
//! with its sockets is removed.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpucell_protocol::{DeviceInfo, ExitStatus, RunSpec};
use serde::Serialize;

use crate::args::{Accel, QemuCommand, RunAs};
use crate::caps::{CapsError, QemuCaps};
use crate::channel::{relay, EventReceiver, EventSender, Limits, SessionError, SessionIo};
pub use crate::command::ChannelKind;
pub use crate::command::NetLayout;
use crate::command::{
    qemu_command, ChannelLayout, CommandInput, BASE_CMDLINE, TAP_FD, VSOCK_PORT_PLACEHOLDER,
};
use crate::devices::{DeviceSetup, MemlockLimits, PassedMapping, VcpuPin};
use crate::process::{describe_exit, QemuProcess};
use crate::qmp::Qmp;
use crate::rundir::{new_run_id, run_dir_path, socket_path, RunDir, AGENT_SOCKET, QMP_SOCKET};
use crate::vsock::VsockListener;

mod vm;
use vm::Vm;

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const AGENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest has to power off by itself after the workload exited.
const POWEROFF_GRACE: Duration = Duration::from_secs(5);
/// How long QEMU has to exit after QMP `quit` before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(2);
/// How long a QEMU that exited at start has to get its stderr through the pipe.
const STDERR_DRAIN: Duration = Duration::from_secs(1);
/// Lines of the serial console shown with an error.
pub const CONSOLE_LINES_ON_ERROR: usize = 25;

/// Which channel to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelChoice {
    /// vsock when `/dev/vhost-vsock` exists and the port is free, else virtio-serial.
    Auto,
    Serial,
    Vsock,
}

/// Which user QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAsPolicy {
    /// When gpucell runs as root: `gpucell-qemu` if that user exists, else `nobody`.
    Auto,
    Never,
    User(String),
}

/// Everything needed to boot one sandbox.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The image's filesystem, attached read-only as the only virtio-blk disk.
    pub disk: PathBuf,
    pub cpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    pub state_dir: PathBuf,
    /// Root under which `/dev/vhost-vsock` and `/etc` are looked at.
    pub host_root: PathBuf,
    pub channel: ChannelChoice,
    pub run_as: RunAsPolicy,
    /// `-sandbox on,...` when this QEMU supports it.
    pub seccomp: bool,
    pub limits: Limits,
    /// Extra kernel command line words.
    pub extra_cmdline: Vec<String>,
    /// A driver flavour's driver disk (erofs), attached read-only after the image disk.
    pub driver_disk: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    RunDir(#[from] crate::rundir::RunDirError),
    #[error("invalid VM configuration")]
    Args(#[from] crate::args::ArgsError),
    #[error(transparent)]
    Caps(#[from] crate::caps::CapsError),
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
    #[error("QEMU did not come up{}", qemu_said(.stderr))]
    QmpConnect {
        stderr: String,
        #[source]
        source: crate::qmp::QmpError,
    },
    #[error("cannot connect to the agent socket {path:?}")]
    AgentConnect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent's vsock channel failed")]
    Vsock(#[from] crate::vsock::VsockError),
    #[error("the agent's vsock channel failed (the VM then: {vm})")]
    VsockStalled {
        #[source]
        source: crate::vsock::VsockError,
        vm: String,
    },
    #[error("the VM stopped before its agent connected (QEMU {status}){}", qemu_said(.stderr))]
    VmExited { status: String, stderr: String },
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("run id {0:?} is not 16 hex digits")]
    BadRunId(String),
    #[error(transparent)]
    Devices(#[from] crate::devices::DevicesError),
    #[error("cannot jail QEMU")]
    Jail(#[from] crate::jail::JailSetupError),
}

fn qemu_said(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(" (QEMU said: {})", s.replace('\n', " / "))
    }
}

/// A failed run: the error and what the guest and QEMU printed last.
#[derive(Debug)]
pub struct RunError {
    pub error: Box<SandboxError>,
    /// Last lines of the guest's serial console.
    pub console_tail: String,
    /// Last lines of QEMU's stderr.
    pub qemu_stderr: String,
    /// Whether QEMU had been started (and so the console tail means something).
    pub vm_started: bool,
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.error)
    }
}

impl RunError {
    fn bare(error: impl Into<SandboxError>) -> Self {
        RunError {
            error: Box::new(error.into()),
            console_tail: String::new(),
            qemu_stderr: String::new(),
            vm_started: false,
        }
    }

    /// The signal that interrupted the run, if that is why it failed.
    pub fn interrupted_by(&self) -> Option<i32> {
        match &*self.error {
            SandboxError::Session(SessionError::Interrupted(s)) => Some(*s),
            _ => None,
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(
            &*self.error,
            SandboxError::Session(SessionError::Timeout(_))
        )
    }
}

/// Time spent in each phase, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// QEMU spawned to QMP ready.
    pub vm_start_ms: u64,
    /// Guest kernel boot to the agent's hello, as the guest measured it (its uptime).
    pub kernel_boot_ms: u64,
    /// QEMU spawned to the agent's hello.
    pub agent_ready_ms: u64,
    /// Run request sent to the agent's report of the passed devices, which it waits
    /// for before starting the workload (runs with devices only).
    pub devices_visible_ms: Option<u64>,
    /// Run request sent to the workload started (includes `devices_visible_ms`).
    pub process_start_ms: u64,
    /// Workload started to exited.
    pub workload_ms: u64,
    /// Workload exited to QEMU gone.
    pub shutdown_ms: u64,
    /// The whole sandbox lifecycle.
    pub total_ms: u64,
}

/// A run that ended with the workload's exit.
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    pub run_id: String,
    pub exit_code: i32,
    pub status: ExitStatus,
    pub accel: Accel,
    pub channel: ChannelKind,
    pub cpus: u32,
    pub memory_mib: u64,
    pub guest_kernel: String,
    pub agent: String,
    pub devices: Vec<DeviceInfo>,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub signals_forwarded: Vec<i32>,
    pub timings: Timings,
    pub qemu_args: Vec<String>,
    /// Functions passed through: host address to guest address.
    pub passthrough: Vec<PassedMapping>,
    /// Size of the guest's 64-bit PCI hole when gpucell set it.
    pub pci_hole64_bytes: Option<u64>,
    /// vCPU threads pinned with `--pin-cpus`.
    pub vcpu_pins: Vec<VcpuPin>,
    /// The NVIDIA driver bring-up of a driver flavour (GPUs, driver_ready_ms).
    pub driver: Option<gpucell_protocol::DriverReport>,
    /// The jail QEMU ran in (`None`: unjailed).
    pub jail: Option<crate::jail::JailFacts>,
    /// When QEMU was spawned (for the caller's own phase times).
    #[serde(skip)]
    pub spawned_at: Option<Instant>,
}

/// What a run would do, computed without doing any of it: see [`Sandbox::plan`].
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub run_id: String,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// QEMU's arguments after the binary, exactly as the run passes them, but for the
    /// vsock port: with the vsock channel the kernel picks the port when the run binds
    /// its listener, so a plan shows `gpucell.vsock_port=0`
    /// ([`VSOCK_PORT_PLACEHOLDER`], a port the kernel never picks).
    pub qemu_args: Vec<String>,
    pub accel: Accel,
    /// vsock when asked for, or when the host has `/dev/vhost-vsock` under the host
    /// root (a run that then cannot bind a vsock port falls back to virtio-serial).
    pub channel: ChannelKind,
    /// The guest CID of the vsock device (vsock only); the run uses the same.
    pub vsock_cid: Option<u32>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The directory the run creates for its sockets (a plan does not create it).
    pub run_dir: PathBuf,
    /// Size of the guest's 64-bit PCI hole when gpucell sets it.
    pub pci_hole64_bytes: Option<u64>,
    /// With `--pin-cpus`: the host CPU for each vCPU, in the order QEMU lists them.
    pub vcpu_pin_targets: Vec<u32>,
    /// Whether QEMU runs under its seccomp filter.
    pub seccomp: bool,
    /// Whether QEMU runs jailed ([`crate::jail`]).
    pub jailed: bool,
    /// What the run would warn about (a large PCI hole, no seccomp in this QEMU).
    pub warnings: Vec<String>,
    /// What [`crate::command::qemu_command`] rendered `qemu_args` from.
    #[serde(skip)]
    pub input: CommandInput,
}

const NO_SECCOMP_WARNING: &str = "this QEMU has no seccomp support (-sandbox); running without it";

/// How QEMU's capabilities are found: cached and written back for a run, read only for
/// a plan.
type DetectCaps = fn(&Path, Option<&Path>) -> Result<QemuCaps, CapsError>;

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

fn user_exists(host_root: &Path, name: &str) -> bool {
    std::fs::read_to_string(host_root.join("etc/passwd"))
        .map(|t| t.lines().any(|l| l.split(':').next() == Some(name)))
        .unwrap_or(false)
}

/// The user QEMU should drop to under `policy`: with `Auto`, only when gpucell runs as
/// root, `gpucell-qemu` if `<host_root>/etc/passwd` has it, else `nobody`.
fn run_as_user(policy: &RunAsPolicy, host_root: &Path) -> Option<String> {
    match policy {
        RunAsPolicy::Never => None,
        RunAsPolicy::User(u) => Some(u.clone()),
        RunAsPolicy::Auto if nix::unistd::Uid::effective().is_root() => {
            Some(if user_exists(host_root, "gpucell-qemu") {
                "gpucell-qemu".to_string()
            } else {
                "nobody".to_string()
            })
        }
        RunAsPolicy::Auto => None,
    }
}

/// A failed phase after QEMU started: the error with what the guest and QEMU said.
fn with_logs(error: SandboxError, qemu: &QemuProcess) -> RunError {
    RunError {
        error: Box::new(error),
        console_tail: qemu.console().tail_lines(CONSOLE_LINES_ON_ERROR),
        qemu_stderr: qemu.stderr().tail_lines(10),
        vm_started: true,
    }
}

/// One sandbox about to run.
pub struct Sandbox {
    config: VmConfig,
    devices: DeviceSetup,
    id: String,
    /// The guest CID should the run use vsock; chosen up front so that a plan shows
    /// the run's own.
    vsock_cid: u32,
    /// What the QEMU binary supports, when the caller knows; else detected.
    caps: Option<QemuCaps>,
    /// The locked-memory limits QEMU inherits, when the caller knows; else this
    /// process's.
    memlock: Option<MemlockLimits>,
    /// The network device and the tap queue QEMU inherits (none in a plan).
    net: Option<(NetLayout, Option<std::os::fd::OwnedFd>)>,
    /// The jail's settings, when QEMU is to be jailed.
    jail: Option<crate::jail::JailConfig>,
    /// Spare PCIe root ports for disks plugged in while the VM runs (a pod's VM).
    spare_ports: u8,
    tx: EventSender,
    rx: EventReceiver,
}

/// The agent channel once connected.
enum Stream {
    Serial(UnixStream),
    Vsock(std::fs::File),
}

type Halves = (Box<dyn Read + Send>, Box<dyn Write + Send>);

impl Stream {
    /// A reader and a writer on the same channel.
    fn halves(&self) -> std::io::Result<Halves> {
        match self {
            Stream::Serial(s) => Ok((Box::new(s.try_clone()?), Box::new(s.try_clone()?))),
            Stream::Vsock(f) => Ok((Box::new(f.try_clone()?), Box::new(f.try_clone()?))),
        }
    }

    /// Ends the channel so the relay's reader thread sees EOF.
    fn close(&self) {
        if let Stream::Serial(s) = self {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Sandbox {
    /// A sandbox with a fresh random run id.
    pub fn new(config: VmConfig) -> Result<Self, SandboxError> {
        Self::with_id(config, new_run_id()?)
    }

    /// A sandbox with a run id from [`new_run_id`] (the caller needed it earlier, e.g.
    /// as the default hostname).
    pub fn with_id(config: VmConfig, id: String) -> Result<Self, SandboxError> {
        if id.len() != 16 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(SandboxError::BadRunId(id));
        }
        let (tx, rx) = crate::channel::event_channel();
        Ok(Sandbox {
            config,
            devices: DeviceSetup::default(),
            id,
            vsock_cid: crate::vsock::random_cid(),
            caps: None,
            memlock: None,
            net: None,
            jail: None,
            spare_ports: 0,
            tx,
            rx,
        })
    }

    /// Passes these PCI functions (already allocated and bound to vfio-pci), with
    /// hugepages and vCPU pinning as asked. See [`crate::devices`].
    pub fn with_devices(mut self, devices: DeviceSetup) -> Self {
        self.devices = devices;
        self
    }

    /// Uses these QEMU capabilities instead of asking the binary (`-version`, `-help`)
    /// when deciding the run-as flag and seccomp.
    pub fn with_qemu_caps(mut self, caps: QemuCaps) -> Self {
        self.caps = Some(caps);
        self
    }

    /// Checks passed functions' locked memory against these limits instead of this
    /// process's own.
    pub fn with_memlock_limits(mut self, limits: MemlockLimits) -> Self {
        self.memlock = Some(limits);
        self
    }

    /// Gives the VM a virtio-net device on the tap whose queue is `tap` (see
    /// [`NetLayout`]); a plan needs no tap, a run without one fails at spawn.
    pub fn with_network(mut self, layout: NetLayout, tap: Option<std::os::fd::OwnedFd>) -> Self {
        self.net = Some((layout, tap));
        self
    }

    /// Jails QEMU with these settings when they enable it and gpucell runs as root;
    /// otherwise the plan warns and QEMU runs unjailed. A jailed QEMU gets no run-as
    /// flag: the jail starts it as the sandbox's own uid.
    /// Gives the VM `n` spare PCIe root ports, for the disks of containers added while
    /// it runs ([`EventSender::add_container_on_disk`]).
    pub fn with_spare_ports(mut self, n: u8) -> Self {
        self.spare_ports = n.min(crate::hotplug::MAX_PORTS);
        self
    }

    pub fn with_jail(mut self, jail: crate::jail::JailConfig) -> Self {
        self.jail = Some(jail);
        self
    }

    /// The jail settings in force for this run, if QEMU is jailed.
    fn active_jail(&self) -> Option<&crate::jail::JailConfig> {
        self.jail
            .as_ref()
            .filter(|j| j.enabled && nix::unistd::Uid::effective().is_root())
    }

    /// The run id (16 hex digits): names the run directory and the QEMU process.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A handle for forwarding signals to the workload while [`Sandbox::run`] runs.
    pub fn events(&self) -> EventSender {
        self.tx.clone()
    }

    /// What [`Sandbox::run`] would start for an image of filesystem `rootfs_fstype`,
    /// with the refusals it would give before starting anything (bad configuration,
    /// socket paths too long, too many or repeated devices, a PCI hole beyond the host
    /// CPU's address bits, hugepages missing, a locked-memory limit too low).
    ///
    /// Creates no run directory, binds no socket, starts no VM and writes nothing. It
    /// reads the host root (`/dev/vhost-vsock`, `/etc/passwd`, cpuinfo, hugepages) and,
    /// when run-as or seccomp need them and neither [`Sandbox::with_qemu_caps`] nor the
    /// state dir's cache has them, asks the QEMU binary for its version and options.
    pub fn plan(&self, rootfs_fstype: &str) -> Result<Plan, SandboxError> {
        self.plan_with(rootfs_fstype, crate::caps::detect_read_only)
    }

    /// [`Sandbox::plan`], finding QEMU's capabilities with `detect`.
    fn plan_with(&self, rootfs_fstype: &str, detect: DetectCaps) -> Result<Plan, SandboxError> {
        let cfg = &self.config;
        let run_dir = run_dir_path(&cfg.state_dir, &self.id);
        let qmp_socket = socket_path(&run_dir, QMP_SOCKET)?;
        let agent_socket = socket_path(&run_dir, AGENT_SOCKET)?;
        let channel = self.planned_channel();
        let vm_devices = crate::devices::plan(
            &self.devices,
            cfg.accel,
            cfg.cpus,
            cfg.memory_mib,
            &cfg.host_root,
        )?;
        let mut vm_devices = vm_devices;
        vm_devices
            .devices
            .extend(crate::hotplug::spare_ports(self.spare_ports));
        let mut warnings: Vec<String> = vm_devices.warning.iter().cloned().collect();
        let (run_as, seccomp) = self.privileges(detect, &mut warnings)?;
        let jailed = self.active_jail().is_some();
        warnings.extend(self.jail.as_ref().and_then(crate::jail::unjailed_warning));
        let input = CommandInput {
            qemu: cfg.qemu.clone(),
            name: format!("gpucell-{}", self.id),
            accel: cfg.accel,
            cpus: cfg.cpus,
            memory_mib: cfg.memory_mib,
            kernel: cfg.kernel.clone(),
            initrd: cfg.initrd.clone(),
            base_cmdline: BASE_CMDLINE.iter().map(|w| w.to_string()).collect(),
            disk: Some(cfg.disk.clone()),
            driver_disk: cfg.driver_disk.clone(),
            rootfs_fstype: Some(rootfs_fstype.to_string()),
            console: true,
            qmp_socket: Some(qmp_socket),
            channel: Some(match channel {
                ChannelKind::Vsock => ChannelLayout::Vsock {
                    cid: self.vsock_cid,
                    port: Some(VSOCK_PORT_PLACEHOLDER),
                },
                ChannelKind::Serial => ChannelLayout::Serial {
                    socket: agent_socket,
                },
            }),
            devices: vm_devices,
            run_as,
            seccomp,
            extra_cmdline: cfg.extra_cmdline.clone(),
            net: self.net.as_ref().map(|(layout, _)| layout.clone()),
        };
        let command = qemu_command(&input)?;
        if !self.devices.devices.is_empty() {
            let limits = self.memlock.unwrap_or_else(MemlockLimits::of_this_process);
            crate::devices::check_memlock_within(cfg.memory_mib, &limits)?;
        }
        let targets = input.devices.pin_cpus.clone().unwrap_or_default();
        Ok(Plan {
            run_id: self.id.clone(),
            qemu: cfg.qemu.clone(),
            qemu_args: command.args(),
            accel: cfg.accel,
            channel,
            vsock_cid: (channel == ChannelKind::Vsock).then_some(self.vsock_cid),
            cpus: cfg.cpus,
            memory_mib: cfg.memory_mib,
            run_dir,
            pci_hole64_bytes: input.devices.hole64,
            vcpu_pin_targets: (0..cfg.cpus as usize)
                .filter_map(|n| targets.get(n % targets.len().max(1)).copied())
                .collect(),
            seccomp,
            jailed,
            warnings,
            input,
        })
    }

    /// The channel a run starts with: vsock where asked or where the host can.
    fn planned_channel(&self) -> ChannelKind {
        let vhost = || self.config.host_root.join("dev/vhost-vsock").exists();
        match self.config.channel {
            ChannelChoice::Serial => ChannelKind::Serial,
            ChannelChoice::Vsock => ChannelKind::Vsock,
            ChannelChoice::Auto if vhost() => ChannelKind::Vsock,
            ChannelChoice::Auto => ChannelKind::Serial,
        }
    }

    /// The user QEMU drops to (as this QEMU spells the flag) and whether seccomp is
    /// on; QEMU's capabilities are looked at only when either is wanted.
    fn privileges(
        &self,
        detect: DetectCaps,
        warnings: &mut Vec<String>,
    ) -> Result<(Option<RunAs>, bool), SandboxError> {
        let cfg = &self.config;
        let user = match self.active_jail() {
            Some(_) => None,
            None => run_as_user(&cfg.run_as, &cfg.host_root),
        };
        if user.is_none() && !cfg.seccomp {
            return Ok((None, false));
        }
        let caps = match &self.caps {
            Some(c) => c.clone(),
            None => detect(&cfg.qemu, Some(&cfg.state_dir))?,
        };
        let seccomp = cfg.seccomp && caps.seccomp;
        if cfg.seccomp && !seccomp {
            warnings.push(NO_SECCOMP_WARNING.to_string());
        }
        Ok((user.map(|u| caps.run_as(&u)), seccomp))
    }

    /// Binds the vsock listener the plan needs and puts its port in the plan; with
    /// [`ChannelChoice::Auto`] a vsock that cannot be bound falls back to virtio-serial.
    fn open_channel(&self, plan: &mut Plan) -> Result<Option<VsockListener>, SandboxError> {
        let Some(ChannelLayout::Vsock { cid, .. }) = plan.input.channel else {
            return Ok(None);
        };
        match VsockListener::bind_any() {
            Ok(l) => {
                let port = Some(l.port());
                plan.input.channel = Some(ChannelLayout::Vsock { cid, port });
                Ok(Some(l))
            }
            Err(e) if self.config.channel == ChannelChoice::Auto => {
                tracing::warn!(error = %e, "vsock unavailable, using virtio-serial");
                let socket = socket_path(&plan.run_dir, AGENT_SOCKET)?;
                plan.input.channel = Some(ChannelLayout::Serial { socket });
                plan.channel = ChannelKind::Serial;
                plan.vsock_cid = None;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Spawns QEMU, records it as the run directory's owner and waits for its monitor.
    fn start_vm(&self, cmd: &QemuCommand, dir: &RunDir, qmp_path: &Path) -> Result<Vm, RunError> {
        let cfg = &self.config;
        let jail = match self.active_jail() {
            Some(j) => Some(
                crate::jail::prepare(
                    j,
                    cmd,
                    dir.path(),
                    &self.id,
                    &crate::jail::libs::Cached::new(crate::jail::libs::Ldd, &cfg.state_dir),
                    Box::new(crate::jail::cgroup::RealCgroupFs),
                )
                .map_err(RunError::bare)?,
            ),
            None => None,
        };
        let spawned_at = Instant::now();
        let tap = self.net.as_ref().and_then(|(_, tap)| tap.as_ref());
        let fds: Vec<_> = tap.map(|t| (t.as_fd(), TAP_FD)).into_iter().collect();
        let mut qemu = QemuProcess::spawn_jailed(cmd, None, &fds, jail).map_err(RunError::bare)?;
        if let Err(e) = dir.record_owner(Some(qemu.pid())) {
            return Err(with_logs(e.into(), &qemu));
        }
        // QEMU coming up is part of the boot: it gets at least the boot timeout (a
        // slow host preallocating much memory can be given more with --boot-timeout).
        let startup =
            crate::memory::startup_wait(QMP_TIMEOUT, cfg.memory_mib, self.devices.preallocate())
                .max(cfg.limits.hello_timeout);
        let mut alive = || matches!(qemu.try_wait(), Ok(None));
        match crate::memory::connect_qmp(qmp_path, startup, QMP_TIMEOUT, &mut alive) {
            Ok(qmp) => {
                // QEMU installs its seccomp filter before it opens its monitor.
                if let Err(e) = qemu.check_jail() {
                    return Err(with_logs(e.into(), &qemu));
                }
                Ok(Vm {
                    qemu,
                    qmp: Arc::new(Mutex::new(qmp)),
                    spawned_at,
                    ready_at: Instant::now(),
                })
            }
            Err(source) => {
                if let Ok(Some(_)) = qemu.wait_timeout(Duration::from_millis(200)) {
                    // QEMU exited: its last words are on their way through the pipe.
                    let _ = qemu.stderr().wait_closed(Instant::now() + STDERR_DRAIN);
                }
                let stderr = qemu.stderr().tail_lines(5);
                Err(with_logs(
                    SandboxError::QmpConnect { stderr, source },
                    &qemu,
                ))
            }
        }
    }

    /// Boots the VM, runs `spec`, relays its streams and shuts everything down.
    #[tracing::instrument(skip_all, fields(accel = %self.config.accel))]
    pub fn run(self, spec: &RunSpec, io: SessionIo) -> Result<RunOutcome, RunError> {
        let t0 = Instant::now();
        let mut plan = self
            .plan_with(&spec.rootfs.fstype, crate::caps::detect)
            .map_err(RunError::bare)?;
        for w in &plan.warnings {
            tracing::warn!("{w}");
        }
        let jailed = self.active_jail().is_some();
        let dir = RunDir::create_with_quota(&self.config.state_dir, &self.id, jailed)
            .map_err(RunError::bare)?;
        let listener = self.open_channel(&mut plan).map_err(RunError::bare)?;
        let cmd = qemu_command(&plan.input).map_err(RunError::bare)?;
        let qmp_path = dir.socket(QMP_SOCKET).map_err(RunError::bare)?;
        let agent_path = dir.socket(AGENT_SOCKET).map_err(RunError::bare)?;
        let mut vm = self.start_vm(&cmd, &dir, &qmp_path)?;
        let hotplug = self.tx.hotplug().clone();
        if self.spare_ports > 0 {
            hotplug.open(Arc::clone(&vm.qmp), self.spare_ports, spec.gpu.clone());
        }
        let vcpu_pins = vm.pin(plan.input.devices.pin_cpus.as_deref())?;
        let hello_timeout = self.config.limits.hello_timeout;
        let stream = vm.connect_agent(&plan, listener.as_ref(), &agent_path, hello_timeout)?;
        let session =
            vm.relay_session(&stream, &agent_path, spec, io, &self.config.limits, self.rx);
        hotplug.close();
        let result = match session {
            Ok(report) => {
                vm.shut_down(true);
                let parts = OutcomeParts {
                    plan: &plan,
                    cmd: &cmd,
                    setup: &self.devices,
                    vcpu_pins,
                    t0,
                    spawned_at: vm.spawned_at,
                    ready_at: vm.ready_at,
                    gone_at: Instant::now(),
                    jail: vm.qemu.jail().map(|j| j.facts()),
                };
                Ok(outcome(parts, &report, spec))
            }
            Err(e) => Err(vm.fail(e)),
        };
        stream.close();
        drop(vm);
        drop(dir);
        result
    }
}

/// What [`outcome`] puts together besides the session's report.
struct OutcomeParts<'a> {
    plan: &'a Plan,
    cmd: &'a QemuCommand,
    setup: &'a DeviceSetup,
    vcpu_pins: Vec<VcpuPin>,
    t0: Instant,
    spawned_at: Instant,
    ready_at: Instant,
    gone_at: Instant,
    jail: Option<crate::jail::JailFacts>,
}

/// The outcome of a run whose workload exited.
fn outcome(
    p: OutcomeParts<'_>,
    report: &crate::channel::SessionReport,
    spec: &RunSpec,
) -> RunOutcome {
    let started = report.started_at.unwrap_or(report.run_sent_at);
    RunOutcome {
        run_id: p.plan.run_id.clone(),
        exit_code: report.status.shell_code(),
        status: report.status,
        accel: p.plan.accel,
        channel: p.plan.channel,
        cpus: p.plan.cpus,
        memory_mib: p.plan.memory_mib,
        guest_kernel: report.hello.kernel.clone(),
        agent: report.hello.agent.clone(),
        devices: report.devices.clone(),
        stdout_bytes: report.stdout_bytes,
        stderr_bytes: report.stderr_bytes,
        signals_forwarded: report.signals_forwarded.clone(),
        timings: Timings {
            vm_start_ms: ms(p.ready_at - p.spawned_at),
            kernel_boot_ms: report.hello.uptime_ms,
            agent_ready_ms: ms(report.hello_at - p.spawned_at),
            devices_visible_ms: report
                .devices_at
                .filter(|_| !spec.devices.is_empty())
                .map(|t| ms(t.saturating_duration_since(report.run_sent_at))),
            process_start_ms: ms(started.saturating_duration_since(report.run_sent_at)),
            workload_ms: ms(report.exited_at.saturating_duration_since(started)),
            shutdown_ms: ms(p.gone_at.saturating_duration_since(report.exited_at)),
            total_ms: ms(p.t0.elapsed()),
        },
        qemu_args: p.cmd.args(),
        passthrough: crate::devices::map_to_guest(&p.setup.devices, &report.devices),
        pci_hole64_bytes: p.plan.input.devices.hole64,
        vcpu_pins: p.vcpu_pins,
        driver: report.driver.clone(),
        jail: p.jail,
        spawned_at: Some(p.spawned_at),
    }
}
