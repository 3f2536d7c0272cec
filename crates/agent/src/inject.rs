//! The NVIDIA driver injected into the workload's container by a CDI spec
//! (`gpucell_nvidia::cdi`), before the workload starts: what the NVIDIA Container Toolkit
//! does for docker, done by the agent itself (no nvidia-container-cli, no nvidia-cdi-hook).
//!
//! Two phases, because the container's `/dev` and `/proc` exist only inside the workload's
//! mount namespace:
//!
//! 1. [`apply_root`], on the container root before the workload is cloned: read-only bind
//!    mounts of the driver's libraries (into the image's own library directory) and
//!    binaries (into `/usr/bin`), the SONAME and `.so` links, CUDA forward compatibility
//!    (`/usr/local/cuda/compat` first in `/etc/ld.so.conf.d` when the image's libcuda is
//!    newer than the driver and the GPUs are data-centre ones), `/etc/ld.so.conf.d` and the
//!    image's own `ldconfig` run chrooted in the root, and a copy of the driver's
//!    `/proc/driver/nvidia/params` saying `ModifyDeviceFiles: 0`.
//! 2. [`apply_devices`], in the workload's namespace once its `/dev` and `/proc` are
//!    mounted: character nodes for the control devices and the visible GPUs only, and the
//!    params copy bound over `/proc/driver/nvidia/params`. Where the kernel refuses
//!    `mknod` (`EPERM`: a user namespace, a gVisor sandbox), the node on the agent's side
//!    is bind-mounted instead, when it is a character device with the same numbers.
//!
//! Every mount, node and process goes through [`InjectOps`]; [`RealOps`] does them.
//! Paths inside the image are resolved with `rootpath`, so a hostile image cannot point
//! the agent outside its root.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpucell_nvidia::cdi::{CdiError, ContainerEdits, HookStep, Spec};
use gpucell_nvidia::{Version, VisibleDevices};
use nix::errno::Errno;

use crate::rootpath::{self, RootPathError};

