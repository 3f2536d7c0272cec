//! `gpucell gpu bind` / `unbind`: hand GPUs, with every other endpoint of their IOMMU
//! groups, to vfio-pci and back.
//!
//! Binding one function is three writes, the way `driverctl` and NVIDIA's vfio-manager
//! do it: `vfio-pci` into `driver_override`, the address into the current driver's
//! `unbind`, the address into `drivers_probe`. Bridges are left alone. A plan is computed
//! first from sysfs ([`plan_bind`], [`plan_unbind`]), refusing functions the host is using
//! (see [`holders`]); executing it ([`execute_bind`], [`execute_unbind`]) performs the
//! writes through a [`SysfsWriter`] and then checks the result. The driver a function had
//! before is recorded in the state directory ([`record`]) so that unbind restores it.

pub mod holders;
pub mod record;
pub mod writer;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bdf::Bdf;
use crate::iommu::{self, IommuError};
use crate::pci::{Driver, PciError, PciFunction, PciScan};
use crate::root::HostRoot;
use holders::{Hold, Holder, OpenFiles};
use record::{BindRecord, RecordError};
pub use writer::{KernelWriter, SimulatedKernel, SysfsWrite, SysfsWriter};

/// The driver functions are handed to.
pub const VFIO_PCI: &str = "vfio-pci";

/// Errors planning or performing a bind or unbind.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("{bdf} is a PCI bridge; bridges stay with their driver, name the GPU behind it")]
    Bridge { bdf: Bdf },
    #[error(
        "{bdf} has no IOMMU group ({} is missing): the IOMMU is off; \
         run `gpucell host plan`, apply it and reboot",
        path.display()
    )]
    NoGroup { bdf: Bdf, path: PathBuf },
    #[error("cannot read the IOMMU group of {bdf}")]
    Group {
        bdf: Bdf,
        #[source]
        source: IommuError,
    },
    #[error("{bdf}: its driver link could not be read, so it is not safe to rebind")]
    UnknownDriver { bdf: Bdf },
    #[error("{bdf}: driver name `{name}` read from sysfs is not a plain name")]
    BadDriverName { bdf: Bdf, name: String },
    #[error("vfio-pci is not loaded ({} is missing): run `modprobe vfio-pci`", path.display())]
    VfioNotLoaded { path: PathBuf },
    #[error("no NVIDIA GPU found under {}", path.display())]
    NoGpus { path: PathBuf },
    #[error("refusing: {}", holders.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Refused { holders: Vec<Holder> },
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("writing `{value}` to {} failed", path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{bdf} is on driver {driver} after binding, not vfio-pci (see `dmesg`); `gpucell gpu unbind {bdf}` restores it")]
    NotBound { bdf: Bdf, driver: String },
}

/// Which functions a command is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// Every NVIDIA GPU (for unbind, also every function with a binding record).
    All,
    /// These functions.
    Devices(Vec<Bdf>),
}

/// What happens to one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Given to vfio-pci.
    Bind,
    /// Already on vfio-pci (or a vfio-pci variant) with nothing to change.
    AlreadyBound,
    /// Returned to its previous driver.
    Restore,
    /// Not on vfio-pci: nothing to undo.
    NotBound,
}

/// One endpoint of a group and the writes planned for it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointPlan {
    pub bdf: Bdf,
    pub id: String,
    pub driver: Driver,
    pub driver_override: Option<String>,
    pub action: Action,
    pub writes: Vec<SysfsWrite>,
    /// For bind: what is recorded for unbind. For unbind: the record found.
    pub record: Option<BindRecord>,
}

/// One IOMMU group touched by the command.
#[derive(Debug, Clone, Serialize)]
pub struct GroupPlan {
    pub group: u32,
    /// The functions named (or found by `--all`) that brought this group in.
    pub requested: Vec<Bdf>,
    pub endpoints: Vec<EndpointPlan>,
    /// Bridges in the group, left alone.
    pub bridges: Vec<Bdf>,
}

/// A bind or unbind plan.
#[derive(Debug, Clone, Serialize)]
pub struct BindPlan {
    pub groups: Vec<GroupPlan>,
    /// Functions the host is using; when not empty, nothing is written.
    pub refusals: Vec<Holder>,
    pub warnings: Vec<String>,
}

impl BindPlan {
    /// Every write, in order.
    pub fn writes(&self) -> impl Iterator<Item = &SysfsWrite> {
        self.groups
            .iter()
            .flat_map(|g| &g.endpoints)
            .flat_map(|e| &e.writes)
    }
}

