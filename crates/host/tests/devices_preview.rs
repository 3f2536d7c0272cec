//! `DevicePool::preview` (for `gpucell run --dry-run`): the devices `allocate` would take,
//! the same refusals, and nothing written: the state directory and the host tree are
//! compared entry by entry (content, mode, mtime, link targets) before and after.
#![allow(clippy::unwrap_used)]

mod devices_common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use devices_common::*;
use gpucell_host::bind::SimulatedKernel;
use gpucell_host::devices::{self, DevicePool, DeviceRequest, Owner};
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::HostRoot;

/// Every entry under `dir` (symlinks not followed): what it is, its mode, and for files
/// their content and mtime.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {:o}", m.mode())
            } else {
                format!(
                    "file {:o} {}.{} {:?}",
                    m.mode(),
                    m.mtime(),
                    m.mtime_nsec(),
                    std::fs::read(&p).unwrap()
                )
            };
            out.insert(rel, what);
        }
    }
    out
}

/// Previews `r`, checks that nothing changed, then allocates it for real and checks the
/// two agree (devices, or the refusal's message). Returns the allocation, if any.
fn preview_then_allocate(
    host: &FakeHost,
    state: &Path,
    pool: &DevicePool,
    kernel: &Kernel,
    sandbox: &str,
    r: &DeviceRequest,
) -> Option<devices::Allocation> {
    let (host_before, state_before) = (tree(host.path()), tree(state));
    let preview = pool.preview(r);
    assert_eq!(
        tree(host.path()),
        host_before,
        "preview of {r} changed the host tree"
    );
    assert_eq!(
        tree(state),
        state_before,
        "preview of {r} changed the state dir"
    );
    match (preview, pool.allocate(sandbox, r, kernel.boxed())) {
        (Ok(p), Ok(a)) => {
            assert_eq!(p.devices, a.devices(), "{r}");
            Some(a)
        }
        (Err(p), Err(a)) => {
            assert_eq!(p.to_string(), a.to_string(), "{r}");
            None
        }
        (p, a) => panic!("{r}: preview {p:?} but allocate {a:?}"),
    }
}

#[test]
fn preview_takes_what_allocate_takes_and_writes_nothing() {
    // Node 0: 10, 11; node 1: 20, 21, 22 (on vfio-pci); 30 on nvidia; 31 without IOMMU group.
    let host = h100_host(&[(0x10, 0), (0x11, 0), (0x20, 1), (0x21, 1), (0x22, 1)]);
    add(
        &host,
        FakeFunction::h100("0000:30:00.0")
            .driver("nvidia")
            .iommu_group(0x30),
    );
    add(&host, FakeFunction::h100("0000:31:00.0").driver("vfio-pci"));
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::with_sim(
        &host,
        SimulatedKernel::new(host.root())
            .native_driver(bdf("0000:30:00.0"), "nvidia")
            .create_vfio_nodes(),
    );
    kernel.fail_reset(bdf("0000:11:00.0"));
    let pool = pool(&host, state.path());
    // A fresh state dir: the preview creates nothing in it (not even the lock file).
    assert!(pool.preview(&req(Some("2"), &[])).unwrap().devices.len() == 2);
    assert!(tree(state.path()).is_empty());

    // 11 ends up quarantined.
    let q = preview_then_allocate(
        &host,
        state.path(),
        &pool,
        &kernel,
        "q",
        &req(Some("0000:11:00.0"), &[]),
    );
    assert_eq!(q.unwrap().release().unwrap().quarantined.len(), 1);
    // By count: the tightest NUMA node, skipping the quarantined GPU.
    let two = preview_then_allocate(
        &host,
        state.path(),
        &pool,
        &kernel,
        "two",
        &req(Some("2"), &[]),
    )
    .unwrap();
    assert_eq!(two.bdfs(), [bdf("0000:20:00.0"), bdf("0000:21:00.0")]);
    // Refusals, identical: too many, busy, quarantined, not viable (host driver by
    // count, no IOMMU group), not a GPU.
    for r in [
        req(Some("3"), &[]),
        req(Some("all"), &[]),
        req(Some("0000:20:00.0"), &[]),
        req(Some("0000:11:00.0"), &[]),
        req(Some("0000:31:00.0"), &[]),
        req(None, &["0000:99:00.0"]),
    ] {
        assert!(
            preview_then_allocate(&host, state.path(), &pool, &kernel, "no", &r).is_none(),
            "{r}"
        );
    }
    // Named from the host driver: bound first (the preview says so), then passed.
    let before = tree(host.path());
    let p = pool.preview(&req(Some("0000:30:00.0"), &[])).unwrap();
    assert_eq!(p.to_bind, [bdf("0000:30:00.0")]);
    assert_eq!(tree(host.path()), before);
    let named = preview_then_allocate(
        &host,
        state.path(),
        &pool,
        &kernel,
        "named",
        &req(Some("0000:30:00.0"), &[]),
    )
    .unwrap();
    assert!(kernel
        .log()
        .iter()
        .any(|(p, _)| p.contains("0000:30:00.0/driver_override")));
    // An empty request takes nothing.
    let p = pool.preview(&DeviceRequest::default()).unwrap();
    assert!(p.devices.is_empty() && p.to_bind.is_empty());
    drop((two, named));
}

#[test]
fn records_of_dead_owners_count_as_released_without_being_touched() {
    let host = h100_host(&[(0x10, 0)]);
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let pool = pool(&host, state.path());
    // A crashed sandbox: its owner process has exited.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    std::mem::forget(
        pool.allocate_as(
            "crashed",
            Owner { pid, start_time: 1 },
            &req(Some("1"), &[]),
            kernel.boxed(),
        )
        .unwrap(),
    );
    kernel.clear();
    let before = tree(state.path());
    let p = pool.preview(&req(Some("1"), &[])).unwrap();
    assert_eq!(p.devices[0].bdf, bdf("0000:10:00.0"));
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("would be released from sandbox crashed")),
        "{:?}",
        p.notes
    );
    // Not reset, the record kept.
    assert!(kernel.log().is_empty(), "{:?}", kernel.log());
    assert_eq!(tree(state.path()), before);
    assert_eq!(
        devices::allocations(state.path()).unwrap()[0].sandbox,
        "crashed"
    );
    // The allocation then does release it and takes it.
    let a = preview_then_allocate(
        &host,
        state.path(),
        &pool,
        &kernel,
        "next",
        &req(Some("1"), &[]),
    )
    .unwrap();
    assert_eq!(kernel.log(), vec![reset_write("0000:10:00.0")]);
    drop(a);
}

#[test]
fn a_group_the_host_uses_is_refused_alike() {
    let host = h100_host(&[(0x10, 0)]);
    add(
        &host,
        FakeFunction::nvme("0000:10:00.1")
            .driver("nvme")
            .iommu_group(0x10),
    );
    let nvme_dir = host.function_rel_dir(bdf("0000:10:00.1"));
    host.mkdir(&format!("{nvme_dir}/nvme/nvme0/nvme0n1"))
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(&host);
    let pool = DevicePool::new(host.root(), state.path()).with_process_root(HostRoot::new("/"));
    for r in [req(Some("1"), &[]), req(Some("0000:10:00.0"), &[])] {
        let err = pool.preview(&r).unwrap_err().to_string();
        assert!(
            err.contains("its IOMMU group cannot go to vfio-pci"),
            "{err}"
        );
        assert!(preview_then_allocate(&host, state.path(), &pool, &kernel, "s", &r).is_none());
    }
    assert!(kernel.log().is_empty(), "{:?}", kernel.log());
}
