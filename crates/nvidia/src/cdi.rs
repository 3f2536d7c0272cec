//! A CDI spec (Container Device Interface, <https://github.com/cncf-tags/container-device-interface>,
//! `cdiVersion` 0.6.0) of kind `nvidia.com/gpu` for one NVIDIA driver, generated from any
//! driver root: the flavour's driver disk at build time, a guest's `/`, or a host whose
//! driver lives under `/usr/local/nvidia`. It holds what `nvidia-ctk cdi generate` puts in
//! its spec:
//!
//! - common edits: the control device nodes (`/dev/nvidiactl`, `/dev/nvidia-uvm`,
//!   `/dev/nvidia-uvm-tools`, `/dev/nvidia-modeset` when present), read-only bind mounts
//!   (`ro,nosuid,nodev,rbind,rprivate`) of every `*.so.<driver version>` found in the
//!   library search paths and of the driver's binaries, and four `createContainer` hooks:
//!   `create-symlinks` (SONAME and `.so` links), `enable-cuda-compat`, `update-ldcache`,
//!   `disable-device-node-modification`;
//! - one device per GPU, named by index (`"0"`) and by UUID (`"GPU-…"`), holding its
//!   `/dev/nvidia<minor>` node, and `"all"` holding every GPU node.
//!
//! Hooks: there is no `nvidia-cdi-hook` in a gpucell guest. Each hook's `path` is
//! [`HOOK_PATH`] (gpucell's marker for a step the guest agent performs itself) and its
//! `args` are exactly `nvidia-cdi-hook`'s command line (`args[0]` the program name, then the
//! subcommand and its flags), so the same spec generated with
//! `hook_path = "/usr/bin/nvidia-cdi-hook"` is usable by any CDI runtime with the toolkit
//! installed. [`HookStep::from_hook`] reads a hook back.
//!
//! A spec generated without GPUs (at flavour build time nothing is plugged in) has an
//! `"all"` device with no edits; [`add_gpus`] fills the devices in once the guest has read
//! its GPUs ([`gpus_from_proc`]). That is the one place where such a spec is laxer than the
//! CDI validator (which wants edits on every device).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const CDI_VERSION: &str = "0.6.0";
pub const KIND: &str = "nvidia.com/gpu";
/// `path` of every hook gpucell generates: a step the guest agent performs in-process.
pub const HOOK_PATH: &str = "/usr/libexec/gpucell/cdi-hook";
/// The hook name of every step (OCI `createContainer`: after the mounts, before pivot_root).
pub const HOOK_NAME: &str = "createContainer";
/// Spec annotation: the driver version the spec was generated for.
pub const ANNOTATION_DRIVER_VERSION: &str = "gpucell.io/driver-version";
/// Spec annotation: the container directory the libraries are mounted into; the agent
/// moves them to the image's own library directory (`/usr/lib64` on RPM-based images).
pub const ANNOTATION_LIBRARY_DIR: &str = "gpucell.io/library-dir";
/// Default container directory for the libraries (Debian/Ubuntu multiarch).
pub const DEFAULT_CONTAINER_LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";
/// Container directory for the binaries (on every image's `PATH`).
pub const CONTAINER_BIN_DIR: &str = "/usr/bin";
/// Options of every library and binary mount (the toolkit's).
pub const MOUNT_OPTIONS: [&str; 5] = ["ro", "nosuid", "nodev", "rbind", "rprivate"];
/// Control nodes, in the toolkit's order; each is listed only when present (or, with no
/// device root to look at, the first three).
pub const CONTROL_NODES: [&str; 4] = [
    "/dev/nvidia-modeset",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-uvm",
    "/dev/nvidiactl",
];
/// Major of `/dev/nvidiactl` and `/dev/nvidia<N>` (fixed by nvidia.ko).
pub const NVIDIA_MAJOR: u32 = 195;
/// The driver's binaries a container may get (the toolkit's CDI list).
pub const BINARIES: [&str; 7] = [
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
    "nvidia-imex",
    "nvidia-imex-ctl",
];
/// Library search paths inside a driver root, in order.
pub const DEFAULT_LIB_DIRS: [&str; 8] = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu/nvidia/current",
    "/usr/lib64",
    "/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/local/nvidia/lib64",
    "/usr/local/nvidia/lib",
    "/usr/lib",
];
/// Binary search paths inside a driver root, in order.
pub const DEFAULT_BIN_DIRS: [&str; 6] = [
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/nvidia/bin",
    "/usr/lib/nvidia/current",
    "/bin",
    "/sbin",
];
/// Most entries read from one directory.
const MAX_DIR_ENTRIES: usize = 100_000;
/// Most symlinks followed resolving one path in a driver root.
const MAX_LINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no libcuda.so.<version> or libnvidia-ml.so.<version> in {dirs} under {root}: point \
         the driver root and library paths at the driver, or give the driver version"
    )]
    NoDriver { root: PathBuf, dirs: String },
    #[error("several driver versions under {root} ({versions}): give the one to use explicitly")]
    SeveralDrivers { root: PathBuf, versions: String },
    #[error("driver version `{0}` is not a dotted number such as 550.163.01")]
    BadVersion(String),
    #[error("`{0}` must be an absolute path without `..`")]
    BadPath(String),
    #[error("{path} is not a 64-bit x86-64 ELF shared object: {why}")]
    Elf { path: PathBuf, why: String },
    #[error("the CDI spec is invalid: {0}")]
    Invalid(String),
    #[error("the CDI spec is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("{path}: {why}")]
    GpuInfo { path: PathBuf, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CdiError + '_ {
    move |source| CdiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn is_empty<T>(v: &[T]) -> bool {
    v.is_empty()
}

/// A CDI spec (the subset of the 0.6.0 schema that NVIDIA specs use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    pub cdi_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub devices: Vec<Device>,
    #[serde(default)]
    pub container_edits: ContainerEdits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub container_edits: ContainerEdits,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerEdits {
    #[serde(default, skip_serializing_if = "is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub hooks: Vec<Hook>,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub mounts: Vec<Mount>,
}

impl ContainerEdits {
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.device_nodes.is_empty()
            && self.hooks.is_empty()
            && self.mounts.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceNode {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// `c` or `b`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

impl DeviceNode {
    /// Where the node is read from when the spec is applied (`hostPath`, else `path`).
    pub fn source(&self) -> &str {
        self.host_path.as_deref().unwrap_or(&self.path)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hook {
    pub hook_name: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    pub host_path: String,
    pub container_path: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub options: Vec<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl Spec {
    /// Pretty JSON, ending in a newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Parses and validates.
    pub fn from_json(s: &str) -> Result<Spec, CdiError> {
        let spec: Spec = serde_json::from_str(s).map_err(CdiError::Json)?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The container directory the libraries were generated for.
    pub fn library_dir(&self) -> &str {
        self.annotations
            .get(ANNOTATION_LIBRARY_DIR)
            .map_or(DEFAULT_CONTAINER_LIB_DIR, String::as_str)
    }

    pub fn driver_version(&self) -> Option<&str> {
        self.annotations
            .get(ANNOTATION_DRIVER_VERSION)
            .map(String::as_str)
    }

    /// Checks what the agent relies on: the version and kind, absolute paths without `..`,
    /// device nodes under `/dev`, unique device names, edits on every GPU device, and hooks
    /// gpucell knows.
    pub fn validate(&self) -> Result<(), CdiError> {
        let bad = |m: String| Err(CdiError::Invalid(m));
        if !cdi_version_ok(&self.cdi_version) {
            return bad(format!(
                "cdiVersion `{}` (0.6.0 or later)",
                self.cdi_version
            ));
        }
        if self.kind != KIND {
            return bad(format!("kind `{}` (expected {KIND})", self.kind));
        }
        let mut names = BTreeSet::new();
        for d in &self.devices {
            let name_ok = !d.name.is_empty()
                && d.name.len() <= 128
                && d.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            if !name_ok || !names.insert(d.name.as_str()) {
                return bad(format!("device name `{}` (empty, odd or repeated)", d.name));
            }
            if d.name != "all" && d.container_edits.is_empty() {
                return bad(format!("device `{}` has no edits", d.name));
            }
            validate_edits(&d.container_edits)?;
        }
        validate_edits(&self.container_edits)
    }
}

fn cdi_version_ok(v: &str) -> bool {
    let parts: Vec<u32> = v.split('.').filter_map(|p| p.parse().ok()).collect();
    parts.len() == 3 && v.split('.').count() == 3 && (parts[0], parts[1]) >= (0, 6)
}

/// An absolute path with no `..`, `.` or empty components.
pub fn clean_absolute(p: &str) -> bool {
    p.starts_with('/')
        && !p.contains('\0')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !p.contains("//")
        && !p.split('/').any(|c| c == "." || c == "..")
}

fn validate_edits(e: &ContainerEdits) -> Result<(), CdiError> {
    let bad = |m: String| Err(CdiError::Invalid(m));
    for n in &e.device_nodes {
        if !clean_absolute(&n.path) || !n.path.starts_with("/dev/") {
            return bad(format!(
                "device node path `{}` (must be under /dev)",
                n.path
            ));
        }
        if n.host_path.as_deref().is_some_and(|h| !clean_absolute(h)) {
            return bad(format!("device node hostPath of `{}`", n.path));
        }
        if n.kind.as_deref().is_some_and(|k| k != "c" && k != "b") {
            return bad(format!("device node type of `{}`", n.path));
        }
    }
    for m in &e.mounts {
        if !clean_absolute(&m.host_path) || !clean_absolute(&m.container_path) {
            return bad(format!("mount `{}` -> `{}`", m.host_path, m.container_path));
        }
    }
    for h in &e.hooks {
        if h.hook_name != HOOK_NAME {
            return bad(format!(
                "hook name `{}` (gpucell runs createContainer steps only)",
                h.hook_name
            ));
        }
        HookStep::from_hook(h)?;
    }
    for v in &e.env {
        if !v.contains('=') || v.starts_with('=') {
            return bad(format!("environment entry `{v}`"));
        }
    }
    Ok(())
}

/// A hook read back: the step it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookStep {
    /// `(target, link)` pairs: a symlink at container path `link` pointing at `target`.
    CreateSymlinks(Vec<(String, String)>),
    /// Use the image's `/usr/local/cuda/compat` when its libcuda is newer than this driver.
    EnableCudaCompat { host_driver_version: String },
    /// Refresh the container's ld.so.cache with these folders.
    UpdateLdcache { folders: Vec<String> },
    /// Bind a copy of `/proc/driver/nvidia/params` saying `ModifyDeviceFiles: 0`.
    DisableDeviceNodeModification,
}

impl HookStep {
    /// Reads a hook in `nvidia-cdi-hook`'s argument form (`args[0]` the program name).
    pub fn from_hook(h: &Hook) -> Result<HookStep, CdiError> {
        let bad = |m: &str| CdiError::Invalid(format!("hook {:?}: {m}", h.args));
        let sub = h.args.get(1).ok_or_else(|| bad("no subcommand"))?;
        let flags = &h.args[2..];
        match sub.as_str() {
            "create-symlinks" => {
                let mut links = Vec::new();
                for v in flag_values(flags, "--link").map_err(|m| bad(&m))? {
                    let (target, link) = v
                        .split_once("::")
                        .ok_or_else(|| bad("a --link is not TARGET::LINK"))?;
                    if target.is_empty() || target.contains('\0') || !clean_absolute(link) {
                        return Err(bad("a --link has an empty target or a bad link path"));
                    }
                    links.push((target.to_owned(), link.to_owned()));
                }
                Ok(HookStep::CreateSymlinks(links))
            }
            "enable-cuda-compat" => {
                let v = flag_values(flags, "--host-driver-version").map_err(|m| bad(&m))?;
                match v.as_slice() {
                    [one] if crate::Version::parse(one).is_some() => {
                        Ok(HookStep::EnableCudaCompat {
                            host_driver_version: one.clone(),
                        })
                    }
                    _ => Err(bad("one --host-driver-version=VERSION is needed")),
                }
            }
            "update-ldcache" => {
                let folders = flag_values(flags, "--folder").map_err(|m| bad(&m))?;
                if folders.iter().any(|f| !clean_absolute(f)) {
                    return Err(bad("a --folder is not a clean absolute path"));
                }
                Ok(HookStep::UpdateLdcache { folders })
            }
            "disable-device-node-modification" if flags.is_empty() => {
                Ok(HookStep::DisableDeviceNodeModification)
            }
            _ => Err(bad("unknown subcommand or arguments")),
        }
    }

    /// The hook that asks for this step, with program `path` (`HOOK_PATH` for gpucell).
    pub fn to_hook(&self, path: &str) -> Hook {
        let argv0 = Path::new(path)
            .file_name()
            .map_or("cdi-hook".into(), |n| n.to_string_lossy().into_owned());
        let mut args = vec![argv0];
        match self {
            HookStep::CreateSymlinks(links) => {
                args.push("create-symlinks".into());
                for (t, l) in links {
                    args.push("--link".into());
                    args.push(format!("{t}::{l}"));
                }
            }
            HookStep::EnableCudaCompat {
                host_driver_version,
            } => {
                args.push("enable-cuda-compat".into());
                args.push(format!("--host-driver-version={host_driver_version}"));
            }
            HookStep::UpdateLdcache { folders } => {
                args.push("update-ldcache".into());
                for f in folders {
                    args.push("--folder".into());
                    args.push(f.clone());
                }
            }
            HookStep::DisableDeviceNodeModification => {
                args.push("disable-device-node-modification".into());
            }
        }
        Hook {
            hook_name: HOOK_NAME.into(),
            path: path.into(),
            args,
            env: vec!["NVIDIA_CTK_DEBUG=false".into()],
            timeout: None,
        }
    }
}

/// Values of `--name V` / `--name=V` flags; any other argument is an error.
fn flag_values(args: &[String], name: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == name {
            out.push(it.next().ok_or(format!("{name} has no value"))?.clone());
        } else if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            out.push(v.to_owned());
        } else {
            return Err(format!("unexpected argument `{a}`"));
        }
    }
    Ok(out)
}

/// One GPU of the machine the spec is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuNode {
    /// NVML-style index: position in PCI bus order.
    pub index: u32,
    /// The N of `/dev/nvidiaN` ("Device Minor").
    pub minor: u32,
    /// `GPU-<uuid>` when known.
    pub uuid: Option<String>,
    /// PCI address when known.
    pub bdf: Option<String>,
}

/// The GPUs the loaded driver lists under `dir` (`/proc/driver/nvidia/gpus`): one directory
/// per PCI address with an `information` file ("Device Minor:", "GPU UUID:"). Sorted by PCI
/// address and indexed in that order, as NVML indexes them. A missing `dir` is no GPU.
pub fn gpus_from_proc(dir: &Path) -> Result<Vec<GpuNode>, CdiError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut found: Vec<(String, u32, Option<String>)> = Vec::new();
    for entry in rd.take(1024) {
        let entry = entry.map_err(io_err(dir))?;
        let bdf = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path().join("information");
        let mut text = String::new();
        fs::File::open(&path)
            .and_then(|f| f.take(64 * 1024).read_to_string(&mut text))
            .map_err(io_err(&path))?;
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.trim_start().strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        };
        let minor = field("Device Minor")
            .and_then(|m| m.parse::<u32>().ok())
            .filter(|m| *m < 255)
            .ok_or_else(|| CdiError::GpuInfo {
                path: path.clone(),
                why: "no `Device Minor: N` line (N below 255)".into(),
            })?;
        let uuid = field("GPU UUID").filter(|u| {
            crate::DeviceId::parse(u).is_ok_and(|d| matches!(d, crate::DeviceId::Uuid(_)))
        });
        found.push((bdf, minor, uuid));
    }
    found.sort();
    Ok(found
        .into_iter()
        .enumerate()
        .map(|(i, (bdf, minor, uuid))| GpuNode {
            index: i as u32,
            minor,
            uuid,
            bdf: Some(bdf),
        })
        .collect())
}

/// What to generate a spec from.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Where the driver's files are now (`/` in a guest, a staging directory at build time).
    pub driver_root: PathBuf,
    /// Library search paths, absolute inside `driver_root`, in order.
    pub lib_dirs: Vec<String>,
    /// Binary search paths, absolute inside `driver_root`, in order.
    pub bin_dirs: Vec<String>,
    /// Where `driver_root` will be when the spec is applied (default: `driver_root`):
    /// every `hostPath` is under it.
    pub host_root: Option<PathBuf>,
    /// The driver version; detected from the library names when `None`.
    pub driver_version: Option<String>,
    /// Where to look for the control device nodes (`/dev` in a guest). `None`: no device
    /// to look at (a flavour build); the compute set is listed without numbers, which the
    /// agent reads from the guest's nodes.
    pub dev_root: Option<PathBuf>,
    pub gpus: Vec<GpuNode>,
    /// Container directory for the libraries.
    pub container_lib_dir: String,
    /// `path` of the hooks.
    pub hook_path: String,
}

