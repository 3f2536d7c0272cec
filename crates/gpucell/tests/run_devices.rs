//! `gpucell run --gpus/--device`: the device part of a run, without a VM.
//!
//! - On this machine (no IOMMU, no VFIO) `--device` fails with the reason before any
//!   VM starts and leaves nothing behind.
//! - On a small fake host (an RTX 4090 and its HDMI audio, both on vfio-pci, one IOMMU
//!   group): a run whose image does not exist fails before any device is taken; a run
//!   whose VM cannot start gets the GPU, lists only the GPU as passed, and releases it
//!   (reset + check).
//!
//! Booting a VM with a passed device needs VFIO: the nested test host does that
//! (tests/nested, scenarios 40-43).
#![allow(clippy::unwrap_used)]

mod common;

use common::fakehost::fake_4090_host;

use std::path::Path;
use std::process::{Command, Output};

fn gpucell(host_root: Option<&Path>, state: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpucell"));
    if let Some(r) = host_root {
        cmd.arg("--host-root").arg(r);
    }
    cmd.arg("--state-dir")
        .arg(state)
        .arg("--json")
        .args(args)
        .env_remove("GPUCELL_HOST_ROOT")
        .env_remove("GPUCELL_ACCEL")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `--json` summary: the last JSON object on stderr.
fn summary(o: &Output) -> serde_json::Value {
    let err = stderr(o);
    let start = err
        .rfind("\n{")
        .map(|i| i + 1)
        .or_else(|| err.find('{'))
        .unwrap();
    serde_json::from_str(&err[start..]).unwrap_or_else(|e| panic!("{e}: {err}"))
}

/// Allocation records left under `state` (none when the file does not exist).
fn allocations(state: &Path) -> usize {
    match std::fs::read_to_string(state.join("devices/allocations.json")) {
        Ok(t) => {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            v["allocations"].as_array().map_or(0, Vec::len)
        }
        Err(_) => 0,
    }
}

fn run_dirs(state: &Path) -> usize {
    std::fs::read_dir(state.join("run")).map_or(0, |d| d.count())
}

fn host_has_iommu_groups() -> bool {
    std::fs::read_dir("/sys/kernel/iommu_groups").is_ok_and(|mut d| d.next().is_some())
}

#[test]
fn device_on_a_host_without_vfio_fails_cleanly() {
    if host_has_iommu_groups() {
        eprintln!("skipping: this host has IOMMU groups; the test must not bind a real device");
        return;
    }
    let Some(bdf) = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
    else {
        eprintln!("skipping: no PCI function on this host");
        return;
    };
    // The image and guest exist: the run gets as far as the devices, then stops.
    let Some(env) = common::vm_env() else { return };
    let out = env
        .run_cmd(&["--json", "--device", &bdf, &env.image, "--", "true"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    env.assert_clean();
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("{bdf} is not viable")), "{err}");
    assert!(err.contains("no IOMMU group"), "{err}");
    let s = summary(&out);
    assert!(
        s["error"].as_str().unwrap().contains("no IOMMU group"),
        "{s}"
    );
    assert!(s.get("passthrough").is_none(), "{s}");
    // The image was ready before the devices were asked for.
    assert!(s["image"]["digest"].is_string(), "{s}");
    // Nothing allocated, no VM, no run directory.
    assert_eq!(allocations(env.state.path()), 0);
    assert_eq!(run_dirs(env.state.path()), 0);
    assert!(s.get("channel").is_none(), "{s}");
}

#[test]
fn pin_cpus_without_devices_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let out = gpucell(
        None,
        state.path(),
        &["run", "--pin-cpus", "oci:/nonexistent"],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("add --gpus or --device"),
        "{}",
        stderr(&out)
    );
    let out = gpucell(
        None,
        state.path(),
        &["run", "--gpus", "0x", "oci:/nonexistent"],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("0x"), "{}", stderr(&out));
}

