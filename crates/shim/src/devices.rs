//! The VFIO devices of a task's `linux.devices` (put there by the device plugin, by CDI
//! or by `ctr run --device`), mapped to the PCI functions they stand for through sysfs,
//! so that they go through the same allocator as `gpucell run`'s `--gpus`/`--device`.
//!
//! - `/dev/vfio/N` is IOMMU group N: its NVIDIA GPUs are passed (their companions, such
//!   as the HDMI audio function, are bound by the allocator but not passed); a group
//!   without a GPU passes every endpoint (bridges never).
//! - `/dev/vfio/devices/vfioN` (iommufd) is the function behind
//!   `/sys/class/vfio-dev/vfioN/device`.
//! - `/dev/vfio/vfio` (the container node) and `/dev/iommu` carry no device.

use std::path::{Path, PathBuf};

use gpucell_host::pci::PciFunction;
use gpucell_host::{Bdf, HostRoot};

/// Errors mapping a task's devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("linux.devices entry {}: IOMMU group {group} has no member on this host: is the device plugin's or CDI spec's group number current?", path.display())]
    Group {
        path: PathBuf,
        group: u32,
        #[source]
        source: gpucell_host::iommu::IommuError,
    },
    #[error("linux.devices entry {}: reading PCI function {bdf}", path.display())]
    Function {
        path: PathBuf,
        bdf: Bdf,
        #[source]
        source: Box<gpucell_host::pci::PciError>,
    },
    #[error("linux.devices entry {}: no PCI function behind {}: is the VFIO cdev still there?", path.display(), link.display())]
    Cdev { path: PathBuf, link: PathBuf },
    #[error("PCI function {bdf}, which the kubelet's PodResources gave the pod: reading it")]
    Learnt {
        bdf: Bdf,
        #[source]
        source: Box<gpucell_host::pci::PciError>,
    },
    #[error("linux.devices entry {}: IOMMU group {group} holds only bridges: nothing to pass", path.display())]
    OnlyBridges { path: PathBuf, group: u32 },
}

/// The PCI functions a task's devices stand for, and the entries that are not VFIO.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Passed {
    /// NVIDIA GPUs (the run's `gpus`).
    pub gpus: Vec<Bdf>,
    /// Other functions (the run's `functions`).
    pub functions: Vec<Bdf>,
    /// Device entries that cannot reach a VM and were left out.
    pub ignored: Vec<PathBuf>,
}