/// What executing a plan did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// Functions whose driver changed.
    pub changed: Vec<Bdf>,
    pub warnings: Vec<String>,
}

fn write(path: PathBuf, value: impl Into<String>) -> SysfsWrite {
    SysfsWrite {
        path,
        value: value.into(),
    }
}

fn checked_driver_name(bdf: Bdf, name: &str) -> Result<String, BindError> {
    if record::valid_driver_name(name) {
        Ok(name.to_owned())
    } else {
        Err(BindError::BadDriverName {
            bdf,
            name: crate::sysfs::printable(name),
        })
    }
}

/// The functions `targets` names, each with its IOMMU group; grouped, sorted, deduplicated.
fn resolve(
    root: &HostRoot,
    scan: &PciScan,
    targets: &Targets,
    extra: &[Bdf],
) -> Result<Vec<(u32, Vec<Bdf>)>, BindError> {
    let mut wanted: Vec<Bdf> = match targets {
        Targets::All => {
            let mut v: Vec<Bdf> = scan.nvidia_gpus().map(|f| f.bdf).collect();
            v.extend(extra.iter().filter(|b| scan.get(**b).is_some()));
            if v.is_empty() {
                return Err(BindError::NoGpus {
                    path: root.pci_devices_dir(),
                });
            }
            v
        }
        Targets::Devices(list) => list.clone(),
    };
    wanted.sort();
    wanted.dedup();
    let mut groups: Vec<(u32, Vec<Bdf>)> = Vec::new();
    for bdf in wanted {
        let f = PciFunction::read(root, bdf)?;
        if f.is_bridge() {
            return Err(BindError::Bridge { bdf });
        }
        let group = f.iommu_group.ok_or_else(|| BindError::NoGroup {
            bdf,
            path: root.pci_device(&bdf).join("iommu_group"),
        })?;
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, req)) => req.push(bdf),
            None => groups.push((group, vec![bdf])),
        }
    }
    groups.sort_by_key(|(g, _)| *g);
    Ok(groups)
}

/// Members of `group` split into endpoints and bridges, read fresh from sysfs.
/// `of` names the requested function in errors.
fn members(
    root: &HostRoot,
    group: u32,
    of: Bdf,
) -> Result<(Vec<PciFunction>, Vec<Bdf>), BindError> {
    let bdfs =
        iommu::group_members(root, group).map_err(|source| BindError::Group { bdf: of, source })?;
    let mut endpoints = Vec::new();
    let mut bridges = Vec::new();
    for bdf in bdfs {
        let f = PciFunction::read(root, bdf)?;
        if f.is_bridge() {
            bridges.push(bdf);
        } else {
            endpoints.push(f);
        }
    }
    Ok((endpoints, bridges))
}

/// Plans binding `targets` and the other endpoints of their groups to vfio-pci.
pub fn plan_bind(root: &HostRoot, targets: &Targets) -> Result<BindPlan, BindError> {
    let scan = PciScan::read(root)?;
    let open = OpenFiles::scan(root);
    let mut plan = BindPlan {
        groups: Vec::new(),
        refusals: Vec::new(),
        warnings: Vec::new(),
    };
    for (group, requested) in resolve(root, &scan, targets, &[])? {
        let (endpoints, bridges) = members(root, group, requested[0])?;
        let mut planned = Vec::new();
        for f in endpoints {
            planned.push(plan_bind_endpoint(root, &f, &open, &mut plan)?);
        }
        plan.groups.push(GroupPlan {
            group,
            requested,
            endpoints: planned,
            bridges,
        });
    }
    let needs_vfio = plan.writes().next().is_some();
    let vfio_dir = root.pci_driver(VFIO_PCI);
    if needs_vfio && !vfio_dir.is_dir() {
        return Err(BindError::VfioNotLoaded { path: vfio_dir });
    }
    plan.warnings.sort();
    plan.warnings.dedup();
    Ok(plan)
}

