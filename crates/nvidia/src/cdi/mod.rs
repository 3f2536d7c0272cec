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

use std::path::{Path, PathBuf};

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

mod generate;
mod spec;

#[allow(unused_imports)]
use generate::*;
pub use generate::{
    add_gpus, detect_driver_version, generate, gpus_from_proc, read_soname, resolve_in,
    GenerateOptions, Generated, GpuNode, Library,
};
#[allow(unused_imports)]
use spec::*;
pub use spec::{clean_absolute, ContainerEdits, Device, DeviceNode, Hook, HookStep, Mount, Spec};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
