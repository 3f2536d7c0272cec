//! Memory backends and vCPU pinning against a real QEMU started paused (TCG, no guest).
//! Skips with a reason when qemu-system-x86_64 is not installed.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use gpucell_sandbox::args::{Accel, Chardev, Cpu, Device, Machine, QemuCommand, Resources};
use gpucell_sandbox::devices;
use gpucell_sandbox::memory::{self, MemoryBackend};
use gpucell_sandbox::process::QemuProcess;
use gpucell_sandbox::qmp::Qmp;

fn qemu() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin/qemu-system-x86_64");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} is not installed", p.display());
        None
    }
}

fn paused(binary: PathBuf, qmp_sock: &Path, cpus: u32, hole: Option<u64>) -> QemuCommand {
    QemuCommand {
        binary,
        name: "gpucell-devices-test".into(),
        machine: Machine {
            pci_hole64_size: hole,
        },
        accel: Accel::Tcg,
        cpu: Cpu::for_accel(Accel::Tcg),
        resources: Resources {
            cpus,
            memory_mib: 128,
        },
        boot: None,
        start_paused: true,
        drives: vec![],
        chardevs: vec![Chardev::socket_server("qmp", qmp_sock).unwrap()],
        devices: vec![Device::Memory(MemoryBackend::Ram {
            size_mib: 128,
            threads: 2,
        })],
        qmp: Some("qmp".into()),
        serial: None,
        seccomp: None,
        run_as: None,
    }
}

#[test]
fn qemu_takes_the_preallocated_backend_and_the_hole_size() {
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let hole = 160u64 << 30;
    let mut q = QemuProcess::spawn(&paused(bin, &sock, 1, Some(hole)), None).unwrap();
    let mut qmp = Qmp::connect(&sock, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}: {}", q.stderr().tail()));
    let memdev = qmp.execute("query-memdev", None).unwrap();
    let ram = &memdev.as_array().unwrap()[0];
    assert_eq!(ram["id"], "ram", "{memdev}");
    assert_eq!(ram["prealloc"], true, "{memdev}");
    assert_eq!(ram["size"], 128u64 << 20, "{memdev}");
    let got = qmp
        .execute(
            "qom-get",
            Some(serde_json::json!({"path": "/machine/q35", "property": "pci-hole64-size"})),
        )
        .unwrap();
    assert_eq!(got, hole, "{got}");
    qmp.quit().unwrap();
    let _ = q.wait_timeout(Duration::from_secs(10));
}

fn allowed_cpus(pid: u32, tid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn vcpu_threads_are_pinned_round_robin() {
    let Some(bin) = qemu() else { return };
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut q = QemuProcess::spawn(&paused(bin, &sock, 3, None), None).unwrap();
    let mut qmp = Qmp::connect(&sock, Duration::from_secs(10)).unwrap();
    let threads = devices::vcpu_threads(&mut qmp).unwrap();
    assert_eq!(threads.len(), 3, "{threads:?}");
    let targets: Vec<u32> = if online >= 2 { vec![1, 0] } else { vec![0] };
    let pins = devices::pin_vcpus(&mut qmp, &targets).unwrap();
    assert_eq!(pins.len(), 3);
    for (i, pin) in pins.iter().enumerate() {
        let want = targets[i % targets.len()];
        assert_eq!(pin.cpu, want);
        assert_eq!(allowed_cpus(q.pid(), pin.thread_id), want.to_string());
    }
    // The other threads (the main loop is the thread whose id is the pid) get all targets.
    let tids: Vec<i32> = pins.iter().map(|p| p.thread_id).collect();
    let n = devices::pin_emulator_threads(q.pid(), &tids, &targets).unwrap();
    assert!(n >= 1, "{n}");
    let mut sorted = targets.clone();
    sorted.sort_unstable();
    let want = if sorted.len() == 2 {
        "0-1".to_string()
    } else {
        "0".to_string()
    };
    assert_eq!(allowed_cpus(q.pid(), q.pid() as i32), want);
    for pin in &pins {
        assert_eq!(
            allowed_cpus(q.pid(), pin.thread_id),
            pin.cpu.to_string(),
            "vCPU kept"
        );
    }
    // A CPU that does not exist is an error naming the vCPU, not a panic.
    let err = devices::pin_vcpus(&mut qmp, &[100_000]).unwrap_err();
    assert!(err.to_string().contains("vCPU 0"), "{err}");
    qmp.quit().unwrap();
    let _ = q.wait_timeout(Duration::from_secs(10));
}

#[test]
fn qmp_waits_for_preallocation_but_not_for_a_dead_qemu() {
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut cmd = paused(bin.clone(), &sock, 1, None);
    cmd.resources.memory_mib = 1024;
    cmd.devices = vec![Device::Memory(MemoryBackend::Ram {
        size_mib: 1024,
        threads: 1,
    })];
    let mut q = QemuProcess::spawn(&cmd, None).unwrap();
    let startup = memory::startup_wait(Duration::from_secs(10), 1024, true);
    assert_eq!(startup, Duration::from_secs(13));
    // Commands keep the short timeout once the greeting came.
    let mut alive = || true;
    let mut qmp =
        memory::connect_qmp(&sock, startup, Duration::from_millis(500), &mut alive).unwrap();
    assert_eq!(qmp.status().unwrap(), "prelaunch");
    qmp.quit().unwrap();
    let _ = q.wait_timeout(Duration::from_secs(10));

    // QEMU refusing a device exits during startup: the wait ends at once with an error.
    let sock2 = dir.path().join("qmp2.sock");
    let mut bad = paused(bin, &sock2, 1, None);
    bad.devices.push(Device::VirtioBlk {
        drive: "missing".into(),
    });
    let mut q = QemuProcess::spawn(&bad, None).unwrap();
    let t = std::time::Instant::now();
    let mut alive = || matches!(q.try_wait(), Ok(None));
    let err = memory::connect_qmp(
        &sock2,
        Duration::from_secs(120),
        Duration::from_secs(1),
        &mut alive,
    );
    assert!(err.is_err());
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let _ = q.wait_timeout(Duration::from_secs(10));
}
