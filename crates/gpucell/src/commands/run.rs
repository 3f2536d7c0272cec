//! `gpucell run`: run a command from an image inside its own microVM, like `docker run`.
//!
//! With `--gpus`/`--device` the functions are allocated before anything else and
//! released after QEMU has exited, on every path (`run/devices.rs`).
//!
//! Exit code: the workload's (128+N when killed by signal N); 124 when `--timeout`
//! expired; 125 when gpucell itself failed (the message says why). With `--json` a
//! summary object is printed on stderr after the workload's output (stdout stays the
//! workload's own bytes); its schema is in docs/sandbox.md.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use gpucell_protocol::RootfsSpec;
use gpucell_sandbox::accel::{self, AccelChoice, ProbeInput, Selection};
use gpucell_sandbox::channel::{Limits, SessionIo};
use gpucell_sandbox::spec::{self, ImageDefaults, Overrides};
use gpucell_sandbox::{ChannelChoice, RunAsPolicy, RunError, Sandbox, SignalForwarder, VmConfig};
use serde_json::json;

use super::Global;

mod devices;

/// Exit code when gpucell itself failed, as docker uses.
pub const EXIT_RUN_FAILED: u8 = 125;
/// Exit code when `--timeout` expired, as timeout(1) uses.
pub const EXIT_TIMEOUT: u8 = 124;

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
    /// Accelerator: kvm, tcg or auto (probe once, use KVM when it works).
    #[arg(long, env = "GPUCELL_ACCEL", default_value = "auto")]
    pub accel: String,
    /// Override the image's entrypoint (its cmd is then dropped, as docker does).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Hostname inside the container (default: the first 12 digits of the run id).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Guest flavour (kernel and init image built by `gpucell guest build`).
    #[arg(long, default_value = gpucell_guest::DEFAULT_FLAVOUR)]
    pub guest: String,
    /// QEMU binary.
    #[arg(long, env = "GPUCELL_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// How long the guest may take to boot and start its agent (default 30s, 120s under TCG).
    #[arg(long)]
    pub boot_timeout: Option<String>,
    #[command(flatten)]
    pub devices: devices::DeviceArgs,
    /// Image reference (oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE, or a registry name).
    pub image: String,
    /// Command and arguments (replace the image's cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

fn find_in_path(bin: &Path) -> PathBuf {
    if bin.components().count() > 1 {
        return bin.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(bin))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| bin.to_path_buf())
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

pub fn run(global: &Global, args: RunArgs) -> anyhow::Result<u8> {
    let start = Instant::now();
    let mut summary = json!({ "image": { "reference": args.image } });
    // Everything that can fail without devices (arguments, the image, the guest, the
    // accelerator) first, so a bad image or a long pull never holds a GPU; then the
    // devices, released after QEMU is gone whatever happened in between.
    let result = gpucell_sandbox::rundir::new_run_id()
        .map_err(anyhow::Error::from)
        .and_then(|id| {
            summary["run_id"] = json!(id);
            let plan = args.devices.plan()?;
            let prepared = prepare(global, &args, &mut summary)?;
            let held = devices::Held::acquire(global, plan, &id)?;
            Ok((id, prepared, held))
        })
        .and_then(|(id, prepared, held)| {
            if !held.setup.devices.is_empty() {
                summary["passthrough"] = held.summary();
            }
            let r = run_inner(global, &args, start, &mut summary, &id, &held, prepared);
            held.release(&mut summary);
            r
        });
    let code = match result {
        Ok(code) => code,
        Err(err) => {
            super::print_error_chain(&err);
            let mut code = EXIT_RUN_FAILED;
            if let Some(run_err) = err.downcast_ref::<RunError>() {
                if !run_err.console_tail.trim().is_empty() {
                    eprintln!(
                        "--- last lines of the guest console ---\n{}",
                        run_err.console_tail.trim_end()
                    );
                } else if run_err.vm_started {
                    // The guest kernel runs with `quiet`: an empty console means it
                    // never panicked or complained, not that it never ran.
                    eprintln!("--- the guest console printed nothing ---");
                }
                if run_err.is_timeout() {
                    code = EXIT_TIMEOUT;
                } else if let Some(sig) = run_err.interrupted_by() {
                    code = (128 + sig).clamp(0, 255) as u8;
                }
            }
            let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
            summary["error"] = json!(chain.join(": "));
            summary["exit_code"] = json!(code);
            code
        }
    };
    if let Some(t) = summary.get_mut("timings_ms") {
        t["total"] = json!(ms(start.elapsed()));
    }
    if global.json {
        eprintln!(
            "{}",
            serde_json::to_string_pretty(&summary).unwrap_or_default()
        );
    }
    Ok(code)
}

