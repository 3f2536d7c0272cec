//! `gpucell deploy`, `ps`, `logs`, `stop` against a real gpucelld (from the same target
//! directory) booting a real guest under TCG. Skips with a printed reason where gpucelld
//! is not built (`cargo build -p gpucell-daemon`) or the VM prerequisites are missing.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, stdout, vm_env};

/// Kills the daemon when the test ends, passing or not.
struct Kill(u32);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-9")
            .arg(self.0.to_string())
            .status();
    }
}

#[test]
fn deploy_ps_logs_stop() {
    let Some(env) = vm_env() else { return };
    let gpucelld = std::path::Path::new(env!("CARGO_BIN_EXE_gpucell")).with_file_name("gpucelld");
    if !gpucelld.is_file() {
        eprintln!(
            "skipping: {} is not built (cargo build -p gpucell-daemon)",
            gpucelld.display()
        );
        return;
    }
    let socket = env.state.path().join("d.sock");
    let mut daemon = Command::new(&gpucelld)
        .arg("--state-dir")
        .arg(env.state.path())
        .args(["serve", "--socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Kill(daemon.id());
    // --socket right after the verb: `deploy` takes everything after the image as the command.
    let cli = |args: &[&str]| {
        let verb = args.iter().position(|a| !a.starts_with("--")).unwrap();
        Command::new(env!("CARGO_BIN_EXE_gpucell"))
            .args(&args[..=verb])
            .arg("--socket")
            .arg(&socket)
            .args(&args[verb + 1..])
            // No network in the machine's own namespace (private ones are tested in
            // namespaces of their own, run_net.rs).
            .env("GPUCELL_NETWORK", "none")
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "gpucelld did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let out = cli(&[
        "deploy",
        "--id",
        "cli-1",
        "--accel",
        "tcg",
        "-l",
        "team=a",
        &env.image,
        "--",
        "sh",
        "-c",
        "trap 'echo bye; exit 0' TERM; echo hi; echo warn >&2; while true; do sleep 0.3; done",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "cli-1\n");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ps = stdout(&cli(&["ps"]));
        let logs = cli(&["logs", "cli-1"]);
        if ps.contains("running") && stdout(&logs) == "hi\n" {
            assert!(ps.lines().next().unwrap().starts_with("ID"), "{ps}");
            assert!(ps.contains(&env.image), "{ps}");
            assert_eq!(stderr(&logs), "warn\n");
            break;
        }
        assert!(Instant::now() < deadline, "not running: {ps}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = cli(&["logs", "-t", "-n", "1", "cli-1"]);
    let line = stdout(&out) + &stderr(&out);
    assert!(
        line.contains("Z std") && line.trim_end().ends_with(" warn"),
        "{line}"
    );
    let out = cli(&["--json", "stop", "-w", "cli-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["exit_code"].as_i64()),
        (Some("exited"), Some(0)),
        "{v}"
    );
    assert_eq!(stdout(&cli(&["logs", "-n", "1", "cli-1"])), "bye\n");
    let out = cli(&["stop", "--rm", "cli-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&["logs", "cli-1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no sandbox \"cli-1\""),
        "{}",
        stderr(&out)
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    env.assert_clean();
    // Without a daemon the error says what to check.
    let out = cli(&["ps"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is gpucelld running"),
        "{}",
        stderr(&out)
    );
}
