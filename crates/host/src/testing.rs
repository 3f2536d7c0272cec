//! Builders for fake host trees, for tests here and in other crates (feature
//! `test-support`).
//!
//! [`FakeHost`] lays out files the way the kernel does: function directories under
//! `sys/devices/pci<domain>:<bus>/`, with real relative symlinks for
//! `sys/bus/pci/devices/<bdf>`, `<function>/driver`, `sys/bus/pci/drivers/<name>/<bdf>`,
//! `<function>/iommu_group` and `sys/kernel/iommu_groups/<n>/devices/<bdf>`.
//!
//! ```
//! use gpucell_host::testing::{FakeFunction, FakeHost};
//! let host = FakeHost::new().unwrap();
//! host.add(&FakeFunction::rtx4090("0000:01:00.0").driver("vfio-pci").iommu_group(12)).unwrap();
//! host.add(&FakeFunction::rtx4090_audio("0000:01:00.1").driver("vfio-pci").iommu_group(12)).unwrap();
//! let root = host.root();
//! let scan = gpucell_host::pci::PciScan::read(&root).unwrap();
//! assert_eq!(scan.functions.len(), 2);
//! ```

use std::io;
use std::path::{Path, PathBuf};

use crate::bar::{IORESOURCE_IO, IORESOURCE_MEM, IORESOURCE_MEM_64, IORESOURCE_PREFETCH};
use crate::bdf::Bdf;
use crate::root::HostRoot;

/// A host tree in a temporary directory (removed on drop) or at a given path.
#[derive(Debug)]
pub struct FakeHost {
    _dir: Option<tempfile::TempDir>,
    root: PathBuf,
}

/// One PCI function to create. Built with chained setters; every attribute left `None`
/// is not written, so tests can model missing files.
#[derive(Debug, Clone)]
pub struct FakeFunction {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub subsystem: Option<(u16, u16)>,
    pub revision: Option<u8>,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    pub iommu_group: Option<u32>,
    /// Written as-is to `numa_node` (`-1` for none).
    pub numa_node: Option<i32>,
    pub local_cpulist: Option<String>,
    /// Written to both `current_link_*` and `max_link_*`; overwrite the current ones
    /// with [`FakeHost::write`] to model a degraded link.
    pub link: Option<(String, u8)>,
    pub reset_method: Option<String>,
    /// `(index, size, flags)` for each implemented BAR; see the `IORESOURCE_*` constants.
    pub bars: Vec<(u8, u64, u64)>,
    /// Upstream bridge: the function's directory is created inside the bridge's.
    pub parent: Option<Bdf>,
}

fn bdf(s: &str) -> Bdf {
    match s.parse() {
        Ok(b) => b,
        Err(e) => panic!("test fixture uses a bad PCI address: {e}"),
    }
}

/// Flags of a 64-bit prefetchable memory BAR.
pub const BAR_MEM64_PREF: u64 = IORESOURCE_MEM | IORESOURCE_MEM_64 | IORESOURCE_PREFETCH;
/// Flags of a 32-bit non-prefetchable memory BAR.
pub const BAR_MEM32: u64 = IORESOURCE_MEM;
/// Flags of an I/O port BAR.
pub const BAR_IO: u64 = IORESOURCE_IO;

impl FakeFunction {
    /// A function with identity only. Panics on a bad address (test input).
    pub fn new(address: &str, vendor: u16, device: u16, class: u32) -> Self {
        Self {
            bdf: bdf(address),
            vendor,
            device,
            class,
            subsystem: None,
            revision: Some(0xa1),
            driver: None,
            driver_override: None,
            iommu_group: None,
            numa_node: Some(-1),
            local_cpulist: None,
            link: None,
            reset_method: None,
            bars: Vec::new(),
            parent: None,
        }
    }

    /// GeForce RTX 4090 (10de:2684, VGA): 16 MiB BAR0, 32 GiB BAR1 (resizable BAR on),
    /// 32 MiB BAR3, I/O BAR5; `flr` and `bus` reset; PCIe 4.0 x16.
    pub fn rtx4090(address: &str) -> Self {
        Self::new(address, 0x10de, 0x2684, 0x030000)
            .subsystem(0x10de, 0x167c)
            .reset_method("flr bus")
            .link("16.0 GT/s PCIe", 16)
            .bar(0, 16 << 20, BAR_MEM32)
            .bar(1, 32 << 30, BAR_MEM64_PREF)
            .bar(3, 32 << 20, BAR_MEM64_PREF)
            .bar(5, 128, BAR_IO)
    }

    /// The RTX 4090's HDMI audio function (10de:22ba, class 0x0403).
    pub fn rtx4090_audio(address: &str) -> Self {
        Self::new(address, 0x10de, 0x22ba, 0x040300)
            .subsystem(0x10de, 0x167c)
            .reset_method("flr bus")
            .bar(0, 16 << 10, BAR_MEM32)
    }

