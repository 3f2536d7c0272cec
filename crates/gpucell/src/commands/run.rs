//! `gpucell run`: run a command from an image inside its own microVM, like `docker run`.
//!
//! Thin: the flags become a [`RunRequest`], the run core (`gpucell-runtime`) runs it,
//! and this prints. Exit code: the workload's (128+N when killed by signal N); 124 when
//! `--timeout` expired; 125 when gpucell itself failed (the message says why). With
//! `--json` the run report is printed on stderr after the workload's output (stdout
//! stays the workload's own bytes); its schema is in docs/run-report.md.

use std::io::IsTerminal;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use gpucell_runtime::{AccelRequest, DeviceSpec, Observer, RunReport, RunRequest};
use gpucell_sandbox::spec;
use gpucell_sandbox::{EventSender, RawMode, ResizeForwarder, SessionIo, SignalForwarder};

use super::Global;

mod dry;
mod net;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory: bytes or a number with k, m, g (e.g. 512m, 2g).
    #[arg(long, short = 'm', default_value = "512m")]
    pub memory: String,
    /// Set an environment variable (KEY=VALUE, or KEY to pass gpucell's own value).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// User to run as: name, uid, name:group or uid:gid.
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Stop the workload and the VM after this long (e.g. 30s, 5m).
    #[arg(long)]
    pub timeout: Option<String>,
    /// Accelerator: kvm, tcg or auto (probe once, use KVM when it works). Default: the
    /// configuration file's `run.accel`, else auto.
    #[arg(long, env = "GPUCELL_ACCEL")]
    pub accel: Option<String>,
    /// Override the image's entrypoint (its cmd is then dropped, as docker does).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Hostname inside the container (default: the first 12 digits of the run id).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Guest flavour (kernel and init image built by `gpucell guest build`). Default: the
    /// configuration file's `run.guest`, else `default`.
    #[arg(long)]
    pub guest: Option<String>,
    /// NVIDIA driver for the guest: a branch (550) or flavour (nvidia-550). Default: the
    /// image's label io.gpucell.driver, else the newest flavour that meets the image's
    /// NVIDIA_REQUIRE_* and drives every passed GPU.
    #[arg(long, value_name = "BRANCH|FLAVOUR")]
    pub driver: Option<String>,
    /// Inject the chosen driver flavour into the container even without GPUs or NVIDIA
    /// variables (tests of a GPU-less guest).
    #[arg(long, hide = true)]
    pub force_driver_injection: bool,
    /// QEMU binary (default: the configuration file's `run.qemu`, else qemu-system-x86_64).
    #[arg(long, env = "GPUCELL_QEMU")]
    pub qemu: Option<PathBuf>,
    /// How long the guest may take to boot and start its agent (default 30s, 120s under TCG).
    #[arg(long)]
    pub boot_timeout: Option<String>,
    /// Give the workload a terminal (a pty in the guest; stdout and stderr merged). When
    /// gpucell's own stdin is a terminal, it is in raw mode for the run and its size
    /// follows (SIGWINCH); without a host terminal the size is 24x80.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Keep stdin open and forward it even when it is a terminal.
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// Resolve the image, guest, accelerator, devices and QEMU command line, print them,
    /// and stop: no VM is started and nothing is held.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub devices: DeviceArgs,
    #[command(flatten)]
    pub network: net::NetArgs,
    /// Image reference (oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE, or a registry name).
    pub image: String,
    /// Command and arguments (replace the image's cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(clap::Args, Debug, Default)]
pub struct DeviceArgs {
    /// GPUs to pass through: all, a count, or PCI addresses (BDF[,BDF...]).
    #[arg(long, value_name = "all|N|BDF[,BDF...]")]
    pub gpus: Option<String>,
    /// Pass this PCI function (any kind, e.g. 0000:00:05.0); repeatable.
    #[arg(long = "device", value_name = "BDF")]
    pub device: Vec<String>,
    /// Back guest memory with hugepages (a hugetlbfs must be mounted, pages reserved).
    #[arg(long)]
    pub hugepages: bool,
    /// Pin the vCPUs to the CPUs local to the passed devices.
    #[arg(long)]
    pub pin_cpus: bool,
    /// How long the guest waits for the passed devices to appear (e.g. 10s).
    #[arg(long, value_name = "DURATION")]
    pub device_wait: Option<String>,
}

/// The size of a terminal the host has none to take it from (`-t` with stdout and
/// stdin redirected): a 0x0 terminal breaks programs that lay out their output.
const DEFAULT_WINDOW: gpucell_protocol::WindowSize =
    gpucell_protocol::WindowSize { rows: 24, cols: 80 };

/// A duration flag in milliseconds (the error names the value, as it always did).
fn millis(v: Option<&str>) -> anyhow::Result<Option<u64>> {
    v.map(|s| {
        spec::parse_duration(s)
            .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
            .map_err(anyhow::Error::from)
    })
    .transpose()
}

/// docker's `--env KEY`: the value comes from this process's environment, when set.
fn resolve_env(entries: &[String]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|e| {
            if e.contains('=') || e.is_empty() {
                return Some(e.clone());
            }
            std::env::var(e).ok().map(|v| format!("{e}={v}"))
        })
        .collect()
}

