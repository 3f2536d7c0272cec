//! What a session does to the guest besides talking to the host: find the PCI functions
//! the run expects, start the workload, learn when it exits, signal it. [`Workload`] is
//! the seam; [`Pid1`] is the real thing (the container in its namespaces, children seen
//! through a SIGCHLD signalfd); the session's tests pass a plain child process instead.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use gpucell_protocol::{DeviceInfo, DeviceMatch, ExitStatus, ProcSpec, RunSpec};
use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::container::{self, ContainerError, Stdio};
use crate::devices;
use crate::gpu_setup;
use crate::inject::{DeviceSetup, RealOps};

/// Where the guest kernel lists its PCI functions.
const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// Where the containers added to the pod are mounted, each under its id.
const POD_DIR: &str = "/mnt/pod";
/// Where the first container's content volumes are written (an added container's are
/// under its own directory of [`POD_DIR`]).
const VOLUMES_DIR: &str = "/mnt/volumes";

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu_setup::GpuSetupError),
    #[error("{0} failed")]
    Sys(&'static str, #[source] Errno),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
}

/// The guest side of one run, as the session drives it.
pub trait Workload {
    /// Waits up to `wait` for every wanted PCI function; returns the functions that
    /// match and the wanted ids still missing.
    fn wait_for_devices(
        &mut self,
        wanted: &[DeviceMatch],
        wait: Duration,
    ) -> (Vec<DeviceInfo>, Vec<DeviceMatch>);

    /// Starts the workload of `spec`. Returns its pid and the agent's ends of its stdio,
    /// non-blocking.
    fn start(&mut self, spec: &RunSpec) -> Result<(Pid, Stdio), WorkloadError>;

    /// Starts an exec in the running container whose first process is `target`: the
    /// same namespaces and root, the user, environment and working directory of `spec`.
    fn exec(&mut self, target: Pid, spec: &ProcSpec) -> Result<(Pid, Stdio), WorkloadError>;

    /// Starts a second container of the pod from its own disk (`spec.rootfs`), mounted
    /// apart from the others under a directory named after `id`.
    fn add_container(&mut self, id: u32, spec: &RunSpec) -> Result<(Pid, Stdio), WorkloadError>;

    /// The added container `id` has ended: its mounts come off (its overlay's memory is
    /// freed and its disk is no longer in use, so the host may unplug it).
    fn remove_container(&mut self, id: u32);

    /// Polls readable when a child may have exited; [`Workload::reap`] clears it.
    fn exit_fd(&self) -> BorrowedFd<'_>;

    /// Reaps every exited child; returns their pids and statuses (orphans included: the
    /// session ignores pids it did not start).
    fn reap(&mut self) -> Vec<(Pid, ExitStatus)>;

    /// Sends `signal` to `pid`, a process the session started and has not seen exit
    /// (best effort: it may have exited since).
    fn kill(&mut self, pid: Pid, signal: Signal);

    /// Brings up the guest's NVIDIA driver for the NVIDIA functions among `found` (a
    /// driver flavour's disk is found among the block devices other than
    /// `rootfs_device`); `None` when there is nothing to bring up. Workloads without a
    /// driver (the tests' plain processes) keep this default.
    fn bring_up_driver(
        &mut self,
        _found: &[DeviceInfo],
        _rootfs_device: &str,
    ) -> Result<Option<gpucell_protocol::DriverReport>, crate::nvidia::NvidiaError> {
        Ok(None)
    }
}

/// The workload as PID 1 runs it: the image's container, every orphan of the guest
/// reaped on the way.
pub struct Pid1 {
    sigfd: SignalFd,
}

impl Pid1 {
    /// Blocks SIGCHLD and opens a signalfd for it, so that poll sees child exits.
    pub fn new() -> Result<Self, WorkloadError> {
        Ok(Self {
            sigfd: sigchld_fd()?,
        })
    }
}

impl Workload for Pid1 {
    fn bring_up_driver(
        &mut self,
        found: &[DeviceInfo],
        rootfs_device: &str,
    ) -> Result<Option<gpucell_protocol::DriverReport>, crate::nvidia::NvidiaError> {
        crate::nvidia::bring_up_for_run(found, rootfs_device)
    }

    fn wait_for_devices(
        &mut self,
        wanted: &[DeviceMatch],
        wait: Duration,
    ) -> (Vec<DeviceInfo>, Vec<DeviceMatch>) {
        devices::wait_for(Path::new(PCI_DEVICES), wanted, wait)
    }

