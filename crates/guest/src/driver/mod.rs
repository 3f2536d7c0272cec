//! NVIDIA driver flavours: the driver's kernel modules built for the guest kernel, its
//! GSP firmware and userspace, on a read-only driver disk next to the guest kernel.
//!
//! A build: gpucell's own apt lists ([`apt`]) → the table's packages (checked against
//! the table's SHA-256) and the guest kernel's build tree: the microVM kernel's own,
//! kept in the kernel cache, or a Debian kernel's exact header packages (checked against
//! the archive's) → the modules, compiled or taken from the module cache keyed by
//! (driver version, kernel identity, module kind, patch set) ([`compile`]) → the userspace,
//! flattened, and the CUDA version measured on the flavour's own libcuda ([`cuda`]) →
//! the erofs driver disk and a manifest of every file on it ([`disk`]).

pub mod apt;
pub mod compile;
pub mod cuda;
pub mod disk;
pub mod selftest;
pub mod table;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::deb::{self, DebError, DebFile, PackageInfo};
use crate::manifest::FileDigest;
pub use disk::{DiskEntry, DriverInfo, DISK_FILE, DISK_SERIAL, INFO_FILE};
pub use table::{DriverFlavour, ModuleKind, Package, Patch, Role, Table, TableError};

/// Version of the module build recipe; part of the module cache key. 2: built without
/// debug information (`KCFLAGS=-g0`).
const MODULES_RECIPE: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Apt(#[from] apt::AptError),
    #[error(transparent)]
    Deb(#[from] DebError),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("could not run {0}; install it (scripts/install-deps.sh installs the build tools)")]
    Tool(String, #[source] std::io::Error),
    #[error("kernel headers: {0}")]
    Headers(String),
    #[error("patch `{name}` expects its text once in {file} but found it {found} times; the source changed, update the patch in data/nvidia-flavours.toml")]
    Patch {
        name: String,
        file: String,
        found: usize,
    },
    #[error("compiling the NVIDIA modules failed (full log: {log}):\n{tail}")]
    Compile { log: PathBuf, tail: String },
    #[error("module {module} has vermagic `{got}` but the guest kernel's is `{want}`; it would not load (Invalid module format)")]
    Vermagic {
        module: String,
        got: String,
        want: String,
    },
    #[error("CUDA version probe: {0}")]
    Cuda(String),
    #[error("flavour {flavour}: libcuda reports CUDA {measured} but the table says {table}; fix max_cuda in data/nvidia-flavours.toml")]
    CudaMismatch {
        flavour: String,
        measured: String,
        table: String,
    },
    #[error("missing {0}")]
    Missing(String),
}

impl DriverError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        DriverError::Io(path.to_owned(), e)
    }
}

/// The guest kernel a driver is built for.
#[derive(Debug, Clone)]
pub struct KernelInfo {
    /// `uname -r`, e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// Debian version of the kernel package, e.g. `6.1.192-3`: the headers' version.
    pub version: String,
    /// The unpacked kernel package (for `drm.ko`).
    pub root: PathBuf,
    /// SHA-256 of the kernel `.deb`.
    pub deb_sha256: String,
    /// The kernel's prepared build tree (the microVM kernel's, from the kernel cache);
    /// `None`: a Debian kernel, whose header packages are downloaded.
    pub build_tree: Option<BuildTree>,
}

/// A prepared kernel build tree ([`crate::kernel::prepare_build_tree`]) and the
/// identity of the kernel it belongs to (source version and config digest).
#[derive(Debug, Clone)]
pub struct BuildTree {
    pub path: PathBuf,
    pub id: String,
}

/// Sizes of the parts of a driver flavour, in bytes (uncompressed, except `disk`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartSizes {
    pub modules: u64,
    pub firmware: u64,
    pub userspace: u64,
    /// The erofs image (lz4hc).
    pub disk: u64,
}

