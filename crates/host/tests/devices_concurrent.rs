//! Concurrent allocation from threads (each with its own pool handle and lock file
//! descriptor) and from separate processes (this test binary run again as children).
#![allow(clippy::unwrap_used)]

mod devices_common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use devices_common::*;
use gpucell_host::devices::{self, DevicePool, DevicesError};
use gpucell_host::testing::FakeHost;
use gpucell_host::HostRoot;

const ENV_ROOT: &str = "GPUCELL_TEST_DEVICES_ROOT";
const ENV_STATE: &str = "GPUCELL_TEST_DEVICES_STATE";
const ENV_GO: &str = "GPUCELL_TEST_DEVICES_GO";
const ENV_ID: &str = "GPUCELL_TEST_DEVICES_ID";

#[test]
fn threads_with_separate_handles_get_distinct_devices() {
    let host = h100_host(&[(0x10, 0), (0x11, 0), (0x12, 1), (0x13, 1)]);
    let state = tempfile::tempdir().unwrap();
    let threads = 8;
    let start = Arc::new(Barrier::new(threads));
    let hold = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (start, hold) = (start.clone(), hold.clone());
            let pool = pool(&host, state.path());
            let kernel = Kernel::new(&host);
            std::thread::spawn(move || {
                start.wait();
                let r = pool.allocate(&format!("t{i}"), &req(Some("1"), &[]), kernel.boxed());
                let out = match &r {
                    Ok(a) => Ok(a.bdfs()),
                    Err(DevicesError::Unavailable { .. }) => Err(()),
                    Err(e) => panic!("thread {i}: {e}"),
                };
                // Hold until every thread has tried, then release.
                hold.wait();
                drop(r);
                out
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut got: Vec<_> = results.iter().flatten().flatten().copied().collect();
    assert_eq!(got.len(), 4, "{results:?}");
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 4, "a device was given twice: {results:?}");
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 4);
    assert!(devices::allocations(state.path()).unwrap().is_empty());
}

/// Run by `processes_get_distinct_devices_and_crashed_ones_are_reclaimed` as a child:
/// allocates one GPU, prints it, waits for the go file, exits without releasing.
#[test]
#[ignore = "helper run as a child process by processes_get_distinct_devices_and_crashed_ones_are_reclaimed"]
fn child_allocates_one_gpu() {
    let (Some(root), Some(state), Some(go), Some(id)) = (
        std::env::var_os(ENV_ROOT),
        std::env::var_os(ENV_STATE),
        std::env::var_os(ENV_GO),
        std::env::var(ENV_ID).ok(),
    ) else {
        eprintln!("skipped: only meaningful as a child of the process test");
        return;
    };
    let host = FakeHost::at(PathBuf::from(root)).unwrap();
    let pool =
        DevicePool::new(host.root(), PathBuf::from(state)).with_process_root(HostRoot::new("/"));
    let kernel = Kernel::new(&host);
    match pool.allocate(&id, &req(Some("1"), &[]), kernel.boxed()) {
        Ok(a) => {
            println!("\n@@ GOT {}", a.bdfs()[0]);
            std::mem::forget(a);
        }
        Err(DevicesError::Unavailable { .. }) => println!("\n@@ REFUSED"),
        Err(e) => println!("\n@@ ERROR {e}"),
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !PathBuf::from(&go).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Exit without running destructors: a crash as far as the records are concerned.
    std::process::exit(0);
}

#[test]
fn processes_get_distinct_devices_and_crashed_ones_are_reclaimed() {
    let host = h100_host(&[(0x10, 0), (0x11, 0), (0x12, 1), (0x13, 1)]);
    let state = tempfile::tempdir().unwrap();
    let go = state.path().join("go");
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..6)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "child_allocates_one_gpu",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ENV_ROOT, host.path())
                .env(ENV_STATE, state.path())
                .env(ENV_GO, &go)
                .env(ENV_ID, format!("p{i}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut lines = Vec::new();
    for c in &mut children {
        let mut out = BufReader::new(c.stdout.take().unwrap());
        // The harness prints its own lines; ours start with `@@ `.
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if let Some(l) = line.trim().strip_prefix("@@ ") {
                lines.push(l.to_owned());
                break;
            }
        }
    }
    std::fs::write(&go, "").unwrap();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    assert!(!lines.iter().any(|l| l.starts_with("ERROR")), "{lines:?}");
    let mut got: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("GOT "))
        .collect();
    assert_eq!(got.len(), 4, "{lines:?}");
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 4, "a device was given twice: {lines:?}");
    assert_eq!(lines.iter().filter(|l| *l == "REFUSED").count(), 2);
    // Every child exited without releasing: the next allocation resets and reuses all four.
    assert_eq!(devices::allocations(state.path()).unwrap().len(), 4);
    let kernel = Kernel::new(&host);
    let all = pool(&host, state.path())
        .allocate("after", &req(Some("4"), &[]), kernel.boxed())
        .unwrap();
    assert_eq!(all.bdfs().len(), 4);
    let mut log = kernel.log();
    log.sort();
    let want: Vec<_> = [
        "0000:10:00.0",
        "0000:11:00.0",
        "0000:12:00.0",
        "0000:13:00.0",
    ]
    .iter()
    .map(|b| reset_write(b))
    .collect();
    assert_eq!(log, want);
}
