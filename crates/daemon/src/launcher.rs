//! The seam between the daemon and the host: start a supervisor for a sandbox
//! directory, signal it, reap it, and give back the devices of one that died.
//! [`Supervisors`] does it for real; tests pass their own.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gpucell_host::devices::record::{liveness, Liveness, Owner};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start the supervisor {exe:?} for {dir:?}")]
    Spawn {
        exe: PathBuf,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the supervisor (pid {pid}) for {dir:?} vanished before its start time could be read")]
    Vanished { pid: u32, dir: PathBuf },
}

pub trait Launcher: Send + Sync {
    /// Starts a supervisor for the sandbox directory `dir`, in its own session.
    fn launch(&self, dir: &Path) -> Result<Owner, LaunchError>;
    /// Sends `signal` to the supervisor, if it is still that process.
    fn signal(&self, owner: &Owner, signal: i32);
    /// True while that exact process (pid and start time) runs.
    fn alive(&self, owner: &Owner) -> bool;
    /// Resets, checks and returns (or quarantines) the devices the allocator records for
    /// a supervisor that is gone; one line per device says what happened.
    fn reclaim_devices(&self, owner: &Owner) -> Vec<String>;
}

/// `gpucelld [global flags] supervise --dir DIR`, started with `setsid`.
pub struct Supervisors {
    /// The gpucelld binary.
    pub exe: PathBuf,
    /// Flags before `supervise` (`--state-dir`, `--host-root`, `--config`...).
    pub global_args: Vec<String>,
    pub proc_dir: PathBuf,
    pub host_root: PathBuf,
    pub state_dir: PathBuf,
}

impl Launcher for Supervisors {
    fn launch(&self, dir: &Path) -> Result<Owner, LaunchError> {
        let spawn_err = |source| LaunchError::Spawn {
            exe: self.exe.clone(),
            dir: dir.to_path_buf(),
            source,
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(crate::supervise::SUPERVISOR_LOG))
            .map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.global_args)
            .arg("supervise")
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        let pid = child.id();
        // The child is reaped by `alive` (waitpid), not by this handle.
        drop(child);
        match liveness(&self.proc_dir, pid) {
            Ok(Liveness::Alive { start_time }) => Ok(Owner { pid, start_time }),
            _ => {
                reap(pid);
                Err(LaunchError::Vanished {
                    pid,
                    dir: dir.to_path_buf(),
                })
            }
        }
    }

    fn signal(&self, owner: &Owner, signal: i32) {
        if !self.alive(owner) {
            return;
        }
        if let Ok(sig) = Signal::try_from(signal) {
            let _ = kill(Pid::from_raw(owner.pid as i32), sig);
        }
    }

    fn alive(&self, owner: &Owner) -> bool {
        // Our own child: collect its exit, so that it does not stay a zombie.
        reap(owner.pid);
        owner.is_alive(&self.proc_dir)
    }

    fn reclaim_devices(&self, owner: &Owner) -> Vec<String> {
        use gpucell_host::devices::{DevicePool, DevicesError, ReleaseOutcome};
        let held: Vec<_> = gpucell_host::devices::allocations(&self.state_dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.owner == *owner)
            .collect();
        let pool = DevicePool::new(
            gpucell_host::HostRoot::new(&self.host_root),
            &self.state_dir,
        );
        let mut notes = Vec::new();
        for a in held {
            // Its QEMU dies with the supervisor (PDEATHSIG), a moment later: wait for
            // /dev/vfio/<group> to close.
            let mut tries = 0;
            let outcome = loop {
                match pool.release_device(a.bdf, false, &mut gpucell_host::bind::KernelWriter) {
                    Err(DevicesError::GroupOpen { .. }) if tries < 25 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(200));
                    }
                    other => break other,
                }
            };
            notes.push(match outcome {
                Ok(ReleaseOutcome::Reclaimed { bdf, .. }) => {
                    format!("{bdf}: reset, checked and returned")
                }
                Ok(ReleaseOutcome::Quarantined { bdf, reason }) => {
                    format!("{bdf}: quarantined: {reason}")
                }
                Ok(other) => format!("{}: {other:?}", a.bdf),
                Err(e) => format!(
                    "{}: not released: {}",
                    a.bdf,
                    gpucell_common::chain_string(&e)
                ),
            });
        }
        notes
    }
}

/// Collects `pid` if it is an exited child of this process; otherwise does nothing.
fn reap(pid: u32) {
    let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
}
