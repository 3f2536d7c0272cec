//! Host side of gpucell: the sysfs model of PCI functions and IOMMU groups, `doctor`
//! checks, VFIO binding and boot configuration. Every path is read under a host root
//! passed in by the caller; nothing here names `/sys` directly.

pub mod arch;
pub mod bar;
pub mod bdf;
pub mod cmdline;
pub mod devices;
pub mod doctor;
pub mod gpu;
pub mod gpu_state;
pub mod gpu_view;
pub mod iommu;
pub mod names;
pub mod pci;
pub mod root;
pub mod sysfs;
#[cfg(feature = "test-support")]
pub mod testing;

pub use bdf::Bdf;
pub use root::HostRoot;
pub mod bind;
pub mod bootcfg;
