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
    /// Modules to load at boot, by name, each under the condition the agent loads it
    /// on; their dependencies are added from modules.dep. Built-in modules are skipped.
    pub modules: &'static [(When, &'static str)],
    /// Further Debian packages whose files go into the init image (none yet).
    pub extra_packages: &'static [&'static str],
    /// The NVIDIA driver flavour (a row of `data/nvidia-flavours.toml`) whose driver disk
    /// this flavour carries; `None` for a GPU-less guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<&'static str>,
}

/// When the agent loads a module: always, or only for the channel or the image
/// filesystem this boot uses (`gpucell.channel=`, `gpucell.rootfs=` on the kernel
/// command line). Module loading is most of the agent's boot time under TCG (ext4 alone
/// takes about 0.2 s there), so nothing is loaded that the boot does not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum When {
    Always,
    Channel(&'static str),
    Rootfs(&'static str),
    /// Only when the sandbox has a network device (`gpucell.net=` on the command line).
    Net,
}

impl When {
    /// The tag in the init image's module order file: `always`, `channel=serial`, ...
    pub fn tag(self) -> String {
        match self {
            When::Always => "always".to_owned(),
            When::Channel(c) => format!("channel={c}"),
            When::Rootfs(f) => format!("rootfs={f}"),
            When::Net => "net=virtio".to_owned(),
        }
    }
}

/// The modules every flavour needs: the virtio transport, the image disk, the channels,
/// the filesystems of an image and of its overlay.
const BASE_MODULES: &[(When, &str)] = &[
    (When::Always, "virtio_pci"),
    (When::Always, "virtio_blk"),
    (When::Always, "overlay"),
    (When::Channel("serial"), "virtio_console"),
    (When::Channel("vsock"), "vmw_vsock_virtio_transport"),
    // ext4 and jbd2 (at mount time) and libcrc32c, which erofs needs (at load time), ask
    // the crypto API for crc32c: without modprobe in the guest the implementation must
    // already be loaded, whatever the filesystem. (modules.dep does not say so: found by
    // the VM tests, erofs failed to load with ENOENT without it.)
    (When::Always, "crc32c_generic"),
    (When::Rootfs("ext4"), "ext4"),
    (When::Rootfs("erofs"), "erofs"),
    (When::Net, "virtio_net"),
];

/// A driver flavour's modules: the base set, with erofs always (the driver disk is erofs).
/// The driver's own modules (drm, nvidia, nvidia-uvm) are on the driver disk and loaded
/// only when NVIDIA GPUs are passed (docs/nvidia-flavours.md).
const DRIVER_MODULES: &[(When, &str)] = &[
    (When::Always, "virtio_pci"),
    (When::Always, "virtio_blk"),
    (When::Always, "overlay"),
    (When::Channel("serial"), "virtio_console"),
    (When::Channel("vsock"), "vmw_vsock_virtio_transport"),
    (When::Always, "crc32c_generic"),
    (When::Rootfs("ext4"), "ext4"),
    (When::Always, "erofs"),
];

pub const FLAVOURS: &[Flavour] = &[
    Flavour {
        name: crate::DEFAULT_FLAVOUR,
        description:
            "microVM kernel (or Debian's with --kernel debian) with virtio, vsock, ext4, erofs and overlay; no GPU driver",
        kernel_package: "linux-image-amd64",
        modules: BASE_MODULES,
        extra_packages: &[],
        driver: None,
    },
    Flavour {
        name: "nvidia-550",
        description: "default + NVIDIA 550.163.01 open modules (trixie), CUDA 12.4; Turing to Hopper incl. H200",
        kernel_package: "linux-image-amd64",
        modules: DRIVER_MODULES,
        extra_packages: &[],
        driver: Some("nvidia-550"),
    },
    Flavour {
        name: "nvidia-535",
        description: "default + NVIDIA 535.261.03 open modules (bookworm), CUDA 12.2; Turing to Hopper, not H200",
        kernel_package: "linux-image-amd64",
        modules: DRIVER_MODULES,
        extra_packages: &[],
        driver: Some("nvidia-535"),
    },
];

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
        assert!(f
            .modules
            .contains(&(When::Channel("serial"), "virtio_console")));
        assert_eq!(When::Rootfs("ext4").tag(), "rootfs=ext4");
        let err = find("nvidia-999").unwrap_err().to_string();
        assert!(
            err.contains("nvidia-999") && err.contains("default"),
            "{err}"
        );
    }

    #[test]
    fn driver_flavours_are_rows_of_the_driver_table() {
        let t = crate::driver::Table::embedded().unwrap();
        for f in FLAVOURS {
            if let Some(d) = f.driver {
                assert_eq!(t.find(d).unwrap().name, f.name);
                assert!(f.modules.contains(&(When::Always, "erofs")));
            }
        }
        assert!(FLAVOURS.iter().filter(|f| f.driver.is_some()).count() >= 2);
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