/// Where the image's libraries go, in order of preference: the first that exists wins.
pub const LIB_DIR_CANDIDATES: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/lib/x86_64-linux-gnu",
    "/lib64",
];
/// The image's ldconfig, in order of preference (Ubuntu's `ldconfig` is a wrapper script).
pub const LDCONFIGS: [&str; 4] = [
    "/sbin/ldconfig.real",
    "/sbin/ldconfig",
    "/usr/sbin/ldconfig.real",
    "/usr/sbin/ldconfig",
];
/// The image's CUDA forward-compatibility libraries.
pub const COMPAT_DIR: &str = "/usr/local/cuda/compat";
/// Read before `/etc/ld.so.conf.d/00-gpucell-nvidia.conf` (the glob is sorted).
pub const COMPAT_CONF: &str = "/etc/ld.so.conf.d/00-compat-gpucell.conf";
pub const DRIVER_CONF: &str = "/etc/ld.so.conf.d/00-gpucell-nvidia.conf";
/// The driver's parameters, in the guest and in the container.
pub const PARAMS: &str = "/proc/driver/nvidia/params";
/// Mode of the device nodes (the driver's default `NVreg_DeviceFileMode`).
const NODE_MODE: u32 = 0o666;
/// Longest an image's ldconfig may run.
const LDCONFIG_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest params file read.
const MAX_PARAMS: u64 = 64 * 1024;
/// musl's dynamic loader; glibc's C library.
const MUSL_LOADER: &str = "/lib/ld-musl-x86_64.so.1";
const GLIBC_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("the driver's CDI spec")]
    Spec(#[source] CdiError),
    #[error(
        "the image uses musl libc ({0}) and has no glibc: NVIDIA's driver libraries (libcuda, \
         libnvidia-ml, nvidia-smi) are built for glibc and cannot load in it; use a \
         glibc-based image (Debian, Ubuntu, UBI, nvidia/cuda) for GPU work"
    )]
    Musl(String),
    #[error(
        "NVIDIA_VISIBLE_DEVICES names GPU `{name}`, which this sandbox does not have (it has \
         {available}): use one of those, `all` or `none`"
    )]
    UnknownDevice { name: String, available: String },
    #[error("resolving {0} in the image")]
    Path(String, #[source] RootPathError),
    #[error("{what} {path} in the container")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a directory in the image; the driver's {what} cannot go there")]
    IsDir { path: String, what: &'static str },
    #[error("bind-mounting {src} read-only on {dst} in the container")]
    Mount {
        src: String,
        dst: String,
        #[source]
        source: Errno,
    },
    #[error("creating device node {path} in the container")]
    Mknod {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("the image's {path} failed refreshing ld.so.cache: {why}")]
    Ldconfig { path: String, why: String },
}

fn io<'a>(what: &'static str, path: &'a str) -> impl FnOnce(std::io::Error) -> InjectError + 'a {
    move |source| InjectError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Mounts, nodes and the image's ldconfig: the seam between injection and the kernel.
pub trait InjectOps {
    /// Bind-mounts `src` on existing `dst`, then makes it read-only, nosuid, nodev and
    /// private (the toolkit's `ro,nosuid,nodev,rbind,rprivate`).
    fn bind_ro(&mut self, src: &Path, dst: &Path) -> Result<(), Errno>;
    /// Creates character device `path` with mode `mode` (not subject to the umask).
    fn mknod_char(&mut self, path: &Path, major: u64, minor: u64, mode: u32) -> Result<(), Errno>;
    /// Bind-mounts the existing device node `src` on existing file `dst` (the fallback
    /// where `mknod` is refused); the bind keeps the node usable (no `nodev`).
    fn bind_node(&mut self, src: &Path, dst: &Path) -> Result<(), Errno>;
    /// Major and minor of character device `path` on this side, if it is one.
    fn char_numbers(&mut self, path: &Path) -> Option<(u64, u64)>;
    /// Runs `ldconfig` (a path inside `root`) chrooted in `root`; the error is its stderr.
    fn ldconfig(&mut self, root: &Path, ldconfig: &str, log: &Path) -> Result<(), String>;
}

/// The kernel itself.
pub struct RealOps;

impl InjectOps for RealOps {
    fn bind_ro(&mut self, src: &Path, dst: &Path) -> Result<(), Errno> {
        use nix::mount::{mount, MsFlags};
        let none = None::<&str>;
        mount(
            Some(src),
            dst,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )?;
        let ro = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        mount(none, dst, none, ro, none)?;
        mount(none, dst, none, MsFlags::MS_PRIVATE | MsFlags::MS_REC, none)
    }

    fn mknod_char(&mut self, path: &Path, major: u64, minor: u64, mode: u32) -> Result<(), Errno> {
        use nix::sys::stat::{fchmodat, makedev, mknod, FchmodatFlags, Mode, SFlag};
        let m = Mode::from_bits_truncate(mode);
        mknod(path, SFlag::S_IFCHR, m, makedev(major, minor))?;
        // The node just made (mknod is subject to the umask); plain chmod(2), which every
        // kernel has (the no-follow flavour needs fchmodat2 or /proc).
        fchmodat(None, path, m, FchmodatFlags::FollowSymlink)
    }

    fn bind_node(&mut self, src: &Path, dst: &Path) -> Result<(), Errno> {
        use nix::mount::{mount, MsFlags};
        let none = None::<&str>;
        mount(Some(src), dst, none, MsFlags::MS_BIND, none)
    }

    fn char_numbers(&mut self, path: &Path) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let md = fs::metadata(path).ok()?;
        let rdev = md.rdev();
        md.file_type()
            .is_char_device()
            .then(|| (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)))
    }

    fn ldconfig(&mut self, root: &Path, ldconfig: &str, log: &Path) -> Result<(), String> {
        run_chrooted(root, ldconfig, log)
    }
}

/// Runs `prog` chrooted in `root` with stderr to `log`, killed after `LDCONFIG_TIMEOUT`.
/// Polls instead of using a thread: the agent stays single-threaded.
fn run_chrooted(root: &Path, prog: &str, log: &Path) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let err_file = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let root_owned = root.to_owned();
    let mut cmd = Command::new(prog);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(err_file));
    // SAFETY: chroot and chdir are async-signal-safe; nothing is allocated after fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::chroot(&root_owned)?;
            nix::unistd::chdir("/")?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("starting it: {e}"))?;
    let deadline = Instant::now() + LDCONFIG_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {LDCONFIG_TIMEOUT:?}, killed"));
            }
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    let _ = fs::File::open(log).and_then(|f| f.take(4096).read_to_string(&mut text));
    Err(format!("{status}: {}", text.trim()))
}

/// Everything injection needs besides the spec.
#[derive(Debug, Clone)]
pub struct Options {
    /// The GPUs are data-centre ones: CUDA forward compatibility may be used.
    pub compat_allowed: bool,
    /// The driver's params on this side (`/proc/driver/nvidia/params`).
    pub params_source: PathBuf,
    /// A directory outside the container for generated files (the params copy, logs).
    pub state_dir: PathBuf,
}

