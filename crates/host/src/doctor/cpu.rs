//! CPU facts from `<root>/proc/cpuinfo`: vendor, virtualization flags, physical address bits.

use crate::root::HostRoot;
use crate::sysfs;
use gpucell_common::chain_string;

use super::Check;

/// CPU vendor, as `vendor_id` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    Intel,
    Amd,
    Other,
}

/// What doctor needs from `/proc/cpuinfo` (first processor entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    /// `Err` holds why cpuinfo could not be read, naming the file.
    pub read: Result<(), String>,
    pub vendor: Option<CpuVendor>,
    pub vmx: bool,
    pub svm: bool,
    /// From `address sizes : N bits physical`.
    pub phys_bits: Option<u32>,
}

impl CpuInfo {
    /// Reads `<root>/proc/cpuinfo`; unreadable means every field unknown.
    pub fn read(root: &HostRoot) -> Self {
        match sysfs::read_raw(&root.proc("cpuinfo")) {
            Ok(text) => Self::parse(&text),
            Err(e) => Self {
                read: Err(chain_string(&e)),
                vendor: None,
                vmx: false,
                svm: false,
                phys_bits: None,
            },
        }
    }

    /// Parses cpuinfo text. Only the first processor's fields are used.
    pub fn parse(text: &str) -> Self {
        let mut info = Self {
            read: Ok(()),
            vendor: None,
            vmx: false,
            svm: false,
            phys_bits: None,
        };
        let mut seen_flags = false;
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "vendor_id" if info.vendor.is_none() => {
                    info.vendor = Some(match value {
                        "GenuineIntel" => CpuVendor::Intel,
                        "AuthenticAMD" | "HygonGenuine" => CpuVendor::Amd,
                        _ => CpuVendor::Other,
                    })
                }
                "flags" if !seen_flags => {
                    seen_flags = true;
                    for f in value.split_whitespace() {
                        match f {
                            "vmx" => info.vmx = true,
                            "svm" => info.svm = true,
                            _ => {}
                        }
                    }
                }
                "address sizes" if info.phys_bits.is_none() => {
                    info.phys_bits = value
                        .split_once(" bits physical")
                        .and_then(|(n, _)| n.trim().parse().ok())
                        .filter(|n| (32..=64).contains(n));
                }
                _ => {}
            }
        }
        info
    }
}

pub(super) fn virtualization(cpu: &CpuInfo) -> Check {
    const ID: &str = "cpu-virtualization";
    const TITLE: &str = "CPU virtualization";
    let fix = "enable Intel VT-x or AMD-V (SVM) in the firmware setup; without it guests run under TCG, many times slower";
    match &cpu.read {
        Err(e) => Check::warn(ID, TITLE, format!("unknown: {e}"), fix),
        Ok(()) if cpu.vmx => Check::pass(ID, TITLE, "vmx (Intel VT-x) in /proc/cpuinfo flags"),
        Ok(()) if cpu.svm => Check::pass(ID, TITLE, "svm (AMD-V) in /proc/cpuinfo flags"),
        Ok(()) => Check::warn(ID, TITLE, "neither vmx nor svm in /proc/cpuinfo flags", fix),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_first_processor() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu svm lm\naddress sizes\t: 48 bits physical, 48 bits virtual\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\nflags\t: vmx\n";
        let c = CpuInfo::parse(text);
        assert_eq!(c.vendor, Some(CpuVendor::Amd));
        assert!(c.svm && !c.vmx);
        assert_eq!(c.phys_bits, Some(48));
        let c = CpuInfo::parse("address sizes : 999 bits physical\nflags: fpu\n");
        assert_eq!(c.phys_bits, None);
        assert_eq!(virtualization(&c).status, super::super::Status::Warn);
    }
}
