//! Building (once) and finding the guest disk of an image.

use std::fs::{self, File};
use std::io::{Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use tracing::{debug, info, instrument, warn};

use super::{io_err, GuestDisk, Image, Store, StoreError};
use crate::digest::Digest;
use crate::fsimage;
use crate::lock::FileLock;
use crate::manifest::Compression;
use crate::unpack::Unpacker;
use crate::Error;

impl Store {
    /// The read-only filesystem image of `image` for virtio-blk, built on first use and
    /// cached by the image digest; a second call only checks that the file is there.
    #[instrument(skip(self, image), fields(image = %image.digest))]
    pub fn guest_disk(&self, image: &Image) -> Result<GuestDisk, Error> {
        let digest = Digest::parse(&image.digest).map_err(|_| StoreError::NotFound {
            reference: image.digest.clone(),
        })?;
        if let Some(disk) = self.cached_disk(&digest) {
            return Ok(disk);
        }
        let _store = self.store_lock_shared()?;
        let _build = FileLock::exclusive(
            &self
                .root
                .join("locks")
                .join(format!("{}.lock", digest.hex())),
        )?;
        // Another process may have built it while this one waited.
        if let Some(disk) = self.cached_disk(&digest) {
            return Ok(disk);
        }
        // The record, not the caller's copy, says which layers make the image.
        let image = self
            .read_record(&digest)?
            .ok_or_else(|| StoreError::NotFound {
                reference: image.digest.clone(),
            })?;
        let started = Instant::now();
        let tmp = self.tempdir("unpack-")?;
        let rootfs = tmp.path().join("rootfs");
        fs::create_dir(&rootfs).map_err(io_err(&rootfs, "create the unpack root"))?;
        fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755))
            .map_err(io_err(&rootfs, "chmod the unpack root"))?;
        let result = self.build_disk(&image, &rootfs, tmp.path(), &digest, started);
        // Deleting a big tree takes seconds on some filesystems: a background thread does
        // it while the caller boots its VM; dropping the Store waits for it.
        let cleanup = std::thread::Builder::new()
            .name("gpucell-unpack-cleanup".into())
            .spawn(move || {
                if !rustix::process::geteuid().is_root() {
                    make_removable(&rootfs);
                }
                drop(tmp);
            });
        match cleanup {
            Ok(handle) => self
                .cleanups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(handle),
            Err(e) => {
                warn!(error = %e, "could not start the cleanup thread; the next prune removes the tree")
            }
        }
        let disk = result?;
        info!(
            path = %disk.path.display(),
            size = disk.size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "guest disk built"
        );
        Ok(disk)
    }

    fn build_disk(
        &self,
        image: &Image,
        rootfs: &Path,
        tmp: &Path,
        digest: &Digest,
        started: Instant,
    ) -> Result<GuestDisk, Error> {
        let mut unpacker = Unpacker::new(rootfs, self.options.limits)?;
        for layer in &image.layers {
            let mut blob = self.blobs.open(&layer.digest)?;
            let path = self.blobs.path(&layer.digest);
            let mut head = [0u8; 4];
            let n = blob
                .read(&mut head)
                .map_err(io_err(&path, "read a layer"))?;
            blob.rewind().map_err(io_err(&path, "read a layer"))?;
            let sniffed = Compression::sniff(&head[..n]);
            if Compression::from_media_type(&layer.media_type) != Some(sniffed) {
                debug!(layer = %layer.digest, media_type = %layer.media_type, ?sniffed, "media type and content disagree; using the content");
            }
            unpacker.apply_layer(&layer.digest.to_string(), blob, sniffed, &layer.diff_id)?;
        }
        if unpacker.dropped_devices > 0 {
            warn!(
                count = unpacker.dropped_devices,
                "device nodes in the image were dropped"
            );
        }
        unpacker.finish()?;
        let unpacked = started.elapsed();
        let fs_type = self.options.fs_type;
        let out = tmp.join(format!("disk.{}", fs_type.as_str()));
        fsimage::build(rootfs, &out, fs_type)?;
        let file = File::open(&out).map_err(io_err(&out, "open the built disk"))?;
        file.sync_all()
            .map_err(io_err(&out, "sync the built disk"))?;
        let size = file
            .metadata()
            .map_err(io_err(&out, "stat the built disk"))?
            .len();
        let dest = self.disk_path(digest);
        fs::rename(&out, &dest).map_err(io_err(&dest, "move the built disk into place"))?;
        debug!(
            unpack_ms = unpacked.as_millis() as u64,
            mkfs_ms = (started.elapsed() - unpacked).as_millis() as u64,
            "disk timings"
        );
        Ok(GuestDisk {
            path: dest,
            fstype: fs_type.as_str().into(),
            size,
        })
    }
}

/// Without root, directories unpacked read-only (0555) could not be emptied: give the
/// owner write access back before the tree is removed.
fn make_removable(root: &Path) {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
}