fn assert_gpu_released(s: &serde_json::Value, state: &Path) {
    let passed = s["passthrough"].as_array().unwrap_or_else(|| panic!("{s}"));
    assert_eq!(passed.len(), 1, "{s}");
    assert_eq!(passed[0]["host_bdf"], "0000:01:00.0");
    assert_eq!(passed[0]["id"], "10de:2684");
    assert_eq!(passed[0]["companions"], serde_json::json!(["0000:01:00.1"]));
    let returned = s["devices_release"]["returned"]
        .as_array()
        .unwrap_or_else(|| panic!("{s}"));
    assert!(returned.iter().any(|r| r[0] == "0000:01:00.0"), "{s}");
    assert_eq!(
        s["devices_release"]["quarantined"],
        serde_json::json!([]),
        "{s}"
    );
    assert_eq!(allocations(state), 0, "{s}");
    assert_eq!(run_dirs(state), 0);
    assert!(s["devices_ms"]["allocate"].is_u64(), "{s}");
    assert!(s["devices_ms"]["release"].is_u64(), "{s}");
    assert!(s["devices_ms"]["bind"].is_u64(), "{s}");
}

#[test]
fn a_missing_image_fails_before_any_device_is_taken() {
    let host = tempfile::tempdir().unwrap();
    let root = host.path();
    fake_4090_host(root);

    let state = tempfile::tempdir().unwrap();
    let out = gpucell(
        Some(root),
        state.path(),
        &["run", "--gpus", "all", "oci:/nonexistent", "--", "true"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{err}");
    let s = summary(&out);
    assert!(s["error"].as_str().unwrap().contains("nonexistent"), "{s}");
    // The GPU was never taken: no passthrough, no record, no reset.
    assert!(s.get("passthrough").is_none(), "{s}");
    assert!(s.get("devices_ms").is_none(), "{s}");
    assert_eq!(allocations(state.path()), 0);
    assert!(!state.path().join("devices").exists(), "{s}");
    let reset =
        std::fs::read_to_string(root.join("sys/devices/pci0000:01/0000:01:00.0/reset")).unwrap();
    assert_ne!(
        reset.trim(),
        "1",
        "the GPU was reset although it was never taken"
    );
}

/// The whole run with a real QEMU and guest: the allocation (on the fake host) succeeds,
/// then the VM cannot start (QEMU refuses the function: this machine has no VFIO; or the
/// locked-memory limit cannot be raised here), the run fails with the reason, and the
/// GPU is released; no QEMU or run directory is left.
#[test]
fn qemu_refusing_the_device_ends_the_run_and_releases_it() {
    if host_has_iommu_groups() {
        // QEMU opens the real /sys for vfio-pci: never point it at a real device.
        eprintln!("skipping: this host has IOMMU groups; QEMU must not open a real device");
        return;
    }
    let Some(env) = common::vm_env() else { return };
    let host = tempfile::tempdir().unwrap();
    fake_4090_host(host.path());
    let host_root = host.path().to_str().unwrap();
    let out = env
        .run_cmd(&[
            "--host-root",
            host_root,
            "--json",
            "--gpus",
            "all",
            &env.image,
            "--",
            "true",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    env.assert_clean();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{err}");
    let s = summary(&out);
    let msg = s["error"].as_str().unwrap();
    // QEMU refuses the function (no VFIO here), or, where gpucell may not raise the
    // locked-memory limit VFIO needs, the run stops before starting QEMU, saying so.
    assert!(
        (msg.contains("QEMU") && msg.contains("vfio")) || msg.contains("LimitMEMLOCK"),
        "{msg}"
    );
    eprintln!("run failed as expected: {msg}");
    assert_gpu_released(&s, env.state.path());
    // The reset went to the fake tree's file, as the kernel would get it.
    let reset = std::fs::read_to_string(
        host.path()
            .join("sys/devices/pci0000:01/0000:01:00.0/reset"),
    )
    .unwrap();
    assert_eq!(reset.trim(), "1");
}
