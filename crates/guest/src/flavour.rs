//! Guest flavours: named recipes for guest artifacts. A flavour is data, not code: the
//! kernel package, the modules the agent loads at boot, and extra packages (later, one
//! flavour per NVIDIA driver branch adds the driver's packages and modules).

use serde::Serialize;

/// A named recipe for a guest kernel and init image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flavour {
    pub name: &'static str,
    pub description: &'static str,
    /// Debian package of the kernel; a metapackage is resolved to its current kernel.
    pub kernel_package: &'static str,
    /// Modules to load at boot, by name; their dependencies are added from modules.dep.
    /// Modules built into the kernel are skipped.
    pub modules: &'static [&'static str],
    /// Further Debian packages whose files go into the init image (none yet).
    pub extra_packages: &'static [&'static str],
}

/// The modules every flavour needs: the virtio transport, the image disk, the channel,
/// the filesystems of an image and of its overlay.
const BASE_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "vmw_vsock_virtio_transport",
    // ext4 and jbd2 ask the crypto API for crc32c at mount time; without modprobe in the
    // guest the implementation must already be loaded.
    "crc32c_generic",
    "ext4",
    "erofs",
    "overlay",
];

pub const FLAVOURS: &[Flavour] = &[Flavour {
    name: crate::DEFAULT_FLAVOUR,
    description: "Debian stable kernel with virtio, vsock, ext4, erofs and overlay; no GPU driver",
    kernel_package: "linux-image-amd64",
    modules: BASE_MODULES,
    extra_packages: &[],
}];

#[derive(Debug, thiserror::Error)]
pub enum FlavourError {
    #[error("unknown guest flavour `{name}`; known flavours: {known}")]
    Unknown { name: String, known: String },
    #[error("flavour `{0}` lists extra packages, which this version cannot install yet")]
    ExtraPackages(String),
}

/// Looks a flavour up by name.
pub fn find(name: &str) -> Result<&'static Flavour, FlavourError> {
    FLAVOURS
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| FlavourError::Unknown {
            name: name.to_owned(),
            known: FLAVOURS
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_flavour_exists_and_unknown_is_named() {
        let f = find("default").unwrap();
        assert!(f.modules.contains(&"virtio_console"));
        let err = find("nvidia-999").unwrap_err().to_string();
        assert!(
            err.contains("nvidia-999") && err.contains("default"),
            "{err}"
        );
    }

    #[test]
    fn flavour_names_are_unique_and_path_safe() {
        let mut names: Vec<_> = FLAVOURS.iter().map(|f| f.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), FLAVOURS.len());
        for n in names {
            assert!(n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }
}
