//! One run, from request to report: request → image → guest → accelerator → devices →
//! sandbox → release. Everything that can fail without devices comes first, so a bad
//! image or a long pull never holds a GPU; the devices are released after QEMU is gone
//! whatever happened in between.

use std::time::{Duration, Instant};

use gpucell_protocol::{GpuInjection, RootfsSpec, RunSpec};
use gpucell_sandbox::accel::{self, ProbeInput, Selection};
use gpucell_sandbox::channel::{Limits, SessionIo};
use gpucell_sandbox::spec::{self, ImageDefaults, Overrides};
use gpucell_sandbox::{Accel, ChannelChoice, RunAsPolicy, RunOutcome, Sandbox, VmConfig};

use crate::devices::{self, Held};
use crate::driver::{Choice, PassedGpu};
use crate::driver_select::{self, DriverSection};
use crate::node::Node;
use crate::observer::{Observer, Phase};
use crate::report::{GuestReport, ImageReport, RunReport, SpecReport, TimingsReport};
use crate::request::{RunRequest, ValidRequest};
use crate::rootfs::{self, DirectoryDisk, RootfsSource};
use crate::RunFailure;
use gpucell_host::devices::AssignedDevice;

/// Exit code when gpucell itself failed, as docker uses.
pub const EXIT_RUN_FAILED: i32 = 125;
/// Exit code when the request's timeout expired, as timeout(1) uses.
pub const EXIT_TIMEOUT: i32 = 124;
/// Where the image's disk appears in the guest (the only virtio-blk disk).
const ROOTFS_DEVICE: &str = "/dev/vda";

pub(crate) fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// What a run needs before it takes any device.
pub(crate) struct Prepared {
    pub image: gpucell_image::Image,
    pub disk: gpucell_image::GuestDisk,
    pub guest: gpucell_guest::GuestArtifacts,
    pub selection: Selection,
    pub image_ms: u64,
    pub accel_ms: u64,
    /// The devices the allocator would take (a preview; nothing taken).
    pub preview: Vec<AssignedDevice>,
    /// The NVIDIA GPUs among them.
    pub gpus: Vec<PassedGpu>,
    /// The driver flavour chosen for them and the image.
    pub choice: Option<Choice>,
    /// The disk made from a directory source, removed when the run ends.
    pub _directory: Option<DirectoryDisk>,
}

/// Runs `request` on `node`: the workload's output goes to `io`, progress to `obs`.
/// Always returns a report; a failed run has `error` set and `exit_code` 125 (124 on
/// timeout, 128+N when interrupted by signal N).
pub fn run(node: &Node, request: RunRequest, io: SessionIo, obs: &mut dyn Observer) -> RunReport {
    run_with_rootfs(node, request, &RootfsSource::Image, io, obs)
}

/// [`run()`] for a front end that started at `started` (the `gpucell` process's first
/// instant): the report's `spawn` phase counts from there, and `total` still from the
/// run's own start.
pub fn run_since(
    node: &Node,
    request: RunRequest,
    io: SessionIo,
    obs: &mut dyn Observer,
    started: Instant,
) -> RunReport {
    run_from(node, request, &RootfsSource::Image, io, obs, started)
}

/// [`run()`] with the root filesystem taken from `source`: the image store for
/// [`RootfsSource::Image`], or a prepared directory (the containerd shim's bundle rootfs).
pub fn run_with_rootfs(
    node: &Node,
    request: RunRequest,
    source: &RootfsSource,
    io: SessionIo,
    obs: &mut dyn Observer,
) -> RunReport {
    run_from(node, request, source, io, obs, Instant::now())
}

fn run_from(
    node: &Node,
    request: RunRequest,
    source: &RootfsSource,
    io: SessionIo,
    obs: &mut dyn Observer,
    front_start: Instant,
) -> RunReport {
    let start = Instant::now();
    let mut report = RunReport::new(&request.image);
    if let Err(failure) = run_steps(node, request, source, io, obs, &mut report, start) {
        record_failure(&mut report, &failure);
    }
    if let Some(t) = report.timings_ms.as_mut() {
        t.total = ms(start.elapsed());
        if let Some(at) = report.spawned_at {
            t.spawn = Some(ms(at.saturating_duration_since(front_start)));
        }
    }
    obs.phase(Phase::Done);
    report
}

