//! What a state-directory check found: one [`Finding`] per damaged file, with what was
//! (or would be) done about it. Each crate checks the files it owns; `gpucell fsck`
//! gathers the findings.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// One damaged or leftover file in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The file (or directory) concerned.
    pub file: PathBuf,
    /// What kind of file it is: `image blob`, `allocation record`, ...
    pub what: String,
    /// What is wrong with it.
    pub problem: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What happened (or would happen with `--repair`) to a damaged file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "action", rename_all = "snake_case")]
pub enum Outcome {
    /// `--repair` would do this (safe: the file is rebuilt or fetched again when needed).
    Repairable(String),
    /// Done by `--repair`.
    Repaired(String),
    /// Not repaired automatically, because it is not safe: what the operator should do.
    Refused(String),
    /// `--repair` tried and failed: why.
    RepairFailed(String),
}

impl Outcome {
    /// Whether the state directory is still damaged after this outcome.
    pub fn is_damage_left(&self) -> bool {
        !matches!(self, Outcome::Repaired(_))
    }
}

impl Finding {
    /// A finding repaired by `repair` (when `do_repair`), else reported as repairable by
    /// `action`: the action's result decides between [`Outcome::Repaired`] and
    /// [`Outcome::RepairFailed`].
    pub fn repairable(
        file: impl Into<PathBuf>,
        what: &str,
        problem: impl Into<String>,
        action: &str,
        do_repair: bool,
        repair: impl FnOnce() -> std::io::Result<()>,
    ) -> Finding {
        let outcome = if !do_repair {
            Outcome::Repairable(action.to_owned())
        } else {
            match repair() {
                Ok(()) => Outcome::Repaired(action.to_owned()),
                Err(e) => Outcome::RepairFailed(format!("{action}: {e}")),
            }
        };
        Finding {
            file: file.into(),
            what: what.to_owned(),
            problem: problem.into(),
            outcome,
        }
    }

    /// A finding that is never repaired automatically; `todo` says what to do by hand.
    pub fn refused(
        file: impl Into<PathBuf>,
        what: &str,
        problem: impl Into<String>,
        todo: impl Into<String>,
    ) -> Finding {
        Finding {
            file: file.into(),
            what: what.to_owned(),
            problem: problem.into(),
            outcome: Outcome::Refused(todo.into()),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.what, self.file.display(), self.problem)?;
        match &self.outcome {
            Outcome::Repairable(a) => write!(f, " (--repair would: {a})"),
            Outcome::Repaired(a) => write!(f, " (repaired: {a})"),
            Outcome::Refused(a) => write!(f, " (not repaired automatically: {a})"),
            Outcome::RepairFailed(a) => write!(f, " (repair failed: {a})"),
        }
    }
}

/// Removes a file or a directory tree; a path already gone is fine.
pub fn remove_path(path: &std::path::Path) -> std::io::Result<()> {
    let res = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match res {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairable_findings_run_the_repair_only_when_asked() {
        let mut ran = false;
        let f = Finding::repairable("/s/x", "cache file", "not JSON", "remove it", false, || {
            ran = true;
            Ok(())
        });
        assert!(!ran);
        assert_eq!(f.outcome, Outcome::Repairable("remove it".into()));
        assert_eq!(
            f.to_string(),
            "cache file /s/x: not JSON (--repair would: remove it)"
        );
        let f = Finding::repairable("/s/x", "cache file", "not JSON", "remove it", true, || {
            Err(std::io::Error::other("read-only"))
        });
        assert_eq!(
            f.outcome,
            Outcome::RepairFailed("remove it: read-only".into())
        );
        assert!(f.outcome.is_damage_left());
        let json = serde_json::to_value(&f).unwrap_or_default();
        assert_eq!(json["outcome"], "repair_failed");
        assert_eq!(json["file"], "/s/x");
    }
}
