//! Building a flavour: kernel package → vmlinux + modules; agent + modules → initramfs;
//! both described by a manifest, built in a temp dir and renamed into place.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::cpio::{Archive, CpioError};
use crate::deb::{self, DebError, DebFile};
use crate::flavour::{self, Flavour, FlavourError};
use crate::kernel::{self, KernelChoice, KernelError};
use crate::manifest::{
    FileDigest, Manifest, INITRAMFS_FILE, MANIFEST_FILE, MANIFEST_SCHEMA, VMLINUX_FILE,
};
use crate::modules::{self, ModuleFile, ModulesError};
use crate::vmlinux::{self, VmlinuxError};
use crate::{agent_bin, agent_bin::AgentError};

/// Where the agent finds its modules in the init image, and the load-order file.
pub const MODULES_DIR: &str = "modules";
pub const MODULES_ORDER: &str = "modules/order";
/// Largest uncompressed kernel module accepted.
const MAX_MODULE: u64 = 64 << 20;

/// Identity of this builder; part of the cache key.
pub fn builder_id() -> String {
    format!(
        "gpucell-guest {} layout {MANIFEST_SCHEMA}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Options of `gpucell guest build`.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub flavour: String,
    /// The agent binary; `None` searches (see [`agent_bin::locate`]).
    pub agent: Option<PathBuf>,
    /// A local kernel `.deb` instead of the flavour's package from apt.
    pub kernel_deb: Option<PathBuf>,
    /// Debian's packaged kernel, or the microVM kernel built from `linux-source-6.1`
    /// (ignored when `kernel_deb` is given). `None`: [`KernelChoice::default`].
    pub kernel: Option<KernelChoice>,
    /// Rebuild even when the cached build matches the inputs.
    pub force: bool,
    /// Where long steps (downloads, compiling a driver) report progress, one line each.
    pub progress: Option<fn(&str)>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            flavour: crate::DEFAULT_FLAVOUR.to_owned(),
            agent: None,
            kernel_deb: None,
            kernel: None,
            force: false,
            progress: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Flavour(#[from] FlavourError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("kernel package")]
    Deb(#[from] DebError),
    #[error("kernel modules")]
    Modules(#[from] ModulesError),
    #[error("extracting vmlinux from {0}")]
    Vmlinux(PathBuf, #[source] VmlinuxError),
    #[error("writing the init image")]
    Cpio(#[from] CpioError),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("the kernel package holds {0} module trees under lib/modules (expected exactly one)")]
    KernelTrees(usize),
    #[error("`depmod -b` failed: {0}; install kmod")]
    Depmod(String),
    #[error("module {0} is compressed with {1}, which this version cannot unpack; use a kernel with uncompressed or .xz modules")]
    CompressedModule(String, &'static str),
    #[error("module {0} is over {MAX_MODULE} bytes")]
    ModuleTooLarge(String),
    #[error("the microVM kernel")]
    Kernel(#[from] KernelError),
    #[error("NVIDIA driver `{0}`")]
    Driver(String, #[source] Box<crate::driver::DriverError>),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |e| BuildError::Io(what, e)
}

fn digest(file: &str, data: &[u8]) -> FileDigest {
    FileDigest {
        file: file.to_owned(),
        sha256: hex::encode(Sha256::digest(data)),
        size: data.len() as u64,
    }
}

/// Where the inputs of a build come from, resolved without downloading anything.
struct Inputs {
    flavour: &'static Flavour,
    agent: Vec<u8>,
    agent_digest: FileDigest,
    kernel: KernelSource,
}

enum KernelSource {
    Local(DebFile),
    Apt(deb::PackageInfo),
}

impl KernelSource {
    fn sha256(&self) -> &str {
        match self {
            KernelSource::Local(d) => &d.sha256,
            KernelSource::Apt(i) => &i.sha256,
        }
    }
}

fn resolve_inputs(guest_dir: &Path, opts: &BuildOptions) -> Result<Inputs, BuildError> {
    let flavour = flavour::find(&opts.flavour)?;
    if !flavour.extra_packages.is_empty() {
        return Err(FlavourError::ExtraPackages(flavour.name.to_owned()).into());
    }
    let agent_path = agent_bin::locate(opts.agent.as_deref())?;
    let agent = agent_bin::load(&agent_path)?;
    let agent_digest = digest("gpucell-agent", &agent);
    let choice = opts.kernel.unwrap_or_default();
    let kernel = match (&opts.kernel_deb, choice) {
        (Some(p), _) => KernelSource::Local(deb::local(p)?),
        (None, KernelChoice::Microvm) => {
            let quiet = |_: &str| {};
            let progress: &dyn Fn(&str) = match &opts.progress {
                Some(p) => p,
                None => &quiet,
            };
            KernelSource::Local(kernel::microvm_deb(guest_dir, opts.force, progress)?)
        }
        (None, KernelChoice::Debian) => {
            let pkg = deb::resolve_kernel_package(flavour.kernel_package)?;
            KernelSource::Apt(deb::package_info(&pkg)?)
        }
    };
    Ok(Inputs {
        flavour,
        agent,
        agent_digest,
        kernel,
    })
}

/// True when `dir` holds a build of exactly these inputs whose files are intact.
fn cache_hit(dir: &Path, inputs: &Inputs) -> Option<Manifest> {
    let m = Manifest::read(&dir.join(MANIFEST_FILE)).ok()?;
    let same = m.schema == MANIFEST_SCHEMA
        && m.builder == builder_id()
        && m.flavour == inputs.flavour.name
        && m.deb.sha256 == inputs.kernel.sha256()
        && m.agent == inputs.agent_digest
        && m.requested_modules == requested_modules(inputs.flavour)
        && m.extra_packages == inputs.flavour.extra_packages
        && driver_key(inputs) == m.driver.as_ref().map(|d| d.key.clone());
    if !same {
        return None;
    }
    let disk = m.driver.as_ref().map(|d| &d.disk);
    for d in [&m.vmlinux, &m.initramfs].into_iter().chain(disk) {
        let path = dir.join(&d.file);
        if deb::sha256_file(&path).ok()? != d.sha256 {
            tracing::warn!(file = %path.display(), "cached guest artifact is damaged; rebuilding");
            return None;
        }
    }
    Some(m)
}

/// The expected key of the flavour's driver disk, `None` for a GPU-less flavour (or a
/// table that does not load: the build then reports why).
fn driver_key(inputs: &Inputs) -> Option<String> {
    let name = inputs.flavour.driver?;
    let table = crate::driver::Table::embedded().ok()?;
    let f = table.find(name).ok()?;
    Some(crate::driver::disk_key(&table, f, inputs.kernel.sha256()))
}

/// Builds (or finds cached) the artifacts of `opts.flavour` under `<state>/guest/`.
pub fn build(state_dir: &Path, opts: &BuildOptions) -> Result<crate::GuestArtifacts, BuildError> {
    let guest_dir = state_dir.join("guest");
    fs::create_dir_all(&guest_dir).map_err(io(format!("creating {}", guest_dir.display())))?;
    let inputs = resolve_inputs(&guest_dir, opts)?;
    let final_dir = guest_dir.join(inputs.flavour.name);

    // One build at a time per state dir.
    let lock_path = guest_dir.join(".lock");
    let _lock = gpucell_common::FileLock::exclusive(&lock_path)
        .map_err(|e| BuildError::Io(format!("locking {}", lock_path.display()), e.source))?;

    if !opts.force {
        if let Some(m) = cache_hit(&final_dir, &inputs) {
            tracing::info!(dir = %final_dir.display(), "guest artifacts are up to date");
            return Ok(crate::GuestArtifacts::from_manifest(&final_dir, m, true));
        }
    }

    let deb = match &inputs.kernel {
        KernelSource::Local(d) => d.clone(),
        KernelSource::Apt(info) => deb::fetch(info, &guest_dir.join("cache/debs"))?,
    };
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&guest_dir)
        .map_err(io(format!(
            "creating a temp dir in {}",
            guest_dir.display()
        )))?;
    let manifest = build_into(work.path(), &inputs, &deb, opts)?;

    let out = work.path().join("out");
    replace_dir(&out, &final_dir)?;
    tracing::info!(dir = %final_dir.display(), kernel = %manifest.kernel_release, "guest artifacts built");
    Ok(crate::GuestArtifacts::from_manifest(
        &final_dir, manifest, false,
    ))
}

fn build_into(
    work: &Path,
    inputs: &Inputs,
    deb: &DebFile,
    opts: &BuildOptions,
) -> Result<Manifest, BuildError> {
    let root = work.join("kernel");
    fs::create_dir(&root).map_err(io("creating the unpack dir"))?;
    deb::extract(&deb.path, &root)?;
    let release = kernel_release(&root)?;
    let mod_root = root.join("lib/modules").join(&release);

    // depmod lives in /usr/sbin, which a non-root PATH may lack.
    let depmod_bin = ["/usr/sbin/depmod", "/sbin/depmod"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("depmod");
    let depmod = Command::new(depmod_bin)
        .arg("-b")
        .arg(&root)
        .arg(&release)
        .output()
        .map_err(|e| BuildError::Depmod(e.to_string()))?;
    if !depmod.status.success() {
        return Err(BuildError::Depmod(
            String::from_utf8_lossy(&depmod.stderr).trim().to_owned(),
        ));
    }
    let read_text = |name: &str| {
        let p = mod_root.join(name);
        fs::read_to_string(&p).map_err(io(format!("reading {}", p.display())))
    };
    let deps = modules::DepTable::parse(&read_text("modules.dep")?)?;
    let builtin = modules::parse_builtin(&read_text("modules.builtin").unwrap_or_default());
    let resolved = modules::resolve_tagged(inputs.flavour.modules, &deps, &builtin, &release)?;

    let bz_path = root.join("boot").join(format!("vmlinuz-{release}"));
    let bz = fs::read(&bz_path).map_err(io(format!("reading {}", bz_path.display())))?;
    let vmlinux = vmlinux::extract(&bz).map_err(|e| BuildError::Vmlinux(bz_path.clone(), e))?;
    drop(bz);

    let initramfs = init_image(&inputs.agent, &mod_root, &resolved.load_order)?;

    let out = work.join("out");
    fs::create_dir(&out).map_err(io("creating the output dir"))?;
    let driver = match inputs.flavour.driver {
        Some(name) => Some(build_driver(work, &out, name, &release, deb, &root, opts)?),
        None => None,
    };
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        builder: builder_id(),
        flavour: inputs.flavour.name.to_owned(),
        kernel_release: release,
        kernel_package: deb.package.clone(),
        kernel_package_version: deb.version.clone(),
        deb: FileDigest {
            file: deb
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: deb.sha256.clone(),
            size: fs::metadata(&deb.path).map(|m| m.len()).unwrap_or(0),
        },
        vmlinux: digest(VMLINUX_FILE, &vmlinux),
        initramfs: digest(INITRAMFS_FILE, &initramfs),
        agent: inputs.agent_digest.clone(),
        requested_modules: requested_modules(inputs.flavour),
        modules: resolved.load_order.iter().map(|m| m.name.clone()).collect(),
        module_conditions: resolved
            .load_order
            .iter()
            .map(|m| (m.name.clone(), m.tag.clone()))
            .collect(),
        builtin_modules: resolved.builtin,
        extra_packages: inputs
            .flavour
            .extra_packages
            .iter()
            .map(|s| s.to_string())
            .collect(),
        driver,
    };
    write_synced(&out.join(VMLINUX_FILE), &vmlinux)?;
    write_synced(&out.join(INITRAMFS_FILE), &initramfs)?;
    write_synced(&out.join(MANIFEST_FILE), manifest.to_json().as_bytes())?;
    Ok(manifest)
}

/// Builds the driver disk of `name` for the unpacked kernel at `root` into `out`.
fn build_driver(
    work: &Path,
    out: &Path,
    name: &str,
    release: &str,
    deb: &DebFile,
    root: &Path,
    opts: &BuildOptions,
) -> Result<crate::driver::DriverManifest, BuildError> {
    let guest_dir = work.parent().ok_or_else(|| {
        BuildError::Io(
            "the build dir has no parent".into(),
            std::io::ErrorKind::NotFound.into(),
        )
    })?;
    let kernel = crate::driver::KernelInfo {
        release: release.to_owned(),
        version: deb.version.clone(),
        root: root.to_owned(),
        deb_sha256: deb.sha256.clone(),
        // The microVM kernel's cache keeps its build tree next to the package.
        build_tree: kernel::cache_identity(&deb.path).and_then(|id| {
            let path = kernel::build_tree(deb.path.parent()?)?;
            Some(crate::driver::BuildTree { path, id })
        }),
    };
    let quiet = |_: &str| {};
    let progress: &dyn Fn(&str) = match &opts.progress {
        Some(p) => p,
        None => &quiet,
    };
    let b = crate::driver::DriverBuild {
        guest_dir,
        flavour: name,
        kernel: &kernel,
        force: opts.force,
        progress,
    };
    let scratch = work.join("driver");
    fs::create_dir(&scratch).map_err(io("creating the driver scratch dir"))?;
    crate::driver::build(&b, &scratch, out)
        .map_err(|e| BuildError::Driver(name.to_owned(), Box::new(e)))
}

/// The single `lib/modules/<release>` of an unpacked kernel package.
fn kernel_release(root: &Path) -> Result<String, BuildError> {
    let dir = root.join("lib/modules");
    let mut trees: Vec<String> = fs::read_dir(&dir)
        .map_err(io(format!("reading {}", dir.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if trees.len() != 1 {
        return Err(BuildError::KernelTrees(trees.len()));
    }
    Ok(trees.remove(0))
}

/// The flavour's module list as the manifest records it: `name (condition)`.
fn requested_modules(flavour: &crate::flavour::Flavour) -> Vec<String> {
    flavour
        .modules
        .iter()
        .map(|(w, n)| format!("{n} ({})", w.tag()))
        .collect()
}

/// The init image: the agent as `/init`, the console node the kernel opens for it, mount
/// points, and the modules with their load order.
pub fn init_image(
    agent: &[u8],
    mod_root: &Path,
    order: &[ModuleFile],
) -> Result<Vec<u8>, BuildError> {
    let mut a = Archive::new();
    a.file("init", 0o755, agent.to_vec())?;
    a.dir("dev", 0o755)?;
    a.char_dev("dev/console", 0o600, 5, 1)?;
    a.dir("proc", 0o555)?;
    a.dir("sys", 0o555)?;
    a.dir("run", 0o755)?;
    a.dir(MODULES_DIR, 0o755)?;
    let mut order_text = String::new();
    for m in order {
        let data = read_module(&mod_root.join(&m.path))?;
        let file = format!("{}.ko", m.name);
        a.file(&format!("{MODULES_DIR}/{file}"), 0o644, data)?;
        order_text.push_str(&format!("{file} {}\n", m.tag));
    }
    a.file(MODULES_ORDER, 0o644, order_text.into_bytes())?;
    Ok(a.to_vec()?)
}

fn read_module(path: &Path) -> Result<Vec<u8>, BuildError> {
    let shown = path.display().to_string();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let f = fs::File::open(path).map_err(io(format!("reading {shown}")))?;
    let mut data = Vec::new();
    if name.ends_with(".ko.xz") {
        liblzma::read::XzDecoder::new(f)
            .take(MAX_MODULE + 1)
            .read_to_end(&mut data)
            .map_err(io(format!("decompressing {shown}")))?;
    } else if name.ends_with(".ko.zst") {
        return Err(BuildError::CompressedModule(shown, "zstd"));
    } else if name.ends_with(".ko.gz") {
        return Err(BuildError::CompressedModule(shown, "gzip"));
    } else {
        f.take(MAX_MODULE + 1)
            .read_to_end(&mut data)
            .map_err(io(format!("reading {shown}")))?;
    }
    if data.len() as u64 > MAX_MODULE {
        return Err(BuildError::ModuleTooLarge(shown));
    }
    Ok(data)
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), BuildError> {
    gpucell_common::write_atomic(path, data, 0o644)
        .map_err(io(format!("writing {}", path.display())))
}

/// Puts `new` at `dest`, replacing an older build: the old dir is moved aside first and
/// removed after, so `dest` is always either the old or the new complete build.
fn replace_dir(new: &Path, dest: &Path) -> Result<(), BuildError> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    if dest.exists() {
        let aside = tempfile::Builder::new()
            .prefix(".old-")
            .tempdir_in(parent)
            .map_err(io(format!("creating a temp dir in {}", parent.display())))?;
        let old = aside.path().join("old");
        fs::rename(dest, &old).map_err(io(format!("moving {} aside", dest.display())))?;
        if let Err(e) = fs::rename(new, dest) {
            let _ = fs::rename(&old, dest);
            return Err(BuildError::Io(
                format!("moving the new build to {}", dest.display()),
                e,
            ));
        }
        // `aside` drops here, removing the old build.
    } else {
        fs::rename(new, dest).map_err(io(format!("moving the new build to {}", dest.display())))?;
    }
    gpucell_common::atomic::sync_dir(parent).map_err(io(format!("syncing {}", parent.display())))
}
