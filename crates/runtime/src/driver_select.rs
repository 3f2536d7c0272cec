//! The run's side of the driver choice: the flavours of gpucell's driver table, the
//! NVIDIA GPUs among the devices a run would take, the image's labels and environment,
//! and the injection request the agent gets.

use gpucell_host::devices::AssignedDevice;
use gpucell_protocol::{GpuFacts, GpuInjection};
use serde::Serialize;

use crate::driver::{self, Ask, Candidate, Choice, PassedGpu, Reason, DRIVER_LABEL};
use crate::request::ValidRequest;
use crate::RunFailure;

/// NVIDIA's PCI vendor id.
const NVIDIA: u16 = 0x10de;
/// Where the agent mounts a driver flavour's driver disk in the guest.
pub const GUEST_DRIVER_ROOT: &str = "/run/gpucell/driver";

/// The run report's `driver`: the choice (when gpucell made one) and the guest's
/// bring-up report (once the guest sent it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DriverSection {
    pub flavour: String,
    pub driver_version: String,
    /// The newest CUDA the flavour's libcuda reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cuda: Option<String>,
    /// How it was chosen: `by` = `flag`, `label` or `requirements`, with the value or the
    /// requirements it met.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// From the guest's bring-up: the CUDA version its libcuda reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
    /// From the guest's bring-up: each GPU the driver drives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<gpucell_protocol::GpuReport>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_ready_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl DriverSection {
    pub fn from_choice(c: &Choice) -> Self {
        DriverSection {
            flavour: c.flavour.clone(),
            driver_version: c.driver_version.clone(),
            max_cuda: Some(c.max_cuda.clone()),
            reason: Some(c.reason.clone()),
            ..DriverSection::default()
        }
    }

    /// Adds what the guest reported.
    pub fn with_bring_up(mut self, r: &gpucell_protocol::DriverReport) -> Self {
        if self.flavour.is_empty() {
            self.flavour = r.flavour.clone();
        }
        if self.driver_version.is_empty() {
            self.driver_version = r.driver_version.clone();
        }
        self.cuda_version = Some(r.cuda_version.clone()).filter(|v| !v.is_empty());
        self.gpus = Some(r.gpus.clone());
        self.driver_ready_ms = Some(r.driver_ready_ms);
        self.message = Some(r.message.clone());
        self
    }
}

/// The flavours of the driver table.
pub fn candidates() -> Result<Vec<Candidate>, RunFailure> {
    let table = gpucell_guest::driver::Table::embedded().map_err(RunFailure::DriverTable)?;
    Ok(table
        .flavours
        .iter()
        .map(|f| Candidate {
            name: f.name.clone(),
            branch: f.branch.clone(),
            driver_version: f.version.clone(),
            max_cuda: f.max_cuda.clone(),
            architectures: f.architectures.clone(),
            device_ids: f.device_ids.clone(),
        })
        .collect())
}

/// The NVIDIA GPUs (display and 3D controllers) among `devices`.
pub fn passed_gpus(devices: &[AssignedDevice]) -> Vec<PassedGpu> {
    devices
        .iter()
        .filter(|d| d.vendor == NVIDIA && d.class >> 16 == 0x03)
        .map(|d| {
            let arch = gpucell_host::arch::ArchTable::embedded().and_then(|t| t.lookup(d.device));
            PassedGpu {
                bdf: d.bdf.to_string(),
                device_id: d.device,
                name: arch
                    .as_ref()
                    .map(|a| a.label.clone())
                    .unwrap_or_else(|| gpucell_host::names::device_name(d.vendor, d.device)),
                architecture: arch.map(|a| a.architecture.to_string()),
            }
        })
        .collect()
}

/// The flavour this run needs, if any: asked for by `--driver` (or `--guest` naming a
/// driver flavour), named by the image's label, or chosen from its requirements and GPUs.
pub fn select(
    req: &ValidRequest,
    image: &gpucell_image::Image,
    gpus: &[PassedGpu],
) -> Result<Option<Choice>, RunFailure> {
    let candidates = candidates()?;
    let guest_flag = req
        .request
        .guest
        .as_deref()
        .filter(|g| candidates.iter().any(|c| c.name == *g));
    let ask = Ask {
        flag: req.request.driver.as_deref().or(guest_flag),
        label: image.config.labels.get(DRIVER_LABEL).map(String::as_str),
        env: &image.config.env,
        gpus,
    };
    driver::choose(&ask, &candidates).map_err(RunFailure::Driver)
}

/// What the agent needs to give the workload the driver: the guest's driver root, the
/// CUDA version (so it checks the image's requirements again, as the toolkit would),
/// and the GPUs' facts.
pub fn injection(choice: &Choice, gpus: &[PassedGpu]) -> GpuInjection {
    let facts: Vec<GpuFacts> = gpus
        .iter()
        .filter_map(|g| {
            let f = gpucell_nvidia::gpu::facts_from_database(g.architecture.as_deref()?, &g.name)?;
            Some(GpuFacts {
                arch: f.arch.to_string(),
                brand: f.brand,
            })
        })
        .collect();
    let compat_allowed = !facts.is_empty()
        && facts
            .iter()
            .all(|f| gpucell_nvidia::gpu::forward_compat_capable(&f.brand));
    GpuInjection {
        driver_root: GUEST_DRIVER_ROOT.to_string(),
        gpus_requested: !gpus.is_empty(),
        compat_allowed,
        cuda_version: Some(choice.max_cuda.clone()),
        gpus: facts,
        ..GpuInjection::default()
    }
}