    /// H100 SXM5 80GB (10de:2330, 3D controller): 16 MiB BAR0, 128 GiB BAR1, 32 MiB BAR3.
    pub fn h100(address: &str) -> Self {
        Self::new(address, 0x10de, 0x2330, 0x030200)
            .reset_method("flr")
            .link("32.0 GT/s PCIe", 16)
            .bar(0, 16 << 20, BAR_MEM64_PREF)
            .bar(2, 128 << 30, BAR_MEM64_PREF)
            .bar(4, 32 << 20, BAR_MEM64_PREF)
    }

    /// An NVMe controller (Samsung 144d:a808), a typical unrelated group member.
    pub fn nvme(address: &str) -> Self {
        Self::new(address, 0x144d, 0xa808, 0x010802).bar(
            0,
            16 << 10,
            BAR_MEM64_PREF & !IORESOURCE_PREFETCH,
        )
    }

    /// A PCIe root port (Intel 8086:a70d, class 0x0604) bound to `pcieport`.
    pub fn root_port(address: &str) -> Self {
        Self::new(address, 0x8086, 0xa70d, 0x060400).driver("pcieport")
    }

    pub fn subsystem(mut self, vendor: u16, device: u16) -> Self {
        self.subsystem = Some((vendor, device));
        self
    }
    pub fn revision(mut self, rev: Option<u8>) -> Self {
        self.revision = rev;
        self
    }
    pub fn driver(mut self, name: &str) -> Self {
        self.driver = Some(name.to_owned());
        self
    }
    pub fn driver_override(mut self, name: &str) -> Self {
        self.driver_override = Some(name.to_owned());
        self
    }
    pub fn iommu_group(mut self, group: u32) -> Self {
        self.iommu_group = Some(group);
        self
    }
    pub fn numa_node(mut self, node: i32) -> Self {
        self.numa_node = Some(node);
        self
    }
    pub fn local_cpulist(mut self, list: &str) -> Self {
        self.local_cpulist = Some(list.to_owned());
        self
    }
    pub fn link(mut self, speed: &str, width: u8) -> Self {
        self.link = Some((speed.to_owned(), width));
        self
    }
    pub fn reset_method(mut self, methods: &str) -> Self {
        self.reset_method = Some(methods.to_owned());
        self
    }
    pub fn no_reset_method(mut self) -> Self {
        self.reset_method = None;
        self
    }
    /// Adds BAR `index` of `size` bytes (a power of two) with `flags`.
    pub fn bar(mut self, index: u8, size: u64, flags: u64) -> Self {
        self.bars.retain(|b| b.0 != index);
        self.bars.push((index, size, flags));
        self
    }
    pub fn behind(mut self, bridge: &str) -> Self {
        self.parent = Some(bdf(bridge));
        self
    }
}

