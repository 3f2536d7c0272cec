//! Boot configuration for VFIO passthrough: `gpucell host plan` and `gpucell host apply`.
//!
//! [`plan`] reads the host (CPU vendor, GPUs, IOMMU groups) under the host root and the
//! current files under a target root, and computes the new content of each file gpucell
//! manages, with a unified diff and the steps left to the administrator. [`apply`] writes
//! the files that change, atomically, keeping a `.gpucell-bak` copy of each file it
//! modifies. Planning twice on an applied tree yields no change.

mod files;
pub mod grub;
pub mod render;

pub use files::apply;
use files::{file_change, read_current};

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bdf::Bdf;
use crate::bind::holders;
use crate::iommu;
use crate::pci::{
    PciError, PciFunction, PciScan, CLASS_HDA, CLASS_SERIAL_BUS_OTHER, CLASS_USB, VENDOR_NVIDIA,
};
use crate::root::HostRoot;
use crate::sysfs::{self, SysfsError};
use render::RuleDevice;

/// Suffix of the copy of a file's content before gpucell first changed it.
pub const BACKUP_SUFFIX: &str = ".gpucell-bak";
/// Mode of files gpucell creates.
pub const NEW_FILE_MODE: u32 = 0o644;

/// Errors planning or applying the boot configuration.
#[derive(Debug, thiserror::Error)]
pub enum BootCfgError {
    #[error("cannot tell the CPU vendor")]
    CpuInfo(#[source] SysfsError),
    #[error(
        "{}: CPU vendor `{vendor}` is neither GenuineIntel nor AuthenticAMD; \
         add the IOMMU kernel parameters for this CPU by hand",
        path.display()
    )]
    UnknownVendor { path: PathBuf, vendor: String },
    #[error(transparent)]
    Pci(PciError),
    #[error("{bdf} is a PCI bridge; name the GPU behind it")]
    Bridge { bdf: Bdf },
    #[error("cannot read the IOMMU group of {bdf}")]
    Group {
        bdf: Bdf,
        #[source]
        source: iommu::IommuError,
    },
    #[error("refusing to hand {bdf} to vfio-pci at boot: {}", holders.join("; "))]
    Display { bdf: Bdf, holders: Vec<String> },
    #[error("--ids-mode needs GPUs: pass --gpus BDF,... or --all")]
    IdsWithoutGpus,
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: SysfsError,
    },
    #[error(transparent)]
    Grub(#[from] grub::GrubError),
    #[error("{} changed while gpucell was planning; run the command again", path.display())]
    Changed { path: PathBuf },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which GPUs get a boot-time vfio-pci binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// None: only the kernel command line and modules; the device file is not touched.
    None,
    /// Every NVIDIA GPU except those driving a display (skipped with a warning).
    All,
    /// These functions (each with the endpoints of its IOMMU group).
    Gpus(Vec<Bdf>),
}

/// How devices are handed to vfio-pci at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BindingMode {
    /// A udev rule setting `driver_override` per PCI address (default).
    Udev,
    /// `options vfio-pci ids=VID:DID,...`: claims every device of those models.
    Ids,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuVendor {
    Intel,
    Amd,
}

/// What to plan.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub selection: Selection,
    pub mode: BindingMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub bdf: Bdf,
    /// `vendor:device`.
    pub id: String,
    /// 24-bit class code as `0x040300`.
    pub class: String,
}

/// A selected GPU and the functions bound with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedDevice {
    pub gpu: Bdf,
    /// `None` when the IOMMU is off: the GPU's slot functions were used instead.
    pub iommu_group: Option<u32>,
    /// The GPU and every other endpoint of its group (bridges excluded).
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileAction {
    Create,
    Modify,
    Unchanged,
}

/// One managed file.
#[derive(Debug, Clone, Serialize)]
pub struct FileChange {
    /// The path on the configured system, e.g. `/etc/default/grub`.
    pub path: PathBuf,
    /// Where it is read and written: the path under the target root.
    pub target_path: PathBuf,
    pub action: FileAction,
    /// Mode after apply, as an octal string (`"0644"`).
    #[serde(serialize_with = "octal")]
    pub mode: u32,
    /// Unified diff from the current to the new content; empty when unchanged.
    pub diff: String,
    /// The new content.
    pub content: String,
    #[serde(skip)]
    pub old: Option<String>,
}

fn octal<S: serde::Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{mode:04o}"))
}

