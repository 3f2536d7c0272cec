//! One microVM running one workload, from start to a clean end.
//!
//! ```text
//! run dir ─► QEMU (paused? no: boots at once) ─► QMP ready ─► agent channel
//!        ─► relay (hello, run, output, exit) ─► guest powers off ─► QEMU exits
//! ```
//! Every exit path — success, error, signal, QEMU killed, timeout — drops the guards
//! in reverse order: QEMU's process group is killed and reaped, then the run directory
//! with its sockets is removed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpucell_protocol::{DeviceInfo, ExitStatus, RunSpec, VIRTIO_SERIAL_PORT_NAME};
use serde::Serialize;

use crate::args::{
    Accel, Boot, Chardev, Device, Drive, KernelCmdline, Machine, QemuCommand, Resources, Seccomp,
};
use crate::channel::{relay, EventReceiver, EventSender, Limits, SessionError, SessionIo};
use crate::devices::{DeviceSetup, PassedMapping, VcpuPin};
use crate::process::{describe_exit, QemuProcess};
use crate::qmp::Qmp;
use crate::rundir::{new_run_id, RunDir};
use crate::vsock::VsockListener;

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const AGENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest has to power off by itself after the workload exited.
const POWEROFF_GRACE: Duration = Duration::from_secs(5);
/// How long QEMU has to exit after QMP `quit` before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(2);
/// Lines of the serial console shown with an error.
pub const CONSOLE_LINES_ON_ERROR: usize = 25;