impl FakeHost {
    /// An empty host in a new temporary directory.
    pub fn new() -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("gpucell-host-").tempdir()?;
        let root = dir.path().to_owned();
        let host = Self {
            _dir: Some(dir),
            root,
        };
        host.mkdir("sys/bus/pci/devices")?;
        host.mkdir("sys/bus/pci/drivers")?;
        Ok(host)
    }

    /// A host tree at `path` (created if needed, never removed).
    pub fn at(path: impl Into<PathBuf>) -> io::Result<Self> {
        let host = Self {
            _dir: None,
            root: path.into(),
        };
        host.mkdir("sys/bus/pci/devices")?;
        host.mkdir("sys/bus/pci/drivers")?;
        Ok(host)
    }

    /// The tree as a [`HostRoot`].
    pub fn root(&self) -> HostRoot {
        HostRoot::new(&self.root)
    }

    /// The directory standing for `/`.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `<root>/<rel>`.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Creates `<root>/<rel>` and its parents.
    pub fn mkdir(&self, rel: &str) -> io::Result<PathBuf> {
        let p = self.join(rel);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }

    /// Writes `<root>/<rel>`, creating parent directories.
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> io::Result<()> {
        let p = self.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, content)
    }

    /// Creates the symlink `<root>/<rel> -> target` (target as given, usually relative),
    /// replacing an existing one.
    pub fn symlink(&self, rel: &str, target: &str) -> io::Result<()> {
        let p = self.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if std::fs::symlink_metadata(&p).is_ok() {
            std::fs::remove_file(&p)?;
        }
        std::os::unix::fs::symlink(target, p)
    }

    /// Removes the file or link `<root>/<rel>`.
    pub fn remove(&self, rel: &str) -> io::Result<()> {
        std::fs::remove_file(self.join(rel))
    }

    /// Path of a function's directory relative to the root
    /// (`sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0`), following `parent` links.
    pub fn function_rel_dir(&self, bdf: Bdf) -> String {
        let link = self.join(&format!("sys/bus/pci/devices/{bdf}"));
        if let Ok(target) = std::fs::read_link(&link) {
            // `../../../devices/...` relative to sys/bus/pci/devices.
            let s = target.to_string_lossy();
            if let Some(rest) = s.strip_prefix("../../../") {
                return format!("sys/{rest}");
            }
        }
        format!(
            "sys/devices/pci{:04x}:{:02x}/{bdf}",
            bdf.domain(),
            bdf.bus()
        )
    }

    /// Creates a function: attribute files and every link the kernel makes for it.
    pub fn add(&self, f: &FakeFunction) -> io::Result<()> {
        let dir_rel = match f.parent {
            Some(p) => format!("{}/{}", self.function_rel_dir(p), f.bdf),
            None => format!(
                "sys/devices/pci{:04x}:{:02x}/{}",
                f.bdf.domain(),
                f.bdf.bus(),
                f.bdf
            ),
        };
        let devices_target = format!("../../../{}", dir_rel.trim_start_matches("sys/"));
        self.mkdir(&dir_rel)?;
        let attr =
            |name: &str, value: String| self.write(&format!("{dir_rel}/{name}"), value + "\n");
        attr("vendor", format!("{:#06x}", f.vendor))?;
        attr("device", format!("{:#06x}", f.device))?;
        attr("class", format!("{:#08x}", f.class))?;
        if let Some((v, d)) = f.subsystem {
            attr("subsystem_vendor", format!("{v:#06x}"))?;
            attr("subsystem_device", format!("{d:#06x}"))?;
        }
        if let Some(r) = f.revision {
            attr("revision", format!("{r:#04x}"))?;
        }
        attr(
            "driver_override",
            f.driver_override.clone().unwrap_or_else(|| "(null)".into()),
        )?;
        if let Some(n) = f.numa_node {
            attr("numa_node", n.to_string())?;
        }
        if let Some(l) = &f.local_cpulist {
            attr("local_cpulist", l.clone())?;
        }
        if let Some((speed, width)) = &f.link {
            attr("current_link_speed", speed.clone())?;
            attr("current_link_width", width.to_string())?;
            attr("max_link_speed", speed.clone())?;
            attr("max_link_width", width.to_string())?;
        }
        if let Some(r) = &f.reset_method {
            attr("reset_method", r.clone())?;
        }
        attr("resource", resource_text(f))?;
        self.symlink(&format!("sys/bus/pci/devices/{}", f.bdf), &devices_target)?;
        if let Some(d) = &f.driver {
            self.bind(f.bdf, d)?;
        }
        if let Some(g) = f.iommu_group {
            let up = up_to_sys(&dir_rel);
            self.symlink(
                &format!("{dir_rel}/iommu_group"),
                &format!("{up}kernel/iommu_groups/{g}"),
            )?;
            self.symlink(
                &format!("sys/kernel/iommu_groups/{g}/devices/{}", f.bdf),
                &format!("../../../../{}", dir_rel.trim_start_matches("sys/")),
            )?;
        }
        Ok(())
    }

    /// Points `bdf`'s `driver` link at `driver` and adds the driver's back link, as a
    /// kernel bind does. The function must have been added.
    pub fn bind(&self, bdf: Bdf, driver: &str) -> io::Result<()> {
        self.unbind(bdf)?;
        let dir_rel = self.function_rel_dir(bdf);
        let up = up_to_sys(&dir_rel);
        self.symlink(
            &format!("{dir_rel}/driver"),
            &format!("{up}bus/pci/drivers/{driver}"),
        )?;
        self.symlink(
            &format!("sys/bus/pci/drivers/{driver}/{bdf}"),
            &format!("../../../../{}", dir_rel.trim_start_matches("sys/")),
        )
    }

    /// Removes `bdf`'s `driver` link and the driver's back link, if any.
    pub fn unbind(&self, bdf: Bdf) -> io::Result<()> {
        let dir_rel = self.function_rel_dir(bdf);
        let link = self.join(&format!("{dir_rel}/driver"));
        if let Ok(target) = std::fs::read_link(&link) {
            if let Some(name) = target.file_name() {
                let back = self
                    .join("sys/bus/pci/drivers")
                    .join(name)
                    .join(bdf.to_string());
                let _ = std::fs::remove_file(back);
            }
            std::fs::remove_file(link)?;
        }
        Ok(())
    }

    /// Writes `<root>/proc/cmdline`.
    pub fn cmdline(&self, line: &str) -> io::Result<()> {
        self.write("proc/cmdline", format!("{line}\n"))
    }

    /// Writes a `<root>/proc/cpuinfo` with `cpus` processors of `vendor`
    /// (`GenuineIntel`/`AuthenticAMD`), the given flags and physical address bits.
    pub fn cpuinfo(&self, vendor: &str, flags: &str, cpus: u32, phys_bits: u32) -> io::Result<()> {
        let mut text = String::new();
        for i in 0..cpus {
            text.push_str(&format!(
                "processor\t: {i}\nvendor_id\t: {vendor}\nmodel name\t: Test CPU\nflags\t\t: {flags}\naddress sizes\t: {phys_bits} bits physical, 48 bits virtual\n\n"
            ));
        }
        self.write("proc/cpuinfo", text)
    }

    /// Loads a module: creates `<root>/sys/module/<name>`.
    pub fn module(&self, name: &str) -> io::Result<()> {
        self.mkdir(&format!("sys/module/{name}")).map(|_| ())
    }

    /// Creates an Intel IOMMU unit `sys/class/iommu/<name>/intel-iommu/{cap,ecap}`.
    pub fn intel_iommu_unit(&self, name: &str, cap: u64, ecap: u64) -> io::Result<()> {
        self.write(
            &format!("sys/class/iommu/{name}/intel-iommu/cap"),
            format!("{cap:x}\n"),
        )?;
        self.write(
            &format!("sys/class/iommu/{name}/intel-iommu/ecap"),
            format!("{ecap:x}\n"),
        )
    }

    /// Creates an AMD IOMMU unit `sys/class/iommu/<name>/amd-iommu/{cap,features}`.
    pub fn amd_iommu_unit(&self, name: &str) -> io::Result<()> {
        self.write(
            &format!("sys/class/iommu/{name}/amd-iommu/cap"),
            "190b0010\n",
        )?;
        self.write(
            &format!("sys/class/iommu/{name}/amd-iommu/features"),
            "25bf732fa2295afe\n",
        )
    }

    /// Creates a device node stand-in `<root>/dev/<rel>` (a regular file tests can open).
    pub fn dev_node(&self, rel: &str) -> io::Result<()> {
        self.write(&format!("dev/{rel}"), "")
    }

    /// A bare-metal Intel host ready for passthrough, without PCI functions: VT-x, IOMMU
    /// on with interrupt remapping, vfio modules, `/dev/kvm`, `/dev/vfio/vfio`, 1 GiB
    /// hugepages, 46 physical address bits.
    pub fn bare_metal_intel() -> io::Result<Self> {
        let host = Self::new()?;
        host.cpuinfo("GenuineIntel", "fpu vme de pse msr pae vmx ept lm", 4, 46)?;
        host.cmdline("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on iommu=pt")?;
        // ecap bit 3: interrupt remapping supported.
        host.intel_iommu_unit("dmar0", 0xd2008c40660462, 0xf050da)?;
        host.write(
            "proc/interrupts",
            "           CPU0\n 24:  10  IR-PCI-MSI 65536-edge  nvme0q0\n",
        )?;
        for m in ["vfio", "vfio_pci", "vfio_iommu_type1", "kvm", "kvm_intel"] {
            host.module(m)?;
        }
        host.dev_node("kvm")?;
        host.dev_node("vfio/vfio")?;
        host.write(
            "sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages",
            "64\n",
        )?;
        host.write(
            "sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages",
            "64\n",
        )?;
        host.write(
            "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
            "0\n",
        )?;
        host.write(
            "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
            "0\n",
        )?;
        host.mkdir("sys/kernel/iommu_groups")?;
        Ok(host)
    }
}