/// A device node to create in the container's `/dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// Container path (`/dev/nvidia0`).
    pub path: String,
    /// Where to read the numbers from when the spec has none.
    pub source: String,
    pub numbers: Option<(u64, u64)>,
}

/// What [`plan`] decided from the spec, the visible devices and the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The image's library directory the libraries go into.
    pub lib_dir: String,
    /// (host path, container path)
    pub mounts: Vec<(String, String)>,
    pub steps: Vec<HookStep>,
    pub nodes: Vec<NodePlan>,
}

/// What phase 2 needs: made by [`apply_root`], used by [`apply_devices`] in the workload's
/// namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSetup {
    /// (container path, major, minor)
    pub nodes: Vec<(String, u64, u64)>,
    /// The params copy to bind over `/proc/driver/nvidia/params`.
    pub params: Option<PathBuf>,
    /// (container path, the node on the agent's side): what is bind-mounted where `mknod`
    /// is refused.
    pub sources: Vec<(String, PathBuf)>,
}

/// What [`apply_devices`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevicesApplied {
    /// Nodes made with `mknod`.
    pub created: usize,
    /// Nodes bind-mounted from the agent's side because `mknod` was refused.
    pub bound: usize,
    /// The params copy covers the container's `/proc/driver/nvidia/params`.
    pub params: bool,
}

/// What phase 1 did, for the run report and the logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub lib_dir: String,
    pub mounts: usize,
    pub links: usize,
    /// The compat libcuda used (`/usr/local/cuda/compat/libcuda.so.X`), if any.
    pub compat: Option<String>,
    /// The image's ldconfig that ran, if any.
    pub ldconfig: Option<String>,
    pub warnings: Vec<String>,
    pub devices: DeviceSetup,
}

/// Decides what to inject: the edits of the spec's common part and of the devices
/// `visible` selects, moved to the image's library directory. Refuses musl images.
pub fn plan(spec: &Spec, visible: &VisibleDevices, root: &Path) -> Result<Plan, InjectError> {
    spec.validate().map_err(InjectError::Spec)?;
    if *visible == VisibleDevices::Void {
        return Ok(Plan::default());
    }
    check_libc(root)?;
    let mut edits: Vec<&ContainerEdits> = vec![&spec.container_edits];
    for name in visible.cdi_names() {
        let dev = spec
            .device(&name)
            .ok_or_else(|| InjectError::UnknownDevice {
                name: name.clone(),
                available: available_devices(spec),
            })?;
        edits.push(&dev.container_edits);
    }
    let from = spec.library_dir().trim_end_matches('/').to_owned();
    let lib_dir = image_lib_dir(root, &from)?;
    let moved = |p: &str| match p.strip_prefix(&from) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{lib_dir}{rest}"),
        _ => p.to_owned(),
    };
    let mut plan = Plan {
        lib_dir: lib_dir.clone(),
        ..Default::default()
    };
    for e in edits {
        for m in &e.mounts {
            let entry = (m.host_path.clone(), moved(&m.container_path));
            if !plan.mounts.contains(&entry) {
                plan.mounts.push(entry);
            }
        }
        for n in &e.device_nodes {
            if plan.nodes.iter().any(|p| p.path == n.path) {
                continue;
            }
            let numbers = match (n.major, n.minor) {
                (Some(a), Some(b)) => u64::try_from(a).ok().zip(u64::try_from(b).ok()),
                _ => None,
            };
            plan.nodes.push(NodePlan {
                path: n.path.clone(),
                source: n.source().to_owned(),
                numbers,
            });
        }
        for h in &e.hooks {
            let step = match HookStep::from_hook(h).map_err(InjectError::Spec)? {
                HookStep::CreateSymlinks(l) => {
                    HookStep::CreateSymlinks(l.into_iter().map(|(t, p)| (t, moved(&p))).collect())
                }
                HookStep::UpdateLdcache { folders } => HookStep::UpdateLdcache {
                    folders: folders.iter().map(|f| moved(f)).collect(),
                },
                s => s,
            };
            plan.steps.push(step);
        }
    }
    Ok(plan)
}

fn available_devices(spec: &Spec) -> String {
    let names: Vec<&str> = spec
        .devices
        .iter()
        .map(|d| d.name.as_str())
        .filter(|n| *n != "all")
        .collect();
    if names.is_empty() {
        "no GPU".into()
    } else {
        names.join(", ")
    }
}

