//! Test helpers: the real Debian kernel, when one is available on this machine.

use std::path::PathBuf;
use std::process::Command;

/// A Debian kernel `.deb` already on disk: `$GPUCELL_TEST_KERNEL_DEB`, else one in apt's
/// archive cache or a gpucell state dir's package cache. Prints why when there is none.
pub fn debian_kernel_deb() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GPUCELL_TEST_KERNEL_DEB") {
        return Some(PathBuf::from(p));
    }
    let dirs = [
        "/var/cache/apt/archives".to_owned(),
        "/var/lib/gpucell/guest/cache/debs".to_owned(),
        "/tmp/gpucell-test-debs".to_owned(),
    ];
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut found: Vec<PathBuf> = rd
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
        "skipping: no Debian kernel .deb cached (set GPUCELL_TEST_KERNEL_DEB, or run \
         `apt-get download linux-image-6.1.0-56-amd64` in /tmp/gpucell-test-debs)"
    );
    None
}

/// Extracts the cached kernel's bzImage into a temp dir (removed when the returned guard
/// drops); `None`, with a printed reason, when no kernel is cached.
pub fn debian_vmlinuz() -> Option<(tempfile::TempDir, PathBuf)> {
    let deb = debian_kernel_deb()?;
    let dir = tempfile::tempdir().ok()?;
    let ok = Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -x -C \"$2\" --wildcards './boot/vmlinuz-*'")
        .arg("sh")
        .arg(&deb)
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping: could not unpack {}", deb.display());
        return None;
    }
    let found = std::fs::read_dir(dir.path().join("boot"))
        .ok()?
        .filter_map(|e| e.ok())
        .next()?
        .path();
    Some((dir, found))
}

/// A module (by file name, e.g. `drm.ko`) of the cached kernel, read into memory; `None`,
/// with a printed reason, when no kernel is cached.
pub fn kernel_module(name: &str) -> Option<Vec<u8>> {
    let deb = debian_kernel_deb()?;
    let dir = tempfile::tempdir().ok()?;
    let ok = Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -x -C \"$2\" --wildcards \"*/$3\"")
        .arg("sh")
        .arg(&deb)
        .arg(dir.path())
        .arg(name)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping: could not unpack {name} from {}", deb.display());
        return None;
    }
    let out = Command::new("find")
        .arg(dir.path())
        .args(["-name", name])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .to_owned();
    std::fs::read(path).ok()
}
