//! `gpucell-agent container-test`: the agent's own container setup run outside a VM, on a
//! machine whose NVIDIA driver is loaded (the GPU test harness, `make test-gpu`,
//! docs/cuda.md). Hidden: PID 1 never takes this path.
//!
//! ```text
//! gpucell-agent container-test --rootfs DIR [--driver-root DIR] [--env K=V]...
//!     [--gpus] [--force] [--cuda-version V | --cuda-probe PROG [ARG]...  --]
//!     [--dev DIR] [--proc-gpus DIR] [--params FILE] [--spec-out FILE] [--work DIR]
//!     [--user U] [--timeout SECS] -- CMD [ARG]...
//! ```
//!
//! In a private mount namespace of its own (every mount goes with the process): a tmpfs
//! work directory, the root directory bound read-only under the agent's tmpfs overlay
//! (`container::mount_dir_rootfs`), the CDI spec generated from the driver root, `/dev` and
//! the driver's GPUs, the run's `NVIDIA_*` environment decided as the toolkit does, the
//! injection (`inject` phase 1; phase 2 in the workload's child), the image's
//! `NVIDIA_REQUIRE_*` checked, then CMD in the container's namespaces with its output
//! passed through. Last, one JSON line `{"container_test":{…}}` with what was done and the
//! timings in milliseconds.
//!
//! The driver's CUDA version for the requirements: `--cuda-version V`, or `--cuda-probe
//! PROG…`: a program run first in the same container (same injection and environment)
//! that prints `cuda_driver_version=N` (`cuDriverGetVersion`) and, per visible GPU,
//! `gpu=CC NAME` (compute capability, name). The agent is static, and a static binary
//! cannot `dlopen` the driver's libcuda, so the call is made by a dynamic program of the
//! image, the way the workload itself will load the driver (`tests/gpu/cuda/cuprobe.c`).

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpucell_protocol::{GpuFacts, GpuInjection, RootfsSpec, RunSpec};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};

use crate::container::{self, Layout};
use crate::gpu_setup::{self, Paths};
use crate::inject::{self, DeviceSetup, RealOps};

/// The subcommand's name (`gpucell-agent container-test …`).
pub const SUBCOMMAND: &str = "container-test";
/// Exit codes of the harness itself (else the workload's).
const EXIT_USAGE: i32 = 2;
const EXIT_SETUP: i32 = 125;
const EXIT_REFUSED: i32 = 126;

type AnyError = Box<dyn std::error::Error>;

/// The command line.
#[derive(Debug, Default)]
struct Args {
    rootfs: PathBuf,
    driver_root: PathBuf,
    env: Vec<String>,
    gpus: bool,
    force: bool,
    cuda_version: Option<String>,
    cuda_probe: Vec<String>,
    dev: PathBuf,
    proc_gpus: PathBuf,
    params: PathBuf,
    spec_out: Option<PathBuf>,
    work: Option<PathBuf>,
    user: String,
    timeout: Duration,
    cmd: Vec<String>,
}

fn parse(mut it: impl Iterator<Item = OsString>) -> Result<Args, String> {
    let guest = Paths::guest();
    let mut a = Args {
        driver_root: "/".into(),
        dev: guest.dev,
        proc_gpus: guest.proc_gpus,
        params: guest.params,
        timeout: Duration::from_secs(300),
        ..Default::default()
    };
    let mut next = |flag: &str| -> Result<String, String> {
        it.next()
            .and_then(|v| v.into_string().ok())
            .ok_or_else(|| format!("{flag} needs a value"))
    };
    loop {
        let flag = next("the command line")
            .map_err(|_| "no `-- CMD` given: the command to run in the container".to_owned())?;
        match flag.as_str() {
            "--rootfs" => a.rootfs = next(&flag)?.into(),
            "--driver-root" => a.driver_root = next(&flag)?.into(),
            "--env" => a.env.push(next(&flag)?),
            "--gpus" => a.gpus = true,
            "--force" => a.force = true,
            "--cuda-version" => a.cuda_version = Some(next(&flag)?),
            "--cuda-probe" => loop {
                match next(&flag)? {
                    end if end == "--" => break,
                    arg => a.cuda_probe.push(arg),
                }
            },
            "--dev" => a.dev = next(&flag)?.into(),
            "--proc-gpus" => a.proc_gpus = next(&flag)?.into(),
            "--params" => a.params = next(&flag)?.into(),
            "--spec-out" => a.spec_out = Some(next(&flag)?.into()),
            "--work" => a.work = Some(next(&flag)?.into()),
            "--user" => a.user = next(&flag)?,
            "--timeout" => {
                let v = next(&flag)?;
                let secs: u64 = v.parse().map_err(|_| format!("--timeout `{v}`: seconds"))?;
                a.timeout = Duration::from_secs(secs.clamp(1, 3600));
            }
            "--" => break,
            other => return Err(format!("unknown argument `{other}` (see docs/cuda.md)")),
        }
    }
    while let Ok(arg) = next("") {
        a.cmd.push(arg);
    }
    if a.rootfs.as_os_str().is_empty() || a.cmd.is_empty() {
        return Err("--rootfs DIR and `-- CMD` are required".into());
    }
    Ok(a)
}

