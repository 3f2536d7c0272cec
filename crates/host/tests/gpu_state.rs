//! `gpu list`'s join of the sysfs inventory with the device records: every state, the
//! rows printed from it, and damaged records as warnings.
#![allow(clippy::unwrap_used)]

use gpucell_host::devices::record::{
    self, AllocationEntry, AllocationFile, QuarantineEntry, QuarantineFile,
};
use gpucell_host::devices::Owner;
use gpucell_host::gpu::GpuInventory;
use gpucell_host::gpu_state::{DeviceRecords, GpuState, Holder};
use gpucell_host::gpu_view::GpuList;
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::Bdf;

fn b(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// Five RTX 4090s with their audio functions, one group each:
/// 01 on vfio-pci, 02 on nvidia, 03 on vfio-pci, 04 on nvidia, 05 without IOMMU group.
fn host() -> FakeHost {
    let host = FakeHost::bare_metal_intel().unwrap();
    for (bus, driver, group) in [
        (1, "vfio-pci", Some(11)),
        (2, "nvidia", Some(12)),
        (3, "vfio-pci", Some(13)),
        (4, "nvidia", Some(14)),
        (5, "nvidia", None),
    ] {
        let mut gpu = FakeFunction::rtx4090(&format!("0000:0{bus}:00.0")).driver(driver);
        let mut audio = FakeFunction::rtx4090_audio(&format!("0000:0{bus}:00.1")).driver(
            if driver == "vfio-pci" {
                "vfio-pci"
            } else {
                "snd_hda_intel"
            },
        );
        if let Some(g) = group {
            gpu = gpu.iommu_group(g);
            audio = audio.iommu_group(g);
        }
        host.add(&gpu).unwrap();
        host.add(&audio).unwrap();
    }
    host
}

fn allocation(bdf: &str, group: u32, sandbox: &str, pid: u32) -> AllocationEntry {
    AllocationEntry {
        bdf: b(bdf),
        vendor: 0x10de,
        device: 0x2684,
        iommu_group: group,
        sandbox: sandbox.into(),
        owner: Owner { pid, start_time: 1 },
        since_unix: 86_400,
    }
}

fn quarantine(bdf: &str, reason: &str) -> QuarantineEntry {
    QuarantineEntry {
        bdf: b(bdf),
        vendor: 0x10de,
        device: 0x2684,
        reason: reason.into(),
        since_unix: 0,
        sandbox: Some("old".into()),
    }
}

#[test]
fn every_state_from_inventory_and_records() {
    let host = host();
    let inv = GpuInventory::read(&host.root()).unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(record::devices_dir(state.path())).unwrap();
    // 03 (ready underneath) and 04 (needs-bind underneath) are held; 02 is quarantined
    // and, by a stale record, also allocated.
    record::save_allocations(
        state.path(),
        &AllocationFile {
            version: 1,
            allocations: vec![
                allocation("0000:02:00.0", 12, "gone", 5),
                allocation("0000:03:00.0", 13, "sb-3", 33),
                allocation("0000:04:00.0", 14, "sb-4", 44),
            ],
        },
    )
    .unwrap();
    let mut q = QuarantineFile {
        version: 1,
        devices: Vec::new(),
    };
    q.put(quarantine("0000:02:00.0", "reset failed"));
    record::save_quarantine(state.path(), &q).unwrap();
    let records = DeviceRecords::read(state.path());
    assert!(records.warnings.is_empty(), "{:?}", records.warnings);

    let states: Vec<GpuState> = inv.gpus.iter().map(|g| GpuState::of(g, &records)).collect();
    let names: Vec<&str> = states.iter().map(GpuState::name).collect();
    assert_eq!(
        names,
        ["ready", "quarantined", "allocated", "allocated", "no-iommu"]
    );
    assert_eq!(states[0], GpuState::Ready);
    match &states[1] {
        GpuState::Quarantined { quarantine, holder } => {
            assert_eq!(quarantine.reason, "reset failed");
            assert_eq!(quarantine.sandbox.as_deref(), Some("old"));
            assert_eq!(holder.as_ref().map(|h| h.pid), Some(5));
        }
        other => panic!("{other:?}"),
    }
    assert!(states[1].functions().is_empty());
    assert_eq!(
        states[2].holder(),
        Some(&Holder {
            sandbox: "sb-3".into(),
            pid: 33,
            since_unix: 86_400
        })
    );
    assert!(states[2].functions().is_empty());
    // Held, but sysfs still says what would need binding: kept in the row.
    let to_bind: Vec<Bdf> = states[3].functions().iter().map(|m| m.bdf).collect();
    assert_eq!(to_bind, [b("0000:04:00.0"), b("0000:04:00.1")]);
    assert!(states[4].holder().is_none() && states[4].quarantine().is_none());

    // The rows `gpu list --json` prints.
    let list = GpuList::new(&inv, &records);
    let v = serde_json::to_value(&list).unwrap();
    let gpus = v["gpus"].as_array().unwrap();
    assert_eq!(gpus[0]["passthrough"]["state"], "ready");
    assert!(gpus[0]["allocation"].is_null() && gpus[0]["quarantine"].is_null());
    assert_eq!(gpus[1]["passthrough"]["state"], "quarantined");
    assert_eq!(gpus[1]["quarantine"]["reason"], "reset failed");
    assert_eq!(gpus[1]["quarantine"]["since"], "1970-01-01T00:00:00Z");
    assert_eq!(gpus[1]["quarantine"]["sandbox"], "old");
    assert_eq!(gpus[1]["allocation"]["sandbox"], "gone");
    assert_eq!(gpus[1]["passthrough"]["functions"], serde_json::json!([]));
    assert_eq!(gpus[2]["allocation"]["pid"], 33);
    assert_eq!(gpus[2]["allocation"]["since"], "1970-01-02T00:00:00Z");
    assert_eq!(gpus[3]["passthrough"]["state"], "allocated");
    assert_eq!(
        gpus[3]["passthrough"]["functions"][1]["driver"],
        "snd_hda_intel"
    );
    assert_eq!(gpus[4]["passthrough"]["state"], "no-iommu");
    // Without records, every GPU is in its sysfs state.
    let bare = GpuList::from(&inv);
    let names: Vec<&str> = bare.gpus.iter().map(|g| g.passthrough.state).collect();
    assert_eq!(
        names,
        ["ready", "needs-bind", "ready", "needs-bind", "no-iommu"]
    );
}

#[test]
fn damaged_or_missing_records_are_warnings_and_nothing_is_created() {
    let host = host();
    let inv = GpuInventory::read(&host.root()).unwrap();
    let state = tempfile::tempdir().unwrap();
    let records = DeviceRecords::read(state.path());
    assert_eq!(records, DeviceRecords::default());
    assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0);

    std::fs::create_dir_all(record::devices_dir(state.path())).unwrap();
    std::fs::write(record::allocations_path(state.path()), "[").unwrap();
    std::fs::write(
        record::quarantine_path(state.path()),
        r#"{"version":9,"devices":[]}"#,
    )
    .unwrap();
    let records = DeviceRecords::read(state.path());
    assert_eq!(records.warnings.len(), 2, "{:?}", records.warnings);
    assert!(records.warnings[0].contains("quarantine.json is damaged"));
    assert!(records.warnings[1].contains("allocations.json is damaged"));
    let list = GpuList::new(&inv, &records);
    let n = list.warnings.len();
    assert_eq!(list.warnings[n - 2..], records.warnings[..]);
    assert_eq!(list.gpus[1].passthrough.state, "needs-bind");
}
