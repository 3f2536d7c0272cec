//! `gpucell fsck` for the image store: every blob is hashed again, every record, the
//! names file and every disk are read; what is damaged is reported and, with `repair`,
//! removed or rebuilt where that is safe (everything here can be pulled, imported or
//! built again). Holds the store lock exclusively, as `prune` does.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::path::Path;

use gpucell_common::fsck::{remove_path, Finding};

use super::{io_err, Record, Store, StoreError};
use crate::digest::{Digest, HashingReader};
use crate::fsimage::FsType;
use crate::Error;

/// The superblock magic of each guest disk type: (offset, bytes).
const EROFS_MAGIC: (u64, [u8; 4]) = (1024, 0xE0F5_E1E2u32.to_le_bytes());
const EXT4_MAGIC: (u64, [u8; 2]) = (1024 + 0x38, 0xEF53u16.to_le_bytes());

impl Store {
    /// Checks the store; with `repair`, removes or rebuilds what is damaged.
    pub fn fsck(&self, repair: bool) -> Result<Vec<Finding>, Error> {
        let _lock = self.store_lock_exclusive()?;
        let mut out = Vec::new();
        self.fsck_tmp(repair, &mut out)?;
        let bad_blobs = self.fsck_blobs(repair, &mut out)?;
        let images = self.fsck_records(&bad_blobs, repair, &mut out)?;
        self.fsck_refs(&images, repair, &mut out)?;
        self.fsck_disks(&images, repair, &mut out)?;
        Ok(out)
    }

