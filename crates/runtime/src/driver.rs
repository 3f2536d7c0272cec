//! Which guest driver flavour a run gets: the one asked for (`--driver BRANCH` or
//! `--guest NAME`), else the one the image names (label `io.gpucell.driver`), else the
//! newest flavour that meets the image's `NVIDIA_REQUIRE_*` and drives every passed GPU.
//! Pure: the flavours, the GPUs and the image's environment and labels come in; a choice
//! with its reason, or a refusal that says what to do, comes out.

use gpucell_nvidia::requirements::{DriverFacts, GpuFacts, Requirements, Version};
use serde::Serialize;

/// The image label that names a driver branch or flavour (`550`, `nvidia-550`).
pub const DRIVER_LABEL: &str = "io.gpucell.driver";

/// A flavour gpucell can build, as the choice sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub branch: String,
    pub driver_version: String,
    /// The newest CUDA its libcuda reports (`cuDriverGetVersion`), e.g. `12.4`.
    pub max_cuda: String,
    /// Architectures its kernel modules support (`Turing`, `Hopper`, ...).
    pub architectures: Vec<String>,
    /// PCI device ids its supported-GPU list names.
    pub device_ids: Vec<u16>,
}

/// A GPU passed to the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PassedGpu {
    pub bdf: String,
    pub device_id: u16,
    /// The product name (`H200 SXM 141GB`, `GeForce RTX 4090`), for messages and the brand.
    pub name: String,
    /// From the GPU database; `None` when the id is unknown.
    pub architecture: Option<String>,
}

/// How the flavour was chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Reason {
    /// `--driver` or `--guest`.
    Flag { value: String },
    /// The image's `io.gpucell.driver` label.
    Label { value: String },
    /// The newest flavour that meets the image's requirements and drives every GPU.
    Requirements { requirements: Vec<String> },
}

/// The chosen flavour and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Choice {
    pub flavour: String,
    pub driver_version: String,
    pub max_cuda: String,
    #[serde(flatten)]
    pub reason: Reason,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChoiceError {
    #[error("no driver flavour matches {asked:?} ({source_of_ask}); flavours: {known}")]
    Unknown {
        asked: String,
        source_of_ask: &'static str,
        known: String,
    },
    #[error("{0}")]
    Refused(String),
    #[error("the image's NVIDIA requirements do not parse: {0}")]
    BadRequirement(String),
}

/// What a run asks for and brings.
#[derive(Debug, Clone, Default)]
pub struct Ask<'a> {
    /// `--driver BRANCH` or `--guest nvidia-NAME`.
    pub flag: Option<&'a str>,
    /// The image's labels (`io.gpucell.driver`).
    pub label: Option<&'a str>,
    /// The image's environment (`NVIDIA_REQUIRE_*`, `CUDA_VERSION`, ...).
    pub env: &'a [String],
    pub gpus: &'a [PassedGpu],
}

fn version(s: &str) -> Option<Version> {
    Version::parse(s)
}

fn find<'c>(candidates: &'c [Candidate], asked: &str) -> Option<&'c Candidate> {
    let a = asked.trim();
    candidates
        .iter()
        .find(|c| c.name == a || c.branch == a || c.driver_version == a)
}