fn resolve(root: &Path, p: &str) -> Result<PathBuf, InjectError> {
    rootpath::resolve(root, "/", p).map_err(|e| InjectError::Path(p.to_owned(), e))
}

/// musl's loader present and no glibc `libc.so.6`: the driver cannot load.
fn check_libc(root: &Path) -> Result<(), InjectError> {
    let musl = resolve(root, MUSL_LOADER)?;
    if fs::symlink_metadata(&musl).is_err() {
        return Ok(());
    }
    for d in GLIBC_DIRS {
        if resolve(root, &format!("{d}/libc.so.6"))?.is_file() {
            return Ok(());
        }
    }
    Err(InjectError::Musl(MUSL_LOADER.into()))
}

/// The first of [`LIB_DIR_CANDIDATES`] that is a directory in the image, else `default`.
fn image_lib_dir(root: &Path, default: &str) -> Result<String, InjectError> {
    for c in LIB_DIR_CANDIDATES {
        if resolve(root, c)?.is_dir() {
            return Ok(c.to_owned());
        }
    }
    Ok(default.to_owned())
}

/// Phase 1, on the container root (see the module documentation).
pub fn apply_root(
    plan: &Plan,
    root: &Path,
    opts: &Options,
    ops: &mut dyn InjectOps,
) -> Result<Report, InjectError> {
    let mut report = Report {
        lib_dir: plan.lib_dir.clone(),
        ..Default::default()
    };
    for (src, dst) in &plan.mounts {
        mount_one(root, Path::new(src), dst, ops)?;
        report.mounts += 1;
    }
    for step in &plan.steps {
        if let HookStep::CreateSymlinks(links) = step {
            for (target, link) in links {
                make_link(root, target, link, &mut report.warnings)?;
                report.links += 1;
            }
        }
    }
    for step in &plan.steps {
        if let HookStep::EnableCudaCompat {
            host_driver_version,
        } = step
        {
            report.compat = enable_compat(root, host_driver_version, opts, &mut report)?;
        }
    }
    let folders: Vec<&String> = plan
        .steps
        .iter()
        .flat_map(|s| match s {
            HookStep::UpdateLdcache { folders } => folders.iter().collect(),
            _ => Vec::new(),
        })
        .collect();
    if plan
        .steps
        .iter()
        .any(|s| matches!(s, HookStep::UpdateLdcache { .. }))
    {
        update_ldcache(root, &folders, opts, ops, &mut report)?;
    }
    report.devices.nodes = node_numbers(plan, ops, &mut report.warnings);
    report.devices.sources = plan
        .nodes
        .iter()
        .filter(|n| report.devices.nodes.iter().any(|(p, ..)| *p == n.path))
        .map(|n| (n.path.clone(), PathBuf::from(&n.source)))
        .collect();
    if plan
        .steps
        .contains(&HookStep::DisableDeviceNodeModification)
    {
        report.devices.params = params_copy(opts, &mut report.warnings)?;
    }
    Ok(report)
}

/// Creates an empty file (or directory) at `dst` in the image if needed and binds `src`.
fn mount_one(
    root: &Path,
    src: &Path,
    dst: &str,
    ops: &mut dyn InjectOps,
) -> Result<(), InjectError> {
    let target = resolve(root, dst)?;
    let src_is_dir = src.is_dir();
    match fs::symlink_metadata(&target) {
        Ok(md) if md.is_dir() && !src_is_dir => {
            return Err(InjectError::IsDir {
                path: dst.to_owned(),
                what: "file",
            })
        }
        Ok(_) => {}
        Err(_) => {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(io("creating the directory of", dst))?;
            }
            if src_is_dir {
                fs::create_dir(&target).map_err(io("creating", dst))?;
            } else {
                fs::File::create(&target).map_err(io("creating", dst))?;
            }
        }
    }
    ops.bind_ro(src, &target)
        .map_err(|source| InjectError::Mount {
            src: src.display().to_string(),
            dst: dst.to_owned(),
            source,
        })
}