impl GenerateOptions {
    /// Defaults for a driver under `driver_root`: the default search paths, no GPU, no
    /// device root, gpucell's hooks, libraries into `/usr/lib/x86_64-linux-gnu`.
    pub fn new(driver_root: impl Into<PathBuf>) -> Self {
        GenerateOptions {
            driver_root: driver_root.into(),
            lib_dirs: DEFAULT_LIB_DIRS.iter().map(|s| s.to_string()).collect(),
            bin_dirs: DEFAULT_BIN_DIRS.iter().map(|s| s.to_string()).collect(),
            host_root: None,
            driver_version: None,
            dev_root: None,
            gpus: Vec::new(),
            container_lib_dir: DEFAULT_CONTAINER_LIB_DIR.into(),
            hook_path: HOOK_PATH.into(),
        }
    }
}

/// One driver library found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Library {
    /// Its path when the spec is applied.
    pub host_path: PathBuf,
    pub file_name: String,
    /// Its `DT_SONAME`, when it has one.
    pub soname: Option<String>,
}

/// A generated spec and what went into it.
#[derive(Debug, Clone)]
pub struct Generated {
    pub spec: Spec,
    pub driver_version: String,
    pub libraries: Vec<Library>,
    /// Host paths of the binaries mounted.
    pub binaries: Vec<PathBuf>,
    /// Files skipped and why (not x86-64 ELF, duplicates).
    pub warnings: Vec<String>,
}