/// Runs the subcommand when `argv[1]` names it; returns the exit code.
pub fn main_if_asked() -> Option<i32> {
    let mut argv = std::env::args_os().skip(1);
    if argv.next()? != SUBCOMMAND {
        return None;
    }
    let args = match parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpucell-agent {SUBCOMMAND}: {e}");
            return Some(EXIT_USAGE);
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("gpucell-agent {SUBCOMMAND}: needs root (namespaces, mounts, device nodes)");
        return Some(EXIT_USAGE);
    }
    Some(run(&args))
}

/// What the run did, printed as the last JSON line.
#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    rootfs: String,
    overlay: bool,
    injected: bool,
    visible_devices: Option<String>,
    driver_version: Option<String>,
    cuda_version: Option<String>,
    gpus: Vec<GpuFacts>,
    libraries: usize,
    binaries: usize,
    mounts: usize,
    links: usize,
    ldconfig: Option<String>,
    device_nodes: Vec<String>,
    warnings: Vec<String>,
    refused: Option<String>,
    error: Option<String>,
    exit_code: Option<i32>,
    rootfs_ms: f64,
    cdi_ms: f64,
    inject_ms: f64,
    probe_ms: f64,
    start_ms: f64,
    run_ms: f64,
    total_ms: f64,
}

fn ms(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

fn run(a: &Args) -> i32 {
    let started = Instant::now();
    let mut s = Summary {
        rootfs: a.rootfs.display().to_string(),
        ..Default::default()
    };
    let work = a.work.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("gpucell-container-test.{}", std::process::id()))
    });
    let code = match setup_and_run(a, &work, &mut s) {
        Ok(code) => code,
        Err(Failure::Refused(msg)) => {
            eprintln!("gpucell-agent {SUBCOMMAND}: refused: {msg}");
            s.refused = Some(msg);
            EXIT_REFUSED
        }
        Err(Failure::Error(e)) => {
            let msg = crate::chain(&*e);
            eprintln!("gpucell-agent {SUBCOMMAND}: {msg}");
            s.error = Some(msg);
            EXIT_SETUP
        }
    };
    // Every mount is in this process's namespace; the work directory itself is ours.
    let _ = umount2(&work, MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&work);
    s.total_ms = ms(started);
    let line = serde_json::json!({ "container_test": s });
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    code
}

enum Failure {
    Refused(String),
    Error(AnyError),
}

impl<E: std::error::Error + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Error(Box::new(e))
    }
}

fn step(what: &str) {
    eprintln!("container-test: {what}");
}

/// A private mount namespace and a tmpfs on `work`.
fn private_work(work: &Path) -> Result<Layout, Failure> {
    let none = None::<&str>;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| sys("unshare of a mount namespace", e))?;
    // A kernel without mount propagation (EINVAL) has nothing to keep private.
    match mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none) {
        Ok(()) => {}
        Err(Errno::EINVAL) => step("WARNING: making mounts private: EINVAL; going on"),
        Err(e) => return Err(sys("making mounts private", e)),
    }
    fs::create_dir_all(work).map_err(|e| io_failure(work, e))?;
    mount(
        Some("tmpfs"),
        work,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| sys("mounting the work tmpfs", e))?;
    Ok(Layout::under(work))
}

fn sys(what: &str, e: Errno) -> Failure {
    Failure::Error(format!("{what}: {e}").into())
}

