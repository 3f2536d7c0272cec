//! Shared by the device allocation tests: fake hosts with config space, and a kernel
//! stand-in that also implements `<fn>/reset`.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpucell_host::bind::{SimulatedKernel, SysfsWriter};
use gpucell_host::devices::{DevicePool, DeviceRequest};
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::{Bdf, HostRoot};

pub fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

pub fn req(gpus: Option<&str>, devices: &[&str]) -> DeviceRequest {
    DeviceRequest::parse(gpus, devices).unwrap()
}

/// Writes `<fn>/config`: 64 bytes starting with vendor and device, little-endian.
pub fn write_config(host: &FakeHost, b: Bdf, vendor: u16, device: u16) {
    let mut bytes = vec![0u8; 64];
    bytes[0..2].copy_from_slice(&vendor.to_le_bytes());
    bytes[2..4].copy_from_slice(&device.to_le_bytes());
    std::fs::write(host.root().pci_device(&b).join("config"), bytes).unwrap();
}

/// Adds `f` with a config space matching its identity.
pub fn add(host: &FakeHost, f: FakeFunction) {
    host.add(&f).unwrap();
    write_config(host, f.bdf, f.vendor, f.device);
}

/// An Intel host with vfio-pci loaded and H100s at `0000:<bus>:00.0` on vfio-pci, each
/// alone in group `bus` on NUMA node `node`.
pub fn h100_host(gpus: &[(u8, i32)]) -> FakeHost {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.mkdir("sys/bus/pci/drivers/vfio-pci").unwrap();
    for &(bus, node) in gpus {
        let f = FakeFunction::h100(&format!("0000:{bus:02x}:00.0"))
            .driver("vfio-pci")
            .driver_override("vfio-pci")
            .iommu_group(u32::from(bus))
            .numa_node(node)
            .local_cpulist(if node == 0 { "0-15" } else { "16-31" });
        add(&host, f);
        host.dev_node(&format!("vfio/{bus}")).unwrap();
    }
    host
}

/// A pool over `host` with records in `state`, owner processes looked up in the real `/proc`.
pub fn pool(host: &FakeHost, state: &Path) -> DevicePool {
    DevicePool::new(host.root(), state).with_process_root(HostRoot::new("/"))
}

#[derive(Debug)]
struct State {
    sim: SimulatedKernel,
    root: PathBuf,
    log: Vec<(String, String)>,
    fail_reset: BTreeSet<Bdf>,
    dies_on_reset: BTreeSet<Bdf>,
}

/// The simulated kernel of the bind module, plus `<fn>/reset`: the write is logged, fails
/// for functions in `fail_reset`, and makes the config space read `ffff` for functions in
/// `dies_on_reset`. Clones share one log.
#[derive(Debug, Clone)]
pub struct Kernel(Arc<Mutex<State>>);

impl Kernel {
    pub fn new(host: &FakeHost) -> Self {
        Self::with_sim(host, SimulatedKernel::new(host.root()).create_vfio_nodes())
    }
    /// Over a simulated kernel set up by the caller (native drivers, failures).
    pub fn with_sim(host: &FakeHost, sim: SimulatedKernel) -> Self {
        Self(Arc::new(Mutex::new(State {
            sim,
            root: host.path().to_owned(),
            log: Vec::new(),
            fail_reset: BTreeSet::new(),
            dies_on_reset: BTreeSet::new(),
        })))
    }
    pub fn fail_reset(&self, b: Bdf) {
        self.0.lock().unwrap().fail_reset.insert(b);
    }
    pub fn dies_on_reset(&self, b: Bdf) {
        self.0.lock().unwrap().dies_on_reset.insert(b);
    }
    /// Every write as (path relative to the root, value).
    pub fn log(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap().log.clone()
    }
    pub fn clear(&self) {
        self.0.lock().unwrap().log.clear();
    }
    pub fn boxed(&self) -> Box<dyn SysfsWriter + Send> {
        Box::new(self.clone())
    }
}

impl SysfsWriter for Kernel {
    fn write(&mut self, path: &Path, value: &str) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        let rel = path
            .strip_prefix(&s.root)
            .unwrap_or(path)
            .display()
            .to_string();
        s.log.push((rel.clone(), value.to_owned()));
        let reset = rel
            .strip_prefix("sys/bus/pci/devices/")
            .and_then(|r| r.strip_suffix("/reset"))
            .and_then(|b| b.parse::<Bdf>().ok());
        if let Some(b) = reset {
            if value != "1" {
                return Err(io::Error::from_raw_os_error(22));
            }
            if s.fail_reset.contains(&b) {
                return Err(io::Error::from_raw_os_error(25)); // ENOTTY, as a failed FLR
            }
            if s.dies_on_reset.contains(&b) {
                std::fs::write(
                    HostRoot::new(&s.root).pci_device(&b).join("config"),
                    [0xffu8; 64],
                )?;
            }
            return Ok(());
        }
        s.sim.write(path, value)
    }
}

/// `(path, "1")` for a reset of `b`.
pub fn reset_write(b: &str) -> (String, String) {
    (format!("sys/bus/pci/devices/{b}/reset"), "1".to_owned())
}