fn run_steps(
    node: &Node,
    request: RunRequest,
    source: &RootfsSource,
    io: SessionIo,
    obs: &mut dyn Observer,
    report: &mut RunReport,
    start: Instant,
) -> Result<(), RunFailure> {
    let id = gpucell_sandbox::rundir::new_run_id().map_err(RunFailure::RunId)?;
    report.run_id = Some(id.clone());
    obs.phase(Phase::Validate);
    let req = request.validate()?;
    let prepared = prepare(node, &req, source, report, obs)?;
    obs.phase(Phase::Devices);
    let setup = devices::setup_for(
        req.request.devices.hugepages,
        req.request.devices.pin_cpus,
        req.device_wait,
        node.memory,
    );
    let held = Held::acquire(node, &req.devices, setup, &id).map_err(RunFailure::Devices)?;
    if !held.setup.devices.is_empty() {
        report.passthrough = Some(held.mappings());
    }
    let result = run_sandbox(node, &req, &id, &held, prepared, io, obs, report);
    obs.phase(Phase::Release);
    held.release(report, obs);
    let outcome = result?;
    fill_outcome(report, &outcome, start);
    Ok(())
}

/// Checks the request against the node, gets the image and its guest disk, loads the
/// guest and picks the accelerator.
pub(crate) fn prepare(
    node: &Node,
    req: &ValidRequest,
    source: &RootfsSource,
    report: &mut RunReport,
    obs: &mut dyn Observer,
) -> Result<Prepared, RunFailure> {
    obs.phase(Phase::Image);
    let t_image = Instant::now();
    let (image, disk, directory) = match source {
        RootfsSource::Image => {
            let (image, disk) = store_image(node, &req.request.image)?;
            (image, disk, None)
        }
        RootfsSource::Directory(tree) => {
            let d = rootfs::directory_disk(
                &node.state_dir,
                tree,
                node.store.fs_type,
                &req.request.image,
                &req.request.env,
            )?;
            (d.image.clone(), d.disk.clone(), Some(d))
        }
    };
    let image_ms = ms(t_image.elapsed());
    report.image = ImageReport {
        reference: image.reference.clone(),
        digest: directory.is_none().then(|| image.digest.clone()),
        disk: Some(disk.path.clone()),
        fstype: Some(disk.fstype.clone()),
        disk_bytes: Some(disk.size),
    };
    let (preview, gpus, choice) = choose_driver(node, req, &image)?;
    report.driver = choice.as_ref().map(DriverSection::from_choice);
    obs.phase(Phase::Guest);
    let flavour = match &choice {
        Some(c) => c.flavour.as_str(),
        None => req.request.guest.as_deref().unwrap_or(&node.default_guest),
    };
    let guest = gpucell_guest::load(&node.state_dir, flavour)?;
    obs.phase(Phase::Accel);
    let t_accel = Instant::now();
    let selection = select_accel(node, req, &guest)?;
    if let Some(w) = selection.warning() {
        obs.warning(&w);
    }
    report.accel = Some(selection.clone());
    Ok(Prepared {
        image,
        disk,
        guest,
        selection,
        image_ms,
        accel_ms: ms(t_accel.elapsed()),
        preview,
        gpus,
        choice,
        _directory: directory,
    })
}