/// Generates the spec. Reads only: file names, ELF headers, `/dev` entries.
pub fn generate(opts: &GenerateOptions) -> Result<Generated, CdiError> {
    if !clean_absolute(&opts.container_lib_dir) {
        return Err(CdiError::BadPath(opts.container_lib_dir.clone()));
    }
    let root = &opts.driver_root;
    let dirs = unique_dirs(root, &opts.lib_dirs)?;
    let version = match &opts.driver_version {
        Some(v) => v.clone(),
        None => detect_version_in(root, &dirs, &opts.lib_dirs)?,
    };
    if crate::Version::parse(&version).is_none() || version.contains('/') {
        return Err(CdiError::BadVersion(version));
    }
    let host_root = opts.host_root.as_deref().unwrap_or(root);
    let mut warnings = Vec::new();
    let libraries = find_libraries(root, host_root, &dirs, &version, &mut warnings)?;
    let binaries = find_binaries(root, host_root, &opts.bin_dirs)?;
    let lib_dir = opts.container_lib_dir.trim_end_matches('/');
    let mut edits = ContainerEdits {
        device_nodes: control_nodes(opts.dev_root.as_deref()),
        ..Default::default()
    };
    let mount = |host: &Path, container: String| Mount {
        host_path: host.display().to_string(),
        container_path: container,
        options: MOUNT_OPTIONS.iter().map(|s| s.to_string()).collect(),
        kind: None,
    };
    for l in &libraries {
        edits
            .mounts
            .push(mount(&l.host_path, format!("{lib_dir}/{}", l.file_name)));
    }
    for b in &binaries {
        let name = b.file_name().unwrap_or_default().to_string_lossy();
        edits
            .mounts
            .push(mount(b, format!("{CONTAINER_BIN_DIR}/{name}")));
    }
    let links = links_for(&libraries, lib_dir);
    let mut steps = Vec::new();
    if !links.is_empty() {
        steps.push(HookStep::CreateSymlinks(links));
    }
    steps.push(HookStep::EnableCudaCompat {
        host_driver_version: version.clone(),
    });
    steps.push(HookStep::UpdateLdcache {
        folders: vec![lib_dir.to_owned()],
    });
    steps.push(HookStep::DisableDeviceNodeModification);
    edits.hooks = steps.iter().map(|s| s.to_hook(&opts.hook_path)).collect();
    let mut spec = Spec {
        cdi_version: CDI_VERSION.into(),
        kind: KIND.into(),
        annotations: [
            (ANNOTATION_DRIVER_VERSION.to_owned(), version.clone()),
            (ANNOTATION_LIBRARY_DIR.to_owned(), lib_dir.to_owned()),
        ]
        .into(),
        devices: Vec::new(),
        container_edits: edits,
    };
    add_gpus(&mut spec, &opts.gpus);
    Ok(Generated {
        spec,
        driver_version: version,
        libraries,
        binaries,
        warnings,
    })
}

