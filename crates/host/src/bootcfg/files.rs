//! The managed files: their current content, unified diffs, and [`apply`].

use std::path::{Path, PathBuf};

use super::{
    ApplyReport, BootCfgError, BootPlan, FileAction, FileChange, BACKUP_SUFFIX, NEW_FILE_MODE,
};
use crate::root::HostRoot;
use crate::sysfs;

pub(super) fn read_current(path: &Path) -> Result<Option<String>, BootCfgError> {
    match sysfs::read_raw(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(source) => Err(BootCfgError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

pub(super) fn file_change(
    target: &HostRoot,
    rel: &str,
    new: String,
) -> Result<FileChange, BootCfgError> {
    let target_path = target.etc(rel);
    let shown = Path::new("/etc").join(rel);
    let old = read_current(&target_path)?;
    let mode = std::fs::metadata(&target_path)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
        .unwrap_or(NEW_FILE_MODE);
    let (action, diff) = match &old {
        Some(o) if *o == new => (FileAction::Unchanged, String::new()),
        Some(o) => (FileAction::Modify, unified_diff(o, &new, &shown, &shown)),
        None => (
            FileAction::Create,
            unified_diff("", &new, Path::new("/dev/null"), &shown),
        ),
    };
    Ok(FileChange {
        path: shown,
        target_path,
        action,
        mode,
        diff,
        content: new,
        old,
    })
}

fn unified_diff(old: &str, new: &str, from: &Path, to: &Path) -> String {
    let from = if from == Path::new("/dev/null") {
        "/dev/null".to_owned()
    } else {
        format!("a{}", from.display())
    };
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&from, &format!("b{}", to.display()))
        .to_string()
}

/// Writes every changed file of `plan`: a `.gpucell-bak` copy of a modified file's
/// current content first (kept if one exists already, so it holds the content from
/// before gpucell's first change), then the new content atomically. Refuses a file
/// that changed since it was planned.
pub fn apply(plan: &BootPlan) -> Result<ApplyReport, BootCfgError> {
    let mut report = ApplyReport::default();
    for f in plan
        .files
        .iter()
        .filter(|f| f.action != FileAction::Unchanged)
    {
        let path = &f.target_path;
        if read_current(path)? != f.old {
            return Err(BootCfgError::Changed { path: path.clone() });
        }
        let write_err = |source| BootCfgError::Write {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| BootCfgError::Write {
                path: parent.to_owned(),
                source,
            })?;
        }
        if let Some(old) = &f.old {
            let mut backup = path.clone().into_os_string();
            backup.push(BACKUP_SUFFIX);
            let backup = PathBuf::from(backup);
            if std::fs::symlink_metadata(&backup).is_err() {
                gpucell_common::write_atomic(&backup, old.as_bytes(), f.mode).map_err(
                    |source| BootCfgError::Write {
                        path: backup.clone(),
                        source,
                    },
                )?;
                report.backups.push(backup);
            }
        }
        gpucell_common::write_atomic(path, f.content.as_bytes(), f.mode).map_err(write_err)?;
        tracing::info!(path = %path.display(), "wrote");
        report.written.push(path.clone());
    }
    Ok(report)
}