/// A command the administrator still has to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub command: String,
    pub why: String,
}

/// The complete plan; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct BootPlan {
    pub cpu_vendor: CpuVendor,
    pub kernel_params: Vec<String>,
    pub mode: BindingMode,
    pub devices: Vec<PlannedDevice>,
    pub files: Vec<FileChange>,
    pub steps: Vec<Step>,
    pub warnings: Vec<String>,
}

impl BootPlan {
    /// True when at least one file would be written.
    pub fn changes(&self) -> bool {
        self.files.iter().any(|f| f.action != FileAction::Unchanged)
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApplyReport {
    pub written: Vec<PathBuf>,
    pub backups: Vec<PathBuf>,
}

impl fmt::Display for CpuVendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Intel => "Intel",
            Self::Amd => "AMD",
        })
    }
}

/// The CPU vendor from the first `vendor_id` line of `<root>/proc/cpuinfo`.
pub fn cpu_vendor(root: &HostRoot) -> Result<CpuVendor, BootCfgError> {
    let path = root.proc("cpuinfo");
    let text = sysfs::read_raw(&path).map_err(BootCfgError::CpuInfo)?;
    let vendor = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "vendor_id").then(|| v.trim())
        })
        .ok_or_else(|| {
            BootCfgError::CpuInfo(SysfsError::garbled(&path, "", "a `vendor_id :` line"))
        })?;
    match vendor {
        "GenuineIntel" => Ok(CpuVendor::Intel),
        "AuthenticAMD" | "HygonGenuine" => Ok(CpuVendor::Amd),
        other => Err(BootCfgError::UnknownVendor {
            path,
            vendor: sysfs::printable(other),
        }),
    }
}

/// The kernel parameters for `vendor`, with the option values each one replaces.
pub fn kernel_params(vendor: CpuVendor) -> [grub::Param; 2] {
    let iommu = match vendor {
        CpuVendor::Intel => grub::Param {
            key: "intel_iommu",
            option: "on",
            conflicts: &["off"],
        },
        CpuVendor::Amd => grub::Param {
            key: "amd_iommu",
            option: "on",
            conflicts: &["off"],
        },
    };
    let pt = grub::Param {
        key: "iommu",
        option: "pt",
        conflicts: &["nopt", "off"],
    };
    [iommu, pt]
}

/// The endpoints bound with `f`: its IOMMU group without bridges, or, with the IOMMU
/// off, the functions of its slot.
fn endpoints<'a>(
    root: &HostRoot,
    scan: &'a PciScan,
    f: &'a PciFunction,
) -> Result<Vec<&'a PciFunction>, BootCfgError> {
    let mut out: Vec<&PciFunction> = match f.iommu_group {
        Some(group) => {
            let members = iommu::group_members(root, group)
                .map_err(|source| BootCfgError::Group { bdf: f.bdf, source })?;
            members.iter().filter_map(|b| scan.get(*b)).collect()
        }
        None => std::iter::once(f)
            .chain(scan.slot_siblings(f.bdf))
            .collect(),
    };
    out.retain(|e| !e.is_bridge());
    if !out.iter().any(|e| e.bdf == f.bdf) {
        out.push(f);
    }
    out.sort_by_key(|e| e.bdf);
    Ok(out)
}

fn companion_driver(f: &PciFunction) -> Option<&'static str> {
    match f.class_code() {
        CLASS_HDA => Some("snd_hda_intel"),
        CLASS_USB => Some("xhci_pci"),
        CLASS_SERIAL_BUS_OTHER if f.vendor == VENDOR_NVIDIA => Some("i2c_nvidia_gpu"),
        _ => None,
    }
}

/// Computes the boot configuration for `request`, reading the host under `host` and
/// the current files under `target` (usually the same root).
pub fn plan(
    host: &HostRoot,
    target: &HostRoot,
    request: &PlanRequest,
) -> Result<BootPlan, BootCfgError> {
    let vendor = cpu_vendor(host)?;
    let params = kernel_params(vendor);
    let mut warnings = Vec::new();
    let scan = PciScan::read(host).map_err(BootCfgError::Pci)?;
    let companions = companion_drivers(host, &scan)?;
    let gpus = selected_gpus(host, &scan, &request.selection)?;
    if request.mode == BindingMode::Ids && request.selection == Selection::None {
        return Err(BootCfgError::IdsWithoutGpus);
    }
    if request.selection == Selection::All && gpus.is_empty() {
        warnings.push("no NVIDIA GPU found on this host: no device is bound at boot".into());
    }
    let (devices, rule_devices) = plan_devices(host, &scan, gpus, request, &mut warnings)?;
    let files = plan_files(
        target,
        request,
        &params,
        &companions,
        &rule_devices,
        &mut warnings,
    )?;
    let steps = steps(host, &files, &params);
    warnings.sort();
    warnings.dedup();
    Ok(BootPlan {
        cpu_vendor: vendor,
        kernel_params: params.iter().map(grub::Param::token).collect(),
        mode: request.mode,
        devices,
        files,
        steps,
        warnings,
    })
}

