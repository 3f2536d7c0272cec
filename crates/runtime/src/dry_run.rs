//! `--dry-run`: a run up to the point of no return. The same code as a run decides every
//! step (the request check, the image, the guest, the accelerator, the allocator's choice
//! and refusals, the QEMU command line); it stops before anything is taken or started.

use gpucell_sandbox::devices::PassthroughDevice;
use gpucell_sandbox::Sandbox;

use crate::devices::{self, apply_to_spec};
use crate::node::Node;
use crate::observer::{Observer, Phase};
use crate::report::{DryRunDevice, DryRunGuest, DryRunMemory, DryRunReport, RunReport};
use crate::request::RunRequest;
use crate::run::{build_spec, prepare, spec_report, vm_config};
use crate::RunFailure;

/// Resolves the image, the guest, the accelerator, the devices a run would take and its
/// QEMU command line, and stops: no sandbox VM started, no device taken, bound or reset,
/// no run directory. (Under `auto` the accelerator comes from the cached probe verdict,
/// or from a probe boot when there is none, as for any run.)
pub fn dry_run(
    node: &Node,
    request: RunRequest,
    obs: &mut dyn Observer,
) -> Result<DryRunReport, RunFailure> {
    let id = gpucell_sandbox::rundir::new_run_id().map_err(RunFailure::RunId)?;
    obs.phase(Phase::Validate);
    let req = request.validate()?;
    let mut scratch = RunReport::new(&req.request.image);
    let prepared = prepare(node, &req, &crate::RootfsSource::Image, &mut scratch, obs)?;

    obs.phase(Phase::Devices);
    let mut setup = devices::setup_for(
        req.request.devices.hugepages,
        req.request.devices.pin_cpus,
        req.device_wait,
        node.memory,
    );
    let mut planned = Vec::new();
    let mut warnings = Vec::new();
    if !req.devices.is_empty() {
        let preview = crate::run::preview_devices(node, &req)?;
        setup.devices = preview
            .devices
            .iter()
            .map(PassthroughDevice::from)
            .collect();
        planned = preview
            .devices
            .iter()
            .map(|d| DryRunDevice {
                host_bdf: d.bdf.to_string(),
                id: d.id_string(),
                vendor: d.vendor,
                device: d.device,
                numa_node: d.numa_node,
                companions: d.companions.iter().map(ToString::to_string).collect(),
                needs_bind: preview.to_bind.contains(&d.bdf),
            })
            .collect();
        warnings.extend(preview.notes);
    }

    let mut spec = build_spec(&req, &prepared, &id)?;
    apply_to_spec(&setup, &mut spec);
    let config = vm_config(node, &req, &prepared);
    let network = crate::network::preview(node, &req, &id)?;
    let preallocated = setup.preallocate();
    let mut sandbox = Sandbox::with_id(config, id)
        .map_err(RunFailure::SandboxSetup)?
        .with_devices(setup)
        .with_jail(node.jail.clone());
    if let Some((n, w)) = &network {
        sandbox = sandbox.with_network(crate::network::layout(&n.plan), None);
        warnings.extend(w.iter().cloned());
    }
    let plan = sandbox
        .plan(&prepared.disk.fstype)
        .map_err(RunFailure::SandboxSetup)?;
    warnings.extend(prepared.selection.warning());
    warnings.extend(plan.warnings.iter().cloned());
    obs.phase(Phase::Done);
    Ok(DryRunReport {
        dry_run: true,
        image: scratch.image,
        guest: DryRunGuest {
            flavour: prepared.guest.flavour.clone(),
            kernel: prepared.guest.kernel.clone(),
            initrd: prepared.guest.initrd.clone(),
        },
        accel: prepared.selection.clone(),
        spec: spec_report(&spec, &req),
        driver: prepared
            .choice
            .as_ref()
            .map(crate::driver_select::DriverSection::from_choice),
        cpus: plan.cpus,
        memory_mib: plan.memory_mib,
        memory: DryRunMemory {
            preallocated,
            prealloc_threads: node.memory.prealloc_threads,
            hugepage_size: node.memory.hugepage_size,
            backend: plan
                .qemu_args
                .iter()
                .find(|a| a.starts_with("memory-backend-"))
                .cloned(),
        },
        channel: plan.channel,
        devices: planned,
        pci_hole64_bytes: plan.pci_hole64_bytes,
        qemu: plan.qemu,
        qemu_args: plan.qemu_args,
        warnings,
        network: network.map(|(n, _)| n),
    })
}
