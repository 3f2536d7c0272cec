//! gpucelld end to end: a real daemon process, real HTTP over its unix socket, real QEMU
//! (TCG) booting the real guest. Each test checks that nothing is left behind. Skips with
//! a printed reason without guest artifacts (GPUCELL_TEST_STATE_DIR), QEMU, umoci or
//! busybox-static.

#![allow(clippy::unwrap_used)]

mod common;

use gpucell_api::{Desired, RestartPolicy, SandboxState};

/// Prints, then ticks until SIGTERM, which it answers with exit code 42.
const TICKER: &str = "trap 'echo got-term; exit 42' TERM; echo hello; echo oops >&2; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.5; done";

#[test]
fn deploy_running_logs_stop() {
    let Some(env) = common::env(true) else { return };
    let mut req = env.request(&["sh", "-c", TICKER]);
    req.id = Some("web-1".into());
    req.labels.insert("app".into(), "demo".into());
    let st = env.deploy(&req);
    assert_eq!(st.id, "web-1");
    assert_eq!(st.labels["app"], "demo");
    // The same deploy again is the same sandbox (idempotent by id).
    assert_eq!(env.deploy(&req).created_ms, st.created_ms);
    let st = env.wait_for("web-1", 180, "running with output", |s, e| {
        s.state == SandboxState::Running && e.stdout_of("web-1").contains("tick 1")
    });
    assert!(st.timestamps.contains_key(&SandboxState::Pulling), "{st:?}");
    assert!(st.timestamps.contains_key(&SandboxState::Booting), "{st:?}");
    assert!(st.phases_ms.contains_key("image"), "{st:?}");
    let logs = env.logs("web-1");
    assert!(
        logs.iter()
            .any(|l| l.stream == "stdout" && l.line == "hello"),
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.stream == "stderr" && l.line == "oops"),
        "{logs:?}"
    );
    assert!(logs.iter().all(|l| l.t_ms >= st.created_ms), "{logs:?}");
    // tail=1 gives the last line only.
    let mut tail = Vec::new();
    env.rt
        .block_on(env.client().logs("web-1", Some(1), false, |l| tail.push(l)))
        .unwrap();
    assert_eq!(tail.len(), 1);
    let list = env.rt.block_on(env.client().list()).unwrap();
    assert_eq!(list.sandboxes.len(), 1);

    // A follower started now ends by itself once the sandbox has stopped.
    let socket = env.socket.clone();
    let follower = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut n = 0;
        rt.block_on(gpucell_api::Client::new(socket).logs("web-1", Some(0), true, |_| n += 1))
            .unwrap();
        n
    });
    let stopping = env.rt.block_on(env.client().stop("web-1")).unwrap();
    assert!(
        matches!(
            stopping.state,
            SandboxState::Stopping | SandboxState::Exited
        ),
        "{stopping:?}"
    );
    let st = env.wait_for("web-1", 60, "stopped", |s, _| s.state.is_terminal());
    assert_eq!(st.desired, Desired::Stopped);
    assert_eq!(st.state, SandboxState::Exited, "{st:?}");
    // SIGTERM reached the workload, which exited by its trap.
    assert_eq!(st.exit_code, Some(42), "{st:?}");
    assert!(env.stdout_of("web-1").contains("got-term"));
    assert!(st.report.is_some());
    assert!(st.devices.is_empty());
    follower.join().unwrap();
    env.assert_clean();
    // Removing it forgets it.
    env.rt
        .block_on(
            env.client()
                .send(hyper::Method::DELETE, "/v1/sandboxes/web-1?remove=1", None),
        )
        .unwrap();
    let err = env.rt.block_on(env.client().get("web-1")).unwrap_err();
    assert_eq!(err.api().map(|(s, _)| s), Some(404));
}

#[test]
fn a_workload_that_ignores_sigterm_is_killed_after_its_grace() {
    let Some(env) = common::env(true) else { return };
    let mut req = env.request(&[
        "sh",
        "-c",
        "trap '' TERM; echo up; while true; do sleep 0.5; done",
    ]);
    req.id = Some("stubborn".into());
    req.stop_grace_ms = Some(2000);
    env.deploy(&req);
    env.wait_for("stubborn", 180, "running", |s, e| {
        s.state == SandboxState::Running && e.stdout_of("stubborn").contains("up")
    });
    let asked = std::time::Instant::now();
    env.rt.block_on(env.client().stop("stubborn")).unwrap();
    let st = env.wait_for("stubborn", 60, "stopped", |s, _| s.state.is_terminal());
    assert!(asked.elapsed() >= std::time::Duration::from_secs(2));
    assert_eq!(
        (st.state, st.exit_code),
        (SandboxState::Exited, Some(137)),
        "{st:?}"
    );
    assert!(
        st.error.as_deref().unwrap_or("").contains("grace"),
        "{st:?}"
    );
    env.assert_clean();
}