/// Companion drivers of every NVIDIA GPU on the host, so the modprobe file does not
/// depend on which GPUs are selected.
fn companion_drivers(
    host: &HostRoot,
    scan: &PciScan,
) -> Result<BTreeSet<&'static str>, BootCfgError> {
    let mut companions = BTreeSet::new();
    for gpu in scan.nvidia_gpus() {
        for e in endpoints(host, scan, gpu)? {
            companions.extend(companion_driver(e));
        }
    }
    Ok(companions)
}

/// The functions `selection` names, refusing unknown addresses and bridges.
fn selected_gpus<'a>(
    host: &HostRoot,
    scan: &'a PciScan,
    selection: &Selection,
) -> Result<Vec<&'a PciFunction>, BootCfgError> {
    match selection {
        Selection::None => Ok(Vec::new()),
        Selection::All => Ok(scan.nvidia_gpus().collect()),
        Selection::Gpus(list) => {
            let mut out = Vec::new();
            for bdf in list {
                let f = scan.get(*bdf).ok_or_else(|| {
                    BootCfgError::Pci(PciError::NoSuchFunction {
                        bdf: *bdf,
                        path: host.pci_device(bdf),
                    })
                })?;
                if f.is_bridge() {
                    return Err(BootCfgError::Bridge { bdf: *bdf });
                }
                out.push(f);
            }
            Ok(out)
        }
    }
}

/// The planned devices and the sorted endpoints to bind, one rule each. A GPU whose
/// group drives a display is skipped with a warning under `--all`, refused otherwise.
fn plan_devices(
    host: &HostRoot,
    scan: &PciScan,
    gpus: Vec<&PciFunction>,
    request: &PlanRequest,
    warnings: &mut Vec<String>,
) -> Result<(Vec<PlannedDevice>, Vec<RuleDevice>), BootCfgError> {
    let mut devices = Vec::new();
    let mut rule_devices: Vec<RuleDevice> = Vec::new();
    for gpu in gpus {
        let eps = endpoints(host, scan, gpu)?;
        let mut display = Vec::new();
        for e in &eps {
            display.extend(holders::display_holds(host, e.bdf, warnings));
        }
        if !display.is_empty() {
            let reasons: Vec<String> = display.iter().map(ToString::to_string).collect();
            if request.selection == Selection::All {
                warnings.push(format!("skipped {}: {}", gpu.bdf, reasons.join("; ")));
                continue;
            }
            return Err(BootCfgError::Display {
                bdf: gpu.bdf,
                holders: reasons,
            });
        }
        if gpu.iommu_group.is_none() {
            warnings.push(format!(
                "{} has no IOMMU group (the IOMMU is off): bound with the functions of its slot; \
                 run `gpucell host plan` again after the reboot to check its group",
                gpu.bdf
            ));
        }
        for e in &eps {
            if !rule_devices.iter().any(|r| r.bdf == e.bdf) {
                rule_devices.push(RuleDevice {
                    bdf: e.bdf,
                    vendor: e.vendor,
                    device: e.device,
                    gpu: gpu.bdf,
                });
            }
        }
        devices.push(PlannedDevice {
            gpu: gpu.bdf,
            iommu_group: gpu.iommu_group,
            endpoints: eps
                .iter()
                .map(|e| Endpoint {
                    bdf: e.bdf,
                    id: e.id_string(),
                    class: format!("{:#08x}", e.class),
                })
                .collect(),
        });
    }
    rule_devices.sort();
    Ok((devices, rule_devices))
}

