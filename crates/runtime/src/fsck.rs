//! `gpucell fsck`: every file of a state directory that gpucell reads back is checked by
//! the crate that owns it (image store, device records, network records, guest flavours)
//! plus the small cache files here. With `repair`, what can be made again safely is
//! removed or rebuilt; the rest is refused with what to do by hand.

use std::path::{Path, PathBuf};

use gpucell_common::fsck::{remove_path, Finding};
use serde::Serialize;

/// Largest cache file read (they are a few hundred bytes).
const MAX_CACHE_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error("state directory {} does not exist or is not a directory; name it with --state-dir", .0.display())]
    NoStateDir(PathBuf),
    #[error("checking the image store under {}", .0.display())]
    Images(PathBuf, #[source] Box<gpucell_image::Error>),
    #[error("checking the network records under {}", .0.display())]
    Net(PathBuf, #[source] gpucell_net::record::RecordError),
}

/// `gpucell fsck --json`'s document.
#[derive(Debug, Clone, Serialize)]
pub struct FsckReport {
    pub state_dir: PathBuf,
    pub repair: bool,
    /// One per damaged or leftover file, in the order checked.
    pub findings: Vec<Finding>,
    /// Whether something is still damaged (a finding not repaired).
    pub damage_left: bool,
}

/// Checks (and with `repair`, repairs) `state_dir`.
pub fn fsck(state_dir: &Path, repair: bool) -> Result<FsckReport, FsckError> {
    if !state_dir.is_dir() {
        return Err(FsckError::NoStateDir(state_dir.to_owned()));
    }
    let mut findings = Vec::new();
    if state_dir.join("images").is_dir() {
        let store = gpucell_image::Store::open(state_dir)
            .map_err(|e| FsckError::Images(state_dir.join("images"), Box::new(e)))?;
        findings.extend(
            store
                .fsck(repair)
                .map_err(|e| FsckError::Images(state_dir.join("images"), Box::new(e)))?,
        );
    }
    findings.extend(gpucell_host::devices::fsck::fsck(state_dir));
    findings.extend(
        gpucell_net::fsck::fsck(state_dir, repair)
            .map_err(|e| FsckError::Net(state_dir.join("net"), e))?,
    );
    findings.extend(gpucell_guest::fsck::fsck(state_dir, repair));
    findings.extend(fsck_caches(state_dir, repair));
    let damage_left = findings.iter().any(|f| f.outcome.is_damage_left());
    Ok(FsckReport {
        state_dir: state_dir.to_owned(),
        repair,
        findings,
        damage_left,
    })
}

/// `<state>/cache/*.json` (accelerator probe verdict, QEMU capabilities): readers ignore
/// a damaged one and probe again, so removing it is always safe.
fn fsck_caches(state_dir: &Path, repair: bool) -> Vec<Finding> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("cache")) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let problem = cache_problem(&path)?;
            Some(Finding::repairable(
                &path,
                "cache file",
                problem,
                "remove it (it is probed again on the next run)",
                repair,
                || remove_path(&path),
            ))
        })
        .collect()
}

fn cache_problem(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let read =
        std::fs::File::open(path).and_then(|f| f.take(MAX_CACHE_FILE + 1).read_to_end(&mut bytes));
    if let Err(e) = read {
        return Some(format!("cannot be read: {e}"));
    }
    if bytes.len() as u64 > MAX_CACHE_FILE {
        return Some(format!("larger than {MAX_CACHE_FILE} bytes"));
    }
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .err()
        .map(|e| format!("not valid JSON (truncated or corrupt): {e}"))
}
