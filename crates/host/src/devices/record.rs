//! The files under `<state>/devices/`: the lock, the allocation record and the
//! quarantine list, and the owner processes named in them.
//!
//! Both JSON files are replaced atomically (temporary file, fsync, rename) and only while
//! the lock is held. They are read as hostile input: bounded, versioned, every entry
//! validated; a damaged file stops allocation (fail closed) with an error naming it.

use gpucell_common::FileLock;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bdf::Bdf;
use crate::sysfs::{self, SysfsError};

/// Largest record file read.
const MAX_FILE_BYTES: usize = 1 << 20;
/// Most entries in one record file.
const MAX_ENTRIES: usize = 4096;
const VERSION: u32 = 1;
/// Longest sandbox id.
pub const MAX_SANDBOX_ID: usize = 128;
/// Longest quarantine reason kept.
const MAX_REASON: usize = 1024;

/// Errors reading or writing the device records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot create the device state directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Lock(#[from] gpucell_common::LockError),
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: SysfsError,
    },
    #[error("{} is damaged ({why}); stop every sandbox, then move it away (allocation stays refused until then)", path.display())]
    Damaged { path: PathBuf, why: String },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox id `{id}` is not 1-{MAX_SANDBOX_ID} characters of A-Z a-z 0-9 . _ -")]
    SandboxId { id: String },
    #[error("{} does not exist: procfs is not mounted under the host root (with a fake host root, look owners up in the real /proc)", path.display())]
    NoSelfStat { path: PathBuf },
    #[error("cannot read the start time of this process from {}", path.display())]
    SelfStat {
        path: PathBuf,
        #[source]
        source: SysfsError,
    },
}

/// `<state>/devices`.
pub fn devices_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("devices")
}
/// `<state>/devices/lock`.
pub fn lock_path(state_dir: &Path) -> PathBuf {
    devices_dir(state_dir).join("lock")
}
/// `<state>/devices/allocations.json`.
pub fn allocations_path(state_dir: &Path) -> PathBuf {
    devices_dir(state_dir).join("allocations.json")
}
/// `<state>/devices/quarantine.json`.
pub fn quarantine_path(state_dir: &Path) -> PathBuf {
    devices_dir(state_dir).join("quarantine.json")
}
/// `<state>/devices/policy.toml`.
pub fn policy_path(state_dir: &Path) -> PathBuf {
    devices_dir(state_dir).join("policy.toml")
}

/// Checks a sandbox id: 1-128 characters of `A-Z a-z 0-9 . _ -`.
pub fn check_sandbox_id(id: &str) -> Result<(), RecordError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SANDBOX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RecordError::SandboxId {
            id: sysfs::printable(id),
        })
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds.
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The process that holds an allocation: its pid and its start time (field 22 of
/// `/proc/<pid>/stat`, in clock ticks since boot), so that a reused pid is not taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub start_time: u64,
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Running (or sleeping, stopped...) with this start time.
    Alive { start_time: u64 },
    /// No such process, or a zombie (its files are closed).
    Gone,
}

/// Reads `<proc>/<pid>/stat`: gone when missing or a zombie; an error when garbled.
pub fn liveness(proc_dir: &Path, pid: u32) -> Result<Liveness, SysfsError> {
    let path = proc_dir.join(pid.to_string()).join("stat");
    let text = match sysfs::read_raw(&path) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Ok(Liveness::Gone),
        Err(e) => return Err(e),
    };
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so split after
    // the last `)`. Field 3 is the state, field 22 the start time.
    let garbled = || SysfsError::garbled(&path, &text, "`pid (comm) state ...` with 22 fields");
    let (_, rest) = text.rsplit_once(')').ok_or_else(garbled)?;
    let fields: Vec<&str> = rest.split_whitespace().take(20).collect();
    let state = fields.first().ok_or_else(garbled)?;
    let start_time = fields
        .get(19)
        .and_then(|f| f.parse::<u64>().ok())
        .ok_or_else(garbled)?;
    if matches!(*state, "Z" | "X" | "x") {
        return Ok(Liveness::Gone);
    }
    Ok(Liveness::Alive { start_time })
}

impl Owner {
    /// This process, its start time read from `<proc>/<pid>/stat`.
    pub fn current(proc_dir: &Path) -> Result<Self, RecordError> {
        let pid = std::process::id();
        let path = proc_dir.join(pid.to_string()).join("stat");
        match liveness(proc_dir, pid) {
            Ok(Liveness::Alive { start_time }) => Ok(Self { pid, start_time }),
            Ok(Liveness::Gone) => Err(RecordError::NoSelfStat { path }),
            Err(source) => Err(RecordError::SelfStat { path, source }),
        }
    }

    /// True when this exact process (same pid, same start time) still runs.
    pub fn is_alive(&self, proc_dir: &Path) -> bool {
        match liveness(proc_dir, self.pid) {
            Ok(Liveness::Alive { start_time }) => start_time == self.start_time,
            Ok(Liveness::Gone) => false,
            // Unreadable: assume it runs, so its device is never taken from under it.
            Err(e) => {
                tracing::warn!("{}", gpucell_common::chain_string(&e));
                true
            }
        }
    }
}

