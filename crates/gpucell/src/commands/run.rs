//! `gpucell run`: run a command from an image inside its own microVM, like `docker run`.
//!
//! Thin: the flags become a [`RunRequest`], the run core (`gpucell-runtime`) runs it,
//! and this prints. Exit code: the workload's (128+N when killed by signal N); 124 when
//! `--timeout` expired; 125 when gpucell itself failed (the message says why). With
//! `--json` the run report is printed on stderr after the workload's output (stdout
//! stays the workload's own bytes); its schema is in docs/run-report.md.

use std::io::IsTerminal;
use std::path::PathBuf;

use gpucell_runtime::{AccelRequest, DeviceSpec, Observer, RunReport, RunRequest};
use gpucell_sandbox::spec;
use gpucell_sandbox::{EventSender, SessionIo, SignalForwarder};

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
        volumes: Vec::new(),
    })
}

/// Prints warnings as gpucell always has, and forwards SIGINT/SIGTERM/... to the
/// workload while the sandbox runs.
#[derive(Default)]
struct Terminal {
    signals: Option<SignalForwarder>,
    install_error: Option<String>,
}

impl Observer for Terminal {
    fn warning(&mut self, message: &str) {
        eprintln!("warning: {message}");
    }

    fn sandbox_starting(&mut self, events: EventSender) {
        match SignalForwarder::install(events) {
            Ok(s) => self.signals = Some(s),
            Err(e) => self.install_error = Some(e.to_string()),
        }
    }
}

fn session_io() -> SessionIo {
    let stdin = std::io::stdin();
    SessionIo {
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
        // Forward stdin unless it is a terminal (no -i/-t yet): pipes and /dev/null work.
        stdin: if stdin.is_terminal() {
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
    let mut terminal = Terminal::default();
    let started = *crate::PROCESS_START.get_or_init(std::time::Instant::now);
    let report = gpucell_runtime::run_since(&node, req, session_io(), &mut terminal, started);
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
