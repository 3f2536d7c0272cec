//! Advisory file locks (`flock`) between gpucell processes sharing a store.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

#[derive(Debug, thiserror::Error)]
#[error("locking {path}")]
pub struct LockError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Held until dropped (closing the file releases the lock).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn exclusive(path: &Path) -> Result<FileLock, LockError> {
        FileLock::take(path, FlockOperation::LockExclusive)
    }

    pub fn shared(path: &Path) -> Result<FileLock, LockError> {
        FileLock::take(path, FlockOperation::LockShared)
    }

    fn take(path: &Path, op: FlockOperation) -> Result<FileLock, LockError> {
        let err = |source| LockError {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(err)?;
        loop {
            match rustix::fs::flock(&file, op) {
                Ok(()) => return Ok(FileLock { _file: file }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(err(e.into())),
            }
        }
    }
}
