//! Typed messages carried in frames: the JSON bodies of control frames and the two
//! direction enums, built on [`crate::frame`].
//!
//! A field added to a body must keep older peers working: give it `#[serde(default)]`
//! so JSON from a peer without it still parses (serde skips fields it does not know, so
//! an older peer reads the newer JSON).

use serde::{Deserialize, Serialize};

use crate::frame::{FrameError, FrameWriter, RawFrame};
use crate::kind::Kind;
use crate::proc::{self, ContainerAdd, ErrorBody, ExitedBody, ProcStart};

/// First message of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHello {
    pub version: u32,
}

/// First message of the agent, sent as soon as its channel is open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestHello {
    pub version: u32,
    /// `gpucell-agent` version string.
    pub agent: String,
    /// Guest kernel release (`uname -r`).
    pub kernel: String,
    /// Guest uptime when the agent sent this, in milliseconds: the kernel boot time.
    pub uptime_ms: u64,
}

/// The filesystem holding the image's root, as the agent must mount it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsSpec {
    /// Block device in the guest, e.g. `/dev/vda`.
    pub device: String,
    /// `erofs` or `ext4`.
    pub fstype: String,
}

/// A PCI function the agent must wait for before starting the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMatch {
    pub vendor: u16,
    pub device: u16,
}

/// What to run. The host has already merged the image config with the run's
/// overrides; the agent resolves `user` and the executable inside the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// argv; `args[0]` is looked up in the image's `PATH` when it has no `/`.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// Working directory inside the container root.
    pub cwd: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    #[serde(default)]
    pub user: String,
    pub hostname: String,
    pub rootfs: RootfsSpec,
    /// Size limit of the writable tmpfs overlay, in bytes; `None` lets the kernel choose.
    #[serde(default)]
    pub overlay_bytes: Option<u64>,
    /// PCI functions passed through that the workload expects to see.
    #[serde(default)]
    pub devices: Vec<DeviceMatch>,
    /// How long the agent waits for `devices` to appear, in milliseconds.
    #[serde(default)]
    pub device_wait_ms: u64,
    /// The NVIDIA driver injected into the container; `None`: nothing is injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuInjection>,
    /// The pod's sandbox process: the agent runs no `args` but holds, as `pause` does
    /// (SIGTERM or SIGINT end it with 0, another signal N with 128+N), while the pod's
    /// containers are added beside it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pod_sandbox: bool,
    /// Files the container gets in its `/etc` over the image's (a pod's `resolv.conf`,
    /// `hosts` and `hostname`, which the orchestrator writes for each pod).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etc_files: Vec<EtcFile>,
    /// The process gets a terminal (a pty in the guest): its output, stdout and stderr
    /// merged, comes as `Stdout`; stdin's end is the terminal's end-of-file character.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminal: bool,
    /// The terminal's first size; `None` leaves the kernel's (0x0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSize>,
    /// The container's volumes (checked by [`crate::volumes_problem`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::Volume>,
}

/// Largest number of rows or columns of a terminal.
pub const MAX_WINDOW_DIMENSION: u16 = 10_000;

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

impl WindowSize {
    /// What is wrong with this size, if anything: each side is 1 to
    /// [`MAX_WINDOW_DIMENSION`].
    pub fn problem(&self) -> Option<String> {
        let ok = |n: u16| (1..=MAX_WINDOW_DIMENSION).contains(&n);
        (!ok(self.rows) || !ok(self.cols)).then(|| {
            format!(
                "terminal size {}x{} (rows x columns): each must be 1 to {MAX_WINDOW_DIMENSION}",
                self.rows, self.cols
            )
        })
    }
}

/// A file written into the container's `/etc`: `name` is one of [`ETC_FILE_NAMES`],
/// `content` at most [`MAX_ETC_FILE`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcFile {
    pub name: String,
    pub content: String,
}

/// The files of `/etc` a run may set.
pub const ETC_FILE_NAMES: [&str; 3] = ["resolv.conf", "hosts", "hostname"];
/// Largest `/etc` file a run may set.
pub const MAX_ETC_FILE: usize = 64 << 10;

impl EtcFile {
    /// What is wrong with this file, if anything.
    pub fn problem(&self) -> Option<String> {
        if !ETC_FILE_NAMES.contains(&self.name.as_str()) {
            return Some(format!(
                "/etc/{} cannot be set (only {})",
                self.name.chars().take(64).collect::<String>(),
                ETC_FILE_NAMES.join(", ")
            ));
        }
        if self.content.len() > MAX_ETC_FILE {
            return Some(format!(
                "/etc/{} is {} bytes, over the most, {MAX_ETC_FILE}",
                self.name,
                self.content.len()
            ));
        }
        self.content
            .contains('\0')
            .then(|| format!("/etc/{} contains a NUL byte", self.name))
    }
}

