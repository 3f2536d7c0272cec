//! Building (once) and finding the guest disk of an image.

use std::fs;
use std::io::{Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use tracing::{debug, info, instrument, warn};

use super::{io_err, GuestDisk, Image, PullEvent, Store, StoreError};
use crate::digest::Digest;
use crate::fsimage;
use crate::manifest::{Compression, Layer};
use crate::unpack::Unpacker;
use crate::Error;
use gpucell_common::FileLock;

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
        let _build = self.build_lock(&digest)?;
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
        let tree = self.unpack_tree(&image)?;
        let out_dir = self.tempdir("disk-")?;
        let result = self.build_disk(&image, &tree.rootfs, out_dir.path(), started);
        let placed = result.and_then(|built| self.place_disk(&built, &digest));
        drop(out_dir);
        self.remove_later(tree);
        let disk = placed?;
        info!(
            path = %disk.path.display(),
            size = disk.size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "guest disk built"
        );
        Ok(disk)
    }

    /// Serializes building the disk of one image (across processes).
    pub(super) fn build_lock(&self, digest: &Digest) -> Result<FileLock, Error> {
        let path = self
            .root
            .join("locks")
            .join(format!("{}.lock", digest.hex()));
        Ok(FileLock::exclusive(&path)?)
    }

    /// A fresh, empty unpack root for `image` (see [`Store::unpack_parent`]).
    pub(super) fn unpack_tree(&self, image: &Image) -> Result<UnpackTree, Error> {
        let parent = self.unpack_parent(image);
        let tmp = tempfile::Builder::new()
            .prefix(&self.unpack_prefix())
            .tempdir_in(&parent)
            .map_err(io_err(&parent, "create the unpack directory"))?;
        let rootfs = tmp.path().join("rootfs");
        fs::create_dir(&rootfs).map_err(io_err(&rootfs, "create the unpack root"))?;
        fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755))
            .map_err(io_err(&rootfs, "chmod the unpack root"))?;
        Ok(UnpackTree { tmp, rootfs })
    }

    /// Deletes an unpack tree in a background thread: deleting a big tree takes seconds
    /// on some filesystems, and the caller boots its VM meanwhile; dropping the Store
    /// waits for it.
    pub(super) fn remove_later(&self, tree: UnpackTree) {
        let cleanup = std::thread::Builder::new()
            .name("gpucell-unpack-cleanup".into())
            .spawn(move || {
                if !rustix::process::geteuid().is_root() {
                    make_removable(&tree.rootfs);
                }
                drop(tree.tmp);
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
    }

    fn build_disk(
        &self,
        image: &Image,
        rootfs: &Path,
        tmp: &Path,
        started: Instant,
    ) -> Result<BuiltDisk, Error> {
        let mut unpacker = Unpacker::new(rootfs, self.options.limits)?;
        for (index, layer) in image.layers.iter().enumerate() {
            self.apply_blob(&mut unpacker, layer)?;
            self.emit(&PullEvent::LayerUnpacked {
                index,
                digest: layer.digest.clone(),
            });
        }
        let unpacked = started.elapsed();
        let built = self.write_disk(unpacker, rootfs, tmp)?;
        debug!(
            unpack_ms = unpacked.as_millis() as u64,
            mkfs_ms = (started.elapsed() - unpacked).as_millis() as u64,
            "disk timings"
        );
        Ok(built)
    }

    /// Applies the stored (verified) blob of `layer` to the tree, decompressing by what
    /// its first bytes say.
    pub(super) fn apply_blob(&self, unpacker: &mut Unpacker, layer: &Layer) -> Result<(), Error> {
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
        Ok(())
    }

    /// Finishes the tree and makes the filesystem image from it, in `tmp` (not yet in
    /// place: [`Store::place_disk`]).
    pub(super) fn write_disk(
        &self,
        unpacker: Unpacker,
        rootfs: &Path,
        tmp: &Path,
    ) -> Result<BuiltDisk, Error> {
        if unpacker.dropped_devices > 0 {
            warn!(
                count = unpacker.dropped_devices,
                "device nodes in the image were dropped"
            );
        }
        unpacker.finish()?;
        let fs_type = self.options.fs_type;
        let out = tmp.join(format!("disk.{}", fs_type.as_str()));
        fsimage::build(rootfs, &out, fs_type)?;
        let size = fs::metadata(&out)
            .map_err(io_err(&out, "stat the built disk"))?
            .len();
        self.emit(&PullEvent::DiskWritten { bytes: size });
        Ok(BuiltDisk { path: out, size })
    }

    /// Moves a built disk to its place in disks/ (synced first).
    pub(super) fn place_disk(
        &self,
        built: &BuiltDisk,
        digest: &Digest,
    ) -> Result<GuestDisk, Error> {
        let dest = self.disk_path(digest);
        gpucell_common::atomic::rename_synced(&built.path, &dest)
            .map_err(io_err(&dest, "sync and move the built disk into place"))?;
        Ok(GuestDisk {
            path: dest,
            fstype: self.options.fs_type.as_str().into(),
            size: built.size,
        })
    }
}

/// An unpack root and the temporary directory holding it.
pub(super) struct UnpackTree {
    tmp: tempfile::TempDir,
    pub(super) rootfs: std::path::PathBuf,
}

/// A filesystem image written in a temporary directory, not yet in disks/.
pub(super) struct BuiltDisk {
    path: std::path::PathBuf,
    size: u64,
}

/// Name prefix of unpack trees (in the store's tmp/ or on tmpfs); prune removes stale ones.
pub(crate) const UNPACK_PREFIX: &str = "gpucell-unpack-";
/// Where small enough trees are unpacked: RAM, so that the transient tree costs no disk
/// writes, journal commits or deletes.
pub(crate) const RAM_DIR: &str = "/dev/shm";
/// Largest estimated tree put in RAM.
const MAX_RAM_TREE: u64 = 8 << 30;
const TMPFS_MAGIC: i64 = 0x0102_1994;

impl Store {
    /// `gpucell-unpack-<12 hex of this store's path>-`: prune removes only its own trees.
    pub fn unpack_prefix(&self) -> String {
        let tag = Digest::of(self.root.as_os_str().as_encoded_bytes());
        format!("{UNPACK_PREFIX}{}-", &tag.hex()[..12])
    }

    /// [`crate::StoreOptions::unpack_dir`] when set; else /dev/shm when it is a tmpfs with room for
    /// twice the estimated tree (4x the compressed layers); else the store's tmp/.
    fn unpack_parent(&self, image: &Image) -> std::path::PathBuf {
        if let Some(dir) = &self.options.unpack_dir {
            return dir.clone();
        }
        let estimate = image.size.saturating_mul(4).saturating_add(64 << 20);
        let ram = Path::new(RAM_DIR);
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
        let fits = rustix::fs::statfs(ram).is_ok_and(|st| st.f_type as i64 == TMPFS_MAGIC)
            && rustix::fs::statvfs(ram)
                .is_ok_and(|st| st.f_bavail.saturating_mul(st.f_frsize) / 2 >= estimate);
        if fits && estimate <= MAX_RAM_TREE {
            ram.to_owned()
        } else {
            self.root.join("tmp")
        }
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
