//! The nested test host harness (tests/nested/).
//!
//! The result summarizer is tested here on crafted result channels (fast, no
//! VM). The whole nested run boots VMs for about a minute or more, so it runs
//! only with `GPUCELL_NESTED=1` (`make test-nested` runs it directly).

use std::path::{Path, PathBuf};
use std::process::Command;

fn nested_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/nested")
}

struct Summary {
    code: Option<i32>,
    stdout: String,
}

fn summarize(results: &str, extra: &[&str]) -> Summary {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("results.log");
    std::fs::write(&path, results).expect("write results");
    let out = Command::new(nested_dir().join("summarize.sh"))
        .arg("--results")
        .arg(&path)
        .args(extra)
        .output()
        .expect("run summarize.sh");
    Summary {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// Asserts that the summary contains `needle`, showing the summary otherwise.
fn assert_has(stdout: &str, needle: &str) {
    assert!(stdout.contains(needle), "expected {needle:?} in:\n{stdout}");
}

const BOOT: &str = "NESTED-BOOT uptime=6.50 kernel=6.1.0-56-amd64\n";
const DONE: &str = "NESTED-DONE uptime=40.00\n";

#[test]
fn all_passed_exits_zero_and_counts() {
    let r = format!(
        "{BOOT}NESTED-SCENARIO name=10-host uptime=7.00\n\
         NESTED-RESULT name=10-host/iommu ok=1 detail=dmar0 with 5 IOMMU groups\n\
         NESTED-SCENARIO name=30-edu uptime=9.50\n\
         NESTED-RESULT name=30-edu/bind ok=1 detail=bound\n{DONE}"
    );
    let s = summarize(&r, &[]);
    assert_eq!(s.code, Some(0), "{}", s.stdout);
    assert_has(&s.stdout, "2 passed, 0 failed, 0 skipped");
    assert_has(&s.stdout, "PASS 10-host/iommu");
    // Scenario durations come from the L1 uptimes of consecutive markers.
    assert_has(&s.stdout, "10-host 2.5s, 30-edu 30.5s");
}

#[test]
fn a_failed_check_fails_the_run() {
    let r = format!(
        "{BOOT}NESTED-RESULT name=a/x ok=1 detail=fine\n\
         NESTED-RESULT name=a/y ok=0 detail=driver is none, expected vfio-pci\n{DONE}"
    );
    let s = summarize(&r, &[]);
    assert_eq!(s.code, Some(1), "{}", s.stdout);
    assert_has(&s.stdout, "FAIL a/y");
    assert_has(&s.stdout, "driver is none, expected vfio-pci");
    assert_has(&s.stdout, "1 passed, 1 failed, 0 skipped");
}

#[test]
fn missing_done_marker_fails() {
    let r = format!("{BOOT}NESTED-RESULT name=a/x ok=1 detail=fine\n");
    let s = summarize(&r, &[]);
    assert_eq!(s.code, Some(1), "{}", s.stdout);
    assert_has(&s.stdout, "FAIL harness/done");
}

#[test]
fn no_boot_and_no_results_fail() {
    let s = summarize("garbage\n", &["--qemu-status", "1"]);
    assert_eq!(s.code, Some(1), "{}", s.stdout);
    assert_has(&s.stdout, "FAIL harness/qemu");
    assert_has(&s.stdout, "FAIL harness/boot");
    assert_has(&s.stdout, "0 passed, 2 failed");
}

#[test]
fn timeout_is_a_failure_even_with_passes() {
    let r = format!("{BOOT}NESTED-RESULT name=a/x ok=1 detail=fine\n");
    let s = summarize(&r, &["--qemu-status", "timeout", "--timeout", "600"]);
    assert_eq!(s.code, Some(1), "{}", s.stdout);
    assert_has(&s.stdout, "L1 still running after 600s");
    assert!(!s.stdout.contains("harness/done"), "{}", s.stdout);
}

#[test]
fn skips_pass_unless_strict() {
    let r = format!(
        "{BOOT}NESTED-RESULT name=a/x ok=1 detail=fine\n\
         NESTED-RESULT name=a/doctor ok=skip detail=not built yet\n{DONE}"
    );
    let lax = summarize(&r, &[]);
    assert_eq!(lax.code, Some(0), "{}", lax.stdout);
    assert_has(&lax.stdout, "1 passed, 0 failed, 1 skipped");
    let strict = summarize(&r, &["--strict", "1"]);
    assert_eq!(strict.code, Some(1), "{}", strict.stdout);
}

#[test]
fn only_skips_is_not_a_pass() {
    let r = format!("{BOOT}NESTED-RESULT name=a/x ok=skip detail=nothing to do\n{DONE}");
    assert_eq!(summarize(&r, &[]).code, Some(1));
}

#[test]
fn serial_line_endings_noise_and_tricky_details() {
    // The serial port adds \r; kernel noise and partial lines are ignored; a
    // detail that itself contains "ok=0" must not change the verdict.
    let r = format!(
        "[   26.1] kvm: Unhandled WRMSR\r\n{BOOT}\
         NESTED-RESULT name=a/x ok=1 detail=qemu said ok=0 earlier, retried\r\n\
         NESTED-RESULT ok=1 detail=no name\r\n\
         NESTED-RESULT name=a/y ok=weird detail=\r\n{DONE}"
    );
    let s = summarize(&r, &[]);
    assert_has(&s.stdout, "PASS a/x");
    assert_has(&s.stdout, "retried\n");
    assert_has(&s.stdout, "FAIL harness/result");
    assert_has(&s.stdout, "FAIL a/y");
    assert_eq!(s.code, Some(1), "{}", s.stdout);
}

#[test]
fn unknown_argument_is_a_usage_error() {
    let out = Command::new(nested_dir().join("summarize.sh"))
        .args(["--results", "/dev/null", "--bogus", "x"])
        .output()
        .expect("run summarize.sh");
    assert_eq!(out.status.code(), Some(2));
}

/// The whole nested run: builds the L1 images (cached) and boots them. Uses
/// the gpucell binary cargo built for this test, so no nested cargo build.
#[test]
fn nested_host_full_run() {
    if std::env::var_os("GPUCELL_NESTED").is_none() {
        eprintln!(
            "skipping nested_host_full_run: set GPUCELL_NESTED=1 (boots VMs for a minute or more)"
        );
        return;
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_gpucell"));
    let bin_dir = bin.parent().expect("binary has a parent directory");
    let status = Command::new(nested_dir().join("run.sh"))
        .env("NESTED_GPUCELL_BIN_DIR", bin_dir)
        .env("NESTED_QUIET", "1")
        .status()
        .expect("run tests/nested/run.sh");
    assert!(status.success(), "tests/nested/run.sh failed: {status}");
}
