//! The devices of one run: taken last, after everything that can fail without them
//! (request, image, guest, accelerator), and released after QEMU has exited on every
//! path. [`Held`] releases on drop too, and a front end killed outright leaves a record
//! whose dead owner the next allocation reclaims (reset + check).

use std::time::{Duration, Instant};

use gpucell_host::bind::KernelWriter;
use gpucell_host::devices::{Allocation, DevicePool, DeviceRequest, DevicesError};
use gpucell_host::HostRoot;
use gpucell_protocol::{DeviceMatch, RunSpec};
use gpucell_sandbox::devices::{DeviceSetup, PassedMapping, PassthroughDevice};
use gpucell_sandbox::memory::MemoryOptions;

use crate::node::Node;
use crate::observer::Observer;
use crate::report::{DevicesMs, ReleaseOutcome, RunReport};

/// Devices held for one run.
pub struct Held {
    alloc: Option<Allocation>,
    pub setup: DeviceSetup,
    /// Lock, checks and binding, in milliseconds; the binding alone is
    /// `Allocation::bind_time`.
    allocate_ms: u64,
}

/// The wiring a run asks for, before any device is chosen.
pub fn setup_for(
    hugepages: bool,
    pin_cpus: bool,
    wait: Duration,
    memory: MemoryOptions,
) -> DeviceSetup {
    DeviceSetup {
        devices: Vec::new(),
        hugepages,
        memory,
        pin_cpus,
        wait,
    }
}

/// The pool of `node`'s devices. Owners are processes of this machine: they are looked
/// up under the node's process root even when the host root is a test tree.
pub fn pool(node: &Node) -> DevicePool {
    DevicePool::new(HostRoot::new(&node.host_root), &node.state_dir)
        .with_process_root(HostRoot::new(&node.process_root))
}

impl Held {
    /// Allocates `request` under `sandbox_id`; nothing when it is empty.
    pub fn acquire(
        node: &Node,
        request: &DeviceRequest,
        mut setup: DeviceSetup,
        sandbox_id: &str,
    ) -> Result<Held, DevicesError> {
        if request.is_empty() {
            return Ok(Held {
                alloc: None,
                setup,
                allocate_ms: 0,
            });
        }
        let t0 = Instant::now();
        let alloc = pool(node).allocate(sandbox_id, request, Box::new(KernelWriter))?;
        for note in alloc.notes() {
            tracing::info!("{note}");
        }
        setup.devices = alloc
            .devices()
            .iter()
            .map(PassthroughDevice::from)
            .collect();
        Ok(Held {
            alloc: Some(alloc),
            setup,
            allocate_ms: t0.elapsed().as_millis() as u64,
        })
    }

    /// What the agent must wait for.
    pub fn apply_to_spec(&self, spec: &mut RunSpec) {
        apply_to_spec(&self.setup, spec);
    }

    /// The allocation as the report shows it before the guest has seen it.
    pub fn mappings(&self) -> Vec<PassedMapping> {
        gpucell_sandbox::devices::map_to_guest(&self.setup.devices, &[])
    }

    /// Releases the devices (reset + check; quarantine on failure). Call after QEMU is
    /// gone. Problems are warnings in the report; they never hide the run's result.
    pub fn release(mut self, report: &mut RunReport, obs: &mut dyn Observer) {
        let Some(alloc) = self.alloc.take() else {
            return;
        };
        let bind_ms = alloc.bind_time().as_millis() as u64;
        let t0 = Instant::now();
        let released = alloc.release();
        report.devices_ms = Some(DevicesMs {
            allocate: self.allocate_ms,
            bind: bind_ms,
            release: t0.elapsed().as_millis() as u64,
        });
        report.devices_release = Some(match released {
            Ok(r) => {
                for q in &r.quarantined {
                    obs.warning(&format!(
                        "{} quarantined after this run: {}; see `gpucell gpu list`",
                        q.bdf, q.reason
                    ));
                }
                for (bdf, who) in &r.kept {
                    obs.warning(&format!("{bdf} not released yet: {who}"));
                }
                ReleaseOutcome::Done(r)
            }
            Err(e) => {
                let error = crate::error_chain(&e);
                obs.warning(&format!("releasing the devices failed: {error}"));
                ReleaseOutcome::Failed { error }
            }
        });
    }
}

/// Lists the passed functions in the run request and how long the agent waits for them.
pub fn apply_to_spec(setup: &DeviceSetup, spec: &mut RunSpec) {
    spec.devices = setup
        .devices
        .iter()
        .map(|d| DeviceMatch {
            vendor: d.vendor,
            device: d.device,
        })
        .collect();
    spec.device_wait_ms = if spec.devices.is_empty() {
        0
    } else {
        setup.wait.as_millis().min(u128::from(u64::MAX)) as u64
    };
}
