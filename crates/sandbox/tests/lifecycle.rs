//! Sandbox::run failure paths that need no guest: a missing QEMU, and a QEMU that
//! refuses its arguments. Both must fail with a message naming the cause and leave no
//! run directory and no QEMU behind.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use gpucell_protocol::{RootfsSpec, RunSpec};
use gpucell_sandbox::channel::{Limits, SessionIo};
use gpucell_sandbox::{Accel, ChannelChoice, RunAsPolicy, Sandbox, SandboxError, VmConfig};

fn config(state: &Path, qemu: &str, kernel: PathBuf) -> VmConfig {
    VmConfig {
        qemu: qemu.into(),
        kernel,
        initrd: state.join("initrd"),
        disk: state.join("disk.img"),
        cpus: 1,
        memory_mib: 128,
        accel: Accel::Tcg,
        state_dir: state.to_path_buf(),
        host_root: "/".into(),
        channel: ChannelChoice::Serial,
        run_as: RunAsPolicy::Never,
        seccomp: false,
        limits: Limits::default(),
        extra_cmdline: vec![],
        driver_disk: None,
    }
}

fn spec() -> RunSpec {
    RunSpec {
        args: vec!["true".into()],
        env: vec![],
        cwd: "/".into(),
        user: String::new(),
        hostname: "t".into(),
        rootfs: RootfsSpec {
            device: "/dev/vda".into(),
            fstype: "erofs".into(),
        },
        overlay_bytes: None,
        devices: vec![],
        device_wait_ms: 0,
        gpu: None,
        pod_sandbox: false,
        etc_files: Vec::new(),
        terminal: false,
        window: None,
        volumes: Vec::new(),
    }
}

fn io() -> SessionIo {
    SessionIo {
        stdout: Box::new(std::io::sink()),
        stderr: Box::new(std::io::sink()),
        stdin: None,
    }
}

fn run_dirs(state: &Path) -> usize {
    std::fs::read_dir(state.join("run"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_missing_qemu_is_reported_and_nothing_is_left() {
    let state = tempfile::tempdir().unwrap();
    let cfg = config(
        state.path(),
        "/nonexistent/qemu-system-x86_64",
        state.path().join("k"),
    );
    let err = Sandbox::new(cfg).unwrap().run(&spec(), io()).unwrap_err();
    assert!(matches!(*err.error, SandboxError::Process(_)), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/qemu-system-x86_64"),
        "{err}"
    );
    assert_eq!(run_dirs(state.path()), 0);
}

#[test]
fn qemu_refusing_to_start_is_reported_with_its_own_words() {
    let qemu = "/usr/bin/qemu-system-x86_64";
    if !Path::new(qemu).exists() {
        eprintln!("skipping: {qemu} is not installed");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("disk.img"), vec![0u8; 4096]).unwrap();
    std::fs::write(state.path().join("initrd"), b"").unwrap();
    // A kernel file that is not a kernel.
    std::fs::write(state.path().join("k"), b"not a kernel").unwrap();
    let cfg = config(state.path(), qemu, state.path().join("k"));
    let sandbox = Sandbox::new(cfg).unwrap();
    let id = sandbox.id().to_string();
    let err = sandbox.run(&spec(), io()).unwrap_err();
    let text = format!("{err}");
    assert!(
        matches!(*err.error, SandboxError::QmpConnect { .. }),
        "{text}"
    );
    assert!(text.contains("QEMU said"), "{text}");
    assert!(!err.qemu_stderr.is_empty());
    assert_eq!(run_dirs(state.path()), 0);
    let left = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&format!("gpucell-{id}")))
                .unwrap_or(false)
        })
        .count();
    assert_eq!(left, 0, "QEMU of run {id} left running");
}
