//! `gpucell kata export` as a binary: a flavour that is not built is refused with the
//! command that builds it; a built one (from `GPUCELL_TEST_STATE_DIR`, which `make test`
//! fills) is exported for the captured 4 × H200 host; `gpucell device-plugin` runs the
//! plugin binary with the global host root and state dir.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gpucell(state: &Path, args: &[&str]) -> Output {
    let capture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hosts/h200x4-vm");
    Command::new(env!("CARGO_BIN_EXE_gpucell"))
        .arg("--state-dir")
        .arg(state)
        .arg("--host-root")
        .arg(capture)
        .args(args)
        .env_remove("GPUCELL_STATE_DIR")
        .env_remove("GPUCELL_HOST_ROOT")
        .output()
        .unwrap()
}

#[test]
fn unbuilt_flavour_is_refused_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = gpucell(tmp.path(), &["kata", "export", "--flavour", "nvidia-550"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gpucell guest build --flavour nvidia-550"),
        "{err}"
    );
}

#[test]
fn built_flavour_is_exported() {
    let Some(state) = std::env::var_os("GPUCELL_TEST_STATE_DIR").map(PathBuf::from) else {
        eprintln!("skipping: GPUCELL_TEST_STATE_DIR is not set (make test sets it after `gpucell guest build`)");
        return;
    };
    if !state.join("guest/default/manifest.json").is_file() {
        eprintln!("skipping: no default guest built in {}", state.display());
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    let out = gpucell(
        &state,
        &[
            "--json",
            "kata",
            "export",
            "--flavour",
            "default",
            "--out",
            out_dir.path().to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["schema"], "gpucell.kata-export/v1");
    assert_eq!(report["root_ports"], 4);
    let config = std::fs::read_to_string(report["config"].as_str().unwrap()).unwrap();
    let kernel = std::fs::canonicalize(state.join("guest/default/vmlinux")).unwrap();
    assert!(
        config.contains(&format!("kernel = \"{}\"", kernel.display()))
            || config.contains("/guest/default/vmlinux"),
        "{config}"
    );
    assert!(config.contains("cold_plug_vfio = \"root-port\""));
}

#[test]
fn device_plugin_verb_runs_the_plugin_binary() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_gpucell"));
    if !exe.with_file_name("gpucell-device-plugin").is_file() {
        eprintln!("skipping: gpucell-device-plugin is not built beside gpucell (cargo build -p gpucell-device-plugin)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = gpucell(tmp.path(), &["device-plugin", "--list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["resources"][0]["resource"], "gpucell.io/H200");
}
