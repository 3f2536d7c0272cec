//! Owners of allocations: records of dead processes (crashed, pid reused) are reset and
//! reused; a group an orphaned QEMU still holds is kept busy.
#![allow(clippy::unwrap_used)]

mod devices_common;

use std::path::Path;

use devices_common::*;
use gpucell_host::devices::{self, DevicePool, DevicesError, Owner, ReleaseOutcome};
use gpucell_host::HostRoot;

fn dead_owner() -> Owner {
    // A process that has exited: its pid is free (or reused with another start time).
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    Owner { pid, start_time: 1 }
}

/// A fake process table: `<dir>/proc/<pid>/stat` with start time `start`.
fn fake_process(dir: &Path, pid: u32, start: u64) {
    let d = dir.join(format!("proc/{pid}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("stat"),
        format!(
            "{pid} (gpucell) S 1 1 1 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 100\n"
        ),
    )
    .unwrap();
}

#[test]
fn records_of_dead_owners_are_reset_and_reused() {
    let host = h100_host(&[(0x10, 0), (0x11, 0)]);
    let state = tempfile::tempdir().unwrap();
    let procs = tempfile::tempdir().unwrap();
    fake_process(procs.path(), 5001, 10);
    fake_process(procs.path(), 5002, 10);
    let kernel = Kernel::new(&host);
    let pool =
        DevicePool::new(host.root(), state.path()).with_process_root(HostRoot::new(procs.path()));
    let owner = |pid| Owner {
        pid,
        start_time: 10,
    };
    std::mem::forget(
        pool.allocate_as("crashed", owner(5001), &req(Some("1"), &[]), kernel.boxed())
            .unwrap(),
    );
    std::mem::forget(
        pool.allocate_as("reused", owner(5002), &req(Some("1"), &[]), kernel.boxed())
            .unwrap(),
    );
    assert_eq!(devices::allocations(state.path()).unwrap().len(), 2);
    // While both owners run, nothing is free.
    fake_process(procs.path(), 5003, 10);
    let err = pool
        .allocate_as("next", owner(5003), &req(Some("1"), &[]), kernel.boxed())
        .unwrap_err();
    assert!(
        matches!(err, DevicesError::Unavailable { free: 0, .. }),
        "{err}"
    );
    // 5001 crashed; 5002 exited and its pid went to another process (new start time).
    std::fs::remove_dir_all(procs.path().join("proc/5001")).unwrap();
    fake_process(procs.path(), 5002, 99);
    assert!(kernel.log().is_empty());
    // The next allocation reconciles both: reset, check, reuse.
    let next = pool
        .allocate_as("next", owner(5003), &req(Some("2"), &[]), kernel.boxed())
        .unwrap();
    assert_eq!(next.bdfs().len(), 2);
    let mut log = kernel.log();
    log.sort();
    assert_eq!(
        log,
        vec![reset_write("0000:10:00.0"), reset_write("0000:11:00.0")]
    );
    assert!(
        next.notes()
            .iter()
            .any(|n| n.contains("sandbox crashed (pid 5001 is gone)")),
        "{:?}",
        next.notes()
    );
    let recs = devices::allocations(state.path()).unwrap();
    assert!(recs.iter().all(|r| r.sandbox == "next"), "{recs:?}");
    std::mem::forget(next);
}

#[test]
fn a_real_exited_process_is_a_dead_owner() {
    let host = h100_host(&[(0x10, 0)]);
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let pool = pool(&host, state.path());
    let me = Owner::current(Path::new("/proc")).unwrap();
    assert!(me.is_alive(Path::new("/proc")));
    assert!(!Owner {
        start_time: me.start_time + 1,
        ..me
    }
    .is_alive(Path::new("/proc")));
    std::mem::forget(
        pool.allocate_as("gone", dead_owner(), &req(Some("1"), &[]), kernel.boxed())
            .unwrap(),
    );
    let again = pool
        // The crashed sandbox's id can be used again: its record is reconciled first.
        .allocate("gone", &req(Some("1"), &[]), kernel.boxed())
        .unwrap();
    assert_eq!(again.bdfs(), vec![bdf("0000:10:00.0")]);
    assert_eq!(kernel.log(), vec![reset_write("0000:10:00.0")]);
}

#[test]
fn dead_owner_whose_group_is_still_open_stays_busy() {
    let host = h100_host(&[(0x10, 0)]);
    let state = tempfile::tempdir().unwrap();
    // A process table with an orphaned QEMU holding /dev/vfio/16.
    let procs = tempfile::tempdir().unwrap();
    let qemu = procs.path().join("proc/4242");
    std::fs::create_dir_all(qemu.join("fd")).unwrap();
    std::fs::write(qemu.join("comm"), "qemu-system-x86\n").unwrap();
    std::os::unix::fs::symlink("/dev/vfio/16", qemu.join("fd/12")).unwrap();
    let kernel = Kernel::new(&host);
    let pool =
        DevicePool::new(host.root(), state.path()).with_process_root(HostRoot::new(procs.path()));
    let gone = Owner {
        pid: 777,
        start_time: 5,
    };
    std::mem::forget(
        pool.allocate_as("old", gone, &req(Some("1"), &[]), kernel.boxed())
            .unwrap(),
    );
    let err = pool
        .allocate_as(
            "new",
            Owner {
                pid: 4242,
                start_time: 9,
            },
            &req(Some("1"), &[]),
            kernel.boxed(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("busy (sandbox old"), "{err}");
    assert!(kernel.log().is_empty());
    let mut k = kernel.clone();
    let err = pool
        .release_device(bdf("0000:10:00.0"), false, &mut k)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/dev/vfio/16 is open by pid 4242 (qemu-system-x86)"),
        "{err}"
    );
    // QEMU exits: reclaimed by `gpu release`.
    std::fs::remove_dir_all(&qemu).unwrap();
    let out = pool
        .release_device(bdf("0000:10:00.0"), false, &mut k)
        .unwrap();
    assert!(
        matches!(out, ReleaseOutcome::Reclaimed { ref sandbox, .. } if sandbox == "old"),
        "{out:?}"
    );
    assert_eq!(kernel.log(), vec![reset_write("0000:10:00.0")]);
}

#[test]
fn release_while_qemu_still_holds_the_group_keeps_the_device() {
    let host = h100_host(&[(0x10, 0), (0x11, 0)]);
    let state = tempfile::tempdir().unwrap();
    let procs = tempfile::tempdir().unwrap();
    fake_process(procs.path(), 5001, 10);
    // QEMU (pid 6000) still has group 16 open.
    let qemu = procs.path().join("proc/6000");
    std::fs::create_dir_all(qemu.join("fd")).unwrap();
    std::fs::write(qemu.join("comm"), "qemu-system-x86\n").unwrap();
    std::os::unix::fs::symlink("/dev/vfio/16", qemu.join("fd/20")).unwrap();
    let kernel = Kernel::new(&host);
    let pool =
        DevicePool::new(host.root(), state.path()).with_process_root(HostRoot::new(procs.path()));
    let owner = Owner {
        pid: 5001,
        start_time: 10,
    };
    let a = pool
        .allocate_as("vm", owner, &req(Some("2"), &[]), kernel.boxed())
        .unwrap();
    let report = a.release().unwrap();
    assert_eq!(report.kept.len(), 1);
    assert_eq!(report.kept[0].0, bdf("0000:10:00.0"));
    assert!(report.kept[0].1.contains("pid 6000 (qemu-system-x86)"));
    // Only the closed group was reset and returned; the other stays allocated.
    assert_eq!(kernel.log(), vec![reset_write("0000:11:00.0")]);
    let recs = devices::allocations(state.path()).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].bdf, bdf("0000:10:00.0"));
    // The owner exits, then QEMU: the next allocation resets and reuses it.
    std::fs::remove_dir_all(procs.path().join("proc/5001")).unwrap();
    fake_process(procs.path(), 5002, 10);
    let next = Owner {
        pid: 5002,
        start_time: 10,
    };
    let err = pool
        .allocate_as("next", next, &req(Some("2"), &[]), kernel.boxed())
        .unwrap_err();
    assert!(
        matches!(err, DevicesError::Unavailable { free: 1, .. }),
        "{err}"
    );
    std::fs::remove_dir_all(&qemu).unwrap();
    kernel.clear();
    let got = pool
        .allocate_as("next", next, &req(Some("2"), &[]), kernel.boxed())
        .unwrap();
    assert_eq!(got.bdfs().len(), 2);
    assert_eq!(kernel.log(), vec![reset_write("0000:10:00.0")]);
    std::mem::forget(got);
}