/// What the flavour manifest records about the driver (`manifest.json` → `driver`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverManifest {
    pub flavour: String,
    pub version: String,
    pub debian_version: String,
    pub suite: String,
    pub module_kind: ModuleKind,
    /// Key of all inputs of the driver disk (table row, runtime, kernel `.deb`).
    pub key: String,
    /// Key of the module build: (driver version, kernel ABI, module kind, patch set).
    pub modules_key: String,
    /// `cuDriverGetVersion` of the flavour's libcuda, `major.minor`.
    pub cuda: String,
    pub vermagic: String,
    /// Patches the kernel needed and got.
    pub patches_applied: Vec<String>,
    /// Modules on the disk, in load order.
    pub modules: Vec<String>,
    /// Every input `.deb`.
    pub inputs: Vec<FileDigest>,
    pub disk: FileDigest,
    pub sizes: PartSizes,
    /// Every file and link on the disk.
    pub files: Vec<DiskEntry>,
}

/// Options of one driver build.
pub struct DriverBuild<'a> {
    pub guest_dir: &'a Path,
    pub flavour: &'a str,
    pub kernel: &'a KernelInfo,
    /// Rebuild the modules even when cached.
    pub force: bool,
    pub progress: &'a dyn Fn(&str),
}

/// Key of every input of a flavour's driver disk; computable without downloading.
pub fn disk_key(table: &Table, f: &DriverFlavour, kernel_deb_sha256: &str) -> String {
    let v = serde_json::json!({
        "builder": crate::builder_id(),
        "flavour": f,
        "patches": compile::flavour_patches(table, f),
        "runtime": table.runtime,
        "kernel": kernel_deb_sha256,
    });
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

/// Key of a module build: (driver version and source, kernel ABI, module kind, patches),
/// and for a kernel with its own build tree, that kernel's identity (`tree`).
pub fn modules_key(
    table: &Table,
    f: &DriverFlavour,
    release: &str,
    kernel_version: &str,
    tree: Option<&str>,
) -> String {
    let mut v = serde_json::json!({
        "recipe": MODULES_RECIPE,
        "driver": f.debian_version,
        "source": f.module_source().map(|p| &p.sha256),
        "kind": f.module_kind,
        "kernel": [release, kernel_version],
        "patches": compile::flavour_patches(table, f),
    });
    if let Some(id) = tree {
        v["kernel_tree"] = id.into();
    }
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

fn table_package(p: &Package) -> PackageInfo {
    PackageInfo {
        package: p.name.clone(),
        version: p.version.clone(),
        file_name: p.file.clone(),
        sha256: p.sha256.clone(),
        size: p.size,
    }
}

fn input_digest(d: &DebFile) -> FileDigest {
    FileDigest {
        file: d
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sha256: d.sha256.clone(),
        size: fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0),
    }
}

/// Downloads the table's packages (checked against the table) and the kernel's header
/// packages (checked against the archive).
struct Fetched {
    source: DebFile,
    userspace: Vec<DebFile>,
    runtime: Vec<DebFile>,
    headers: Vec<DebFile>,
}

fn fetch_all(b: &DriverBuild, table: &Table, f: &DriverFlavour) -> Result<Fetched, DriverError> {
    let apt = apt::Apt::new(b.guest_dir);
    let suites: Vec<&str> = table.flavours.iter().map(|f| f.suite.as_str()).collect();
    apt.prepare(&apt::suites_for(&suites), false, b.progress)?;
    let cache = b.guest_dir.join("cache/debs");
    let mut header_infos = Vec::new();
    if b.kernel.build_tree.is_none() {
        let rel = &b.kernel.release;
        let abi = compile::kernel_abi(rel)?;
        let header_names = [
            format!("linux-headers-{rel}"),
            format!("linux-headers-{abi}-common"),
            compile::kbuild_package(rel),
        ];
        for name in &header_names {
            header_infos.push(apt.show(name, &b.kernel.version)?);
        }
    }
    let wanted: Vec<PackageInfo> = f
        .packages
        .iter()
        .chain(&table.runtime)
        .map(table_package)
        .chain(header_infos.iter().cloned())
        .collect();
    let total: u64 = wanted.iter().map(|p| p.size).sum();
    (b.progress)(&format!(
        "packages: {} ({} in all; cached ones are reused)",
        wanted.len(),
        apt::human_size(total)
    ));
    let mut got = Vec::new();
    for p in &wanted {
        got.push(apt.download(p, &cache, b.progress)?);
    }
    let n_flavour = f.packages.len();
    let n_runtime = table.runtime.len();
    let headers = got.split_off(n_flavour + n_runtime);
    let runtime = got.split_off(n_flavour);
    let src_name = f
        .module_source()
        .map(|p| p.name.clone())
        .unwrap_or_default();
    let idx = got
        .iter()
        .position(|d| d.package == src_name)
        .ok_or_else(|| DriverError::Missing(format!("package {src_name}")))?;
    let source = got.remove(idx);
    Ok(Fetched {
        source,
        userspace: got,
        runtime,
        headers,
    })
}

/// The built modules of one key, in the module cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ModulesInfo {
    key: String,
    vermagic: String,
    patches_applied: Vec<String>,
    compile_seconds: f64,
}

