//! What the tests with a real containerd share: the prerequisites (root, guest artifacts,
//! QEMU, containerd), a short scratch directory holding the state dir, and a process scan.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const IMAGE: &str = "docker.io/library/gpucell-demo:latest";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// containerd's directory: GPUCELL_TEST_CONTAINERD, else target/containerd/usr/bin
/// (fetched once from Debian).
fn containerd_bin() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("GPUCELL_TEST_CONTAINERD") {
        return Ok(PathBuf::from(d));
    }
    let dest = repo_root().join("target/containerd");
    let out = Command::new(repo_root().join("scripts/fetch-containerd.sh"))
        .arg(&dest)
        .output()
        .map_err(|e| format!("running scripts/fetch-containerd.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/fetch-containerd.sh could not fetch containerd: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dest.join("usr/bin"))
}

/// Where a test's containerd lives: its scratch directory (short, for sockets) with the
/// shared guest artifacts linked at `state/guest`, and containerd's binaries.
pub struct Prepared {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
}

/// The scratch directory (named `prefix...` under /tmp, with `subdirs` made) once the
/// prerequisites hold; `None` after printing why the test skips.
pub fn prepare(prefix: &str, subdirs: &[&str]) -> Option<Prepared> {
    let skip = |why: &str| {
        eprintln!("skipping: {why}");
        None
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("containerd needs root");
    }
    let Some(shared) = std::env::var_os("GPUCELL_TEST_STATE_DIR").map(PathBuf::from) else {
        return skip("GPUCELL_TEST_STATE_DIR is not set (make test-shim sets it after `gpucell guest build`)");
    };
    let guest = shared.join("guest");
    if !guest.join("default/manifest.json").is_file() {
        return skip(&format!("no guest artifacts in {}", guest.display()));
    }
    if !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        return skip("qemu-system-x86_64 is not installed");
    }
    let bin = match containerd_bin() {
        Ok(b) => b,
        Err(e) => return skip(&e),
    };
    // Short path: the sockets under it must stay below 108 bytes.
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .ok()?;
    for d in std::iter::once(&"state").chain(subdirs) {
        std::fs::create_dir_all(dir.path().join(d)).ok()?;
    }
    std::os::unix::fs::symlink(&guest, dir.path().join("state/guest")).ok()?;
    Some(Prepared { dir, bin })
}

/// Pids of processes whose command line contains both `needle` and `name`.
pub fn processes_mentioning(needle: &str, name: &str) -> Vec<u32> {
    gpucell_host::testing::processes_with(&[name, needle])
}

/// The demo image (umoci, busybox) as an OCI archive `<dir>/image.tar` whose manifest is
/// named `name` for containerd (`ctr images import` takes it offline); `None`, with the
/// reason printed, when the image cannot be made here.
pub fn demo_image_archive(dir: &Path, name: &str) -> Option<PathBuf> {
    let layout = dir.join("oci");
    let out = Command::new(repo_root().join("scripts/make-demo-image.sh"))
        .arg(&layout)
        .arg("demo")
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "skipping: scripts/make-demo-image.sh failed (needs umoci and busybox-static): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let index = layout.join("index.json");
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    for m in j["manifests"].as_array_mut().unwrap() {
        m["annotations"]["io.containerd.image.name"] = name.into();
    }
    std::fs::write(&index, serde_json::to_vec(&j).unwrap()).unwrap();
    let tar = dir.join("image.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(ok.success());
    Some(tar)
}
