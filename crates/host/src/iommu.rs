//! IOMMU groups: which functions share one, and whether a group can be given to VFIO.
//!
//! A group is *viable* for VFIO when every endpoint in it is bound to vfio-pci (or a vfio-pci
//! variant) or to no driver. PCI-to-PCI bridges do not count: the kernel lets them stay
//! on `pcieport`.

use std::path::PathBuf;

use serde::Serialize;

use crate::bdf::Bdf;
use crate::pci::{Driver, PciScan};
use crate::root::HostRoot;
use crate::sysfs::{self, SysfsError};

/// Errors reading IOMMU groups.
#[derive(Debug, thiserror::Error)]
pub enum IommuError {
    #[error("IOMMU group {group} has no member list at {}", path.display())]
    NoSuchGroup { group: u32, path: PathBuf },
    #[error("cannot list IOMMU group {group}")]
    Read {
        group: u32,
        #[source]
        source: SysfsError,
    },
    #[error("cannot list the IOMMU groups")]
    List {
        #[source]
        source: SysfsError,
    },
}

/// True when the kernel created IOMMU groups (`<root>/sys/kernel/iommu_groups` is not
/// empty), i.e. an IOMMU is on and devices can be given to VFIO.
pub fn groups_present(root: &HostRoot) -> Result<bool, IommuError> {
    sysfs::list_dir_opt(&root.iommu_groups_dir())
        .map(|names| !names.is_empty())
        .map_err(|source| IommuError::List { source })
}

/// Number of IOMMU groups on the host.
pub fn group_count(root: &HostRoot) -> Result<usize, IommuError> {
    sysfs::list_dir_opt(&root.iommu_groups_dir())
        .map(|names| names.len())
        .map_err(|source| IommuError::List { source })
}

/// The members of IOMMU group `group`, from `<root>/sys/kernel/iommu_groups/<group>/devices`.
/// Entries that are not PCI addresses (non-PCI devices can share groups) are skipped.
pub fn group_members(root: &HostRoot, group: u32) -> Result<Vec<Bdf>, IommuError> {
    let path = root
        .iommu_groups_dir()
        .join(group.to_string())
        .join("devices");
    let names = sysfs::list_dir(&path).map_err(|source| {
        if source.is_not_found() {
            IommuError::NoSuchGroup {
                group,
                path: path.clone(),
            }
        } else {
            IommuError::Read { group, source }
        }
    })?;
    let mut members: Vec<Bdf> = names
        .iter()
        .filter_map(|n| n.to_str().and_then(|s| s.parse().ok()))
        .collect();
    members.sort();
    Ok(members)
}

/// A function that keeps its IOMMU group from being viable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupMember {
    pub bdf: Bdf,
    /// `vendor:device`, when the function could be read.
    pub id: Option<String>,
    pub driver: Driver,
}

/// The endpoints of `members` that are bound to a driver other than VFIO, or whose driver
/// could not be read. Bridges and unbound endpoints are fine. A member missing from
/// `scan` (its identity was unreadable) is reported with an unknown driver: it may be
/// bound to anything.
pub fn non_vfio_endpoints(scan: &PciScan, members: &[Bdf]) -> Vec<GroupMember> {
    let mut out = Vec::new();
    for &bdf in members {
        match scan.get(bdf) {
            Some(f) if f.is_bridge() => {}
            Some(f) => match &f.driver {
                Driver::Unbound => {}
                d if d.is_vfio() => {}
                d => out.push(GroupMember {
                    bdf,
                    id: Some(f.id_string()),
                    driver: d.clone(),
                }),
            },
            None => out.push(GroupMember {
                bdf,
                id: None,
                driver: Driver::Unknown,
            }),
        }
    }
    out
}
