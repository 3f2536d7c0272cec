//! Driver injection into the container, forced in a GPU-less TCG guest of the `nvidia-550`
//! flavour: the driver disk is mounted without any GPU, and the workload of a glibc image
//! (tests/gpu/make-root.sh: busybox, the machine's ldconfig and glibc) sees `libcuda.so.1`
//! through its own ldcache and `nvidia-smi` on its PATH. The toolkit's contract holds:
//! `NVIDIA_VISIBLE_DEVICES=none` injects the driver without GPU device nodes, `void`
//! injects nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{stderr, stdout, VmEnv};

const FLAVOUR: &str = "nvidia-550";

/// What the workload prints: the ldcache's libcuda line, nvidia-smi's path, the
/// `/dev/nvidia*` names.
const PROBE: &str = "ldconfig -p | grep libcuda.so.1; \
                     echo \"smi=$(command -v nvidia-smi)\"; \
                     echo \"dev=$(ls /dev | grep '^nvidia' | tr '\\n' ' ')\"";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn check(what: &str, c: &mut Command) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The glibc root of tests/gpu/make-root.sh packed by umoci into `env`'s layout, tagged
/// `glibc`; its reference.
fn glibc_image(env: &VmEnv) -> String {
    let layout = env.image_dir.to_str().unwrap();
    let image = format!("{layout}:glibc");
    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("bundle");
    check(
        "umoci new",
        Command::new("umoci").args(["new", "--image", &image]),
    );
    check(
        "umoci unpack",
        Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle),
    );
    check(
        "make-root.sh",
        Command::new(repo_root().join("tests/gpu/make-root.sh"))
            .arg(bundle.join("rootfs"))
            .arg("/bin/busybox"),
    );
    check(
        "umoci repack",
        Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle),
    );
    check(
        "umoci config",
        Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--config.env",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        ]),
    );
    format!("oci:{image}")
}

/// The test's environment, or `None` (reason printed) without the flavour's artifacts.
fn inject_env() -> Option<VmEnv> {
    let env = common::vm_env()?;
    let manifest = env
        .state
        .path()
        .join("guest")
        .join(FLAVOUR)
        .join("manifest.json");
    if !manifest.is_file() {
        eprintln!(
            "skipping: no {FLAVOUR} flavour in the test state dir; run `gpucell --state-dir \
             $PWD/target/test-state guest build --flavour {FLAVOUR} --agent ...`"
        );
        return None;
    }
    Some(env)
}

const FORCE: &str = "--force-driver-injection";

/// The workload's output for a run of `image` on the flavour with `extra` flags.
fn probe(env: &VmEnv, image: &str, extra: &[&str]) -> String {
    let mut args = vec!["--guest", FLAVOUR];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[image, "--", "sh", "-c", PROBE]);
    let out = env.run(&args);
    assert!(
        out.status.success(),
        "run {args:?}: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn libcuda_line(out: &str) -> Option<&str> {
    out.lines()
        .find(|l| l.contains("libcuda.so.1") && l.contains("=>"))
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no `{key}` line in:\n{out}"))
        .trim()
}

#[test]
fn forced_injection_gives_libcuda_and_nvidia_smi_and_void_gives_nothing() {
    let Some(env) = inject_env() else { return };
    let image = glibc_image(&env);

    let all = probe(&env, &image, &[FORCE]);
    let line =
        libcuda_line(&all).unwrap_or_else(|| panic!("libcuda.so.1 not in the ldcache:\n{all}"));
    assert!(
        line.contains("/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
        "libcuda.so.1 resolves outside the image's library directory: {line}"
    );
    assert_eq!(field(&all, "smi="), "/usr/bin/nvidia-smi", "{all}");
    // No GPU in this guest: no /dev/nvidiaN.
    let dev = field(&all, "dev=");
    assert!(
        !dev.split_whitespace().any(is_gpu_node),
        "GPU nodes without a GPU: {dev}"
    );

    // `none`: the driver without GPU device nodes.
    let none = probe(&env, &image, &[FORCE, "-e", "NVIDIA_VISIBLE_DEVICES=none"]);
    assert!(
        libcuda_line(&none).is_some(),
        "none injects the driver:\n{none}"
    );
    assert_eq!(field(&none, "smi="), "/usr/bin/nvidia-smi", "{none}");
    let dev = field(&none, "dev=");
    assert!(
        !dev.split_whitespace().any(is_gpu_node),
        "none gave GPU nodes: {dev}"
    );

    // `void`: nothing at all.
    let void = probe(&env, &image, &[FORCE, "-e", "NVIDIA_VISIBLE_DEVICES=void"]);
    assert!(
        libcuda_line(&void).is_none(),
        "void injected libcuda:\n{void}"
    );
    assert_eq!(
        field(&void, "smi="),
        "",
        "void injected nvidia-smi:\n{void}"
    );
    assert_eq!(field(&void, "dev="), "", "void gave device nodes:\n{void}");

    // Unforced, an image without NVIDIA variables and a run without GPUs get nothing.
    let plain = probe(&env, &image, &[]);
    assert!(
        libcuda_line(&plain).is_none(),
        "unforced run injected libcuda:\n{plain}"
    );
    assert_eq!(
        field(&plain, "smi="),
        "",
        "unforced run injected nvidia-smi:\n{plain}"
    );
}

/// `nvidia0`, `nvidia1`, ...: a GPU's node (not `nvidiactl` or `nvidia-uvm`).
fn is_gpu_node(name: &str) -> bool {
    name.strip_prefix("nvidia")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}