fn known(candidates: &[Candidate]) -> String {
    candidates
        .iter()
        .map(|c| {
            format!(
                "{} (driver {}, CUDA {})",
                c.name, c.driver_version, c.max_cuda
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why `c` cannot drive `gpu`, if it cannot.
fn unsupported(c: &Candidate, gpu: &PassedGpu) -> Option<String> {
    if c.device_ids.contains(&gpu.device_id) {
        return None;
    }
    let arch = gpu
        .architecture
        .as_deref()
        .unwrap_or("unknown architecture");
    let listed_arch = gpu
        .architecture
        .as_ref()
        .is_some_and(|a| c.architectures.iter().any(|x| x.eq_ignore_ascii_case(a)));
    let why = if listed_arch {
        "its device id is not in the driver's supported-GPU list"
    } else {
        "the driver does not support that architecture"
    };
    Some(format!(
        "{} ({arch}, 10de:{:04x}, {}) is not driven by {} {}: {why}",
        gpu.name, gpu.device_id, gpu.bdf, c.name, c.driver_version
    ))
}

fn facts(gpus: &[PassedGpu]) -> Vec<GpuFacts> {
    gpus.iter()
        .filter_map(|g| {
            gpucell_nvidia::gpu::facts_from_database(g.architecture.as_deref()?, &g.name)
        })
        .collect()
}

/// Why `c` does not meet the image's requirements, if it does not.
fn unmet(c: &Candidate, req: &Requirements, gpus: &[GpuFacts]) -> Option<String> {
    let driver = DriverFacts::new(&c.driver_version, &c.max_cuda).ok()?;
    req.check(&driver, gpus).err().map(|u| u.message.clone())
}

/// The first GPU with no candidate that drives it: a refusal naming what it needs.
fn gpu_nobody_drives(candidates: &[Candidate], gpus: &[PassedGpu]) -> Option<String> {
    let gpu = gpus
        .iter()
        .find(|g| candidates.iter().all(|c| unsupported(c, g).is_some()))?;
    let needs = match gpu.architecture.as_deref() {
        Some("Blackwell") => "driver 570 or later",
        Some("Maxwell" | "Pascal" | "Volta") => {
            "the proprietary kernel modules (no flavour here has them)"
        }
        Some(_) => "a driver whose supported-GPU list names it",
        None => "a driver that knows its device id",
    };
    Some(format!(
        "the {} ({}, 10de:{:04x}) at {} needs {needs}; the flavours gpucell can build are {}",
        gpu.name,
        gpu.architecture
            .as_deref()
            .unwrap_or("unknown architecture"),
        gpu.device_id,
        gpu.bdf,
        known(candidates)
    ))
}

/// Chooses the flavour of a run with NVIDIA GPUs or an explicit ask. `Ok(None)`: no
/// driver is wanted (no GPU passed, nothing asked).
pub fn choose(ask: &Ask<'_>, candidates: &[Candidate]) -> Result<Option<Choice>, ChoiceError> {
    let req =
        Requirements::from_env(ask.env).map_err(|e| ChoiceError::BadRequirement(e.to_string()))?;
    let gpu_facts = facts(ask.gpus);
    let explicit = match (ask.flag, ask.label) {
        (Some(f), _) => Some((
            f,
            "--driver/--guest",
            Reason::Flag {
                value: f.to_string(),
            },
        )),
        (None, Some(l)) => Some((
            l,
            "image label io.gpucell.driver",
            Reason::Label {
                value: l.to_string(),
            },
        )),
        (None, None) => None,
    };
    if let Some((asked, source_of_ask, reason)) = explicit {
        let c = find(candidates, asked).ok_or_else(|| ChoiceError::Unknown {
            asked: asked.to_string(),
            source_of_ask,
            known: known(candidates),
        })?;
        if let Some(why) = ask.gpus.iter().find_map(|g| unsupported(c, g)) {
            return Err(ChoiceError::Refused(format!(
                "{why} ({source_of_ask} chose it)"
            )));
        }
        if let Some(msg) = unmet(c, &req, &gpu_facts) {
            return Err(ChoiceError::Refused(format!(
                "{} ({source_of_ask}) does not meet the image: {msg}",
                c.name
            )));
        }
        return Ok(Some(choice(c, reason)));
    }
    if ask.gpus.is_empty() {
        return Ok(None);
    }
    if let Some(msg) = gpu_nobody_drives(candidates, ask.gpus) {
        return Err(ChoiceError::Refused(msg));
    }
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    sorted.sort_by_key(|c| std::cmp::Reverse(version(&c.driver_version)));
    let drives_all = |c: &Candidate| ask.gpus.iter().all(|g| unsupported(c, g).is_none());
    if let Some(c) = sorted
        .iter()
        .copied()
        .find(|c| drives_all(c) && unmet(c, &req, &gpu_facts).is_none())
    {
        let requirements = req
            .items
            .iter()
            .map(|r| format!("{}={}", r.variable, r.expression))
            .collect();
        return Ok(Some(choice(c, Reason::Requirements { requirements })));
    }
    Err(ChoiceError::Refused(refusal(
        &sorted, &req, &gpu_facts, ask.gpus,
    )))
}

fn choice(c: &Candidate, reason: Reason) -> Choice {
    Choice {
        flavour: c.name.clone(),
        driver_version: c.driver_version.clone(),
        max_cuda: c.max_cuda.clone(),
        reason,
    }
}

/// "the image needs CUDA >= 12.8; the newest flavour gpucell can build is nvidia-550
/// (CUDA 12.4); ..."
fn refusal(
    sorted: &[&Candidate],
    req: &Requirements,
    gpus: &[GpuFacts],
    passed: &[PassedGpu],
) -> String {
    let Some(newest) = sorted.first() else {
        return "gpucell knows no driver flavour".to_string();
    };
    let needs = req
        .cuda_minimums()
        .iter()
        .max()
        .map(|v| format!("the image needs CUDA >= {v}"))
        .unwrap_or_else(|| "the image's NVIDIA requirements are not met".to_string());
    let unmet_newest = unmet(newest, req, gpus).unwrap_or_default();
    let gpu_names: Vec<String> = passed
        .iter()
        .map(|g| format!("{} ({})", g.name, g.architecture.as_deref().unwrap_or("?")))
        .collect();
    format!(
        "{needs}; the newest flavour gpucell can build is {} (driver {}, CUDA {}): {unmet_newest}; GPUs: {}. Use an image built for CUDA {} or older, or set NVIDIA_DISABLE_REQUIRE=true in the image to skip the check",
        newest.name,
        newest.driver_version,
        newest.max_cuda,
        gpu_names.join(", "),
        newest.max_cuda
    )
}

#[cfg(test)]
mod tests;
