//! Finding QEMU on this machine and reading its version.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::root::HostRoot;

use super::Check;

/// The QEMU binary gpucell runs.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// Oldest QEMU doctor calls fine (Ubuntu 22.04's); older ones get a warning.
pub const MIN_VERSION: (u32, u32) = (6, 2);
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// What was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum QemuInfo {
    Found {
        path: PathBuf,
        /// `major.minor.patch` from `--version`.
        version: Option<String>,
    },
    NotFound,
    /// Found but `--version` failed.
    Broken {
        path: PathBuf,
        reason: String,
    },
}

/// Looks for [`QEMU_BINARY`] in `path_var` (a `PATH` value) and asks it for its version.
pub fn find(path_var: Option<&OsStr>) -> QemuInfo {
    let Some(path_var) = path_var else {
        return QemuInfo::NotFound;
    };
    let Some(path) = std::env::split_paths(path_var)
        .map(|d| d.join(QEMU_BINARY))
        .find(|p| is_executable(p))
    else {
        return QemuInfo::NotFound;
    };
    match version_of(&path) {
        Ok(text) => QemuInfo::Found {
            version: parse_version(&text),
            path,
        },
        Err(reason) => QemuInfo::Broken { path, reason },
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `<path> --version` with a timeout; the child is killed and reaped on every path.
fn version_of(path: &Path) -> Result<String, String> {
    let mut child = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < VERSION_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --version did not answer within {VERSION_TIMEOUT:?}",
                    path.display()
                ));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waiting for {} --version: {e}", path.display()));
            }
        }
    };
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        // Bounded: a version banner is a few hundred bytes.
        let _ = stdout.take(64 * 1024).read_to_string(&mut out);
    }
    if !status.success() {
        return Err(format!("{} --version exited with {status}", path.display()));
    }
    Ok(out)
}

/// `QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)` → `7.2.19`.
pub fn parse_version(text: &str) -> Option<String> {
    let rest = text.split("version ").nth(1)?;
    let v: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let v = v.trim_end_matches('.');
    (!v.is_empty() && v.split('.').all(|p| !p.is_empty())).then(|| v.to_string())
}

fn major_minor(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split('.');
    Some((
        it.next()?.parse().ok()?,
        it.next().unwrap_or("0").parse().ok()?,
    ))
}

pub(super) fn check(q: &QemuInfo, root: &HostRoot) -> Check {
    const ID: &str = "qemu";
    const TITLE: &str = "QEMU";
    let here = if root.is_live() {
        String::new()
    } else {
        " (looked up on this machine's PATH, not under --host-root)".to_string()
    };
    let fix_install = "install QEMU (Debian/Ubuntu: apt-get install qemu-system-x86) so that qemu-system-x86_64 is on PATH";
    match q {
        QemuInfo::NotFound => Check::fail(
            ID,
            TITLE,
            format!("{QEMU_BINARY} not found on PATH{here}"),
            fix_install,
        ),
        QemuInfo::Broken { path, reason } => Check::fail(
            ID,
            TITLE,
            format!("{} does not run: {reason}{here}", path.display()),
            fix_install,
        ),
        QemuInfo::Found { path, version } => {
            let v = version.as_deref().unwrap_or("unknown version");
            match version.as_deref().and_then(major_minor) {
                Some(mm) if mm >= MIN_VERSION => {
                    Check::pass(ID, TITLE, format!("{} {v}{here}", path.display()))
                }
                _ => Check::warn(
                    ID,
                    TITLE,
                    format!("{} {v}{here}", path.display()),
                    format!(
                        "gpucell is tested with QEMU {}.{} or newer; upgrade QEMU",
                        MIN_VERSION.0, MIN_VERSION.1
                    ),
                ),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)\nCopyright")
                .as_deref(),
            Some("7.2.19")
        );
        assert_eq!(
            parse_version("QEMU emulator version 9.0.0\n").as_deref(),
            Some("9.0.0")
        );
        assert_eq!(parse_version("garbage"), None);
        assert_eq!(parse_version("version x"), None);
        assert_eq!(major_minor("7.2.19"), Some((7, 2)));
    }

    #[test]
    fn finds_a_qemu_on_path_and_reads_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join(QEMU_BINARY);
        std::fs::write(
            &bin,
            "#!/bin/sh\necho 'QEMU emulator version 8.1.3 (test)'\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let path = std::env::join_paths([Path::new("/nonexistent"), dir.path()]).unwrap();
        assert_eq!(
            find(Some(&path)),
            QemuInfo::Found {
                path: bin.clone(),
                version: Some("8.1.3".into())
            }
        );
        std::fs::write(&bin, "#!/bin/sh\nexit 3\n").unwrap();
        assert!(matches!(find(Some(&path)), QemuInfo::Broken { .. }));
        assert_eq!(find(Some(OsStr::new("/nonexistent"))), QemuInfo::NotFound);
    }
}
