//! The NVIDIA driver for one run, before the workload starts (docs/cuda.md):
//!
//! 1. the run's environment, with the host's overrides, read by the toolkit's contract
//!    ([`decide`]: `NVIDIA_VISIBLE_DEVICES`, `NVIDIA_DRIVER_CAPABILITIES`, legacy images);
//! 2. the image's `NVIDIA_REQUIRE_*` checked against the driver's facts
//!    ([`check_requirements`]), refused with the toolkit's message;
//! 3. the CDI spec: sent by the host, or generated from the guest's driver root, its `/dev`
//!    and `/proc/driver/nvidia/gpus` ([`generate_spec`]);
//! 4. phase 1 of `inject` on the container root ([`inject_root`]); phase 2 (the device
//!    nodes) is handed to the workload's child by `container::Prepared::with_devices`.
//!
//! [`prepare`] does all four for a run in the guest; the GPU test harness
//! (`container_test`) calls the steps one by one.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use gpucell_nvidia::cdi::{self, CdiError, GenerateOptions, Generated, GpuNode, Spec};
use gpucell_nvidia::env::EnvError;
use gpucell_nvidia::requirements::RequirementError;
use gpucell_nvidia::{DriverFacts, ImageEnv, Injection, Requirements};
use gpucell_protocol::{GpuFacts, GpuInjection};

use crate::inject::{self, DeviceSetup, InjectError, InjectOps};

