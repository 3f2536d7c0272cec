//! `gpucell run` with the jailed QEMU (the default as root), for real under TCG: two
//! concurrent sandboxes, each QEMU checked from the host's `/proc`. Skips with a
//! printed reason without root or the VM test prerequisites (see run_vm.rs).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{qemu_processes_mentioning, stderr, stdout, vm_env};

const REGISTRY: &str = "/run/gpucell/jail-uids";

fn status_field(pid: u32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The run id of a QEMU, from its `-name gpucell-<id>,...`.
fn run_id(pid: u32) -> String {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmd = String::from_utf8_lossy(&cmd);
    let at = cmd.find("gpucell-").unwrap() + "gpucell-".len();
    cmd[at..at + 16].to_string()
}

fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    ["memory", "cpu", "pids", ""]
        .iter()
        .map(|c| Path::new("/sys/fs/cgroup").join(c).join("gpucell").join(id))
        .collect()
}

#[test]
fn two_concurrent_jailed_runs_get_their_own_uids_seccomp_and_no_capabilities() {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|v| v.split_whitespace().nth(1).map(str::to_string))
            })
        })
        .flatten();
    if euid.as_deref() != Some("0") {
        eprintln!("skipping: the jail needs root");
        return;
    }
    let Some(env) = vm_env() else { return };
    let spawn = || {
        env.run_cmd(&[&env.image, "--", "sh", "-c", "sleep 12; echo done"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let needle = env.state.path().to_string_lossy().to_string();
    // Both QEMUs up, each under its seccomp filter.
    let deadline = Instant::now() + Duration::from_secs(120);
    let pids = loop {
        let pids = qemu_processes_mentioning(&needle);
        let filtered = pids
            .iter()
            .filter(|p| status_field(**p, "Seccomp").as_deref() == Some("2"))
            .count();
        if pids.len() == 2 && filtered == 2 {
            break pids;
        }
        assert!(
            Instant::now() < deadline,
            "two jailed QEMUs never ran: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let own_ns = |ns: &str| std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
    let mut uids = Vec::new();
    let mut ids = Vec::new();
    for &pid in &pids {
        let uid = status_field(pid, "Uid").unwrap();
        let first: u32 = uid.split(' ').next().unwrap().parse().unwrap();
        assert!((3_000_000..=3_065_535).contains(&first), "uid {uid}");
        assert_eq!(uid, vec![first.to_string(); 4].join(" "));
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                status_field(pid, cap).as_deref(),
                Some("0000000000000000"),
                "{cap}"
            );
        }
        assert_eq!(status_field(pid, "NoNewPrivs").as_deref(), Some("1"));
        // pid 1 of its own pid namespace.
        assert_eq!(
            status_field(pid, "NSpid").unwrap().split(' ').next_back(),
            Some("1")
        );
        for ns in ["mnt", "pid", "ipc", "uts", "net"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            assert_ne!(theirs, own_ns(ns), "{ns}");
        }
        // What QEMU sees at its root: the staging of the jail, not the host's root.
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert!(
            !root
                .iter()
                .any(|n| n == "etc" || n == "home" || n == "root"),
            "{root:?}"
        );
        let id = run_id(pid);
        // The run directory is a small tmpfs of its own (its quota).
        let run_dir = env.state.path().join("run").join(&id);
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let quota = mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(&*run_dir.to_string_lossy()))
            .unwrap_or_else(|| panic!("{} is not a mount point", run_dir.display()));
        assert!(
            quota.starts_with("tmpfs ") && quota.contains("size=1024k"),
            "{quota}"
        );
        let claimed = std::fs::read_to_string(REGISTRY).unwrap();
        assert!(
            claimed.contains(&format!("{first} ")) && claimed.contains(&id),
            "{claimed}"
        );
        if let Ok(peak) = std::fs::read_to_string(
            Path::new("/sys/fs/cgroup/memory/gpucell")
                .join(&id)
                .join("memory.limit_in_bytes"),
        ) {
            eprintln!("run {id}: uid {first}, cgroup memory limit {}", peak.trim());
        }
        uids.push(first);
        ids.push(id);
    }
    assert_ne!(uids[0], uids[1], "two sandboxes share a uid");
    let mut peak_rss = 0u64;
    while qemu_processes_mentioning(&needle).len() == 2 {
        for &pid in &pids {
            if let Some(hwm) = status_field(pid, "VmHWM") {
                let kib: u64 = hwm.split(' ').next().unwrap_or("0").parse().unwrap_or(0);
                peak_rss = peak_rss.max(kib);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "peak QEMU RSS (512 MiB guest, TCG): {} MiB",
        peak_rss / 1024
    );
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
        assert_eq!(stdout(&out), "done\n");
    }
    env.assert_clean();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&needle), "mounts left: {mounts}");
    for id in &ids {
        for dir in cgroup_dirs(id) {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
        let claimed = std::fs::read_to_string(REGISTRY).unwrap_or_default();
        assert!(!claimed.contains(id.as_str()), "uid claim left: {claimed}");
    }
}

#[test]
fn a_killed_gpucells_jail_is_cleaned_up_by_the_next_run() {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|v| v.split_whitespace().nth(1).map(str::to_string))
            })
        })
        .flatten();
    if euid.as_deref() != Some("0") {
        eprintln!("skipping: the jail needs root");
        return;
    }
    let Some(env) = vm_env() else { return };
    let mut child = env
        .run_cmd(&[&env.image, "--", "sleep", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let needle = env.state.path().to_string_lossy().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let pid = loop {
        let pids = qemu_processes_mentioning(&needle);
        if let Some(p) = pids
            .first()
            .filter(|p| status_field(**p, "Seccomp").as_deref() == Some("2"))
        {
            break *p;
        }
        assert!(Instant::now() < deadline, "no jailed QEMU");
        std::thread::sleep(Duration::from_millis(100));
    };
    let id = run_id(pid);
    common::kill("KILL", child.id());
    let _ = child.wait();
    // QEMU follows (parent-death signal of the jail's waiting child, then its own).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !qemu_processes_mentioning(&needle).is_empty() {
        assert!(Instant::now() < deadline, "QEMU outlived its gpucell");
        std::thread::sleep(Duration::from_millis(50));
    }
    let claimed = std::fs::read_to_string(REGISTRY).unwrap_or_default();
    assert!(claimed.contains(&id), "the killed run's claim: {claimed}");
    // The next run sweeps the run directory (and its quota mount), takes the dead
    // owner's uid claim back and removes its cgroup.
    let out = env.run(&[&env.image, "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&needle), "mounts left: {mounts}");
    let claimed = std::fs::read_to_string(REGISTRY).unwrap_or_default();
    assert!(!claimed.contains(&id), "uid claim left: {claimed}");
    for dir in cgroup_dirs(&id) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
