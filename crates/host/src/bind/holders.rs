//! What holds a PCI function on the host, so that taking it from its driver would break
//! something: a display, a process with the device open, a network interface that is up,
//! a block device.
//!
//! Everything is read from sysfs and procfs under the host root:
//! - `<fn>/boot_vga` = `1`: the firmware console and usually the desktop run on it.
//! - `<fn>/drm/card*/card*-*/status` = `connected`: a monitor is attached to a connector.
//! - processes with `/dev/nvidia<minor>` (minor from
//!   `/proc/driver/nvidia/gpus/<bdf>/information`), `/dev/dri/card*` or
//!   `/dev/dri/renderD*` of the function open, from the `/proc/<pid>/fd/*` links (for
//!   unbind: `/dev/vfio/<group>`, held by a running VM).
//! - when the nvidia driver is bound but procfs gives no minor: the module's users,
//!   `/sys/module/nvidia/refcnt` minus the modules in `holders/`.
//! - `<fn>/net/<if>/operstate` = `up`.
//! - block devices below the function (`…/block/<name>`, `nvme/nvme*/nvme*n*`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bdf::Bdf;
use crate::pci::PciFunction;
use crate::root::HostRoot;
use crate::sysfs;

/// Most processes looked at when searching for open device files.
const MAX_PROCESSES: usize = 1 << 22;
/// Most open files looked at per process.
const MAX_FDS_PER_PROCESS: usize = 1 << 20;
/// Most directories visited below a function when looking for block devices.
const MAX_WALK: usize = 4096;

/// Why a function is in use on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Hold {
    /// `boot_vga` is 1.
    BootDisplay,
    /// A DRM connector reports a connected monitor.
    ConnectedDisplay { connector: String },
    /// A process has one of the function's device files open.
    OpenFile {
        pid: u32,
        command: String,
        file: String,
    },
    /// The bound kernel module has users that are not other modules.
    ModuleUsers { module: String, users: u64 },
    /// A network interface of the function is up.
    NetworkInterface { name: String },
    /// A block device sits below the function.
    BlockDevice { name: String },
}

/// A function and what holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub bdf: Bdf,
    #[serde(flatten)]
    pub hold: Hold,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bdf = self.bdf;
        match &self.hold {
            Hold::BootDisplay => write!(f, "{bdf} is the host's boot display (boot_vga = 1)"),
            Hold::ConnectedDisplay { connector } => {
                write!(f, "{bdf} drives a connected display on {connector}")
            }
            Hold::OpenFile { pid, command, file } => {
                write!(f, "{bdf} is open by process {pid} ({command}) through {file}; stop it first")
            }
            Hold::ModuleUsers { module, users } => write!(
                f,
                "{bdf} is bound to {module}, which has {users} user(s) besides other modules; \
                 stop the programs using the GPU first"
            ),
            Hold::NetworkInterface { name } => {
                write!(f, "{bdf} carries network interface {name}, which is up")
            }
            Hold::BlockDevice { name } => write!(
                f,
                "{bdf} holds block device {name}; if nothing uses it, unbind it from its driver yourself"
            ),
        }
    }
}

/// Display holds: the boot display flag and connected DRM connectors.
pub fn display_holds(root: &HostRoot, bdf: Bdf, warnings: &mut Vec<String>) -> Vec<Holder> {
    let dir = root.pci_device(&bdf);
    let mut out = Vec::new();
    match sysfs::read_text_opt(&dir.join("boot_vga")) {
        Ok(Some(v)) if v == "1" => out.push(Holder {
            bdf,
            hold: Hold::BootDisplay,
        }),
        Ok(_) => {}
        Err(e) => warnings.push(gpucell_common::chain_string(&e)),
    }
    for card in drm_nodes(&dir, warnings)
        .into_iter()
        .filter(|n| n.starts_with("card"))
    {
        let card_dir = dir.join("drm").join(&card);
        let entries = match sysfs::list_dir_opt(&card_dir) {
            Ok(e) => e,
            Err(e) => {
                warnings.push(gpucell_common::chain_string(&e));
                continue;
            }
        };
        for entry in entries {
            let Some(name) = entry.to_str() else { continue };
            if !name.starts_with(&format!("{card}-")) {
                continue;
            }
            match sysfs::read_text_opt(&card_dir.join(name).join("status")) {
                Ok(Some(s)) if s == "connected" => out.push(Holder {
                    bdf,
                    hold: Hold::ConnectedDisplay {
                        connector: sysfs::printable(name),
                    },
                }),
                Ok(_) => {}
                Err(e) => warnings.push(gpucell_common::chain_string(&e)),
            }
        }
    }
    out
}

