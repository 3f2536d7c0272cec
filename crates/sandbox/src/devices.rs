//! PCI passthrough (VFIO, cold-plug): which functions the VM gets and how QEMU wires them.
//!
//! - Each passed function sits alone on its own `pcie-root-port` on q35's root bus
//!   `pcie.0` (`-device pcie-root-port,id=rpN,chassis=N+1,slot=N+1` then
//!   `-device vfio-pci,host=BDF,bus=rpN`). Companions of the IOMMU group (a GPU's
//!   HDMI audio) are bound to vfio-pci on the host but never passed.
//! - The 64-bit PCI hole is sized from the devices' 64-bit BARs ([`hole64_size`]).
//! - [`pin_vcpus`] pins QEMU's vCPU threads to the devices' local CPUs, one each, and
//!   [`pin_emulator_threads`] keeps QEMU's other threads on those CPUs too.
//!
//! Nothing is hot-plugged: everything is on the command line before the guest boots.

use std::time::Duration;

use gpucell_host::devices::AssignedDevice;
use serde::Serialize;

use crate::args::{Accel, Cpu, Device};
use crate::qmp::Qmp;

/// At most this many functions per VM (one root port each; Kata allows 16 root ports).
pub const MAX_DEVICES: usize = 16;
/// Space left in the 64-bit hole besides the passed devices' BARs (virtio devices' BARs,
/// alignment of the first BAR placed).
pub const HOLE64_BASE: u64 = 32 << 30;
/// QEMU's own default size of the q35 64-bit hole; never go below it.
pub const QEMU_DEFAULT_HOLE64: u64 = 32 << 30;
/// Physical address bits that 4-level-paging guests and QEMU's default CPUs cover (1 TiB).
pub const DEFAULT_PHYS_BITS: u32 = 40;
/// Physical address bits a guest kernel with 4-level paging can use (64 TiB).
pub const FOUR_LEVEL_PHYS_BITS: u32 = 46;
/// Kernel command line words for a guest with passed functions: let Linux reassign BARs
/// the firmware could not place, and ignore the host bridge's _CRS windows.
pub const KERNEL_PARAMS: [&str; 2] = ["pci=realloc", "pci=nocrs"];

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("{0} PCI functions requested; a sandbox takes at most {MAX_DEVICES}")]
    TooMany(usize),
    #[error("device address {0:?} is not a PCI address like 0000:01:00.0")]
    BadAddress(String),
    #[error("{bdf} is passed twice")]
    Duplicate { bdf: String },
    #[error("the 64-bit PCI hole needs {bits} physical address bits but the host CPU has {host} ({cpuinfo}); pass fewer devices")]
    PhysBits {
        bits: u32,
        host: u32,
        cpuinfo: String,
    },
    #[error("--pin-cpus: no device reports local CPUs (local_cpulist); run without --pin-cpus")]
    NoLocalCpus,
    #[error("--pin-cpus: cannot list the vCPU threads over QMP")]
    QueryCpus(#[source] crate::qmp::QmpError),
    #[error("--pin-cpus: QMP query-cpus-fast returned no thread ids ({0})")]
    BadCpuReply(String),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error("VFIO pins all guest memory: QEMU needs a locked-memory limit of {need_mib} MiB, but the hard limit is {hard_mib} MiB and gpucell cannot raise it (no CAP_SYS_RESOURCE); raise it (`ulimit -l`, systemd `LimitMEMLOCK=`) or use less memory")]
    Memlock { need_mib: u64, hard_mib: u64 },
    #[error("--pin-cpus: cannot pin {} (thread {tid}) to CPU {cpu}", if *.vcpu == u32::MAX { "a QEMU thread".to_string() } else { format!("vCPU {}", .vcpu) })]
    Affinity {
        vcpu: u32,
        tid: i32,
        cpu: u32,
        #[source]
        source: nix::Error,
    },
}

