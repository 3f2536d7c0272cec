//! KVM and hugepage checks.

use std::fs::OpenOptions;

use crate::root::HostRoot;
use crate::sysfs;

use super::{Check, KvmProbe};

pub(super) fn kvm(root: &HostRoot, probe: Option<&KvmProbe>) -> Check {
    const ID: &str = "kvm";
    const TITLE: &str = "KVM";
    let path = root.dev("kvm");
    let tcg = "guests will run under TCG (software emulation), many times slower";
    if let Err(e) = OpenOptions::new().read(true).write(true).open(&path) {
        return Check::warn(
            ID,
            TITLE,
            format!("cannot open {}: {e}; {tcg}", path.display()),
            "load kvm_intel or kvm_amd, enable virtualization in the firmware, and give this user access to /dev/kvm",
        );
    }
    match probe {
        Some(KvmProbe::Usable) => Check::pass(ID, TITLE, format!("{} opens and a probe guest booted", path.display())),
        Some(KvmProbe::Unusable(reason)) => Check::warn(
            ID,
            TITLE,
            format!("{} opens but a probe guest could not run: {reason}; {tcg}", path.display()),
            "on a nested or paravirtual hypervisor, enable nested virtualization with full CPU features; GPUCELL_ACCEL=tcg silences the probe",
        ),
        Some(KvmProbe::NotRun(reason)) => Check::warn(
            ID,
            TITLE,
            format!("{} opens; boot probe not run ({reason})", path.display()),
            "let doctor boot the probe guest (build it with `gpucell guest build`, run doctor on this machine); if guests fail under KVM, set GPUCELL_ACCEL=tcg",
        ),
        None => Check::warn(
            ID,
            TITLE,
            format!("{} opens; no boot probe available", path.display()),
            "if guests fail under KVM, set GPUCELL_ACCEL=tcg",
        ),
    }
}

pub(super) fn hugepages(root: &HostRoot) -> Check {
    const ID: &str = "hugepages";
    const TITLE: &str = "Hugepages";
    let dir = root.sys("kernel/mm/hugepages");
    let fix = "VFIO pins all guest memory before boot (about 0.3 s per GiB with 4 KiB pages): reserve 1 GiB pages with hugepagesz=1G hugepages=N on the kernel command line";
    let names = match sysfs::list_dir(&dir) {
        Ok(n) => n,
        Err(e) => {
            return Check::warn(
                ID,
                TITLE,
                format!("unknown: {}", gpucell_common::chain_string(&e)),
                fix,
            )
        }
    };
    let mut parts = Vec::new();
    let mut free_bytes: u64 = 0;
    for name in names {
        let Some(kb) = name
            .to_str()
            .and_then(|n| n.strip_prefix("hugepages-"))
            .and_then(|n| n.strip_suffix("kB"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let sub = dir.join(&name);
        let total = sysfs::read_dec::<u64>(&sub.join("nr_hugepages"), "a page count");
        let free = sysfs::read_dec::<u64>(&sub.join("free_hugepages"), "a page count");
        match (total, free) {
            (Ok(t), Ok(f)) => {
                free_bytes = free_bytes.saturating_add(f.saturating_mul(kb).saturating_mul(1024));
                parts.push(format!(
                    "{} pages: {t} reserved, {f} free",
                    crate::bar::human_size(kb.saturating_mul(1024))
                ));
            }
            (Err(e), _) | (_, Err(e)) => parts.push(gpucell_common::chain_string(&e)),
        }
    }
    let detail = if parts.is_empty() {
        format!("no page sizes under {}", dir.display())
    } else {
        parts.join("; ")
    };
    if free_bytes > 0 {
        Check::pass(
            ID,
            TITLE,
            format!(
                "{} free in hugepages ({detail})",
                crate::bar::human_size(free_bytes)
            ),
        )
    } else {
        Check::warn(ID, TITLE, format!("no free hugepages ({detail})"), fix)
    }
}