/// A symlink `link` → `target`, replacing a file or link the image has there.
fn make_link(
    root: &Path,
    target: &str,
    link: &str,
    warnings: &mut Vec<String>,
) -> Result<(), InjectError> {
    let (parent, name) = link.rsplit_once('/').unwrap_or(("", link));
    let dir = resolve(root, if parent.is_empty() { "/" } else { parent })?;
    fs::create_dir_all(&dir).map_err(io("creating the directory of", link))?;
    let path = dir.join(name);
    if let Ok(md) = fs::symlink_metadata(&path) {
        if md.is_dir() {
            warnings.push(format!("{link} is a directory in the image; link not made"));
            return Ok(());
        }
        fs::remove_file(&path).map_err(io("replacing", link))?;
    }
    std::os::unix::fs::symlink(target, &path).map_err(io("creating link", link))
}

/// The newest `libcuda.so.<version>` in the image's compat directory, if any.
fn compat_libcuda(root: &Path) -> Result<Option<(Version, String)>, InjectError> {
    let dir = resolve(root, COMPAT_DIR)?;
    let Ok(rd) = fs::read_dir(&dir) else {
        return Ok(None);
    };
    Ok(rd
        .filter_map(|e| e.ok())
        .take(4096)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| {
            let v = Version::parse(n.strip_prefix("libcuda.so.")?)?;
            (v.fields().len() > 1).then_some((v, n))
        })
        .max_by(|a, b| a.0.cmp(&b.0)))
}

/// `enable-cuda-compat`: the image's compat libcuda first in the search path when its
/// branch is newer than the driver's and the GPUs are data-centre ones.
fn enable_compat(
    root: &Path,
    driver: &str,
    opts: &Options,
    report: &mut Report,
) -> Result<Option<String>, InjectError> {
    let Some((v, name)) = compat_libcuda(root)? else {
        return Ok(None);
    };
    let driver_major = Version::parse(driver).map_or(0, |d| d.major());
    if v.major() <= driver_major {
        return Ok(None);
    }
    if !opts.compat_allowed {
        report.warnings.push(format!(
            "the image's {COMPAT_DIR}/{name} (CUDA forward compatibility) is newer than driver \
             {driver} but works only on data-centre GPUs; not used"
        ));
        return Ok(None);
    }
    write_in_root(root, COMPAT_CONF, &format!("{COMPAT_DIR}\n"))?;
    Ok(Some(format!("{COMPAT_DIR}/{name}")))
}

fn write_in_root(root: &Path, path: &str, text: &str) -> Result<(), InjectError> {
    let p = resolve(root, path)?;
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(io("creating the directory of", path))?;
    }
    if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
        return Err(InjectError::IsDir {
            path: path.to_owned(),
            what: "ld.so configuration",
        });
    }
    fs::write(&p, text).map_err(io("writing", path))
}

/// `update-ldcache`: the folders in `/etc/ld.so.conf.d` (and that directory included from
/// `/etc/ld.so.conf`), then the image's own ldconfig, chrooted.
fn update_ldcache(
    root: &Path,
    folders: &[&String],
    opts: &Options,
    ops: &mut dyn InjectOps,
    report: &mut Report,
) -> Result<(), InjectError> {
    let text: String = folders.iter().map(|f| format!("{f}\n")).collect();
    write_in_root(root, DRIVER_CONF, &text)?;
    let conf = resolve(root, "/etc/ld.so.conf")?;
    let current = fs::read_to_string(&conf).unwrap_or_default();
    if !current
        .lines()
        .any(|l| l.trim_start().starts_with("include") && l.contains("/etc/ld.so.conf.d"))
    {
        let mut text = current;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("include /etc/ld.so.conf.d/*.conf\n");
        write_in_root(root, "/etc/ld.so.conf", &text)?;
    }
    let found = LDCONFIGS.iter().find_map(|p| {
        let r = resolve(root, p).ok()?;
        let md = fs::metadata(&r).ok()?;
        (md.is_file() && md.permissions().mode() & 0o111 != 0).then_some(*p)
    });
    let Some(ldconfig) = found else {
        report.warnings.push(
            "the image has no ldconfig: its ld.so.cache is not refreshed, the driver's \
             libraries are found only in the loader's default directories"
                .into(),
        );
        return Ok(());
    };
    let _ = fs::create_dir_all(&opts.state_dir);
    let log = opts.state_dir.join("ldconfig.log");
    ops.ldconfig(root, ldconfig, &log)
        .map_err(|why| InjectError::Ldconfig {
            path: ldconfig.into(),
            why,
        })?;
    report.ldconfig = Some(ldconfig.into());
    Ok(())
}

