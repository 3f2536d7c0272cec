//! Shared helpers of the `gpucell run` VM tests: a private state dir per test that
//! borrows the guest artifacts built by `gpucell guest build` in
//! `GPUCELL_TEST_STATE_DIR`, a demo image built with umoci inside it, and checks that a
//! run left nothing behind.
#![allow(dead_code)]

pub mod fakehost;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct VmEnv {
    pub state: tempfile::TempDir,
    pub image: String,
    pub image_dir: PathBuf,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the demo image (busybox, umoci: well under a second) into `dir`; `None` with
/// a printed reason.
fn demo_image(dir: &Path) -> Option<PathBuf> {
    let layout = dir.join("oci");
    let out = Command::new(repo_root().join("scripts/make-demo-image.sh"))
        .arg(&layout)
        .arg("demo")
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "skipping: scripts/make-demo-image.sh failed (needs umoci and busybox-static): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(layout)
}

/// A private state dir whose `guest/` is the prepared one; `None` (with the reason
/// printed) when the guest artifacts or the image tools are missing.
pub fn vm_env() -> Option<VmEnv> {
    let Some(shared) = std::env::var_os("GPUCELL_TEST_STATE_DIR").map(PathBuf::from) else {
        eprintln!("skipping: GPUCELL_TEST_STATE_DIR is not set (make test sets it after `gpucell guest build`)");
        return None;
    };
    let guest = shared.join("guest");
    if !guest
        .join(gpucell_guest::DEFAULT_FLAVOUR)
        .join("manifest.json")
        .is_file()
    {
        eprintln!(
            "skipping: no guest artifacts in {}; run `gpucell --state-dir {} guest build`",
            guest.display(),
            shared.display()
        );
        return None;
    }
    if !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        eprintln!("skipping: qemu-system-x86_64 is not installed");
        return None;
    }
    // Short path: unix socket paths under it must stay below 108 bytes.
    let state = tempfile::Builder::new()
        .prefix("gc")
        .tempdir_in("/tmp")
        .ok()?;
    let image_dir = demo_image(state.path())?;
    std::os::unix::fs::symlink(&guest, state.path().join("guest")).ok()?;
    Some(VmEnv {
        image: format!("oci:{}:demo", image_dir.display()),
        image_dir,
        state,
    })
}

impl VmEnv {
    /// `gpucell --state-dir <private> run ARGS...` (TCG unless GPUCELL_ACCEL says otherwise).
    pub fn run_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpucell"));
        c.arg("--state-dir").arg(self.state.path()).arg("run");
        c.args(args);
        if std::env::var_os("GPUCELL_ACCEL").is_none() {
            c.env("GPUCELL_ACCEL", "tcg");
        }
        // Tests never set up networks in the machine's own namespace: a private
        // network (the built-in default) is tested in namespaces of its own (run_net.rs).
        if std::env::var_os("GPUCELL_NETWORK").is_none() {
            c.env("GPUCELL_NETWORK", "none");
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let out = self
            .run_cmd(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run gpucell");
        self.assert_clean();
        out
    }

    /// No run directory and no QEMU of this state dir remain.
    pub fn assert_clean(&self) {
        let run = self.state.path().join("run");
        let left: Vec<_> = std::fs::read_dir(&run)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "run directories left behind: {left:?}");
        let needle = self.state.path().to_string_lossy().to_string();
        let procs = qemu_processes_mentioning(&needle);
        assert!(procs.is_empty(), "QEMU processes left behind: {procs:?}");
    }
}

/// Pids of qemu processes whose command line contains `needle`.
pub fn qemu_processes_mentioning(needle: &str) -> Vec<u32> {
    gpucell_host::testing::processes_with(&["qemu-system", needle])
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `--json` summary: the last top-level JSON object on stderr.
pub fn summary(o: &Output) -> serde_json::Value {
    let err = stderr(o);
    let start = err
        .rfind("\n{")
        .map(|i| i + 1)
        .or_else(|| err.starts_with('{').then_some(0));
    let text = &err[start.unwrap_or_else(|| panic!("no JSON summary on stderr: {err}"))..];
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON summary ({e}): {text}"))
}

/// Sends a signal with kill(1) (this crate has no libc binding of its own).
pub fn kill(signal: &str, pid: u32) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{signal} {pid} failed");
}
