//! Disks plugged into a running VM: the root filesystems of a pod's further containers.
//!
//! A VM made for a pod boots with spare PCIe root ports (`hp0`, `hp1`, ...) beside the
//! ones of its passed functions. While it runs, [`Hotplug`] hands them out one disk
//! each: the disk goes to QEMU as a descriptor (a jailed QEMU opens no host path), gets
//! the virtio serial `gpucell-cN`, and the agent finds it by that serial. When the
//! container has ended (the agent unmounts it first), the disk is unplugged and its
//! port is free again; a disk the guest does not let go keeps its port.

use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::args::Device;
use crate::qmp::{Qmp, QmpError};

/// Most spare ports a VM may have.
pub const MAX_PORTS: u8 = 32;
/// Chassis and slot numbers of the spare ports start here (passed functions' root
/// ports use 1 to 16).
const FIRST_CHASSIS: u8 = 64;

#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("the VM is not running (not booted yet, or gone)")]
    NotRunning,
    #[error(
        "the VM has no free port for another disk (it was made with {0}); start the pod with more"
    )]
    NoPort(usize),
    #[error("QEMU refused the disk on port {port}")]
    Qmp {
        port: String,
        #[source]
        source: QmpError,
    },
    #[error("no disk {0} is plugged into the VM")]
    Unknown(String),
    #[error("unplugging disk {serial} from port {port} (the port stays taken)")]
    Unplug {
        serial: String,
        port: String,
        #[source]
        source: QmpError,
    },
}

/// How long the guest has to let an unplugged disk go.
const UNPLUG_WAIT: Duration = Duration::from_secs(15);

/// `e` with its causes, one line.
pub(crate) fn describe(e: &HotplugError) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// The `-device` arguments of `n` spare root ports.
pub(crate) fn spare_ports(n: u8) -> Vec<Device> {
    (0..n.min(MAX_PORTS))
        .map(|i| Device::PcieRootPort {
            id: port_name(i),
            chassis: FIRST_CHASSIS + i,
            slot: FIRST_CHASSIS + i,
        })
        .collect()
}

fn port_name(i: u8) -> String {
    format!("hp{i}")
}

/// The free ports of a running VM and its monitor; shared by the sandbox (which opens
/// it once QMP answers and closes it before QEMU goes) and every [`crate::EventSender`].
#[derive(Clone, Default)]
pub(crate) struct Hotplug(Arc<Mutex<Option<Live>>>);

struct Live {
    qmp: Arc<Mutex<Qmp>>,
    /// The NVIDIA driver injection of the VM's run: every added container gets it (the
    /// agent applies each container's own environment contract).
    gpu: Option<gpucell_protocol::GpuInjection>,
    free: VecDeque<String>,
    ports: usize,
    plugged: u32,
    /// Plugged disks by serial: their block node, port and descriptor set.
    disks: HashMap<String, Plugged>,
}

struct Plugged {
    node: String,
    port: String,
    fdset: i64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Hotplug {
    /// The VM is up with `ports` spare ports, its monitor is `qmp`; `gpu` is its run's
    /// driver injection.
    pub(crate) fn open(
        &self,
        qmp: Arc<Mutex<Qmp>>,
        ports: u8,
        gpu: Option<gpucell_protocol::GpuInjection>,
    ) {
        let ports = ports.min(MAX_PORTS);
        *lock(&self.0) = Some(Live {
            qmp,
            gpu,
            free: (0..ports).map(port_name).collect(),
            ports: ports as usize,
            plugged: 0,
            disks: HashMap::new(),
        });
    }

    /// The driver injection of the running VM's run, for an added container.
    pub(crate) fn gpu(&self) -> Option<gpucell_protocol::GpuInjection> {
        lock(&self.0).as_ref().and_then(|l| l.gpu.clone())
    }

    /// The VM is going: later plugs fail with [`HotplugError::NotRunning`].
    pub(crate) fn close(&self) {
        lock(&self.0).take();
    }

    /// Plugs the disk behind `disk` (opened read-only) on the next free port; returns
    /// its virtio serial. A failed plug leaves nothing in QEMU and uses up no port.
    pub(crate) fn plug(&self, disk: BorrowedFd<'_>) -> Result<String, HotplugError> {
        let mut g = lock(&self.0);
        let live = g.as_mut().ok_or(HotplugError::NotRunning)?;
        let port = live
            .free
            .pop_front()
            .ok_or(HotplugError::NoPort(live.ports))?;
        let n = live.plugged;
        let serial = format!("gpucell-c{n}");
        let node = format!("c{n}");
        let res = lock(&live.qmp).hotplug_disk(&node, disk, &port, &serial);
        match res {
            Ok(fdset) => {
                live.plugged += 1;
                live.disks
                    .insert(serial.clone(), Plugged { node, port, fdset });
                Ok(serial)
            }
            Err(source) => {
                live.free.push_front(port.clone());
                Err(HotplugError::Qmp { port, source })
            }
        }
    }
}

impl Hotplug {
    /// Unplugs the disk `serial` (its container has ended and the agent unmounted it)
    /// and frees its port.
    pub(crate) fn unplug(&self, serial: &str) -> Result<(), HotplugError> {
        let mut g = lock(&self.0);
        let live = g.as_mut().ok_or(HotplugError::NotRunning)?;
        let disk = live
            .disks
            .remove(serial)
            .ok_or_else(|| HotplugError::Unknown(serial.to_string()))?;
        let deadline = Instant::now() + UNPLUG_WAIT;
        let res = lock(&live.qmp).unplug_disk(&disk.node, disk.fdset, deadline);
        match res {
            Ok(()) => {
                live.free.push_back(disk.port);
                Ok(())
            }
            Err(source) => Err(HotplugError::Unplug {
                serial: serial.to_string(),
                port: disk.port,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::ToArgs;

    #[test]
    fn spare_ports_have_their_own_names_and_chassis() {
        let mut args = Vec::new();
        for d in spare_ports(2) {
            d.to_args(&mut args);
        }
        assert_eq!(
            args,
            [
                "-device",
                "pcie-root-port,id=hp0,chassis=64,slot=64",
                "-device",
                "pcie-root-port,id=hp1,chassis=65,slot=65"
            ]
        );
        assert_eq!(spare_ports(200).len(), MAX_PORTS as usize);
    }

    #[test]
    fn the_vms_driver_injection_is_there_for_its_added_containers_while_it_runs() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let greet = std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let mut w = b.try_clone().unwrap();
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            std::io::BufReader::new(b).read_line(&mut line).unwrap();
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
        });
        let qmp = Qmp::from_stream(a, Duration::from_secs(5)).unwrap();
        greet.join().unwrap();
        let h = Hotplug::default();
        let gpu = gpucell_protocol::GpuInjection {
            driver_root: "/run/gpucell/driver".into(),
            ..Default::default()
        };
        h.open(Arc::new(Mutex::new(qmp)), 2, Some(gpu.clone()));
        assert_eq!(h.gpu(), Some(gpu));
        h.close();
        assert_eq!(h.gpu(), None);
    }

    #[test]
    fn nothing_is_plugged_into_a_vm_that_is_not_running() {
        let h = Hotplug::default();
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsFd;
        assert!(matches!(h.plug(f.as_fd()), Err(HotplugError::NotRunning)));
    }
}
