//! A dedicated unprivileged uid (and gid, the same number) per sandbox, from a
//! configured range, claimed in a registry file shared by every gpucell on the host
//! (`/run/gpucell/jail-uids` by default): one line `UID OWNER_PID SANDBOX_ID` per
//! claim, read and rewritten under an exclusive `flock`. A claim whose owner process
//! is gone is reclaimed by the next claim. The [`UidClaim`] guard releases its line
//! when dropped.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error("cannot use the jail uid registry {path:?}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line} of the jail uid registry {path:?} is damaged ({text:?}); remove the file when no sandbox runs")]
    Damaged {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error(
        "every uid of the jail range {first}..={last} is in use; widen [jail] uids in the config"
    )]
    Exhausted { first: u32, last: u32 },
    #[error("the jail uid range {first}..={last} is empty or includes uid 0")]
    BadRange { first: u32, last: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Claim {
    uid: u32,
    owner: u32,
    sandbox: String,
}

/// A claimed uid, released when dropped.
#[derive(Debug)]
pub struct UidClaim {
    registry: PathBuf,
    uid: u32,
    owner: u32,
    /// Sandboxes whose claims were taken back because their owner is gone (their
    /// other leftovers, such as cgroups, can go too).
    reclaimed: Vec<String>,
}

impl UidClaim {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The sandbox ids of the dead owners' claims this claim dropped.
    pub fn reclaimed(&self) -> &[String] {
        &self.reclaimed
    }
}

impl Drop for UidClaim {
    fn drop(&mut self) {
        let (uid, owner) = (self.uid, self.owner);
        let res = with_registry(&self.registry, |claims| {
            claims.retain(|c| !(c.uid == uid && c.owner == owner));
            Ok(())
        });
        if let Err(e) = res {
            tracing::warn!(error = %e, uid, "cannot release the jail uid");
        }
    }
}

/// Whether process `pid` exists.
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Claims the lowest free uid of `first..=last` for `sandbox`, owned by this process;
/// claims of owners that `alive` says are gone are dropped first.
pub fn claim(
    registry: &Path,
    first: u32,
    last: u32,
    sandbox: &str,
    alive: &dyn Fn(u32) -> bool,
) -> Result<UidClaim, UidError> {
    if first == 0 || first > last {
        return Err(UidError::BadRange { first, last });
    }
    let owner = std::process::id();
    let mut reclaimed = Vec::new();
    let uid = with_registry(registry, |claims| {
        claims.retain(|c| {
            let keep = alive(c.owner);
            if !keep {
                reclaimed.push(c.sandbox.clone());
            }
            keep
        });
        let taken: std::collections::BTreeSet<u32> = claims.iter().map(|c| c.uid).collect();
        let uid = (first..=last)
            .find(|u| !taken.contains(u))
            .ok_or(UidError::Exhausted { first, last })?;
        claims.push(Claim {
            uid,
            owner,
            sandbox: sandbox.to_string(),
        });
        Ok(uid)
    })?;
    Ok(UidClaim {
        registry: registry.to_path_buf(),
        uid,
        owner,
        reclaimed,
    })
}

/// The uids claimed now, with their owners and sandbox ids (for tests and `ps`).
pub fn claims(registry: &Path) -> Result<Vec<(u32, u32, String)>, UidError> {
    match std::fs::metadata(registry) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        _ => {}
    }
    let mut out = Vec::new();
    with_registry(registry, |claims| {
        out = claims
            .iter()
            .map(|c| (c.uid, c.owner, c.sandbox.clone()))
            .collect();
        Ok(())
    })?;
    Ok(out)
}

fn parse(path: &Path, text: &str) -> Result<Vec<Claim>, UidError> {
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let damaged = || UidError::Damaged {
            path: path.to_path_buf(),
            line: n + 1,
            text: line.to_string(),
        };
        let mut f = line.split_whitespace();
        let (Some(uid), Some(owner), Some(sandbox), None) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return Err(damaged());
        };
        out.push(Claim {
            uid: uid.parse().map_err(|_| damaged())?,
            owner: owner.parse().map_err(|_| damaged())?,
            sandbox: sandbox.to_string(),
        });
    }
    Ok(out)
}

/// Runs `f` on the registry's claims under its lock and writes them back.
fn with_registry<T>(
    path: &Path,
    f: impl FnOnce(&mut Vec<Claim>) -> Result<T, UidError>,
) -> Result<T, UidError> {
    let io = |source| UidError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    // SAFETY: flock on a descriptor we own; the lock goes with the file.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io)?;
    let mut claims = parse(path, &text)?;
    let before = claims.clone();
    let out = f(&mut claims)?;
    if claims != before {
        let body: String = claims
            .iter()
            .map(|c| format!("{} {} {}\n", c.uid, c.owner, c.sandbox))
            .collect();
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        // No fsync: the lock orders the writers, and the claims are of running QEMUs,
        // which a crash of the machine ends anyway (a syncing write cost 200 ms on a busy
        // disk before every jailed QEMU's spawn).
        file.write_all(body.as_bytes()).map_err(io)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_distinct_released_and_dead_owners_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("sub/jail-uids");
        let alive = |_| true;
        let a = claim(&reg, 5000, 5002, "a", &alive).unwrap();
        let b = claim(&reg, 5000, 5002, "b", &alive).unwrap();
        assert_eq!((a.uid(), b.uid()), (5000, 5001));
        assert_eq!(claims(&reg).unwrap().len(), 2);
        drop(a);
        let c = claim(&reg, 5000, 5002, "c", &alive).unwrap();
        assert_eq!(c.uid(), 5000);
        let d = claim(&reg, 5000, 5002, "d", &alive).unwrap();
        assert!(matches!(
            claim(&reg, 5000, 5002, "e", &alive),
            Err(UidError::Exhausted { .. })
        ));
        // A claim left by a dead owner is taken back.
        std::fs::write(&reg, "5000 999999 gone\n").unwrap();
        let dead = |pid| pid != 999_999;
        let e = claim(&reg, 5000, 5000, "e", &dead).unwrap();
        assert_eq!(e.uid(), 5000);
        assert_eq!(e.reclaimed(), ["gone"]);
        drop((b, c, d));
        drop(e);
        assert!(claims(&reg).unwrap().is_empty());
        assert!(matches!(
            claim(&reg, 0, 10, "x", &alive),
            Err(UidError::BadRange { .. })
        ));
        std::fs::write(&reg, "5000 12\n").unwrap();
        let err = claim(&reg, 5000, 5001, "x", &alive).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