/// The managed files: grub defaults, modules-load, modprobe and (udev mode) the rules.
fn plan_files(
    target: &HostRoot,
    request: &PlanRequest,
    params: &[grub::Param],
    companions: &BTreeSet<&'static str>,
    rule_devices: &[RuleDevice],
    warnings: &mut Vec<String>,
) -> Result<Vec<FileChange>, BootCfgError> {
    let mut files = Vec::new();
    let grub_path = target.etc(render::GRUB_PATH);
    match read_current(&grub_path)? {
        Some(text) => {
            let new = grub::merge(Path::new("/etc/default/grub"), &text, params)?;
            files.push(file_change(target, render::GRUB_PATH, new)?);
        }
        None => {
            warnings.push(format!(
            "{} does not exist: add `{}` to the kernel command line of your boot loader by hand",
            grub_path.display(),
            params.iter().map(grub::Param::token).collect::<Vec<_>>().join(" ")
        ))
        }
    }
    grub_dropin_warnings(target, warnings);
    files.push(file_change(
        target,
        render::MODULES_LOAD_PATH,
        render::modules_load(),
    )?);
    let ids: BTreeSet<(u16, u16)> = match request.mode {
        BindingMode::Ids => rule_devices.iter().map(|d| (d.vendor, d.device)).collect(),
        BindingMode::Udev => BTreeSet::new(),
    };
    files.push(file_change(
        target,
        render::MODPROBE_PATH,
        render::modprobe(companions, &ids),
    )?);
    match (request.mode, &request.selection) {
        (BindingMode::Udev, Selection::None) => {}
        (BindingMode::Udev, _) => files.push(file_change(
            target,
            render::UDEV_RULES_PATH,
            render::udev_rules(rule_devices),
        )?),
        (BindingMode::Ids, _) => {
            if target.etc(render::UDEV_RULES_PATH).exists() {
                warnings.push(format!(
                    "{} from an earlier apply still binds devices by address; remove it if ids mode should replace it",
                    target.etc(render::UDEV_RULES_PATH).display()
                ));
            }
        }
    }
    Ok(files)
}

/// Drop-ins in `/etc/default/grub.d/*.cfg` are sourced after `/etc/default/grub` and
/// override what it sets (Debian and Ubuntu cloud images ship one).
fn grub_dropin_warnings(target: &HostRoot, warnings: &mut Vec<String>) {
    let dir = target.etc("default/grub.d");
    let Ok(names) = sysfs::list_dir_opt(&dir) else {
        return;
    };
    for name in names {
        let path = dir.join(&name);
        if !matches!(path.extension(), Some(e) if e == "cfg") {
            continue;
        }
        if let Ok(text) = sysfs::read_raw(&path) {
            for var in grub::assigned_vars(&text) {
                warnings.push(format!(
                    "{} also sets {var} and is read after /etc/default/grub: check that it keeps the IOMMU parameters",
                    path.display()
                ));
            }
        }
    }
}

fn steps(host: &HostRoot, files: &[FileChange], params: &[grub::Param]) -> Vec<Step> {
    let changed = |rel: &str| {
        files
            .iter()
            .any(|f| f.action != FileAction::Unchanged && f.path == Path::new("/etc").join(rel))
    };
    let mut steps = Vec::new();
    if changed(render::GRUB_PATH) {
        steps.push(Step {
            command: "update-grub".into(),
            why: "writes the new kernel command line into /boot/grub/grub.cfg".into(),
        });
    }
    if [
        render::MODULES_LOAD_PATH,
        render::MODPROBE_PATH,
        render::UDEV_RULES_PATH,
    ]
    .iter()
    .any(|r| changed(r))
    {
        steps.push(Step {
            command: "update-initramfs -u".into(),
            why: "the initramfs carries modprobe.d and may load nvidia or nouveau".into(),
        });
    }
    let running = sysfs::read_text(&host.proc("cmdline")).ok();
    let missing: Vec<String> = params
        .iter()
        .filter(|p| {
            running.as_deref().is_some_and(|line| {
                !line.split_whitespace().any(|t| {
                    t.split_once('=').is_some_and(|(k, v)| {
                        k.replace('-', "_") == p.key && v.split(',').any(|o| o == p.option)
                    })
                })
            })
        })
        .map(grub::Param::token)
        .collect();
    if !steps.is_empty() {
        steps.push(Step {
            command: "reboot".into(),
            why: "the kernel command line, modules and boot-time binding take effect at boot"
                .into(),
        });
    } else if !missing.is_empty() {
        steps.push(Step {
            command: "reboot".into(),
            why: format!(
                "the running kernel was started without {}",
                missing.join(" ")
            ),
        });
    }
    steps
}