/// The image `reference` from the store (fetched when missing) and its guest disk.
fn store_image(
    node: &Node,
    reference: &str,
) -> Result<(gpucell_image::Image, gpucell_image::GuestDisk), RunFailure> {
    let store = gpucell_image::Store::open_with(&node.state_dir, node.store.clone())
        .map_err(|e| RunFailure::StoreOpen(Box::new(e)))?;
    let image = store
        .get_or_fetch(reference)
        .map_err(|source| RunFailure::Image {
            reference: reference.to_string(),
            source: Box::new(source),
        })?;
    let disk = store
        .guest_disk(&image)
        .map_err(|source| RunFailure::Disk {
            reference: image.reference.clone(),
            source: Box::new(source),
        })?;
    Ok((image, disk))
}

/// The allocator's choice for the request, nothing taken (empty without devices).
pub(crate) fn preview_devices(
    node: &Node,
    req: &ValidRequest,
) -> Result<gpucell_host::devices::DevicePreview, RunFailure> {
    if req.devices.is_empty() {
        return Ok(gpucell_host::devices::DevicePreview {
            devices: Vec::new(),
            to_bind: Vec::new(),
            notes: Vec::new(),
        });
    }
    devices::pool(node)
        .preview(&req.devices)
        .map_err(RunFailure::Devices)
}

/// The devices the run would take (the allocator's own choice and refusals, nothing
/// taken), the NVIDIA GPUs among them, and the driver flavour they and the image need.
#[allow(clippy::type_complexity)]
fn choose_driver(
    node: &Node,
    req: &ValidRequest,
    image: &gpucell_image::Image,
) -> Result<(Vec<AssignedDevice>, Vec<PassedGpu>, Option<Choice>), RunFailure> {
    let taken = preview_devices(node, req)?.devices;
    let gpus = driver_select::passed_gpus(&taken);
    let choice = driver_select::select(req, image, &gpus)?;
    Ok((taken, gpus, choice))
}

fn select_accel(
    node: &Node,
    req: &ValidRequest,
    guest: &gpucell_guest::GuestArtifacts,
) -> Result<Selection, RunFailure> {
    let input = ProbeInput::new(
        &node.qemu,
        &guest.kernel,
        &guest.initrd,
        &node.host_root,
        Some(&node.state_dir),
    );
    let input = match node.kvm_probe_timeout {
        Some(t) => input.with_timeout(t),
        None => input,
    };
    Ok(accel::select(req.request.accel.choice(), &input)?)
}

/// The agent's run request, from the image's config and the request (docker's rules).
pub(crate) fn build_spec(
    req: &ValidRequest,
    p: &Prepared,
    sandbox_id: &str,
) -> Result<RunSpec, RunFailure> {
    let rootfs = RootfsSpec {
        device: ROOTFS_DEVICE.into(),
        fstype: p.disk.fstype.clone(),
    };
    spec_for(req, &p.image, rootfs, &sandbox_id[..12])
}

/// The agent's run request for `image` on `rootfs` (docker's rules for what the request
/// leaves out); `default_hostname` when the request names none.
pub(crate) fn spec_for(
    req: &ValidRequest,
    image: &gpucell_image::Image,
    rootfs: RootfsSpec,
    default_hostname: &str,
) -> Result<RunSpec, RunFailure> {
    let c = &image.config;
    let defaults = ImageDefaults {
        entrypoint: c.entrypoint.clone(),
        cmd: c.cmd.clone(),
        env: c.env.clone(),
        working_dir: c.working_dir.clone(),
        user: c.user.clone(),
    };
    let r = &req.request;
    let overrides = Overrides {
        entrypoint: r.entrypoint.clone(),
        cmd: r.command.clone(),
        env: r.env.clone(),
        workdir: r.workdir.clone(),
        user: r.user.clone(),
        hostname: r.hostname.clone(),
    };
    // Bare `KEY` entries were resolved by the front end: nothing comes from this
    // process's environment.
    let no_env = |_: &str| None;
    let mut spec = spec::build_spec(&defaults, &overrides, &no_env, rootfs, default_hostname)?;
    spec.etc_files = r.etc_files.clone();
    spec.terminal = r.terminal;
    spec.window = r.window;
    spec.volumes = r.volumes.clone();
    Ok(spec)
}

