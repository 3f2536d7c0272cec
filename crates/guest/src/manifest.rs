//! The manifest of a built flavour (`manifest.json`): what went in, what came out.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Version of the manifest schema and of the artifact layout. Bumping it invalidates
/// every cached build.
pub const MANIFEST_SCHEMA: u32 = 2;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const VMLINUX_FILE: &str = "vmlinux";
pub const INITRAMFS_FILE: &str = "initramfs.cpio";

/// A file and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// File name (artifacts: inside the flavour dir; inputs: the name they came under).
    pub file: String,
    /// Lower-case hex SHA-256.
    pub sha256: String,
    pub size: u64,
}

/// Describes one built flavour. Holds no timestamps or host paths: the same inputs give a
/// byte-identical manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: u32,
    /// Version of the gpucell-guest code that built it.
    pub builder: String,
    pub flavour: String,
    /// Guest kernel release (`uname -r` in the guest), e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// Concrete Debian kernel package and its version.
    pub kernel_package: String,
    pub kernel_package_version: String,
    /// The kernel `.deb` it was built from.
    pub deb: FileDigest,
    /// Uncompressed ELF kernel, booted by its PVH entry.
    pub vmlinux: FileDigest,
    /// Uncompressed newc cpio init image.
    pub initramfs: FileDigest,
    /// The agent binary, `/init` of the init image.
    pub agent: FileDigest,
    /// Modules the flavour asked for, as `name (condition)`.
    pub requested_modules: Vec<String>,
    /// Modules in the init image, in the order the agent loads them.
    pub modules: Vec<String>,
    /// When the agent loads each of them: `always`, `channel=serial|vsock` or
    /// `rootfs=erofs|ext4` (what the kernel command line names).
    pub module_conditions: std::collections::BTreeMap<String, String>,
    /// Requested modules that are built into this kernel.
    pub builtin_modules: Vec<String>,
    pub extra_packages: Vec<String>,
    /// The NVIDIA driver disk of a driver flavour; absent for a GPU-less one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<crate::driver::DriverManifest>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading the guest manifest {0} failed")]
    Read(std::path::PathBuf, #[source] std::io::Error),
    #[error("the guest manifest {0} is malformed or from another gpucell version; rebuild with `gpucell guest build --force`")]
    Parse(std::path::PathBuf, #[source] serde_json::Error),
}

/// Largest manifest accepted (a few KiB; a driver flavour's lists every file of its disk).
const MAX_MANIFEST: u64 = 4 << 20;

impl Manifest {
    pub fn read(path: &Path) -> Result<Self, ManifestError> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_MANIFEST).read_to_string(&mut text))
            .map_err(|e| ManifestError::Read(path.to_owned(), e))?;
        serde_json::from_str(&text).map_err(|e| ManifestError::Parse(path.to_owned(), e))
    }

    /// Pretty JSON with a final newline; field order is fixed by the struct.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}
