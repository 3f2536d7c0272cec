//! What the installed QEMU supports (version, seccomp), read once per QEMU binary and
//! cached in the state dir.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::args::RunAs;

const CACHE_FILE: &str = "cache/qemu-caps.json";

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("cannot run {binary:?} -version; install qemu-system-x86 or pass the right path")]
    Run {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the version of {binary:?} from {output:?}")]
    Version { binary: String, output: String },
}

/// Capabilities of one QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuCaps {
    pub major: u32,
    pub minor: u32,
    /// `-sandbox` (seccomp) is compiled in.
    pub seccomp: bool,
}

impl QemuCaps {
    /// The flag that drops privileges to `user` on this QEMU (`-run-with` from 9.1).
    pub fn run_as(&self, user: &str) -> RunAs {
        if (self.major, self.minor) >= (9, 1) {
            RunAs::RunWith(user.to_string())
        } else {
            RunAs::Runas(user.to_string())
        }
    }
}

/// Parses `QEMU emulator version 7.2.22 (...)`.
pub fn parse_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn run(binary: &Path, arg: &str) -> Result<String, CapsError> {
    let out = Command::new(binary)
        .arg(arg)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|source| CapsError::Run {
            binary: binary.display().to_string(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cache_key(binary: &Path) -> String {
    fs::metadata(binary)
        .map(|m| format!("{}:{}:{}:{}", binary.display(), m.len(), m.mtime(), m.ino()))
        .unwrap_or_default()
}

/// The capabilities cached in `state_dir` for this very binary (same path, size, mtime
/// and inode), if any. Reads only.
pub fn cached(binary: &Path, state_dir: &Path) -> Option<QemuCaps> {
    let key = cache_key(binary);
    let text = fs::read_to_string(state_dir.join(CACHE_FILE)).ok()?;
    let (k, caps) = serde_json::from_str::<(String, QemuCaps)>(&text).ok()?;
    (k == key && !key.is_empty()).then_some(caps)
}

/// Asks the binary (`-version`, `-help`; no VM is started). Writes nothing.
pub fn query(binary: &Path) -> Result<QemuCaps, CapsError> {
    let version = run(binary, "-version")?;
    let (major, minor) = parse_version(&version).ok_or_else(|| CapsError::Version {
        binary: binary.display().to_string(),
        output: version.chars().take(200).collect(),
    })?;
    let help = run(binary, "-help")?;
    Ok(QemuCaps {
        major,
        minor,
        seccomp: help.lines().any(|l| l.starts_with("-sandbox")),
    })
}

/// The capabilities without writing anything: the cache in `state_dir` when it
/// matches, else [`query`].
pub fn detect_read_only(binary: &Path, state_dir: Option<&Path>) -> Result<QemuCaps, CapsError> {
    match state_dir.and_then(|s| cached(binary, s)) {
        Some(caps) => Ok(caps),
        None => query(binary),
    }
}

/// Reads the capabilities, from the cache when the binary did not change; caches
/// what it had to ask.
pub fn detect(binary: &Path, state_dir: Option<&Path>) -> Result<QemuCaps, CapsError> {
    if let Some(caps) = state_dir.and_then(|s| cached(binary, s)) {
        return Ok(caps);
    }
    let caps = query(binary)?;
    if let Some(path) = state_dir.map(|s| s.join(CACHE_FILE)) {
        let bytes = serde_json::to_vec(&(cache_key(binary), &caps)).unwrap_or_default();
        if let Err(e) = crate::cachefile::write_replacing(&path, &bytes) {
            tracing::debug!(error = %e, "could not cache QEMU capabilities");
        }
    }
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_run_as_flag() {
        let v = parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n");
        assert_eq!(v, Some((7, 2)));
        assert_eq!(parse_version("QEMU emulator version 10.0.2"), Some((10, 0)));
        assert_eq!(parse_version("nonsense"), None);
        let old = QemuCaps {
            major: 7,
            minor: 2,
            seccomp: true,
        };
        assert_eq!(old.run_as("nobody"), RunAs::Runas("nobody".into()));
        let new = QemuCaps {
            major: 9,
            minor: 1,
            seccomp: true,
        };
        assert_eq!(new.run_as("nobody"), RunAs::RunWith("nobody".into()));
    }

    #[test]
    fn detects_the_installed_qemu() {
        let bin = Path::new("/usr/bin/qemu-system-x86_64");
        if !bin.exists() {
            eprintln!("skipping: {} is not installed", bin.display());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // Asking without caching writes nothing.
        let asked = detect_read_only(bin, Some(dir.path())).unwrap();
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        let caps = detect(bin, Some(dir.path())).unwrap();
        assert_eq!(asked, caps);
        assert!(caps.major >= 5, "{caps:?}");
        assert_eq!(cached(bin, dir.path()), Some(caps.clone()));
        assert!(dir.path().join(CACHE_FILE).is_file());
        assert_eq!(detect(bin, Some(dir.path())).unwrap(), caps);
    }
}
