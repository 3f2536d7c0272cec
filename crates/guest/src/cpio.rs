//! A reproducible writer of uncompressed `newc` cpio archives (the initramfs format).
//!
//! Entries are collected first and written sorted by path, parents before children, with
//! fixed owners (0:0), mtimes (0) and inode numbers assigned in order: the same entries
//! always give the same bytes.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// newc magic.
const MAGIC: &[u8; 6] = b"070701";
/// Largest file the writer accepts (the `filesize` field is 32 bits).
const MAX_FILE: usize = u32::MAX as usize;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error(
        "cpio path `{0}` is not a clean relative path (no leading `/`, `.`, `..` or empty parts)"
    )]
    BadPath(String),
    #[error("cpio entry `{path}` of {len} bytes is over the newc limit of 4 GiB")]
    TooLarge { path: String, len: usize },
    #[error("cpio entry `{0}` added twice with different contents")]
    Conflict(String),
    #[error("cpio entry `{0}` needs parent `{1}`, which is not a directory")]
    ParentNotDir(String, String),
    #[error("writing the cpio archive failed")]
    Io(#[from] io::Error),
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: EntryKind,
    /// Permission bits only (the type bits come from `kind`).
    perm: u32,
}

/// Collects entries, then writes them in a fixed order.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and any missing parents, mode 0755).
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        self.insert(path, EntryKind::Dir, perm)
    }

    /// Adds a regular file (and any missing parent directories).
    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), CpioError> {
        if data.len() > MAX_FILE {
            return Err(CpioError::TooLarge {
                path: path.to_owned(),
                len: data.len(),
            });
        }
        self.insert(path, EntryKind::File(data), perm)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.insert(path, EntryKind::Symlink(target.to_owned()), 0o777)
    }

    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.insert(path, EntryKind::CharDev { major, minor }, perm)
    }

    fn insert(&mut self, path: &str, kind: EntryKind, perm: u32) -> Result<(), CpioError> {
        check_path(path)?;
        // Parents first.
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match self.entries.get(&parent) {
                Some(Entry {
                    kind: EntryKind::Dir,
                    ..
                }) => {}
                Some(_) => return Err(CpioError::ParentNotDir(path.to_owned(), parent)),
                None => {
                    self.entries.insert(
                        parent.clone(),
                        Entry {
                            kind: EntryKind::Dir,
                            perm: 0o755,
                        },
                    );
                }
            }
        }
        let entry = Entry {
            kind,
            perm: perm & 0o7777,
        };
        match self.entries.get(path) {
            // An implicit parent directory may be given explicit permissions later.
            Some(old) if old.kind == EntryKind::Dir && entry.kind == EntryKind::Dir => {}
            Some(old) if *old != entry => return Err(CpioError::Conflict(path.to_owned())),
            _ => {}
        }
        self.entries.insert(path.to_owned(), entry);
        Ok(())
    }

    /// Number of entries (directories included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the archive, trailer included, padded to a 512-byte boundary.
    pub fn write_to<W: Write>(&self, out: W) -> Result<u64, CpioError> {
        let mut w = CountingWriter { inner: out, n: 0 };
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (type_bits, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &entry.kind {
                EntryKind::Dir => (0o040000, 2, &[], (0, 0)),
                EntryKind::File(d) => (0o100000, 1, d, (0, 0)),
                EntryKind::Symlink(t) => (0o120000, 1, t.as_bytes(), (0, 0)),
                EntryKind::CharDev { major, minor } => (0o020000, 1, &[], (*major, *minor)),
            };
            // Inode 0 is avoided: some readers treat it as "no inode".
            let ino = u32::try_from(ino + 1).map_err(|_| CpioError::TooLarge {
                path: path.clone(),
                len: ino,
            })?;
            write_header(
                &mut w,
                ino,
                type_bits | entry.perm,
                nlink,
                data.len(),
                rdev,
                path,
            )?;
            w.write_all(data)?;
            pad(&mut w, 4)?;
        }
        write_header(&mut w, 0, 0, 1, 0, (0, 0), "TRAILER!!!")?;
        pad(&mut w, 512)?;
        w.inner.flush()?;
        Ok(w.n)
    }

    /// The archive as bytes.
    pub fn to_vec(&self) -> Result<Vec<u8>, CpioError> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }
}

fn check_path(path: &str) -> Result<(), CpioError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..");
    if bad {
        return Err(CpioError::BadPath(path.to_owned()));
    }
    Ok(())
}

