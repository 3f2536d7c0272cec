//! The jail, for real (needs root): a probe spawned through the same code that jails
//! QEMU reports what it can see and do, and it must be exactly the view asked for.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gpucell_sandbox::jail::cgroup::{Cgroup, CgroupLimits, RealCgroupFs};
use gpucell_sandbox::jail::exec::{install, JailSpec, Prepared};
use gpucell_sandbox::jail::libs::{Ldd, Libraries};
use gpucell_sandbox::jail::uids;
use gpucell_sandbox::jail::view::{EntryKind, View};

fn skip() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: the jail needs root (namespaces, mounts, set*id)");
        return true;
    }
    false
}

/// The probe example, built by `cargo test` next to the test binaries.
fn probe() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join("examples/jail_probe");
    assert!(
        p.exists(),
        "{} missing: run through cargo test",
        p.display()
    );
    p
}

fn all_under(dir: &Path, out: &mut BTreeSet<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        out.insert(e.path());
        if e.file_type().unwrap().is_dir() {
            all_under(&e.path(), out);
        }
    }
}

fn own_ns(name: &str) -> String {
    std::fs::read_link(format!("/proc/self/ns/{name}"))
        .unwrap()
        .display()
        .to_string()
}

struct Probe {
    lines: Vec<String>,
    code: Option<i32>,
}

impl Probe {
    fn value(&self, key: &str) -> String {
        let prefix = format!("{key} ");
        self.lines
            .iter()
            .find_map(|l| {
                if l == key {
                    Some("")
                } else {
                    l.strip_prefix(&prefix)
                }
            })
            .unwrap_or_else(|| panic!("no {key:?} in {:#?}", self.lines))
            .to_string()
    }
    fn all(&self, key: &str) -> Vec<String> {
        let prefix = format!("{key} ");
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }
}