impl Passed {
    /// `gpus` as the run request's `devices.gpus` (`None` without GPUs).
    pub fn gpus_field(&self) -> Option<String> {
        (!self.gpus.is_empty()).then(|| {
            self.gpus
                .iter()
                .map(Bdf::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
    }

    /// `functions` as the run request's `devices.functions`.
    pub fn functions_field(&self) -> Vec<String> {
        self.functions.iter().map(Bdf::to_string).collect()
    }
}

/// Maps `paths` (the `linux.devices` paths) to PCI functions under `root`.
pub fn map(root: &HostRoot, paths: &[PathBuf]) -> Result<Passed, DeviceError> {
    let mut out = Passed::default();
    for path in paths {
        let Some(kind) = vfio_node(path) else {
            out.ignored.push(path.clone());
            continue;
        };
        let (gpus, others) = match kind {
            VfioNode::Container => continue,
            VfioNode::Group(group) => group_functions(root, path, group)?,
            VfioNode::Cdev(name) => {
                let bdf = cdev_function(root, path, &name)?;
                let f = read(root, path, bdf)?;
                if f.is_nvidia_gpu() {
                    (vec![bdf], Vec::new())
                } else {
                    (Vec::new(), vec![bdf])
                }
            }
        };
        for b in gpus {
            if !out.gpus.contains(&b) {
                out.gpus.push(b);
            }
        }
        for b in others {
            if !out.functions.contains(&b) {
                out.functions.push(b);
            }
        }
    }
    Ok(out)
}

/// Adds `bdfs` (functions the kubelet's PodResources named) to `passed`, each once:
/// NVIDIA GPUs as GPUs, the rest as functions.
pub fn add_functions(
    root: &HostRoot,
    passed: &mut Passed,
    bdfs: &[Bdf],
) -> Result<(), DeviceError> {
    for &bdf in bdfs {
        let f = PciFunction::read(root, bdf).map_err(|source| DeviceError::Learnt {
            bdf,
            source: Box::new(source),
        })?;
        let list = if f.is_nvidia_gpu() {
            &mut passed.gpus
        } else {
            &mut passed.functions
        };
        if !list.contains(&bdf) {
            list.push(bdf);
        }
    }
    Ok(())
}

/// `gpus` (comma-separated) and `functions` of a run request, as addresses.
pub fn from_fields(gpus: Option<&str>, functions: &[String]) -> Result<Passed, String> {
    let parse = |s: &str| {
        s.trim()
            .parse::<Bdf>()
            .map_err(|_| format!("{s:?} is not a PCI address"))
    };
    let mut out = Passed::default();
    for g in gpus.into_iter().flat_map(|g| g.split(',')) {
        out.gpus.push(parse(g)?);
    }
    for f in functions {
        out.functions.push(parse(f)?);
    }
    Ok(out)
}

enum VfioNode {
    Container,
    Group(u32),
    Cdev(String),
}

fn vfio_node(path: &Path) -> Option<VfioNode> {
    let s = path.to_str()?;
    if s == "/dev/vfio/vfio" {
        return Some(VfioNode::Container);
    }
    if let Some(n) = s.strip_prefix("/dev/vfio/devices/") {
        let digits = n.strip_prefix("vfio")?;
        return (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| VfioNode::Cdev(n.to_string()));
    }
    s.strip_prefix("/dev/vfio/")
        .and_then(|n| n.parse().ok())
        .map(VfioNode::Group)
}

fn read(root: &HostRoot, path: &Path, bdf: Bdf) -> Result<PciFunction, DeviceError> {
    PciFunction::read(root, bdf).map_err(|source| DeviceError::Function {
        path: path.to_path_buf(),
        bdf,
        source: Box::new(source),
    })
}

/// The group's GPUs when it has any, else its endpoints.
fn group_functions(
    root: &HostRoot,
    path: &Path,
    group: u32,
) -> Result<(Vec<Bdf>, Vec<Bdf>), DeviceError> {
    let members =
        gpucell_host::iommu::group_members(root, group).map_err(|source| DeviceError::Group {
            path: path.to_path_buf(),
            group,
            source,
        })?;
    let mut gpus = Vec::new();
    let mut endpoints = Vec::new();
    for bdf in members {
        let f = read(root, path, bdf)?;
        if f.is_bridge() {
            continue;
        }
        if f.is_nvidia_gpu() {
            gpus.push(bdf);
        }
        endpoints.push(bdf);
    }
    if !gpus.is_empty() {
        return Ok((gpus, Vec::new()));
    }
    if endpoints.is_empty() {
        return Err(DeviceError::OnlyBridges {
            path: path.to_path_buf(),
            group,
        });
    }
    Ok((Vec::new(), endpoints))
}

fn cdev_function(root: &HostRoot, path: &Path, name: &str) -> Result<Bdf, DeviceError> {
    let link = root.sys(&format!("class/vfio-dev/{name}/device"));
    std::fs::read_link(&link)
        .ok()
        .and_then(|t| t.file_name()?.to_str()?.parse().ok())
        .ok_or(DeviceError::Cdev {
            path: path.to_path_buf(),
            link,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpucell_host::testing::{FakeFunction, FakeHost};

    fn host() -> FakeHost {
        let host = FakeHost::new().unwrap();
        host.add(
            &FakeFunction::rtx4090("0000:01:00.0")
                .driver("vfio-pci")
                .iommu_group(12),
        )
        .unwrap();
        host.add(
            &FakeFunction::rtx4090_audio("0000:01:00.1")
                .driver("vfio-pci")
                .iommu_group(12),
        )
        .unwrap();
        // QEMU's edu device, alone in its group.
        host.add(
            &FakeFunction::new("0000:00:05.0", 0x1234, 0x11e8, 0x00ff00)
                .driver("vfio-pci")
                .iommu_group(7),
        )
        .unwrap();
        host
    }

    fn paths(p: &[&str]) -> Vec<PathBuf> {
        p.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn a_gpu_group_passes_the_gpu_and_an_edu_group_its_function() {
        let host = host();
        let passed = map(
            &host.root(),
            &paths(&[
                "/dev/vfio/vfio",
                "/dev/vfio/12",
                "/dev/vfio/7",
                "/dev/null",
                "/dev/vfio/12",
            ]),
        )
        .unwrap();
        assert_eq!(passed.gpus_field().as_deref(), Some("0000:01:00.0"));
        assert_eq!(passed.functions_field(), ["0000:00:05.0"]);
        assert_eq!(passed.ignored, paths(&["/dev/null"]));
    }

    #[test]
    fn an_unknown_group_is_named() {
        let host = host();
        let err = map(&host.root(), &paths(&["/dev/vfio/99"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/dev/vfio/99") && msg.contains("99"), "{msg}");
    }

    #[test]
    fn an_iommufd_cdev_maps_through_its_link() {
        let host = host();
        let dir = host.root().sys("class/vfio-dev/vfio3");
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(
            host.root().sys("bus/pci/devices/0000:00:05.0"),
            dir.join("device"),
        )
        .unwrap();
        let passed = map(&host.root(), &paths(&["/dev/vfio/devices/vfio3"])).unwrap();
        assert_eq!(passed.functions_field(), ["0000:00:05.0"]);
        let err = map(&host.root(), &paths(&["/dev/vfio/devices/vfio4"])).unwrap_err();
        assert!(err.to_string().contains("vfio4"), "{err}");
    }
}
