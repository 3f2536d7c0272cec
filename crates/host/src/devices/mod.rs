//! Exclusive device allocation, reset and quarantine: which sandbox holds which PCI
//! functions, and cleaning them between sandboxes. See docs/devices.md.
//!
//! # Using it (what `gpucell run` does)
//!
//! ```no_run
//! use gpucell_host::bind::KernelWriter;
//! use gpucell_host::devices::{DevicePool, DeviceRequest};
//! use gpucell_host::HostRoot;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // From `--gpus 2 --device 0000:05:00.0`.
//! let request = DeviceRequest::parse(Some("2"), &["0000:05:00.0"])?;
//! let pool = DevicePool::new(HostRoot::new("/"), "/var/lib/gpucell");
//! // Refuses at once, naming every busy/quarantined/not viable device, when not enough
//! // are free (`allocate_waiting` retries for a while instead).
//! let alloc = pool.allocate("sandbox-42", &request, Box::new(KernelWriter))?;
//! for d in alloc.devices() {
//!     // -device vfio-pci,host=<d.bdf> on its own pcie-root-port; d.vfio_group is
//!     // /dev/vfio/N; d.mmio64_bytes() sizes the 64-bit PCI hole; d.numa_node and
//!     // d.local_cpus for pinning. d.companions are bound to vfio-pci but NOT passed.
//!     println!("{} {} group {}", d.bdf, d.id_string(), d.iommu_group);
//! }
//! // ... run the VM; after QEMU has exited:
//! let report = alloc.release()?; // reset + check; failures are quarantined
//! # let _ = report; Ok(()) }
//! ```
//!
//! - The guard also releases on drop (best effort, errors logged).
//! - The allocation belongs to the calling process (pid + start time). If it dies without
//!   releasing, the next allocation finds the owner gone and releases its devices
//!   (reset + check) before reuse, unless a process (an orphaned QEMU) still has the
//!   group's `/dev/vfio/N` open.
//! - An empty request allocates nothing (but still reconciles dead owners).
//! - Owners are looked up in the host root's `/proc`. With a fake `--host-root` (tests),
//!   pass `.with_process_root(HostRoot::new("/"))` so the real processes are found.
//! - `--wait DUR`: [`DevicePool::allocate_waiting`] retries every 250 ms until then.
//! - Functions without a kernel reset method are quarantined after use unless their
//!   `vendor:device` is in `<state>/devices/policy.toml` (`allow_no_reset`), e.g. QEMU's
//!   `edu` (`1234:11e8`) in the nested test host: see [`reset`].
//! - Sysfs writes (binding, reset) go through the writer passed in; tests pass
//!   [`crate::bind::SimulatedKernel`] or their own.
//!
//! Files: `<state>/devices/lock` (flock, held only while deciding and while updating the
//! records), `allocations.json`, `quarantine.json`, `policy.toml` (optional).

mod alloc;
pub mod fsck;
pub mod record;
mod release;
pub mod request;
pub mod reset;
mod select;

use std::path::{Path, PathBuf};

use crate::bdf::Bdf;
use crate::bind::BindError;
use crate::iommu::IommuError;
use crate::pci::PciError;

pub use alloc::{Allocation, AssignedDevice, DevicePool, DevicePreview};
pub use record::{AllocationEntry, Owner, QuarantineEntry, RecordError};
pub use release::{ReleaseOutcome, ReleaseReport};
pub use request::{DeviceRequest, GpuSelection, RequestError};
pub use reset::{Cleaned, ResetError, ResetPolicy};
pub use select::{pick_numa, Availability, Refusal};

/// Errors allocating or releasing devices.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("cannot list the host's PCI functions")]
    Scan(#[source] PciError),
    #[error(transparent)]
    Function(#[from] PciError),
    #[error("cannot read the IOMMU group of {bdf}")]
    Group {
        bdf: Bdf,
        #[source]
        source: IommuError,
    },
    #[error("{bdf} lost its IOMMU group while being allocated; see `gpucell doctor`")]
    GroupLost { bdf: Bdf },
    #[error("{bdf} ({id}) is not an NVIDIA GPU: pass other functions with --device {bdf}")]
    NotAGpu { bdf: Bdf, id: String },
    #[error("no NVIDIA GPU under {}", path.display())]
    NoGpus { path: PathBuf },
    #[error("cannot give {asked}: {free} free; {}", refusals.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Unavailable {
        asked: String,
        free: usize,
        refusals: Vec<Refusal>,
    },
    #[error("binding to vfio-pci failed")]
    Bind(#[source] BindError),
    #[error("sandbox {sandbox} already holds devices; use another sandbox id")]
    SandboxExists { sandbox: String },
    #[error("{bdf} is in use by sandbox {sandbox} (pid {pid}); stop that sandbox first")]
    InUse { bdf: Bdf, sandbox: String, pid: u32 },
    #[error("{bdf}: its sandbox is gone but {node} is open by pid {pid} ({command}); stop that process first")]
    GroupOpen {
        bdf: Bdf,
        node: String,
        pid: u32,
        command: String,
    },
    #[error("{bdf} still fails its check; fix it (or reboot), or release it anyway with --force")]
    StillFailing {
        bdf: Bdf,
        #[source]
        source: ResetError,
    },
    #[error("the device reset policy cannot be read")]
    Policy(#[source] ResetError),
}

/// The quarantined functions recorded under `state_dir` (for `gpu list` and `doctor`).
pub fn quarantined(state_dir: &Path) -> Result<Vec<QuarantineEntry>, RecordError> {
    record::load_quarantine(state_dir).map(|q| q.devices)
}

/// The allocations recorded under `state_dir` (live or not).
pub fn allocations(state_dir: &Path) -> Result<Vec<AllocationEntry>, RecordError> {
    record::load_allocations(state_dir).map(|a| a.allocations)
}
