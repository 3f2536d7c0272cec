//! The per-run directory `<state>/run/<id>/` holding the sockets of one VM, and the
//! guard that removes it on every exit path. Directories left by a gpucell that was
//! killed outright (SIGKILL, power loss) are swept by the next run.

use std::fs;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Longest unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
const OWNER_FILE: &str = "owner";
/// The QMP monitor's socket in a run directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// The virtio-serial agent channel's socket in a run directory.
pub const AGENT_SOCKET: &str = "agent.sock";

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot create the run directory {path:?}; check that the state dir is writable")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path:?}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket path {0:?} is longer than the {MAX_SOCKET_PATH} bytes unix sockets allow; use a shorter --state-dir")]
    SocketPathTooLong(PathBuf),
    #[error("cannot read random bytes for a run id from /dev/urandom")]
    Random(#[source] std::io::Error),
}

/// A new random run id: 16 hex digits.
pub fn new_run_id() -> Result<String, RunDirError> {
    let mut bytes = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(RunDirError::Random)?;
    Ok(hex::encode(bytes))
}

/// Where run `id` keeps its sockets: `<state_dir>/run/<id>` (nothing is created).
pub fn run_dir_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("run").join(id)
}

/// The socket `name` in run directory `dir`, checked against the unix socket path
/// limit (nothing is created).
pub fn socket_path(dir: &Path, name: &str) -> Result<PathBuf, RunDirError> {
    let p = dir.join(name);
    if p.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(RunDirError::SocketPathTooLong(p));
    }
    Ok(p)
}

/// Owns `<state>/run/<id>/`; removes it (and all it holds) when dropped.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    id: String,
}

impl RunDir {
    /// Creates the directory (mode 0700) and records this process as its owner.
    pub fn create(state_dir: &Path, id: &str) -> Result<RunDir, RunDirError> {
        let parent = state_dir.join("run");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(|source| RunDirError::Create {
                path: parent.clone(),
                source,
            })?;
        sweep_stale(&parent);
        let path = run_dir_path(state_dir, id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| RunDirError::Create {
                path: path.clone(),
                source,
            })?;
        let dir = RunDir {
            path,
            id: id.to_string(),
        };
        dir.record_owner(None)?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A socket path inside the directory, checked against the unix socket limit.
    pub fn socket(&self, name: &str) -> Result<PathBuf, RunDirError> {
        socket_path(&self.path, name)
    }

    /// Records `<gpucell pid> [<qemu pid>]` so a later run can clean up after a crash.
    /// The file is replaced atomically (written aside, then renamed): a concurrent run's
    /// [`sweep_stale`] must never read it empty, or it would take a live run for dead.
    pub fn record_owner(&self, qemu_pid: Option<u32>) -> Result<(), RunDirError> {
        let path = self.path.join(OWNER_FILE);
        let tmp = self.path.join(format!("{OWNER_FILE}.new"));
        let mut text = std::process::id().to_string();
        if let Some(q) = qemu_pid {
            text.push_str(&format!(" {q}"));
        }
        fs::write(&tmp, text).map_err(|source| RunDirError::Write {
            path: tmp.clone(),
            source,
        })?;
        fs::rename(&tmp, &path).map_err(|source| RunDirError::Write { path, source })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove the run directory");
            }
        }
    }
}

fn alive(pid: i32) -> bool {
    pid > 0 && kill(Pid::from_raw(pid), None).is_ok()
}

/// Removes run directories whose gpucell is gone, killing their QEMU if it still runs
/// (recognised by the run directory on its command line, so a reused pid is left alone).
pub fn sweep_stale(run_root: &Path) {
    let Ok(entries) = fs::read_dir(run_root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(owner) = fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        let mut pids = owner
            .split_whitespace()
            .map(|p| p.parse::<i32>().unwrap_or(0));
        // No owner pid (a file being written by an older gpucell): not known to be dead.
        let gpucell = pids.next().unwrap_or(0);
        if gpucell <= 0 || alive(gpucell) {
            continue;
        }
        if let Some(qemu) = pids.next().filter(|p| alive(*p)) {
            let cmdline = fs::read(format!("/proc/{qemu}/cmdline")).unwrap_or_default();
            let needle = dir.to_string_lossy();
            if String::from_utf8_lossy(&cmdline).contains(needle.as_ref()) {
                tracing::warn!(pid = qemu, dir = %dir.display(), "killing the QEMU of a crashed run");
                let _ = kill(Pid::from_raw(-qemu), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(qemu), Signal::SIGKILL);
            }
        }
        tracing::info!(dir = %dir.display(), "removing the run directory of a crashed run");
        let _ = fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_drop_and_stale_dirs_are_swept() {
        let state = tempfile::tempdir().unwrap();
        let id = new_run_id().unwrap();
        assert_eq!(id.len(), 16);
        let dir = RunDir::create(state.path(), &id).unwrap();
        let p = dir.path().to_path_buf();
        fs::write(p.join("agent.sock"), b"").unwrap();
        assert!(p.is_dir());
        drop(dir);
        assert!(!p.exists());

        // A directory whose owner pid does not exist is removed by the next create.
        let stale = state.path().join("run/deadbeef");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join(OWNER_FILE), "2147483000 2147483001").unwrap();
        let live = state.path().join("run/alive");
        fs::create_dir_all(&live).unwrap();
        fs::write(live.join(OWNER_FILE), std::process::id().to_string()).unwrap();
        // An owner file caught empty (being written) is no proof of a dead run.
        let writing = state.path().join("run/writing");
        fs::create_dir_all(&writing).unwrap();
        fs::write(writing.join(OWNER_FILE), "").unwrap();
        let d = RunDir::create(state.path(), "fresh").unwrap();
        assert!(!stale.exists());
        assert!(live.exists());
        assert!(writing.exists());
        // Rewriting the owner leaves no temporary file and a whole record.
        d.record_owner(Some(7)).unwrap();
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(OWNER_FILE)]);
        assert_eq!(
            fs::read_to_string(d.path().join(OWNER_FILE)).unwrap(),
            format!("{} 7", std::process::id())
        );
    }

    #[test]
    fn long_socket_paths_are_refused() {
        let state = tempfile::tempdir().unwrap();
        let deep = state.path().join("x".repeat(100));
        let dir = RunDir::create(&deep, "id").unwrap();
        assert!(matches!(
            dir.socket("agent.sock"),
            Err(RunDirError::SocketPathTooLong(_))
        ));
    }
}