/// What a run needs before it takes any device.
struct Prepared {
    memory_mib: u64,
    timeout: Option<Duration>,
    boot_timeout: Option<Duration>,
    qemu: PathBuf,
    image: gpucell_image::Image,
    disk: gpucell_image::GuestDisk,
    guest: gpucell_guest::GuestArtifacts,
    selection: Selection,
    image_ms: u64,
    accel_ms: u64,
}

/// Checks the arguments, gets the image and its guest disk, loads the guest and
/// picks the accelerator.
fn prepare(
    global: &Global,
    args: &RunArgs,
    summary: &mut serde_json::Value,
) -> anyhow::Result<Prepared> {
    let memory_mib = spec::parse_memory_mib(&args.memory)?;
    let timeout = args
        .timeout
        .as_deref()
        .map(spec::parse_duration)
        .transpose()?;
    let boot_timeout = args
        .boot_timeout
        .as_deref()
        .map(spec::parse_duration)
        .transpose()?;
    let choice: AccelChoice = args.accel.parse()?;
    let qemu = find_in_path(&args.qemu);

    // Image and guest artifacts.
    let t_image = Instant::now();
    let store = gpucell_image::Store::open(&global.state_dir).context("opening the image store")?;
    let image = store
        .get_or_fetch(&args.image)
        .with_context(|| format!("getting image {}", args.image))?;
    let disk = store
        .guest_disk(&image)
        .with_context(|| format!("building the guest disk of {}", image.reference))?;
    let image_ms = ms(t_image.elapsed());
    summary["image"] = json!({
        "reference": image.reference,
        "digest": image.digest,
        "disk": disk.path,
        "fstype": disk.fstype,
        "disk_bytes": disk.size,
    });
    let guest = gpucell_guest::load(&global.state_dir, &args.guest)?;

    // Accelerator.
    let t_accel = Instant::now();
    let probe_input = ProbeInput::new(
        &qemu,
        &guest.kernel,
        &guest.initrd,
        &global.host_root,
        Some(&global.state_dir),
    );
    let selection: Selection = accel::select(choice, &probe_input)?;
    if let Some(w) = selection.warning() {
        eprintln!("warning: {w}");
    }
    let accel_ms = ms(t_accel.elapsed());
    summary["accel"] = serde_json::to_value(&selection)?;
    Ok(Prepared {
        memory_mib,
        timeout,
        boot_timeout,
        qemu,
        image,
        disk,
        guest,
        selection,
        image_ms,
        accel_ms,
    })
}

