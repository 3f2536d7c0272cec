//! The device part of `gpucell run`: `--gpus`, `--device`, `--hugepages`, `--pin-cpus`.
//!
//! Devices are allocated first, before the image is fetched (a run that cannot get its
//! devices fails at once, as a Kubernetes pod gets its devices before its image is
//! pulled), and released after QEMU has exited on every path: [`Held`] releases on
//! drop too, and a gpucell killed outright leaves a record whose dead owner the next
//! allocation reclaims (reset + check).

use std::time::{Duration, Instant};

use anyhow::Context;
use gpucell_host::bind::KernelWriter;
use gpucell_host::devices::{Allocation, DevicePool, DeviceRequest};
use gpucell_host::HostRoot;
use gpucell_protocol::{DeviceMatch, RunSpec};
use gpucell_sandbox::devices::{DeviceSetup, PassthroughDevice};
use gpucell_sandbox::spec;
use serde_json::json;

use super::super::Global;

/// Default of `--device-wait`.
const DEFAULT_DEVICE_WAIT: Duration = Duration::from_secs(10);

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

/// Devices held for one run.
pub struct Held {
    alloc: Option<Allocation>,
    pub setup: DeviceSetup,
    /// Time the allocation took (lock, checks, binding), in milliseconds; the binding
    /// alone is `Allocation::bind_time`.
    allocate_ms: u64,
}

/// The device flags, checked: what to allocate and how to wire it.
pub struct DevicePlan {
    request: DeviceRequest,
    setup: DeviceSetup,
}

impl DeviceArgs {
    /// Checks the flags without touching any device (done before the image is fetched).
    pub fn plan(&self) -> anyhow::Result<DevicePlan> {
        let wait = self
            .device_wait
            .as_deref()
            .map(spec::parse_duration)
            .transpose()?
            .unwrap_or(DEFAULT_DEVICE_WAIT);
        let request = DeviceRequest::parse(self.gpus.as_deref(), &self.device)?;
        if request.is_empty() && self.pin_cpus {
            anyhow::bail!(
                "--pin-cpus pins to the passed devices' local CPUs: add --gpus or --device"
            );
        }
        let setup = DeviceSetup {
            devices: Vec::new(),
            hugepages: self.hugepages,
            pin_cpus: self.pin_cpus,
            wait,
        };
        Ok(DevicePlan { request, setup })
    }
}

impl Held {
    /// Allocates what `plan` asks for, under `sandbox_id`.
    pub fn acquire(global: &Global, plan: DevicePlan, sandbox_id: &str) -> anyhow::Result<Held> {
        let DevicePlan { request, mut setup } = plan;
        if request.is_empty() {
            return Ok(Held {
                alloc: None,
                setup,
                allocate_ms: 0,
            });
        }
        // Owners are this process: look them up in the real /proc even under a test
        // --host-root.
        let t0 = Instant::now();
        let pool = DevicePool::new(HostRoot::new(&global.host_root), &global.state_dir)
            .with_process_root(HostRoot::new("/"));
        let alloc = pool
            .allocate(sandbox_id, &request, Box::new(KernelWriter))
            .context("allocating the requested devices")?;
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
        spec.devices = self
            .setup
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
            self.setup.wait.as_millis().min(u128::from(u64::MAX)) as u64
        };
    }

    /// The allocation as the `--json` summary shows it before the run.
    pub fn summary(&self) -> serde_json::Value {
        json!(self
            .setup
            .devices
            .iter()
            .map(|d| json!({
                "host_bdf": d.host_bdf,
                "guest_bdf": null,
                "id": d.id_string(),
                "vendor": d.vendor,
                "device": d.device,
                "numa_node": d.numa_node,
                "companions": d.companions,
            }))
            .collect::<Vec<_>>())
    }

    /// Releases the devices (reset + check; quarantine on failure). Call after QEMU is
    /// gone. Problems are printed, recorded in the summary, never hide the run's result.
    pub fn release(mut self, summary: &mut serde_json::Value) {
        let Some(alloc) = self.alloc.take() else {
            return;
        };
        let bind_ms = alloc.bind_time().as_millis() as u64;
        let t0 = Instant::now();
        let released = alloc.release();
        summary["devices_ms"] = json!({
            "allocate": self.allocate_ms,
            "bind": bind_ms,
            "release": t0.elapsed().as_millis() as u64,
        });
        match released {
            Ok(report) => {
                for q in &report.quarantined {
                    eprintln!(
                        "warning: {} quarantined after this run: {}; see `gpucell gpu list`",
                        q.bdf, q.reason
                    );
                }
                for (bdf, who) in &report.kept {
                    eprintln!("warning: {bdf} not released yet: {who}");
                }
                summary["devices_release"] = json!(report);
            }
            Err(e) => {
                let chain: Vec<String> = anyhow::Error::from(e)
                    .chain()
                    .map(|c| c.to_string())
                    .collect();
                eprintln!(
                    "warning: releasing the devices failed: {}",
                    chain.join(": ")
                );
                summary["devices_release"] = json!({ "error": chain.join(": ") });
            }
        }
    }
}