/// One passed-through function held by a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocationEntry {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// Its IOMMU group: the whole group belongs to the sandbox.
    pub iommu_group: u32,
    pub sandbox: String,
    pub owner: Owner,
    pub since_unix: u64,
}

/// `allocations.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocationFile {
    pub version: u32,
    pub allocations: Vec<AllocationEntry>,
}

/// A function that is not handed out until `gpucell gpu release BDF`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantineEntry {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub reason: String,
    pub since_unix: u64,
    /// The sandbox that had it last, when known.
    pub sandbox: Option<String>,
}

/// `quarantine.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantineFile {
    pub version: u32,
    pub devices: Vec<QuarantineEntry>,
}

impl QuarantineFile {
    /// The entry of `bdf`.
    pub fn get(&self, bdf: Bdf) -> Option<&QuarantineEntry> {
        self.devices.iter().find(|e| e.bdf == bdf)
    }

    /// Adds or replaces the entry of `entry.bdf`; the reason is cleaned and cut to 1 KiB.
    pub fn put(&mut self, mut entry: QuarantineEntry) {
        entry.reason = clean_reason(&entry.reason);
        self.devices.retain(|e| e.bdf != entry.bdf);
        self.devices.push(entry);
        self.devices.sort_by_key(|e| e.bdf);
    }
}