/// `../` repeated to climb from a directory relative to the root up to `sys/`.
fn up_to_sys(dir_rel: &str) -> String {
    let depth = dir_rel.trim_start_matches("sys/").split('/').count();
    "../".repeat(depth)
}

fn resource_text(f: &FakeFunction) -> String {
    let mut lines = Vec::new();
    let mut next_base: u64 = 0x0000_2000_0000_0000;
    for index in 0..13u8 {
        match f.bars.iter().find(|b| b.0 == index) {
            Some(&(_, size, flags)) => {
                let start = if flags & IORESOURCE_IO != 0 {
                    0xe000
                } else {
                    next_base
                };
                next_base = next_base.saturating_add(size.max(1 << 20));
                lines.push(format!(
                    "{start:#018x} {:#018x} {flags:#018x}",
                    start + size - 1
                ));
            }
            None => lines.push(format!("{0:#018x} {0:#018x} {0:#018x}", 0u64)),
        }
    }
    lines.join("\n") + "\n"
}

/// Pids of this machine's processes whose command line contains every one of `needles`
/// (for tests that check that nothing they started is left). Zombies have an empty
/// command line and never match.
pub fn processes_with(needles: &[&str]) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if needles.iter().all(|n| cmd.contains(n)) {
            out.push(pid);
        }
    }
    out
}