fn io_failure(p: &Path, e: std::io::Error) -> Failure {
    Failure::Error(format!("{}: {e}", p.display()).into())
}

/// The root: the overlay over a read-only bind of the directory, or, where the kernel
/// has no overlay (said so), a writable bind of the directory itself.
fn mount_root(a: &Args, layout: &Layout, s: &mut Summary) -> Result<PathBuf, Failure> {
    let t = Instant::now();
    step(&format!(
        "root: {} read-only under a tmpfs overlay",
        a.rootfs.display()
    ));
    let root = match container::mount_dir_rootfs(&a.rootfs, layout, None) {
        Ok(root) => {
            s.overlay = true;
            root
        }
        Err(e) => {
            let w = format!(
                "the overlay failed ({}); the directory is bound writable instead and the \
                 injection changes it",
                crate::chain(&e)
            );
            step(&format!("WARNING: {w}"));
            s.warnings.push(w);
            let _ = fs::create_dir_all(&layout.root);
            let none = None::<&str>;
            let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
            mount(Some(&a.rootfs), &layout.root, none, flags, none)
                .map_err(|e| sys("binding the root directory", e))?;
            layout.root.clone()
        }
    };
    s.rootfs_ms = ms(t);
    Ok(root)
}

fn setup_and_run(a: &Args, work: &Path, s: &mut Summary) -> Result<i32, Failure> {
    let layout = private_work(work)?;
    let root = mount_root(a, &layout, s)?;
    let paths = Paths {
        dev: a.dev.clone(),
        proc_gpus: a.proc_gpus.clone(),
        params: a.params.clone(),
        state_dir: work.join("state"),
    };
    let req = GpuInjection {
        gpus_requested: a.gpus,
        force: a.force,
        ..Default::default()
    };
    let env = gpu_setup::image_env(&a.env, &req);
    let devices = match gpu_setup::decide(&env, &req)? {
        None => {
            step(
                "no injection: NVIDIA_VISIBLE_DEVICES is void, or no NVIDIA variable and no --gpus",
            );
            None
        }
        Some(injection) => {
            s.injected = true;
            s.visible_devices = Some(format!("{:?}", injection.visible));
            Some(inject_driver(a, &root, &paths, &env, &injection, s)?)
        }
    };
    step(&format!("running {:?}", a.cmd));
    let (status, _) = run_in_container(a, &root, &a.cmd, devices.as_ref(), false, s)?;
    s.exit_code = Some(status);
    Ok(status)
}

/// Spec, requirements, phase 1; returns what the child makes.
fn inject_driver(
    a: &Args,
    root: &Path,
    paths: &Paths,
    env: &gpucell_nvidia::ImageEnv,
    injection: &gpucell_nvidia::Injection,
    s: &mut Summary,
) -> Result<DeviceSetup, Failure> {
    let t = Instant::now();
    step(&format!(
        "CDI spec from driver root {} (nodes in {}, GPUs from {})",
        a.driver_root.display(),
        paths.dev.display(),
        paths.proc_gpus.display()
    ));
    let generated = gpu_setup::generate_spec(&a.driver_root, paths)?;
    s.cdi_ms = ms(t);
    s.driver_version = Some(generated.driver_version.clone());
    s.libraries = generated.libraries.len();
    s.binaries = generated.binaries.len();
    s.warnings.extend(generated.warnings.iter().cloned());
    step(&format!(
        "driver {}: {} libraries, {} binaries, devices {:?}",
        generated.driver_version,
        s.libraries,
        s.binaries,
        generated
            .spec
            .devices
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
    ));
    if let Some(out) = &a.spec_out {
        fs::write(out, generated.spec.to_json()).map_err(|e| io_failure(out, e))?;
    }
    if let Some(cuda) = &a.cuda_version {
        s.cuda_version = Some(cuda.clone());
        check(env, &generated.driver_version, cuda, &[], s)?;
    }
    let opts = inject::Options {
        compat_allowed: true,
        params_source: paths.params.clone(),
        state_dir: paths.state_dir.clone(),
    };
    step("injecting (plan, mounts, links, ldconfig)");
    let injected = gpu_setup::inject_root(&generated.spec, injection, root, &opts, &mut RealOps)?;
    report_injection(&injected, s);
    if a.cuda_version.is_none() && !a.cuda_probe.is_empty() {
        let (cuda, gpus) = probe(a, root, &injected.devices, s)?;
        s.cuda_version = Some(cuda.clone());
        s.gpus = gpus.clone();
        check(env, &generated.driver_version, &cuda, &gpus, s)?;
    } else if a.cuda_version.is_none() {
        let w = "no --cuda-version or --cuda-probe: NVIDIA_REQUIRE_* not checked".to_owned();
        step(&format!("WARNING: {w}"));
        s.warnings.push(w);
    }
    Ok(injected.devices)
}

