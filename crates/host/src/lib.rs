//! Host side of gpucell: the sysfs model of PCI functions and IOMMU groups, `doctor`
//! checks, VFIO binding and boot configuration. Every path is read under a host root
//! passed in by the caller; nothing here names `/sys` directly.
