//! Replacing files atomically. The one rule, used for every file gpucell replaces:
//!
//! 1. the new content goes to a temporary file on the same filesystem (next to the
//!    target unless the caller names another directory of that filesystem);
//! 2. the temporary file is fsynced;
//! 3. it is renamed over the target;
//! 4. the directory holding the target is fsynced.
//!
//! A reader sees the old or the new content, never part of it, and after a crash the
//! target holds one of the two, complete. On every error before the rename the temporary
//! file is removed. An error from step 4 is returned too: the new content is then in
//! place but might not survive a crash.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file being written that appears under its final name only on [`AtomicFile::commit`].
/// Dropped without committing, it removes its temporary file.
#[derive(Debug)]
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl AtomicFile {
    /// Starts replacing `dest`: a temporary file (mode 0600) in `dest`'s directory.
    pub fn create(dest: &Path) -> io::Result<AtomicFile> {
        Self::create_in(dest, parent_dir(dest))
    }

    /// Like [`AtomicFile::create`], with the temporary file in `temp_dir`, which must be
    /// on `dest`'s filesystem (a store's `tmp/`, swept of leftovers after a crash).
    pub fn create_in(dest: &Path, temp_dir: &Path) -> io::Result<AtomicFile> {
        let name = dest
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "has no file name"))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", name.to_string_lossy()))
            .suffix(".tmp")
            .tempfile_in(temp_dir)?;
        Ok(AtomicFile {
            tmp,
            dest: dest.to_owned(),
        })
    }

    /// The temporary file, for writing, `set_permissions` or `fchown`.
    pub fn as_file(&self) -> &File {
        self.tmp.as_file()
    }

    /// Where the content is written until the commit.
    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// The name the content gets.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// fsync, rename over the target, fsync its directory (the module's rule).
    pub fn commit(self) -> io::Result<()> {
        self.tmp.as_file().sync_all()?;
        // On failure the temporary file comes back inside the error and is removed with it.
        self.tmp.persist(&self.dest).map_err(|e| e.error)?;
        sync_dir(parent_dir(&self.dest))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tmp.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

/// Writes `content` to `path` atomically. An existing file keeps its mode and owner; a
/// new one gets `new_mode`. `path` must be a regular file or missing: a symbolic link
/// (which would be replaced by a file) or a directory is refused with `InvalidInput`.
/// The directory must exist.
pub fn write_atomic(path: &Path, content: &[u8], new_mode: u32) -> io::Result<()> {
    let existing = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a symbolic link; edit its target by hand",
            ))
        }
        Ok(m) if !m.is_file() => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is not a regular file",
            ))
        }
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut file = AtomicFile::create(path)?;
    file.write_all(content)?;
    let mode = existing.as_ref().map_or(new_mode, |m| m.mode() & 0o7777);
    file.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    if let Some(m) = &existing {
        let meta = file.as_file().metadata()?;
        if meta.uid() != m.uid() || meta.gid() != m.gid() {
            std::os::unix::fs::fchown(file.as_file(), Some(m.uid()), Some(m.gid()))?;
        }
    }
    file.commit()
}

/// Moves a complete file that something else wrote (a tool's output) to `to` under the
/// same rule: fsync it, rename, fsync `to`'s directory. `from` must be on `to`'s filesystem.
pub fn rename_synced(from: &Path, to: &Path) -> io::Result<()> {
    File::open(from)?.sync_all()?;
    fs::rename(from, to)?;
    sync_dir(parent_dir(to))
}

/// fsyncs a directory, making the names created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_keeps_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.conf");
        write_atomic(&p, b"one\n", 0o644).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o644);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        write_atomic(&p, b"two\n", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two\n");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(names(dir.path()), ["f.conf"]);
    }

    #[test]
    fn refusals_and_failures_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::write(&real, "x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = write_atomic(&link, b"y", 0o644).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(fs::read_to_string(&real).unwrap(), "x");
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("keep"), "k").unwrap();
        assert_eq!(
            write_atomic(&sub, b"y", 0o644).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(write_atomic(&dir.path().join("no/such/f"), b"y", 0o644).is_err());
        // A failure after the temporary file exists: the rename onto a non-empty directory.
        let mut f = AtomicFile::create(&sub).unwrap();
        f.write_all(b"data").unwrap();
        assert!(f.temp_path().exists());
        assert!(f.commit().is_err());
        assert_eq!(names(dir.path()), ["link", "real", "sub"]);
        assert_eq!(names(&sub), ["keep"]);
    }

    #[test]
    fn uncommitted_files_vanish_and_other_temp_dirs_work() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        let dest = dir.path().join("blob");
        let mut f = AtomicFile::create_in(&dest, &tmp).unwrap();
        f.write_all(b"partial").unwrap();
        assert_eq!(f.temp_path().parent(), Some(tmp.as_path()));
        drop(f);
        assert!(names(&tmp).is_empty());
        assert!(!dest.exists());
        let mut f = AtomicFile::create_in(&dest, &tmp).unwrap();
        f.write_all(b"whole").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"whole");
        assert!(names(&tmp).is_empty());
        // The target's directory missing: the rename fails, the temporary file goes.
        let f = AtomicFile::create_in(&dir.path().join("gone/blob"), &tmp).unwrap();
        assert!(f.commit().is_err());
        assert!(names(&tmp).is_empty());
    }

    #[test]
    fn rename_synced_moves_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("out.img");
        fs::write(&from, b"disk").unwrap();
        let to = dir.path().join("disk.img");
        rename_synced(&from, &to).unwrap();
        assert_eq!(fs::read(&to).unwrap(), b"disk");
        assert!(!from.exists());
        assert!(rename_synced(&from, &to).is_err());
    }
}
