//! `gpucell fsck [--repair] [--json]`: findings named by file, exit codes, repair.

#![allow(clippy::unwrap_used)] // tests

use std::path::Path;
use std::process::{Command, Output};

fn fsck(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpucell"))
        .arg("--state-dir")
        .arg(state)
        .arg("fsck")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn fsck_names_damaged_files_repairs_caches_and_refuses_device_records() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let out = fsck(state, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": clean\n"));

    std::fs::create_dir_all(state.join("cache")).unwrap();
    std::fs::create_dir_all(state.join("devices")).unwrap();
    let cache = state.join("cache/accel-probe.json");
    std::fs::write(&cache, r#"{"key":"qemu 7.2","verdict":"#).unwrap();
    let alloc = state.join("devices/allocations.json");
    std::fs::write(&alloc, r#"{"version":1,"allocations":[{"bdf":"#).unwrap();

    let out = fsck(state, &["--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["repair"], false);
    assert_eq!(doc["damage_left"], true);
    let findings = doc["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 2, "{doc:#}");
    assert_eq!(findings[0]["file"], alloc.to_str().unwrap());
    assert_eq!(findings[0]["what"], "allocation record");
    assert_eq!(findings[0]["outcome"], "refused");
    assert_eq!(findings[1]["file"], cache.to_str().unwrap());
    assert_eq!(findings[1]["outcome"], "repairable");
    assert!(cache.exists());

    let out = fsck(state, &["--repair"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the allocation record is still damaged"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("repaired: cache file {}", cache.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("refused: allocation record {}", alloc.display())),
        "{text}"
    );
    assert!(text.contains("stop every sandbox"), "{text}");
    assert!(!cache.exists());
    assert!(
        alloc.exists(),
        "a damaged allocation record is never removed"
    );

    std::fs::remove_file(&alloc).unwrap();
    assert_eq!(fsck(state, &[]).status.code(), Some(0));
}

#[test]
fn fsck_of_a_missing_state_dir_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = fsck(&dir.path().join("nope"), &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope does not exist"), "{err}");
}
