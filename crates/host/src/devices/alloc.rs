//! The allocator: [`DevicePool::allocate`] decides under the lock, binds what needs
//! binding, records the allocation and returns an [`Allocation`] guard.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bar::{Bar, BarKind};
use crate::bdf::Bdf;
use crate::bind::holders::OpenFiles;
use crate::bind::{self, SysfsWriter, Targets};
use crate::iommu;
use crate::pci::{CpuList, PciFunction, PciScan};
use crate::root::HostRoot;

use super::record::{
    self, now_unix, AllocationEntry, AllocationFile, DevicesLock, Owner, QuarantineEntry,
    QuarantineFile,
};
use super::request::{DeviceRequest, GpuSelection};
use super::reset::{self, ResetPolicy};
use super::select::{pick_numa, Availability, Refusal, View};
use super::DevicesError;

/// How often [`DevicePool::allocate_waiting`] tries again.
const WAIT_STEP: Duration = Duration::from_millis(250);

/// The devices of one host and the records that say who holds them. Cheap to clone;
/// every call takes the lock itself.
#[derive(Debug, Clone)]
pub struct DevicePool {
    pub(super) root: HostRoot,
    pub(super) state_dir: PathBuf,
    /// Root whose `/proc` holds the owner processes (normally the host root).
    pub(super) proc_root: HostRoot,
    pub(super) policy: Option<ResetPolicy>,
}

/// One function handed to a sandbox, with what the VM needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AssignedDevice {
    /// Host address, for `-device vfio-pci,host=BDF`.
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// 24-bit class code.
    pub class: u32,
    /// Implemented BARs (sizes decide the guest's 64-bit PCI hole).
    pub bars: Vec<Bar>,
    pub numa_node: Option<u32>,
    pub local_cpus: Option<CpuList>,
    pub iommu_group: u32,
    /// `<root>/dev/vfio/<group>`: QEMU opens it.
    pub vfio_group: PathBuf,
    /// Other endpoints of the group: bound to vfio-pci, NOT passed to the VM.
    pub companions: Vec<Bdf>,
    /// The kernel's reset methods; empty when it has none.
    pub reset_methods: Vec<String>,
}

impl AssignedDevice {
    /// `vendor:device`, e.g. `10de:2330`.
    pub fn id_string(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor, self.device)
    }

    /// Sum of the 64-bit memory BARs, in bytes: the part of the guest's 64-bit PCI hole
    /// this device needs (before alignment).
    pub fn mmio64_bytes(&self) -> u64 {
        self.bars
            .iter()
            .filter(|b| b.kind == BarKind::Memory && b.is_64bit)
            .fold(0u64, |acc, b| acc.saturating_add(b.size))
    }

    /// The largest BAR, in bytes (0 when none is known).
    pub fn largest_bar(&self) -> u64 {
        self.bars.iter().map(|b| b.size).max().unwrap_or(0)
    }
}

/// Exclusive use of devices by one sandbox, until [`Allocation::release`] (or drop).
pub struct Allocation {
    pub(super) pool: DevicePool,
    pub(super) sandbox: String,
    pub(super) owner: Owner,
    pub(super) devices: Vec<AssignedDevice>,
    pub(super) writer: Option<Box<dyn SysfsWriter + Send>>,
    pub(super) notes: Vec<String>,
    pub(super) bind_time: Duration,
}

/// What [`DevicePool::decide`] gave: the devices, notes for the log, and the time spent
/// binding functions to vfio-pci.
struct Decided {
    devices: Vec<AssignedDevice>,
    notes: Vec<String>,
    bind_time: Duration,
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocation")
            .field("sandbox", &self.sandbox)
            .field("owner", &self.owner)
            .field("devices", &self.devices)
            .field("released", &self.writer.is_none())
            .finish()
    }
}

impl Allocation {
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox
    }
    /// The devices to pass, by address.
    pub fn devices(&self) -> &[AssignedDevice] {
        &self.devices
    }
    /// Their host addresses.
    pub fn bdfs(&self) -> Vec<Bdf> {
        self.devices.iter().map(|d| d.bdf).collect()
    }
    /// Sum of [`AssignedDevice::mmio64_bytes`].
    pub fn mmio64_bytes(&self) -> u64 {
        self.devices
            .iter()
            .fold(0u64, |acc, d| acc.saturating_add(d.mmio64_bytes()))
    }
    /// What happened while allocating (records of dead sandboxes released, functions
    /// bound to vfio-pci, ...), for logs.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }
    /// Time spent binding functions to vfio-pci during the allocation (zero when all
    /// were bound already).
    pub fn bind_time(&self) -> Duration {
        self.bind_time
    }
}

