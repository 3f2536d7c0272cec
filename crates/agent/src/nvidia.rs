//! NVIDIA driver bring-up in a driver flavour's guest.
//!
//! A driver flavour attaches a read-only erofs **driver disk** (found by its
//! `gpucell-driver.json`) holding `drm.ko`, `nvidia.ko`, `nvidia-uvm.ko`, the GSP firmware
//! and the userspace with its own C library. When NVIDIA GPUs (vendor 0x10de, display
//! class) are passed, the agent: points the firmware loader at the disk; loads the modules
//! with `NVreg_ModifyDeviceFiles=0` (and `NVreg_NvLinkDisable=1` for one GPU); creates
//! `/dev/nvidiactl`, `/dev/nvidiaN` and `/dev/nvidia-uvm{,-tools}` itself (the kernel does
//! not); starts `nvidia-persistenced --uvm-persistence-mode`; waits until `nvidia-smi`
//! lists every GPU; and reports them. Other PCI functions are never touched. Every
//! system access goes through [`System`], so the sequence is tested with a fake.

use std::path::Path;
use std::time::{Duration, Instant};

use gpucell_protocol::{DeviceInfo, DriverReport, GpuReport};
use nix::errno::Errno;

pub const NVIDIA_VENDOR: u16 = 0x10de;
/// Where the driver disk is mounted.
pub const DRIVER_MOUNT: &str = "/run/gpucell/driver";
pub const INFO_FILE: &str = "gpucell-driver.json";
/// Major number of `/dev/nvidiactl` and `/dev/nvidiaN` (`register_chrdev(195, ...)`).
pub const NVIDIA_MAJOR: u32 = 195;
pub const NVIDIACTL_MINOR: u32 = 255;
/// How long the agent waits for every GPU to answer `nvidia-smi`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum NvidiaError {
    #[error("the driver disk {0} has no readable {INFO_FILE}; rebuild the flavour with `gpucell guest build --flavour NAME --force`")]
    Info(String, #[source] std::io::Error),
    #[error("the driver disk's {INFO_FILE} is malformed: {0}")]
    BadInfo(String),
    #[error("loading {module} failed ({errno}); the kernel said:\n{nvrm}")]
    Load {
        module: String,
        errno: Errno,
        nvrm: String,
    },
    #[error("{what} failed")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the run injects the NVIDIA driver from {DRIVER_MOUNT}, but the guest has no driver disk; run with a driver flavour (`--guest nvidia-550` or `--driver 550`)")]
    NoDisk,
    #[error("/proc/devices has no `{0}` character device after loading the driver")]
    NoMajor(&'static str),
    #[error("{0}")]
    NoMinor(String),
    #[error("the GPUs {missing} did not answer nvidia-smi within {secs} s; nvidia-smi said: {smi}; the kernel said:\n{nvrm}")]
    NotReady {
        missing: String,
        secs: u64,
        smi: String,
        nvrm: String,
    },
}

pub use gpucell_protocol::driver::DriverInfo;

/// Parses and checks the driver disk's info file: every path stays on the disk.
pub fn parse_info(text: &str) -> Result<DriverInfo, NvidiaError> {
    let i: DriverInfo =
        serde_json::from_str(text).map_err(|e| NvidiaError::BadInfo(e.to_string()))?;
    let safe = |p: &str| !p.starts_with('/') && !p.split('/').any(|c| c == "..");
    let bad = i
        .modules
        .iter()
        .chain([&i.firmware_dir, &i.lib_dir, &i.bin_dir, &i.loader])
        .find(|p| !safe(p))
        .cloned();
    if let Some(bad) = bad {
        return Err(NvidiaError::BadInfo(format!(
            "path `{bad}` leaves the disk"
        )));
    }
    if i.modules.len() > 16 {
        return Err(NvidiaError::BadInfo("more than 16 modules".into()));
    }
    Ok(i)
}

/// A path on the mounted driver disk.
fn on_disk(rel: &str) -> String {
    format!("{DRIVER_MOUNT}/{rel}")
}

/// argv running a tool of the disk through the disk's own dynamic loader.
pub fn tool_argv(info: &DriverInfo, tool: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec![
        on_disk(&info.loader),
        "--library-path".into(),
        on_disk(&info.lib_dir),
        on_disk(&format!("{}/{tool}", info.bin_dir)),
    ];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// What the bring-up needs from the system.
pub trait System {
    /// Finds and mounts the driver disk on [`DRIVER_MOUNT`] (read-only); `Ok(false)`
    /// when this guest has none (a GPU-less flavour).
    fn mount_driver_disk(&mut self) -> std::io::Result<bool>;
    fn read(&mut self, path: &str) -> std::io::Result<String>;
    fn write(&mut self, path: &str, text: &str) -> std::io::Result<()>;
    fn load_module(&mut self, path: &str, params: &str) -> Result<(), Errno>;
    fn mknod_char(&mut self, path: &str, major: u32, minor: u32) -> std::io::Result<()>;
    /// Runs `argv` to completion; (success, stdout and stderr).
    fn run(&mut self, argv: &[String]) -> std::io::Result<(bool, String)>;
    /// Kernel log lines that mention the driver (`NVRM:`, `nvidia`).
    fn kernel_log(&mut self) -> Vec<String>;
    fn sleep(&mut self, d: Duration);
}

/// The NVIDIA GPUs among the passed functions (display class 0x03xx). NVSwitches
/// (0x0680) and other functions are not GPUs.
pub fn nvidia_gpus(found: &[DeviceInfo]) -> Vec<&DeviceInfo> {
    found
        .iter()
        .filter(|d| d.vendor == NVIDIA_VENDOR && d.class >> 16 == 0x03)
        .collect()
}

/// Parameters of `nvidia.ko`.
pub fn nvidia_params(gpus: usize) -> String {
    let mut p = String::from("NVreg_ModifyDeviceFiles=0");
    if gpus == 1 {
        p.push_str(" NVreg_NvLinkDisable=1");
    }
    p
}

/// Character device majors by name from `/proc/devices`.
pub fn char_major(proc_devices: &str, name: &str) -> Option<u32> {
    proc_devices
        .lines()
        .skip_while(|l| !l.starts_with("Character devices"))
        .take_while(|l| !l.starts_with("Block devices"))
        .filter_map(|l| l.trim().split_once(' '))
        .find(|(_, n)| n.trim() == name)
        .and_then(|(m, _)| m.parse().ok())
}

/// A field (`Device Minor`, `GPU UUID`, `Model`) of `/proc/driver/nvidia/gpus/<bdf>/information`.
pub fn info_field<'a>(information: &'a str, field: &str) -> Option<&'a str> {
    information.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == field).then(|| v.trim())
    })
}

