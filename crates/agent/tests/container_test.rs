//! `gpucell-agent container-test` as root on a machine without a GPU: a busybox root from
//! a directory under the agent's overlay, a fake driver root (gcc-built `libcuda` and
//! `libnvidia-ml` with their SONAMEs, a shell `nvidia-smi`), fake device nodes and a fake
//! `/proc/driver/nvidia/gpus` in a temp dir. The real CUDA probe (`tests/gpu/cuda/cuprobe.c`)
//! runs in the container against the fake libcuda. Skipped with a reason without root, gcc,
//! busybox-static or ldconfig.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const AGENT: &str = env!("CARGO_BIN_EXE_gpucell-agent");
const V: &str = "580.159.04";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (namespaces, mounts, device nodes)".into());
    }
    for (tool, path) in [
        ("busybox-static", "/bin/busybox"),
        ("ldconfig", "/sbin/ldconfig"),
    ] {
        if !Path::new(path).is_file() {
            return Some(format!("{tool} ({path}) is missing"));
        }
    }
    let gcc = Command::new("gcc").arg("--version").output();
    if !gcc.is_ok_and(|o| o.status.success()) {
        return Some("gcc is missing (it builds the fake driver and the probe)".into());
    }
    None
}

fn gcc(args: &[&str], out: &Path) {
    let o = Command::new("gcc")
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn mknod(p: &Path, major: u64, minor: u64) {
    use nix::sys::stat::{makedev, Mode, SFlag};
    nix::sys::stat::mknod(
        p,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(major, minor),
    )
    .unwrap();
}

/// The fake machine under `base`: driver root, `/dev`, `/proc/driver/nvidia/gpus`, and the
/// workload root.
fn machine(base: &Path) {
    let fake = repo().join("tests/gpu/fake");
    let lib = base.join("driver/lib64");
    fs::create_dir_all(&lib).unwrap();
    fs::create_dir_all(base.join("driver/bin")).unwrap();
    let libcuda = fake.join("libcuda.c");
    gcc(
        &[
            "-shared",
            "-fPIC",
            "-Wl,-soname,libcuda.so.1",
            libcuda.to_str().unwrap(),
        ],
        &lib.join(format!("libcuda.so.{V}")),
    );
    let ml = base.join("ml.c");
    fs::write(&ml, "int nvmlInit_v2(void) { return 0; }\n").unwrap();
    gcc(
        &[
            "-shared",
            "-fPIC",
            "-Wl,-soname,libnvidia-ml.so.1",
            ml.to_str().unwrap(),
        ],
        &lib.join(format!("libnvidia-ml.so.{V}")),
    );
    fs::copy(fake.join("nvidia-smi"), base.join("driver/bin/nvidia-smi")).unwrap();
    let dev = base.join("dev");
    fs::create_dir_all(&dev).unwrap();
    mknod(&dev.join("nvidiactl"), 195, 255);
    mknod(&dev.join("nvidia0"), 195, 0);
    mknod(&dev.join("nvidia-uvm"), 235, 0);
    let info = base.join("gpus/0000:00:06.0");
    fs::create_dir_all(&info).unwrap();
    fs::write(
        info.join("information"),
        "Model: \t\t NVIDIA H200\nGPU UUID: \t GPU-3a9b1c2d-0e4f-5a6b-7c8d-9e0f1a2b3c4d\n\
         Device Minor: \t 0\n",
    )
    .unwrap();
    fs::write(
        base.join("params"),
        "ModifyDeviceFiles: 1\nDeviceFileMode: 438\n",
    )
    .unwrap();
    let probe = base.join("cuprobe");
    let src = repo().join("tests/gpu/cuda/cuprobe.c");
    gcc(&["-O2", src.to_str().unwrap(), "-ldl"], &probe);
    let o = Command::new(repo().join("tests/gpu/make-root.sh"))
        .arg(base.join("root"))
        .arg("/bin/busybox")
        .arg(&probe)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    summary: serde_json::Value,
}

fn container_test(base: &Path, env: &[&str], cmd: &str) -> Run {
    container_test_with(base, env, cmd, &[])
}

fn container_test_with(base: &Path, env: &[&str], cmd: &str, extra: &[&str]) -> Run {
    let mut c = Command::new(AGENT);
    c.arg("container-test")
        .arg("--rootfs")
        .arg(base.join("root"))
        .arg("--driver-root")
        .arg(base.join("driver"))
        .arg("--dev")
        .arg(base.join("dev"))
        .arg("--proc-gpus")
        .arg(base.join("gpus"))
        .arg("--params")
        .arg(base.join("params"))
        .arg("--work")
        .arg(base.join("work"))
        .args(["--cuda-probe", "/usr/bin/cuprobe", "--"]);
    for e in env {
        c.args(["--env", e]);
    }
    c.args(extra);
    let o = c.args(["--", "/bin/sh", "-c", cmd]).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with("{\"container_test\""))
        .unwrap_or_else(|| panic!("no summary line in {stdout}"));
    let summary: serde_json::Value = serde_json::from_str(line).unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout,
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        summary: summary["container_test"].clone(),
    }
}

const SHOW: &str = "ls -l /dev/nvidia* 2>&1; nvidia-smi -L; cuprobe; \
    cat /etc/ld.so.conf.d/00-gpucell-nvidia.conf; ldconfig -p | grep libcuda; \
    cat /proc/driver/nvidia/params 2>&1; echo marker-ran";