/// One PCI function passed to the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PassthroughDevice {
    /// Host address, `DDDD:BB:DD.F`.
    pub host_bdf: String,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    /// Sum of its 64-bit memory BARs, in bytes.
    pub mmio64_bytes: u64,
    pub numa_node: Option<u32>,
    /// CPUs local to the device (expanded, sorted); empty when unknown.
    pub local_cpus: Vec<u32>,
    /// Functions of its IOMMU group held by the sandbox but not passed.
    pub companions: Vec<String>,
}

impl From<&AssignedDevice> for PassthroughDevice {
    fn from(d: &AssignedDevice) -> Self {
        let mut local_cpus = Vec::new();
        if let Some(list) = &d.local_cpus {
            for &(a, b) in list.ranges() {
                // Bounded by the kernel's CPU count; cap anyway against a hostile file.
                for c in a..=b.min(a.saturating_add(4095)) {
                    local_cpus.push(c);
                }
            }
        }
        local_cpus.sort_unstable();
        local_cpus.dedup();
        PassthroughDevice {
            host_bdf: d.bdf.to_string(),
            vendor: d.vendor,
            device: d.device,
            class: d.class,
            mmio64_bytes: d.mmio64_bytes(),
            numa_node: d.numa_node,
            local_cpus,
            companions: d.companions.iter().map(ToString::to_string).collect(),
        }
    }
}

impl PassthroughDevice {
    /// `vendor:device`, e.g. `10de:2335`.
    pub fn id_string(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor, self.device)
    }
}

/// What the sandbox does with its passed functions.
#[derive(Debug, Clone, Default)]
pub struct DeviceSetup {
    pub devices: Vec<PassthroughDevice>,
    /// Back guest memory with hugepages (hugetlbfs).
    pub hugepages: bool,
    /// Preallocation threads and page size of preallocated memory.
    pub memory: crate::memory::MemoryOptions,
    /// Pin the vCPU threads to the devices' local CPUs.
    pub pin_cpus: bool,
    /// How long the agent waits for the functions to appear in the guest.
    pub wait: Duration,
}

impl DeviceSetup {
    /// Memory is preallocated whenever a function is passed (VFIO pins all of it at
    /// start anyway) or hugepages are asked for.
    pub fn preallocate(&self) -> bool {
        !self.devices.is_empty() || self.hugepages
    }
}

/// What the passed functions and memory options add to a VM: see [`plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDevices {
    /// Root ports and vfio-pci functions, then the memory backend (if any).
    pub devices: Vec<Device>,
    /// Kernel command line words.
    pub cmdline: Vec<&'static str>,
    /// `-global q35-pcihost.pci-hole64-size=`.
    pub hole64: Option<u64>,
    pub cpu: Cpu,
    /// Physical address bits the hole's end needs (0 without a hole).
    pub phys_bits: u32,
    /// Said when the hole ends beyond 1 TiB.
    pub warning: Option<String>,
    /// Host CPUs for the vCPUs, with `--pin-cpus`.
    pub pin_cpus: Option<Vec<u32>>,
}

impl VmDevices {
    /// Nothing passed and nothing asked: the accelerator's default CPU model and no
    /// device, hole, kernel word or pin target (what [`plan`] gives for an empty setup).
    pub fn none(accel: Accel) -> Self {
        VmDevices {
            devices: Vec::new(),
            cmdline: Vec::new(),
            hole64: None,
            cpu: Cpu::for_accel(accel),
            phys_bits: 0,
            warning: None,
            pin_cpus: None,
        }
    }
}