/// The numbers of each planned node: from the spec, else from the node on this side.
fn node_numbers(
    plan: &Plan,
    ops: &mut dyn InjectOps,
    warnings: &mut Vec<String>,
) -> Vec<(String, u64, u64)> {
    plan.nodes
        .iter()
        .filter_map(|n| {
            let numbers = n.numbers.or_else(|| ops.char_numbers(Path::new(&n.source)));
            if numbers.is_none() {
                warnings.push(format!(
                    "{} is not a character device here (driver not loaded?); not created",
                    n.source
                ));
            }
            numbers.map(|(a, b)| (n.path.clone(), a, b))
        })
        .collect()
}

/// A copy of the driver's params with `ModifyDeviceFiles: 0`, in the state directory.
fn params_copy(opts: &Options, warnings: &mut Vec<String>) -> Result<Option<PathBuf>, InjectError> {
    let mut text = String::new();
    match fs::File::open(&opts.params_source) {
        Ok(f) => {
            f.take(MAX_PARAMS)
                .read_to_string(&mut text)
                .map_err(io("reading", PARAMS))?;
        }
        Err(_) => {
            warnings.push(format!(
                "{} is absent (driver not loaded?): params not replaced",
                opts.params_source.display()
            ));
            return Ok(None);
        }
    }
    let out = modify_device_files_off(&text);
    fs::create_dir_all(&opts.state_dir).map_err(io("creating", "the agent's state directory"))?;
    let path = opts.state_dir.join("nvidia-params");
    fs::write(&path, out).map_err(io("writing", "the params copy"))?;
    Ok(Some(path))
}

/// The params text with `ModifyDeviceFiles: 0` (the line replaced, or added).
pub fn modify_device_files_off(params: &str) -> String {
    let mut found = false;
    let mut out: String = params
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("ModifyDeviceFiles:") {
                found = true;
                "ModifyDeviceFiles: 0".to_owned()
            } else {
                l.to_owned()
            }
        })
        .map(|l| l + "\n")
        .collect();
    if !found {
        out.push_str("ModifyDeviceFiles: 0\n");
    }
    out
}

/// Phase 2, in the workload's mount namespace after its `/dev` and `/proc` are mounted
/// (and before `pivot_root`): the device nodes and the params bind.
pub fn apply_devices(
    setup: &DeviceSetup,
    root: &Path,
    ops: &mut dyn InjectOps,
) -> Result<DevicesApplied, InjectError> {
    let mut done = DevicesApplied::default();
    for (path, major, minor) in &setup.nodes {
        // Validated by the spec: /dev/… without `..`; /dev is the container's tmpfs.
        let full = root.join(path.trim_start_matches('/'));
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent).map_err(io("creating the directory of", path))?;
        }
        match ops.mknod_char(&full, *major, *minor, NODE_MODE) {
            Ok(()) => done.created += 1,
            Err(e) if MKNOD_REFUSED.contains(&e) => {
                bind_existing_node(setup, path, &full, (*major, *minor), ops, e)?;
                done.bound += 1;
            }
            Err(source) => {
                return Err(InjectError::Mknod {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
    if let Some(copy) = &setup.params {
        let target = root.join(PARAMS.trim_start_matches('/'));
        if target.is_file() {
            ops.bind_ro(copy, &target)
                .map_err(|source| InjectError::Mount {
                    src: copy.display().to_string(),
                    dst: PARAMS.into(),
                    source,
                })?;
            done.params = true;
        }
    }
    Ok(done)
}

/// How a kernel says it will not create device nodes here.
const MKNOD_REFUSED: [Errno; 2] = [Errno::EPERM, Errno::EACCES];

/// The fallback for a refused `mknod`: the agent's own node bound on an empty file, when
/// it is a character device with the numbers asked for; else the `mknod` error stands.
fn bind_existing_node(
    setup: &DeviceSetup,
    path: &str,
    full: &Path,
    numbers: (u64, u64),
    ops: &mut dyn InjectOps,
    refused: Errno,
) -> Result<(), InjectError> {
    let not_bound = || InjectError::Mknod {
        path: path.to_owned(),
        source: refused,
    };
    let Some((_, src)) = setup.sources.iter().find(|(p, _)| p == path) else {
        return Err(not_bound());
    };
    if ops.char_numbers(src) != Some(numbers) {
        return Err(not_bound());
    }
    fs::File::create(full).map_err(io("creating the bind target", path))?;
    ops.bind_node(src, full)
        .map_err(|source| InjectError::Mount {
            src: src.display().to_string(),
            dst: path.to_owned(),
            source,
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