/// A reason as kept and shown: control characters escaped, at most 1 KiB.
fn clean_reason(reason: &str) -> String {
    let mut out = String::new();
    for c in reason.chars() {
        if out.len() >= MAX_REASON {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn read_json<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T, RecordError> {
    let text = match sysfs::read_raw(path) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Ok(T::default()),
        Err(source) => {
            return Err(RecordError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    if text.len() > MAX_FILE_BYTES {
        return Err(RecordError::Damaged {
            path: path.to_owned(),
            why: format!("larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    serde_json::from_str(&text).map_err(|e| RecordError::Damaged {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RecordError> {
    let err = |source| RecordError::Write {
        path: path.to_owned(),
        source,
    };
    let json = serde_json::to_vec_pretty(value).map_err(|e| err(std::io::Error::other(e)))?;
    gpucell_common::write_atomic(path, &json, 0o600).map_err(err)
}

fn check_common(path: &Path, version: u32, bdfs: &[Bdf]) -> Result<(), RecordError> {
    let damaged = |why: String| RecordError::Damaged {
        path: path.to_owned(),
        why,
    };
    if version != VERSION {
        return Err(damaged(format!("version {version} is not {VERSION}")));
    }
    if bdfs.len() > MAX_ENTRIES {
        return Err(damaged(format!("more than {MAX_ENTRIES} entries")));
    }
    let mut sorted = bdfs.to_vec();
    sorted.sort();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(damaged(format!("{} is listed twice", w[0])));
    }
    Ok(())
}

/// Reads `allocations.json` (empty when missing) and validates it.
pub fn load_allocations(state_dir: &Path) -> Result<AllocationFile, RecordError> {
    let path = allocations_path(state_dir);
    let mut file: AllocationFile = read_json(&path)?;
    if file == AllocationFile::default() {
        file.version = VERSION;
        return Ok(file);
    }
    let bdfs: Vec<Bdf> = file.allocations.iter().map(|a| a.bdf).collect();
    check_common(&path, file.version, &bdfs)?;
    for a in &file.allocations {
        check_sandbox_id(&a.sandbox).map_err(|e| RecordError::Damaged {
            path: path.clone(),
            why: format!("entry {}: {e}", a.bdf),
        })?;
    }
    Ok(file)
}

/// Writes `allocations.json` atomically (mode 0600).
pub fn save_allocations(state_dir: &Path, file: &AllocationFile) -> Result<(), RecordError> {
    write_json(&allocations_path(state_dir), file)
}

/// Reads `quarantine.json` (empty when missing) and validates it.
pub fn load_quarantine(state_dir: &Path) -> Result<QuarantineFile, RecordError> {
    let path = quarantine_path(state_dir);
    let mut file: QuarantineFile = read_json(&path)?;
    if file == QuarantineFile::default() {
        file.version = VERSION;
        return Ok(file);
    }
    let bdfs: Vec<Bdf> = file.devices.iter().map(|q| q.bdf).collect();
    check_common(&path, file.version, &bdfs)?;
    for q in &mut file.devices {
        q.reason = clean_reason(&q.reason);
    }
    Ok(file)
}

/// Writes `quarantine.json` atomically (mode 0600).
pub fn save_quarantine(state_dir: &Path, file: &QuarantineFile) -> Result<(), RecordError> {
    write_json(&quarantine_path(state_dir), file)
}

/// The exclusive lock on `<state>/devices/lock`, held until dropped.
#[derive(Debug)]
pub struct DevicesLock {
    _lock: FileLock,
}

impl DevicesLock {
    /// Creates the directory if needed and waits for the lock.
    pub fn take(state_dir: &Path) -> Result<Self, RecordError> {
        let dir = devices_dir(state_dir);
        std::fs::create_dir_all(&dir).map_err(|source| RecordError::Dir {
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            _lock: FileLock::exclusive(&lock_path(state_dir))?,
        })
    }

    /// A shared lock on the lock file when it exists (`None` otherwise), creating
    /// nothing: for reading the records consistently without changing the state dir.
    pub fn shared_if_exists(state_dir: &Path) -> Result<Option<Self>, RecordError> {
        Ok(FileLock::shared_if_exists(&lock_path(state_dir))?.map(|l| Self { _lock: l }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let dir = tempfile::tempdir().unwrap();
        let stat = |pid: u32, text: &str| {
            std::fs::create_dir_all(dir.path().join(pid.to_string())).unwrap();
            std::fs::write(dir.path().join(format!("{pid}/stat")), text).unwrap();
        };
        let tail = "1 1 1 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 100";
        stat(10, &format!("10 (qemu) S {tail}"));
        stat(11, &format!("11 (a) b) (c) R {tail}"));
        stat(12, &format!("12 (dead) Z {tail}"));
        stat(13, "13 (short) S 1 2");
        let p = dir.path();
        assert_eq!(
            liveness(p, 10).unwrap(),
            Liveness::Alive { start_time: 987654 }
        );
        assert_eq!(
            liveness(p, 11).unwrap(),
            Liveness::Alive { start_time: 987654 }
        );
        assert_eq!(liveness(p, 12).unwrap(), Liveness::Gone);
        assert_eq!(liveness(p, 14).unwrap(), Liveness::Gone);
        assert!(liveness(p, 13).is_err());
        let o = Owner {
            pid: 10,
            start_time: 987654,
        };
        assert!(o.is_alive(p));
        assert!(!Owner { start_time: 1, ..o }.is_alive(p));
    }

    #[test]
    fn this_process_has_an_owner_record() {
        let me = Owner::current(Path::new("/proc")).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(me.is_alive(Path::new("/proc")));
        let fake = tempfile::tempdir().unwrap();
        let err = Owner::current(fake.path()).unwrap_err().to_string();
        assert!(
            err.contains("does not exist") && err.contains("real /proc"),
            "{err}"
        );
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_746_601), "2026-11-27T02:30:01Z");
    }

    #[test]
    fn sandbox_ids() {
        assert!(check_sandbox_id("sb-1.a_b").is_ok());
        for bad in ["", "a/b", "a b", "..\n", &"x".repeat(129)] {
            assert!(check_sandbox_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reasons_are_escaped_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(devices_dir(dir.path())).unwrap();
        let mut q = QuarantineFile {
            version: VERSION,
            devices: Vec::new(),
        };
        let entry = |reason: String| QuarantineEntry {
            bdf: "0000:01:00.0".parse().unwrap(),
            vendor: 0x10de,
            device: 0x2330,
            reason,
            since_unix: 1,
            sandbox: None,
        };
        q.put(entry("a\x1b[31mred\nline".into()));
        assert_eq!(q.devices[0].reason, "a\\u{1b}[31mred\\nline");
        q.put(entry("é".repeat(2000)));
        assert_eq!(q.devices.len(), 1);
        assert!(q.devices[0].reason.len() <= MAX_REASON + 8);
        // A hand-edited file is cleaned on load too.
        let raw = format!(
            r#"{{"version":1,"devices":[{{"bdf":"0000:01:00.0","vendor":1,"device":2,"reason":"x\u0007{}","since_unix":0,"sandbox":null}}]}}"#,
            "y".repeat(5000)
        );
        std::fs::write(quarantine_path(dir.path()), raw).unwrap();
        let loaded = load_quarantine(dir.path()).unwrap();
        assert!(loaded.devices[0].reason.starts_with("x\\u{7}y"));
        assert!(loaded.devices[0].reason.len() <= MAX_REASON + 8);
    }

    #[test]
    fn damaged_files_are_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(devices_dir(dir.path())).unwrap();
        let path = allocations_path(dir.path());
        assert_eq!(load_allocations(dir.path()).unwrap().allocations.len(), 0);
        for bad in [
            "not json",
            r#"{"version":2,"allocations":[]}"#,
            r#"{"version":1,"allocations":[],"extra":1}"#,
            r#"{"version":1,"allocations":[{"bdf":"0000:01:00.0","vendor":1,"device":2,"iommu_group":1,"sandbox":"../x","owner":{"pid":1,"start_time":1},"since_unix":0}]}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = load_allocations(dir.path()).unwrap_err();
            assert!(matches!(err, RecordError::Damaged { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("allocations.json"), "{err}");
        }
        let e = r#"{"bdf":"0000:01:00.0","vendor":1,"device":2,"reason":"r","since_unix":0,"sandbox":null}"#;
        std::fs::write(
            quarantine_path(dir.path()),
            format!(r#"{{"version":1,"devices":[{e},{e}]}}"#),
        )
        .unwrap();
        let err = load_quarantine(dir.path()).unwrap_err().to_string();
        assert!(err.contains("listed twice"), "{err}");
    }
}
