//! `gpucell run` end to end: a real QEMU (TCG here) boots the real guest kernel and
//! agent and runs commands from a busybox image built with umoci. Each test boots one
//! or two VMs; every test checks that no run directory or QEMU is left behind.
//! Skips with a printed reason without guest artifacts (GPUCELL_TEST_STATE_DIR), QEMU,
//! umoci or busybox-static.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{stderr, stdout, summary, vm_env};

#[test]
fn output_streams_exit_code_env_workdir_and_user() {
    let Some(env) = vm_env() else { return };
    let out = env.run(&[
        "-u",
        "1000",
        "-w",
        "/tmp",
        "-e",
        "FOO=bar",
        "-e",
        "DEMO=overridden",
        &env.image,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; id -u; id -g; pwd; echo $FOO $DEMO; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "out\n1000\n1000\n/tmp\nbar overridden\n");
    assert!(
        stderr(&out).starts_with("err\n") || stderr(&out).contains("\nerr\n"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn json_summary_stdin_and_image_defaults() {
    let Some(env) = vm_env() else { return };
    // No command: the image's Cmd (/bin/sh) reads its script from stdin.
    let mut child = env
        .run_cmd(&["--json", &env.image])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo from-stdin $DEMO; exit 4\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    env.assert_clean();
    assert_eq!(out.status.code(), Some(4), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "from-stdin 1\n");
    let s = summary(&out);
    assert_eq!(s["exit_code"], 4);
    assert_eq!(s["spec"]["args"], serde_json::json!(["/bin/sh"]));
    assert_eq!(s["channel"], "serial");
    assert_eq!(
        s["image"]["fstype"].as_str().map(|f| !f.is_empty()),
        Some(true)
    );
    for phase in [
        "spawn",
        "image",
        "vm_start",
        "kernel_boot",
        "agent_ready",
        "process_start",
        "total",
    ] {
        let v = s["timings_ms"][phase].as_u64();
        assert!(v.is_some(), "timings_ms.{phase} missing: {s}");
    }
    assert!(s["timings_ms"]["total"].as_u64() >= s["timings_ms"]["agent_ready"].as_u64());
    // No devices passed: no device phase.
    assert!(s["timings_ms"]["devices_visible"].is_null(), "{s}");
    let args: Vec<String> = serde_json::from_value(s["qemu_args"].clone()).unwrap();
    let joined = args.join(" ");
    assert!(
        joined.contains("-nic none") && joined.contains("readonly=on"),
        "{joined}"
    );
}

#[test]
fn entrypoint_override_and_missing_executable() {
    let Some(env) = vm_env() else { return };
    let out = env.run(&["--entrypoint", "/bin/echo", &env.image, "--", "a", "b"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "a b\n");

    let out = env.run(&[&env.image, "--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(125), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("/no/such/program"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn large_output_arrives_intact() {
    let Some(env) = vm_env() else { return };
    // seq 1..2_500_000 is 18.9 MB.
    let out = env.run(&[&env.image, "--", "seq", "1", "2500000"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let mut want = String::with_capacity(19 << 20);
    for i in 1..=2_500_000u32 {
        want.push_str(&i.to_string());
        want.push('\n');
    }
    assert_eq!(out.stdout.len(), want.len());
    assert!(
        out.stdout == want.as_bytes(),
        "stdout differs from seq's output"
    );
}

#[test]
fn the_guest_sees_no_host_files_and_no_network() {
    let Some(env) = vm_env() else { return };
    let out = env.run(&[
        &env.image, "--", "sh", "-c",
        "uname -r; hostname; ls /proc/sys/net/ipv4/conf; ls -d /work/main 2>&1 || true; cat /etc/motd",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_ne!(
        lines[1],
        host_name.trim(),
        "the guest has the host's hostname"
    );
    // Only the loopback interface (plus the "all"/"default" pseudo entries).
    let ifaces: Vec<&str> = lines[2..]
        .iter()
        .copied()
        .take_while(|l| !l.contains("/work"))
        .filter(|l| !["all", "default"].contains(l))
        .collect();
    assert_eq!(ifaces, vec!["lo"], "{text}");
    assert!(
        text.contains("No such file or directory"),
        "host /work visible: {text}"
    );
    assert!(text.contains("gpucell demo image"));
}

#[test]
fn an_image_converted_by_skopeo_runs() {
    let Some(env) = vm_env() else { return };
    let archive = env.state.path().join("demo.tar");
    let conv = std::process::Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:demo", env.image_dir.display()))
        .arg(format!("docker-archive:{}:demo:latest", archive.display()))
        .output();
    match conv {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("skipping: skopeo could not convert the demo image: {other:?}");
            return;
        }
    }
    let reference = format!("docker-archive:{}", archive.display());
    let out = env.run(&[&reference, "--", "cat", "/etc/motd"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "gpucell demo image\n");
}

#[test]
fn timeout_stops_a_hung_workload() {
    let Some(env) = vm_env() else { return };
    let start = Instant::now();
    let out = env.run(&["--timeout", "3s", &env.image, "--", "sleep", "1000"]);
    assert_eq!(out.status.code(), Some(124), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("--timeout"), "{}", stderr(&out));
    assert!(start.elapsed() < Duration::from_secs(120));
}

/// Starts `gpucell run` with a workload that prints "ready", and waits for it.
fn start_ready(
    env: &common::VmEnv,
    script: &str,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = env
        .run_cmd(&[&env.image, "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    (child, out)
}

#[test]
fn sigterm_is_forwarded_to_the_workload() {
    let Some(env) = vm_env() else { return };
    let (child, mut out) = start_ready(
        &env,
        "trap 'echo got-term; exit 42' TERM; echo ready; while true; do sleep 0.2; done",
    );
    common::kill("TERM", child.id());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let res = child.wait_with_output().unwrap();
    env.assert_clean();
    assert_eq!(res.status.code(), Some(42), "stderr: {}", stderr(&res));
    assert_eq!(rest, "got-term\n");
}

#[test]
fn qemu_killed_mid_run_is_reported_and_cleaned_up() {
    let Some(env) = vm_env() else { return };
    let (child, _out) = start_ready(&env, "echo ready; sleep 1000");
    let needle = env.state.path().to_string_lossy().to_string();
    let pids = common::qemu_processes_mentioning(&needle);
    assert_eq!(pids.len(), 1, "{pids:?}");
    common::kill("KILL", pids[0]);
    let start = Instant::now();
    let res = child.wait_with_output().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "gpucell took {:?} to notice",
        start.elapsed()
    );
    env.assert_clean();
    assert_eq!(res.status.code(), Some(125));
    let err = stderr(&res);
    assert!(err.contains("QEMU exited (signal 9)"), "{err}");
}

#[test]
fn bad_input_fails_with_125_before_booting() {
    let Some(env) = vm_env() else { return };
    let out = env.run(&["--memory", "lots", &env.image, "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("size \"lots\" not understood"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["oci:/nonexistent/layout:x", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("/nonexistent/layout"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn gpucell_killed_outright_takes_qemu_down_and_the_next_run_sweeps_its_dir() {
    let Some(env) = vm_env() else { return };
    let (mut child, _out) = start_ready(&env, "echo ready; sleep 1000");
    let needle = env.state.path().to_string_lossy().to_string();
    assert_eq!(common::qemu_processes_mentioning(&needle).len(), 1);
    common::kill("KILL", child.id());
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !common::qemu_processes_mentioning(&needle).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        common::qemu_processes_mentioning(&needle).is_empty(),
        "QEMU outlived a SIGKILLed gpucell"
    );
    // The run directory of the killed run is still there; the next run removes it.
    let run_dir = env.state.path().join("run");
    assert_eq!(std::fs::read_dir(&run_dir).unwrap().count(), 1);
    let out = env.run(&[&env.image, "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}