/// How the host talks to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Serial,
    Vsock,
}

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
    #[error("the VM stopped before its agent connected (QEMU {status}){}", qemu_said(.stderr))]
    VmExited { status: String, stderr: String },
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("run id {0:?} is not 16 hex digits")]
    BadRunId(String),
    #[error(transparent)]
    Devices(#[from] crate::devices::DevicesError),
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
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

fn user_exists(host_root: &Path, name: &str) -> bool {
    std::fs::read_to_string(host_root.join("etc/passwd"))
        .map(|t| t.lines().any(|l| l.split(':').next() == Some(name)))
        .unwrap_or(false)
}

/// One sandbox about to run.
pub struct Sandbox {
    config: VmConfig,
    devices: DeviceSetup,
    id: String,
    tx: EventSender,
    rx: EventReceiver,
}

enum Stream {
    Serial(UnixStream),
    Vsock(std::fs::File),
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

    /// The run id (16 hex digits): names the run directory and the QEMU process.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A handle for forwarding signals to the workload while [`Sandbox::run`] runs.
    pub fn events(&self) -> EventSender {
        self.tx.clone()
    }

    /// Boots the VM, runs `spec`, relays its streams and shuts everything down.
    #[tracing::instrument(skip_all, fields(accel = %self.config.accel))]
    pub fn run(self, spec: &RunSpec, io: SessionIo) -> Result<RunOutcome, RunError> {
        let t0 = Instant::now();
        let cfg = &self.config;
        let id = self.id.clone();
        let dir = RunDir::create(&cfg.state_dir, &id).map_err(RunError::bare)?;
        let qmp_path = dir.socket("qmp.sock").map_err(RunError::bare)?;
        let agent_path = dir.socket("agent.sock").map_err(RunError::bare)?;

        // Channel: vsock where the host can, virtio-serial otherwise.
        let vhost = cfg.host_root.join("dev/vhost-vsock").exists();
        let mut vsock: Option<(VsockListener, u32)> = None;
        match cfg.channel {
            ChannelChoice::Serial => {}
            ChannelChoice::Vsock => {
                let l = VsockListener::bind_any().map_err(RunError::bare)?;
                vsock = Some((l, crate::vsock::random_cid()));
            }
            ChannelChoice::Auto if vhost => match VsockListener::bind_any() {
                Ok(l) => vsock = Some((l, crate::vsock::random_cid())),
                Err(e) => tracing::warn!(error = %e, "vsock unavailable, using virtio-serial"),
            },
            ChannelChoice::Auto => {}
        }
        let channel = if vsock.is_some() {
            ChannelKind::Vsock
        } else {
            ChannelKind::Serial
        };

        let mut cmdline = KernelCmdline::new();
        let chan_word = format!(
            "{}={}",
            gpucell_protocol::CMDLINE_CHANNEL_KEY,
            if channel == ChannelKind::Vsock {
                "vsock"
            } else {
                "serial"
            }
        );
        for w in ["console=ttyS0", "panic=-1", "quiet", chan_word.as_str()] {
            cmdline.push(w).map_err(RunError::bare)?;
        }
        // Only this image's filesystem modules are loaded at boot.
        cmdline
            .push(format!(
                "{}={}",
                gpucell_protocol::CMDLINE_ROOTFS_KEY,
                spec.rootfs.fstype
            ))
            .map_err(RunError::bare)?;
        if let Some((l, _)) = &vsock {
            cmdline
                .push(format!(
                    "{}={}",
                    gpucell_protocol::CMDLINE_VSOCK_PORT_KEY,
                    l.port()
                ))
                .map_err(RunError::bare)?;
        }
        for w in &cfg.extra_cmdline {
            cmdline.push(w.clone()).map_err(RunError::bare)?;
        }
        let setup = &self.devices;
        let vm_devices =
            crate::devices::plan(setup, cfg.accel, cfg.cpus, cfg.memory_mib, &cfg.host_root)
                .map_err(RunError::bare)?;
        if let Some(w) = &vm_devices.warning {
            tracing::warn!("{w}");
        }
        for w in &vm_devices.cmdline {
            cmdline.push(*w).map_err(RunError::bare)?;
        }

        let mut chardevs = vec![
            Chardev::stdio("console").map_err(RunError::bare)?,
            Chardev::socket_server("qmp", &qmp_path).map_err(RunError::bare)?,
        ];
        let mut devices = vec![Device::VirtioBlk {
            drive: "rootfs".into(),
        }];
        let mut drives = vec![Drive::new("rootfs", &cfg.disk, true).map_err(RunError::bare)?];
        if let Some(d) = &cfg.driver_disk {
            drives.push(Drive::new("driver", d, true).map_err(RunError::bare)?);
            devices.push(Device::VirtioBlk {
                drive: "driver".into(),
            });
        }
        match &vsock {
            Some((_, cid)) => devices.push(Device::VhostVsock { guest_cid: *cid }),
            None => {
                chardevs
                    .push(Chardev::socket_server("agent", &agent_path).map_err(RunError::bare)?);
                devices.push(Device::VirtioSerial { id: "vser0".into() });
                devices.push(Device::VirtSerialPort {
                    chardev: "agent".into(),
                    name: VIRTIO_SERIAL_PORT_NAME.into(),
                });
            }
        }
        // Passed functions, each on its own root port, then the memory backend.
        devices.extend(vm_devices.devices.iter().cloned());
        let (hole64, pin_cpus) = (vm_devices.hole64, vm_devices.pin_cpus.clone());

        let is_root = nix::unistd::Uid::effective().is_root();
        let run_as_user = match &cfg.run_as {
            RunAsPolicy::Never => None,
            RunAsPolicy::User(u) => Some(u.clone()),
            RunAsPolicy::Auto if is_root => Some(if user_exists(&cfg.host_root, "gpucell-qemu") {
                "gpucell-qemu".to_string()
            } else {
                "nobody".to_string()
            }),
            RunAsPolicy::Auto => None,
        };
        let caps = if run_as_user.is_some() || cfg.seccomp {
            Some(crate::caps::detect(&cfg.qemu, Some(&cfg.state_dir)).map_err(RunError::bare)?)
        } else {
            None
        };
        let seccomp = caps
            .as_ref()
            .filter(|c| cfg.seccomp && c.seccomp)
            .map(|_| Seccomp {
                allow_setuid: run_as_user.is_some(),
            });
        if cfg.seccomp && seccomp.is_none() {
            tracing::warn!("this QEMU has no seccomp support (-sandbox); running without it");
        }
        let resources = Resources {
            cpus: cfg.cpus,
            memory_mib: cfg.memory_mib,
        };
        resources.validate().map_err(RunError::bare)?;
        let cmd = QemuCommand {
            binary: cfg.qemu.clone(),
            name: format!("gpucell-{id}"),
            machine: Machine {
                pci_hole64_size: hole64,
            },
            accel: cfg.accel,
            cpu: vm_devices.cpu.clone(),
            resources,
            boot: Some(Boot::new(&cfg.kernel, &cfg.initrd, cmdline).map_err(RunError::bare)?),
            start_paused: false,
            drives,
            chardevs,
            devices,
            qmp: Some("qmp".into()),
            serial: Some("console".into()),
            seccomp,
            run_as: match (&caps, run_as_user) {
                (Some(c), Some(u)) => Some(c.run_as(&u)),
                _ => None,
            },
        };

        if !setup.devices.is_empty() {
            crate::devices::check_memlock(cfg.memory_mib).map_err(RunError::bare)?;
        }
        let t_spawn = Instant::now();
        let mut qemu = QemuProcess::spawn(&cmd, None).map_err(RunError::bare)?;
        let with_logs = |error: SandboxError, qemu: &QemuProcess| RunError {
            error: Box::new(error),
            console_tail: qemu.console().tail_lines(CONSOLE_LINES_ON_ERROR),
            qemu_stderr: qemu.stderr().tail_lines(10),
            vm_started: true,
        };
        if let Err(e) = dir.record_owner(Some(qemu.pid())) {
            return Err(with_logs(e.into(), &qemu));
        }
        // QEMU coming up is part of the boot: it gets at least the boot timeout (a
        // slow host preallocating much memory can be given more with --boot-timeout).
        let startup = crate::memory::startup_wait(QMP_TIMEOUT, cfg.memory_mib, setup.preallocate())
            .max(cfg.limits.hello_timeout);
        let mut alive = || matches!(qemu.try_wait(), Ok(None));
        let connected = crate::memory::connect_qmp(&qmp_path, startup, QMP_TIMEOUT, &mut alive);
        let mut qmp = match connected {
            Ok(q) => q,
            Err(source) => {
                let _ = qemu.wait_timeout(Duration::from_millis(200));
                let stderr = qemu.stderr().tail_lines(5);
                return Err(with_logs(
                    SandboxError::QmpConnect { stderr, source },
                    &qemu,
                ));
            }
        };
        let vm_started = Instant::now();
        let mut vcpu_pins = Vec::new();
        if let Some(cpus) = &pin_cpus {
            let pinned = crate::devices::pin_vcpus(&mut qmp, cpus).and_then(|p| {
                let tids: Vec<i32> = p.iter().map(|v| v.thread_id).collect();
                crate::devices::pin_emulator_threads(qemu.pid(), &tids, cpus).map(|_| p)
            });
            match pinned {
                Ok(p) => vcpu_pins = p,
                Err(e) => return Err(with_logs(e.into(), &qemu)),
            }
        }

        let stream = match &vsock {
            None => match UnixStream::connect(&agent_path) {
                Ok(s) => {
                    let _ = s.set_write_timeout(Some(AGENT_WRITE_TIMEOUT));
                    Stream::Serial(s)
                }
                Err(source) => {
                    return Err(with_logs(
                        SandboxError::AgentConnect {
                            path: agent_path.clone(),
                            source,
                        },
                        &qemu,
                    ))
                }
            },
            Some((listener, cid)) => {
                let deadline = Instant::now() + cfg.limits.hello_timeout;
                let accepted = listener
                    .accept_from(*cid, deadline, &mut || matches!(qemu.try_wait(), Ok(None)));
                match accepted {
                    Ok(f) => Stream::Vsock(f),
                    Err(e) => {
                        let error = match qemu.wait_timeout(Duration::from_millis(200)) {
                            Ok(Some(status)) => SandboxError::VmExited {
                                status: status.to_string(),
                                stderr: qemu.stderr().tail_lines(5),
                            },
                            _ => e.into(),
                        };
                        return Err(with_logs(error, &qemu));
                    }
                }
            }
        };
        let halves: std::io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> = match &stream {
            Stream::Serial(s) => s.try_clone().and_then(|r| {
                Ok((
                    Box::new(r) as Box<dyn Read + Send>,
                    Box::new(s.try_clone()?) as Box<dyn Write + Send>,
                ))
            }),
            Stream::Vsock(f) => f.try_clone().and_then(|r| {
                Ok((
                    Box::new(r) as Box<dyn Read + Send>,
                    Box::new(f.try_clone()?) as Box<dyn Write + Send>,
                ))
            }),
        };
        let (reader, writer) = match halves {
            Ok(h) => h,
            Err(source) => {
                return Err(with_logs(
                    SandboxError::AgentConnect {
                        path: agent_path.clone(),
                        source,
                    },
                    &qemu,
                ))
            }
        };

        // The relay polls this to learn that the VM died or stopped under it.
        let mut last_status = Instant::now();
        let session = {
            let qemu = &mut qemu;
            let qmp = &mut qmp;
            let mut vm_gone = move || -> Option<String> {
                match qemu.try_wait() {
                    Ok(Some(st)) => {
                        let said = qemu.stderr().tail_lines(3);
                        return Some(format!(
                            "QEMU exited ({}){}",
                            describe_exit(&st),
                            qemu_said(&said)
                        ));
                    }
                    Ok(None) => {}
                    Err(e) => return Some(e.to_string()),
                }
                if last_status.elapsed() >= Duration::from_secs(1) {
                    last_status = Instant::now();
                    if let Ok(s) = qmp.status() {
                        if matches!(
                            s.as_str(),
                            "internal-error" | "guest-panicked" | "io-error" | "shutdown"
                        ) {
                            return Some(format!("the VM stopped (QEMU status {s})"));
                        }
                    }
                }
                None
            };
            relay(reader, writer, spec, io, &cfg.limits, self.rx, &mut vm_gone)
        };

        // Shut down: the agent powers off after Exited (and on Shutdown); give it a
        // moment, then ask QEMU to quit, then kill it.
        let end = |qemu: &mut QemuProcess, qmp: &mut Qmp, graceful: bool| {
            let exited = graceful && matches!(qemu.wait_timeout(POWEROFF_GRACE), Ok(Some(_)));
            if !exited {
                let _ = qmp.quit();
                if !matches!(qemu.wait_timeout(QUIT_GRACE), Ok(Some(_))) {
                    tracing::warn!(pid = qemu.pid(), "QEMU did not quit; killing it");
                }
            }
            qemu.kill();
        };
        let result = match session {
            Ok(report) => {
                end(&mut qemu, &mut qmp, true);
                let gone = Instant::now();
                let started = report.started_at.unwrap_or(report.run_sent_at);
                Ok(RunOutcome {
                    run_id: id.clone(),
                    exit_code: report.status.shell_code(),
                    status: report.status,
                    accel: cfg.accel,
                    channel,
                    cpus: cfg.cpus,
                    memory_mib: cfg.memory_mib,
                    guest_kernel: report.hello.kernel.clone(),
                    agent: report.hello.agent.clone(),
                    devices: report.devices.clone(),
                    stdout_bytes: report.stdout_bytes,
                    stderr_bytes: report.stderr_bytes,
                    signals_forwarded: report.signals_forwarded.clone(),
                    timings: Timings {
                        vm_start_ms: ms(vm_started - t_spawn),
                        kernel_boot_ms: report.hello.uptime_ms,
                        agent_ready_ms: ms(report.hello_at - t_spawn),
                        devices_visible_ms: report
                            .devices_at
                            .filter(|_| !spec.devices.is_empty())
                            .map(|t| ms(t.saturating_duration_since(report.run_sent_at))),
                        process_start_ms: ms(started.saturating_duration_since(report.run_sent_at)),
                        workload_ms: ms(report.exited_at.saturating_duration_since(started)),
                        shutdown_ms: ms(gone.saturating_duration_since(report.exited_at)),
                        total_ms: ms(t0.elapsed()),
                    },
                    qemu_args: cmd.args(),
                    passthrough: crate::devices::map_to_guest(&setup.devices, &report.devices),
                    pci_hole64_bytes: hole64,
                    vcpu_pins,
                    driver: report.driver.clone(),
                })
            }
            Err(e) => {
                let graceful = matches!(e, SessionError::Interrupted(_) | SessionError::Timeout(_));
                end(&mut qemu, &mut qmp, graceful);
                // Let the capture threads take QEMU's last words.
                std::thread::sleep(Duration::from_millis(50));
                Err(with_logs(e.into(), &qemu))
            }
        };
        if let Stream::Serial(s) = &stream {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        drop(qemu);
        drop(dir);
        result
    }
}