/// One line of `nvidia-smi --query-gpu=pci.bus_id,name,uuid,memory.total,driver_version
/// --format=csv,noheader,nounits`.
pub fn parse_smi_line(line: &str, cuda: &str) -> Option<GpuReport> {
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    if f.len() != 5 {
        return None;
    }
    Some(GpuReport {
        bdf: normalize_bdf(f[0]),
        name: f[1].to_owned(),
        uuid: f[2].to_owned(),
        memory_mib: f[3].parse().ok()?,
        driver_version: f[4].to_owned(),
        cuda_version: cuda.to_owned(),
    })
}

/// nvidia-smi prints `00000000:01:00.0`; sysfs says `0000:01:00.0`.
pub fn normalize_bdf(s: &str) -> String {
    let s = s.to_ascii_lowercase();
    match s.split_once(':') {
        Some((dom, rest)) if dom.len() == 8 => format!("{}:{rest}", &dom[4..]),
        _ => s,
    }
}

fn nvrm_text(sys: &mut dyn System) -> String {
    let lines = sys.kernel_log();
    if lines.is_empty() {
        "(no NVRM lines in the kernel log)".into()
    } else {
        lines.join("\n")
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NvidiaError {
    let what = what.into();
    move |source| NvidiaError::Io { what, source }
}

/// [`bring_up`] on the real system, never touching the image's disk `rootfs_device`.
pub fn bring_up_for_run(
    found: &[DeviceInfo],
    rootfs_device: &str,
) -> Result<Option<DriverReport>, NvidiaError> {
    let mut sys = RealSystem {
        exclude: Some(rootfs_device.to_owned()),
    };
    let r = bring_up(&mut sys, found)?;
    if let Some(r) = &r {
        tracing::info!("{}", r.message);
    }
    Ok(r)
}

/// Mounts the driver disk (read-only, on [`DRIVER_MOUNT`]) for an injection from
/// `driver_root` when that is where the disk goes and bring-up left it unmounted (no
/// NVIDIA GPU passed); never touches the image's disk `rootfs_device`.
pub fn mount_for_injection(driver_root: &str, rootfs_device: &str) -> Result<(), NvidiaError> {
    if driver_root.trim_end_matches('/') != DRIVER_MOUNT {
        return Ok(());
    }
    let mut sys = RealSystem {
        exclude: Some(rootfs_device.to_owned()),
    };
    match sys
        .mount_driver_disk()
        .map_err(io_err("mounting the driver disk"))?
    {
        true => Ok(()),
        false => Err(NvidiaError::NoDisk),
    }
}

/// Brings the driver up for the passed functions. `Ok(None)`: not a driver flavour.
/// With no NVIDIA GPU among `found`, nothing is loaded and the report says so.
pub fn bring_up(
    sys: &mut dyn System,
    found: &[DeviceInfo],
) -> Result<Option<DriverReport>, NvidiaError> {
    let start = Instant::now();
    if !sys
        .mount_driver_disk()
        .map_err(io_err("mounting the driver disk"))?
    {
        return Ok(None);
    }
    let info_path = format!("{DRIVER_MOUNT}/{INFO_FILE}");
    let info = parse_info(
        &sys.read(&info_path)
            .map_err(|e| NvidiaError::Info(info_path, e))?,
    )?;
    let gpus = nvidia_gpus(found);
    let mut report = DriverReport {
        flavour: info.flavour.clone(),
        driver_version: info.version.clone(),
        cuda_version: info.cuda.clone(),
        gpus: Vec::new(),
        driver_ready_ms: 0,
        message: String::new(),
    };
    if gpus.is_empty() {
        let others: Vec<String> = found
            .iter()
            .map(|d| format!("{:04x}:{:04x} at {}", d.vendor, d.device, d.bdf))
            .collect();
        report.message = format!(
            "no NVIDIA GPU was passed; the {} driver was not loaded{}",
            info.version,
            if others.is_empty() {
                String::new()
            } else {
                format!(" (other functions left alone: {})", others.join(", "))
            }
        );
        return Ok(Some(report));
    }
    load_driver(sys, &info, gpus.len())?;
    make_nodes(sys, &gpus)?;
    start_persistenced(sys, &info);
    report.gpus = wait_ready(sys, &info, &gpus, READY_TIMEOUT)?;
    report.driver_ready_ms = start.elapsed().as_millis() as u64;
    report.message = format!(
        "{} GPU(s) ready with driver {}",
        report.gpus.len(),
        info.version
    );
    Ok(Some(report))
}

/// Firmware path, then the modules in the disk's order.
pub fn load_driver(
    sys: &mut dyn System,
    info: &DriverInfo,
    gpus: usize,
) -> Result<(), NvidiaError> {
    sys.write(
        "/sys/module/firmware_class/parameters/path",
        &on_disk(&info.firmware_dir),
    )
    .map_err(io_err("setting the firmware path"))?;
    for m in &info.modules {
        let params = if m.ends_with("/nvidia.ko") {
            nvidia_params(gpus)
        } else {
            String::new()
        };
        match sys.load_module(&on_disk(m), &params) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(errno) => {
                return Err(NvidiaError::Load {
                    module: m.rsplit('/').next().unwrap_or(m).to_owned(),
                    errno,
                    nvrm: nvrm_text(sys),
                })
            }
        }
    }
    Ok(())
}

/// `/dev/nvidiactl`, `/dev/nvidiaN` per GPU, `/dev/nvidia-uvm` and `-tools`.
pub fn make_nodes(sys: &mut dyn System, gpus: &[&DeviceInfo]) -> Result<Vec<String>, NvidiaError> {
    let mut made = Vec::new();
    let mut node = |sys: &mut dyn System, path: String, major, minor| {
        sys.mknod_char(&path, major, minor)
            .map_err(io_err(format!("creating {path} ({major}:{minor})")))?;
        made.push(path);
        Ok::<(), NvidiaError>(())
    };
    node(sys, "/dev/nvidiactl".into(), NVIDIA_MAJOR, NVIDIACTL_MINOR)?;
    for g in gpus {
        let p = format!("/proc/driver/nvidia/gpus/{}/information", g.bdf);
        let text = sys.read(&p).map_err(io_err(format!("reading {p}")))?;
        let minor = info_field(&text, "Device Minor")
            .and_then(|m| m.parse().ok())
            .ok_or_else(|| NvidiaError::NoMinor(format!("{p} has no `Device Minor`")))?;
        node(sys, format!("/dev/nvidia{minor}"), NVIDIA_MAJOR, minor)?;
    }
    let devices = sys
        .read("/proc/devices")
        .map_err(io_err("reading /proc/devices"))?;
    let uvm = char_major(&devices, "nvidia-uvm").ok_or(NvidiaError::NoMajor("nvidia-uvm"))?;
    node(sys, "/dev/nvidia-uvm".into(), uvm, 0)?;
    node(sys, "/dev/nvidia-uvm-tools".into(), uvm, 1)?;
    Ok(made)
}

/// Starts persistenced (it daemonizes); a failure is logged, not fatal: the GPUs work
/// without it, only slower to initialise per process.
fn start_persistenced(sys: &mut dyn System, info: &DriverInfo) {
    let argv = tool_argv(info, "nvidia-persistenced", &["--uvm-persistence-mode"]);
    match sys.run(&argv) {
        Ok((true, _)) => {}
        Ok((false, out)) => tracing::warn!("nvidia-persistenced failed: {}", out.trim()),
        Err(e) => tracing::warn!("could not start nvidia-persistenced: {e}"),
    }
}

/// Polls nvidia-smi until every GPU is listed; returns them.
fn wait_ready(
    sys: &mut dyn System,
    info: &DriverInfo,
    gpus: &[&DeviceInfo],
    timeout: Duration,
) -> Result<Vec<GpuReport>, NvidiaError> {
    let argv = tool_argv(
        info,
        "nvidia-smi",
        &[
            "--query-gpu=pci.bus_id,name,uuid,memory.total,driver_version",
            "--format=csv,noheader,nounits",
        ],
    );
    let deadline = Instant::now() + timeout;
    loop {
        let (ok, out) = sys.run(&argv).unwrap_or_else(|e| (false, e.to_string()));
        let listed: Vec<GpuReport> = out
            .lines()
            .filter_map(|l| parse_smi_line(l, &info.cuda))
            .collect();
        let missing: Vec<&str> = gpus
            .iter()
            .filter(|g| !listed.iter().any(|l| l.bdf == g.bdf))
            .map(|g| g.bdf.as_str())
            .collect();
        if ok && missing.is_empty() {
            return Ok(listed);
        }
        if Instant::now() >= deadline {
            return Err(NvidiaError::NotReady {
                missing: missing.join(", "),
                secs: timeout.as_secs(),
                smi: out.trim().chars().take(1000).collect(),
                nvrm: nvrm_text(sys),
            });
        }
        sys.sleep(Duration::from_millis(250));
    }
}

/// Marker of the self-test's result line on the console.
pub const SELF_TEST_MARKER: &str = "gpucell-driver-test: ";

/// One module of the self-test.
pub use gpucell_protocol::driver::{ModuleResult, SelfTestReport as SelfTest, ToolResult};

/// `vermagic=` of a module file (its `.modinfo` strings).
pub fn vermagic(ko: &[u8]) -> String {
    const KEY: &[u8] = b"vermagic=";
    ko.windows(KEY.len())
        .position(|w| w == KEY)
        .map(|i| {
            let rest = &ko[i + KEY.len()..];
            let end = rest
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(rest.len())
                .min(256);
            String::from_utf8_lossy(&rest[..end]).trim().to_owned()
        })
        .unwrap_or_default()
}

fn tool(sys: &mut dyn System, argv: &[String]) -> ToolResult {
    match sys.run(argv) {
        Ok((ok, out)) => ToolResult {
            ok,
            output: out.chars().take(8000).collect(),
        },
        Err(e) => ToolResult {
            ok: false,
            output: format!(
                "could not run {}: {e}",
                argv.first().map_or("", |s| s.as_str())
            ),
        },
    }
}

/// The driver check of `gpucell guest test`: with NVIDIA GPUs passed, the full
/// bring-up; without, every module is loaded anyway, so a GPU-less machine still shows
/// whether they fit the kernel (the driver must end in ENODEV, "No NVIDIA GPU found").
pub fn check(sys: &mut dyn System, found: &[DeviceInfo], kernel: &str) -> SelfTest {
    let mut t = SelfTest {
        flavour: String::new(),
        version: String::new(),
        built_for: String::new(),
        kernel: kernel.to_owned(),
        modules: Vec::new(),
        kernel_log: Vec::new(),
        device_nodes: Vec::new(),
        nvidia_smi: ToolResult {
            ok: false,
            output: String::new(),
        },
        cuda: ToolResult {
            ok: false,
            output: String::new(),
        },
        driver: None,
        error: None,
    };
    let info = match sys.mount_driver_disk() {
        Ok(true) => {
            let p = format!("{DRIVER_MOUNT}/{INFO_FILE}");
            sys.read(&p)
                .map_err(|e| NvidiaError::Info(p, e))
                .and_then(|t| parse_info(&t))
        }
        Ok(false) => Err(NvidiaError::BadInfo(
            "this guest has no driver disk (not a driver flavour)".into(),
        )),
        Err(e) => Err(NvidiaError::Io {
            what: "mounting the driver disk".into(),
            source: e,
        }),
    };
    let info = match info {
        Ok(i) => i,
        Err(e) => {
            t.error = Some(e.to_string());
            return t;
        }
    };
    t.flavour = info.flavour.clone();
    t.version = info.version.clone();
    t.built_for = info.kernel_release.clone();
    if !nvidia_gpus(found).is_empty() {
        match bring_up(sys, found) {
            Ok(r) => t.driver = r,
            Err(e) => t.error = Some(e.to_string()),
        }
    } else {
        force_load(sys, &info, &mut t);
    }
    t.kernel_log = sys.kernel_log();
    for n in ["nvidiactl", "nvidia0", "nvidia-uvm", "nvidia-uvm-tools"] {
        let p = format!("/dev/{n}");
        if Path::new(&p).exists() {
            t.device_nodes.push(p);
        }
    }
    t.nvidia_smi = tool(sys, &tool_argv(&info, "nvidia-smi", &[]));
    let libcuda = on_disk(&format!("{}/libcuda.so.1", info.lib_dir));
    t.cuda = tool(sys, &tool_argv(&info, "gpucell-cuda-version", &[&libcuda]));
    t
}

/// Loads every module of the disk with no GPU present, recording each outcome.
fn force_load(sys: &mut dyn System, info: &DriverInfo, t: &mut SelfTest) {
    let _ = sys.write(
        "/sys/module/firmware_class/parameters/path",
        &on_disk(&info.firmware_dir),
    );
    let mut nvidia_failed = false;
    for m in &info.modules {
        let path = on_disk(m);
        let name = m.rsplit('/').next().unwrap_or(m).to_owned();
        let magic = std::fs::read(&path)
            .map(|d| vermagic(&d))
            .unwrap_or_default();
        let result = if nvidia_failed && name != "drm.ko" {
            "skipped: nvidia.ko is not loaded".to_owned()
        } else {
            let params = if name == "nvidia.ko" {
                nvidia_params(0)
            } else {
                String::new()
            };
            match sys.load_module(&path, &params) {
                Ok(()) => "loaded".to_owned(),
                Err(Errno::EEXIST) => "already loaded".to_owned(),
                Err(e) => {
                    nvidia_failed |= name == "nvidia.ko";
                    format!("{e:?}")
                }
            }
        };
        t.modules.push(ModuleResult {
            module: name,
            vermagic: magic,
            result,
        });
    }
}

/// Runs [`check`] on the real system and prints its JSON line on the console.
pub fn self_test() {
    let mut sys = RealSystem { exclude: None };
    let found = crate::devices::scan(Path::new("/sys/bus/pci/devices"));
    let kernel = crate::session::kernel_release();
    let t = check(&mut sys, &found, &kernel);
    let line = serde_json::to_string(&t).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\n{SELF_TEST_MARKER}{line}");
    let _ = out.flush();
}

/// The real system.
pub struct RealSystem {
    /// A block device never to mount (the image's root filesystem).
    pub exclude: Option<String>,
}

/// erofs superblock magic at byte 1024.
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;

impl RealSystem {
    fn is_erofs(dev: &str) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let mut b = [0u8; 4];
        std::fs::File::open(dev)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(1024))?;
                f.read_exact(&mut b)
            })
            .is_ok()
            && u32::from_le_bytes(b) == EROFS_MAGIC
    }
}

