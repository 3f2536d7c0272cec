//! Boots the real guest (Debian kernel + the agent's init image) under QEMU and talks the
//! protocol to the agent over a virtio-serial unix socket (and vsock), with a busybox image
//! on a virtio-blk disk. Proves the agent end to end. Skips, with the reason, when QEMU,
//! the kernel package, busybox-static, the mkfs tools or a static agent build are missing.

#![allow(clippy::unwrap_used)]

mod harness;

use std::time::{Duration, Instant};

use gpucell_protocol::{DeviceMatch, ExitStatus, RootfsSpec, RunSpec};
use harness::*;

fn spec(args: &[&str], user: &str) -> RunSpec {
    RunSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin".into(), "GREETING=hi".into()],
        cwd: "/work".into(),
        user: user.into(),
        hostname: "cell".into(),
        rootfs: RootfsSpec {
            device: String::new(),
            fstype: String::new(),
        },
        overlay_bytes: Some(16 << 20),
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

#[test]
fn agent_runs_a_workload_on_ext4() {
    let Some(env) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "ext4");
    let script = "echo $GREETING; echo oops >&2; id -u; id -G; hostname; echo pid=$$; pwd; \
                  read line; echo got=$line; ls /dev; exit 3";
    let seen = boot_and_run(
        &env,
        dir.path(),
        &disk,
        "ext4",
        spec(&["sh", "-c", script], "app"),
        b"hello\n",
    );
    assert!(seen.hello && seen.started, "{seen:?}");
    assert_eq!(seen.devices, Some(vec![]));
    assert_eq!(seen.error, None, "console:\n{}", seen.console);
    assert!(seen.logs.is_empty(), "boot warnings: {:?}", seen.logs);
    let out = String::from_utf8_lossy(&seen.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..7],
        [
            "hi",
            "1000",
            "1000 44",
            "cell",
            "pid=1",
            "/work",
            "got=hello"
        ],
        "{out}"
    );
    for node in ["null", "zero", "urandom", "tty", "pts", "shm"] {
        assert!(out.contains(node), "/dev lacks {node}: {out}");
    }
    assert!(
        !out.contains("vda"),
        "the container must not see the guest's disks: {out}"
    );
    assert_eq!(
        String::from_utf8_lossy(&seen.stderr).lines().next(),
        Some("oops")
    );
    assert_eq!(
        seen.exited,
        Some(ExitStatus {
            code: Some(3),
            signal: None
        }),
        "{out}"
    );
}

#[test]
fn agent_reports_a_missing_executable_on_erofs() {
    let Some(env) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "erofs");
    let mut s = spec(&["nope"], "");
    s.devices = vec![
        DeviceMatch {
            vendor: 0x1234,
            device: 0x11e8,
        },
        DeviceMatch {
            vendor: 0x10de,
            device: 0x2335,
        },
    ];
    s.device_wait_ms = 200;
    let seen = boot_and_run(&env, dir.path(), &disk, "erofs", s, b"");
    assert!(seen.hello);
    let err = seen.error.unwrap_or_default();
    assert!(
        err.contains("10de:2335") && !err.contains("1234:11e8"),
        "{err}"
    );
    let devices = seen.devices.unwrap();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!((devices[0].vendor, devices[0].device), (0x1234, 0x11e8));
    assert!(devices[0].bdf.starts_with("0000:00:"), "{}", devices[0].bdf);

    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "erofs");
    let seen = boot_and_run(&env, dir.path(), &disk, "erofs", spec(&["nope"], ""), b"");
    assert_eq!(seen.devices, Some(vec![]));
    assert!(!seen.started);
    assert_eq!(
        seen.error.as_deref(),
        Some("executable `nope` not found in PATH /bin of the image")
    );
}

#[test]
fn overlay_is_writable_and_host_signals_reach_the_workload() {
    let Some(env) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "erofs");
    let script = "echo written > /etc/new && cat /etc/new && exec sleep 60";
    let t = Instant::now();
    let seen = boot_and_run_with(
        &env,
        dir.path(),
        &disk,
        "erofs",
        spec(&["/bin/sh", "-c", script], "0:0"),
        b"",
        Some(OnOutput::Signal(9)),
    );
    assert_eq!(seen.error, None, "console:\n{}", seen.console);
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "written\n");
    assert_eq!(
        seen.exited,
        Some(ExitStatus {
            code: None,
            signal: Some(9)
        })
    );
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "the signal did not end the workload"
    );
}

#[test]
fn shutdown_kills_the_workload_and_powers_off() {
    let Some(env) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "erofs");
    let t = Instant::now();
    let seen = boot_and_run_with(
        &env,
        dir.path(),
        &disk,
        "erofs",
        spec(&["sh", "-c", "echo up; exec sleep 60"], ""),
        b"",
        Some(OnOutput::Shutdown),
    );
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "up\n");
    assert_eq!(seen.exited, None);
    assert_eq!(seen.error, None);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "shutdown did not stop the VM"
    );
}

#[test]
fn agent_talks_over_vsock() {
    let Some(env) = setup() else { return };
    if vhost_device_vsock().is_none() {
        eprintln!(
            "skipping: vhost-device-vsock not found (cargo install vhost-device-vsock, or set \
             VHOST_DEVICE_VSOCK); this host has no vhost-vsock"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "erofs");
    let seen = boot_and_run_on(
        Chan::Vsock,
        &env,
        dir.path(),
        &disk,
        "erofs",
        spec(&["sh", "-c", "cat; echo done"], ""),
        b"via vsock\n",
        None,
    );
    assert_eq!(seen.error, None, "console:\n{}", seen.console);
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "via vsock\ndone\n");
    assert_eq!(
        seen.exited,
        Some(ExitStatus {
            code: Some(0),
            signal: None
        })
    );
}
