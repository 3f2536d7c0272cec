//! `gpucell-device-plugin --list` on the captured 4 × H200 host: one resource, four
//! devices, all Unhealthy there because the capture (from inside a VM) has no IOMMU groups.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn lists_the_h200_capture() {
    let root =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hosts/h200x4-vm");
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpucell-device-plugin"))
        .arg("--host-root")
        .arg(&root)
        .arg("--state-dir")
        .arg(state.path())
        .arg("--list")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["schema"], "gpucell.device-plugin-list/v1");
    let res = doc["resources"].as_array().unwrap();
    assert_eq!(res.len(), 1);
    assert_eq!(res[0]["resource"], "gpucell.io/H200");
    let devs = res[0]["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 4);
    for d in devs {
        assert_eq!(d["health"], "Unhealthy");
        assert!(d["reason"].as_str().unwrap().contains("no-iommu"), "{d}");
        assert!(d["cdi_name"]
            .as_str()
            .unwrap()
            .starts_with("gpucell.io/H200=0000-00-0"));
    }
}

#[test]
fn bad_overrides_are_refused_with_the_value() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpucell-device-plugin"))
        .args(["--resource", "2335=bad/name", "--list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad/name"), "{err}");
}
