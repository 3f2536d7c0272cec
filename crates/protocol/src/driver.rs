//! What a driver flavour's guest and the host tell each other besides frames: the
//! driver disk's `gpucell-driver.json` (written by `gpucell guest build`, read by the
//! agent) and the self-test report the agent prints for `gpucell guest test`. One
//! definition each, so the two sides cannot drift.

use serde::{Deserialize, Serialize};

use crate::message::DriverReport;

/// The driver disk's `gpucell-driver.json`: what the agent needs to bring the driver up.
/// Paths are relative to the disk's root. Unknown fields are ignored (a newer builder
/// may add some).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverInfo {
    pub flavour: String,
    /// Upstream driver version, e.g. `550.163.01`.
    pub version: String,
    /// `open` or `proprietary`.
    #[serde(default)]
    pub module_kind: String,
    pub kernel_release: String,
    /// Modules to load, in order.
    pub modules: Vec<String>,
    /// Firmware search dir for `firmware_class.path`.
    pub firmware_dir: String,
    /// `cuDriverGetVersion` of the disk's libcuda, `major.minor`.
    pub cuda: String,
    pub lib_dir: String,
    pub bin_dir: String,
    /// The dynamic loader of the disk's tools.
    pub loader: String,
}

/// One module of the self-test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleResult {
    pub module: String,
    pub vermagic: String,
    /// `loaded`, `already loaded`, an errno name (`ENODEV`), or `skipped: why`.
    pub result: String,
}

/// A tool run of the self-test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolResult {
    pub ok: bool,
    pub output: String,
}

/// What the agent's driver self-test reports (one JSON line on the console) and
/// `gpucell guest test` judges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTestReport {
    pub flavour: String,
    pub version: String,
    pub built_for: String,
    pub kernel: String,
    pub modules: Vec<ModuleResult>,
    pub kernel_log: Vec<String>,
    pub device_nodes: Vec<String>,
    pub nvidia_smi: ToolResult,
    pub cuda: ToolResult,
    /// The bring-up report when NVIDIA GPUs were passed.
    pub driver: Option<DriverReport>,
    #[serde(default)]
    pub error: Option<String>,
}