/// Everything `setup` changes in a VM of `cpus` vCPUs and `memory_mib` under `accel`:
/// wiring, memory backend (hugetlbfs looked up under `host_root`), hole, CPU model,
/// kernel words and pin targets. Under KVM the hole must fit the host CPU's address
/// bits (`<host_root>/proc/cpuinfo`).
pub fn plan(
    setup: &DeviceSetup,
    accel: Accel,
    cpus: u32,
    memory_mib: u64,
    host_root: &std::path::Path,
) -> Result<VmDevices, DevicesError> {
    let mut devices = wiring(&setup.devices)?;
    let threads = setup.memory.prealloc_threads.unwrap_or(cpus);
    if setup.hugepages {
        devices.push(Device::Memory(crate::memory::hugepages_backend(
            host_root, memory_mib, threads,
        )?));
    } else if setup.preallocate() {
        devices.push(Device::Memory(crate::memory::preallocated_backend(
            host_root,
            memory_mib,
            threads,
            setup.memory.hugepage_size,
        )?));
    }
    let hole64 = hole64_size(&setup.devices);
    let phys_bits = hole64
        .map(|h| required_phys_bits(memory_mib, h))
        .unwrap_or(0);
    if accel == Accel::Kvm {
        let cpuinfo =
            crate::memory::read_bounded(&host_root.join("proc/cpuinfo")).unwrap_or_default();
        check_host_phys_bits(phys_bits, &cpuinfo)?;
    }
    Ok(VmDevices {
        devices,
        cmdline: if setup.devices.is_empty() {
            Vec::new()
        } else {
            KERNEL_PARAMS.to_vec()
        },
        hole64,
        cpu: cpu_for(accel, phys_bits),
        phys_bits,
        warning: hole64.and_then(|h| phys_bits_warning(phys_bits, h)),
        pin_cpus: if setup.pin_cpus {
            Some(pin_targets(&setup.devices)?)
        } else {
            None
        },
    })
}

fn valid_bdf(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .filter(|(i, _)| ![4, 7, 10].contains(i))
            .all(|(_, c)| c.is_ascii_hexdigit())
        && (b'0'..=b'7').contains(&b[11])
}

/// The `-device` arguments of the passed functions: a root port each, then the function
/// on it. Root ports are `rp0..rpN-1` with chassis and slot 1..N.
pub fn wiring(devices: &[PassthroughDevice]) -> Result<Vec<Device>, DevicesError> {
    if devices.len() > MAX_DEVICES {
        return Err(DevicesError::TooMany(devices.len()));
    }
    let mut out = Vec::with_capacity(devices.len() * 2);
    for (i, d) in devices.iter().enumerate() {
        if !valid_bdf(&d.host_bdf) {
            return Err(DevicesError::BadAddress(d.host_bdf.clone()));
        }
        if devices[..i].iter().any(|o| o.host_bdf == d.host_bdf) {
            return Err(DevicesError::Duplicate {
                bdf: d.host_bdf.clone(),
            });
        }
        let pair = Device::vfio_on_root_port(i as u8, &d.host_bdf)
            .map_err(|_| DevicesError::BadAddress(d.host_bdf.clone()))?;
        out.extend(pair);
    }
    Ok(out)
}

/// The size of the 64-bit PCI hole for `devices`: each device's 64-bit BARs rounded up
/// to a power of two (a root port's window is aligned to its largest BAR), summed; plus
/// the largest of those again (the first window's alignment may waste up to that much
/// above the hole's start) and [`HOLE64_BASE`] for everything else. `None` (QEMU's
/// default) when no device has a 64-bit BAR.
pub fn hole64_size(devices: &[PassthroughDevice]) -> Option<u64> {
    let sizes: Vec<u64> = devices
        .iter()
        .filter(|d| d.mmio64_bytes > 0)
        .map(|d| {
            d.mmio64_bytes
                .checked_next_power_of_two()
                .unwrap_or(1 << 63)
        })
        .collect();
    let largest = sizes.iter().copied().max()?;
    let sum = sizes.iter().copied().fold(0u64, u64::saturating_add);
    Some(
        sum.saturating_add(largest)
            .saturating_add(HOLE64_BASE)
            .max(QEMU_DEFAULT_HOLE64),
    )
}