const MODULES_INFO: &str = "modules.json";

/// Returns the cache dir holding `nvidia.ko` and `nvidia-uvm.ko` for this key,
/// compiling them first unless cached.
fn modules(
    b: &DriverBuild,
    table: &Table,
    f: &DriverFlavour,
    fetched: &Fetched,
    want_vermagic: &str,
) -> Result<(PathBuf, ModulesInfo), DriverError> {
    let key = kernel_modules_key(table, f, b.kernel);
    let base = b.guest_dir.join("cache/nvidia-modules");
    let dir = base.join(format!("{}-{}", f.name, &key[..16]));
    let cached = fs::read_to_string(dir.join(MODULES_INFO))
        .ok()
        .and_then(|t| serde_json::from_str::<ModulesInfo>(&t).ok())
        .filter(|i| i.key == key)
        .filter(|_| {
            compile::BUILT_MODULES
                .iter()
                .all(|m| dir.join(format!("{m}.ko")).is_file())
        });
    if let (Some(info), false) = (cached, b.force) {
        (b.progress)(&format!("modules: cached ({})", dir.display()));
        return Ok((dir, info));
    }
    fs::create_dir_all(&base).map_err(|e| DriverError::io(&base, e))?;
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&base)
        .map_err(|e| DriverError::io(&base, e))?;
    let w = work.path();
    let headers = match &b.kernel.build_tree {
        Some(tree) => compile::Headers {
            sys_src: tree.path.clone(),
            sys_out: tree.path.clone(),
        },
        None => {
            let hdr_root = w.join("headers");
            for d in &fetched.headers {
                deb::extract(&d.path, &hdr_root)?;
            }
            let headers = compile::Headers::locate(&hdr_root, &b.kernel.release)?;
            headers.fix_makefile(&hdr_root)?;
            headers
        }
    };
    let src_root = w.join("source-deb");
    deb::extract(&fetched.source.path, &src_root)?;
    let tarball = src_root.join(f.module_kind.tarball());
    let src = w.join("src");
    fs::create_dir_all(&src).map_err(|e| DriverError::io(&src, e))?;
    run_tool(
        std::process::Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&src),
        "tar",
    )?;
    let tree = src.join(f.module_kind.source_dir());
    let applied = compile::apply_patches(&tree, &headers, &compile::flavour_patches(table, f))?;
    (b.progress)(&format!(
        "compile: nvidia {} ({}) for {}; patches: {}",
        f.version,
        f.module_kind.as_str(),
        b.kernel.release,
        if applied.is_empty() {
            "none".to_owned()
        } else {
            applied.join(", ")
        }
    ));
    let log = b.guest_dir.join(format!("{}-modules.log", f.name));
    let took = compile::make(&tree, &headers, &log, b.progress)?;
    let out = w.join("out");
    fs::create_dir(&out).map_err(|e| DriverError::io(&out, e))?;
    let mut vermagic = String::new();
    for m in compile::BUILT_MODULES {
        let to = out.join(format!("{m}.ko"));
        compile::strip(&tree.join(format!("{m}.ko")), &to)?;
        let data = fs::read(&to).map_err(|e| DriverError::io(&to, e))?;
        let got = compile::vermagic(&data).unwrap_or_default();
        if got != want_vermagic {
            return Err(DriverError::Vermagic {
                module: format!("{m}.ko"),
                got,
                want: want_vermagic.to_owned(),
            });
        }
        vermagic = got;
    }
    let info = ModulesInfo {
        key,
        vermagic,
        patches_applied: applied,
        compile_seconds: took.as_secs_f64(),
    };
    let text = serde_json::to_string_pretty(&info).unwrap_or_default();
    fs::write(out.join(MODULES_INFO), text).map_err(|e| DriverError::io(&out, e))?;
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| DriverError::io(&dir, e))?;
    }
    fs::rename(&out, &dir).map_err(|e| DriverError::io(&dir, e))?;
    (b.progress)(&format!(
        "compile: done in {:.0} s, vermagic `{}`",
        took.as_secs_f64(),
        info.vermagic
    ));
    Ok((dir, info))
}