/// Replaces the spec's devices with one per GPU (by index, and by UUID when known) and
/// `"all"`.
pub fn add_gpus(spec: &mut Spec, gpus: &[GpuNode]) {
    let node = |g: &GpuNode| DeviceNode {
        path: format!("/dev/nvidia{}", g.minor),
        kind: Some("c".into()),
        major: Some(i64::from(NVIDIA_MAJOR)),
        minor: Some(i64::from(g.minor)),
        ..Default::default()
    };
    let mut devices = Vec::new();
    for g in gpus {
        let edits = ContainerEdits {
            device_nodes: vec![node(g)],
            ..Default::default()
        };
        let names = std::iter::once(g.index.to_string()).chain(g.uuid.clone());
        for name in names {
            devices.push(Device {
                name,
                annotations: BTreeMap::new(),
                container_edits: edits.clone(),
            });
        }
    }
    devices.push(Device {
        name: "all".into(),
        annotations: BTreeMap::new(),
        container_edits: ContainerEdits {
            device_nodes: gpus.iter().map(node).collect(),
            ..Default::default()
        },
    });
    spec.devices = devices;
}

fn control_nodes(dev_root: Option<&Path>) -> Vec<DeviceNode> {
    let Some(dev_root) = dev_root else {
        return CONTROL_NODES[1..]
            .iter()
            .map(|p| DeviceNode {
                path: (*p).into(),
                ..Default::default()
            })
            .collect();
    };
    CONTROL_NODES
        .iter()
        .filter_map(|p| {
            let rel = p.trim_start_matches('/').trim_start_matches("dev/");
            let host = dev_root.join(rel);
            let md = fs::metadata(&host).ok()?;
            let char_dev = md.file_type().is_char_device();
            let (major, minor) = (libc_major(md.rdev()), libc_minor(md.rdev()));
            let host_s = host.display().to_string();
            Some(DeviceNode {
                path: (*p).into(),
                host_path: (host_s != *p).then_some(host_s),
                kind: char_dev.then(|| "c".into()),
                major: char_dev.then_some(major),
                minor: char_dev.then_some(minor),
                ..Default::default()
            })
        })
        .collect()
}