fn plan_bind_endpoint(
    root: &HostRoot,
    f: &PciFunction,
    open: &OpenFiles,
    plan: &mut BindPlan,
) -> Result<EndpointPlan, BindError> {
    let bdf = f.bdf;
    let dev = root.pci_device(&bdf);
    let mut ep = EndpointPlan {
        bdf,
        id: f.id_string(),
        driver: f.driver.clone(),
        driver_override: f.driver_override.clone(),
        action: Action::AlreadyBound,
        writes: Vec::new(),
        record: None,
    };
    // An override of vfio-pci (from gpucell's boot rule or an earlier bind) is not a
    // state to return to: unbind then clears it.
    let previous_override = match f.driver_override.as_deref() {
        Some(VFIO_PCI) | None => None,
        Some(o) => Some(checked_driver_name(bdf, o)?),
    };
    match &f.driver {
        Driver::Unknown => return Err(BindError::UnknownDriver { bdf }),
        Driver::Bound(name) if name == VFIO_PCI => {
            if f.driver_override.as_deref() != Some(VFIO_PCI) {
                ep.action = Action::Bind;
                ep.writes.push(write(dev.join("driver_override"), VFIO_PCI));
                ep.record = Some(BindRecord::new(
                    bdf,
                    Some(VFIO_PCI.into()),
                    previous_override,
                ));
            }
        }
        d if d.is_vfio() => {}
        d => {
            let previous = match d.name() {
                Some(n) => Some(checked_driver_name(bdf, n)?),
                None => None,
            };
            plan.refusals
                .extend(holders::holds(root, f, open, &mut plan.warnings));
            ep.action = Action::Bind;
            ep.writes.push(write(dev.join("driver_override"), VFIO_PCI));
            if previous.is_some() {
                ep.writes
                    .push(write(dev.join("driver/unbind"), bdf.to_string()));
            }
            ep.writes
                .push(write(root.sys("bus/pci/drivers_probe"), bdf.to_string()));
            ep.record = Some(BindRecord::new(bdf, previous, previous_override));
        }
    }
    Ok(ep)
}

/// Performs a bind plan: records (unless one exists), then writes, then checks each changed function is on
/// vfio-pci and its `/dev/vfio/<group>` exists (a warning when not). Refuses a plan with
/// refusals. A failed write stops at once; the records already saved let `unbind` undo.
pub fn execute_bind(
    root: &HostRoot,
    state_dir: &Path,
    plan: &BindPlan,
    writer: &mut dyn SysfsWriter,
) -> Result<Outcome, BindError> {
    if !plan.refusals.is_empty() {
        return Err(BindError::Refused {
            holders: plan.refusals.clone(),
        });
    }
    let mut outcome = Outcome {
        changed: Vec::new(),
        warnings: plan.warnings.clone(),
    };
    for g in &plan.groups {
        for ep in g.endpoints.iter().filter(|e| !e.writes.is_empty()) {
            // A record left by an earlier bind that did not finish holds the state from
            // before it; keep it.
            if let Some(r) = &ep.record {
                if record::load(state_dir, ep.bdf)?.is_none() {
                    record::save(state_dir, r)?;
                }
            }
            perform(writer, &ep.writes)?;
            tracing::info!(bdf = %ep.bdf, "bound to vfio-pci");
            outcome.changed.push(ep.bdf);
        }
        for ep in g.endpoints.iter().filter(|e| !e.writes.is_empty()) {
            let f = PciFunction::read(root, ep.bdf)?;
            if f.driver.name() != Some(VFIO_PCI) {
                return Err(BindError::NotBound {
                    bdf: ep.bdf,
                    driver: f.driver.to_string(),
                });
            }
        }
        let node = root.dev(&format!("vfio/{}", g.group));
        if !node.exists() {
            outcome.warnings.push(format!(
                "{} does not exist: is udev running? QEMU needs it to open group {}",
                node.display(),
                g.group
            ));
        }
    }
    Ok(outcome)
}

