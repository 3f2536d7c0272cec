//! The guest kernel a build uses: Debian's packaged kernel, or the microVM kernel that
//! gpucell compiles from Debian's `linux-source-6.1` with the checked-in Kconfig fragment
//! `data/microvm-kernel.config` (applied over `make allnoconfig`).
//!
//! The microVM kernel is packaged as an ordinary kernel `.deb` (`boot/vmlinuz-REL`,
//! `lib/modules/REL`), so the rest of the guest build treats it like Debian's. It is
//! built once and cached under `<state>/guest/cache/kernels/<source version>-<config
//! digest>/`; a cached build costs a `dpkg-deb -f` and one SHA-256.
//!
//! Next to the package, the cache keeps the kernel's prepared build tree (`build/`):
//! what an external module build needs of the source and object trees (Makefiles,
//! `scripts/`, `include/`, the arch headers, `.config`, `Module.symvers`, objtool),
//! merged into one tree as Debian's `linux-headers` packages lay it out. The NVIDIA
//! driver flavours compile their modules against it.
//!
//! Every process (dpkg-deb, tar, make) is started through [`Tools`], so tests run the
//! pipeline with fake tools.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::deb::{self, DebError, DebFile};

/// The Kconfig fragment of the microVM kernel.
pub const CONFIG_FRAGMENT: &str = include_str!("../../../data/microvm-kernel.config");
/// Debian's kernel source package the microVM kernel is built from: the same upstream
/// version as the `linux-image-amd64` the Debian guests use.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// In the work dir: the kernel's object dir (`make O=`) and the finished package's dir.
const OBJ_DIR: &str = "out";
const PKG_OUT: &str = "deb-out";
/// In a cache dir: the prepared build tree for external modules.
pub const BUILD_TREE: &str = "build";
/// Lines of the build log an error shows.
const LOG_TAIL: usize = 30;

/// Which kernel a guest boots. The default (`#[default]`) is what `gpucell guest build`
/// uses without `--kernel`, for every flavour (driver flavours compile their modules
/// against its build tree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelChoice {
    /// Debian's packaged kernel of the flavour (`linux-image-amd64`).
    Debian,
    /// The microVM kernel built from `linux-source-6.1` with gpucell's config.
    #[default]
    Microvm,
}

impl KernelChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            KernelChoice::Debian => "debian",
            KernelChoice::Microvm => "microvm",
        }
    }
}

