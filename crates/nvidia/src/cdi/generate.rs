//! Generating a spec from a driver root: libraries, binaries, control nodes, hooks,
//! and the GPUs the loaded driver lists.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::*;

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

pub(super) fn control_nodes(dev_root: Option<&Path>) -> Vec<DeviceNode> {
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
pub(super) fn libc_major(dev: u64) -> i64 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as i64
}

pub(super) fn libc_minor(dev: u64) -> i64 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as i64
}

/// SONAME links (`libcuda.so.1` → `libcuda.so.550.163.01`) and `.so` links
/// (`libcuda.so` → `libcuda.so.1`), as `(target, link path)`; each link path once.
pub(super) fn links_for(libraries: &[Library], lib_dir: &str) -> Vec<(String, String)> {
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

pub(super) fn valid_file_name(s: &str) -> bool {
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
pub(super) fn unique_dirs(root: &Path, dirs: &[String]) -> Result<Vec<PathBuf>, CdiError> {
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

pub(super) fn list_dir(dir: &Path) -> Result<Vec<String>, CdiError> {
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

pub(super) fn detect_version_in(
    root: &Path,
    dirs: &[PathBuf],
    names: &[String],
) -> Result<String, CdiError> {
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

pub(super) fn host_path_of(root: &Path, host_root: &Path, resolved: &Path) -> PathBuf {
    match resolved.strip_prefix(root) {
        Ok(rel) => host_root.join(rel),
        Err(_) => resolved.to_owned(),
    }
}

pub(super) fn find_libraries(
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

pub(super) fn find_binaries(
    root: &Path,
    host_root: &Path,
    dirs: &[String],
) -> Result<Vec<PathBuf>, CdiError> {
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