/// Physical address bits the guest needs to reach the end of the 64-bit hole, which
/// QEMU puts right above RAM (RAM above 4 GiB, start aligned to 1 GiB).
pub fn required_phys_bits(memory_mib: u64, hole: u64) -> u32 {
    const GIB: u64 = 1 << 30;
    let ram_end = (4 * GIB).saturating_add(memory_mib.saturating_mul(1 << 20));
    let start = ram_end.div_ceil(GIB).saturating_mul(GIB);
    let end = start.saturating_add(hole);
    64 - end.saturating_sub(1).leading_zeros()
}

/// The CPU model for a VM whose 64-bit hole ends `bits` bits up: `host` gets
/// `host-phys-bits=on` under KVM when beyond QEMU's default 40 bits; TCG's `max` gets
/// `phys-bits=` explicitly.
pub fn cpu_for(accel: Accel, bits: u32) -> Cpu {
    if bits <= DEFAULT_PHYS_BITS {
        return Cpu::for_accel(accel);
    }
    match accel {
        Accel::Kvm => Cpu::HostPhysBits,
        Accel::Tcg => Cpu::MaxPhysBits(bits.min(52) as u8),
    }
}

/// A warning for holes that end beyond 1 TiB, or `None`.
pub fn phys_bits_warning(bits: u32, hole: u64) -> Option<String> {
    if bits <= DEFAULT_PHYS_BITS {
        return None;
    }
    let gib = hole >> 30;
    let mut w = format!(
        "the 64-bit PCI hole ({gib} GiB) ends beyond 1 TiB: the guest needs {bits} physical \
         address bits (QEMU's CPU gets host-phys-bits=on under KVM; the host CPU must have them)"
    );
    if bits > FOUR_LEVEL_PHYS_BITS {
        w.push_str(
            "; beyond 64 TiB the guest kernel needs 5-level paging (CONFIG_X86_5LEVEL, la57)",
        );
    }
    Some(w)
}

/// Physical address bits of the host CPU, from `address sizes : N bits physical` in
/// `cpuinfo` (the text of `/proc/cpuinfo`). `None` when absent.
pub fn host_phys_bits(cpuinfo: &str) -> Option<u32> {
    cpuinfo
        .lines()
        .take(10_000)
        .find_map(|l| l.strip_prefix("address sizes"))
        .and_then(|rest| rest.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .filter(|&n: &u32| (32..=64).contains(&n))
}

/// Under KVM the guest cannot get more physical address bits than the host CPU has.
pub fn check_host_phys_bits(bits: u32, cpuinfo: &str) -> Result<(), DevicesError> {
    if bits <= DEFAULT_PHYS_BITS {
        return Ok(());
    }
    match host_phys_bits(cpuinfo) {
        Some(host) if host < bits => Err(DevicesError::PhysBits {
            bits,
            host,
            cpuinfo: "address sizes in /proc/cpuinfo".into(),
        }),
        _ => Ok(()),
    }
}

/// The CPUs to pin vCPUs to: the local CPUs of the passed functions (the first device's
/// NUMA node first), without repeats.
pub fn pin_targets(devices: &[PassthroughDevice]) -> Result<Vec<u32>, DevicesError> {
    let mut cpus: Vec<u32> = Vec::new();
    for d in devices {
        for &c in &d.local_cpus {
            if !cpus.contains(&c) {
                cpus.push(c);
            }
        }
    }
    if cpus.is_empty() {
        Err(DevicesError::NoLocalCpus)
    } else {
        Ok(cpus)
    }
}

/// Locked memory QEMU needs with passed functions (guest RAM plus 1 GiB), in bytes.
pub fn memlock_bytes(memory_mib: u64) -> u64 {
    memory_mib.saturating_add(1024).saturating_mul(1 << 20)
}

/// Whether this process has CAP_SYS_RESOURCE (from `CapEff` in `status`, the text of
/// `/proc/self/status`).
pub fn has_sys_resource(status: &str) -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// What bounds the locked memory QEMU may get: this process's hard `RLIMIT_MEMLOCK`
/// and whether it may raise it (CAP_SYS_RESOURCE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemlockLimits {
    /// The hard limit in bytes (`u64::MAX`: unlimited); `None` when unknown.
    pub hard_bytes: Option<u64>,
    /// Whether the process may go above the hard limit.
    pub can_raise: bool,
}