/// Names under `<fn>/drm/` (`card0`, `renderD128`), validated as plain names.
fn drm_nodes(dir: &Path, warnings: &mut Vec<String>) -> Vec<String> {
    match sysfs::list_dir_opt(&dir.join("drm")) {
        Ok(names) => names
            .iter()
            .filter_map(|n| n.to_str())
            .filter(|n| {
                (n.starts_with("card") || n.starts_with("renderD"))
                    && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
            .map(str::to_owned)
            .collect(),
        Err(e) => {
            warnings.push(gpucell_common::chain_string(&e));
            Vec::new()
        }
    }
}

/// Device files whose open handles mean the function is in use, and the processes that
/// hold them, found in one pass over `<root>/proc`.
#[derive(Debug, Default)]
pub struct OpenFiles {
    /// device file path → (pid, command)
    by_file: BTreeMap<String, Vec<(u32, String)>>,
    /// False when `<root>/proc` could not be listed.
    scanned: bool,
    /// Processes whose open files could not be read (not root, or gone).
    unreadable: usize,
}

fn interesting(target: &str) -> bool {
    target.starts_with("/dev/nvidia")
        || target.starts_with("/dev/dri/")
        || target.starts_with("/dev/vfio/")
}

/// The device path a descriptor's link names, as the host knows it. A jailed QEMU holds
/// nodes made in its own root: seen from the host, the link reads `/dev/vfio/1` after a
/// pivot_root, or `<the jail's staging dir>/dev/vfio/1` where the jail fell back to chroot
/// (an initramfs root). Both count as `/dev/vfio/1`: a stray match can only make a
/// device look busy, never free.
fn device_path(target: &str) -> Option<&str> {
    let at = target.rfind("/dev/")?;
    let path = &target[at..];
    interesting(path).then_some(path)
}

impl OpenFiles {
    /// Reads every `<root>/proc/<pid>/fd/*` link that points at a GPU device file.
    pub fn scan(root: &HostRoot) -> Self {
        let mut out = Self::default();
        let Ok(entries) = std::fs::read_dir(root.proc("")) else {
            return out;
        };
        out.scanned = true;
        for entry in entries.take(MAX_PROCESSES).flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let pid_dir = entry.path();
            let fds = match std::fs::read_dir(pid_dir.join("fd")) {
                Ok(f) => f,
                Err(_) => {
                    out.unreadable += 1;
                    continue;
                }
            };
            let mut command: Option<String> = None;
            for fd in fds.take(MAX_FDS_PER_PROCESS).flatten() {
                let Ok(target) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                let Some(target) = target.to_str().and_then(device_path) else {
                    continue;
                };
                let command = command
                    .get_or_insert_with(|| {
                        sysfs::read_text(&pid_dir.join("comm"))
                            .map(|c| sysfs::printable(&c))
                            .unwrap_or_else(|_| "?".into())
                    })
                    .clone();
                let holders = out.by_file.entry(target.to_owned()).or_default();
                if !holders.iter().any(|(p, _)| *p == pid) && holders.len() < 64 {
                    holders.push((pid, command));
                }
            }
        }
        out
    }

    pub(crate) fn holders_of(&self, file: &str) -> &[(u32, String)] {
        self.by_file.get(file).map_or(&[], Vec::as_slice)
    }
}

/// Minor number of an nvidia-bound GPU, from
/// `/proc/driver/nvidia/gpus/<bdf>/information` (`Device Minor: 0`).
fn nvidia_minor(root: &HostRoot, bdf: Bdf) -> Option<u32> {
    let path = root.proc(&format!("driver/nvidia/gpus/{bdf}/information"));
    let text = sysfs::read_text(&path).ok()?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Device Minor:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Users of a module that are not other modules: `refcnt` minus entries of `holders/`.
fn module_users(root: &HostRoot, module: &str) -> Option<u64> {
    let dir = root.sys(&format!("module/{module}"));
    let refcnt: u64 = sysfs::read_dec(&dir.join("refcnt"), "a reference count").ok()?;
    let holders = sysfs::list_dir_opt(&dir.join("holders")).ok()?.len() as u64;
    Some(refcnt.saturating_sub(holders))
}

/// Block devices below a function's directory, without following links.
fn block_devices(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack: Vec<(PathBuf, usize)> = vec![(dir.to_owned(), 0)];
    let mut visited = 0;
    while let Some((d, depth)) = stack.pop() {
        visited += 1;
        if visited > MAX_WALK || depth > 6 {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let in_block = d.file_name().is_some_and(|n| n == "block");
        for e in entries.flatten().take(MAX_WALK) {
            let Ok(kind) = e.file_type() else { continue };
            if !kind.is_dir() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let nvme_ns = is_nvme_namespace(&name);
            if in_block || nvme_ns {
                out.push(sysfs::printable(&name));
            } else {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `nvme0n1`, or `nvme0c0n1` with native multipath.
fn is_nvme_namespace(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some(rest) = name.strip_prefix("nvme") else {
        return false;
    };
    let Some((ctrl, ns)) = rest.split_once('n') else {
        return false;
    };
    let ctrl_ok = match ctrl.split_once('c') {
        Some((a, b)) => digits(a) && digits(b),
        None => digits(ctrl),
    };
    ctrl_ok && digits(ns)
}

/// Everything that holds `f` on the host. Problems reading are returned as warnings.
pub fn holds(
    root: &HostRoot,
    f: &PciFunction,
    open: &OpenFiles,
    warnings: &mut Vec<String>,
) -> Vec<Holder> {
    let bdf = f.bdf;
    let dir = root.pci_device(&bdf);
    let mut out = display_holds(root, bdf, warnings);
    let mut files: Vec<String> = drm_nodes(&dir, warnings)
        .into_iter()
        .map(|n| format!("/dev/dri/{n}"))
        .collect();
    if f.driver.name() == Some("nvidia") {
        match nvidia_minor(root, bdf) {
            Some(minor) => files.push(format!("/dev/nvidia{minor}")),
            None => {
                if let Some(users) = module_users(root, "nvidia").filter(|u| *u > 0) {
                    out.push(Holder {
                        bdf,
                        hold: Hold::ModuleUsers {
                            module: "nvidia".into(),
                            users,
                        },
                    });
                }
            }
        }
    }
    if !files.is_empty() {
        if !open.scanned {
            warnings.push(format!(
                "cannot list processes under {}: open device files of {bdf} were not checked",
                root.proc("").display()
            ));
        } else if open.unreadable > 0 {
            warnings.push(format!(
                "the open files of {} process(es) could not be read (run as root to check them all)",
                open.unreadable
            ));
        }
    }
    for file in &files {
        for (pid, command) in open.holders_of(file) {
            out.push(Holder {
                bdf,
                hold: Hold::OpenFile {
                    pid: *pid,
                    command: command.clone(),
                    file: file.clone(),
                },
            });
        }
    }
    if let Ok(ifaces) = sysfs::list_dir_opt(&dir.join("net")) {
        for iface in ifaces {
            let Some(name) = iface.to_str() else { continue };
            if let Ok(Some(state)) =
                sysfs::read_text_opt(&dir.join("net").join(name).join("operstate"))
            {
                if state == "up" {
                    out.push(Holder {
                        bdf,
                        hold: Hold::NetworkInterface {
                            name: sysfs::printable(name),
                        },
                    });
                }
            }
        }
    }
    for name in block_devices(&dir) {
        out.push(Holder {
            bdf,
            hold: Hold::BlockDevice { name },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_jailed_processs_device_links_count_as_the_hosts_device() {
        use super::device_path;
        assert_eq!(device_path("/dev/vfio/1"), Some("/dev/vfio/1"));
        assert_eq!(
            device_path("/run/gpucell/runs/ab12/jail/dev/vfio/1"),
            Some("/dev/vfio/1")
        );
        assert_eq!(device_path("/dev/nvidia0"), Some("/dev/nvidia0"));
        assert_eq!(device_path("/dev/null"), None);
        assert_eq!(device_path("/tmp/vfio/1"), None);
        assert_eq!(device_path("socket:[1234]"), None);
    }

    use super::is_nvme_namespace;

    #[test]
    fn nvme_namespace_names() {
        for good in ["nvme0n1", "nvme12n3", "nvme0c0n1", "nvme1c12n2"] {
            assert!(is_nvme_namespace(good), "{good}");
        }
        for bad in [
            "nvme0",
            "nvme",
            "nvmen1",
            "nvme0n",
            "nvme0c0",
            "nvme0cn1",
            "nvme-subsys0",
            "power",
        ] {
            assert!(!is_nvme_namespace(bad), "{bad}");
        }
    }
}
