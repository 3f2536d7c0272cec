//! Writes to sysfs go through [`SysfsWriter`]: [`KernelWriter`] writes for real,
//! [`SimulatedKernel`] records each write and applies the kernel's effect to a fake host
//! tree, so tests can check the exact sequence and what binding leaves behind.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::bdf::Bdf;
use crate::root::HostRoot;

/// One write to a sysfs attribute.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SysfsWrite {
    pub path: PathBuf,
    pub value: String,
}

impl std::fmt::Display for SysfsWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.value.is_empty() {
            write!(f, "echo > {}", self.path.display())
        } else {
            write!(f, "echo {} > {}", self.value, self.path.display())
        }
    }
}

/// Something that writes sysfs attributes.
pub trait SysfsWriter {
    fn write(&mut self, path: &Path, value: &str) -> io::Result<()>;
}

/// Writes to the real files: one `write(2)` per value, no file created, as `echo` does.
/// An empty value is written as a lone newline, which clears `driver_override`.
#[derive(Debug, Default)]
pub struct KernelWriter;

impl SysfsWriter for KernelWriter {
    fn write(&mut self, path: &Path, value: &str) -> io::Result<()> {
        // O_TRUNC as the shell's `>` does; sysfs ignores it, a plain file needs it.
        let mut file = OpenOptions::new().write(true).truncate(true).open(path)?;
        let bytes = if value.is_empty() { "\n" } else { value };
        let n = file.write(bytes.as_bytes())?;
        if n != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("the kernel took {n} of {} bytes", bytes.len()),
            ));
        }
        Ok(())
    }
}

/// A fake kernel over a fake host tree (see `testing::FakeHost`): records every write
/// and applies what the kernel would do.
///
/// - `…/devices/<bdf>/driver_override`: stores the value (`(null)` when cleared).
/// - `…/devices/<bdf>/driver/unbind`, `…/drivers/<d>/unbind`: removes the `driver` link.
/// - `…/drivers/<d>/bind`: links the function to `<d>`; fails with ENODEV when
///   `driver_override` names another driver, as the kernel's match does.
/// - `…/drivers_probe`: links the function to its `driver_override` when that driver is
///   loaded (`sys/bus/pci/drivers/<d>` exists), otherwise to its native driver (see
///   [`SimulatedKernel::native_driver`]), otherwise leaves it unbound.
///
/// With [`SimulatedKernel::create_vfio_nodes`], binding to vfio-pci also creates
/// `dev/vfio/<group>`. Writes to paths outside these patterns fail with `NotFound`,
/// and [`SimulatedKernel::fail_on`] makes one path fail, to test error paths.
#[derive(Debug)]
pub struct SimulatedKernel {
    root: HostRoot,
    pub writes: Vec<SysfsWrite>,
    native: BTreeMap<Bdf, String>,
    vfio_nodes: bool,
    fail: Option<PathBuf>,
}

impl SimulatedKernel {
    pub fn new(root: HostRoot) -> Self {
        Self {
            root,
            writes: Vec::new(),
            native: BTreeMap::new(),
            vfio_nodes: false,
            fail: None,
        }
    }

    /// The driver `drivers_probe` picks for `bdf` when no override is set.
    pub fn native_driver(mut self, bdf: Bdf, driver: &str) -> Self {
        self.native.insert(bdf, driver.to_owned());
        self
    }

    /// Create `dev/vfio/<group>` when a function is bound to vfio-pci.
    pub fn create_vfio_nodes(mut self) -> Self {
        self.vfio_nodes = true;
        self
    }

    /// Fail writes to `path`.
    pub fn fail_on(mut self, path: PathBuf) -> Self {
        self.fail = Some(path);
        self
    }

    /// The writes as `(path relative to the root, value)`, for assertions.
    pub fn relative_writes(&self) -> Vec<(String, String)> {
        self.writes
            .iter()
            .map(|w| {
                let rel = w.path.strip_prefix(self.root.path()).unwrap_or(&w.path);
                (rel.display().to_string(), w.value.clone())
            })
            .collect()
    }

    fn device_dir(&self, bdf: Bdf) -> io::Result<PathBuf> {
        std::fs::canonicalize(self.root.pci_device(&bdf))
    }

    fn link_driver(&self, bdf: Bdf, driver: &str) -> io::Result<()> {
        let dir = self.device_dir(bdf)?;
        self.unlink_driver(bdf)?;
        let drv_dir = self.root.pci_driver(driver);
        std::fs::create_dir_all(&drv_dir)?;
        std::os::unix::fs::symlink(&drv_dir, dir.join("driver"))?;
        std::os::unix::fs::symlink(&dir, drv_dir.join(bdf.to_string()))?;
        if self.vfio_nodes && driver == "vfio-pci" {
            if let Some(group) = crate::sysfs::link_name(&dir.join("iommu_group"))
                .ok()
                .flatten()
            {
                let node = self.root.dev(&format!("vfio/{group}"));
                if let Some(parent) = node.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(node, "")?;
            }
        }
        Ok(())
    }

