//! The typed run report: it *is* `gpucell run --json`'s document (docs/run-report.md has
//! the schema). Fields are only ever added; optional parts are left out of the JSON when
//! a run did not get that far, as they always were.

use gpucell_host::devices::ReleaseReport;
use gpucell_protocol::{DeviceInfo, ExitStatus};
use gpucell_sandbox::accel::Selection;
use gpucell_sandbox::devices::{PassedMapping, VcpuPin};
use gpucell_sandbox::sandbox::ChannelKind;
use serde::Serialize;

/// Schema name of the report, for consumers that check it.
pub const RUN_REPORT_SCHEMA: &str = "gpucell.run-report/v1";

/// The image a run used.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageReport {
    pub reference: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<std::path::PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

/// What the agent was asked to run.
#[derive(Debug, Clone, Serialize)]
pub struct SpecReport {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
    pub hostname: String,
    pub timeout_s: Option<f64>,
}

/// The guest that ran.
#[derive(Debug, Clone, Serialize)]
pub struct GuestReport {
    pub flavour: String,
    /// `uname -r` in the guest.
    pub kernel: String,
    /// The agent's version.
    pub agent: String,
}

/// Time spent in each phase, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TimingsReport {
    /// The front end's start (the `gpucell` process's `main`, the daemon's receipt of
    /// the request) to QEMU's spawn: gpucell's own time before the VM exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spawn: Option<u64>,
    pub image: u64,
    pub accel_select: u64,
    pub vm_start: u64,
    pub kernel_boot: u64,
    pub agent_ready: u64,
    pub devices_visible: Option<u64>,
    pub process_start: u64,
    pub workload: u64,
    pub shutdown: u64,
    pub sandbox: u64,
    pub total: u64,
    /// With a driver flavour and GPUs: the guest's driver bring-up (modules, device
    /// nodes, persistence, every GPU answering).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_ready: Option<u64>,
}

/// The device phases' own times.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DevicesMs {
    pub allocate: u64,
    pub bind: u64,
    pub release: u64,
}

/// What releasing the devices did, or why it failed.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ReleaseOutcome {
    Done(ReleaseReport),
    Failed { error: String },
}

/// The jail of a run: `enabled`, and when on its uid and gid, cgroup (root,
/// directories, memory, cpu quota and period, pids) and what QEMU's status showed.
#[derive(Debug, Clone, Serialize)]
pub struct JailReport {
    pub enabled: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub facts: Option<gpucell_sandbox::jail::JailFacts>,
}

impl JailReport {
    pub fn of(facts: Option<&gpucell_sandbox::jail::JailFacts>) -> Self {
        JailReport {
            enabled: facts.is_some(),
            facts: facts.cloned(),
        }
    }
}

/// The whole record of one run, success or failure.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    pub image: ImageReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel: Option<Selection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<SpecReport>,
    /// What a front end exits with: the workload's code, 128+N for signal N, 124 on
    /// timeout, 125 when gpucell failed.
    pub exit_code: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<ExitStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestReport>,
    /// The guest driver flavour: how it was chosen, and the guest's bring-up report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<crate::driver_select::DriverSection>,
    /// PCI functions the agent saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceInfo>>,
    /// Functions passed through, host address to guest address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<Vec<PassedMapping>>,
    /// Present with `passthrough` after a run: the 64-bit hole gpucell set (`null`: QEMU's
    /// default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_hole64_bytes: Option<Option<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu_pins: Option<Vec<VcpuPin>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signals_forwarded: Option<Vec<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings_ms: Option<TimingsReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_args: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices_ms: Option<DevicesMs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices_release: Option<ReleaseOutcome>,
    /// With `--network private`: the sandbox's addresses, published ports, egress
    /// policy and setup time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::network::NetworkReport>,
    /// After a run: the jail QEMU ran in (`{"enabled": false}` when unjailed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jail: Option<JailReport>,
    /// On failure: the error and each of its causes, `: `-separated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On a failure after the VM started: the last lines of the guest console (empty
    /// when it printed nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_tail: Option<String>,
    /// When QEMU was spawned (for the `spawn` phase).
    #[serde(skip)]
    pub spawned_at: Option<std::time::Instant>,
}

impl RunReport {
    pub(crate) fn new(reference: &str) -> Self {
        RunReport {
            image: ImageReport {
                reference: reference.to_string(),
                ..ImageReport::default()
            },
            ..RunReport::default()
        }
    }

    /// The report of a run refused before it started (a front end could not build its
    /// request): exit code 125 and the error.
    pub fn refused(reference: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        RunReport {
            exit_code: crate::run::EXIT_RUN_FAILED,
            error: Some(crate::error_chain(err)),
            ..RunReport::new(reference)
        }
    }

    /// The report as the JSON document front ends print or serve.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Guest memory in a dry run: preallocated (with a passed device or `--hugepages`) or
/// not, and the node's preallocation settings (`[run] prealloc_threads`,
/// `hugepage_size`); the backend itself is in `qemu_args`.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunMemory {
    pub preallocated: bool,
    pub prealloc_threads: Option<u32>,
    pub hugepage_size: gpucell_sandbox::memory::HugepageSize,
    /// The `-object memory-backend-...` argument, when preallocated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// The accelerator and guest a dry run would use.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunGuest {
    pub flavour: String,
    pub kernel: std::path::PathBuf,
    pub initrd: std::path::PathBuf,
}

/// A device a dry run would take (not taken).
#[derive(Debug, Clone, Serialize)]
pub struct DryRunDevice {
    pub host_bdf: String,
    pub id: String,
    pub vendor: u16,
    pub device: u16,
    pub numa_node: Option<u32>,
    /// Functions of its IOMMU group that would be bound to vfio-pci but not passed.
    pub companions: Vec<String>,
    /// Whether it would have to be bound to vfio-pci first.
    pub needs_bind: bool,
}

/// `gpucell run --dry-run`: everything a run would do, up to the point of no return.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunReport {
    pub dry_run: bool,
    pub image: ImageReport,
    pub guest: DryRunGuest,
    pub accel: Selection,
    pub spec: SpecReport,
    /// The driver flavour and why (absent: no driver wanted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<crate::driver_select::DriverSection>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// How guest memory would be backed.
    pub memory: DryRunMemory,
    pub channel: ChannelKind,
    /// The devices that would be taken.
    pub devices: Vec<DryRunDevice>,
    pub pci_hole64_bytes: Option<u64>,
    /// The QEMU binary.
    pub qemu: std::path::PathBuf,
    /// Its arguments, as a run passes them (`qemu_args` of the run report). The vsock port is picked by the kernel when the
    /// sandbox starts: a dry run shows `gpucell.vsock_port=0` in its place.
    pub qemu_args: Vec<String>,
    pub warnings: Vec<String>,
    /// With `--network private`: what the run would set up (the first free address
    /// now; nothing is reserved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::network::NetworkReport>,
}