fn cases(base: &Path) {
    machine(base);
    // All GPUs: nodes, libraries through the image's ldcache, nvidia-smi, the probe.
    let r = container_test(base, &["NVIDIA_VISIBLE_DEVICES=all"], SHOW);
    eprintln!("--- all ---\n{}{}", r.stderr, r.stdout);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("crw-rw-rw-"), "{}", r.stdout);
    assert!(r.stdout.contains("195,   0 ") && r.stdout.contains("/dev/nvidia0"));
    assert!(r.stdout.contains("GPU 0: NVIDIA H200 (fake)"));
    assert!(r.stdout.contains("gpu=9.0 NVIDIA H200 (fake)"));
    assert!(r
        .stdout
        .contains("libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1"));
    let s = &r.summary;
    assert_eq!(s["injected"], true);
    assert_eq!(s["overlay"], true);
    assert_eq!(s["driver_version"], V);
    assert_eq!(s["cuda_version"], "13.0");
    assert_eq!(s["libraries"], 2);
    assert_eq!(s["ldconfig"], "/sbin/ldconfig");
    assert_eq!(s["gpus"][0]["arch"], "9.0");
    assert!(s["inject_ms"].as_f64().unwrap() > 0.0);
    // The image directory is untouched: everything went to the overlay.
    assert!(!base
        .join("root/usr/lib/x86_64-linux-gnu/libcuda.so.1")
        .exists());
    assert!(!base.join("root/etc/ld.so.conf.d").exists());

    // none: the driver, no GPU node; CUDA finds no device.
    let r = container_test(base, &["NVIDIA_VISIBLE_DEVICES=none"], SHOW);
    eprintln!("--- none ---\n{}{}", r.stderr, r.stdout);
    assert_eq!(r.code, 0);
    assert!(!r.stdout.contains("/dev/nvidia0"), "{}", r.stdout);
    assert!(r.stdout.contains("/dev/nvidiactl"));
    assert!(r.stdout.contains("No devices were found"));
    assert!(r.stdout.contains("cu_init=100"));

    // A requirement the driver cannot meet: refused, the command never runs.
    let env = [
        "NVIDIA_VISIBLE_DEVICES=all",
        "NVIDIA_REQUIRE_CUDA=cuda>=99.0",
    ];
    let r = container_test(base, &env, SHOW);
    assert_eq!(r.code, 126, "{}{}", r.stderr, r.stdout);
    assert!(!r.stdout.contains("marker-ran"));
    let refused = r.summary["refused"].as_str().unwrap();
    assert!(
        refused.contains("unsatisfied condition: cuda>=99.0, please update your driver"),
        "{refused}"
    );

    // No NVIDIA variable and no --gpus: nothing injected.
    let r = container_test(
        base,
        &[],
        "ls /dev; ls /usr/lib/x86_64-linux-gnu; echo marker-ran",
    );
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("marker-ran") && !r.stdout.contains("nvidia"));
    assert_eq!(r.summary["injected"], false);

    // A driver that does not list its GPUs in /proc (gVisor): the /dev nodes, no UUIDs.
    let absent = base.join("absent").display().to_string();
    let r = container_test_with(
        base,
        &["NVIDIA_VISIBLE_DEVICES=0"],
        "ls /dev/nvidia0 && echo marker-ran",
        &["--proc-gpus", &absent],
    );
    assert_eq!(r.code, 0, "{}{}", r.stderr, r.stdout);
    assert!(r.stderr.contains(r#"devices ["0", "all"]"#), "{}", r.stderr);
    assert!(r.stdout.contains("marker-ran"));

    // Nothing is left behind: no mount, no work directory.
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(base.to_str().unwrap()), "{mounts}");
    assert!(!base.join("work").exists());
}

/// In a user namespace (maps written from outside, groups allowed) the kernel refuses
/// `mknod`: /dev/null and the GPU nodes are bound from the agent's side instead. `None`
/// when no user namespace can be made here.
fn in_user_namespace(base: &Path) -> Option<std::process::Output> {
    use std::io::Write;
    use std::process::Stdio;
    let agent = format!(
        "exec {AGENT} container-test --rootfs {b}/root --driver-root {b}/driver --dev {b}/dev \
         --proc-gpus {b}/gpus --params {b}/params --env NVIDIA_VISIBLE_DEVICES=all -- \
         /bin/sh -c 'ls -l /dev/null /dev/nvidia0 && grep -E \" /dev/(null|nvidia0) \" /proc/self/mountinfo'",
        b = base.display()
    );
    let mut child = Command::new("unshare")
        .args(["-U", "-m", "-n", "--", "/bin/sh", "-c"])
        .arg(format!("read go; echo in-userns; {agent}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let pid = child.id();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let maps = fs::write(format!("/proc/{pid}/uid_map"), "0 0 65536\n")
        .and_then(|_| fs::write(format!("/proc/{pid}/gid_map"), "0 0 65536\n"));
    let _ = child.stdin.take().map(|mut i| i.write_all(b"go\n"));
    let out = child.wait_with_output().ok()?;
    let entered = String::from_utf8_lossy(&out.stdout).contains("in-userns");
    (maps.is_ok() && entered).then_some(out)
}

#[test]
fn refused_mknod_binds_the_nodes_in_a_user_namespace() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP refused_mknod_binds_the_nodes_in_a_user_namespace: {why}");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    machine(base.path());
    let Some(out) = in_user_namespace(base.path()) else {
        eprintln!("SKIP refused_mknod_binds_the_nodes_in_a_user_namespace: no user namespace here");
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(stdout.contains("\"exit_code\":0"), "{stdout}");
    // Both are binds (mountinfo lists them), with the original numbers.
    assert!(stdout.contains(" /dev/null "), "{stdout}");
    assert!(stdout.contains(" /dev/nvidia0 "), "{stdout}");
    assert!(stdout.contains("195,   0"), "{stdout}");
}

#[test]
fn directory_root_with_injection_outside_a_vm() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP directory_root_with_injection_outside_a_vm: {why}");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    cases(base.path());
}
