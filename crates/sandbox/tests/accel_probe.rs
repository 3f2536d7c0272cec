//! The accelerator probe against the real QEMU and a real guest kernel. Needs
//! `GPUCELL_TEST_KERNEL` (an uncompressed vmlinux or a bzImage), busybox-static and cpio,
//! or the real guest (kernel + agent) in `GPUCELL_TEST_STATE_DIR`; skips with a reason
//! otherwise.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gpucell_sandbox::accel::{probe, probe_boot, AccelChoice, ProbeInput};
use gpucell_sandbox::Accel;

/// The tests count probe QEMUs by initrd path, which they may share: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn kernel() -> Option<PathBuf> {
    match std::env::var_os("GPUCELL_TEST_KERNEL").map(PathBuf::from) {
        Some(k) if k.is_file() => Some(k),
        _ => {
            eprintln!("skipping: set GPUCELL_TEST_STATE_DIR (built guest) or GPUCELL_TEST_KERNEL (a vmlinux) to run the probe tests");
            None
        }
    }
}

fn busybox_initrd(dir: &Path) -> Option<PathBuf> {
    let out = dir.join("probe.cpio");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/busybox-initrd.sh");
    match Command::new(&script).arg(&out).status() {
        Ok(s) if s.success() => Some(out),
        other => {
            eprintln!("skipping: could not build a busybox initrd with {script:?} ({other:?}); install busybox-static and cpio");
            None
        }
    }
}

/// QEMU probe processes (by name) booting `initrd`.
fn probe_qemus_with(initrd: &Path) -> usize {
    let initrd = initrd.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("gpucell-accel-probe") && c.contains(&initrd)
                })
                .unwrap_or(false)
        })
        .count()
}

#[test]
fn probe_gives_a_verdict_within_its_timeout_caches_it_and_leaves_no_qemu() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let Some((kernel, initrd, _)) = guest_or_busybox(dir.path()) else {
        return;
    };
    let state = dir.path().join("state");
    let mut input = ProbeInput::new(
        Path::new("/usr/bin/qemu-system-x86_64"),
        &kernel,
        &initrd,
        Path::new("/"),
        Some(&state),
    );
    input.timeout = Duration::from_secs(8);
    let start = Instant::now();
    let first = probe(&input).unwrap();
    let took = start.elapsed();
    eprintln!("probe verdict: {first:?} in {took:?}");
    assert!(
        took < input.timeout + Duration::from_secs(3),
        "probe overran: {took:?}"
    );
    assert!(!first.cached);
    if first.kvm_usable {
        assert_eq!(first.accel, Accel::Kvm);
        assert!(first.reason.is_empty());
    } else {
        assert_eq!(first.accel, Accel::Tcg);
        assert!(!first.reason.is_empty());
    }
    assert_eq!(probe_qemus_with(&initrd), 0, "probe QEMU left running");
    let start = Instant::now();
    let second = probe(&input).unwrap();
    assert!(second.cached && start.elapsed() < Duration::from_millis(500));
    assert_eq!(
        (second.accel, second.kvm_usable),
        (first.accel, first.kvm_usable)
    );
    assert!(state.join("cache/accel-probe.json").is_file());
    assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
}

/// The real guest (kernel + agent) when `gpucell guest build` ran, else the test kernel
/// with a busybox init that answers the probe the same way.
fn guest_or_busybox(dir: &Path) -> Option<(PathBuf, PathBuf, &'static str)> {
    if let Some(state) = std::env::var_os("GPUCELL_TEST_STATE_DIR").map(PathBuf::from) {
        let g = state.join("guest/default");
        if g.join("vmlinux").is_file() && g.join("initramfs.cpio").is_file() {
            return Some((g.join("vmlinux"), g.join("initramfs.cpio"), "agent"));
        }
    }
    let kernel = kernel()?;
    let initrd = busybox_initrd(dir)?;
    Some((kernel, initrd, "busybox"))
}

#[test]
fn the_init_answers_the_probe_under_tcg_and_a_short_timeout_kills_the_boot() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let Some((kernel, initrd, init)) = guest_or_busybox(dir.path()) else {
        return;
    };
    let mut input = ProbeInput::new(
        Path::new("/usr/bin/qemu-system-x86_64"),
        &kernel,
        &initrd,
        Path::new("/"),
        None,
    );
    input.timeout = Duration::from_secs(90);
    let ok = probe_boot(&input, Accel::Tcg).unwrap();
    assert!(
        ok.booted,
        "the {init} init did not print the probe marker: {}",
        ok.reason
    );

    // Far too short for a TCG boot: must give up on time and leave no QEMU behind.
    input.timeout = Duration::from_millis(300);
    let start = Instant::now();
    let late = probe_boot(&input, Accel::Tcg).unwrap();
    assert!(!late.booted);
    assert!(
        late.reason.contains("did not boot under tcg within"),
        "{}",
        late.reason
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(probe_qemus_with(&initrd), 0, "probe QEMU left running");
}