impl MemlockLimits {
    /// This process's limits (`getrlimit`, `CapEff` in `/proc/self/status`).
    pub fn of_this_process() -> Self {
        use nix::sys::resource::{getrlimit, Resource};
        let hard_bytes = getrlimit(Resource::RLIMIT_MEMLOCK).ok().map(|(_, h)| h);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        MemlockLimits {
            hard_bytes,
            can_raise: has_sys_resource(&status),
        }
    }
}

/// Before starting a QEMU with passed functions: its locked-memory limit is set to
/// [`memlock_bytes`] when it starts, which needs CAP_SYS_RESOURCE when that is above
/// the hard limit. Says so clearly instead of a bare EPERM at spawn. Unknown limits
/// pass.
pub fn check_memlock_within(memory_mib: u64, limits: &MemlockLimits) -> Result<(), DevicesError> {
    let need = memlock_bytes(memory_mib);
    match limits.hard_bytes {
        Some(hard) if hard < need && !limits.can_raise => Err(DevicesError::Memlock {
            need_mib: need >> 20,
            hard_mib: hard >> 20,
        }),
        _ => Ok(()),
    }
}

/// [`check_memlock_within`] this process's [`MemlockLimits`].
pub fn check_memlock(memory_mib: u64) -> Result<(), DevicesError> {
    check_memlock_within(memory_mib, &MemlockLimits::of_this_process())
}

/// One vCPU thread and the host CPU it was pinned to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuPin {
    pub vcpu: u32,
    pub thread_id: i32,
    pub cpu: u32,
}

/// The vCPU thread ids, from QMP `query-cpus-fast`.
pub fn vcpu_threads(qmp: &mut Qmp) -> Result<Vec<(u32, i32)>, DevicesError> {
    let reply = qmp
        .execute("query-cpus-fast", None)
        .map_err(DevicesError::QueryCpus)?;
    let list = reply
        .as_array()
        .ok_or_else(|| DevicesError::BadCpuReply("not a list".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, cpu) in list.iter().take(1024).enumerate() {
        let index = cpu
            .get("cpu-index")
            .and_then(|v| v.as_u64())
            .unwrap_or(i as u64) as u32;
        let tid = cpu
            .get("thread-id")
            .and_then(|v| v.as_i64())
            .filter(|&t| t > 0 && t <= i64::from(i32::MAX))
            .ok_or_else(|| DevicesError::BadCpuReply(format!("vCPU {index} has no thread-id")))?;
        out.push((index, tid as i32));
    }
    if out.is_empty() {
        return Err(DevicesError::BadCpuReply("no vCPU".into()));
    }
    Ok(out)
}

/// Pins vCPU `i` to `cpus[i % len]` with sched_setaffinity on its thread.
pub fn pin_vcpus(qmp: &mut Qmp, cpus: &[u32]) -> Result<Vec<VcpuPin>, DevicesError> {
    if cpus.is_empty() {
        return Err(DevicesError::NoLocalCpus);
    }
    let threads = vcpu_threads(qmp)?;
    let mut pins = Vec::with_capacity(threads.len());
    for (n, (vcpu, tid)) in threads.into_iter().enumerate() {
        let cpu = cpus[n % cpus.len()];
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu as usize)
            .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set))
            .map_err(|source| DevicesError::Affinity {
                vcpu,
                tid,
                cpu,
                source,
            })?;
        tracing::debug!(vcpu, tid, cpu, "vCPU pinned");
        pins.push(VcpuPin {
            vcpu,
            thread_id: tid,
            cpu,
        });
    }
    Ok(pins)
}

