//! `gpucell fsck` for the device records: `allocations.json` and `quarantine.json` are
//! read with the same checks allocation applies. A damaged one is never repaired
//! automatically: it says which GPUs are in use or unsafe, and guessing could hand a
//! busy or unreset GPU to the next tenant (allocation fails closed meanwhile).

use std::path::Path;

use gpucell_common::fsck::Finding;

use super::record::{allocations_path, load_allocations, load_quarantine, quarantine_path};
use super::RecordError;

/// Checks the device records of `state_dir`.
pub fn fsck(state_dir: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Err(e) = load_allocations(state_dir) {
        out.push(finding(
            &allocations_path(state_dir),
            "allocation record",
            &e,
            "stop every sandbox on this host, move the file away, then run `gpucell gpu list` \
             and release or check by hand each GPU it held",
        ));
    }
    if let Err(e) = load_quarantine(state_dir) {
        out.push(finding(
            &quarantine_path(state_dir),
            "quarantine record",
            &e,
            "move the file away only after checking by hand that every GPU it may have \
             named resets (`gpucell gpu list`); until then allocation stays refused",
        ));
    }
    out
}

fn finding(path: &Path, what: &str, e: &RecordError, todo: &str) -> Finding {
    let problem = match e {
        RecordError::Damaged { why, .. } => format!("damaged: {why}"),
        other => gpucell_common::chain_string(other),
    };
    Finding::refused(path, what, problem, todo)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use gpucell_common::fsck::Outcome;

    #[test]
    fn damaged_records_are_named_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(fsck(dir.path()).is_empty(), "no records: nothing to say");
        std::fs::create_dir_all(dir.path().join("devices")).unwrap();
        // Truncated in the middle of an entry.
        std::fs::write(
            allocations_path(dir.path()),
            r#"{ "version": 1, "allocations": [ { "bdf": "0000:10:00.0", "ven"#,
        )
        .unwrap();
        // Valid JSON, but the same device twice.
        std::fs::write(
            quarantine_path(dir.path()),
            r#"{"version":1,"devices":[{"bdf":"0000:10:00.0","vendor":1,"device":2,"reason":"x","since_unix":1},{"bdf":"0000:10:00.0","vendor":1,"device":2,"reason":"y","since_unix":2}]}"#,
        )
        .unwrap();
        let found = fsck(dir.path());
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].file, allocations_path(dir.path()));
        assert!(
            found[0].problem.starts_with("damaged: EOF"),
            "{}",
            found[0].problem
        );
        assert!(matches!(found[0].outcome, Outcome::Refused(_)));
        assert_eq!(found[1].file, quarantine_path(dir.path()));
        assert!(
            found[1].problem.contains("listed twice"),
            "{}",
            found[1].problem
        );
        // Nothing was touched.
        assert!(allocations_path(dir.path()).exists());
    }
}