impl DevicePool {
    /// The devices under `root`, records under `<state_dir>/devices/`.
    pub fn new(root: HostRoot, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: root.clone(),
            root,
            state_dir: state_dir.into(),
            policy: None,
        }
    }

    /// Look up owner processes under `proc_root`'s `/proc` instead of the host root's
    /// (tests with a fake sysfs tree and real processes).
    pub fn with_process_root(mut self, proc_root: HostRoot) -> Self {
        self.proc_root = proc_root;
        self
    }

    /// Use this reset policy instead of `<state>/devices/policy.toml`.
    pub fn with_policy(mut self, policy: ResetPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub(super) fn proc_dir(&self) -> PathBuf {
        self.proc_root.proc("")
    }

    pub(super) fn policy(&self) -> Result<ResetPolicy, DevicesError> {
        match &self.policy {
            Some(p) => Ok(p.clone()),
            None => ResetPolicy::load(&self.state_dir).map_err(DevicesError::Policy),
        }
    }

    /// Allocates `request` to sandbox `sandbox`, owned by this process. Refuses at once
    /// ([`DevicesError::Unavailable`]) when not enough devices are free.
    pub fn allocate(
        &self,
        sandbox: &str,
        request: &DeviceRequest,
        writer: Box<dyn SysfsWriter + Send>,
    ) -> Result<Allocation, DevicesError> {
        let owner = Owner::current(&self.proc_dir())?;
        self.allocate_as(sandbox, owner, request, writer)
    }

    /// Like [`DevicePool::allocate`], retrying while devices are unavailable, up to `wait`.
    pub fn allocate_waiting(
        &self,
        sandbox: &str,
        request: &DeviceRequest,
        mut writer: Box<dyn SysfsWriter + Send>,
        wait: Duration,
    ) -> Result<Allocation, DevicesError> {
        let owner = Owner::current(&self.proc_dir())?;
        let deadline = Instant::now() + wait;
        loop {
            match self.decide(sandbox, owner, request, &mut *writer) {
                Ok(decided) => return Ok(self.guard(sandbox, owner, decided, writer)),
                Err(DevicesError::Unavailable { .. }) if Instant::now() + WAIT_STEP < deadline => {
                    std::thread::sleep(WAIT_STEP);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Allocates on behalf of `owner` (a process that must outlive the sandbox).
    pub fn allocate_as(
        &self,
        sandbox: &str,
        owner: Owner,
        request: &DeviceRequest,
        mut writer: Box<dyn SysfsWriter + Send>,
    ) -> Result<Allocation, DevicesError> {
        let decided = self.decide(sandbox, owner, request, &mut *writer)?;
        Ok(self.guard(sandbox, owner, decided, writer))
    }

    fn guard(
        &self,
        sandbox: &str,
        owner: Owner,
        decided: Decided,
        writer: Box<dyn SysfsWriter + Send>,
    ) -> Allocation {
        Allocation {
            pool: self.clone(),
            sandbox: sandbox.to_owned(),
            owner,
            devices: decided.devices,
            writer: Some(writer),
            notes: decided.notes,
            bind_time: decided.bind_time,
        }
    }

    #[tracing::instrument(skip(self, writer), fields(request = %request))]
    fn decide(
        &self,
        sandbox: &str,
        owner: Owner,
        request: &DeviceRequest,
        writer: &mut dyn SysfsWriter,
    ) -> Result<Decided, DevicesError> {
        record::check_sandbox_id(sandbox)?;
        let _lock = DevicesLock::take(&self.state_dir)?;
        let mut allocations = record::load_allocations(&self.state_dir)?;
        let mut quarantine = record::load_quarantine(&self.state_dir)?;
        let mut notes = self.reconcile(&mut allocations, &mut quarantine, writer)?;
        // After reconciling: the id of a sandbox that crashed may be used again.
        if allocations.allocations.iter().any(|a| a.sandbox == sandbox) {
            return Err(DevicesError::SandboxExists {
                sandbox: sandbox.to_owned(),
            });
        }
        if request.is_empty() {
            return Ok(Decided {
                devices: Vec::new(),
                notes,
                bind_time: Duration::ZERO,
            });
        }
        let scan = PciScan::read(&self.root).map_err(DevicesError::Scan)?;
        let chosen = choose(&self.view(&scan, &allocations, &quarantine), request)?;
        // Bind what needs it, all groups in one plan.
        let to_bind = needing_bind(&chosen);
        let bind_start = Instant::now();
        if let Some(plan) = self.bind_plan(&to_bind)? {
            let outcome = bind::execute_bind(&self.root, &self.state_dir, &plan, writer)
                .map_err(DevicesError::Bind)?;
            for b in &outcome.changed {
                notes.push(format!("{b} bound to vfio-pci"));
            }
            notes.extend(outcome.warnings);
        }
        let bind_time = if to_bind.is_empty() {
            Duration::ZERO
        } else {
            bind_start.elapsed()
        };
        let since = now_unix();
        let devices = self.assigned(&scan, &chosen)?;
        allocations
            .allocations
            .extend(devices.iter().map(|d| AllocationEntry {
                bdf: d.bdf,
                vendor: d.vendor,
                device: d.device,
                iommu_group: d.iommu_group,
                sandbox: sandbox.to_owned(),
                owner,
                since_unix: since,
            }));
        allocations.allocations.sort_by_key(|a| a.bdf);
        record::save_allocations(&self.state_dir, &allocations)?;
        tracing::info!(sandbox, devices = ?devices.iter().map(|d| d.bdf.to_string()).collect::<Vec<_>>(), "allocated");
        Ok(Decided {
            devices,
            notes,
            bind_time,
        })
    }

    /// Releases every record whose owner is gone and whose group no process has open:
    /// each function is reset and checked, and returned or quarantined. Called under the lock.
    pub(super) fn reconcile(
        &self,
        allocations: &mut AllocationFile,
        quarantine: &mut QuarantineFile,
        writer: &mut dyn SysfsWriter,
    ) -> Result<Vec<String>, DevicesError> {
        let stale = self.stale(allocations);
        if stale.is_empty() {
            return Ok(Vec::new());
        }
        let policy = self.policy()?;
        let mut notes = Vec::new();
        for Stale { entry: a, open_by } in stale {
            if let Some((pid, cmd)) = open_by {
                let node = format!("/dev/vfio/{}", a.iommu_group);
                tracing::warn!(bdf = %a.bdf, sandbox = %a.sandbox, pid, command = %cmd, "owner gone but {node} is still open; kept as busy");
                notes.push(kept_note(&a, pid, &cmd));
                continue;
            }
            let result = reset::reset_and_check(
                &self.root,
                &self.state_dir,
                a.bdf,
                (a.vendor, a.device),
                &policy,
                writer,
            );
            match result {
                Ok(_) => notes.push(format!(
                    "{}: released from sandbox {} (pid {} is gone), reset and checked",
                    a.bdf, a.sandbox, a.owner.pid
                )),
                Err(e) => {
                    let reason = gpucell_common::chain_string(&e);
                    tracing::warn!(bdf = %a.bdf, "quarantined: {reason}");
                    notes.push(format!("{}: quarantined: {reason}", a.bdf));
                    quarantine.put(QuarantineEntry {
                        bdf: a.bdf,
                        vendor: a.vendor,
                        device: a.device,
                        reason,
                        since_unix: now_unix(),
                        sandbox: Some(a.sandbox.clone()),
                    });
                }
            }
            allocations.allocations.retain(|x| x.bdf != a.bdf);
        }
        // Quarantine first: a crash between the two writes leaves the record of a dead
        // owner, which the next allocation reconciles again.
        record::save_quarantine(&self.state_dir, quarantine)?;
        record::save_allocations(&self.state_dir, allocations)?;
        Ok(notes)
    }

    /// The records whose owner is gone, each with the process that still has its group's
    /// `/dev/vfio/N` open, if any (then it stays busy). What [`DevicePool::reconcile`]
    /// acts on and [`DevicePool::preview`] predicts from.
    fn stale(&self, allocations: &AllocationFile) -> Vec<Stale> {
        let proc_dir = self.proc_dir();
        let gone: Vec<&AllocationEntry> = allocations
            .allocations
            .iter()
            .filter(|a| !a.owner.is_alive(&proc_dir))
            .collect();
        if gone.is_empty() {
            return Vec::new();
        }
        let open = OpenFiles::scan(&self.proc_root);
        gone.into_iter()
            .map(|a| Stale {
                entry: a.clone(),
                open_by: open
                    .holders_of(&format!("/dev/vfio/{}", a.iommu_group))
                    .first()
                    .cloned(),
            })
            .collect()
    }

    fn view<'a>(
        &'a self,
        scan: &'a PciScan,
        allocations: &'a AllocationFile,
        quarantine: &'a QuarantineFile,
    ) -> View<'a> {
        View {
            root: &self.root,
            scan,
            allocations,
            quarantine,
        }
    }

    /// The plan binding `to_bind` (with their groups) to vfio-pci, `None` when empty; an
    /// error when something holds a function of those groups.
    fn bind_plan(&self, to_bind: &[Bdf]) -> Result<Option<bind::BindPlan>, DevicesError> {
        if to_bind.is_empty() {
            return Ok(None);
        }
        let plan = bind::plan_bind(&self.root, &Targets::Devices(to_bind.to_vec()))
            .map_err(DevicesError::Bind)?;
        if !plan.refusals.is_empty() {
            return Err(DevicesError::Bind(bind::BindError::Refused {
                holders: plan.refusals.clone(),
            }));
        }
        Ok(Some(plan))
    }

    /// What the VM needs to know about each chosen function.
    fn assigned(
        &self,
        scan: &PciScan,
        chosen: &[(Bdf, bool)],
    ) -> Result<Vec<AssignedDevice>, DevicesError> {
        let mut devices = Vec::new();
        for (bdf, _) in chosen {
            let f = PciFunction::read(&self.root, *bdf)?;
            let group = f.iommu_group.ok_or(DevicesError::GroupLost { bdf: *bdf })?;
            let members = iommu::group_members(&self.root, group)
                .map_err(|source| DevicesError::Group { bdf: *bdf, source })?;
            let companions = members
                .into_iter()
                .filter(|m| *m != f.bdf && !chosen.iter().any(|(c, _)| c == m))
                .filter(|m| !matches!(scan.get(*m), Some(mf) if mf.is_bridge()))
                .collect();
            devices.push(AssignedDevice {
                bdf: f.bdf,
                vendor: f.vendor,
                device: f.device,
                class: f.class,
                bars: f.bars.clone().unwrap_or_default(),
                numa_node: f.numa_node,
                local_cpus: f.local_cpus.clone(),
                iommu_group: group,
                vfio_group: self.root.dev(&format!("vfio/{group}")),
                companions,
                reset_methods: f.reset_methods.clone().unwrap_or_default(),
            });
        }
        Ok(devices)
    }

    /// What [`DevicePool::allocate`] would give `request` now, by the same decision and
    /// with the same refusals, without taking it: no record is written, nothing is bound
    /// or reset, and the state directory is left as it was (only a shared lock on
    /// `<state>/devices/lock` is held while reading, when that file exists). For
    /// `gpucell run --dry-run`.
    ///
    /// Records of dead sandboxes are counted as released, as the allocation would release
    /// them first: if one of those devices then failed its reset it would be quarantined
    /// instead, which a preview cannot know ([`DevicePreview::notes`] names them).
    #[tracing::instrument(skip(self), fields(request = %request))]
    pub fn preview(&self, request: &DeviceRequest) -> Result<DevicePreview, DevicesError> {
        let _lock = DevicesLock::shared_if_exists(&self.state_dir)?;
        let mut allocations = record::load_allocations(&self.state_dir)?;
        let quarantine = record::load_quarantine(&self.state_dir)?;
        let stale = self.stale(&allocations);
        let mut notes = Vec::new();
        if stale.iter().any(|s| s.open_by.is_none()) {
            // The allocation reads the policy before releasing: the same error here.
            self.policy()?;
        }
        for Stale { entry: a, open_by } in stale {
            match open_by {
                Some((pid, cmd)) => notes.push(kept_note(&a, pid, &cmd)),
                None => {
                    notes.push(format!(
                        "{}: would be released from sandbox {} (pid {} is gone), reset and checked",
                        a.bdf, a.sandbox, a.owner.pid
                    ));
                    allocations.allocations.retain(|x| x.bdf != a.bdf);
                }
            }
        }
        if request.is_empty() {
            return Ok(DevicePreview {
                devices: Vec::new(),
                to_bind: Vec::new(),
                notes,
            });
        }
        let scan = PciScan::read(&self.root).map_err(DevicesError::Scan)?;
        let chosen = choose(&self.view(&scan, &allocations, &quarantine), request)?;
        let to_bind = needing_bind(&chosen);
        if let Some(plan) = self.bind_plan(&to_bind)? {
            notes.extend(plan.warnings);
        }
        Ok(DevicePreview {
            devices: self.assigned(&scan, &chosen)?,
            to_bind,
            notes,
        })
    }
}

/// What [`DevicePool::preview`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevicePreview {
    /// The devices the allocation would pass, as it would describe them.
    pub devices: Vec<AssignedDevice>,
    /// Those of them whose IOMMU group it would bind to vfio-pci first.
    pub to_bind: Vec<Bdf>,
    /// Records of dead sandboxes it would release (or keep, their group still open), and
    /// warnings of the bind plan.
    pub notes: Vec<String>,
}

/// An allocation record whose owner is gone.
struct Stale {
    entry: AllocationEntry,
    /// A process that has the group's `/dev/vfio/N` open: (pid, command).
    open_by: Option<(u32, String)>,
}

fn kept_note(a: &AllocationEntry, pid: u32, cmd: &str) -> String {
    format!(
        "{}: sandbox {} (pid {}) is gone but /dev/vfio/{} is open by pid {pid} ({cmd}); kept as busy",
        a.bdf, a.sandbox, a.owner.pid, a.iommu_group
    )
}

/// The chosen functions that need binding to vfio-pci.
fn needing_bind(chosen: &[(Bdf, bool)]) -> Vec<Bdf> {
    chosen
        .iter()
        .filter(|(_, needs_bind)| *needs_bind)
        .map(|(b, _)| *b)
        .collect()
}

/// The functions `request` gets, each with whether it needs binding; or the refusal.
fn choose(view: &View<'_>, request: &DeviceRequest) -> Result<Vec<(Bdf, bool)>, DevicesError> {
    let mut named: Vec<Bdf> = request.devices.clone();
    if let Some(GpuSelection::Devices(list)) = &request.gpus {
        for b in list {
            let f = PciFunction::read(view.root, *b)?;
            if !f.is_nvidia_gpu() {
                return Err(DevicesError::NotAGpu {
                    bdf: *b,
                    id: f.id_string(),
                });
            }
            if !named.contains(b) {
                named.push(*b);
            }
        }
    }
    named.sort();
    let mut chosen = Vec::new();
    let mut refusals = Vec::new();
    for b in &named {
        let f = PciFunction::read(view.root, *b)?;
        match view.availability(&f, true) {
            Availability::Free { needs_bind } => chosen.push((*b, needs_bind)),
            other => refusals.push(Refusal {
                bdf: *b,
                availability: other,
            }),
        }
    }
    // GPUs picked by count or `all`: every other NVIDIA GPU of the host.
    let by_count = matches!(
        request.gpus,
        Some(GpuSelection::Count(_) | GpuSelection::All)
    );
    let gpus: Vec<&PciFunction> = view
        .scan
        .nvidia_gpus()
        .filter(|f| by_count && !named.contains(&f.bdf))
        .collect();
    let mut free = Vec::new();
    for f in &gpus {
        match view.availability(f, false) {
            Availability::Free { needs_bind } => free.push((f.bdf, f.numa_node, needs_bind)),
            other => refusals.push(Refusal {
                bdf: f.bdf,
                availability: other,
            }),
        }
    }
    let asked = request.to_string();
    let unavailable = |free: usize, refusals: Vec<Refusal>| DevicesError::Unavailable {
        asked: asked.clone(),
        free,
        refusals,
    };
    match &request.gpus {
        Some(GpuSelection::Count(n)) => {
            let pairs: Vec<(Bdf, Option<u32>)> = free.iter().map(|(b, n, _)| (*b, *n)).collect();
            match pick_numa(&pairs, *n) {
                Some(picked) if refusals.iter().all(|r| !named.contains(&r.bdf)) => {
                    for p in picked {
                        let needs = free.iter().any(|(b, _, nb)| *b == p && *nb);
                        chosen.push((p, needs));
                    }
                }
                _ => return Err(unavailable(free.len(), refusals)),
            }
        }
        Some(GpuSelection::All) => {
            if gpus.is_empty() && named.is_empty() {
                return Err(DevicesError::NoGpus {
                    path: view.root.pci_devices_dir(),
                });
            }
            if !refusals.is_empty() {
                return Err(unavailable(free.len(), refusals));
            }
            chosen.extend(free.iter().map(|(b, _, nb)| (*b, *nb)));
        }
        Some(GpuSelection::Devices(_)) | None => {
            if !refusals.is_empty() {
                return Err(unavailable(chosen.len(), refusals));
            }
        }
    }
    chosen.sort();
    chosen.dedup_by_key(|(b, _)| *b);
    Ok(chosen)
}