/// [`modules_key`] of a guest kernel.
fn kernel_modules_key(table: &Table, f: &DriverFlavour, k: &KernelInfo) -> String {
    let tree = k.build_tree.as_ref().map(|t| t.id.as_str());
    modules_key(table, f, &k.release, &k.version, tree)
}

fn run_tool(cmd: &mut std::process::Command, name: &str) -> Result<(), DriverError> {
    let out = cmd
        .output()
        .map_err(|e| DriverError::Tool(name.into(), e))?;
    if !out.status.success() {
        return Err(DriverError::Missing(format!(
            "{name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Builds the driver disk of `b.flavour` for `b.kernel` into `out_dir/driver.erofs`,
/// using `work` for scratch. Returns its manifest.
pub fn build(b: &DriverBuild, work: &Path, out_dir: &Path) -> Result<DriverManifest, DriverError> {
    let start = Instant::now();
    let table = Table::embedded()?;
    let f = table.find(b.flavour)?.clone();
    let fetched = fetch_all(b, &table, &f)?;
    let (deps, want_vermagic) = guest_deps(b)?;
    let (built, info) = modules(b, &table, &f, &fetched, &want_vermagic)?;

    let tree = work.join("driver-tree");
    let load_order = install_modules(b, &built, &deps, &tree)?;
    install_userspace(&fetched, &f, work, &tree)?;
    let cuda = install_cuda_helper(b, &f, work, &tree)?;
    let dinfo = DriverInfo {
        flavour: f.name.clone(),
        version: f.version.clone(),
        module_kind: f.module_kind.as_str().to_owned(),
        kernel_release: b.kernel.release.clone(),
        modules: load_order.clone(),
        firmware_dir: "lib/firmware".into(),
        cuda: cuda.clone(),
        lib_dir: "usr/lib".into(),
        bin_dir: "usr/bin".into(),
        loader: "usr/lib/ld-linux-x86-64.so.2".into(),
    };
    let info_text = serde_json::to_string_pretty(&dinfo).unwrap_or_default();
    fs::write(tree.join(INFO_FILE), info_text).map_err(|e| DriverError::io(&tree, e))?;
    let files = disk::list_entries(&tree)?;
    let image = out_dir.join(DISK_FILE);
    (b.progress)("driver disk: mkfs.erofs (lz4hc)");
    disk::make_erofs(&tree, &image)?;
    let disk_sha = deb::sha256_file(&image)?;
    let disk_size = fs::metadata(&image)
        .map_err(|e| DriverError::io(&image, e))?
        .len();
    let sizes = PartSizes {
        modules: disk::bytes_under(&files, "lib/modules/"),
        firmware: disk::bytes_under(&files, "lib/firmware/"),
        userspace: disk::bytes_under(&files, "usr/"),
        disk: disk_size,
    };
    (b.progress)(&format!(
        "driver disk built in {:.1} s",
        start.elapsed().as_secs_f64()
    ));
    Ok(DriverManifest {
        flavour: f.name.clone(),
        version: f.version.clone(),
        debian_version: f.debian_version.clone(),
        suite: f.suite.clone(),
        module_kind: f.module_kind,
        key: disk_key(&table, &f, &b.kernel.deb_sha256),
        modules_key: info.key,
        cuda,
        vermagic: info.vermagic,
        patches_applied: info.patches_applied,
        modules: load_order,
        inputs: input_digests(&fetched),
        disk: FileDigest {
            file: DISK_FILE.into(),
            sha256: disk_sha,
            size: disk_size,
        },
        sizes,
        files,
    })
}

/// A module of the guest kernel that the driver's modules need: file name and contents.
type KernelModule = (String, Vec<u8>);

/// The guest kernel's modules the driver needs, in load order: `drm.ko` (the driver's
/// one in-tree dependency) after what it depends on (its `depends=`, as modules.dep
/// would list it), or none where DRM is built in; and the kernel's vermagic, which the
/// built modules must match.
fn guest_deps(b: &DriverBuild) -> Result<(Vec<KernelModule>, String), DriverError> {
    let mod_dir = b.kernel.root.join("lib/modules").join(&b.kernel.release);
    let mut order = Vec::new();
    if disk::find_file(&mod_dir, "drm.ko").is_some() {
        add_with_deps(&mod_dir, "drm", &mut order, 0)?;
    } else {
        let builtin = fs::read_to_string(mod_dir.join("modules.builtin")).unwrap_or_default();
        if !builtin.lines().any(|l| l.ends_with("/drm.ko")) {
            return Err(DriverError::Missing(format!(
                "drm.ko in {} (neither a module nor built in)",
                mod_dir.display()
            )));
        }
    }
    let probe = match order.last() {
        Some((name, data)) => Some((mod_dir.join(name), data.clone())),
        None => {
            disk::find_file_ext(&mod_dir, ".ko").and_then(|p| fs::read(&p).ok().map(|d| (p, d)))
        }
    };
    let (path, data) = probe.ok_or_else(|| {
        DriverError::Missing(format!(
            "a module in {} (for its vermagic)",
            mod_dir.display()
        ))
    })?;
    let want_vermagic = compile::vermagic(&data)
        .ok_or_else(|| DriverError::Missing(format!("vermagic of {}", path.display())))?;
    Ok((order, want_vermagic))
}

/// Appends module `name` to `order` after its dependencies (depth-first, each once).
fn add_with_deps(
    mod_dir: &Path,
    name: &str,
    order: &mut Vec<KernelModule>,
    depth: usize,
) -> Result<(), DriverError> {
    let file = format!("{name}.ko");
    if order.iter().any(|(n, _)| *n == file) {
        return Ok(());
    }
    if depth > 16 {
        return Err(DriverError::Missing(format!(
            "{file}: dependency chain too deep"
        )));
    }
    let path = disk::find_file(mod_dir, &file)
        .or_else(|| disk::find_file(mod_dir, &file.replace('_', "-")))
        .ok_or_else(|| DriverError::Missing(format!("{file} in {}", mod_dir.display())))?;
    let data = fs::read(&path).map_err(|e| DriverError::io(&path, e))?;
    for dep in compile::depends(&data) {
        add_with_deps(mod_dir, &dep, order, depth + 1)?;
    }
    order.push((file, data));
    Ok(())
}

/// Puts the kernel's modules and the built ones under `tree/lib/modules/<release>`;
/// returns their paths in load order.
fn install_modules(
    b: &DriverBuild,
    built: &Path,
    deps: &[KernelModule],
    tree: &Path,
) -> Result<Vec<String>, DriverError> {
    let kmods = tree.join("lib/modules").join(&b.kernel.release);
    fs::create_dir_all(&kmods).map_err(|e| DriverError::io(&kmods, e))?;
    let mut load_order = Vec::new();
    for (name, data) in deps {
        fs::write(kmods.join(name), data).map_err(|e| DriverError::io(&kmods, e))?;
        load_order.push(format!("lib/modules/{}/{name}", b.kernel.release));
    }
    for m in compile::BUILT_MODULES {
        fs::copy(built.join(format!("{m}.ko")), kmods.join(format!("{m}.ko")))
            .map_err(|e| DriverError::io(built, e))?;
        load_order.push(format!("lib/modules/{}/{m}.ko", b.kernel.release));
    }
    Ok(load_order)
}

/// Unpacks the userspace and runtime packages under `work/userspace` and copies the
/// firmware, the libraries (flattened into `usr/lib`) and the tools into `tree`.
fn install_userspace(
    fetched: &Fetched,
    f: &DriverFlavour,
    work: &Path,
    tree: &Path,
) -> Result<(), DriverError> {
    let us = work.join("userspace");
    for d in fetched.userspace.iter().chain(&fetched.runtime) {
        deb::extract(&d.path, &us)?;
    }
    disk::copy_firmware(&us, &f.version, tree)?;
    disk::flatten_libs(
        &us,
        &[
            "usr/lib/x86_64-linux-gnu/nvidia/current",
            "usr/lib/x86_64-linux-gnu",
            "lib/x86_64-linux-gnu",
        ],
        &tree.join("usr/lib"),
    )?;
    for tool in ["nvidia-smi", "nvidia-persistenced"] {
        disk::copy_tool(&us, tool, tree)?;
    }
    Ok(())
}

/// Compiles the CUDA helper, measures the CUDA version of the tree's `libcuda` against
/// the table and puts the helper into `tree/usr/bin`. Returns the version as text.
fn install_cuda_helper(
    b: &DriverBuild,
    f: &DriverFlavour,
    work: &Path,
    tree: &Path,
) -> Result<String, DriverError> {
    let helper = cuda::compile_helper(work)?;
    let measured = cuda::driver_version(&helper, &tree.join("usr/lib/libcuda.so.1"))?;
    let cuda = table::format_cuda(measured);
    if Some(measured) != f.max_cuda_int() {
        return Err(DriverError::CudaMismatch {
            flavour: f.name.clone(),
            measured: cuda,
            table: f.max_cuda.clone(),
        });
    }
    (b.progress)(&format!(
        "libcuda {}: cuDriverGetVersion = {measured} (CUDA {cuda})",
        f.version
    ));
    fs::copy(&helper, tree.join("usr/bin").join(cuda::HELPER_NAME))
        .map_err(|e| DriverError::io(&helper, e))?;
    Ok(cuda)
}

/// The digests of every downloaded package, sorted by file name.
fn input_digests(fetched: &Fetched) -> Vec<FileDigest> {
    let mut inputs: Vec<FileDigest> = std::iter::once(&fetched.source)
        .chain(&fetched.userspace)
        .chain(&fetched.runtime)
        .chain(&fetched.headers)
        .map(input_digest)
        .collect();
    inputs.sort_by(|a, b| a.file.cmp(&b.file));
    inputs
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn module_key_follows_driver_kernel_kind_and_patches_only() {
        let t = Table::embedded().unwrap();
        let f = t.find("nvidia-550").unwrap().clone();
        let k = modules_key(&t, &f, "6.1.0-57-amd64", "6.1.192-3", None);
        assert_eq!(k, modules_key(&t, &f, "6.1.0-57-amd64", "6.1.192-3", None));
        assert_ne!(
            k,
            modules_key(&t, &f, "6.1.0-58-amd64", "6.1.200-1", None),
            "kernel ABI"
        );
        assert_ne!(
            k,
            modules_key(&t, &f, "6.1.0-57-amd64", "6.1.192-4", None),
            "kernel build"
        );
        let mut g = f.clone();
        g.module_kind = ModuleKind::Proprietary;
        assert_ne!(
            k,
            modules_key(&t, &g, "6.1.0-57-amd64", "6.1.192-3", None),
            "kind"
        );
        let mut g = f.clone();
        g.debian_version = "550.163.01-3".into();
        assert_ne!(
            k,
            modules_key(&t, &g, "6.1.0-57-amd64", "6.1.192-3", None),
            "version"
        );
        let mut t2 = t.clone();
        t2.patches[0].replace.push(' ');
        assert_ne!(
            k,
            modules_key(&t2, &f, "6.1.0-57-amd64", "6.1.192-3", None),
            "patch"
        );
        // A kernel with its own build tree: its identity (config digest) is in the key.
        let tree = |id| modules_key(&t, &f, "6.1.192-gpucell", "6.1.192-3", Some(id));
        assert_eq!(tree("6.1.192-3-aaaa"), tree("6.1.192-3-aaaa"));
        assert_ne!(
            tree("6.1.192-3-aaaa"),
            tree("6.1.192-3-bbbb"),
            "kernel config"
        );
        assert_ne!(
            tree("6.1.192-3-aaaa"),
            modules_key(&t, &f, "6.1.192-gpucell", "6.1.192-3", None)
        );
        // The userspace does not touch the module key, only the disk key.
        let mut g = f.clone();
        g.max_cuda = "12.5".into();
        assert_eq!(k, modules_key(&t, &g, "6.1.0-57-amd64", "6.1.192-3", None));
        assert_ne!(disk_key(&t, &f, "aa"), disk_key(&t, &g, "aa"));
        assert_ne!(
            disk_key(&t, &f, "aa"),
            disk_key(&t, &f, "bb"),
            "kernel .deb"
        );
    }
}
