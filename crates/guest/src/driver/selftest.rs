//! `gpucell guest test`: boots a driver flavour with `gpucell.driver_test=1` and judges
//! what its agent reports: the modules load (with no GPU, up to the driver's ENODEV),
//! with the guest kernel's vermagic and no symbol or format error; the device nodes;
//! `nvidia-smi`; and libcuda's CUDA version.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::GuestArtifacts;

/// The agent's marker (crates/agent/src/nvidia.rs `SELF_TEST_MARKER`).
pub const MARKER: &str = "gpucell-driver-test: ";

#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error("guest flavour `{0}` has no driver disk; `gpucell guest test` checks driver flavours (nvidia-*)")]
    NotDriver(String),
    #[error("could not start {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("the guest did not report within {secs} s; its console ended with:\n{console}")]
    Timeout { secs: u64, console: String },
    #[error("the guest powered off without a report; its console ended with:\n{console}")]
    NoReport { console: String },
    #[error("the guest's report does not parse: {0}")]
    Parse(String),
    #[error("device {0} is not bound to vfio-pci; bind it first (`gpucell gpu bind {0}`)")]
    NotVfio(String),
}

/// The agent's report: one type shared with the agent, in the protocol crate.
pub use gpucell_protocol::driver::{ModuleResult, SelfTestReport as GuestReport, ToolResult};

/// One judged check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// The outcome of `gpucell guest test`.
#[derive(Debug, Clone, Serialize)]
pub struct TestOutcome {
    pub flavour: String,
    pub passed: bool,
    pub checks: Vec<Check>,
    pub report: GuestReport,
    pub boot_seconds: f64,
}

/// How to boot the test VM.
#[derive(Debug, Clone)]
pub struct TestOptions {
    pub qemu: PathBuf,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub memory_mib: u32,
    /// Host PCI functions (bound to vfio-pci) to pass through.
    pub devices: Vec<String>,
    pub timeout: Duration,
    /// The host's sysfs, to check that `devices` are bound to vfio-pci.
    pub sysfs: PathBuf,
}

/// The QEMU arguments of the test boot.
pub fn qemu_args(a: &GuestArtifacts, disk: &Path, o: &TestOptions) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "-M".into(),
        "q35".into(),
        "-accel".into(),
        o.accel.clone(),
        "-m".into(),
        format!("{}M", o.memory_mib),
        "-smp".into(),
        "1".into(),
        "-nodefaults".into(),
        "-no-reboot".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-kernel".into(),
        a.kernel.display().to_string(),
        "-initrd".into(),
        a.initrd.display().to_string(),
        "-append".into(),
        "console=ttyS0 panic=-1 quiet gpucell.driver_test=1".into(),
        "-drive".into(),
        format!(
            "file={},if=none,id=driver,format=raw,readonly=on",
            disk.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=driver".into(),
    ];
    if o.accel == "kvm" {
        v.extend(["-cpu".into(), "host".into()]);
    }
    for (i, bdf) in o.devices.iter().enumerate() {
        v.extend([
            "-device".into(),
            format!("pcie-root-port,id=rp{i},chassis={},slot={}", i + 1, i + 1),
            "-device".into(),
            format!("vfio-pci,host={bdf},bus=rp{i}"),
        ]);
    }
    v
}

/// Boots the flavour and judges its report.
pub fn run(a: &GuestArtifacts, o: &TestOptions) -> Result<TestOutcome, SelfTestError> {
    let disk = a
        .driver_disk
        .clone()
        .ok_or_else(|| SelfTestError::NotDriver(a.flavour.clone()))?;
    for bdf in &o.devices {
        let drv = std::fs::read_link(o.sysfs.join("bus/pci/devices").join(bdf).join("driver")).ok();
        if drv
            .as_deref()
            .and_then(|p| p.file_name())
            .is_none_or(|n| n != "vfio-pci")
        {
            return Err(SelfTestError::NotVfio(bdf.clone()));
        }
    }
    let start = Instant::now();
    let mut child = Command::new(&o.qemu)
        .args(qemu_args(a, &disk, o))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SelfTestError::Spawn(o.qemu.display().to_string(), e))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut console = Vec::new();
        if let Some(out) = out {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(json) = line.trim_start().strip_prefix(MARKER) {
                    let _ = tx.send(json.to_owned());
                }
                console.push(line);
            }
        }
        console
    });
    let got = rx.recv_timeout(o.timeout);
    // The agent powers off after its report; a hung guest is killed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let console = reader.join().unwrap_or_default();
    let tail = console[console.len().saturating_sub(30)..].join("\n");
    let json = match got {
        Ok(j) => j,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            return Err(SelfTestError::Timeout {
                secs: o.timeout.as_secs(),
                console: tail,
            })
        }
        Err(_) => return Err(SelfTestError::NoReport { console: tail }),
    };
    let report: GuestReport =
        serde_json::from_str(&json).map_err(|e| SelfTestError::Parse(e.to_string()))?;
    let checks = judge(&report, a, !o.devices.is_empty());
    Ok(TestOutcome {
        flavour: a.flavour.clone(),
        passed: checks.iter().all(|c| c.ok),
        checks,
        report,
        boot_seconds: start.elapsed().as_secs_f64(),
    })
}