/// Linux's encoding of a device number (glibc `gnu_dev_major` / `gnu_dev_minor`).
fn libc_major(dev: u64) -> i64 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as i64
}

fn libc_minor(dev: u64) -> i64 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as i64
}

/// SONAME links (`libcuda.so.1` → `libcuda.so.550.163.01`) and `.so` links
/// (`libcuda.so` → `libcuda.so.1`), as `(target, link path)`; each link path once.
fn links_for(libraries: &[Library], lib_dir: &str) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for l in libraries {
        let files: BTreeSet<&str> = libraries.iter().map(|l| l.file_name.as_str()).collect();
        let mut add = |target: &str, name: &str| {
            if name != target && !files.contains(name) && seen.insert(name.to_owned()) {
                out.push((target.to_owned(), format!("{lib_dir}/{name}")));
            }
        };
        let soname = l.soname.as_deref().filter(|s| valid_file_name(s));
        if let Some(s) = soname {
            add(&l.file_name, s);
        }
        if let Some(i) = l.file_name.find(".so.") {
            let dev = &l.file_name[..i + 3];
            add(soname.unwrap_or(&l.file_name), dev);
        }
    }
    out
}

fn valid_file_name(s: &str) -> bool {
    !s.is_empty() && s.len() < 256 && !s.contains('/') && !s.contains('\0') && s != "." && s != ".."
}

