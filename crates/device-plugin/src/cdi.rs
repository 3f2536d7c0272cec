//! The host CDI spec of a resource (Container Device Interface,
//! <https://github.com/cncf-tags/container-device-interface>): kind = the resource name
//! (`gpucell.io/H200`), one device per GPU named by its device ID, each holding the GPU's
//! VFIO group node; the container-wide edits hold `/dev/vfio/vfio`. containerd resolves
//! `gpucell.io/H200=0000-41-00.0` through it into `linux.devices` before the runtime (the
//! gpucell shim, or Kata) sees the container. `cdiVersion` is 0.5.0, the version Kata's
//! runtime reads (the spec uses nothing newer).
//!
//! The file (`<dir>/gpucell.io-H200.json`) is replaced atomically (temporary file in the
//! same directory, fsync, rename), so a reader never sees half of it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::resources::Resource;

pub const CDI_VERSION: &str = "0.5.0";
/// The directory kubelet-side runtimes read dynamic CDI specs from.
pub const DEFAULT_CDI_DIR: &str = "/var/run/cdi";
/// The node every VFIO container needs besides its group nodes.
pub const VFIO_CONTAINER_NODE: &str = "/dev/vfio/vfio";

/// Errors writing a CDI spec.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    #[error("cannot create the CDI spec directory {}; create it or pass another with --cdi-dir", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the CDI spec {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the CDI spec of {resource}")]
    Encode {
        resource: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceNode {
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiDevice {
    pub name: String,
    pub container_edits: ContainerEdits,
}

/// A CDI spec as gpucell writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub cdi_version: String,
    pub kind: String,
    pub devices: Vec<CdiDevice>,
    pub container_edits: ContainerEdits,
}

/// The spec of `resource`: every GPU with a VFIO group, healthy or not (a spec only maps
/// names to nodes; the kubelet decides what is handed out). The runtime finds each PCI
/// function from its group node through sysfs.
pub fn spec_for(resource: &Resource) -> Spec {
    let devices = resource
        .devices
        .iter()
        .filter_map(|d| {
            let node = d.vfio_node()?;
            Some(CdiDevice {
                name: d.id.clone(),
                container_edits: ContainerEdits {
                    env: Vec::new(),
                    device_nodes: vec![DeviceNode {
                        path: node.to_string_lossy().into_owned(),
                    }],
                },
            })
        })
        .collect();
    Spec {
        cdi_version: CDI_VERSION.to_owned(),
        kind: resource.name.clone(),
        devices,
        container_edits: ContainerEdits {
            env: Vec::new(),
            device_nodes: vec![DeviceNode {
                path: VFIO_CONTAINER_NODE.to_owned(),
            }],
        },
    }
}

/// The fully qualified CDI name of device `id` of `resource` (`gpucell.io/H200=0000-41-00.0`).
pub fn qualified_name(resource: &str, id: &str) -> String {
    format!("{resource}={id}")
}

/// `<dir>/<domain>-<class>.json` (`gpucell.io-H200.json`).
pub fn spec_path(dir: &Path, resource: &Resource) -> PathBuf {
    dir.join(format!("{}.json", resource.name.replace('/', "-")))
}

/// Writes the spec of `resource` into `dir` atomically; returns its path.
pub fn write_spec(dir: &Path, resource: &Resource) -> Result<PathBuf, CdiError> {
    std::fs::create_dir_all(dir).map_err(|source| CdiError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let path = spec_path(dir, resource);
    let mut text =
        serde_json::to_vec_pretty(&spec_for(resource)).map_err(|source| CdiError::Encode {
            resource: resource.name.clone(),
            source,
        })?;
    text.push(b'\n');
    gpucell_common::atomic::write_atomic(&path, &text, 0o644).map_err(|source| {
        CdiError::Write {
            path: path.clone(),
            source,
        }
    })?;
    Ok(path)
}
