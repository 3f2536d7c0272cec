//! Builds real guest artifacts from the Debian kernel package (when one is cached on this
//! machine) and checks the manifest, the cache and reproducibility.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use gpucell_guest::{build, load, BuildOptions, Manifest, DEFAULT_FLAVOUR};

fn kernel_deb() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GPUCELL_TEST_KERNEL_DEB") {
        return Some(PathBuf::from(p));
    }
    for d in [
        "/tmp/gpucell-test-debs",
        "/var/cache/apt/archives",
        "/var/lib/gpucell/guest/cache/debs",
    ] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("linux-image-6") && n.ends_with(".deb"))
            })
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Some(p);
        }
    }
    eprintln!(
        "skipping: no Debian kernel .deb cached; set GPUCELL_TEST_KERNEL_DEB or run \
         `apt-get download linux-image-6.1.0-56-amd64` in /tmp/gpucell-test-debs"
    );
    None
}

/// Any static x86-64 executable stands in for the agent here (the build only checks
/// that it is static); the real agent is used when it has been built.
fn static_binary() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("GPUCELL_AGENT").map(PathBuf::from),
        Some(PathBuf::from("/bin/busybox")),
    ];
    let found = candidates.into_iter().flatten().find(|p| {
        std::fs::read(p).is_ok_and(|d| gpucell_guest::agent_bin::check_static(p, &d).is_ok())
    });
    if found.is_none() {
        eprintln!("skipping: no static binary to use as the agent (install busybox-static or set GPUCELL_AGENT)");
    }
    found
}

fn opts(agent: &Path, deb: &Path) -> BuildOptions {
    BuildOptions {
        flavour: DEFAULT_FLAVOUR.into(),
        agent: Some(agent.to_owned()),
        kernel_deb: Some(deb.to_owned()),
        kernel: Default::default(),
        force: false,
        progress: None,
    }
}

#[test]
fn build_is_cached_reproducible_and_complete() {
    let (Some(deb), Some(agent)) = (kernel_deb(), static_binary()) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let not_built = load(state.path(), DEFAULT_FLAVOUR).unwrap_err().to_string();
    assert!(not_built.contains("gpucell guest build"), "{not_built}");

    let first = build(state.path(), &opts(&agent, &deb)).unwrap();
    assert!(!first.cached);
    let m = &first.manifest;
    assert!(m.kernel_release.starts_with("6."), "{}", m.kernel_release);
    let initrd = std::fs::read(&first.initrd).unwrap();
    assert_eq!(initrd.len() as u64, m.initramfs.size);
    assert_eq!(&initrd[..6], b"070701");
    let vmlinux = std::fs::read(&first.kernel).unwrap();
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    gpucell_guest::vmlinux::check_pvh_elf(&vmlinux).unwrap();
    assert_modules(m);
    assert_initrd_lists(&first.initrd, m);

    // Same inputs: nothing is rebuilt, files untouched.
    let mtime = std::fs::metadata(&first.initrd)
        .unwrap()
        .modified()
        .unwrap();
    let second = build(state.path(), &opts(&agent, &deb)).unwrap();
    assert!(second.cached);
    assert_eq!(
        std::fs::metadata(&second.initrd)
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
    assert_eq!(load(state.path(), DEFAULT_FLAVOUR).unwrap().manifest, *m);

    // Forced rebuild into another state dir: byte-identical outputs.
    let other = tempfile::tempdir().unwrap();
    let mut o = opts(&agent, &deb);
    o.force = true;
    let third = build(other.path(), &o).unwrap();
    assert!(!third.cached);
    assert_eq!(std::fs::read(&third.initrd).unwrap(), initrd);
    assert_eq!(std::fs::read(&third.kernel).unwrap(), vmlinux);
    assert_eq!(
        std::fs::read(third.dir.join("manifest.json")).unwrap(),
        std::fs::read(first.dir.join("manifest.json")).unwrap()
    );

    // A damaged artifact is noticed: load() by size, build() by digest (and rebuilt).
    std::fs::write(&first.initrd, b"truncated").unwrap();
    let err = load(state.path(), DEFAULT_FLAVOUR).unwrap_err().to_string();
    assert!(err.contains("--force"), "{err}");
    let rebuilt = build(state.path(), &opts(&agent, &deb)).unwrap();
    assert!(!rebuilt.cached);
    assert_eq!(std::fs::read(&rebuilt.initrd).unwrap(), initrd);

    assert_no_leftovers(state.path());
}

/// The modules the boots need are there, dependencies first, each with its condition.
fn assert_modules(m: &Manifest) {
    for needed in [
        "virtio_blk",
        "virtio_console",
        "virtio_pci",
        "erofs",
        "ext4",
        "overlay",
        "vmw_vsock_virtio_transport",
    ] {
        assert!(
            m.modules.iter().any(|x| x == needed),
            "{needed} missing from {:?}",
            m.modules
        );
    }
    // Dependencies come before their users.
    let pos = |n: &str| m.modules.iter().position(|x| x == n).unwrap();
    assert!(pos("virtio_ring") < pos("virtio_blk"));
    assert!(pos("jbd2") < pos("ext4"));
    assert!(pos("vsock") < pos("vmw_vsock_virtio_transport"));
    // Each loaded only for the boots that use it.
    let when = |n: &str| m.module_conditions[n].as_str();
    assert_eq!(when("virtio_blk"), "always");
    assert_eq!(when("virtio_ring"), "always");
    assert_eq!(when("overlay"), "always");
    assert_eq!(when("virtio_console"), "channel=serial");
    assert_eq!(when("vsock"), "channel=vsock");
    assert_eq!(when("ext4"), "rootfs=ext4");
    assert_eq!(when("jbd2"), "rootfs=ext4");
    assert_eq!(when("erofs"), "rootfs=erofs");
    assert_eq!(m.module_conditions.len(), m.modules.len());
}

/// The init image lists what the manifest says, read back by GNU cpio (when installed).
fn assert_initrd_lists(initrd: &Path, m: &Manifest) {
    let list = Command::new("cpio")
        .args(["-t", "--quiet", "-F"])
        .arg(initrd)
        .output();
    if let Ok(out) = list {
        let names = String::from_utf8(out.stdout).unwrap();
        assert!(names.lines().any(|l| l == "init"));
        assert!(names.lines().any(|l| l == "dev/console"));
        assert!(names.lines().any(|l| l == "modules/order"));
        for module in &m.modules {
            assert!(
                names.lines().any(|l| l == format!("modules/{module}.ko")),
                "{module}"
            );
        }
    }
}

/// No temp dirs left behind in `<state>/guest`.
fn assert_no_leftovers(state: &Path) {
    let leftovers: Vec<_> = std::fs::read_dir(state.join("guest"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".build-") || n.starts_with(".old-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_dynamic_agent_is_refused() {
    let Some(deb) = kernel_deb() else { return };
    let state = tempfile::tempdir().unwrap();
    let err = build(state.path(), &opts(Path::new("/bin/sh"), &deb)).unwrap_err();
    let text = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(text.contains("dynamically linked"), "{text}");
    assert!(text.contains("crt-static"), "{text}");
    assert!(!state.path().join("guest").join(DEFAULT_FLAVOUR).exists());
}