/// Confines QEMU's other threads (main loop, I/O, RCU) of process `pid` to all of
/// `cpus` (the devices' local CPUs), leaving the `vcpu_tids` as pinned. Threads that
/// exit meanwhile are skipped. Returns how many threads were confined.
pub fn pin_emulator_threads(
    pid: u32,
    vcpu_tids: &[i32],
    cpus: &[u32],
) -> Result<usize, DevicesError> {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c as usize)
            .map_err(|source| DevicesError::Affinity {
                vcpu: u32::MAX,
                tid: pid as i32,
                cpu: c,
                source,
            })?;
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| DevicesError::BadCpuReply(format!("cannot list /proc/{pid}/task: {e}")))?;
    let mut n = 0;
    for entry in tasks.flatten().take(4096) {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if vcpu_tids.contains(&tid) {
            continue;
        }
        match nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set) {
            Ok(()) => n += 1,
            Err(nix::errno::Errno::ESRCH) => {}
            Err(source) => {
                return Err(DevicesError::Affinity {
                    vcpu: u32::MAX,
                    tid,
                    cpu: cpus.first().copied().unwrap_or(0),
                    source,
                })
            }
        }
    }
    Ok(n)
}

/// A passed function as the guest saw it: host address to guest address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PassedMapping {
    pub host_bdf: String,
    /// `None` when the agent did not report it.
    pub guest_bdf: Option<String>,
    pub vendor: u16,
    pub device: u16,
    pub id: String,
    pub numa_node: Option<u32>,
    /// Functions of its IOMMU group held on the host but not passed.
    pub companions: Vec<String>,
}