#[test]
fn restart_on_failure_after_a_non_zero_exit() {
    let Some(env) = common::env(true) else { return };
    let mut req = env.request(&["sh", "-c", "echo attempt; exit 3"]);
    req.id = Some("flaky".into());
    req.restart = RestartPolicy::OnFailure;
    env.deploy(&req);
    let st = env.wait_for("flaky", 300, "two restarts", |s, _| s.restarts >= 2);
    assert_eq!(st.exit_code, Some(3), "{st:?}");
    let runs = env.stdout_of("flaky").matches("attempt").count();
    assert!(runs >= 2, "{runs}");
    let notes: Vec<_> = env
        .logs("flaky")
        .into_iter()
        .filter(|l| l.stream == "gpucell")
        .collect();
    assert!(
        notes.iter().any(|l| l.line.contains("restarting in")),
        "{notes:?}"
    );
    env.rt.block_on(env.client().stop("flaky")).unwrap();
    let st = env.wait_for("flaky", 60, "stopped", |s, _| s.state.is_terminal());
    let restarts = st.restarts;
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        env.get("flaky").restarts,
        restarts,
        "restarted after a stop"
    );
    env.assert_clean();

    // `never`: one run, exited with its code.
    let mut req = env.request(&["sh", "-c", "exit 5"]);
    req.id = Some("once".into());
    env.deploy(&req);
    let st = env.wait_for("once", 180, "exited", |s, _| s.state.is_terminal());
    assert_eq!(
        (st.state, st.exit_code, st.restarts),
        (SandboxState::Exited, Some(5), 0)
    );
    env.assert_clean();
}

#[test]
fn kill_9_of_the_daemon_during_a_run_then_adoption() {
    let Some(mut env) = common::env(true) else {
        return;
    };
    let mut req = env.request(&["sh", "-c", TICKER]);
    req.id = Some("survivor".into());
    env.deploy(&req);
    env.wait_for("survivor", 180, "running", |s, e| {
        s.state == SandboxState::Running && e.stdout_of("survivor").contains("tick 0")
    });
    let qemu_before = env.processes("qemu-system");
    assert_eq!(qemu_before.len(), 1, "{qemu_before:?}");
    env.kill_daemon();
    // The sandbox runs on without the daemon.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(env.processes("qemu-system"), qemu_before);
    env.start_daemon();
    let st = env.get("survivor");
    assert_eq!(st.state, SandboxState::Running, "{st:?}");
    assert_eq!(st.restarts, 0);
    assert_eq!(
        env.processes("qemu-system"),
        qemu_before,
        "the VM was replaced, not adopted"
    );
    let before = env.stdout_of("survivor").matches("tick").count();
    env.wait_for("survivor", 30, "more output", |_, e| {
        e.stdout_of("survivor").matches("tick").count() > before + 1
    });
    env.rt.block_on(env.client().stop("survivor")).unwrap();
    let st = env.wait_for("survivor", 60, "stopped", |s, _| s.state.is_terminal());
    assert_eq!(st.exit_code, Some(42), "{st:?}");
    env.assert_clean();
}

#[test]
fn kill_9_of_the_daemon_during_a_boot() {
    let Some(mut env) = common::env(true) else {
        return;
    };
    let mut req = env.request(&["sh", "-c", TICKER]);
    req.id = Some("booting".into());
    env.deploy(&req);
    env.wait_for("booting", 120, "pulling or booting", |s, _| {
        matches!(
            s.state,
            SandboxState::Pulling | SandboxState::Booting | SandboxState::Running
        )
    });
    env.kill_daemon();
    env.start_daemon();
    let st = env.wait_for("booting", 180, "running after the restart", |s, e| {
        s.state == SandboxState::Running && e.stdout_of("booting").contains("tick 0")
    });
    assert_eq!(st.restarts, 0, "{st:?}");
    assert_eq!(env.processes("qemu-system").len(), 1);
    env.rt.block_on(env.client().stop("booting")).unwrap();
    env.wait_for("booting", 60, "stopped", |s, _| s.state.is_terminal());
    env.assert_clean();
}

#[test]
fn qemu_killed_under_a_running_sandbox_is_restarted() {
    let Some(env) = common::env(true) else { return };
    let mut req = env.request(&["sh", "-c", TICKER]);
    req.id = Some("victim".into());
    req.restart = RestartPolicy::Always;
    env.deploy(&req);
    env.wait_for("victim", 180, "running", |s, e| {
        s.state == SandboxState::Running && e.stdout_of("victim").contains("tick 0")
    });
    let qemu = env.processes("qemu-system");
    assert_eq!(qemu.len(), 1);
    std::process::Command::new("kill")
        .arg("-9")
        .arg(qemu[0].to_string())
        .status()
        .unwrap();
    let st = env.wait_for("victim", 60, "the death noticed", |s, _| s.restarts >= 1);
    assert_eq!(st.exit_code, Some(125), "{st:?}");
    let error = st.error.clone().unwrap_or_default();
    assert!(error.contains("QEMU exited (signal 9)"), "{st:?}");
    env.wait_for("victim", 180, "running again", |s, e| {
        s.state == SandboxState::Running && e.stdout_of("victim").matches("hello").count() >= 2
    });
    let now = env.processes("qemu-system");
    assert_eq!(now.len(), 1);
    assert_ne!(now, qemu);
    env.rt.block_on(env.client().stop("victim")).unwrap();
    env.wait_for("victim", 60, "stopped", |s, _| s.state.is_terminal());
    env.assert_clean();
}
