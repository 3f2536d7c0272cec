//! Small cache files in the state dir (accelerator probe verdict, QEMU capabilities),
//! replaced atomically so that a concurrent reader never sees half a file.

use std::fs;
use std::io;
use std::path::Path;

/// Writes `bytes` to `path` (mode 0644 when new), creating its directory, under the
/// atomic-replacement rule of [`gpucell_common::atomic`]; the temporary file is removed
/// when anything fails.
pub(crate) fn write_replacing(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    gpucell_common::write_atomic(path, bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("sub/cache.json");
        write_replacing(&path, b"one").unwrap_or_else(|e| panic!("{e}"));
        write_replacing(&path, b"two").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fs::read(&path).unwrap_or_default(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path().join("sub"))
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("cache.json")]);
        // A path whose parent is a file cannot be written: an error, no leftovers.
        assert!(write_replacing(&path.join("x"), b"three").is_err());
    }
}
