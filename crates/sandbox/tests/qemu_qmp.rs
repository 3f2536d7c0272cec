//! The launcher and QMP client against a real QEMU started paused (`-S`, no guest).
//! Skips with a reason when qemu-system-x86_64 is not installed.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpucell_sandbox::args::{Accel, Chardev, Cpu, Machine, QemuCommand, Resources, RunAs, Seccomp};
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

fn paused(binary: PathBuf, qmp_sock: &Path) -> QemuCommand {
    QemuCommand {
        binary,
        name: "gpucell-qmp-test".into(),
        machine: Machine {
            pci_hole64_size: None,
        },
        accel: Accel::Tcg,
        cpu: Cpu::for_accel(Accel::Tcg),
        resources: Resources {
            cpus: 1,
            memory_mib: 128,
        },
        boot: None,
        start_paused: true,
        drives: vec![],
        chardevs: vec![
            Chardev::stdio("console").unwrap(),
            Chardev::socket_server("qmp", qmp_sock).unwrap(),
        ],
        devices: vec![],
        qmp: Some("qmp".into()),
        serial: Some("console".into()),
        seccomp: None,
        run_as: None,
    }
}

fn is_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn qmp_drives_a_paused_qemu_through_its_states_and_quit() {
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut q = QemuProcess::spawn(&paused(bin, &sock), None).unwrap();
    let mut qmp = Qmp::connect(&sock, Duration::from_secs(10)).unwrap();
    assert_eq!(qmp.status().unwrap(), "prelaunch");
    qmp.execute("cont", None).unwrap();
    assert_eq!(qmp.status().unwrap(), "running");
    qmp.execute("stop", None).unwrap();
    assert_eq!(qmp.status().unwrap(), "paused");
    let err = qmp.execute("no-such-command", None).unwrap_err();
    assert!(err.to_string().contains("CommandNotFound"), "{err}");
    qmp.quit().unwrap();
    let status = q.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[test]
fn dropping_the_process_guard_kills_qemu() {
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let q = QemuProcess::spawn(&paused(bin, &sock), None).unwrap();
    let pid = q.pid();
    // Wait until it is really up.
    drop(Qmp::connect(&sock, Duration::from_secs(10)).unwrap());
    assert!(!is_gone(pid));
    drop(q);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !is_gone(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(is_gone(pid), "QEMU {pid} survived its guard");
}

#[test]
fn seccomp_and_unprivileged_user_are_accepted_by_this_qemu() {
    let Some(bin) = qemu() else { return };
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: -runas needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut cmd = paused(bin, &sock);
    cmd.seccomp = Some(Seccomp { allow_setuid: true });
    cmd.run_as = Some(RunAs::Runas("nobody".into()));
    let mut q = QemuProcess::spawn(&cmd, None).unwrap();
    let mut qmp = Qmp::connect(&sock, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}; qemu stderr: {}", q.stderr().tail()));
    assert_eq!(qmp.status().unwrap(), "prelaunch");
    let uid = std::fs::read_to_string(format!("/proc/{}/status", q.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    assert!(uid.contains("65534"), "QEMU did not drop to nobody: {uid}");
    qmp.quit().unwrap();
    assert!(q.wait_timeout(Duration::from_secs(10)).unwrap().is_some());
}
