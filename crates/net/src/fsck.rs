//! `gpucell fsck` for the network records (`<state>/net/*.json`). A record that does not
//! parse is skipped by setup and doctor, so what it names (a tap, an nft table, a slot)
//! is never cleaned up: fsck names it. It is not removed automatically: it is the only
//! note of what may still exist on the host. Leftover temporary files are removed.

use std::path::Path;

use gpucell_common::fsck::{remove_path, Finding};

use crate::record::{NetRecord, RecordError, Records, RECORD_DIR};

/// Checks the network records of `state_dir`, under their lock.
pub fn fsck(state_dir: &Path, repair: bool) -> Result<Vec<Finding>, RecordError> {
    let dir = state_dir.join(RECORD_DIR);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let _lock = Records::lock(state_dir)?;
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    let mut paths: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') && name.ends_with(".tmp") {
            out.push(Finding::repairable(
                &path,
                "network record",
                "a temporary file left by a run that was killed while writing its record",
                "remove it",
                repair,
                || remove_path(&path),
            ));
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        let problem = match std::fs::read(&path) {
            Err(e) => format!("cannot be read: {e}"),
            Ok(bytes) => match serde_json::from_slice::<NetRecord>(&bytes) {
                Ok(r) if format!("{}.json", r.run_id) == name => continue,
                Ok(r) => format!("names run {:?}, not the one of its file name", r.run_id),
                Err(e) => format!("damaged: {e}"),
            },
        };
        let run = name.trim_end_matches(".json");
        out.push(Finding::refused(
            &path,
            "network record",
            problem,
            format!(
                "remove what run {run} may have left by hand (`ip link` for its tap, \
                 `nft list tables` for a gpucell table), then the file"
            ),
        ));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use gpucell_common::fsck::Outcome;

    #[test]
    fn damaged_records_are_refused_and_leftovers_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(fsck(dir.path(), true).unwrap().is_empty());
        let net = dir.path().join("net");
        std::fs::create_dir_all(&net).unwrap();
        std::fs::write(
            net.join("run-1.json"),
            r#"{"run_id":"run-1","owner":{"pid":1"#,
        )
        .unwrap();
        std::fs::write(net.join(".run-2.tmp"), "{").unwrap();
        let found = fsck(dir.path(), false).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].file, net.join(".run-2.tmp"));
        assert!(matches!(found[0].outcome, Outcome::Repairable(_)));
        assert_eq!(found[1].file, net.join("run-1.json"));
        assert!(
            found[1].problem.starts_with("damaged:"),
            "{}",
            found[1].problem
        );
        assert!(matches!(&found[1].outcome, Outcome::Refused(t) if t.contains("run run-1")));
        let found = fsck(dir.path(), true).unwrap();
        assert!(matches!(found[0].outcome, Outcome::Repaired(_)));
        assert!(!net.join(".run-2.tmp").exists());
        assert!(net.join("run-1.json").exists(), "a damaged record is kept");
    }
}