    fn start(&mut self, spec: &RunSpec) -> Result<(Pid, Stdio), WorkloadError> {
        if let Some(req) = &spec.gpu {
            crate::nvidia::mount_for_injection(&req.driver_root, &spec.rootfs.device)
                .map_err(gpu_setup::GpuSetupError::DriverDisk)?;
        }
        if spec.pod_sandbox {
            // The pod's containers come later (`ContainerAdd`), each on its own disk,
            // with the driver mounted above.
            return Ok(container::spawn_holder()?);
        }
        let root = container::mount_rootfs(spec)?;
        crate::net::install_resolv_conf(&root)?;
        crate::net::install_etc_files(&root, &spec.etc_files)?;
        let volumes = stage_volumes(spec, &Path::new(VOLUMES_DIR).join("main"))?;
        let devices = inject_driver(&root, spec)?;
        let prepared = container::prepare(&root, spec)?
            .with_devices(devices)
            .with_volumes(volumes);
        Ok(container::spawn(&prepared)?)
    }

    fn exec(&mut self, target: Pid, spec: &ProcSpec) -> Result<(Pid, Stdio), WorkloadError> {
        Ok(container::spawn_exec(target, spec)?)
    }

    fn add_container(&mut self, id: u32, spec: &RunSpec) -> Result<(Pid, Stdio), WorkloadError> {
        let layout = container::Layout::under(&Path::new(POD_DIR).join(id.to_string()));
        let root = container::mount_rootfs_at(spec, &layout)?;
        crate::net::install_resolv_conf(&root)?;
        crate::net::install_etc_files(&root, &spec.etc_files)?;
        let own = Path::new(POD_DIR).join(id.to_string()).join("volumes");
        let volumes = stage_volumes(spec, &own)?;
        let devices = inject_driver(&root, spec)?;
        let prepared = container::prepare(&root, spec)?
            .with_devices(devices)
            .with_volumes(volumes);
        Ok(container::spawn(&prepared)?)
    }

    fn remove_container(&mut self, id: u32) {
        let layout = container::Layout::under(&Path::new(POD_DIR).join(id.to_string()));
        container::unmount_layout(&layout);
        let _ = std::fs::remove_dir_all(Path::new(POD_DIR).join(id.to_string()));
    }

    fn exit_fd(&self) -> BorrowedFd<'_> {
        self.sigfd.as_fd()
    }

    fn reap(&mut self) -> Vec<(Pid, ExitStatus)> {
        while let Ok(Some(_)) = self.sigfd.read_signal() {}
        reap()
    }

    fn kill(&mut self, pid: Pid, signal: Signal) {
        let _ = kill(pid, signal);
    }
}

/// The NVIDIA driver's files and device nodes for the container at `root`, as the
/// image's environment contract and the host's injection decide (docs/cuda.md); the
/// driver disk is already mounted.
fn inject_driver(root: &Path, spec: &RunSpec) -> Result<Option<DeviceSetup>, WorkloadError> {
    let Some(req) = &spec.gpu else {
        return Ok(None);
    };
    let paths = gpu_setup::Paths::guest();
    Ok(gpu_setup::prepare(root, &spec.env, req, &paths, &mut RealOps)?.map(|i| i.devices))
}

/// Writes the content volumes of `spec` under `own` and mounts its emptyDirs (each a
/// tmpfs as large as the container's writable layer may grow): the binds its child makes.
fn stage_volumes(spec: &RunSpec, own: &Path) -> Result<Vec<container::VolumeMount>, WorkloadError> {
    Ok(container::stage_volumes(
        &spec.volumes,
        own,
        Path::new(container::EMPTY_DIR_BASE),
        spec.overlay_bytes,
    )?)
}

/// Reaps every exited child; returns their pids and statuses.
fn reap() -> Vec<(Pid, ExitStatus)> {
    let mut found = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, code)) => found.push((
                p,
                ExitStatus {
                    code: Some(code),
                    signal: None,
                },
            )),
            Ok(WaitStatus::Signaled(p, sig, _)) => found.push((
                p,
                ExitStatus {
                    code: None,
                    signal: Some(sig as i32),
                },
            )),
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(_) => {}
        }
    }
}

/// Blocks SIGCHLD and returns a signalfd for it (so poll sees child exits).
fn sigchld_fd() -> Result<SignalFd, WorkloadError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block()
        .map_err(|e| WorkloadError::Sys("blocking SIGCHLD", e))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| WorkloadError::Sys("signalfd", e))
}
