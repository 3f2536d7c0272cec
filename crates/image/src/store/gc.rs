//! `image rm` and `image prune`: both hold the store lock exclusively, so no import or
//! disk build runs meanwhile.

use std::collections::BTreeSet;
use std::fs;

use tracing::info;

use super::{io_err, PruneReport, RemoveReport, Store, StoreError};
use crate::digest::Digest;
use crate::Error;

impl Store {
    /// Removes a name; when no name is left on its image (or a digest was given), the
    /// image's record and disk, then blobs no image uses any more.
    pub fn remove(&self, reference: &str) -> Result<RemoveReport, Error> {
        let _lock = self.store_lock_exclusive()?;
        let digest = self
            .resolve(reference)?
            .ok_or_else(|| StoreError::NotFound {
                reference: reference.into(),
            })?;
        let refs = self.read_refs()?;
        let by_name = refs.contains_key(reference)
            || crate::Reference::parse(reference)
                .ok()
                .is_some_and(|p| refs.contains_key(&p.canonical()));
        let mut report = RemoveReport::default();
        let refs = self.update_refs(|r| {
            let names: Vec<String> = if by_name {
                let canonical = crate::Reference::parse(reference)
                    .map(|p| p.canonical())
                    .unwrap_or_default();
                r.keys()
                    .filter(|n| *n == reference || **n == canonical)
                    .cloned()
                    .collect()
            } else {
                r.iter()
                    .filter(|(_, d)| **d == digest)
                    .map(|(n, _)| n.clone())
                    .collect()
            };
            for n in names {
                r.remove(&n);
                report.untagged.push(n);
            }
        })?;
        if !refs.values().any(|d| *d == digest) {
            report.freed_bytes += self.delete_image(&digest)?;
            report.deleted.push(digest.to_string());
            let (_, bytes) = self.collect_blobs()?;
            report.freed_bytes += bytes;
        }
        info!(?report, "removed");
        Ok(report)
    }

    /// Removes images no name points to, blobs no image uses, disks without an image,
    /// and anything left in tmp/ by a process that died.
    pub fn prune(&self) -> Result<PruneReport, Error> {
        let _lock = self.store_lock_exclusive()?;
        let mut report = PruneReport::default();
        let refs = self.read_refs()?;
        let named: BTreeSet<&Digest> = refs.values().collect();
        for (digest, _) in self.records()? {
            if !named.contains(&digest) {
                report.freed_bytes += self.delete_image(&digest)?;
                report.images.push(digest.to_string());
            }
        }
        let (blobs, bytes) = self.collect_blobs()?;
        report.blobs = blobs;
        report.freed_bytes += bytes;
        let disks = self.root.join("disks");
        for e in fs::read_dir(&disks)
            .map_err(io_err(&disks, "list"))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.split('.').next().unwrap_or_default();
            let keep = Digest::from_hex(hex).is_ok_and(|d| self.record_path(&d).is_file());
            if !keep {
                report.freed_bytes += e.metadata().map_or(0, |m| m.len());
                fs::remove_file(e.path()).map_err(io_err(&e.path(), "remove"))?;
                report.disks += 1;
            }
        }
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp, "list"))?.flatten() {
            let p = e.path();
            let removed = if e.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            removed.map_err(io_err(&p, "remove a stale temporary entry"))?;
            report.temp_entries += 1;
        }
        // Unpack trees a killed process left in RAM (no build runs while prune holds the lock).
        let ram = std::path::Path::new(super::disk::RAM_DIR);
        let prefix = self.unpack_prefix();
        if let Ok(entries) = fs::read_dir(ram) {
            for e in entries.flatten() {
                let stale = e.file_name().to_string_lossy().starts_with(&prefix)
                    && e.metadata().is_ok_and(|m| {
                        use std::os::unix::fs::MetadataExt;
                        m.is_dir() && m.uid() == rustix::process::geteuid().as_raw()
                    });
                if stale && fs::remove_dir_all(e.path()).is_ok() {
                    report.temp_entries += 1;
                }
            }
        }
        info!(?report, "pruned");
        Ok(report)
    }

    fn delete_image(&self, digest: &Digest) -> Result<u64, Error> {
        let mut freed = 0;
        for path in [self.record_path(digest), self.disk_path(digest)] {
            if let Ok(md) = fs::metadata(&path) {
                freed += md.len();
                fs::remove_file(&path).map_err(io_err(&path, "remove"))?;
            }
        }
        Ok(freed)
    }

    /// Deletes blobs no record uses; returns (count, bytes).
    fn collect_blobs(&self) -> Result<(u64, u64), Error> {
        let mut used = BTreeSet::new();
        for (digest, record) in self.records()? {
            used.insert(digest);
            if let Ok(d) = Digest::parse(&record.image.config_digest) {
                used.insert(d);
            }
            for l in &record.image.layers {
                used.insert(l.digest.clone());
            }
        }
        let dir = self.root.join("blobs/sha256");
        let mut count = 0;
        let mut bytes = 0;
        for (digest, size) in self.blobs.list().map_err(io_err(&dir, "list"))? {
            if !used.contains(&digest) {
                self.blobs
                    .remove(&digest)
                    .map_err(io_err(&dir, "remove a blob"))?;
                count += 1;
                bytes += size;
            }
        }
        Ok((count, bytes))
    }
}
