//! Advisory file locks (`flock(2)`) between gpucell processes sharing a state directory.
//!
//! The lock belongs to the open file: it is released when the [`FileLock`] is dropped
//! (or the process dies), never left behind. The lock file itself stays; it is empty.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

/// A lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[error("cannot lock {}", path.display())]
pub struct LockError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// A held lock, released when dropped.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Waits for the exclusive lock on `path`, creating the file (not its directory).
    pub fn exclusive(path: &Path) -> Result<FileLock, LockError> {
        Self::take(open_creating(path)?, path, FlockOperation::LockExclusive)
    }

    /// Waits for a shared lock on `path`, creating the file (not its directory).
    pub fn shared(path: &Path) -> Result<FileLock, LockError> {
        Self::take(open_creating(path)?, path, FlockOperation::LockShared)
    }

    /// The exclusive lock on `path` if no one else holds it now; `None` when someone does.
    pub fn try_exclusive(path: &Path) -> Result<Option<FileLock>, LockError> {
        let file = open_creating(path)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(FileLock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(LockError {
                path: path.to_owned(),
                source: e.into(),
            }),
        }
    }

    /// Waits for a shared lock on `path` when the file exists, opening it read-only and
    /// creating nothing; `None` when it does not exist (nobody has locked it yet). For
    /// readers that must leave the state directory as they found it.
    pub fn shared_if_exists(path: &Path) -> Result<Option<FileLock>, LockError> {
        match File::open(path) {
            Ok(file) => Self::take(file, path, FlockOperation::LockShared).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LockError {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn take(file: File, path: &Path, op: FlockOperation) -> Result<FileLock, LockError> {
        loop {
            match rustix::fs::flock(&file, op) {
                Ok(()) => return Ok(FileLock { _file: file }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(LockError {
                        path: path.to_owned(),
                        source: e.into(),
                    })
                }
            }
        }
    }
}

fn open_creating(path: &Path) -> Result<File, LockError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| LockError {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn exclusive_excludes_a_second_handle_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = FileLock::exclusive(&path).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts.
        assert!(FileLock::try_exclusive(&path).unwrap().is_none());
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        let waiter = std::thread::spawn(move || {
            let _l = FileLock::shared(&p).unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a shared lock was granted while the exclusive one is held"
        );
        drop(held);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        waiter.join().unwrap();
        assert!(FileLock::try_exclusive(&path).unwrap().is_some());
    }

    #[test]
    fn shared_locks_coexist_and_exclude_writers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let a = FileLock::shared(&path).unwrap();
        let b = FileLock::shared_if_exists(&path).unwrap();
        assert!(b.is_some());
        assert!(FileLock::try_exclusive(&path).unwrap().is_none());
        drop((a, b));
        assert!(FileLock::try_exclusive(&path).unwrap().is_some());
    }

    #[test]
    fn excludes_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let _held = FileLock::exclusive(&path).unwrap();
        // flock(1) from util-linux, when installed: a real second process.
        let out = std::process::Command::new("flock")
            .args(["--nonblock", "--exclusive"])
            .arg(&path)
            .arg("true")
            .output();
        match out {
            Ok(o) => assert_eq!(o.status.code(), Some(1), "flock(1) got the lock: {o:?}"),
            Err(e) => eprintln!("skipped: flock(1) is not installed ({e})"),
        }
    }

    #[test]
    fn shared_if_exists_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        assert!(FileLock::shared_if_exists(&path).unwrap().is_none());
        assert!(!path.exists());
        let err = FileLock::exclusive(&dir.path().join("no/such/lock")).unwrap_err();
        assert!(err.to_string().contains("no/such/lock"), "{err}");
    }
}