fn write_header<W: Write>(
    w: &mut CountingWriter<W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) -> Result<(), CpioError> {
    let namesize = name.len() + 1;
    let fields: [u32; 13] = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        size as u32,
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        namesize as u32,
        0, // check
    ];
    let mut header = Vec::with_capacity(110 + namesize);
    header.extend_from_slice(MAGIC);
    for f in fields {
        header.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    header.extend_from_slice(name.as_bytes());
    header.push(0);
    w.write_all(&header)?;
    pad(w, 4)?;
    Ok(())
}

fn pad<W: Write>(w: &mut CountingWriter<W>, align: u64) -> io::Result<()> {
    let rem = w.n % align;
    if rem != 0 {
        let zeros = vec![0u8; (align - rem) as usize];
        w.write_all(&zeros)?;
    }
    Ok(())
}

struct CountingWriter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> CountingWriter<W> {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.n += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.file("init", 0o755, b"#!/bin/true\n".to_vec()).unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        a.file("modules/order", 0o644, b"a.ko\n".to_vec()).unwrap();
        a.file("modules/a.ko", 0o644, vec![1, 2, 3]).unwrap();
        a.dir("proc", 0o555).unwrap();
        a.symlink("bin", "init").unwrap();
        a
    }

    #[test]
    fn same_entries_in_any_order_give_identical_bytes() {
        let one = sample().to_vec().unwrap();
        let mut b = Archive::new();
        b.symlink("bin", "init").unwrap();
        b.dir("proc", 0o555).unwrap();
        b.file("modules/a.ko", 0o644, vec![1, 2, 3]).unwrap();
        b.file("modules/order", 0o644, b"a.ko\n".to_vec()).unwrap();
        b.char_dev("dev/console", 0o600, 5, 1).unwrap();
        b.file("init", 0o755, b"#!/bin/true\n".to_vec()).unwrap();
        let two = b.to_vec().unwrap();
        assert_eq!(one, two);
        assert_eq!(one.len() % 512, 0);
        assert_eq!(&one[..6], b"070701");
    }

    #[test]
    fn header_layout_is_newc() {
        let mut a = Archive::new();
        a.file("x", 0o644, b"hello".to_vec()).unwrap();
        let bytes = a.to_vec().unwrap();
        let h = std::str::from_utf8(&bytes[..110]).unwrap();
        assert_eq!(&h[6..14], "00000001"); // ino
        assert_eq!(&h[14..22], "000081A4"); // regular file 0644
        assert_eq!(&h[54..62], "00000005"); // filesize
        assert_eq!(&h[94..102], "00000002"); // namesize "x\0"
        assert_eq!(&bytes[110..112], b"x\0");
        // 112 is 4-aligned: data follows at once.
        assert_eq!(&bytes[112..117], b"hello");
    }

    #[test]
    fn gnu_cpio_lists_and_extracts_what_was_written() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("skipping: the `cpio` tool is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, sample().to_vec().unwrap()).unwrap();
        let out = Command::new("cpio")
            .args(["-t", "-v", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list = String::from_utf8(out.stdout).unwrap();
        let plain = Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        let plain = String::from_utf8(plain.stdout).unwrap();
        let names: Vec<&str> = plain.lines().collect();
        assert_eq!(
            names,
            [
                "bin",
                "dev",
                "dev/console",
                "init",
                "modules",
                "modules/a.ko",
                "modules/order",
                "proc"
            ]
        );
        assert!(list
            .lines()
            .any(|l| l.starts_with("crw-------") && l.contains("dev/console")));
        assert!(list
            .lines()
            .any(|l| l.starts_with("lrwxrwxrwx") && l.contains("bin -> init")));
        assert!(list
            .lines()
            .any(|l| l.starts_with("dr-xr-xr-x") && l.ends_with("proc")));

        let x = dir.path().join("x");
        std::fs::create_dir(&x).unwrap();
        let out = Command::new("cpio")
            .args(["-i", "-d", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(&archive)
            .arg("init")
            .arg("modules/*")
            .current_dir(&x)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(x.join("init")).unwrap(), b"#!/bin/true\n");
        assert_eq!(std::fs::read(x.join("modules/a.ko")).unwrap(), [1, 2, 3]);
    }

    #[test]
    fn bad_paths_and_conflicts_are_refused() {
        let mut a = Archive::new();
        for p in ["", "/abs", "a/../b", "./a", "a//b", "a/"] {
            assert!(
                matches!(a.file(p, 0o644, vec![]), Err(CpioError::BadPath(_))),
                "{p}"
            );
        }
        a.file("f", 0o644, vec![1]).unwrap();
        assert!(matches!(
            a.file("f", 0o644, vec![2]),
            Err(CpioError::Conflict(_))
        ));
        assert!(matches!(
            a.file("f/g", 0o644, vec![]),
            Err(CpioError::ParentNotDir(..))
        ));
        // Same content twice is fine.
        a.file("f", 0o644, vec![1]).unwrap();
    }
}
