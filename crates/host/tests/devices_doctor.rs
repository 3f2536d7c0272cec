//! `doctor` names quarantined devices and says how to release them.
#![allow(clippy::unwrap_used)]

mod devices_common;

use devices_common::*;
use gpucell_host::devices::DevicePool;
use gpucell_host::doctor::{self, DoctorInput, Status};
use gpucell_host::HostRoot;

#[test]
fn doctor_warns_about_each_quarantined_device() {
    let host = h100_host(&[(0x10, 0), (0x11, 0)]);
    // The default state directory under the host root, which `doctor::run` reads.
    let state = host.mkdir("var/lib/gpucell").unwrap();
    let kernel = Kernel::new(&host);
    kernel.fail_reset(bdf("0000:11:00.0"));
    let before = doctor::run(&host.root(), &DoctorInput::default()).unwrap();
    assert!(before
        .checks
        .iter()
        .all(|c| !c.id.starts_with("quarantine")));
    let pool = DevicePool::new(host.root(), &state).with_process_root(HostRoot::new("/"));
    pool.allocate("job-7", &req(Some("2"), &[]), kernel.boxed())
        .unwrap()
        .release()
        .unwrap();
    let report = doctor::run(&host.root(), &DoctorInput::default()).unwrap();
    let c = report.check("quarantine:0000:11:00.0").unwrap();
    assert_eq!(c.status, Status::Warn);
    assert!(
        c.detail.contains("10de:2330")
            && c.detail.contains("after sandbox job-7")
            && c.detail.contains("reset failed"),
        "{}",
        c.detail
    );
    assert!(
        c.fix
            .as_deref()
            .unwrap()
            .contains("gpucell gpu release 0000:11:00.0"),
        "{c:?}"
    );
    assert!(report.check("quarantine:0000:10:00.0").is_none());
    // With an explicit state directory elsewhere, that one is read instead.
    let other = tempfile::tempdir().unwrap();
    let report =
        doctor::run_with_state_dir(&host.root(), &DoctorInput::default(), other.path()).unwrap();
    assert!(report
        .checks
        .iter()
        .all(|c| !c.id.starts_with("quarantine")));
    // A damaged quarantine record is a warning naming the file.
    std::fs::write(state.join("devices/quarantine.json"), "[").unwrap();
    let report = doctor::run(&host.root(), &DoctorInput::default()).unwrap();
    let c = report.check("quarantine").unwrap();
    assert_eq!(c.status, Status::Warn);
    assert!(
        c.detail.contains("quarantine.json is damaged"),
        "{}",
        c.detail
    );
}