/// Most `/dev/nvidiaN` nodes looked at when the driver does not list its GPUs in `/proc`.
const MAX_DEV_GPUS: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum GpuSetupError {
    #[error("the run's NVIDIA environment")]
    Env(#[source] EnvError),
    #[error("the image's NVIDIA requirements")]
    Requirement(#[source] RequirementError),
    #[error(
        "requirement error: {message} ({variable} of the image; the driver is {driver} with \
         CUDA {cuda}; NVIDIA_DISABLE_REQUIRE=true skips the check)"
    )]
    Unsatisfied {
        message: String,
        variable: String,
        driver: String,
        cuda: String,
    },
    #[error("the CDI spec sent by the host")]
    Spec(#[source] CdiError),
    #[error("generating the CDI spec of the NVIDIA driver under {root}")]
    Generate {
        root: String,
        #[source]
        source: CdiError,
    },
    #[error("injecting the NVIDIA driver into the container")]
    Inject(#[source] InjectError),
    #[error("the driver disk for the injection")]
    DriverDisk(#[source] crate::nvidia::NvidiaError),
    #[error("the driver disk's {path}")]
    DiskInfo {
        path: String,
        #[source]
        source: crate::nvidia::NvidiaError,
    },
}

/// Where the driver shows itself on the agent's side: seams for tests and the harness.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The device nodes (`/dev`).
    pub dev: PathBuf,
    /// The loaded driver's GPUs (`/proc/driver/nvidia/gpus`).
    pub proc_gpus: PathBuf,
    /// The driver's params (`/proc/driver/nvidia/params`).
    pub params: PathBuf,
    /// Generated files (the params copy, the ldconfig log), outside the container.
    pub state_dir: PathBuf,
}

impl Paths {
    /// The guest's.
    pub fn guest() -> Self {
        Paths {
            dev: "/dev".into(),
            proc_gpus: "/proc/driver/nvidia/gpus".into(),
            params: inject::PARAMS.into(),
            state_dir: "/run/gpucell".into(),
        }
    }
}

/// The run's environment with the host's overrides of `NVIDIA_VISIBLE_DEVICES` and
/// `NVIDIA_DRIVER_CAPABILITIES` (a later entry wins).
pub fn image_env(env: &[String], req: &GpuInjection) -> ImageEnv {
    let mut all: Vec<String> = env.to_vec();
    if let Some(v) = &req.visible_devices {
        all.push(format!("{}={v}", gpucell_nvidia::env::VISIBLE_DEVICES));
    }
    if let Some(c) = &req.capabilities {
        all.push(format!("{}={c}", gpucell_nvidia::env::DRIVER_CAPABILITIES));
    }
    ImageEnv::parse(&all)
}

/// The toolkit's decision: `None` injects nothing.
pub fn decide(env: &ImageEnv, req: &GpuInjection) -> Result<Option<Injection>, GpuSetupError> {
    gpucell_nvidia::decide(env, req.gpus_requested, req.force).map_err(GpuSetupError::Env)
}

/// Checks the image's `NVIDIA_REQUIRE_*` (or legacy `CUDA_VERSION`) against the driver and
/// the visible GPUs.
pub fn check_requirements(
    env: &ImageEnv,
    driver_version: &str,
    cuda_version: &str,
    gpus: &[GpuFacts],
) -> Result<(), GpuSetupError> {
    let reqs = Requirements::from_image_env(env).map_err(GpuSetupError::Requirement)?;
    let driver =
        DriverFacts::new(driver_version, cuda_version).map_err(GpuSetupError::Requirement)?;
    let gpus: Vec<gpucell_nvidia::GpuFacts> = gpus
        .iter()
        .filter_map(|g| gpucell_nvidia::GpuFacts::new(&g.arch, &g.brand))
        .collect();
    reqs.check(&driver, &gpus)
        .map_err(|u| GpuSetupError::Unsatisfied {
            message: u.message.clone(),
            variable: u.variable.clone(),
            driver: driver_version.to_owned(),
            cuda: cuda_version.to_owned(),
        })
}

/// The spec of the driver under `driver_root` (default search paths), with the control
/// nodes of `paths.dev` and the GPUs the driver lists (see [`gpus`]).
pub fn generate_spec(driver_root: &Path, paths: &Paths) -> Result<Generated, GpuSetupError> {
    let err = |source| GpuSetupError::Generate {
        root: driver_root.display().to_string(),
        source,
    };
    let mut o = GenerateOptions::new(driver_root);
    if let Some((lib, bin)) = disk_search_paths(driver_root)? {
        o.lib_dirs.insert(0, lib);
        o.bin_dirs.insert(0, bin);
    }
    o.dev_root = Some(paths.dev.clone());
    o.gpus = gpus(paths).map_err(err)?;
    let mut generated = cdi::generate(&o).map_err(err)?;
    // The GPU nodes are where the control nodes are (a harness's `--dev`), for the bind
    // that replaces a refused mknod.
    if paths.dev != Path::new("/dev") {
        let nodes = generated
            .spec
            .devices
            .iter_mut()
            .flat_map(|d| d.container_edits.device_nodes.iter_mut());
        for n in nodes.filter(|n| n.host_path.is_none()) {
            if let Some(name) = n.path.strip_prefix("/dev/") {
                n.host_path = Some(paths.dev.join(name).display().to_string());
            }
        }
    }
    Ok(generated)
}

/// The library and binary directories (absolute inside `driver_root`) that a driver
/// disk's `gpucell-driver.json` names; `None` when `driver_root` is not a driver disk.
pub fn disk_search_paths(driver_root: &Path) -> Result<Option<(String, String)>, GpuSetupError> {
    let path = driver_root.join(crate::nvidia::INFO_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(GpuSetupError::DiskInfo {
                path: path.display().to_string(),
                source: crate::nvidia::NvidiaError::Info(path.display().to_string(), e),
            })
        }
    };
    let info = crate::nvidia::parse_info(&text).map_err(|source| GpuSetupError::DiskInfo {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Some((
        format!("/{}", info.lib_dir),
        format!("/{}", info.bin_dir),
    )))
}

/// The GPUs from `/proc/driver/nvidia/gpus`; where the driver does not list them there
/// (gVisor's nvproxy), the `/dev/nvidiaN` character nodes in minor order, without UUIDs.
pub fn gpus(paths: &Paths) -> Result<Vec<GpuNode>, CdiError> {
    let listed = cdi::gpus_from_proc(&paths.proc_gpus)?;
    if !listed.is_empty() {
        return Ok(listed);
    }
    use std::os::unix::fs::FileTypeExt;
    let minors = (0..MAX_DEV_GPUS).filter(|m| {
        fs::metadata(paths.dev.join(format!("nvidia{m}")))
            .is_ok_and(|md| md.file_type().is_char_device())
    });
    Ok(minors
        .enumerate()
        .map(|(i, minor)| GpuNode {
            index: i as u32,
            minor,
            uuid: None,
            bdf: None,
        })
        .collect())
}

/// What phase 1 did and what phase 2 needs, with its time.
#[derive(Debug, Clone)]
pub struct Injected {
    pub devices: DeviceSetup,
    pub report: inject::Report,
    /// `inject::plan` plus `inject::apply_root`, in milliseconds.
    pub inject_ms: f64,
}

/// Plans the injection of `spec` for `injection` and applies phase 1 to `root`.
pub fn inject_root(
    spec: &Spec,
    injection: &Injection,
    root: &Path,
    opts: &inject::Options,
    ops: &mut dyn InjectOps,
) -> Result<Injected, GpuSetupError> {
    let started = Instant::now();
    let plan = inject::plan(spec, &injection.visible, root).map_err(GpuSetupError::Inject)?;
    let report = inject::apply_root(&plan, root, opts, ops).map_err(GpuSetupError::Inject)?;
    Ok(Injected {
        devices: report.devices.clone(),
        report,
        inject_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

/// All of it for a run in the guest: `None` when nothing is injected.
pub fn prepare(
    root: &Path,
    env: &[String],
    req: &GpuInjection,
    paths: &Paths,
    ops: &mut dyn InjectOps,
) -> Result<Option<Injected>, GpuSetupError> {
    let env = image_env(env, req);
    let Some(injection) = decide(&env, req)? else {
        return Ok(None);
    };
    let spec = if req.cdi_spec.is_empty() {
        let driver_root = if req.driver_root.is_empty() {
            "/"
        } else {
            req.driver_root.as_str()
        };
        generate_spec(Path::new(driver_root), paths)?.spec
    } else {
        Spec::from_json(&req.cdi_spec).map_err(GpuSetupError::Spec)?
    };
    if let Some(cuda) = &req.cuda_version {
        let driver = spec.driver_version().unwrap_or_default().to_owned();
        check_requirements(&env, &driver, cuda, &req.gpus)?;
    }
    let opts = inject::Options {
        compat_allowed: req.compat_allowed,
        params_source: paths.params.clone(),
        state_dir: paths.state_dir.clone(),
    };
    let injected = inject_root(&spec, &injection, root, &opts, ops)?;
    for w in &injected.report.warnings {
        tracing::warn!("NVIDIA driver injection: {w}");
    }
    Ok(Some(injected))
}

/// `cuDriverGetVersion`'s integer (`13000`) as a version (`13.0`).
pub fn cuda_version_of(n: u32) -> String {
    format!("{}.{}", n / 1000, (n % 1000) / 10)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_disk_names_its_search_paths() {
        let d = tempfile::tempdir().unwrap();
        assert!(disk_search_paths(d.path()).unwrap().is_none());
        let info = |lib: &str| {
            format!(
                r#"{{"flavour":"nvidia-550","version":"550.163.01","kernel_release":"6.1",
                "modules":[],"firmware_dir":"lib/firmware","cuda":"12.4","lib_dir":"{lib}",
                "bin_dir":"usr/bin","loader":"usr/lib/ld-linux-x86-64.so.2"}}"#
            )
        };
        let file = d.path().join(crate::nvidia::INFO_FILE);
        fs::write(&file, info("usr/lib")).unwrap();
        assert_eq!(
            disk_search_paths(d.path()).unwrap(),
            Some(("/usr/lib".into(), "/usr/bin".into()))
        );
        fs::write(&file, info("../etc")).unwrap();
        let e = disk_search_paths(d.path()).unwrap_err();
        assert!(format!("{e:#?}").contains("leaves the disk"), "{e:#?}");
    }

    fn req() -> GpuInjection {
        GpuInjection::default()
    }

    #[test]
    fn host_overrides_win_over_the_image_env() {
        let env = vec!["NVIDIA_VISIBLE_DEVICES=all".to_string()];
        let mut r = req();
        r.visible_devices = Some("none".into());
        let inj = decide(&image_env(&env, &r), &r).unwrap().unwrap();
        assert_eq!(inj.visible, gpucell_nvidia::VisibleDevices::None);
        // No NVIDIA variable, no GPUs, not forced: nothing.
        assert!(decide(&image_env(&[], &req()), &req()).unwrap().is_none());
        let mut forced = req();
        forced.force = true;
        let inj = decide(&image_env(&[], &forced), &forced).unwrap().unwrap();
        assert_eq!(inj.visible, gpucell_nvidia::VisibleDevices::All);
        let bad = vec!["NVIDIA_VISIBLE_DEVICES=MIG-1".to_string()];
        assert!(matches!(
            decide(&image_env(&bad, &req()), &req()),
            Err(GpuSetupError::Env(_))
        ));
    }

    #[test]
    fn requirements_are_refused_with_the_toolkit_message() {
        let env = ImageEnv::parse(&["NVIDIA_REQUIRE_CUDA=cuda>=99.0"]);
        let err = check_requirements(&env, "580.159.04", "13.0", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "requirement error: unsatisfied condition: cuda>=99.0, please update your driver \
             to a newer version, or use an earlier cuda container (NVIDIA_REQUIRE_CUDA of the \
             image; the driver is 580.159.04 with CUDA 13.0; NVIDIA_DISABLE_REQUIRE=true skips \
             the check)"
        );
        let ok = ImageEnv::parse(&[
            "NVIDIA_REQUIRE_CUDA=cuda>=12.8",
            "NVIDIA_REQUIRE_ARCH=arch>=9.0",
        ]);
        let h200 = GpuFacts {
            arch: "9.0".into(),
            brand: "NVIDIA".into(),
        };
        check_requirements(&ok, "580.159.04", "13.0", std::slice::from_ref(&h200)).unwrap();
        let ampere = GpuFacts {
            arch: "8.0".into(),
            brand: "NVIDIA".into(),
        };
        assert!(check_requirements(&ok, "580.159.04", "13.0", &[ampere]).is_err());
        let disabled =
            ImageEnv::parse(&["NVIDIA_REQUIRE_CUDA=cuda>=99.0", "NVIDIA_DISABLE_REQUIRE=1"]);
        check_requirements(&disabled, "580.159.04", "13.0", &[]).unwrap();
        assert!(matches!(
            check_requirements(&env, "580.159.04", "thirteen", &[]),
            Err(GpuSetupError::Requirement(_))
        ));
        assert_eq!(cuda_version_of(13000), "13.0");
        assert_eq!(cuda_version_of(12040), "12.4");
    }

    #[test]
    fn gpus_come_from_proc_else_from_dev_nodes() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths {
            dev: d.path().join("dev"),
            proc_gpus: d.path().join("gpus"),
            params: d.path().join("params"),
            state_dir: d.path().join("state"),
        };
        fs::create_dir_all(&paths.dev).unwrap();
        // Plain files are not GPU nodes.
        fs::write(paths.dev.join("nvidia0"), "").unwrap();
        assert!(gpus(&paths).unwrap().is_empty());
        let info = paths.proc_gpus.join("0000:00:06.0");
        fs::create_dir_all(&info).unwrap();
        fs::write(
            info.join("information"),
            "Model: NVIDIA H200\nDevice Minor: 3\nGPU UUID: GPU-3a9b1c2d-0e4f-5a6b-7c8d-9e0f1a2b3c4d\n",
        )
        .unwrap();
        let g = gpus(&paths).unwrap();
        assert_eq!((g.len(), g[0].minor, g[0].index), (1, 3, 0));
    }
}
