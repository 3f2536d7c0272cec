//! One record per sandbox network, written before the host is touched and removed after
//! everything is gone: `<state>/net/<run id>.json`. A record whose owner (pid and start
//! time) no longer runs is a leftover of a killed run: the next network setup and
//! `gpucell doctor` find it, and the next setup removes what it names. Records name the
//! network namespace they were made in; only that namespace's are reconciled.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use gpucell_host::devices::record::Owner;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::spec::Publish;

/// Directory of the records under the state directory.
pub const RECORD_DIR: &str = "net";
const LOCK_FILE: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot {what} {path:?}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {path:?}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("cannot tell who runs this sandbox")]
    Owner(#[source] gpucell_host::devices::record::RecordError),
}

/// What one sandbox network put on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRecord {
    pub run_id: String,
    pub owner: Owner,
    /// Inode of the network namespace the sandbox was made in.
    pub netns: u64,
    pub tap: String,
    pub table: String,
    pub slot: u64,
    pub guest: Ipv4Addr,
    pub publish: Vec<Publish>,
}

/// The records directory of `state_dir`, locked while this value lives.
pub struct Records {
    dir: PathBuf,
    _lock: Flock<std::fs::File>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RecordError + 'a {
    move |source| RecordError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Inode of the calling thread's network namespace (`/proc/thread-self/ns/net`: a
/// namespace is per thread); 0 when unknown.
pub fn current_netns(proc_dir: &Path) -> u64 {
    std::fs::read_link(proc_dir.join("thread-self/ns/net"))
        .ok()
        .and_then(|l| {
            let s = l.to_string_lossy().into_owned();
            s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
        })
        .unwrap_or(0)
}

impl Records {
    /// Opens (creating) `<state_dir>/net` and takes its lock.
    pub fn lock(state_dir: &Path) -> Result<Records, RecordError> {
        let dir = state_dir.join(RECORD_DIR);
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| {
            RecordError::Lock {
                path: lock_path,
                source,
            }
        })?;
        Ok(Records { dir, _lock: lock })
    }

    fn path(&self, run_id: &str) -> PathBuf {
        self.dir.join(format!("{run_id}.json"))
    }

    /// Every readable record; an unreadable one is logged and skipped.
    pub fn all(&self) -> Vec<NetRecord> {
        read_all(&self.dir)
    }

    pub fn write(&self, r: &NetRecord) -> Result<(), RecordError> {
        let path = self.path(&r.run_id);
        let tmp = self.dir.join(format!(".{}.tmp", r.run_id));
        let text = serde_json::to_vec_pretty(r).unwrap_or_default();
        std::fs::write(&tmp, text).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))
    }

    pub fn remove(&self, run_id: &str) -> Result<(), RecordError> {
        let path = self.path(run_id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &path)(e)),
            _ => Ok(()),
        }
    }
}

/// Every record under `<state_dir>/net`, without the lock (for `doctor`).
pub fn read_unlocked(state_dir: &Path) -> Vec<NetRecord> {
    read_all(&state_dir.join(RECORD_DIR))
}

fn read_all(dir: &Path) -> Vec<NetRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<NetRecord> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let text = std::fs::read(&p).ok()?;
            match serde_json::from_slice(&text) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "unreadable network record");
                    None
                }
            }
        })
        .collect();
    out.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    out
}

/// The owner record for this process.
pub fn this_owner(proc_dir: &Path) -> Result<Owner, RecordError> {
    Owner::current(proc_dir).map_err(RecordError::Owner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn write_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        let recs = Records::lock(dir.path()).unwrap();
        let r = NetRecord {
            run_id: "00112233445566ff".into(),
            owner: Owner {
                pid: 1,
                start_time: 2,
            },
            netns: 7,
            tap: "gcn001122334455".into(),
            table: "gpucell_00112233445566ff".into(),
            slot: 0,
            guest: Ipv4Addr::new(10, 200, 0, 2),
            publish: vec!["80:80".parse().unwrap()],
        };
        recs.write(&r).unwrap();
        std::fs::write(dir.path().join("net/garbage.json"), "{").unwrap();
        assert_eq!(recs.all(), vec![r.clone()]);
        assert_eq!(read_unlocked(dir.path()), vec![r]);
        recs.remove("00112233445566ff").unwrap();
        recs.remove("00112233445566ff").unwrap();
        assert!(recs.all().is_empty());
        assert!(current_netns(Path::new("/proc")) > 0);
    }
}
