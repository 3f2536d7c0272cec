//! What a jailed process sees: a list of host paths shown at jail paths, read-only or
//! writable, on an otherwise empty root. [`View::plan`] turns it into the exact list
//! of directories to make, files to create and mounts to do, in order, so that the
//! child between fork and exec only runs system calls on prepared strings.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// One host path shown in the jail.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// The path on the host (followed if it is a symlink).
    pub host: PathBuf,
    /// Where it appears in the jail (absolute).
    pub jail: PathBuf,
    pub writable: bool,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryKind {
    File,
    Dir,
    /// A character device node: created afresh in the jail's root with the same
    /// device number, owned by the jail's uid, mode 0600 (the host's node is not
    /// touched, and no other sandbox's uid can open this one).
    Device {
        rdev: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("jail path {0:?} is not absolute and plain (no `..`, no `.`)")]
    BadJailPath(PathBuf),
    #[error("{0:?} is shown in the jail twice")]
    Duplicate(PathBuf),
    #[error("{path:?} contains a NUL byte")]
    Nul { path: PathBuf },
    #[error("{0:?} is shown in the jail under a path another entry shows as a file")]
    UnderFile(PathBuf),
}

/// The jail's whole view; `/proc` (of the jail's own pid namespace) is always added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    entries: Vec<Entry>,
}

/// One step of building the jail's root under a staging directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Mkdir(CString),
    /// Create an empty file to mount a file on.
    Touch(CString),
    /// Bind `src` on `dst`, then remount `nosuid,nodev`, and read-only when `ro`.
    Bind {
        src: CString,
        dst: CString,
        ro: bool,
    },
    /// Make a character device node owned by the jail's uid and gid, mode 0600.
    Mknod {
        path: CString,
        rdev: u64,
    },
    /// Mount the jail's own procfs here.
    Proc(CString),
}

fn plain(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)))
}

fn cstr(p: &Path) -> Result<CString, ViewError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| ViewError::Nul {
        path: p.to_path_buf(),
    })
}

impl View {
    pub fn new() -> Self {
        View::default()
    }

    /// Shows host path `host` at the same path in the jail.
    pub fn add(&mut self, host: impl Into<PathBuf>, kind: EntryKind, writable: bool) {
        let host = host.into();
        self.entries.push(Entry {
            jail: host.clone(),
            host,
            writable,
            kind,
        });
    }

    /// Shows host path `host` at `jail`.
    pub fn add_at(&mut self, host: impl Into<PathBuf>, jail: impl Into<PathBuf>, kind: EntryKind) {
        self.entries.push(Entry {
            host: host.into(),
            jail: jail.into(),
            writable: false,
            kind,
        });
    }