impl System for RealSystem {
    fn mount_driver_disk(&mut self) -> std::io::Result<bool> {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        if Path::new(DRIVER_MOUNT).join(INFO_FILE).is_file() {
            return Ok(true);
        }
        std::fs::create_dir_all(DRIVER_MOUNT)?;
        let mut names: Vec<String> = std::fs::read_dir("/sys/block")?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("vd"))
            .collect();
        names.sort();
        for n in names {
            let dev = format!("/dev/{n}");
            if self.exclude.as_deref() == Some(dev.as_str()) || !Self::is_erofs(&dev) {
                continue;
            }
            let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            if mount(
                Some(dev.as_str()),
                DRIVER_MOUNT,
                Some("erofs"),
                flags,
                None::<&str>,
            )
            .is_err()
            {
                continue;
            }
            if Path::new(DRIVER_MOUNT).join(INFO_FILE).is_file() {
                return Ok(true);
            }
            let _ = umount2(DRIVER_MOUNT, MntFlags::MNT_DETACH);
        }
        Ok(false)
    }

    fn read(&mut self, path: &str) -> std::io::Result<String> {
        use std::io::Read;
        let mut s = String::new();
        std::fs::File::open(path)?
            .take(1 << 20)
            .read_to_string(&mut s)?;
        Ok(s)
    }

    fn write(&mut self, path: &str, text: &str) -> std::io::Result<()> {
        std::fs::write(path, text)
    }

    fn load_module(&mut self, path: &str, params: &str) -> Result<(), Errno> {
        use std::os::fd::AsFd;
        let f = std::fs::File::open(path)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let p = std::ffi::CString::new(params).map_err(|_| Errno::EINVAL)?;
        nix::kmod::finit_module(f.as_fd(), &p, nix::kmod::ModuleInitFlags::empty())
    }

    fn mknod_char(&mut self, path: &str, major: u32, minor: u32) -> std::io::Result<()> {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        let _ = std::fs::remove_file(path);
        mknod(
            path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major.into(), minor.into()),
        )
        .map_err(std::io::Error::from)?;
        // mknod honours the umask; the driver's default mode is 0666.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
    }

    fn run(&mut self, argv: &[String]) -> std::io::Result<(bool, String)> {
        let Some((bin, args)) = argv.split_first() else {
            return Err(std::io::ErrorKind::InvalidInput.into());
        };
        let _ = std::fs::create_dir_all("/var");
        let _ = std::os::unix::fs::symlink("/run", "/var/run");
        let out = std::process::Command::new(bin)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(std::process::Stdio::null())
            .output()?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), text))
    }

    fn kernel_log(&mut self) -> Vec<String> {
        read_kmsg()
            .into_iter()
            .filter(|l| l.contains("NVRM") || l.contains("nvidia"))
            .take(64)
            .collect()
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// The kernel log so far (`/dev/kmsg`, non-blocking), message text only.
pub fn read_kmsg() -> Vec<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    // One record per read; EAGAIN at the end; EPIPE when records were overwritten.
    for _ in 0..20_000 {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                if let Some((_, msg)) = rec.split_once(';') {
                    out.push(msg.lines().next().unwrap_or("").to_owned());
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
