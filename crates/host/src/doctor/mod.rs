//! `gpucell doctor`: can this host run GPU sandboxes, and what to fix if not.
//!
//! The checks are pure functions of the files under a [`HostRoot`] plus a
//! [`DoctorInput`] the caller gathers (the KVM boot probe, which lives in the sandbox
//! crate, and the QEMU binary, which is looked up on this machine). Each check yields a
//! [`Check`] with a status and, unless it passed, one line saying how to fix it.

mod cpu;
mod devices;
mod gpus;
mod iommu;
pub mod qemu;
mod system;

use serde::Serialize;

use crate::gpu::{GpuError, GpuInventory};
use crate::root::HostRoot;

pub use cpu::CpuInfo;
pub use qemu::QemuInfo;

/// Schema name of [`DoctorReport`].
pub const DOCTOR_SCHEMA: &str = "gpucell.doctor/v1";

/// Exit code when every check passed or warned.
pub const EXIT_READY: u8 = 0;
/// Exit code when at least one check failed.
pub const EXIT_NOT_READY: u8 = 1;

/// Errors that stop doctor itself (as opposed to failed checks).
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("host root {} is not a directory: pass --host-root a directory that stands for /", path.display())]
    NoRoot { path: std::path::PathBuf },
    #[error("cannot inventory the host's GPUs")]
    Inventory(#[source] GpuError),
}

/// Result of trying to boot a guest under KVM, from the sandbox crate's accelerator probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "reason", rename_all = "kebab-case")]
pub enum KvmProbe {
    /// A guest booted under KVM.
    Usable,
    /// KVM opened but a guest could not run (nested hypervisor without the needed
    /// features, ...); the reason says what happened.
    Unusable(String),
    /// The probe was not run; the reason says why.
    NotRun(String),
}

/// What the caller gathered outside the host root.
#[derive(Debug, Clone, Default)]
pub struct DoctorInput {
    /// The KVM boot probe; `None` when the caller has none.
    pub kvm_probe: Option<KvmProbe>,
    /// QEMU as found on this machine; `None` to skip the check.
    pub qemu: Option<QemuInfo>,
}

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable identifier, e.g. `iommu`, `gpu-group:0000:01:00.0`.
    pub id: String,
    /// Short title for the text table.
    pub title: String,
    pub status: Status,
    /// What was found, naming the files read.
    pub detail: String,
    /// How to fix it; `None` when the check passed.
    pub fix: Option<String>,
}

impl Check {
    pub(crate) fn pass(
        id: impl Into<String>,
        title: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            title: title.into(),
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    pub(crate) fn warn(
        id: impl Into<String>,
        title: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            title: title.into(),
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub(crate) fn fail(
        id: impl Into<String>,
        title: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            status: Status::Fail,
            ..Self::warn(id, title, detail, fix)
        }
    }
}

/// Counts per status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub pass: usize,
    pub warn: usize,
    pub fail: usize,
}

/// Everything doctor found.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    pub schema: &'static str,
    pub host_root: String,
    /// True when no check failed: GPU sandboxes can run.
    pub ready: bool,
    pub summary: Summary,
    pub checks: Vec<Check>,
}

impl DoctorReport {
    /// 0 when ready, 1 when a check failed.
    pub fn exit_code(&self) -> u8 {
        if self.ready {
            EXIT_READY
        } else {
            EXIT_NOT_READY
        }
    }

    /// Adds checks gathered elsewhere (the network's, from gpucell-net) and recounts.
    pub fn extend(&mut self, checks: impl IntoIterator<Item = Check>) {
        self.checks.extend(checks);
        let mut summary = Summary::default();
        for c in &self.checks {
            match c.status {
                Status::Pass => summary.pass += 1,
                Status::Warn => summary.warn += 1,
                Status::Fail => summary.fail += 1,
            }
        }
        self.summary = summary;
        self.ready = summary.fail == 0;
    }

    /// The check with id `id`.
    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }
}

/// Runs every check against `root`; quarantined devices are read from the default state
/// directory under it (`<root>/var/lib/gpucell`).
pub fn run(root: &HostRoot, input: &DoctorInput) -> Result<DoctorReport, DoctorError> {
    run_with_state_dir(root, input, &root.path().join("var/lib/gpucell"))
}

/// Runs every check against `root`, with quarantined devices read from the device
/// records under `state_dir` (one warning each, see docs/devices.md).
#[tracing::instrument(skip_all, fields(root = %root.path().display()))]
pub fn run_with_state_dir(
    root: &HostRoot,
    input: &DoctorInput,
    state_dir: &std::path::Path,
) -> Result<DoctorReport, DoctorError> {
    if !root.path().is_dir() {
        return Err(DoctorError::NoRoot {
            path: root.path().to_owned(),
        });
    }
    let inventory = GpuInventory::read(root).map_err(DoctorError::Inventory)?;
    let cpu = CpuInfo::read(root);
    let mut checks = Vec::new();
    checks.push(cpu::virtualization(&cpu));
    checks.push(system::kvm(root, input.kvm_probe.as_ref()));
    checks.extend(iommu::checks(root, &cpu, &inventory));
    checks.extend(gpus::checks(root, &cpu, &inventory));
    checks.push(system::hugepages(root));
    if let Some(q) = &input.qemu {
        checks.push(qemu::check(q, root));
    }
    checks.extend(devices::checks(state_dir));
    let mut summary = Summary::default();
    for c in &checks {
        match c.status {
            Status::Pass => summary.pass += 1,
            Status::Warn => summary.warn += 1,
            Status::Fail => summary.fail += 1,
        }
    }
    Ok(DoctorReport {
        schema: DOCTOR_SCHEMA,
        host_root: root.path().display().to_string(),
        ready: summary.fail == 0,
        summary,
        checks,
    })
}