/// What the host decided about the NVIDIA driver in the container (docs/cuda.md): the
/// agent applies the image's environment contract and a CDI spec of the guest's driver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInjection {
    /// The CDI spec (JSON of `gpucell_nvidia::cdi::Spec`) of the guest's driver; empty:
    /// the agent generates it from `driver_root`, the guest's `/dev` and its GPUs.
    #[serde(default)]
    pub cdi_spec: String,
    /// Where the driver's files are in the guest; empty means `/`.
    #[serde(default)]
    pub driver_root: String,
    /// Replaces the environment's `NVIDIA_VISIBLE_DEVICES` when set.
    #[serde(default)]
    pub visible_devices: Option<String>,
    /// Replaces the environment's `NVIDIA_DRIVER_CAPABILITIES` when set.
    #[serde(default)]
    pub capabilities: Option<String>,
    /// The run passes GPUs: an unset `NVIDIA_VISIBLE_DEVICES` means `all`.
    #[serde(default)]
    pub gpus_requested: bool,
    /// Inject even without GPUs or NVIDIA variables (tests of a GPU-less guest).
    #[serde(default)]
    pub force: bool,
    /// The GPUs are data-centre ones: the image's CUDA forward compatibility may be used.
    #[serde(default)]
    pub compat_allowed: bool,
    /// The driver's CUDA version (`cuDriverGetVersion`, e.g. `13.0`). Set: the agent
    /// checks the image's `NVIDIA_REQUIRE_*` before the workload starts.
    #[serde(default)]
    pub cuda_version: Option<String>,
    /// The visible GPUs' facts for `arch` and `brand` conditions, in index order.
    #[serde(default)]
    pub gpus: Vec<GpuFacts>,
}

/// A GPU as `NVIDIA_REQUIRE_*` conditions see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuFacts {
    /// Compute capability, e.g. `9.0`.
    pub arch: String,
    /// NVML brand, e.g. `Tesla`, `NVIDIA`, `GeForce`; empty when unknown.
    #[serde(default)]
    pub brand: String,
}

/// A PCI function as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Guest BDF, e.g. `0000:01:00.0`.
    pub bdf: String,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
}

/// One NVIDIA GPU as the driver in the guest reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuReport {
    /// Guest PCI address, e.g. `0000:01:00.0`.
    pub bdf: String,
    pub name: String,
    pub uuid: String,
    /// Total memory in MiB.
    pub memory_mib: u64,
    pub driver_version: String,
    /// CUDA version the driver supports, `major.minor`.
    pub cuda_version: String,
}

/// The NVIDIA driver bring-up of a driver flavour, sent after `Devices` and before the
/// workload starts. A flavour without a driver sends none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverReport {
    /// The guest flavour's driver, e.g. `nvidia-550`.
    pub flavour: String,
    pub driver_version: String,
    pub cuda_version: String,
    /// Every GPU that answered; empty when no NVIDIA GPU was passed.
    pub gpus: Vec<GpuReport>,
    /// Milliseconds from the start of the bring-up until every GPU answered.
    pub driver_ready_ms: u64,
    /// What happened, in words (e.g. that no NVIDIA GPU was passed).
    #[serde(default)]
    pub message: String,
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when the process exited.
    pub code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell convention: the exit code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// Messages the host sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromHost {
    Hello(HostHello),
    Run(Box<RunSpec>),
    Stdin(Vec<u8>),
    StdinEof,
    /// Deliver this signal number to the workload.
    Signal(i32),
    /// Power the VM off now.
    Shutdown,
    /// Start a process (an exec) in a running container.
    ProcStart(Box<ProcStart>),
    ProcStdin {
        id: u32,
        data: Vec<u8>,
    },
    ProcStdinEof {
        id: u32,
    },
    ProcSignal {
        id: u32,
        signal: i32,
    },
    /// Start a second container of the pod from a disk the host has plugged in.
    ContainerAdd(Box<ContainerAdd>),
    /// The terminal of the workload (`id: None`) or of process `id` has a new size.
    Resize {
        id: Option<u32>,
        size: WindowSize,
    },
}