    /// Shows the host's device node `host` (a character device) at the same path, as
    /// a node of the jail's own (see [`EntryKind::Device`]).
    pub fn add_device(&mut self, host: impl Into<PathBuf>) -> std::io::Result<()> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let host = host.into();
        let meta = std::fs::metadata(&host)?;
        if !meta.file_type().is_char_device() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not a character device", host.display()),
            ));
        }
        self.add(host, EntryKind::Device { rdev: meta.rdev() }, true);
        Ok(())
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Every path the jail holds besides what is inside its directories and `/proc`:
    /// each entry and each directory leading to one (what a walk of `/` finds,
    /// not descending into shown directories).
    pub fn visible_paths(&self) -> BTreeSet<PathBuf> {
        let mut out = BTreeSet::new();
        for e in self
            .entries
            .iter()
            .map(|e| e.jail.as_path())
            .chain([Path::new("/proc")])
        {
            let mut p = e.to_path_buf();
            out.insert(p.clone());
            while p.pop() && p != Path::new("/") {
                out.insert(p.clone());
            }
        }
        out
    }

    /// The steps that build this view under `root` (a mount point of an empty tmpfs):
    /// parent directories first, then each entry sorted by jail path, so that a
    /// directory is mounted before what is mounted inside it.
    pub fn plan(&self, root: &Path) -> Result<Vec<Op>, ViewError> {
        let mut entries = self.entries.clone();
        entries.sort_by(|a, b| a.jail.cmp(&b.jail));
        let mut seen = BTreeSet::new();
        let files: BTreeSet<&Path> = entries
            .iter()
            .filter(|e| e.kind != EntryKind::Dir)
            .map(|e| e.jail.as_path())
            .collect();
        let mut dirs = BTreeSet::new();
        let mut ops = Vec::new();
        for e in &entries {
            if !plain(&e.jail) {
                return Err(ViewError::BadJailPath(e.jail.clone()));
            }
            if !seen.insert(e.jail.clone()) {
                return Err(ViewError::Duplicate(e.jail.clone()));
            }
            if e.jail.ancestors().skip(1).any(|a| files.contains(a)) {
                return Err(ViewError::UnderFile(e.jail.clone()));
            }
            let target = root.join(e.jail.strip_prefix("/").unwrap_or(&e.jail));
            let mut parents: Vec<&Path> = target
                .ancestors()
                .skip(1)
                .take_while(|a| *a != root)
                .collect();
            parents.reverse();
            for p in parents {
                if dirs.insert(p.to_path_buf()) {
                    ops.push(Op::Mkdir(cstr(p)?));
                }
            }
            match e.kind {
                EntryKind::Dir => {
                    if dirs.insert(target.clone()) {
                        ops.push(Op::Mkdir(cstr(&target)?));
                    }
                }
                EntryKind::File => ops.push(Op::Touch(cstr(&target)?)),
                EntryKind::Device { rdev } => {
                    ops.push(Op::Mknod {
                        path: cstr(&target)?,
                        rdev,
                    });
                    continue;
                }
            }
            ops.push(Op::Bind {
                src: cstr(&e.host)?,
                dst: cstr(&target)?,
                ro: !e.writable,
            });
        }
        let proc = root.join("proc");
        if !dirs.contains(&proc) {
            ops.push(Op::Mkdir(cstr(&proc)?));
        }
        ops.push(Op::Proc(cstr(&proc)?));
        Ok(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_makes_parents_once_then_binds_in_path_order() {
        let mut v = View::new();
        v.add("/usr/bin/qemu", EntryKind::File, false);
        v.add("/run/x", EntryKind::Dir, true);
        v.add("/dev/kvm", EntryKind::Device { rdev: 0xa_e8 }, true);
        v.add("/usr/lib/a.so", EntryKind::File, false);
        let ops = v.plan(Path::new("/r")).unwrap();
        let c = |s: &str| CString::new(s).unwrap();
        assert_eq!(
            ops,
            vec![
                Op::Mkdir(c("/r/dev")),
                Op::Mknod {
                    path: c("/r/dev/kvm"),
                    rdev: 0xa_e8
                },
                Op::Mkdir(c("/r/run")),
                Op::Mkdir(c("/r/run/x")),
                Op::Bind {
                    src: c("/run/x"),
                    dst: c("/r/run/x"),
                    ro: false
                },
                Op::Mkdir(c("/r/usr")),
                Op::Mkdir(c("/r/usr/bin")),
                Op::Touch(c("/r/usr/bin/qemu")),
                Op::Bind {
                    src: c("/usr/bin/qemu"),
                    dst: c("/r/usr/bin/qemu"),
                    ro: true
                },
                Op::Mkdir(c("/r/usr/lib")),
                Op::Touch(c("/r/usr/lib/a.so")),
                Op::Bind {
                    src: c("/usr/lib/a.so"),
                    dst: c("/r/usr/lib/a.so"),
                    ro: true
                },
                Op::Mkdir(c("/r/proc")),
                Op::Proc(c("/r/proc")),
            ]
        );
        let vis: Vec<String> = v
            .visible_paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            vis,
            [
                "/dev",
                "/dev/kvm",
                "/proc",
                "/run",
                "/run/x",
                "/usr",
                "/usr/bin",
                "/usr/bin/qemu",
                "/usr/lib",
                "/usr/lib/a.so"
            ]
        );
    }

    #[test]
    fn bad_views_are_refused() {
        let mut v = View::new();
        v.add("relative", EntryKind::File, false);
        assert!(matches!(
            v.plan(Path::new("/r")),
            Err(ViewError::BadJailPath(_))
        ));
        let mut v = View::new();
        v.add("/a/../b", EntryKind::File, false);
        assert!(matches!(
            v.plan(Path::new("/r")),
            Err(ViewError::BadJailPath(_))
        ));
        let mut v = View::new();
        v.add("/a", EntryKind::File, false);
        v.add("/a", EntryKind::Dir, false);
        assert!(matches!(
            v.plan(Path::new("/r")),
            Err(ViewError::Duplicate(_))
        ));
        let mut v = View::new();
        v.add("/a", EntryKind::File, false);
        v.add("/a/b", EntryKind::File, false);
        assert!(matches!(
            v.plan(Path::new("/r")),
            Err(ViewError::UnderFile(_))
        ));
        let mut v = View::new();
        v.add("/dev/null", EntryKind::Device { rdev: 0x103 }, true);
        v.add("/dev/null/x", EntryKind::File, false);
        assert!(matches!(
            v.plan(Path::new("/r")),
            Err(ViewError::UnderFile(_))
        ));
    }
}