fn run_inner(
    global: &Global,
    args: &RunArgs,
    start: Instant,
    summary: &mut serde_json::Value,
    sandbox_id: &str,
    held: &devices::Held,
    p: Prepared,
) -> anyhow::Result<u8> {
    // The run request.
    let defaults = ImageDefaults {
        entrypoint: p.image.config.entrypoint.clone(),
        cmd: p.image.config.cmd.clone(),
        env: p.image.config.env.clone(),
        working_dir: p.image.config.working_dir.clone(),
        user: p.image.config.user.clone(),
    };
    let overrides = Overrides {
        entrypoint: args.entrypoint.clone(),
        cmd: args.command.clone(),
        env: args.env.clone(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        hostname: args.hostname.clone(),
    };
    let rootfs = RootfsSpec {
        device: "/dev/vda".into(),
        fstype: p.disk.fstype.clone(),
    };
    let host_env = |k: &str| std::env::var(k).ok();
    let mut spec = spec::build_spec(&defaults, &overrides, &host_env, rootfs, &sandbox_id[..12])?;
    held.apply_to_spec(&mut spec);
    summary["spec"] = json!({
        "args": spec.args,
        "env": spec.env,
        "cwd": spec.cwd,
        "user": spec.user,
        "hostname": spec.hostname,
        "timeout_s": p.timeout.map(|t| t.as_secs_f64()),
    });

    let slow = p.selection.accel == gpucell_sandbox::Accel::Tcg;
    let limits = Limits {
        hello_timeout: p
            .boot_timeout
            .unwrap_or(Duration::from_secs(if slow { 120 } else { 30 })),
        start_timeout: Duration::from_secs(if slow { 120 } else { 60 }),
        run_timeout: p.timeout,
        ..Limits::default()
    };
    let config = VmConfig {
        qemu: p.qemu,
        kernel: p.guest.kernel.clone(),
        initrd: p.guest.initrd.clone(),
        disk: p.disk.path.clone(),
        cpus: args.cpus,
        memory_mib: p.memory_mib,
        accel: p.selection.accel,
        state_dir: global.state_dir.clone(),
        host_root: global.host_root.clone(),
        channel: ChannelChoice::Auto,
        run_as: RunAsPolicy::Auto,
        seccomp: true,
        limits,
        extra_cmdline: Vec::new(),
        driver_disk: p.guest.driver_disk.clone(),
    };
    let stdin = std::io::stdin();
    let io = SessionIo {
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
        // Forward stdin unless it is a terminal (no -i/-t yet): pipes and /dev/null work.
        stdin: if stdin.is_terminal() {
            None
        } else {
            Some(Box::new(stdin))
        },
    };
    let sandbox =
        Sandbox::with_id(config, sandbox_id.to_string())?.with_devices(held.setup.clone());
    let _signals = SignalForwarder::install(sandbox.events())?;
    let outcome = sandbox.run(&spec, io)?;
    let code = outcome.exit_code.clamp(0, 255) as u8;
    let t = &outcome.timings;
    summary["exit_code"] = json!(outcome.exit_code);
    summary["status"] = json!(outcome.status);
    summary["run_id"] = json!(outcome.run_id);
    summary["channel"] = json!(outcome.channel);
    summary["cpus"] = json!(outcome.cpus);
    summary["memory_mib"] = json!(outcome.memory_mib);
    summary["guest"] = json!({ "flavour": p.guest.flavour, "kernel": outcome.guest_kernel, "agent": outcome.agent });
    summary["devices"] = json!(outcome.devices);
    if let Some(d) = &outcome.driver {
        summary["driver"] = json!(d);
    }
    if !outcome.passthrough.is_empty() {
        summary["passthrough"] = json!(outcome.passthrough);
        summary["pci_hole64_bytes"] = json!(outcome.pci_hole64_bytes);
    }
    if !outcome.vcpu_pins.is_empty() {
        summary["vcpu_pins"] = json!(outcome.vcpu_pins);
    }
    summary["stdout_bytes"] = json!(outcome.stdout_bytes);
    summary["stderr_bytes"] = json!(outcome.stderr_bytes);
    summary["signals_forwarded"] = json!(outcome.signals_forwarded);
    summary["timings_ms"] = json!({
        "image": p.image_ms,
        "accel_select": p.accel_ms,
        "vm_start": t.vm_start_ms,
        "kernel_boot": t.kernel_boot_ms,
        "agent_ready": t.agent_ready_ms,
        "devices_visible": t.devices_visible_ms,
        "process_start": t.process_start_ms,
        "workload": t.workload_ms,
        "shutdown": t.shutdown_ms,
        "sandbox": t.total_ms,
        "total": ms(start.elapsed()),
    });
    summary["qemu_args"] = json!(outcome.qemu_args);
    Ok(code)
}
