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
    #[error("cannot mount the quota tmpfs on the run directory {path:?}")]
    Quota {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// Size of the tmpfs a jailed run's directory is (it holds two sockets, the owner
/// file and the jail's empty staging directory).
pub const QUOTA_BYTES: u64 = 1 << 20;
/// Inodes of that tmpfs.
const QUOTA_INODES: u32 = 64;

/// Owns `<state>/run/<id>/`; removes it (and all it holds) when dropped.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    id: String,
    /// Whether a quota tmpfs is mounted on it.
    mounted: bool,
}

impl RunDir {
    /// Creates the directory (mode 0700) and records this process as its owner.
    pub fn create(state_dir: &Path, id: &str) -> Result<RunDir, RunDirError> {
        Self::create_with_quota(state_dir, id, false)
    }

    /// [`RunDir::create`]; with `quota` (root only: a jailed run, whose QEMU may write
    /// there) the directory is a tmpfs of [`QUOTA_BYTES`] and 64 inodes, so that what
    /// QEMU writes cannot fill the state dir's filesystem. It is unmounted on drop, or
    /// by the sweep after a crash.
    pub fn create_with_quota(
        state_dir: &Path,
        id: &str,
        quota: bool,
    ) -> Result<RunDir, RunDirError> {
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
        let mut dir = RunDir {
            path,
            id: id.to_string(),
            mounted: false,
        };
        if quota {
            let opts = format!("size={QUOTA_BYTES},nr_inodes={QUOTA_INODES},mode=0700");
            let flags = nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC;
            nix::mount::mount(
                Some("tmpfs"),
                &dir.path,
                Some("tmpfs"),
                flags,
                Some(opts.as_str()),
            )
            .map_err(|e| RunDirError::Quota {
                path: dir.path.clone(),
                source: e.into(),
            })?;
            dir.mounted = true;
        }
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

/// Detaches a quota tmpfs from `dir`, if one is mounted there.
fn unmount(dir: &Path) {
    match nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            tracing::warn!(path = %dir.display(), error = %e, "could not unmount the run directory")
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.mounted {
            unmount(&self.path);
        }
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
        if nix::unistd::Uid::effective().is_root() {
            unmount(&dir);
        }
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
    fn a_quota_run_dir_is_a_small_tmpfs_unmounted_on_drop_and_by_the_sweep() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: mounting the quota tmpfs needs root");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let mounted = |p: &Path| {
            let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
            mounts
                .lines()
                .any(|l| l.split(' ').nth(1) == Some(&*p.to_string_lossy()))
        };
        let dir = RunDir::create_with_quota(state.path(), "q1", true).unwrap();
        let p = dir.path().to_path_buf();
        assert!(mounted(&p));
        let big = vec![0u8; 2 << 20];
        let err = fs::write(p.join("fill"), &big).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        drop(dir);
        assert!(!p.exists() && !mounted(&p));
        // A crashed run's: the sweep unmounts and removes it.
        let dir = RunDir::create_with_quota(state.path(), "q2", true).unwrap();
        let p = dir.path().to_path_buf();
        fs::write(p.join(OWNER_FILE), "2147483000 2147483001").unwrap();
        std::mem::forget(dir);
        let _fresh = RunDir::create(state.path(), "fresh").unwrap();
        assert!(!p.exists() && !mounted(&p));
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
