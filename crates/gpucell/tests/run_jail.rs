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
    let pid = first_jailed_qemu(&needle);
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

/// A network namespace of the test's own (`ip netns add`), deleted when dropped.
struct Netns(String);

impl Netns {
    fn add() -> Option<Netns> {
        let name = format!("gpucell-jail-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipping: `ip netns add {name}` failed");
            return None;
        }
        Some(Netns(name))
    }

    /// `cmd` run by `ip netns exec` in this namespace (which mounts a new sysfs on
    /// /sys, hiding /sys/fs/cgroup), with the same arguments and environment.
    fn exec(&self, cmd: &std::process::Command) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(cmd.get_program());
        c.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// A limit of QEMU's cgroup as the host sees it: `file` of its group in the v1
/// hierarchy `controller` (or in the v2 one), found from `/proc/<pid>/cgroup`.
fn cgroup_value(pid: u32, controller: &str, file: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let (dir, path) = text
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| (controller.to_string(), path.to_string()))
        })
        .or_else(|| {
            text.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| (String::new(), p.to_string()))
        })
        .unwrap_or_else(|| panic!("no {controller} cgroup in {text}"));
    let at = Path::new("/sys/fs/cgroup")
        .join(dir)
        .join(path.trim_start_matches('/'))
        .join(file);
    std::fs::read_to_string(&at)
        .unwrap_or_else(|e| panic!("{}: {e}", at.display()))
        .trim()
        .to_string()
}

#[test]
fn a_run_under_ip_netns_exec_mounts_the_hidden_cgroups_and_reports_its_jail() {
    if !nix_is_root() {
        eprintln!("skipping: the jail needs root");
        return;
    }
    let Some(env) = vm_env() else { return };
    if !Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        eprintln!("skipping: no cgroup hierarchy at /sys/fs/cgroup to read limits back from");
        return;
    }
    let Some(ns) = Netns::add() else { return };
    let run = env.run_cmd(&["--json", &env.image, "--", "sh", "-c", "sleep 8; echo done"]);
    let child = ns
        .exec(&run)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let needle = env.state.path().to_string_lossy().to_string();
    let pid = first_jailed_qemu(&needle);
    let id = run_id(pid);
    // Limits read back from the host's own hierarchies: the run mounted the same ones.
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        && !Path::new("/sys/fs/cgroup/memory").exists();
    let (memory, pids, quota) = if v2 {
        let cpu_max = cgroup_value(pid, "cpu", "cpu.max");
        (
            cgroup_value(pid, "memory", "memory.max"),
            cgroup_value(pid, "pids", "pids.max"),
            cpu_max.split(' ').next().unwrap().to_string(),
        )
    } else {
        (
            cgroup_value(pid, "memory", "memory.limit_in_bytes"),
            cgroup_value(pid, "pids", "pids.max"),
            cgroup_value(pid, "cpu", "cpu.cfs_quota_us"),
        )
    };
    let uid = status_field(pid, "Uid").unwrap();
    let uid: u64 = uid.split(' ').next().unwrap().parse().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "done\n");
    let s = common::summary(&out);
    let jail = &s["jail"];
    assert_eq!(jail["enabled"], true, "{jail}");
    assert_eq!(jail["uid"], uid, "{jail}");
    assert_eq!(jail["gid"], uid, "{jail}");
    let cg = &jail["cgroup"];
    let mount_base = env.state.path().join("cgroup").join(&id);
    assert_eq!(cg["root"], mount_base.to_string_lossy().as_ref(), "{cg}");
    assert_eq!(cg["memory_bytes"].to_string(), memory, "{cg}");
    assert_eq!(cg["pids_max"].to_string(), pids, "{cg}");
    assert_eq!(cg["cpu_quota_us"].to_string(), quota, "{cg}");
    assert_eq!(cg["cpu_period_us"], 100_000, "{cg}");
    assert!(cg["memory_bytes"].as_u64().unwrap() > 512 << 20, "{cg}");
    assert_eq!(jail["status"]["seccomp"], "2", "{jail}");
    assert_eq!(jail["status"]["cap_eff"], "0000000000000000", "{jail}");
    assert_eq!(jail["status"]["no_new_privs"], "1", "{jail}");
    // Nothing left: the group, the mounts (in the namespace `ip netns exec` made,
    // gone with it) and their directory.
    env.assert_clean();
    assert!(!mount_base.exists(), "{} left behind", mount_base.display());
    for dir in cgroup_dirs(&id) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&needle), "mounts left: {mounts}");
}

#[test]
fn an_unjailed_runs_report_says_jail_off() {
    let Some(env) = vm_env() else { return };
    let config = env.state.path().join("config.toml");
    std::fs::write(&config, "[jail]\nenabled = false\n").unwrap();
    let out = env
        .run_cmd(&["--json", &env.image, "--", "true"])
        .env("GPUCELL_CONFIG", &config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    env.assert_clean();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let s = common::summary(&out);
    assert_eq!(s["jail"], serde_json::json!({ "enabled": false }), "{s}");
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
            })
        })
        .unwrap_or(false)
}

/// The first QEMU of a state dir (`needle`) whose seccomp filter is on, waiting up to
/// 120 s for it.
fn first_jailed_qemu(needle: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pids = qemu_processes_mentioning(needle);
        if let Some(p) = pids
            .first()
            .filter(|p| status_field(**p, "Seccomp").as_deref() == Some("2"))
        {
            return *p;
        }
        assert!(Instant::now() < deadline, "no jailed QEMU");
        std::thread::sleep(Duration::from_millis(100));
    }
}
