//! The CDI spec's types (the subset of the 0.6.0 schema NVIDIA specs use), their
//! validation, and the hook steps the agent performs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use super::*;

pub(super) fn is_empty<T>(v: &[T]) -> bool {
    v.is_empty()
}

/// A CDI spec (the subset of the 0.6.0 schema that NVIDIA specs use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    pub cdi_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub devices: Vec<Device>,
    #[serde(default)]
    pub container_edits: ContainerEdits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub container_edits: ContainerEdits,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerEdits {
    #[serde(default, skip_serializing_if = "is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub hooks: Vec<Hook>,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub mounts: Vec<Mount>,
}

impl ContainerEdits {
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.device_nodes.is_empty()
            && self.hooks.is_empty()
            && self.mounts.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceNode {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// `c` or `b`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

impl DeviceNode {
    /// Where the node is read from when the spec is applied (`hostPath`, else `path`).
    pub fn source(&self) -> &str {
        self.host_path.as_deref().unwrap_or(&self.path)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hook {
    pub hook_name: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    pub host_path: String,
    pub container_path: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub options: Vec<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl Spec {
    /// Pretty JSON, ending in a newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Parses and validates.
    pub fn from_json(s: &str) -> Result<Spec, CdiError> {
        let spec: Spec = serde_json::from_str(s).map_err(CdiError::Json)?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The container directory the libraries were generated for.
    pub fn library_dir(&self) -> &str {
        self.annotations
            .get(ANNOTATION_LIBRARY_DIR)
            .map_or(DEFAULT_CONTAINER_LIB_DIR, String::as_str)
    }

    pub fn driver_version(&self) -> Option<&str> {
        self.annotations
            .get(ANNOTATION_DRIVER_VERSION)
            .map(String::as_str)
    }

    /// Checks what the agent relies on: the version and kind, absolute paths without `..`,
    /// device nodes under `/dev`, unique device names, edits on every GPU device, and hooks
    /// gpucell knows.
    pub fn validate(&self) -> Result<(), CdiError> {
        let bad = |m: String| Err(CdiError::Invalid(m));
        if !cdi_version_ok(&self.cdi_version) {
            return bad(format!(
                "cdiVersion `{}` (0.6.0 or later)",
                self.cdi_version
            ));
        }
        if self.kind != KIND {
            return bad(format!("kind `{}` (expected {KIND})", self.kind));
        }
        let mut names = BTreeSet::new();
        for d in &self.devices {
            let name_ok = !d.name.is_empty()
                && d.name.len() <= 128
                && d.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            if !name_ok || !names.insert(d.name.as_str()) {
                return bad(format!("device name `{}` (empty, odd or repeated)", d.name));
            }
            if d.name != "all" && d.container_edits.is_empty() {
                return bad(format!("device `{}` has no edits", d.name));
            }
            validate_edits(&d.container_edits)?;
        }
        validate_edits(&self.container_edits)
    }
}

pub(super) fn cdi_version_ok(v: &str) -> bool {
    let parts: Vec<u32> = v.split('.').filter_map(|p| p.parse().ok()).collect();
    parts.len() == 3 && v.split('.').count() == 3 && (parts[0], parts[1]) >= (0, 6)
}

/// An absolute path with no `..`, `.` or empty components.
pub fn clean_absolute(p: &str) -> bool {
    p.starts_with('/')
        && !p.contains('\0')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !p.contains("//")
        && !p.split('/').any(|c| c == "." || c == "..")
}

pub(super) fn validate_edits(e: &ContainerEdits) -> Result<(), CdiError> {
    let bad = |m: String| Err(CdiError::Invalid(m));
    for n in &e.device_nodes {
        if !clean_absolute(&n.path) || !n.path.starts_with("/dev/") {
            return bad(format!(
                "device node path `{}` (must be under /dev)",
                n.path
            ));
        }
        if n.host_path.as_deref().is_some_and(|h| !clean_absolute(h)) {
            return bad(format!("device node hostPath of `{}`", n.path));
        }
        if n.kind.as_deref().is_some_and(|k| k != "c" && k != "b") {
            return bad(format!("device node type of `{}`", n.path));
        }
    }
    for m in &e.mounts {
        if !clean_absolute(&m.host_path) || !clean_absolute(&m.container_path) {
            return bad(format!("mount `{}` -> `{}`", m.host_path, m.container_path));
        }
    }
    for h in &e.hooks {
        if h.hook_name != HOOK_NAME {
            return bad(format!(
                "hook name `{}` (gpucell runs createContainer steps only)",
                h.hook_name
            ));
        }
        HookStep::from_hook(h)?;
    }
    for v in &e.env {
        if !v.contains('=') || v.starts_with('=') {
            return bad(format!("environment entry `{v}`"));
        }
    }
    Ok(())
}

/// A hook read back: the step it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookStep {
    /// `(target, link)` pairs: a symlink at container path `link` pointing at `target`.
    CreateSymlinks(Vec<(String, String)>),
    /// Use the image's `/usr/local/cuda/compat` when its libcuda is newer than this driver.
    EnableCudaCompat { host_driver_version: String },
    /// Refresh the container's ld.so.cache with these folders.
    UpdateLdcache { folders: Vec<String> },
    /// Bind a copy of `/proc/driver/nvidia/params` saying `ModifyDeviceFiles: 0`.
    DisableDeviceNodeModification,
}

impl HookStep {
    /// Reads a hook in `nvidia-cdi-hook`'s argument form (`args[0]` the program name).
    pub fn from_hook(h: &Hook) -> Result<HookStep, CdiError> {
        let bad = |m: &str| CdiError::Invalid(format!("hook {:?}: {m}", h.args));
        let sub = h.args.get(1).ok_or_else(|| bad("no subcommand"))?;
        let flags = &h.args[2..];
        match sub.as_str() {
            "create-symlinks" => {
                let mut links = Vec::new();
                for v in flag_values(flags, "--link").map_err(|m| bad(&m))? {
                    let (target, link) = v
                        .split_once("::")
                        .ok_or_else(|| bad("a --link is not TARGET::LINK"))?;
                    if target.is_empty() || target.contains('\0') || !clean_absolute(link) {
                        return Err(bad("a --link has an empty target or a bad link path"));
                    }
                    links.push((target.to_owned(), link.to_owned()));
                }
                Ok(HookStep::CreateSymlinks(links))
            }
            "enable-cuda-compat" => {
                let v = flag_values(flags, "--host-driver-version").map_err(|m| bad(&m))?;
                match v.as_slice() {
                    [one] if crate::Version::parse(one).is_some() => {
                        Ok(HookStep::EnableCudaCompat {
                            host_driver_version: one.clone(),
                        })
                    }
                    _ => Err(bad("one --host-driver-version=VERSION is needed")),
                }
            }
            "update-ldcache" => {
                let folders = flag_values(flags, "--folder").map_err(|m| bad(&m))?;
                if folders.iter().any(|f| !clean_absolute(f)) {
                    return Err(bad("a --folder is not a clean absolute path"));
                }
                Ok(HookStep::UpdateLdcache { folders })
            }
            "disable-device-node-modification" if flags.is_empty() => {
                Ok(HookStep::DisableDeviceNodeModification)
            }
            _ => Err(bad("unknown subcommand or arguments")),
        }
    }

    /// The hook that asks for this step, with program `path` (`HOOK_PATH` for gpucell).
    pub fn to_hook(&self, path: &str) -> Hook {
        let argv0 = Path::new(path)
            .file_name()
            .map_or("cdi-hook".into(), |n| n.to_string_lossy().into_owned());
        let mut args = vec![argv0];
        match self {
            HookStep::CreateSymlinks(links) => {
                args.push("create-symlinks".into());
                for (t, l) in links {
                    args.push("--link".into());
                    args.push(format!("{t}::{l}"));
                }
            }
            HookStep::EnableCudaCompat {
                host_driver_version,
            } => {
                args.push("enable-cuda-compat".into());
                args.push(format!("--host-driver-version={host_driver_version}"));
            }
            HookStep::UpdateLdcache { folders } => {
                args.push("update-ldcache".into());
                for f in folders {
                    args.push("--folder".into());
                    args.push(f.clone());
                }
            }
            HookStep::DisableDeviceNodeModification => {
                args.push("disable-device-node-modification".into());
            }
        }
        Hook {
            hook_name: HOOK_NAME.into(),
            path: path.into(),
            args,
            env: vec!["NVIDIA_CTK_DEBUG=false".into()],
            timeout: None,
        }
    }
}

/// Values of `--name V` / `--name=V` flags; any other argument is an error.
pub(super) fn flag_values(args: &[String], name: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == name {
            out.push(it.next().ok_or(format!("{name} has no value"))?.clone());
        } else if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            out.push(v.to_owned());
        } else {
            return Err(format!("unexpected argument `{a}`"));
        }
    }
    Ok(out)
}