fn report_injection(injected: &gpu_setup::Injected, s: &mut Summary) {
    let r = &injected.report;
    s.inject_ms = (injected.inject_ms * 1e3).round() / 1e3;
    s.mounts = r.mounts;
    s.links = r.links;
    s.ldconfig = r.ldconfig.clone();
    s.device_nodes = r
        .devices
        .nodes
        .iter()
        .map(|(p, a, b)| format!("{p} c {a}:{b}"))
        .collect();
    s.warnings.extend(r.warnings.iter().cloned());
    step(&format!(
        "injected in {:.1} ms: {} mounts into {}, {} links, ldconfig {:?}, compat {:?}, nodes {:?}, params copy {:?}",
        injected.inject_ms,
        r.mounts,
        r.lib_dir,
        r.links,
        r.ldconfig,
        r.compat,
        s.device_nodes,
        r.devices.params
    ));
    for w in &r.warnings {
        step(&format!("WARNING: {w}"));
    }
}

fn check(
    env: &gpucell_nvidia::ImageEnv,
    driver: &str,
    cuda: &str,
    gpus: &[GpuFacts],
    s: &mut Summary,
) -> Result<(), Failure> {
    step(&format!(
        "requirements against driver {driver}, CUDA {cuda}, GPUs {gpus:?}"
    ));
    match gpu_setup::check_requirements(env, driver, cuda, gpus) {
        Ok(()) => Ok(()),
        Err(e @ gpu_setup::GpuSetupError::Unsatisfied { .. }) => {
            s.cuda_version = Some(cuda.to_owned());
            Err(Failure::Refused(e.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs the CUDA probe in the container; its `cuda_driver_version=N` and `gpu=CC NAME`.
fn probe(
    a: &Args,
    root: &Path,
    devices: &DeviceSetup,
    s: &mut Summary,
) -> Result<(String, Vec<GpuFacts>), Failure> {
    let t = Instant::now();
    step(&format!("CUDA probe {:?}", a.cuda_probe));
    let (code, out) = run_in_container(a, root, &a.cuda_probe, Some(devices), true, s)?;
    s.probe_ms = ms(t);
    let text = String::from_utf8_lossy(&out);
    for line in text.lines() {
        step(&format!("probe: {line}"));
    }
    parse_probe(&text).ok_or_else(|| {
        Failure::Error(
            format!(
                "the CUDA probe (exit {code}) printed no `cuda_driver_version=N`: the driver's \
                 CUDA version is unknown, so NVIDIA_REQUIRE_* cannot be checked"
            )
            .into(),
        )
    })
}

/// `cuda_driver_version=13000` and `gpu=9.0 NVIDIA H200` lines.
fn parse_probe(text: &str) -> Option<(String, Vec<GpuFacts>)> {
    let mut cuda = None;
    let mut gpus = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.trim().strip_prefix("cuda_driver_version=") {
            cuda = v.parse::<u32>().ok().filter(|v| *v > 0);
        } else if let Some(g) = line.trim().strip_prefix("gpu=") {
            let (cc, name) = g.split_once(' ').unwrap_or((g, ""));
            gpus.push(GpuFacts {
                arch: cc.to_owned(),
                brand: gpucell_nvidia::gpu::nvml_brand(name).to_owned(),
            });
        }
    }
    Some((gpu_setup::cuda_version_of(cuda?), gpus))
}

/// Runs `cmd` in the container on `root`; returns its exit code (128 + signal) and, with
/// `capture`, its stdout (else passed through). Killed after the timeout.
fn run_in_container(
    a: &Args,
    root: &Path,
    cmd: &[String],
    devices: Option<&DeviceSetup>,
    capture: bool,
    s: &mut Summary,
) -> Result<(i32, Vec<u8>), Failure> {
    let spec = RunSpec {
        args: cmd.to_vec(),
        env: a.env.clone(),
        cwd: "/".into(),
        user: a.user.clone(),
        hostname: "gpucell-test".into(),
        rootfs: RootfsSpec {
            device: String::new(),
            fstype: String::new(),
        },
        overlay_bytes: None,
        devices: vec![],
        device_wait_ms: 0,
        gpu: None,
        pod_sandbox: false,
        etc_files: Vec::new(),
        terminal: false,
        window: None,
        volumes: Vec::new(),
    };
    let prepared = container::prepare(root, &spec)?.with_devices(devices.cloned());
    let t = Instant::now();
    let (pid, stdio) = container::spawn(&prepared)?;
    if !capture {
        s.start_ms = ms(t);
    }
    drop(stdio.stdin);
    let deadline = Instant::now() + a.timeout;
    let captured = pump([Some(stdio.stdout), stdio.stderr], capture, deadline, pid)?;
    let code = match waitpid(pid, None) {
        Ok(WaitStatus::Exited(_, c)) => c,
        Ok(WaitStatus::Signaled(_, sig, _)) => 128 + sig as i32,
        Ok(_) => 255,
        Err(e) => return Err(sys("waiting for the workload", e)),
    };
    if !capture {
        s.run_ms = ms(t);
    }
    Ok((code, captured))
}

/// Passes the workload's output through (or captures stdout) until both pipes close;
/// kills it at `deadline`.
fn pump(
    outs: [Option<OwnedFd>; 2],
    capture: bool,
    deadline: Instant,
    pid: nix::unistd::Pid,
) -> Result<Vec<u8>, Failure> {
    let mut open = outs;
    let mut captured = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut killed = false;
    while open.iter().any(Option::is_some) {
        if !killed && Instant::now() >= deadline {
            eprintln!("container-test: timeout: killing the workload");
            let _ = kill(pid, Signal::SIGKILL);
            killed = true;
        }
        let mut fds: Vec<PollFd> = open
            .iter()
            .flatten()
            .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(sys("poll", e)),
        }
        drop(fds);
        for (n, slot) in open.iter_mut().enumerate() {
            let Some(fd) = slot.as_ref() else { continue };
            match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                Ok(0) => *slot = None,
                Ok(k) if n == 0 && capture => captured.extend_from_slice(&buf[..k]),
                Ok(k) if n == 0 => {
                    let _ = std::io::stdout().write_all(&buf[..k]);
                    let _ = std::io::stdout().flush();
                }
                Ok(k) => {
                    let _ = std::io::stderr().write_all(&buf[..k]);
                }
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(_) => *slot = None,
            }
        }
    }
    Ok(captured)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(OsString::from))
    }

    #[test]
    fn the_command_line() {
        let a = args(&[
            "--rootfs",
            "/r",
            "--env",
            "A=1",
            "--gpus",
            "--cuda-probe",
            "/cuprobe",
            "-v",
            "--",
            "--timeout",
            "9",
            "--",
            "nvidia-smi",
            "-L",
        ])
        .unwrap();
        assert_eq!(a.rootfs, PathBuf::from("/r"));
        assert_eq!(a.env, ["A=1"]);
        assert!(a.gpus && !a.force);
        assert_eq!(a.cuda_probe, ["/cuprobe", "-v"]);
        assert_eq!(a.timeout, Duration::from_secs(9));
        assert_eq!(a.cmd, ["nvidia-smi", "-L"]);
        assert_eq!(a.driver_root, PathBuf::from("/"));
        assert!(args(&["--rootfs", "/r"]).unwrap_err().contains("-- CMD"));
        assert!(args(&["--rootfs", "/r", "--"]).is_err());
        assert!(args(&["--bogus"]).unwrap_err().contains("`--bogus`"));
        assert!(args(&["--rootfs"]).unwrap_err().contains("needs a value"));
    }

    #[test]
    fn the_probe_output() {
        let (cuda, gpus) =
            parse_probe("cuda_driver_version=13000\ngpu=9.0 NVIDIA H200\nnoise\n").unwrap();
        assert_eq!(cuda, "13.0");
        assert_eq!(
            gpus,
            [GpuFacts {
                arch: "9.0".into(),
                brand: "NVIDIA".into()
            }]
        );
        assert!(parse_probe("cuda_driver_version=0\n").is_none());
        assert!(parse_probe("nothing\n").is_none());
    }
}
