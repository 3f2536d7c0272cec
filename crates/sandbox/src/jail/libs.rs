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

/// [`Libraries`] remembered in a state directory's cache file, per binary: asking `ldd`
/// runs a shell and the loader (tens of milliseconds, on every run before QEMU starts),
/// while the answer changes only with the binary or the loader's cache. An entry holds
/// the binary's path, size, mtime and inode and `/etc/ld.so.cache`'s mtime; any change
/// asks `inner` again. A cache that cannot be written only costs the next run the ask.
pub struct Cached<L> {
    inner: L,
    file: PathBuf,
    ld_cache: PathBuf,
}

/// The cache file under a state directory.
pub const CACHE_FILE: &str = "cache/jail-libraries.json";

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct CacheFile {
    /// `identity(binary)` → its libraries.
    entries: std::collections::BTreeMap<String, Vec<PathBuf>>,
}

/// Most binaries remembered (QEMU and its accelerator modules: a few per QEMU).
const MAX_ENTRIES: usize = 64;

impl<L: Libraries> Cached<L> {
    pub fn new(inner: L, state_dir: &Path) -> Self {
        Cached {
            inner,
            file: state_dir.join(CACHE_FILE),
            ld_cache: PathBuf::from("/etc/ld.so.cache"),
        }
    }

    fn identity(&self, binary: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(binary).ok()?;
        let ld = std::fs::metadata(&self.ld_cache)
            .map(|m| m.mtime_nsec() + m.mtime() * 1_000_000_000)
            .unwrap_or(0);
        Some(format!(
            "{}:{}:{}.{}:{}:{ld}",
            binary.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ino()
        ))
    }

    fn read(&self) -> CacheFile {
        std::fs::read(&self.file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

impl<L: Libraries> Libraries for Cached<L> {
    fn of(&self, binary: &Path) -> Result<Vec<PathBuf>, LibsError> {
        let Some(key) = self.identity(binary) else {
            return self.inner.of(binary);
        };
        let mut cache = self.read();
        if let Some(libs) = cache.entries.get(&key) {
            // A library gone since (a package removed) asks again.
            if libs.iter().all(|l| l.exists()) {
                return Ok(libs.clone());
            }
        }
        let libs = self.inner.of(binary)?;
        let prefix = format!("{}:", binary.display());
        cache.entries.retain(|k, _| !k.starts_with(&prefix));
        if cache.entries.len() >= MAX_ENTRIES {
            cache.entries.clear();
        }
        cache.entries.insert(key, libs.clone());
        match serde_json::to_vec(&cache) {
            Ok(bytes) => {
                if let Err(e) = crate::cachefile::write_replacing(&self.file, &bytes) {
                    tracing::debug!(file = %self.file.display(), error = %e, "the library cache was not written");
                }
            }
            Err(e) => tracing::debug!(error = %e, "serializing the library cache"),
        }
        Ok(libs)
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
    use std::cell::Cell;

    /// Counts its asks; answers `libs`.
    struct Counting<'a> {
        asks: &'a Cell<u32>,
        libs: Vec<PathBuf>,
    }

    impl Libraries for Counting<'_> {
        fn of(&self, _binary: &Path) -> Result<Vec<PathBuf>, LibsError> {
            self.asks.set(self.asks.get() + 1);
            Ok(self.libs.clone())
        }
    }

    #[test]
    fn the_cache_answers_until_the_binary_or_a_library_changes() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("qemu");
        let lib = dir.path().join("libz.so.1");
        std::fs::write(&bin, b"v1").unwrap();
        std::fs::write(&lib, b"z").unwrap();
        let asks = Cell::new(0);
        let cached = |asks| {
            Cached::new(
                Counting {
                    asks,
                    libs: vec![lib.clone()],
                },
                dir.path(),
            )
        };
        assert_eq!(cached(&asks).of(&bin).unwrap(), std::slice::from_ref(&lib));
        assert_eq!(cached(&asks).of(&bin).unwrap(), std::slice::from_ref(&lib));
        assert_eq!(asks.get(), 1, "the second run reads the cache");
        // A changed binary (another size) is asked again.
        std::fs::write(&bin, b"version 2").unwrap();
        cached(&asks).of(&bin).unwrap();
        assert_eq!(asks.get(), 2);
        // A library that went away is asked again.
        std::fs::remove_file(&lib).unwrap();
        cached(&asks).of(&bin).unwrap();
        assert_eq!(asks.get(), 3);
        // One entry per binary, not one per version of it.
        let text = std::fs::read_to_string(dir.path().join(CACHE_FILE)).unwrap();
        let file: CacheFile = serde_json::from_str(&text).unwrap();
        assert_eq!(file.entries.len(), 1, "{text}");
        // A corrupt cache file is asked past, and replaced.
        std::fs::write(dir.path().join(CACHE_FILE), b"{not json").unwrap();
        std::fs::write(&lib, b"z").unwrap();
        cached(&asks).of(&bin).unwrap();
        assert_eq!(asks.get(), 4);
        cached(&asks).of(&bin).unwrap();
        assert_eq!(asks.get(), 4);
    }

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