/// Matches the agent's `Devices` report to the passed functions by vendor:device, in
/// order (QEMU and the guest enumerate root ports in the same order).
pub fn map_to_guest(
    passed: &[PassthroughDevice],
    seen: &[gpucell_protocol::DeviceInfo],
) -> Vec<PassedMapping> {
    let mut used = vec![false; seen.len()];
    passed
        .iter()
        .map(|p| {
            let hit = seen
                .iter()
                .enumerate()
                .find(|(i, s)| !used[*i] && s.vendor == p.vendor && s.device == p.device);
            let guest_bdf = hit.map(|(i, s)| {
                used[i] = true;
                s.bdf.clone()
            });
            PassedMapping {
                host_bdf: p.host_bdf.clone(),
                guest_bdf,
                vendor: p.vendor,
                device: p.device,
                id: p.id_string(),
                numa_node: p.numa_node,
                companions: p.companions.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(bdf: &str, mmio: u64) -> PassthroughDevice {
        PassthroughDevice {
            host_bdf: bdf.into(),
            vendor: 0x10de,
            device: 0x2335,
            class: 0x030200,
            mmio64_bytes: mmio,
            numa_node: None,
            local_cpus: vec![],
            companions: vec![],
        }
    }

    #[test]
    fn hole_rounds_each_device_and_adds_headroom() {
        assert_eq!(hole64_size(&[]), None);
        assert_eq!(hole64_size(&[dev("0000:01:00.0", 0)]), None);
        // 32 GiB + 32 MiB rounds to 64 GiB; the largest again for alignment, plus 32 GiB.
        let d = dev("0000:01:00.0", (32 << 30) + (32 << 20));
        assert_eq!(
            hole64_size(&[d.clone(), d]),
            Some((64 + 64 + 64 + 32) << 30)
        );
        assert_eq!(
            hole64_size(&[dev("0000:01:00.0", 4 << 20)]),
            Some((32 << 30) + (8 << 20))
        );
        assert_eq!(
            hole64_size(&[dev("0000:01:00.0", u64::MAX)]),
            Some(u64::MAX)
        );
    }

    #[test]
    fn phys_bits_follow_the_hole_end() {
        // 1 GiB of RAM: the hole starts at 5 GiB; 59 GiB ends at 64 GiB (36 bits).
        assert_eq!(required_phys_bits(1024, 59 << 30), 36);
        assert_eq!(required_phys_bits(1024, 60 << 30), 37);
        assert!(required_phys_bits(8192, (2 << 40) + (32 << 30)) > DEFAULT_PHYS_BITS);
        assert_eq!(cpu_for(Accel::Kvm, 37), Cpu::Host);
        assert_eq!(cpu_for(Accel::Kvm, 43), Cpu::HostPhysBits);
        assert_eq!(cpu_for(Accel::Tcg, 43), Cpu::MaxPhysBits(43));
        assert!(phys_bits_warning(40, 1 << 30).is_none());
        assert!(phys_bits_warning(47, 1 << 40).unwrap().contains("5-level"));
        let info = "processor : 0\naddress sizes\t: 46 bits physical, 57 bits virtual\n";
        assert_eq!(host_phys_bits(info), Some(46));
        assert!(check_host_phys_bits(43, info).is_ok());
        assert!(matches!(
            check_host_phys_bits(47, info),
            Err(DevicesError::PhysBits { host: 46, .. })
        ));
        assert_eq!(host_phys_bits("address sizes : lots"), None);
    }

    #[test]
    fn wiring_refuses_bad_and_repeated_addresses() {
        assert!(matches!(
            wiring(&[dev("0000:01:00.0,x=1", 0)]),
            Err(DevicesError::BadAddress(_))
        ));
        assert!(matches!(
            wiring(&[dev("0000:01:00.8", 0)]),
            Err(DevicesError::BadAddress(_))
        ));
        assert!(matches!(
            wiring(&[dev("0000:01:00.0", 0), dev("0000:01:00.0", 0)]),
            Err(DevicesError::Duplicate { .. })
        ));
        let many: Vec<_> = (0..17)
            .map(|i| dev(&format!("0000:{i:02x}:00.0"), 0))
            .collect();
        assert!(matches!(wiring(&many), Err(DevicesError::TooMany(17))));
    }

    #[test]
    fn memlock_need_and_capability() {
        assert_eq!(memlock_bytes(256), 1280 << 20);
        assert!(has_sys_resource("Name:\tx\nCapEff:\t000001ffffffffff\n"));
        assert!(!has_sys_resource("CapEff:\t000001fffeffffff\n"));
        assert!(!has_sys_resource("CapEff: zz\n"));
        let low = MemlockLimits {
            hard_bytes: Some(64 << 20),
            can_raise: false,
        };
        let e = check_memlock_within(256, &low).unwrap_err();
        assert!(
            matches!(
                e,
                DevicesError::Memlock {
                    need_mib: 1280,
                    hard_mib: 64
                }
            ),
            "{e}"
        );
        assert!(check_memlock_within(
            256,
            &MemlockLimits {
                can_raise: true,
                ..low
            }
        )
        .is_ok());
        let unlimited = MemlockLimits {
            hard_bytes: Some(u64::MAX),
            can_raise: false,
        };
        assert!(check_memlock_within(1 << 20, &unlimited).is_ok());
        let unknown = MemlockLimits {
            hard_bytes: None,
            can_raise: false,
        };
        assert!(check_memlock_within(256, &unknown).is_ok());
    }

    #[test]
    fn guest_mapping_by_id_in_order() {
        let mut b = dev("0000:02:00.0", 0);
        b.device = 0x11e8;
        b.vendor = 0x1234;
        let passed = [dev("0000:01:00.0", 0), b, dev("0000:03:00.0", 0)];
        let seen = vec![
            gpucell_protocol::DeviceInfo {
                bdf: "0000:01:00.0".into(),
                vendor: 0x10de,
                device: 0x2335,
                class: 0x030200,
            },
            gpucell_protocol::DeviceInfo {
                bdf: "0000:02:00.0".into(),
                vendor: 0x1234,
                device: 0x11e8,
                class: 0xff00,
            },
        ];
        let m = map_to_guest(&passed, &seen);
        assert_eq!(m[0].guest_bdf.as_deref(), Some("0000:01:00.0"));
        assert_eq!(m[1].guest_bdf.as_deref(), Some("0000:02:00.0"));
        assert_eq!(m[2].guest_bdf, None);
    }
}
