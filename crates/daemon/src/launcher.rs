//! The seam between the daemon and its supervisor processes: start one for a sandbox
//! directory, signal it, reap it. [`Supervisors`] starts `gpucelld supervise` for real;
//! tests pass their own.

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
}

/// `gpucelld [global flags] supervise --dir DIR`, started with `setsid`.
pub struct Supervisors {
    /// The gpucelld binary.
    pub exe: PathBuf,
    /// Flags before `supervise` (`--state-dir`, `--host-root`, `--config`...).
    pub global_args: Vec<String>,
    pub proc_dir: PathBuf,
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
}

/// Collects `pid` if it is an exited child of this process; otherwise does nothing.
fn reap(pid: u32) {
    let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
}
