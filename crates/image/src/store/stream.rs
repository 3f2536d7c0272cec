//! The streamed first fetch of an image: layers are unpacked while later ones still
//! download, and the guest disk is written in the same pass.
//!
//! ```text
//! this thread:    fetch 0 ─ fetch 1 ─ fetch 2 ─ … ─ fetch n-1
//!                        │         │         │              │   (index sent when verified)
//! unpack thread:         unpack 0 ─ unpack 1 ─ unpack 2 ─ … ─ unpack n-1 ─ mkfs
//! ```
//!
//! A layer is unpacked only once its whole blob is in the store: `blob_into` hashed it
//! and checked its size before the rename that makes it visible. No byte of a layer is
//! read into the tree before its digest matched, so a corrupt blob never needs undoing;
//! the cost is that one layer's unpack waits for its last byte (layers, not bytes, are
//! the unit of overlap). On any failure the fetch loop stops, the unpack tree and the
//! half-made disk are deleted, and no record, name or disk is written; blobs already
//! verified stay in the store (content-addressed, like any interrupted pull's).

use std::sync::mpsc;
use std::time::Instant;

use tracing::debug;

use super::disk::BuiltDisk;
use super::{Image, PullEvent, Store};
use crate::source::Source;
use crate::unpack::Unpacker;
use crate::Error;

/// A disk built during an import, in a temporary directory until the import places it.
pub(super) struct StreamedDisk {
    pub(super) disk: BuiltDisk,
    _dir: tempfile::TempDir,
}

impl Store {
    /// Fetches `image`'s missing layers in order on this thread while another thread
    /// unpacks each one as soon as it is stored, then writes the disk.
    pub(super) fn stream_disk(
        &self,
        src: &dyn Source,
        image: &Image,
    ) -> Result<StreamedDisk, Error> {
        let started = Instant::now();
        let tree = self.unpack_tree(image)?;
        let out_dir = self.tempdir("disk-")?;
        let result = std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel::<usize>();
            let unpack = std::thread::Builder::new()
                .name("gpucell-unpack".into())
                .spawn_scoped(scope, || {
                    self.unpack_as_fetched(image, &tree.rootfs, rx, out_dir.path())
                })
                .map_err(super::io_err(&tree.rootfs, "start the unpack thread"))?;
            let fetched = self.fetch_into(src, image, &tx);
            drop(tx);
            let unpacked = match unpack.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            // The fetch's own error first: the unpack thread only saw the channel close.
            fetched?;
            unpacked?.ok_or_else(|| Error::from(super::StoreError::PipelineStopped))
        });
        self.remove_later(tree);
        let disk = result?;
        debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "streamed fetch, unpack and mkfs"
        );
        Ok(StreamedDisk {
            disk,
            _dir: out_dir,
        })
    }

    /// Fetches each missing layer and sends its index once it is stored; stops when
    /// the unpack thread has gone (it failed).
    fn fetch_into(
        &self,
        src: &dyn Source,
        image: &Image,
        tx: &mpsc::Sender<usize>,
    ) -> Result<(), Error> {
        for (index, layer) in image.layers.iter().enumerate() {
            if !self.blobs.contains(&layer.digest) {
                src.blob_into(&layer.digest, layer.size, &self.blobs)?;
            }
            self.emit(&PullEvent::LayerFetched {
                index,
                digest: layer.digest.clone(),
            });
            if tx.send(index).is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Applies layers in order as their indexes arrive; `None` when the channel closed
    /// before the last one (the fetch failed and says why).
    fn unpack_as_fetched(
        &self,
        image: &Image,
        rootfs: &std::path::Path,
        rx: mpsc::Receiver<usize>,
        out_dir: &std::path::Path,
    ) -> Result<Option<BuiltDisk>, Error> {
        let mut unpacker = Unpacker::new(rootfs, self.options.limits)?;
        let mut next = 0;
        for index in rx {
            debug_assert_eq!(index, next);
            let layer = &image.layers[index];
            self.apply_blob(&mut unpacker, layer)?;
            self.emit(&PullEvent::LayerUnpacked {
                index,
                digest: layer.digest.clone(),
            });
            next += 1;
        }
        if next < image.layers.len() {
            return Ok(None);
        }
        Ok(Some(self.write_disk(unpacker, rootfs, out_dir)?))
    }
}