    fn unlink_driver(&self, bdf: Bdf) -> io::Result<()> {
        let dir = self.device_dir(bdf)?;
        let link = dir.join("driver");
        if let Ok(target) = std::fs::read_link(&link) {
            if let Some(name) = target.file_name() {
                let _ = std::fs::remove_file(
                    self.root
                        .pci_driver(&name.to_string_lossy())
                        .join(bdf.to_string()),
                );
            }
            std::fs::remove_file(link)?;
        }
        Ok(())
    }

    fn parse_bdf(value: &str) -> io::Result<Bdf> {
        value
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }
}

impl SysfsWriter for SimulatedKernel {
    fn write(&mut self, path: &Path, value: &str) -> io::Result<()> {
        self.writes.push(SysfsWrite {
            path: path.to_owned(),
            value: value.to_owned(),
        });
        if self.fail.as_deref() == Some(path) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "simulated failure",
            ));
        }
        let devices = self.root.pci_devices_dir();
        let drivers = self.root.sys("bus/pci/drivers");
        let not_found = || io::Error::new(io::ErrorKind::NotFound, "no such sysfs attribute");
        if path == self.root.sys("bus/pci/drivers_probe") {
            let bdf = Self::parse_bdf(value)?;
            if std::fs::symlink_metadata(self.device_dir(bdf)?.join("driver")).is_ok() {
                return Ok(());
            }
            let over = crate::sysfs::read_text_opt(&self.device_dir(bdf)?.join("driver_override"))
                .ok()
                .flatten()
                .filter(|v| v != "(null)");
            let pick = match over {
                Some(d) => self.root.pci_driver(&d).is_dir().then_some(d),
                None => self.native.get(&bdf).cloned(),
            };
            if let Some(d) = pick {
                self.link_driver(bdf, &d)?;
            }
            return Ok(());
        }
        if let Ok(rest) = path.strip_prefix(&devices) {
            let parts: Vec<_> = rest
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let bdf = Self::parse_bdf(parts.first().ok_or_else(not_found)?)?;
            return match parts.get(1..).unwrap_or_default() {
                [attr] if attr == "driver_override" => {
                    let v = value.trim();
                    let stored = if v.is_empty() { "(null)" } else { v };
                    std::fs::write(
                        self.device_dir(bdf)?.join("driver_override"),
                        format!("{stored}\n"),
                    )
                }
                [d, op] if d == "driver" && op == "unbind" => {
                    if Self::parse_bdf(value)? != bdf {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "unbind names another device",
                        ));
                    }
                    if std::fs::symlink_metadata(self.device_dir(bdf)?.join("driver")).is_err() {
                        return Err(not_found());
                    }
                    self.unlink_driver(bdf)
                }
                _ => Err(not_found()),
            };
        }
        if let Ok(rest) = path.strip_prefix(&drivers) {
            let parts: Vec<_> = rest
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let bdf = Self::parse_bdf(value)?;
            return match parts.as_slice() {
                [d, op] if op == "bind" => {
                    if !self.root.pci_driver(d).is_dir() {
                        return Err(not_found());
                    }
                    // The kernel matches only the override's driver when one is set.
                    let over =
                        crate::sysfs::read_text_opt(&self.device_dir(bdf)?.join("driver_override"))
                            .ok()
                            .flatten()
                            .filter(|v| v != "(null)");
                    if over.is_some_and(|o| o != *d) {
                        return Err(io::Error::from_raw_os_error(19)); // ENODEV
                    }
                    self.link_driver(bdf, d)
                }
                [_, op] if op == "unbind" => self.unlink_driver(bdf),
                _ => Err(not_found()),
            };
        }
        Err(not_found())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kernel_writer_writes_once_and_never_creates_files() {
        let dir = tempfile::tempdir().unwrap();
        let attr = dir.path().join("driver_override");
        std::fs::write(&attr, "").unwrap();
        KernelWriter.write(&attr, "vfio-pci").unwrap();
        assert_eq!(std::fs::read_to_string(&attr).unwrap(), "vfio-pci");
        KernelWriter.write(&attr, "").unwrap();
        assert_eq!(std::fs::read_to_string(&attr).unwrap(), "\n");
        let missing = dir.path().join("unbind");
        let err = KernelWriter.write(&missing, "0000:01:00.0").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!missing.exists());
    }

    #[test]
    fn writes_print_as_shell_commands() {
        let w = SysfsWrite {
            path: PathBuf::from("/sys/bus/pci/drivers_probe"),
            value: "0000:01:00.0".into(),
        };
        assert_eq!(
            w.to_string(),
            "echo 0000:01:00.0 > /sys/bus/pci/drivers_probe"
        );
        let clear = SysfsWrite {
            path: PathBuf::from("/sys/bus/pci/devices/0000:01:00.0/driver_override"),
            value: String::new(),
        };
        assert_eq!(
            clear.to_string(),
            "echo > /sys/bus/pci/devices/0000:01:00.0/driver_override"
        );
    }
}
