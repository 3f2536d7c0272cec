//! The OCI image store: pull and import, digest verification, safe unpacking and the
//! guest filesystem images built from unpacked trees.
//!
//! ```no_run
//! # fn main() -> Result<(), gpucell_image::Error> {
//! let store = gpucell_image::Store::open(std::path::Path::new("/var/lib/gpucell"))?;
//! let image = store.get_or_fetch("oci:/tmp/busybox:latest")?;
//! let disk = store.guest_disk(&image)?;
//! println!("{} {} {}", image.digest, disk.fstype, disk.path.display());
//! # Ok(()) }
//! ```

pub mod archive;
pub mod blobs;
pub mod digest;
pub mod fsimage;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod source;
mod store;
pub mod tarstream;
pub mod unpack;

#[cfg(feature = "test-support")]
pub mod testing;

pub use fsimage::FsType;
pub use manifest::{ImageConfig, Layer};
pub use reference::Reference;
pub use registry::{RegistryCredentials, RegistryOptions};
pub use store::{
    GuestDisk, Image, ImageSummary, PruneReport, PullEvent, RemoveReport, Store, StoreError,
    StoreOptions,
};
pub use unpack::Limits;

/// Everything the store can fail with; each variant's message names the reference,
/// blob, file or entry involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    #[error(transparent)]
    Blob(#[from] blobs::BlobError),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Unpack(#[from] unpack::UnpackError),
    #[error(transparent)]
    FsImage(#[from] fsimage::FsImageError),
    #[error(transparent)]
    Lock(#[from] gpucell_common::LockError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}