/// Resolves absolute path `p` inside `root`, following symlinks without leaving `root`.
/// Missing components are appended as they are.
pub fn resolve_in(root: &Path, p: &str) -> PathBuf {
    let mut todo: Vec<String> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .rev()
        .map(str::to_owned)
        .collect();
    let mut cur: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        cur.push(c);
        let here = cur.iter().fold(root.to_path_buf(), |a, c| a.join(c));
        let Ok(target) = fs::read_link(&here) else {
            continue;
        };
        links += 1;
        if links > MAX_LINKS {
            break;
        }
        cur.pop();
        let t = target.to_string_lossy().into_owned();
        if t.starts_with('/') {
            cur.clear();
        }
        todo.extend(
            t.split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .rev()
                .map(str::to_owned),
        );
    }
    cur.iter().fold(root.to_path_buf(), |a, c| a.join(c))
}

/// The search directories that exist, resolved in `root`, each once.
fn unique_dirs(root: &Path, dirs: &[String]) -> Result<Vec<PathBuf>, CdiError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for d in dirs {
        if !clean_absolute(d) {
            return Err(CdiError::BadPath(d.clone()));
        }
        let p = resolve_in(root, d);
        if let Ok(md) = fs::metadata(&p) {
            if md.is_dir() && seen.insert((md.dev(), md.ino())) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

fn list_dir(dir: &Path) -> Result<Vec<String>, CdiError> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .take(MAX_DIR_ENTRIES)
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// The driver version from the names of `libcuda.so.<V>` / `libnvidia-ml.so.<V>` in the
/// library search paths of `root`.
pub fn detect_driver_version(root: &Path, lib_dirs: &[String]) -> Result<String, CdiError> {
    let dirs = unique_dirs(root, lib_dirs)?;
    detect_version_in(root, &dirs, lib_dirs)
}

fn detect_version_in(root: &Path, dirs: &[PathBuf], names: &[String]) -> Result<String, CdiError> {
    let mut versions = BTreeSet::new();
    for d in dirs {
        for name in list_dir(d)? {
            let v = name
                .strip_prefix("libcuda.so.")
                .or_else(|| name.strip_prefix("libnvidia-ml.so."));
            if let Some(v) = v.filter(|v| v.contains('.') && crate::Version::parse(v).is_some()) {
                versions.insert(v.to_owned());
            }
        }
    }
    match versions.len() {
        1 => Ok(versions.into_iter().next().unwrap_or_default()),
        0 => Err(CdiError::NoDriver {
            root: root.to_owned(),
            dirs: names.join(":"),
        }),
        _ => Err(CdiError::SeveralDrivers {
            root: root.to_owned(),
            versions: versions.into_iter().collect::<Vec<_>>().join(", "),
        }),
    }
}

fn host_path_of(root: &Path, host_root: &Path, resolved: &Path) -> PathBuf {
    match resolved.strip_prefix(root) {
        Ok(rel) => host_root.join(rel),
        Err(_) => resolved.to_owned(),
    }
}

fn find_libraries(
    root: &Path,
    host_root: &Path,
    dirs: &[PathBuf],
    version: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<Library>, CdiError> {
    let suffix = format!(".so.{version}");
    let mut by_name: BTreeMap<String, Library> = BTreeMap::new();
    for d in dirs {
        for name in list_dir(d)?.into_iter().filter(|n| n.ends_with(&suffix)) {
            let inner = d.strip_prefix(root).unwrap_or(d).join(&name);
            let file = resolve_in(root, &inner.to_string_lossy());
            if !fs::metadata(&file).is_ok_and(|m| m.is_file()) {
                continue;
            }
            if by_name.contains_key(&name) {
                warnings.push(format!(
                    "{}: skipped, {name} was found earlier",
                    file.display()
                ));
                continue;
            }
            let soname = match read_soname(&file) {
                Ok(s) => s,
                Err(e) => {
                    warnings.push(format!("skipped: {e}"));
                    continue;
                }
            };
            by_name.insert(
                name.clone(),
                Library {
                    host_path: host_path_of(root, host_root, &file),
                    file_name: name,
                    soname,
                },
            );
        }
    }
    Ok(by_name.into_values().collect())
}

fn find_binaries(root: &Path, host_root: &Path, dirs: &[String]) -> Result<Vec<PathBuf>, CdiError> {
    let dirs = unique_dirs(root, dirs)?;
    let mut out = Vec::new();
    for name in BINARIES {
        let found = dirs.iter().find_map(|d| {
            let inner = d.strip_prefix(root).unwrap_or(d).join(name);
            let file = resolve_in(root, &inner.to_string_lossy());
            let md = fs::metadata(&file).ok()?;
            (md.is_file() && md.mode() & 0o111 != 0).then_some(file)
        });
        if let Some(f) = found {
            out.push(host_path_of(root, host_root, &f));
        }
    }
    Ok(out)
}

/// The `DT_SONAME` of a 64-bit x86-64 ELF shared object (`None` when it has none). Reads
/// only the headers and the dynamic section.
pub fn read_soname(path: &Path) -> Result<Option<String>, CdiError> {
    use object::elf;
    use object::read::elf::{Dyn, FileHeader, SectionHeader};
    let file = fs::File::open(path).map_err(io_err(path))?;
    let cache = object::ReadCache::new(file);
    let elf_err = |why: String| CdiError::Elf {
        path: path.to_owned(),
        why,
    };
    let header = elf::FileHeader64::<object::Endianness>::parse(&cache)
        .map_err(|e| elf_err(e.to_string()))?;
    let endian = header.endian().map_err(|e| elf_err(e.to_string()))?;
    if header.e_machine(endian) != elf::EM_X86_64 {
        return Err(elf_err(format!("machine {}", header.e_machine(endian))));
    }
    let sections = header
        .sections(endian, &cache)
        .map_err(|e| elf_err(e.to_string()))?;
    for s in sections.iter() {
        let Some((dyns, link)) = s
            .dynamic(endian, &cache)
            .map_err(|e| elf_err(e.to_string()))?
        else {
            continue;
        };
        let strings = sections
            .strings(endian, &cache, link)
            .map_err(|e| elf_err(e.to_string()))?;
        for d in dyns {
            if d.d_tag(endian) == u64::from(elf::DT_SONAME) {
                let off = u32::try_from(d.d_val(endian))
                    .map_err(|_| elf_err("DT_SONAME offset out of range".into()))?;
                let name = strings
                    .get(off)
                    .map_err(|_| elf_err("DT_SONAME outside the string table".into()))?;
                return Ok(Some(String::from_utf8_lossy(name).into_owned()));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