impl fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KernelChoice {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, KernelError> {
        match s {
            "debian" => Ok(KernelChoice::Debian),
            "microvm" => Ok(KernelChoice::Microvm),
            other => Err(KernelError::UnknownChoice(other.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("unknown guest kernel `{0}`; use `debian` or `microvm`")]
    UnknownChoice(String),
    #[error("kernel source package")]
    Deb(#[from] DebError),
    #[error("could not run `{0}`; install it (apt-get install -y make gcc flex bison bc libelf-dev xz-utils)")]
    Spawn(String, #[source] std::io::Error),
    #[error("`{step}` failed building the microVM kernel (the next build resumes from its work dir); last lines of {log}:\n{tail}")]
    Failed {
        step: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{0} holds no usr/src/linux-source-*.tar.xz; is it Debian's linux-source package?")]
    NoTarball(PathBuf),
    #[error("the kernel config lacks options of data/microvm-kernel.config (their dependencies are not met): {0}; fix the fragment")]
    MissingOptions(String),
    #[error("the kernel build left no {0}")]
    NoOutput(PathBuf),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KernelError {
    let what = what.into();
    move |e| KernelError::Io(what, e)
}

/// The programs the build runs; tests swap them for fakes.
#[derive(Debug, Clone)]
pub struct Tools {
    pub make: PathBuf,
    pub tar: PathBuf,
    pub dpkg_deb: PathBuf,
    /// `make -j`: `$GPUCELL_KERNEL_JOBS`, else the number of CPUs.
    pub jobs: usize,
}

impl Default for Tools {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let jobs = std::env::var("GPUCELL_KERNEL_JOBS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(cpus);
        Self {
            make: "make".into(),
            tar: "tar".into(),
            dpkg_deb: "dpkg-deb".into(),
            jobs,
        }
    }
}

/// SHA-256 of the config fragment, hex.
pub fn config_digest() -> String {
    hex::encode(Sha256::digest(CONFIG_FRAGMENT.as_bytes()))
}

/// The cache dir name of a microVM kernel: source version and config digest.
pub fn cache_key(source_version: &str) -> String {
    let safe: String = source_version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-+~".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}-{}", &config_digest()[..16])
}

/// The microVM kernel `.deb`, built from `linux-source-6.1` (fetched with apt) unless
/// `<guest_dir>/cache/kernels/` already holds the build for this source version and
/// config. `force` rebuilds.
pub fn microvm_deb(
    guest_dir: &Path,
    force: bool,
    progress: &dyn Fn(&str),
) -> Result<DebFile, KernelError> {
    let info = deb::package_info(SOURCE_PACKAGE)?;
    let cache = guest_dir.join("cache");
    let source = || -> Result<PathBuf, KernelError> {
        progress(&format!("downloading {} {}", info.package, info.version));
        Ok(deb::fetch(&info, &cache.join("debs"))?.path)
    };
    build_cached(
        &cache.join("kernels"),
        &info.version,
        source,
        &Tools::default(),
        force,
        progress,
    )
}

/// [`microvm_deb`] with the source package, its version and the tools given.
pub fn build_cached(
    kernels: &Path,
    source_version: &str,
    source: impl FnOnce() -> Result<PathBuf, KernelError>,
    tools: &Tools,
    force: bool,
    progress: &dyn Fn(&str),
) -> Result<DebFile, KernelError> {
    fs::create_dir_all(kernels).map_err(io(format!("creating {}", kernels.display())))?;
    let lock_path = kernels.join(".lock");
    let _lock = gpucell_common::FileLock::exclusive(&lock_path)
        .map_err(|e| KernelError::Io(format!("locking {}", lock_path.display()), e.source))?;
    let dest = kernels.join(cache_key(source_version));
    if !force {
        if let Some(d) = cached(&dest, tools) {
            return Ok(d);
        }
    }
    // A fixed work dir per key: an interrupted or failed build resumes from it (make is
    // incremental). Canonical, so that make's recorded command lines stay the same.
    let work_link = kernels.join(format!(".build-{}", cache_key(source_version)));
    fs::create_dir_all(&work_link).map_err(io(format!("creating {}", work_link.display())))?;
    let work =
        fs::canonicalize(&work_link).map_err(io(format!("resolving {}", work_link.display())))?;
    let started = std::time::Instant::now();
    let deb_name = build(&work, source, source_version, tools, progress)?;
    progress(&format!(
        "microVM kernel built in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    let staged = kernels.join(format!(".done-{}", cache_key(source_version)));
    let _ = fs::remove_dir_all(&staged);
    fs::rename(work.join(PKG_OUT), &staged)
        .map_err(io(format!("moving the package to {}", staged.display())))?;
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(io(format!("removing {}", dest.display())))?;
    }
    fs::rename(&staged, &dest).map_err(io(format!("moving the build to {}", dest.display())))?;
    // The source and objects (~1.5 GB) go (the pruned build tree stays in `dest`); a
    // symlinked work dir loses only its link.
    if fs::symlink_metadata(&work_link).is_ok_and(|m| m.file_type().is_symlink()) {
        fs::remove_file(&work_link).map_err(io(format!("removing {}", work_link.display())))?;
    } else {
        fs::remove_dir_all(&work_link).map_err(io(format!("removing {}", work_link.display())))?;
    }
    local(&dest.join(deb_name), tools)
}

/// The one `.deb` of a finished cache dir with its build tree, if it reads back.
fn cached(dir: &Path, tools: &Tools) -> Option<DebFile> {
    build_tree(dir)?;
    let mut debs = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"));
    let (Some(one), None) = (debs.next(), debs.next()) else {
        return None;
    };
    local(&one, tools).ok()
}

/// Names a built package by its control file (read with the tools' `dpkg-deb -f`).
fn local(path: &Path, tools: &Tools) -> Result<DebFile, KernelError> {
    let out = Command::new(&tools.dpkg_deb)
        .arg("-f")
        .arg(path)
        .args(["Package", "Version"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KernelError::Spawn("dpkg-deb -f".into(), e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |f: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(f).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_owned())
    };
    match (out.status.success(), field("Package"), field("Version")) {
        (true, Some(package), Some(version)) => Ok(DebFile {
            path: path.to_owned(),
            package,
            version,
            sha256: deb::sha256_file(path)?,
        }),
        _ => Err(DebError::NotDeb(
            path.to_owned(),
            "no Package/Version in its control file".into(),
        )
        .into()),
    }
}

/// Unpacks, configures, compiles and packages the kernel in `work`; the package ends up
/// in `work/out/`. Returns its file name.
fn build(
    work: &Path,
    source: impl FnOnce() -> Result<PathBuf, KernelError>,
    version: &str,
    tools: &Tools,
    progress: &dyn Fn(&str),
) -> Result<String, KernelError> {
    let log = work.join("build.log");
    let marker = work.join(".unpacked");
    if !marker.is_file() {
        unpack(work, &source()?, tools, &log, progress)?;
        fs::write(&marker, b"").map_err(io(format!("writing {}", marker.display())))?;
    } else {
        progress(&format!("resuming the kernel build in {}", work.display()));
    }
    let src = find_source_dir(work)?;

    // The source tree's own date (tar keeps mtimes): the same for every build of it.
    let stamp = fs::metadata(src.join("Makefile"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let obj = work.join(OBJ_DIR);
    let fragment = work.join("microvm-kernel.config");
    fs::write(&fragment, CONFIG_FRAGMENT).map_err(io("writing the config fragment"))?;
    let make = |args: &[&str]| {
        let mut c = Command::new(&tools.make);
        c.arg("-C").arg(&src).arg(format!("O={}", obj.display()));
        c.args(args).envs(reproducible_env(stamp));
        c
    };
    let allconfig = format!("KCONFIG_ALLCONFIG={}", fragment.display());
    step(
        &mut make(&[&allconfig, "allnoconfig"]),
        "make allnoconfig",
        &log,
    )?;
    let config_path = obj.join(".config");
    let config = fs::read_to_string(&config_path)
        .map_err(io(format!("reading {}", config_path.display())))?;
    let missing = missing_options(CONFIG_FRAGMENT, &config);
    if !missing.is_empty() {
        return Err(KernelError::MissingOptions(missing.join(", ")));
    }
    progress(&format!(
        "compiling the microVM kernel (make -j{}; about 10 CPU-minutes)",
        tools.jobs
    ));
    let jobs = format!("-j{}", tools.jobs);
    step(
        &mut make(&[&jobs, "bzImage", "modules"]),
        "make bzImage modules",
        &log,
    )?;
    let release_path = obj.join("include/config/kernel.release");
    let release = fs::read_to_string(&release_path)
        .map_err(|_| KernelError::NoOutput(release_path.clone()))?
        .trim()
        .to_owned();
    let name = package(work, &src, &obj, &release, version, tools, &log)?;
    progress("keeping the kernel's build tree for external modules");
    let tree = work.join(PKG_OUT).join(BUILD_TREE);
    prepare_build_tree(&src, &obj, &tree)?;
    Ok(name)
}

/// The prepared build tree of a finished cache dir, if it has one; absolute (module
/// builds run make from the module's own source dir).
pub fn build_tree(cache_dir: &Path) -> Option<PathBuf> {
    let tree = fs::canonicalize(cache_dir.join(BUILD_TREE)).ok()?;
    (tree.join("Makefile").is_file() && tree.join(".config").is_file()).then_some(tree)
}

/// The cache dir name of a kernel package in the cache: its identity (source version
/// and config digest), or `None` for a package elsewhere.
pub fn cache_identity(deb: &Path) -> Option<String> {
    let dir = deb.parent()?;
    build_tree(dir)?;
    Some(dir.file_name()?.to_string_lossy().into_owned())
}

/// Copies what an external module build needs of `src` and `obj` into one tree `dest`
/// (the file set of the kernel's own `scripts/package/builddeb` headers package, less
/// the objects and command files of the host programs under `scripts/`).
pub fn prepare_build_tree(src: &Path, obj: &Path, dest: &Path) -> Result<(), KernelError> {
    let _ = fs::remove_dir_all(dest);
    fs::create_dir_all(dest).map_err(io(format!("creating {}", dest.display())))?;
    let arch = Path::new("arch/x86");
    for dir in [Path::new(""), arch] {
        for e in read_dir_sorted(&src.join(dir))? {
            let n = e.to_string_lossy();
            if n.starts_with("Makefile") {
                copy_entry(&src.join(dir).join(&e), &dest.join(dir).join(&e))?;
            }
        }
    }
    copy_tree(src, dest, Path::new("include"), &keep_all)?;
    copy_tree(src, dest, Path::new("scripts"), &keep_all)?;
    copy_tree(src, dest, arch, &|p: &Path| {
        let s = p.to_string_lossy();
        let in_dir = p.components().any(|c| {
            let c = c.as_os_str();
            c == "include" || c == "scripts"
        });
        in_dir || s.ends_with("/Kbuild.platforms") || s.ends_with("/Platform")
    })?;
    let objtool = Path::new("tools/objtool/objtool");
    if obj.join(objtool).is_file() {
        copy_entry(&obj.join(objtool), &dest.join(objtool))?;
    }
    let built = |p: &Path| {
        let n = p
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        !(n.ends_with(".o") || (n.starts_with('.') && n.ends_with(".cmd")))
    };
    for dir in ["arch/x86/include", "include", "scripts"] {
        copy_tree(obj, dest, Path::new(dir), &built)?;
    }
    for file in ["Module.symvers", ".config"] {
        let from = obj.join(file);
        if !from.is_file() {
            return Err(KernelError::NoOutput(from));
        }
        copy_entry(&from, &dest.join(file))?;
    }
    Ok(())
}

fn keep_all(_: &Path) -> bool {
    true
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<std::ffi::OsString>, KernelError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(io(format!("reading {}", dir.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    Ok(names)
}

/// Copies the files and links under `from/rel` that `keep` accepts (by their path
/// relative to `from`) to `to/rel`; a missing `from/rel` copies nothing.
fn copy_tree(
    from: &Path,
    to: &Path,
    rel: &Path,
    keep: &dyn Fn(&Path) -> bool,
) -> Result<(), KernelError> {
    let dir = from.join(rel);
    if !dir.is_dir() {
        return Ok(());
    }
    for name in read_dir_sorted(&dir)? {
        let r = rel.join(&name);
        let meta = fs::symlink_metadata(from.join(&r))
            .map_err(io(format!("reading {}", from.join(&r).display())))?;
        if meta.is_dir() {
            copy_tree(from, to, &r, keep)?;
        } else if keep(&r) {
            copy_entry(&from.join(&r), &to.join(&r))?;
        }
    }
    Ok(())
}

/// Copies one file (mode kept) or symlink (as a link), creating its parent dirs.
fn copy_entry(from: &Path, to: &Path) -> Result<(), KernelError> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    let what = || format!("copying {}", from.display());
    let meta = fs::symlink_metadata(from).map_err(io(what()))?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(from).map_err(io(what()))?;
        let _ = fs::remove_file(to);
        std::os::unix::fs::symlink(target, to).map_err(io(what()))?;
    } else {
        fs::copy(from, to).map_err(io(what()))?;
    }
    Ok(())
}

/// Unpacks the source package's tarball into `work/linux-source-*`.
fn unpack(
    work: &Path,
    src_deb: &Path,
    tools: &Tools,
    log: &Path,
    progress: &dyn Fn(&str),
) -> Result<(), KernelError> {
    progress("unpacking the kernel source");
    let unpacked = work.join("deb");
    let _ = fs::remove_dir_all(&unpacked);
    let mut x = Command::new(&tools.dpkg_deb);
    x.arg("-x").arg(src_deb).arg(&unpacked);
    step(&mut x, "dpkg-deb -x", log)?;
    let tarball = find_tarball(&unpacked.join("usr/src"))
        .ok_or_else(|| KernelError::NoTarball(src_deb.to_owned()))?;
    let mut t = Command::new(&tools.tar);
    t.arg("-xf").arg(&tarball).arg("-C").arg(work);
    step(&mut t, "tar -xf", log)?;
    fs::remove_dir_all(&unpacked).map_err(io("removing the unpacked source package"))
}

/// Installs the kernel and its modules into a package tree and builds the `.deb`.
fn package(
    work: &Path,
    src: &Path,
    obj: &Path,
    release: &str,
    version: &str,
    tools: &Tools,
    log: &Path,
) -> Result<String, KernelError> {
    let root = work.join("pkg");
    let _ = fs::remove_dir_all(&root);
    let mut mi = Command::new(&tools.make);
    mi.arg("-C")
        .arg(src)
        .arg(format!("O={}", obj.display()))
        .arg(format!("INSTALL_MOD_PATH={}", root.display()))
        .args(["INSTALL_MOD_STRIP=1", "DEPMOD=true", "modules_install"]);
    step(&mut mi, "make modules_install", log)?;
    let mod_dir = root.join("lib/modules").join(release);
    for link in ["build", "source"] {
        let _ = fs::remove_file(mod_dir.join(link));
    }
    let boot = root.join("boot");
    fs::create_dir_all(&boot).map_err(io("creating the package's boot dir"))?;
    let bz = obj.join("arch/x86/boot/bzImage");
    if !bz.is_file() {
        return Err(KernelError::NoOutput(bz));
    }
    fs::copy(&bz, boot.join(format!("vmlinuz-{release}")))
        .map_err(io(format!("copying {}", bz.display())))?;
    fs::copy(obj.join(".config"), boot.join(format!("config-{release}")))
        .map_err(io("copying the kernel config"))?;
    let debian = root.join("DEBIAN");
    fs::create_dir_all(&debian).map_err(io("creating the package's DEBIAN dir"))?;
    fs::write(debian.join("control"), control(release, version))
        .map_err(io("writing the package's control file"))?;
    let out = work.join(PKG_OUT);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).map_err(io("creating the output dir"))?;
    let name = format!("linux-image-{release}_{version}_amd64.deb");
    let mut b = Command::new(&tools.dpkg_deb);
    b.args(["--root-owner-group", "-Zgzip", "-z1", "-b"])
        .arg(&root)
        .arg(out.join(&name));
    step(&mut b, "dpkg-deb -b", log)?;
    Ok(name)
}

/// What the kernel embeds about its build (`uname -v`, /proc/version), fixed so that two
/// builds of the same source and config do not differ by host, user or time. `stamp`:
/// seconds since the epoch (`date -d @N` must parse it: the build's cpio uses it).
pub fn reproducible_env(stamp: u64) -> [(&'static str, String); 4] {
    [
        ("KBUILD_BUILD_TIMESTAMP", format!("@{stamp}")),
        ("KBUILD_BUILD_USER", "gpucell".to_owned()),
        ("KBUILD_BUILD_HOST", "gpucell".to_owned()),
        ("KBUILD_BUILD_VERSION", "1".to_owned()),
    ]
}

/// The control file of the kernel package.
pub fn control(release: &str, version: &str) -> String {
    format!(
        "Package: linux-image-{release}\nVersion: {version}\nArchitecture: amd64\n\
         Maintainer: gpucell\nSection: kernel\nPriority: optional\n\
         Description: gpucell microVM guest kernel {release}\n \
         Built from {SOURCE_PACKAGE} {version} with data/microvm-kernel.config \
         (sha256 {}).\n",
        config_digest()
    )
}

/// Runs one build step with its output appended to `log`.
fn step(cmd: &mut Command, what: &str, log: &Path) -> Result<(), KernelError> {
    let open = || {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(format!("opening {}", log.display())))
    };
    let status = cmd
        .stdin(Stdio::null())
        .stdout(open()?)
        .stderr(open()?)
        .status()
        .map_err(|e| KernelError::Spawn(what.to_owned(), e))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    Err(KernelError::Failed {
        step: what.to_owned(),
        log: log.to_owned(),
        tail: lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n"),
    })
}

fn find_tarball(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.starts_with("linux-source-") && n.ends_with(".tar.xz")).then(|| e.path())
        })
}

fn find_source_dir(work: &Path) -> Result<PathBuf, KernelError> {
    fs::read_dir(work)
        .map_err(io(format!("reading {}", work.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("linux-source-"))
        })
        .ok_or_else(|| KernelError::NoOutput(work.join("linux-source-*")))
}

/// The `CONFIG_X=y|m|value` lines of `fragment` that `config` does not hold as written.
pub fn missing_options(fragment: &str, config: &str) -> Vec<String> {
    let have: std::collections::BTreeSet<&str> = config.lines().map(str::trim).collect();
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_") && l.contains('='))
        .filter(|l| !have.contains(l))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn choice_parses_and_prints() {
        assert_eq!(
            "microvm".parse::<KernelChoice>().unwrap(),
            KernelChoice::Microvm
        );
        assert_eq!(
            "debian".parse::<KernelChoice>().unwrap(),
            KernelChoice::Debian
        );
        assert_eq!(KernelChoice::default(), KernelChoice::Microvm);
        let e = "tiny".parse::<KernelChoice>().unwrap_err().to_string();
        assert!(e.contains("tiny") && e.contains("microvm"), "{e}");
    }

    #[test]
    fn fragment_has_what_every_guest_and_nvidia_need() {
        for opt in [
            "CONFIG_PVH=y",
            "CONFIG_VIRTIO_PCI=y",
            "CONFIG_VIRTIO_BLK=y",
            "CONFIG_VIRTIO_CONSOLE=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
            "CONFIG_VIRTIO_NET=y",
            "CONFIG_HOTPLUG_PCI_PCIE=y",
            "CONFIG_PCI_MSI=y",
            "CONFIG_EROFS_FS=y",
            "CONFIG_OVERLAY_FS=y",
            "CONFIG_TMPFS=y",
            "CONFIG_PID_NS=y",
            "CONFIG_CGROUPS=y",
            "CONFIG_MODULES=y",
            "CONFIG_DRM=y",
            "CONFIG_DEVICE_PRIVATE=y",
            "CONFIG_KERNEL_XZ=y",
        ] {
            assert!(CONFIG_FRAGMENT.lines().any(|l| l == opt), "{opt}");
        }
    }

    #[test]
    fn missing_options_names_what_the_config_dropped() {
        let frag = "# c\nCONFIG_A=y\nCONFIG_B=m\nCONFIG_C=\"x\"\n";
        let conf = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n";
        assert_eq!(missing_options(frag, conf), vec!["CONFIG_B=m".to_owned()]);
        assert!(missing_options(frag, "CONFIG_A=y\nCONFIG_B=m\nCONFIG_C=\"x\"\n").is_empty());
    }

    #[test]
    fn cache_key_has_version_and_digest() {
        let k = cache_key("6.1.192-3");
        assert!(k.starts_with("6.1.192-3-"), "{k}");
        assert_eq!(k.len(), "6.1.192-3-".len() + 16);
        assert!(!cache_key("../x/y").contains('/'));
        let c = control("6.1.192-gpucell", "6.1.192-3");
        assert!(c.contains("Package: linux-image-6.1.192-gpucell\nVersion: 6.1.192-3\n"));
    }
}