/// The checks of a report. Without GPUs the driver must stop at ENODEV ("No NVIDIA GPU
/// found"), never at a symbol or format error.
pub fn judge(r: &GuestReport, a: &GuestArtifacts, with_gpus: bool) -> Vec<Check> {
    let mut c = vec![
        check(
            "report",
            r.error.is_none(),
            r.error.clone().unwrap_or_else(|| "no error".into()),
        ),
        check(
            "kernel",
            r.kernel == a.manifest.kernel_release && r.built_for == r.kernel,
            format!("running {}, modules built for {}", r.kernel, r.built_for),
        ),
        vermagic_check(r, a, with_gpus),
        kernel_log_check(r),
    ];
    if with_gpus {
        c.extend(gpu_checks(r));
    } else {
        c.extend(no_gpu_checks(r));
    }
    c.push(cuda_check(r, a));
    c
}

fn check(name: &'static str, ok: bool, detail: String) -> Check {
    Check { name, ok, detail }
}

/// The built modules carry the vermagic the manifest recorded (not judged with GPUs).
fn vermagic_check(r: &GuestReport, a: &GuestArtifacts, with_gpus: bool) -> Check {
    let want_magic = a
        .manifest
        .driver
        .as_ref()
        .map(|d| d.vermagic.clone())
        .unwrap_or_default();
    let bad_magic: Vec<String> = r
        .modules
        .iter()
        .filter(|m| is_driver_module(&m.module) && m.vermagic != want_magic)
        .map(|m| format!("{}: `{}`", m.module, m.vermagic))
        .collect();
    check(
        "vermagic",
        bad_magic.is_empty() && !r.modules.is_empty() || with_gpus,
        if bad_magic.is_empty() {
            want_magic.clone()
        } else {
            bad_magic.join(", ")
        },
    )
}

/// The kernel log has no unresolved symbols or module format complaints.
fn kernel_log_check(r: &GuestReport) -> Check {
    let bad_log: Vec<&String> = r
        .kernel_log
        .iter()
        .filter(|l| {
            l.contains("Unknown symbol")
                || l.contains("Invalid module format")
                || l.contains("disagrees about version")
        })
        .collect();
    check(
        "no symbol or format errors",
        bad_log.is_empty(),
        if bad_log.is_empty() {
            "none in the kernel log".into()
        } else {
            format!("{bad_log:?}")
        },
    )
}

/// The driver's own modules (`nvidia*.ko`), as opposed to the guest kernel's that they
/// need (`drm.ko` and its dependencies, where drm is not built in).
fn is_driver_module(name: &str) -> bool {
    name.starts_with("nvidia")
}

/// Without GPUs: the kernel's modules (drm, if not built in) load, nvidia stops at
/// ENODEV, nvidia-smi runs and says it failed.
fn no_gpu_checks(r: &GuestReport) -> Vec<Check> {
    let res = |name: &str| {
        r.modules
            .iter()
            .find(|m| m.module == name)
            .map(|m| m.result.clone())
            .unwrap_or_default()
    };
    let nv = res("nvidia.ko");
    let no_gpu = r
        .kernel_log
        .iter()
        .any(|l| l.contains("No NVIDIA GPU found"));
    vec![
        kernel_modules_check(r),
        check(
            "nvidia stops at ENODEV",
            nv == "ENODEV" && no_gpu,
            format!("nvidia.ko: {nv}; kernel said \"No NVIDIA GPU found\": {no_gpu}"),
        ),
        check(
            "nvidia-smi runs",
            !r.nvidia_smi.ok && r.nvidia_smi.output.contains("NVIDIA-SMI has failed"),
            first_line(&r.nvidia_smi.output),
        ),
    ]
}

/// The guest kernel's modules on the driver disk all load (none: drm is built in).
fn kernel_modules_check(r: &GuestReport) -> Check {
    let kernel: Vec<String> = r
        .modules
        .iter()
        .filter(|m| !is_driver_module(&m.module))
        .map(|m| format!("{}: {}", m.module, m.result))
        .collect();
    check(
        "kernel modules load",
        kernel.iter().all(|k| k.ends_with("loaded")),
        if kernel.is_empty() {
            "none (drm is built in)".into()
        } else {
            kernel.join(", ")
        },
    )
}

/// With GPUs: the driver sees them and nvidia-smi succeeds.
fn gpu_checks(r: &GuestReport) -> Vec<Check> {
    let n = r.driver.as_ref().map_or(0, |d| d.gpus.len());
    vec![
        check("GPUs answer", n > 0, format!("{n} GPU(s)")),
        check(
            "nvidia-smi runs",
            r.nvidia_smi.ok,
            first_line(&r.nvidia_smi.output),
        ),
    ]
}

/// libcuda reports the CUDA version the manifest recorded.
fn cuda_check(r: &GuestReport, a: &GuestArtifacts) -> Check {
    let want_cuda = a
        .manifest
        .driver
        .as_ref()
        .and_then(|d| super::table::parse_cuda(&d.cuda))
        .map(|v| v.to_string())
        .unwrap_or_default();
    check(
        "libcuda CUDA version",
        r.cuda.ok && r.cuda.output.trim() == want_cuda,
        format!(
            "cuDriverGetVersion = {} (want {want_cuda})",
            r.cuda.output.trim()
        ),
    )
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned()
}
