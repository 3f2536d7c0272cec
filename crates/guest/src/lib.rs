//! Guest artifacts: the guest kernel (uncompressed vmlinux for the PVH entry) and the
//! init image holding the agent and the kernel modules it needs, built from Debian
//! packages, described by a manifest and cached in the state dir per named flavour
//! (`<state>/guest/<flavour>/{vmlinux,initramfs.cpio,manifest.json}`).

use std::path::{Path, PathBuf};

use serde::Serialize;

pub mod agent_bin;
mod build;
pub mod cpio;
pub mod deb;
pub mod driver;
pub mod flavour;
pub mod fsck;
pub mod kernel;
pub mod manifest;
pub mod modules;
pub mod vmlinux;

#[cfg(test)]
mod testutil;

pub use build::{builder_id, init_image, BuildError, BuildOptions, MODULES_DIR, MODULES_ORDER};
pub use flavour::{Flavour, FLAVOURS};
pub use kernel::KernelChoice;
pub use manifest::{FileDigest, Manifest, ManifestError};

/// The flavour used when none is named.
pub const DEFAULT_FLAVOUR: &str = "default";

/// The built artifacts of one flavour.
#[derive(Debug, Clone, Serialize)]
pub struct GuestArtifacts {
    pub flavour: String,
    /// The flavour's directory in the state dir.
    pub dir: PathBuf,
    /// Uncompressed ELF kernel for `-kernel` (PVH entry).
    pub kernel: PathBuf,
    /// Uncompressed newc cpio for `-initrd`.
    pub initrd: PathBuf,
    /// The NVIDIA driver disk (erofs) of a driver flavour, to attach read-only as a
    /// virtio-blk disk with serial [`driver::DISK_SERIAL`]; `None` for a GPU-less flavour.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_disk: Option<PathBuf>,
    pub manifest: Manifest,
    /// True when `build` found these already built from the same inputs.
    pub cached: bool,
}

impl GuestArtifacts {
    fn from_manifest(dir: &Path, manifest: Manifest, cached: bool) -> Self {
        Self {
            flavour: manifest.flavour.clone(),
            dir: dir.to_owned(),
            kernel: dir.join(&manifest.vmlinux.file),
            initrd: dir.join(&manifest.initramfs.file),
            driver_disk: manifest.driver.as_ref().map(|d| dir.join(&d.disk.file)),
            manifest,
            cached,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest flavour `{flavour}` is not built in {dir}; run `gpucell guest build --flavour {flavour}`")]
    NotBuilt { flavour: String, dir: PathBuf },
    #[error("guest artifact {path} is missing or has {got} bytes instead of {want}; run `gpucell guest build --flavour {flavour} --force`")]
    Damaged {
        flavour: String,
        path: PathBuf,
        got: u64,
        want: u64,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("building guest flavour `{0}` failed")]
    Build(String, #[source] BuildError),
}

/// Loads the artifacts of a built flavour. Checks that the files exist with the sizes the
/// manifest names (cheap); [`verify`] also checks their digests.
pub fn load(state_dir: &Path, flavour: &str) -> Result<GuestArtifacts, Error> {
    let dir = state_dir.join("guest").join(flavour);
    let manifest_path = dir.join(manifest::MANIFEST_FILE);
    if !manifest_path.is_file() {
        return Err(Error::NotBuilt {
            flavour: flavour.to_owned(),
            dir,
        });
    }
    let m = Manifest::read(&manifest_path)?;
    let disk = m.driver.as_ref().map(|d| &d.disk);
    for d in [&m.vmlinux, &m.initramfs].into_iter().chain(disk) {
        let path = dir.join(&d.file);
        let got = std::fs::metadata(&path).map(|md| md.len()).unwrap_or(0);
        if got != d.size {
            return Err(Error::Damaged {
                flavour: flavour.to_owned(),
                path,
                got,
                want: d.size,
            });
        }
    }
    Ok(GuestArtifacts::from_manifest(&dir, m, true))
}

/// Checks the SHA-256 of the kernel and init image against the manifest.
pub fn verify(a: &GuestArtifacts) -> Result<(), Error> {
    let disk = a.manifest.driver.as_ref().map(|d| &d.disk);
    for d in [&a.manifest.vmlinux, &a.manifest.initramfs]
        .into_iter()
        .chain(disk)
    {
        let path = a.dir.join(&d.file);
        let ok = deb::sha256_file(&path).is_ok_and(|s| s == d.sha256);
        if !ok {
            return Err(Error::Damaged {
                flavour: a.flavour.clone(),
                path,
                got: 0,
                want: d.size,
            });
        }
    }
    Ok(())
}

/// Builds the artifacts of `opts.flavour`, or returns the cached ones when a build from
/// the same inputs (flavour, kernel package digest, agent digest, builder) is intact.
pub fn build(state_dir: &Path, opts: &BuildOptions) -> Result<GuestArtifacts, Error> {
    build::build(state_dir, opts).map_err(|e| Error::Build(opts.flavour.clone(), e))
}
