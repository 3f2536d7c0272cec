//! What a function was bound to before `gpucell gpu bind`, kept in the state directory
//! (`<state>/vfio-bind/<bdf>.json`) so that `unbind` can restore it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bdf::Bdf;
use crate::sysfs;

/// Largest record file read.
const MAX_RECORD_BYTES: usize = 4096;
const RECORD_VERSION: u32 = 1;

/// Errors reading or writing binding records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write the binding record {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the binding record {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: sysfs::SysfsError,
    },
    #[error("binding record {} is damaged ({why}); delete it, then unbind restores the kernel's default driver", path.display())]
    Damaged { path: PathBuf, why: String },
    #[error("cannot remove the binding record {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The state of one function before it was given to vfio-pci.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindRecord {
    pub version: u32,
    pub bdf: Bdf,
    /// The driver it was bound to; `None` when unbound.
    pub previous_driver: Option<String>,
    /// Its `driver_override`; `None` when unset.
    pub previous_override: Option<String>,
}

impl BindRecord {
    pub fn new(
        bdf: Bdf,
        previous_driver: Option<String>,
        previous_override: Option<String>,
    ) -> Self {
        Self {
            version: RECORD_VERSION,
            bdf,
            previous_driver,
            previous_override,
        }
    }
}

/// True for a kernel driver name that is safe as one path component
/// (`nvidia`, `snd_hda_intel`, `vfio-pci`).
pub fn valid_driver_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The directory of binding records under a state directory.
pub fn records_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("vfio-bind")
}

fn record_path(state_dir: &Path, bdf: Bdf) -> PathBuf {
    records_dir(state_dir).join(format!("{bdf}.json"))
}

/// Writes the record atomically (mode 0600).
pub fn save(state_dir: &Path, record: &BindRecord) -> Result<(), RecordError> {
    let path = record_path(state_dir, record.bdf);
    let err = |source| RecordError::Write {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(records_dir(state_dir)).map_err(err)?;
    let json = serde_json::to_vec_pretty(record).map_err(|e| err(std::io::Error::other(e)))?;
    gpucell_common::write_atomic(&path, &json, 0o600).map_err(err)
}

/// The record of `bdf`, `None` when there is none. A record is validated: it must name
/// the same function and hold plain driver names.
pub fn load(state_dir: &Path, bdf: Bdf) -> Result<Option<BindRecord>, RecordError> {
    let path = record_path(state_dir, bdf);
    let text = match sysfs::read_raw(&path) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(source) => return Err(RecordError::Read { path, source }),
    };
    let damaged = |why: String| RecordError::Damaged {
        path: path.clone(),
        why,
    };
    if text.len() > MAX_RECORD_BYTES {
        return Err(damaged(format!("larger than {MAX_RECORD_BYTES} bytes")));
    }
    let record: BindRecord = serde_json::from_str(&text).map_err(|e| damaged(e.to_string()))?;
    if record.version != RECORD_VERSION {
        return Err(damaged(format!(
            "version {} is not {RECORD_VERSION}",
            record.version
        )));
    }
    if record.bdf != bdf {
        return Err(damaged(format!("it is about {}", record.bdf)));
    }
    for name in [&record.previous_driver, &record.previous_override]
        .into_iter()
        .flatten()
    {
        if !valid_driver_name(name) {
            return Err(damaged(format!(
                "`{}` is not a driver name",
                sysfs::printable(name)
            )));
        }
    }
    Ok(Some(record))
}

/// Removes the record of `bdf` if there is one.
pub fn remove(state_dir: &Path, bdf: Bdf) -> Result<(), RecordError> {
    let path = record_path(state_dir, bdf);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordError::Remove { path, source }),
    }
}

/// Functions that have a record.
pub fn recorded(state_dir: &Path) -> Result<Vec<Bdf>, RecordError> {
    let dir = records_dir(state_dir);
    let names =
        sysfs::list_dir_opt(&dir).map_err(|source| RecordError::Read { path: dir, source })?;
    Ok(names
        .iter()
        .filter_map(|n| n.to_str()?.strip_suffix(".json")?.parse().ok())
        .collect())
}