/// The flags as a run request.
pub(crate) fn request(global: &Global, args: &RunArgs) -> anyhow::Result<RunRequest> {
    let accel = match args.accel.as_deref() {
        Some(a) => a.parse::<AccelRequest>()?,
        None => global.config()?.run.accel.unwrap_or_default(),
    };
    let d = &args.devices;
    Ok(RunRequest {
        image: args.image.clone(),
        command: args.command.clone(),
        entrypoint: args.entrypoint.clone(),
        env: resolve_env(&args.env),
        user: args.user.clone(),
        workdir: args.workdir.clone(),
        hostname: args.hostname.clone(),
        cpus: args.cpus,
        memory_mib: spec::parse_memory_mib(&args.memory)?,
        devices: DeviceSpec {
            gpus: d.gpus.clone(),
            functions: d.device.clone(),
            hugepages: d.hugepages,
            pin_cpus: d.pin_cpus,
            wait_ms: millis(d.device_wait.as_deref())?,
        },
        timeout_ms: millis(args.timeout.as_deref())?,
        boot_timeout_ms: millis(args.boot_timeout.as_deref())?,
        guest: args.guest.clone(),
        accel,
        network: args.network.to_request()?,
        driver: args.driver.clone(),
        force_driver_injection: args.force_driver_injection,
        pod_slots: 0,
        etc_files: Vec::new(),
        terminal: args.tty,
        window: args.tty.then(|| {
            let (i, o) = (std::io::stdin(), std::io::stdout());
            gpucell_sandbox::window_size(o.as_fd())
                .or_else(|| gpucell_sandbox::window_size(i.as_fd()))
                .unwrap_or(DEFAULT_WINDOW)
        }),
        volumes: Vec::new(),
    })
}

/// Prints warnings as gpucell always has, and forwards SIGINT/SIGTERM/... to the
/// workload while the sandbox runs (and SIGWINCH as a resize, with `tty`: the host's
/// terminal whose size the workload's follows).
#[derive(Default)]
struct Terminal {
    signals: Option<SignalForwarder>,
    install_error: Option<String>,
    tty: Option<OwnedFd>,
    resizes: Option<ResizeForwarder>,
}

impl Observer for Terminal {
    fn warning(&mut self, message: &str) {
        eprintln!("warning: {message}");
    }

    fn sandbox_starting(&mut self, events: EventSender) {
        match SignalForwarder::install(events.clone()) {
            Ok(s) => self.signals = Some(s),
            Err(e) => self.install_error = Some(e.to_string()),
        }
        if let Some(tty) = self.tty.take() {
            match ResizeForwarder::install(events, tty) {
                Ok(r) => self.resizes = Some(r),
                Err(e) => eprintln!("warning: the terminal's size is not forwarded: {e}"),
            }
        }
    }
}

/// The host's terminal for `-t`: stdin when it is one, else stdout; `None` without one.
fn host_tty() -> Option<OwnedFd> {
    let (i, o) = (std::io::stdin(), std::io::stdout());
    let fd = if i.is_terminal() {
        i.as_fd()
    } else if o.is_terminal() {
        o.as_fd()
    } else {
        return None;
    };
    fd.try_clone_to_owned().ok()
}

fn session_io(interactive: bool) -> SessionIo {
    let stdin = std::io::stdin();
    SessionIo {
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
        // Forward stdin unless it is a terminal and `-i` was not given: pipes and
        // /dev/null work.
        stdin: if stdin.is_terminal() && !interactive {
            None
        } else {
            Some(Box::new(stdin))
        },
    }
}

pub fn run(global: &Global, args: RunArgs) -> anyhow::Result<u8> {
    let req = match request(global, &args) {
        Ok(r) => r,
        Err(e) => {
            let report = RunReport::refused(&args.image, e.as_ref());
            return finish(global, &report);
        }
    };
    let node = global.node(args.qemu.as_deref())?;
    if args.dry_run {
        return dry::run(global, &node, req);
    }
    let mut terminal = Terminal {
        tty: if args.tty { host_tty() } else { None },
        ..Terminal::default()
    };
    // Raw mode for the run, when the workload has a terminal and stdin is one; the
    // guard restores it on every way out of the run (an error, a panic's unwinding).
    let raw = match (args.tty, std::io::stdin().is_terminal()) {
        (true, true) => match RawMode::enter(std::io::stdin().as_fd()) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("warning: the terminal stays as it is: {e}");
                None
            }
        },
        _ => None,
    };
    let started = *crate::PROCESS_START.get_or_init(std::time::Instant::now);
    let io = session_io(args.interactive);
    let report = gpucell_runtime::run_since(&node, req, io, &mut terminal, started);
    drop(raw);
    drop(terminal.resizes.take());
    if let Some(e) = terminal.install_error {
        eprintln!("warning: signals are not forwarded to the workload: {e}");
    }
    finish(global, &report)
}

/// Prints the error and the console tail of a failed run, the report under `--json`,
/// and returns the exit code.
fn finish(global: &Global, report: &RunReport) -> anyhow::Result<u8> {
    if let Some(error) = &report.error {
        eprintln!("error: {error}");
        match report.console_tail.as_deref() {
            Some("") => eprintln!("--- the guest console printed nothing ---"),
            Some(tail) => eprintln!("--- last lines of the guest console ---\n{tail}"),
            None => {}
        }
    }
    if global.json {
        eprintln!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    }
    Ok(report.exit_code.clamp(0, 255) as u8)
}