pub(crate) fn spec_report(spec: &RunSpec, req: &ValidRequest) -> SpecReport {
    SpecReport {
        args: spec.args.clone(),
        env: spec.env.clone(),
        cwd: spec.cwd.clone(),
        user: spec.user.clone(),
        hostname: spec.hostname.clone(),
        timeout_s: req.timeout.map(|t| t.as_secs_f64()),
    }
}

/// The VM of this run.
pub(crate) fn vm_config(node: &Node, req: &ValidRequest, p: &Prepared) -> VmConfig {
    let slow = p.selection.accel == Accel::Tcg;
    let limits = Limits {
        hello_timeout: req
            .boot_timeout
            .unwrap_or(Duration::from_secs(if slow { 120 } else { 30 })),
        start_timeout: Duration::from_secs(if slow { 120 } else { 60 }),
        run_timeout: req.timeout,
        ..Limits::default()
    };
    VmConfig {
        qemu: node.qemu.clone(),
        kernel: p.guest.kernel.clone(),
        initrd: p.guest.initrd.clone(),
        disk: p.disk.path.clone(),
        cpus: req.request.cpus,
        memory_mib: req.request.memory_mib,
        accel: p.selection.accel,
        state_dir: node.state_dir.clone(),
        host_root: node.host_root.clone(),
        channel: ChannelChoice::Auto,
        run_as: RunAsPolicy::Auto,
        seccomp: true,
        limits,
        extra_cmdline: Vec::new(),
        driver_disk: p.guest.driver_disk.clone(),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_sandbox(
    node: &Node,
    req: &ValidRequest,
    sandbox_id: &str,
    held: &Held,
    p: Prepared,
    io: SessionIo,
    obs: &mut dyn Observer,
    report: &mut RunReport,
) -> Result<Timed, RunFailure> {
    let mut spec = build_spec(req, &p, sandbox_id)?;
    spec.pod_sandbox = req.request.pod_slots > 0;
    held.apply_to_spec(&mut spec);
    check_allocation(&p, held)?;
    spec.gpu = p.choice.as_ref().map(|c| GpuInjection {
        force: req.request.force_driver_injection,
        ..driver_select::injection(c, &p.gpus)
    });
    report.spec = Some(spec_report(&spec, req));
    let config = vm_config(node, req, &p);
    let mut sandbox = Sandbox::with_id(config, sandbox_id.to_string())
        .map_err(RunFailure::SandboxSetup)?
        .with_devices(held.setup.clone())
        .with_jail(node.jail.clone())
        .with_spare_ports(req.request.pod_slots);
    // The network lives until QEMU is gone; dropping `net` removes its host side.
    let mut net = crate::network::set_up(node, req, sandbox_id)?;
    if let Some(n) = &net {
        for w in &n.warnings {
            obs.warning(w);
        }
        report.network = Some(crate::network::report(n));
        let tap = n.tap_for_qemu().map_err(RunFailure::Network)?;
        sandbox = sandbox.with_network(crate::network::layout(&n.plan), tap);
    }
    if let Some(w) = gpucell_sandbox::jail::unjailed_warning(&node.jail) {
        obs.warning(&w);
    }
    // A pod's namespace (the mode is then `none`): the tap and its redirect live until
    // QEMU is gone.
    let pod = crate::network::attach_pod(req)?;
    if let Some(p) = &pod {
        let tap = p.tap_for_qemu().map_err(RunFailure::PodNetwork)?;
        sandbox = sandbox.with_network(crate::network::pod_layout(p), tap);
    }
    obs.phase(Phase::Sandbox);
    obs.sandbox_starting(sandbox.events());
    let outcome = sandbox.run(&spec, io);
    if let Some(n) = net.as_mut() {
        if let Err(e) = n.teardown() {
            obs.warning(&format!(
                "the sandbox network was not fully removed (the next run retries): {}",
                crate::error_chain(&e)
            ));
        }
    }
    drop(net);
    drop(pod);
    let outcome = outcome.map_err(|e| RunFailure::Sandbox(Box::new(e)))?;
    Ok(Timed {
        outcome,
        flavour: p.guest.flavour,
        image_ms: p.image_ms,
        accel_ms: p.accel_ms,
        has_devices: !held.setup.devices.is_empty(),
    })
}

/// The allocation took what the preview chose: a GPU that changed hands in between
/// could need another driver, so the run stops rather than boot a flavour chosen for
/// other GPUs.
fn check_allocation(p: &Prepared, held: &Held) -> Result<(), RunFailure> {
    let want: Vec<String> = p.preview.iter().map(|d| d.bdf.to_string()).collect();
    let got: Vec<String> = held
        .setup
        .devices
        .iter()
        .map(|d| d.host_bdf.clone())
        .collect();
    if p.choice.is_some() && want != got {
        return Err(RunFailure::Changed {
            planned: want.join(","),
            taken: got.join(","),
        });
    }
    Ok(())
}

/// A finished sandbox and the times measured before it.
struct Timed {
    outcome: RunOutcome,
    flavour: String,
    image_ms: u64,
    accel_ms: u64,
    has_devices: bool,
}

fn fill_outcome(report: &mut RunReport, timed: &Timed, start: Instant) {
    let o = &timed.outcome;
    let t = &o.timings;
    report.exit_code = o.exit_code;
    report.status = Some(o.status);
    report.run_id = Some(o.run_id.clone());
    report.channel = Some(o.channel);
    report.cpus = Some(o.cpus);
    report.memory_mib = Some(o.memory_mib);
    report.guest = Some(GuestReport {
        flavour: timed.flavour.clone(),
        kernel: o.guest_kernel.clone(),
        agent: o.agent.clone(),
    });
    report.devices = Some(o.devices.clone());
    if let Some(d) = &o.driver {
        let section = report.driver.take().unwrap_or_default();
        report.driver = Some(section.with_bring_up(d));
    }
    if timed.has_devices && !o.passthrough.is_empty() {
        report.passthrough = Some(o.passthrough.clone());
        report.pci_hole64_bytes = Some(o.pci_hole64_bytes);
    }
    if !o.vcpu_pins.is_empty() {
        report.vcpu_pins = Some(o.vcpu_pins.clone());
    }
    report.stdout_bytes = Some(o.stdout_bytes);
    report.stderr_bytes = Some(o.stderr_bytes);
    report.signals_forwarded = Some(o.signals_forwarded.clone());
    report.spawned_at = o.spawned_at;
    report.timings_ms = Some(TimingsReport {
        spawn: None,
        image: timed.image_ms,
        accel_select: timed.accel_ms,
        vm_start: t.vm_start_ms,
        kernel_boot: t.kernel_boot_ms,
        agent_ready: t.agent_ready_ms,
        devices_visible: t.devices_visible_ms,
        process_start: t.process_start_ms,
        workload: t.workload_ms,
        shutdown: t.shutdown_ms,
        sandbox: t.total_ms,
        total: ms(start.elapsed()),
        driver_ready: o.driver.as_ref().map(|d| d.driver_ready_ms),
    });
    report.qemu_args = Some(o.qemu_args.clone());
    report.jail = Some(crate::report::JailReport::of(o.jail.as_ref()));
}

/// The error, its exit code and, for a VM that started, the console's last lines.
fn record_failure(report: &mut RunReport, failure: &RunFailure) {
    let mut code = EXIT_RUN_FAILED;
    if let RunFailure::Sandbox(run_err) = failure {
        if !run_err.console_tail.trim().is_empty() {
            report.console_tail = Some(run_err.console_tail.trim_end().to_string());
        } else if run_err.vm_started {
            report.console_tail = Some(String::new());
        }
        if run_err.is_timeout() {
            code = EXIT_TIMEOUT;
        } else if let Some(sig) = run_err.interrupted_by() {
            code = (128 + sig).clamp(0, 255);
        }
    }
    report.error = Some(crate::error_chain(failure));
    report.exit_code = code;
}
