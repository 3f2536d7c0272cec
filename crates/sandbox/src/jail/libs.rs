//! The shared libraries a binary loads, so the jail can show exactly those: asked of
//! `ldd`, or of the dynamic loader's `--list` where there is no `ldd` (the only
//! processes this starts), behind [`Libraries`] so tests pass a fake.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum LibsError {
    #[error("cannot run ldd on {binary:?}")]
    Run {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ldd failed on {binary:?}: {stderr}")]
    Failed { binary: PathBuf, stderr: String },
    #[error("ldd on {binary:?} says {line:?}: a library is missing")]
    Missing { binary: PathBuf, line: String },
}

/// The x86-64 dynamic loader, asked with `--list` where there is no `ldd`.
const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";

/// Finds the libraries a binary or module loads.
pub trait Libraries {
    fn of(&self, binary: &Path) -> Result<Vec<PathBuf>, LibsError>;
}

/// Asks `ldd`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ldd;

impl Libraries for Ldd {
    fn of(&self, binary: &Path) -> Result<Vec<PathBuf>, LibsError> {
        // ldd is the loader's `--list`; a host without ldd (a minimal initramfs, such
        // as the nested test host's) still has the loader.
        let out = match Command::new("ldd").arg(binary).output() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Command::new(LOADER).arg("--list").arg(binary).output()
            }
            other => other,
        }
        .map_err(|source| LibsError::Run {
            binary: binary.to_path_buf(),
            source,
        })?;
        if !out.status.success() {
            return Err(LibsError::Failed {
                binary: binary.to_path_buf(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        parse_ldd(binary, &String::from_utf8_lossy(&out.stdout))
    }
}

/// The absolute paths in `ldd`'s output (the vDSO has none and is skipped).
pub fn parse_ldd(binary: &Path, text: &str) -> Result<Vec<PathBuf>, LibsError> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            return Err(LibsError::Missing {
                binary: binary.to_path_buf(),
                line: line.to_string(),
            });
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            out.push(PathBuf::from(p));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_absolute_paths_only() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n";
        let libs = parse_ldd(Path::new("/q"), text).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        let missing = "\tlibfoo.so.1 => not found\n";
        assert!(matches!(
            parse_ldd(Path::new("/q"), missing),
            Err(LibsError::Missing { .. })
        ));
    }
}
