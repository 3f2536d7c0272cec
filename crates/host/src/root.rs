//! The host root: the directory that stands for `/` when reading the host.
//!
//! Production code passes `/`; tests and `--host-root` pass a captured or built tree.
//! Every sysfs, procfs, `/etc` and `/dev` path in this crate is derived from a
//! [`HostRoot`], so the same code reads a real host and a fixture.

use std::path::{Path, PathBuf};

use crate::bdf::Bdf;

/// The directory that stands for `/` on the host being inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoot {
    path: PathBuf,
}

impl HostRoot {
    /// A host root at `path` (`/` for the running host).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when this root is the running machine's `/`.
    pub fn is_live(&self) -> bool {
        self.path == Path::new("/")
    }

    /// `<root>/sys/<rel>`.
    pub fn sys(&self, rel: &str) -> PathBuf {
        self.path.join("sys").join(rel)
    }

    /// `<root>/proc/<rel>`.
    pub fn proc(&self, rel: &str) -> PathBuf {
        self.path.join("proc").join(rel)
    }

    /// `<root>/etc/<rel>`.
    pub fn etc(&self, rel: &str) -> PathBuf {
        self.path.join("etc").join(rel)
    }

    /// `<root>/dev/<rel>`.
    pub fn dev(&self, rel: &str) -> PathBuf {
        self.path.join("dev").join(rel)
    }

    /// `<root>/sys/bus/pci/devices`: one entry per PCI function.
    pub fn pci_devices_dir(&self) -> PathBuf {
        self.sys("bus/pci/devices")
    }

    /// `<root>/sys/bus/pci/devices/<bdf>`: a function's sysfs directory.
    pub fn pci_device(&self, bdf: &Bdf) -> PathBuf {
        self.pci_devices_dir().join(bdf.to_string())
    }

    /// `<root>/sys/bus/pci/drivers/<name>`.
    pub fn pci_driver(&self, name: &str) -> PathBuf {
        self.sys("bus/pci/drivers").join(name)
    }

    /// `<root>/sys/kernel/iommu_groups`.
    pub fn iommu_groups_dir(&self) -> PathBuf {
        self.sys("kernel/iommu_groups")
    }
}

impl Default for HostRoot {
    fn default() -> Self {
        Self::new("/")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_under_the_root() {
        let root = HostRoot::new("/tmp/x");
        assert_eq!(
            root.sys("class/iommu"),
            PathBuf::from("/tmp/x/sys/class/iommu")
        );
        assert_eq!(root.proc("cmdline"), PathBuf::from("/tmp/x/proc/cmdline"));
        assert_eq!(root.dev("kvm"), PathBuf::from("/tmp/x/dev/kvm"));
        assert_eq!(
            root.etc("modprobe.d"),
            PathBuf::from("/tmp/x/etc/modprobe.d")
        );
        let bdf: Bdf = "0000:01:00.0".parse().unwrap();
        assert_eq!(
            root.pci_device(&bdf),
            PathBuf::from("/tmp/x/sys/bus/pci/devices/0000:01:00.0")
        );
        assert!(!root.is_live());
        assert!(HostRoot::default().is_live());
    }
}