fn run(spec: &JailSpec, args: &[&Path]) -> Probe {
    let mut cmd = Command::new(probe());
    cmd.args(args)
        .env("JAIL_PROBE_HOLD", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    install(&mut cmd, Prepared::new(spec).unwrap());
    let mut child = cmd.spawn().unwrap();
    // The process spawned is the jail's waiting child, named as such.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap();
    let shown = String::from_utf8_lossy(&cmdline);
    assert_eq!(shown.trim_end_matches('\0'), "gpucell-jail", "{shown:?}");
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap();
    assert_eq!(comm.trim(), "gpucell-jail");
    drop(child.stdin.take());
    let mut stdout = Vec::new();
    std::io::Read::read_to_end(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    let status = child.wait().unwrap();
    let out = std::process::Output {
        status,
        stdout,
        stderr: Vec::new(),
    };
    Probe {
        lines: String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect(),
        code: out.status.code(),
    }
}

#[test]
fn a_jailed_probe_sees_exactly_its_view_as_its_own_uid_with_no_privileges() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let rw = tmp.path().join("rw");
    let ro = tmp.path().join("ro");
    let staging = tmp.path().join("root");
    for d in [&rw, &ro, &staging, &ro.join("sub")] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(ro.join("sub/file"), b"ro").unwrap();
    std::fs::write(rw.join("existing"), b"rw").unwrap();
    let registry = tmp.path().join("jail-uids");
    let claim = uids::claim(
        &registry,
        3_100_000,
        3_100_009,
        "probe",
        &uids::process_alive,
    )
    .unwrap();
    let uid = claim.uid();
    // The probe writes here as its own uid.
    std::os::unix::fs::chown(&rw, Some(uid), Some(uid)).unwrap();

    let probe = probe();
    let mut view = View::new();
    view.add(&probe, EntryKind::File, false);
    for lib in Ldd.of(&probe).unwrap() {
        view.add(lib, EntryKind::File, false);
    }
    view.add(&rw, EntryKind::Dir, true);
    view.add(&ro, EntryKind::Dir, false);
    view.add_device("/dev/null").unwrap();
    let name = format!("jail-test-{}", std::process::id());
    let limits = CgroupLimits {
        memory_bytes: 256 << 20,
        cpus: 1,
        pids: 16,
    };
    let cgroup = Cgroup::create(
        Box::new(RealCgroupFs),
        Path::new("/sys/fs/cgroup"),
        &name,
        limits,
    );
    let cgroup = match cgroup {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("no cgroup for the probe ({e}); checking the rest");
            None
        }
    };
    let spec = JailSpec {
        view: view.clone(),
        uid,
        gid: uid,
        new_net: true,
        hostname: "gpucell-probe".into(),
        staging: staging.clone(),
        cgroup_procs: cgroup
            .as_ref()
            .map(|c| c.procs_files().to_vec())
            .unwrap_or_default(),
    };
    let p = run(&spec, &[&rw, &ro]);
    assert_eq!(p.code, Some(0), "{:#?}", p.lines);

    // Exactly the view: every entry, the directories leading to them, what the shown
    // directories hold (and the file the probe itself wrote), /proc; nothing else.
    let mut expected = view.visible_paths();
    all_under(&rw, &mut expected);
    all_under(&ro, &mut expected);
    let seen: BTreeSet<PathBuf> = p.all("path").into_iter().map(PathBuf::from).collect();
    assert_eq!(seen, expected, "the jail shows other paths than its view");
    assert!(seen.contains(&rw.join("from-jail")));

    let ids = format!("{uid} {uid} {uid} {uid}");
    assert_eq!(p.value("status Uid:"), ids);
    assert_eq!(p.value("status Gid:"), ids);
    assert_eq!(p.value("status Groups:"), "");
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(
            p.value(&format!("status {cap}")),
            "0000000000000000",
            "{cap}"
        );
    }
    assert_eq!(p.value("status NoNewPrivs:"), "1");
    assert_eq!(
        p.value("status Seccomp:"),
        "0",
        "the probe installs no filter itself"
    );
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        assert_ne!(
            p.value(&format!("ns {ns}")),
            own_ns(ns),
            "{ns} namespace shared"
        );
    }
    assert_eq!(p.value("pid"), "1", "pid 1 of its own pid namespace");
    assert_eq!(p.value("hostname"), "gpucell-probe");
    assert_eq!(p.all("netdev"), ["lo"], "a network namespace of its own");
    let erofs = format!("errno {}", libc::EROFS);
    assert_eq!(p.value("write-rw"), "ok");
    assert_eq!(p.value("write-ro"), erofs);
    assert_eq!(p.value("write-root"), erofs);
    assert_eq!(p.value("write-dev-null"), "ok");
    assert_eq!(p.value("setuid-0"), format!("errno {}", libc::EPERM));
    assert_eq!(
        p.value("mknod"),
        format!("errno {}", libc::EPERM),
        "CAP_MKNOD is gone"
    );
    if let Some(cg) = &cgroup {
        let lines = p.all("cgroup");
        for dir in cg.dirs() {
            let leaf = format!("/gpucell/{name}");
            assert!(dir.ends_with(format!("gpucell/{name}")));
            assert!(lines.iter().any(|l| l.ends_with(&leaf)), "{lines:?}");
        }
    }
    let dirs: Vec<PathBuf> = cgroup
        .as_ref()
        .map(|c| c.dirs().to_vec())
        .unwrap_or_default();
    drop(cgroup);
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    // Nothing is left on the host: the staging directory is empty, the uid released.
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
    drop(claim);
    assert!(uids::claims(&registry).unwrap().is_empty());
}

#[test]
fn a_jail_that_cannot_be_built_fails_the_spawn_and_leaves_nothing() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let staging = tmp.path().join("root");
    std::fs::create_dir(&staging).unwrap();
    let probe = probe();
    let mut view = View::new();
    view.add(&probe, EntryKind::File, false);
    view.add(tmp.path().join("missing"), EntryKind::File, false);
    let spec = JailSpec {
        view,
        uid: 3_100_010,
        gid: 3_100_010,
        new_net: true,
        hostname: "gpucell-probe".into(),
        staging: staging.clone(),
        cgroup_procs: Vec::new(),
    };
    let mut cmd = Command::new(&probe);
    install(&mut cmd, Prepared::new(&spec).unwrap());
    let err = cmd
        .spawn()
        .expect_err("a bind of a missing file must fail the spawn");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
}