    fn fsck_tmp(&self, repair: bool, out: &mut Vec<Finding>) -> Result<(), Error> {
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp, "list"))?.flatten() {
            let p = e.path();
            out.push(Finding::repairable(
                &p,
                "temporary file",
                "left behind by an import or build that did not finish",
                "remove it",
                repair,
                || remove_path(&p),
            ));
        }
        Ok(())
    }

    /// Hashes every blob; returns those whose content does not match their name.
    fn fsck_blobs(&self, repair: bool, out: &mut Vec<Finding>) -> Result<BTreeSet<Digest>, Error> {
        let dir = self.root.join("blobs/sha256");
        let mut bad = BTreeSet::new();
        for (digest, _) in self.blobs.list().map_err(io_err(&dir, "list"))? {
            let path = self.blobs.path(&digest);
            let problem = match hash_file(&path) {
                Ok((actual, _)) if actual == digest => continue,
                Ok((actual, size)) => format!(
                    "its {size} bytes hash to {actual}, not to its name (truncated or corrupt)"
                ),
                Err(e) => format!("cannot be read: {e}"),
            };
            out.push(Finding::repairable(
                &path,
                "image blob",
                problem,
                "remove it, and the images that use it (pull or import them again)",
                repair,
                || self.blobs.remove(&digest),
            ));
            bad.insert(digest);
        }
        Ok(bad)
    }

    /// Reads every image record; returns the images that are whole (by digest, with the
    /// name each was stored under).
    fn fsck_records(
        &self,
        bad_blobs: &BTreeSet<Digest>,
        repair: bool,
        out: &mut Vec<Finding>,
    ) -> Result<BTreeMap<Digest, String>, Error> {
        let dir = self.root.join("images");
        let mut whole = BTreeMap::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir, "list"))?.flatten() {
            let name = e.file_name();
            let Some(digest) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|h| Digest::from_hex(h).ok())
            else {
                continue;
            };
            let path = e.path();
            let problem = match read_record(&path) {
                Ok(r) => match self.missing_blob(&digest, &r, bad_blobs) {
                    None => {
                        whole.insert(digest, r.image.reference);
                        continue;
                    }
                    Some(b) => format!("its blob {b} is missing or damaged"),
                },
                Err(e) => e,
            };
            // Its disk of either filesystem type, whichever this store was set to.
            let disks = [FsType::Erofs, FsType::Ext4].map(|t| {
                self.root
                    .join("disks")
                    .join(format!("{}.{}", digest.hex(), t.as_str()))
            });
            out.push(Finding::repairable(
                &path,
                "image record",
                problem,
                "remove the record and its disk (pull or import the image again)",
                repair,
                || {
                    remove_path(&path)?;
                    disks.iter().try_for_each(|d| remove_path(d))
                },
            ));
        }
        Ok(whole)
    }

    fn missing_blob(
        &self,
        digest: &Digest,
        r: &Record,
        bad_blobs: &BTreeSet<Digest>,
    ) -> Option<String> {
        let config = Digest::parse(&r.image.config_digest).ok();
        let Some(config) = config else {
            return Some(format!("config {:?} (not a digest)", r.image.config_digest));
        };
        std::iter::once(digest)
            .chain(std::iter::once(&config))
            .chain(r.image.layers.iter().map(|l| &l.digest))
            .find(|d| bad_blobs.contains(d) || !self.blobs.contains(d))
            .map(ToString::to_string)
    }

    /// refs.json must parse and name only whole images; else it is rebuilt from the
    /// records (each records the name it was stored under).
    fn fsck_refs(
        &self,
        images: &BTreeMap<Digest, String>,
        repair: bool,
        out: &mut Vec<Finding>,
    ) -> Result<(), Error> {
        let path = self.refs_path();
        let (problem, rebuilt) = match self.read_refs() {
            Ok(refs) => {
                let dangling: Vec<&String> = refs
                    .iter()
                    .filter(|(_, d)| !images.contains_key(*d))
                    .map(|(n, _)| n)
                    .collect();
                if dangling.is_empty() {
                    return Ok(());
                }
                let problem = format!("names images that are gone or damaged: {dangling:?}");
                let keep: BTreeMap<String, Digest> = refs
                    .iter()
                    .filter(|(_, d)| images.contains_key(*d))
                    .map(|(n, d)| (n.clone(), d.clone()))
                    .collect();
                (problem, keep)
            }
            // Only a file that does not parse is rebuilt; one that cannot be read (a
            // permission, an I/O error) is an error of fsck itself.
            Err(Error::Store(e @ StoreError::Corrupt { .. })) => {
                let keep = images
                    .iter()
                    .filter(|(_, name)| !name.is_empty())
                    .map(|(d, name)| (name.clone(), d.clone()))
                    .collect();
                (
                    format!("unreadable: {}", gpucell_common::chain_string(&e)),
                    keep,
                )
            }
            Err(e) => return Err(e),
        };
        let json = serde_json::to_vec_pretty(&rebuilt).unwrap_or_default();
        out.push(Finding::repairable(
            &path,
            "image names file",
            problem,
            &format!(
                "rewrite it with the {} name(s) of the images that are whole",
                rebuilt.len()
            ),
            repair,
            || {
                self.write_atomic(&path, &json)
                    .map_err(|e| io::Error::other(gpucell_common::chain_string(&e)))
            },
        ));
        Ok(())
    }

    /// A disk must belong to a whole image and carry its filesystem's superblock.
    fn fsck_disks(
        &self,
        images: &BTreeMap<Digest, String>,
        repair: bool,
        out: &mut Vec<Finding>,
    ) -> Result<(), Error> {
        let dir = self.root.join("disks");
        for e in fs::read_dir(&dir).map_err(io_err(&dir, "list"))?.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((hex, ext)) = name.split_once('.') else {
                continue;
            };
            let Ok(digest) = Digest::from_hex(hex) else {
                continue;
            };
            let problem = if images.contains_key(&digest) {
                disk_problem(&path, ext)
            } else if self.record_path(&digest).exists() {
                // A damaged record: its finding removes the disk with it.
                None
            } else {
                Some("belongs to no image in the store".to_string())
            };
            if let Some(problem) = problem {
                out.push(Finding::repairable(
                    &path,
                    "guest disk",
                    problem,
                    "remove it (the next run builds it again)",
                    repair,
                    || remove_path(&path),
                ));
            }
        }
        Ok(())
    }
}

fn read_record(path: &Path) -> Result<Record, String> {
    let bytes = fs::read(path).map_err(|e| format!("cannot be read: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("is not a valid record: {e}"))
}

fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    HashingReader::new(fs::File::open(path)?).finish(u64::MAX)
}

/// Why a disk image is not a filesystem of its type, if it is not.
fn disk_problem(path: &Path, ext: &str) -> Option<String> {
    let (offset, magic): (u64, &[u8]) = match ext {
        "erofs" => (EROFS_MAGIC.0, &EROFS_MAGIC.1),
        "ext4" => (EXT4_MAGIC.0, &EXT4_MAGIC.1),
        _ => return None,
    };
    let mut head = vec![0u8; offset as usize + magic.len()];
    let read = fs::File::open(path).and_then(|f| {
        let mut n = 0;
        let mut f = f.take(head.len() as u64);
        while n < head.len() {
            match f.read(&mut head[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    });
    match read {
        Err(e) => Some(format!("cannot be read: {e}")),
        Ok(n) if n < head.len() => Some(format!("truncated: {n} bytes, no {ext} superblock")),
        Ok(_) if &head[offset as usize..] != magic => {
            Some(format!("has no {ext} superblock magic (corrupt)"))
        }
        Ok(_) => None,
    }
}