/// Messages the agent sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromGuest {
    Hello(GuestHello),
    Devices(Vec<DeviceInfo>),
    /// The workload process started with this pid (in the guest).
    Started {
        pid: i32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited(ExitStatus),
    /// The agent could not do what was asked (bad image, missing executable...).
    Error {
        message: String,
    },
    Log {
        message: String,
    },
    Driver(DriverReport),
    /// Process `id` (a `ProcStart` or `ContainerAdd`) started with this guest pid.
    ProcStarted {
        id: u32,
        pid: i32,
    },
    ProcStdout {
        id: u32,
        data: Vec<u8>,
    },
    ProcStderr {
        id: u32,
        data: Vec<u8>,
    },
    /// Process `id` ended and its output is drained.
    ProcExited {
        id: u32,
        status: ExitStatus,
    },
    /// Process `id` could not be started (or was refused); it has no other frames.
    ProcError {
        id: u32,
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
struct SignalBody {
    signal: i32,
}
#[derive(Serialize, Deserialize)]
struct ResizeBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<u32>,
    rows: u16,
    cols: u16,
}

/// A `Resize` payload; a size out of bounds is refused.
fn parse_resize(kind: Kind, payload: &[u8]) -> Result<FromHost, FrameError> {
    let b: ResizeBody = parse(kind, payload)?;
    let size = WindowSize {
        rows: b.rows,
        cols: b.cols,
    };
    if let Some(problem) = size.problem() {
        return Err(FrameError::Invalid { kind, problem });
    }
    Ok(FromHost::Resize { id: b.id, size })
}

#[derive(Serialize, Deserialize)]
struct StartedBody {
    pid: i32,
}
#[derive(Serialize, Deserialize)]
struct MessageBody {
    message: String,
}

/// `id` (big-endian) followed by `data`: the payload of a `Proc*` data frame.
fn with_id(id: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + data.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn parse<'a, T: Deserialize<'a>>(kind: Kind, payload: &'a [u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(|source| FrameError::BadPayload { kind, source })
}

impl FromHost {
    pub fn encode(&self) -> (Kind, Vec<u8>) {
        match self {
            FromHost::Hello(h) => (Kind::HostHello, json(h)),
            FromHost::Run(r) => (Kind::Run, json(r)),
            FromHost::Stdin(d) => (Kind::Stdin, d.clone()),
            FromHost::StdinEof => (Kind::StdinEof, Vec::new()),
            FromHost::Signal(s) => (Kind::Signal, json(&SignalBody { signal: *s })),
            FromHost::Shutdown => (Kind::Shutdown, Vec::new()),
            FromHost::ProcStart(p) => (Kind::ProcStart, json(p)),
            FromHost::ProcStdin { id, data } => (Kind::ProcStdin, with_id(*id, data)),
            FromHost::ProcStdinEof { id } => (Kind::ProcStdinEof, id.to_be_bytes().to_vec()),
            FromHost::ProcSignal { id, signal } => (
                Kind::ProcSignal,
                json(&proc::SignalBody {
                    id: *id,
                    signal: *signal,
                }),
            ),
            FromHost::ContainerAdd(c) => (Kind::ContainerAdd, json(c)),
            FromHost::Resize { id, size } => (
                Kind::Resize,
                json(&ResizeBody {
                    id: *id,
                    rows: size.rows,
                    cols: size.cols,
                }),
            ),
        }
    }

    pub fn decode(frame: RawFrame) -> Result<Self, FrameError> {
        let RawFrame { kind, payload } = frame;
        Ok(match kind {
            Kind::HostHello => FromHost::Hello(parse(kind, &payload)?),
            Kind::Run => FromHost::Run(Box::new(parse(kind, &payload)?)),
            Kind::Stdin => FromHost::Stdin(payload),
            Kind::StdinEof => FromHost::StdinEof,
            Kind::Signal => FromHost::Signal(parse::<SignalBody>(kind, &payload)?.signal),
            Kind::Shutdown => FromHost::Shutdown,
            Kind::ProcStart => FromHost::ProcStart(Box::new(parse(kind, &payload)?)),
            Kind::ProcStdin => {
                let (id, data) = proc::split_id(kind, payload)?;
                FromHost::ProcStdin { id, data }
            }
            Kind::ProcStdinEof => FromHost::ProcStdinEof {
                id: proc::id_only(kind, &payload)?,
            },
            Kind::ProcSignal => {
                let b: proc::SignalBody = parse(kind, &payload)?;
                FromHost::ProcSignal {
                    id: b.id,
                    signal: b.signal,
                }
            }
            Kind::ContainerAdd => FromHost::ContainerAdd(Box::new(parse(kind, &payload)?)),
            Kind::Resize => parse_resize(kind, &payload)?,
            other => return Err(FrameError::WrongDirection(other)),
        })
    }

    /// Sends this message; stdin larger than one frame is split.
    pub fn send<W: std::io::Write>(&self, w: &mut FrameWriter<W>) -> Result<(), FrameError> {
        if let FromHost::ProcStdin { id, data } = self {
            return w.write_proc_data(Kind::ProcStdin, *id, data);
        }
        let (kind, payload) = self.encode();
        w.write_frame(kind, &payload)
    }
}

impl FromGuest {
    pub fn encode(&self) -> (Kind, Vec<u8>) {
        match self {
            FromGuest::Hello(h) => (Kind::GuestHello, json(h)),
            FromGuest::Devices(d) => (Kind::Devices, json(d)),
            FromGuest::Started { pid } => (Kind::Started, json(&StartedBody { pid: *pid })),
            FromGuest::Stdout(d) => (Kind::Stdout, d.clone()),
            FromGuest::Stderr(d) => (Kind::Stderr, d.clone()),
            FromGuest::Exited(s) => (Kind::Exited, json(s)),
            FromGuest::Error { message } => (
                Kind::Error,
                json(&MessageBody {
                    message: message.clone(),
                }),
            ),
            FromGuest::Log { message } => (
                Kind::Log,
                json(&MessageBody {
                    message: message.clone(),
                }),
            ),
            FromGuest::Driver(d) => (Kind::Driver, json(d)),
            FromGuest::ProcStarted { id, pid } => (
                Kind::ProcStarted,
                json(&proc::StartedBody { id: *id, pid: *pid }),
            ),
            FromGuest::ProcStdout { id, data } => (Kind::ProcStdout, with_id(*id, data)),
            FromGuest::ProcStderr { id, data } => (Kind::ProcStderr, with_id(*id, data)),
            FromGuest::ProcExited { id, status } => (
                Kind::ProcExited,
                json(&ExitedBody {
                    id: *id,
                    status: *status,
                }),
            ),
            FromGuest::ProcError { id, message } => (
                Kind::ProcError,
                json(&ErrorBody {
                    id: *id,
                    message: message.clone(),
                }),
            ),
        }
    }

    pub fn decode(frame: RawFrame) -> Result<Self, FrameError> {
        let RawFrame { kind, payload } = frame;
        Ok(match kind {
            Kind::GuestHello => FromGuest::Hello(parse(kind, &payload)?),
            Kind::Devices => FromGuest::Devices(parse(kind, &payload)?),
            Kind::Started => FromGuest::Started {
                pid: parse::<StartedBody>(kind, &payload)?.pid,
            },
            Kind::Stdout => FromGuest::Stdout(payload),
            Kind::Stderr => FromGuest::Stderr(payload),
            Kind::Exited => FromGuest::Exited(parse(kind, &payload)?),
            Kind::Error => FromGuest::Error {
                message: parse::<MessageBody>(kind, &payload)?.message,
            },
            Kind::Log => FromGuest::Log {
                message: parse::<MessageBody>(kind, &payload)?.message,
            },
            Kind::Driver => FromGuest::Driver(parse(kind, &payload)?),
            Kind::ProcStarted => {
                let b: proc::StartedBody = parse(kind, &payload)?;
                FromGuest::ProcStarted {
                    id: b.id,
                    pid: b.pid,
                }
            }
            Kind::ProcStdout => {
                let (id, data) = proc::split_id(kind, payload)?;
                FromGuest::ProcStdout { id, data }
            }
            Kind::ProcStderr => {
                let (id, data) = proc::split_id(kind, payload)?;
                FromGuest::ProcStderr { id, data }
            }
            Kind::ProcExited => {
                let b: ExitedBody = parse(kind, &payload)?;
                FromGuest::ProcExited {
                    id: b.id,
                    status: b.status,
                }
            }
            Kind::ProcError => {
                let b: ErrorBody = parse(kind, &payload)?;
                FromGuest::ProcError {
                    id: b.id,
                    message: b.message,
                }
            }
            other => return Err(FrameError::WrongDirection(other)),
        })
    }

    /// Sends this message; stdout/stderr larger than one frame are split.
    pub fn send<W: std::io::Write>(&self, w: &mut FrameWriter<W>) -> Result<(), FrameError> {
        match self {
            FromGuest::Stdout(d) => w.write_data(Kind::Stdout, d),
            FromGuest::Stderr(d) => w.write_data(Kind::Stderr, d),
            FromGuest::ProcStdout { id, data } => w.write_proc_data(Kind::ProcStdout, *id, data),
            FromGuest::ProcStderr { id, data } => w.write_proc_data(Kind::ProcStderr, *id, data),
            _ => {
                let (kind, payload) = self.encode();
                w.write_frame(kind, &payload)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