fn perform(writer: &mut dyn SysfsWriter, writes: &[SysfsWrite]) -> Result<(), BindError> {
    for w in writes {
        tracing::debug!("{w}");
        writer
            .write(&w.path, &w.value)
            .map_err(|source| BindError::Write {
                path: w.path.clone(),
                value: w.value.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Plans returning `targets` and the rest of their groups from vfio-pci to the drivers
/// recorded at bind time (or, without a record, to whatever the kernel probes).
/// Refuses while a process (a VM) has the group's `/dev/vfio/<group>` open.
pub fn plan_unbind(
    root: &HostRoot,
    state_dir: &Path,
    targets: &Targets,
) -> Result<BindPlan, BindError> {
    let scan = PciScan::read(root)?;
    let open = OpenFiles::scan(root);
    let recorded = record::recorded(state_dir)?;
    let mut plan = BindPlan {
        groups: Vec::new(),
        refusals: Vec::new(),
        warnings: Vec::new(),
    };
    let groups = match resolve(root, &scan, targets, &recorded) {
        // `unbind --all` with no GPU and no record: nothing to do.
        Err(BindError::NoGpus { .. }) => Vec::new(),
        other => other?,
    };
    for (group, requested) in groups {
        let (endpoints, bridges) = members(root, group, requested[0])?;
        let vfio_node = format!("/dev/vfio/{group}");
        let mut planned = Vec::new();
        for f in endpoints {
            let ep = plan_unbind_endpoint(root, state_dir, &f, &mut plan.warnings)?;
            if ep.action == Action::Restore {
                for (pid, command) in open.holders_of(&vfio_node) {
                    plan.refusals.push(Holder {
                        bdf: f.bdf,
                        hold: Hold::OpenFile {
                            pid: *pid,
                            command: command.clone(),
                            file: vfio_node.clone(),
                        },
                    });
                }
            }
            planned.push(ep);
        }
        plan.groups.push(GroupPlan {
            group,
            requested,
            endpoints: planned,
            bridges,
        });
    }
    plan.refusals.dedup();
    plan.warnings.sort();
    plan.warnings.dedup();
    Ok(plan)
}

fn plan_unbind_endpoint(
    root: &HostRoot,
    state_dir: &Path,
    f: &PciFunction,
    warnings: &mut Vec<String>,
) -> Result<EndpointPlan, BindError> {
    let bdf = f.bdf;
    let dev = root.pci_device(&bdf);
    let rec = record::load(state_dir, bdf)?;
    let mut ep = EndpointPlan {
        bdf,
        id: f.id_string(),
        driver: f.driver.clone(),
        driver_override: f.driver_override.clone(),
        action: Action::NotBound,
        writes: Vec::new(),
        record: rec.clone(),
    };
    let on_vfio = f.driver.name() == Some(VFIO_PCI);
    if f.driver == Driver::Unknown {
        return Err(BindError::UnknownDriver { bdf });
    }
    if !on_vfio && f.driver_override.as_deref() != Some(VFIO_PCI) {
        return Ok(ep);
    }
    ep.action = Action::Restore;
    let previous_override = rec.as_ref().and_then(|r| r.previous_override.clone());
    ep.writes.push(write(
        dev.join("driver_override"),
        previous_override.unwrap_or_default(),
    ));
    let previous_driver = rec.as_ref().map(|r| r.previous_driver.clone());
    if previous_driver
        .as_ref()
        .is_some_and(|d| d.as_deref() == f.driver.name())
    {
        // It was on vfio-pci before bind: only the override changed.
        return Ok(ep);
    }
    if on_vfio {
        ep.writes
            .push(write(dev.join("driver/unbind"), bdf.to_string()));
    }
    match previous_driver {
        // Unbound before: stays unbound.
        Some(None) => {}
        Some(Some(d)) if root.pci_driver(&d).is_dir() => {
            ep.writes
                .push(write(root.pci_driver(&d).join("bind"), bdf.to_string()));
        }
        Some(Some(d)) => {
            warnings.push(format!(
                "{bdf} was on {d}, which is not loaded now: the kernel picks a driver (modprobe {d} first to get it back)"
            ));
            ep.writes
                .push(write(root.sys("bus/pci/drivers_probe"), bdf.to_string()));
        }
        None => ep
            .writes
            .push(write(root.sys("bus/pci/drivers_probe"), bdf.to_string())),
    }
    Ok(ep)
}

/// Performs an unbind plan, then removes the records of the functions it restored (and
/// stale records of functions that were no longer on vfio-pci). Warns when a function
/// did not end up on its recorded driver.
pub fn execute_unbind(
    root: &HostRoot,
    state_dir: &Path,
    plan: &BindPlan,
    writer: &mut dyn SysfsWriter,
) -> Result<Outcome, BindError> {
    if !plan.refusals.is_empty() {
        return Err(BindError::Refused {
            holders: plan.refusals.clone(),
        });
    }
    let mut outcome = Outcome {
        changed: Vec::new(),
        warnings: plan.warnings.clone(),
    };
    for ep in plan.groups.iter().flat_map(|g| &g.endpoints) {
        perform(writer, &ep.writes)?;
        if !ep.writes.is_empty() {
            outcome.changed.push(ep.bdf);
            let now = PciFunction::read(root, ep.bdf)?;
            if let Some(Some(want)) = ep.record.as_ref().map(|r| &r.previous_driver) {
                if now.driver.name() != Some(want.as_str()) {
                    outcome.warnings.push(format!(
                        "{} is on {} after unbind, not on {want} as before bind",
                        ep.bdf, now.driver
                    ));
                }
            }
        }
        if ep.record.is_some() {
            record::remove(state_dir, ep.bdf)?;
        }
    }
    Ok(outcome)
}
