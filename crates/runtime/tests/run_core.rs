//! The run core used as a front end other than the CLI uses it: a request in, output
//! through writers, phases through an observer, a typed report out. Boots a real guest
//! under TCG (skips with a reason without the test guest: `make test` builds it).
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpucell_runtime::{AccelRequest, Config, Node, Observer, Phase, RunReport, RunRequest};
use gpucell_sandbox::SessionIo;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[derive(Default)]
struct Recorder {
    phases: Vec<Phase>,
    warnings: Vec<String>,
    got_events: bool,
}

impl Observer for Recorder {
    fn phase(&mut self, phase: Phase) {
        self.phases.push(phase);
    }
    fn warning(&mut self, message: &str) {
        self.warnings.push(message.to_string());
    }
    fn sandbox_starting(&mut self, _events: gpucell_sandbox::EventSender) {
        self.got_events = true;
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A private state dir borrowing the test guest, and the demo image's reference.
fn env() -> Option<(tempfile::TempDir, String)> {
    let Some(shared) = std::env::var_os("GPUCELL_TEST_STATE_DIR").map(PathBuf::from) else {
        eprintln!("skipping: GPUCELL_TEST_STATE_DIR is not set (make test sets it)");
        return None;
    };
    if !shared.join("guest/default/manifest.json").is_file() {
        eprintln!("skipping: no test guest in {}", shared.display());
        return None;
    }
    let state = tempfile::Builder::new()
        .prefix("rc")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::symlink(shared.join("guest"), state.path().join("guest")).unwrap();
    let layout = state.path().join("oci");
    let ok = std::process::Command::new(repo().join("scripts/make-demo-image.sh"))
        .arg(&layout)
        .arg("demo")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping: the demo image could not be built (umoci, busybox-static)");
        return None;
    }
    Some((state, format!("oci:{}:demo", layout.display())))
}

fn io(out: &Buffer, err: &Buffer) -> SessionIo {
    SessionIo {
        stdout: Box::new(out.clone()),
        stderr: Box::new(err.clone()),
        stdin: None,
    }
}

#[test]
fn a_request_runs_and_reports_through_the_library() {
    let Some((state, image)) = env() else { return };
    let node = Node::new("/", state.path(), None, &Config::default());
    let mut req = RunRequest::new(&image);
    // No network in the machine's own namespace (private ones are tested in namespaces).
    req.network.mode = Some(gpucell_net::NetworkMode::None);
    req.command = vec![
        "sh".into(),
        "-c".into(),
        "echo out; echo err >&2; exit 3".into(),
    ];
    req.env = vec!["GREETING=hi".into()];
    req.accel = AccelRequest::Tcg;
    let (out, err) = (Buffer::default(), Buffer::default());
    let mut rec = Recorder::default();
    let report = gpucell_runtime::run(&node, req, io(&out, &err), &mut rec);
    assert_eq!(report.error, None, "{:?}", report.error);
    assert_eq!(report.exit_code, 3);
    assert_eq!(out.text(), "out\n");
    assert_eq!(err.text(), "err\n");
    assert_eq!(
        rec.phases,
        [
            Phase::Validate,
            Phase::Image,
            Phase::Guest,
            Phase::Accel,
            Phase::Devices,
            Phase::Sandbox,
            Phase::Release,
            Phase::Done
        ]
    );
    assert!(rec.got_events);
    let json = report.to_json();
    for key in [
        "run_id",
        "image",
        "accel",
        "spec",
        "status",
        "channel",
        "guest",
        "timings_ms",
        "qemu_args",
    ] {
        assert!(json.get(key).is_some(), "{key} missing: {json}");
    }
    assert!(json["spec"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "GREETING=hi"));
    assert!(
        json.get("error").is_none() && json.get("passthrough").is_none(),
        "{json}"
    );
    assert!(
        !state.path().join("run").exists()
            || std::fs::read_dir(state.path().join("run"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[test]
fn a_bad_request_is_reported_with_its_field_and_nothing_runs() {
    // No guest needed: the request is refused before anything is looked at.
    let state = tempfile::tempdir().unwrap();
    let node = Node::new("/", state.path(), None, &Config::default());
    let mut req = RunRequest::new("oci:/nonexistent");
    req.cpus = 0;
    let (out, err) = (Buffer::default(), Buffer::default());
    let mut rec = Recorder::default();
    let report = gpucell_runtime::run(&node, req, io(&out, &err), &mut rec);
    assert_eq!(report.exit_code, gpucell_runtime::EXIT_RUN_FAILED);
    let error = report.error.unwrap();
    assert!(error.contains("cpus"), "{error}");
    assert_eq!(rec.phases, [Phase::Validate, Phase::Done]);
    assert!(!rec.got_events);
    assert!(
        !state.path().join("images").exists(),
        "the image store was touched"
    );
}

/// Hands the sandbox's handle to the test thread.
#[derive(Default)]
struct Handoff(Arc<Mutex<Option<gpucell_sandbox::EventSender>>>);

impl Observer for Handoff {
    fn sandbox_starting(&mut self, events: gpucell_sandbox::EventSender) {
        *self.0.lock().unwrap() = Some(events);
    }
}

fn proc_spec(script: &str) -> gpucell_protocol::ProcSpec {
    gpucell_protocol::ProcSpec {
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin:/usr/bin".into()],
        cwd: "/tmp".into(),
        user: String::new(),
        container: None,
        terminal: false,
        window: None,
    }
}

/// Execs while the workload runs, from another thread (as the shim does): output and
/// exit code, the same container (pid namespace, /tmp), a kill by id; the exec that
/// creates `/tmp/stop` ends the workload.
fn execs_against(sandbox: &Mutex<Option<gpucell_sandbox::EventSender>>) -> Vec<String> {
    use gpucell_runtime::{exec_in, ExecError, ProcIo};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let tx = loop {
        if let Some(tx) = sandbox.lock().unwrap().clone() {
            break tx;
        }
        assert!(std::time::Instant::now() < deadline, "no sandbox");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let io = |out: &Buffer| ProcIo {
        stdout: Box::new(out.clone()),
        stderr: Box::new(out.clone()),
        stdin: None,
    };
    let out = Buffer::default();
    let script = "echo exec-out; tr '\\0' ' ' < /proc/1/cmdline; echo; pwd; exit 7";
    let first = loop {
        match exec_in(&tx, proc_spec(script), io(&out)) {
            Err(ExecError::NotRunning) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the workload never ran"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => break other.unwrap(),
        }
    };
    let mut seen = vec![format!("pid {}", first.pid())];
    seen.push(format!("exit {:?}", first.wait().unwrap()));
    seen.push(out.text());
    let sleeper = exec_in(&tx, proc_spec("exec sleep 600"), io(&Buffer::default())).unwrap();
    sleeper.signal(9).unwrap();
    seen.push(format!("killed {:?}", sleeper.wait().unwrap()));
    let mut bad = proc_spec("");
    bad.args = vec!["/no/such/tool".into()];
    let refused = exec_in(&tx, bad, io(&Buffer::default())).unwrap_err();
    seen.push(format!("refused {refused}"));
    let stop = exec_in(&tx, proc_spec("touch /tmp/stop"), io(&Buffer::default())).unwrap();
    seen.push(format!("stop {:?}", stop.wait().unwrap()));
    seen
}

/// Runs a workload that waits for `/tmp/stop` and then runs `then`, with `execs` run
/// against its sandbox on a thread of its own (it must create `/tmp/stop`): the report,
/// the workload's stdout and stderr, and what `execs` returned. None: skipped.
fn run_with_execs<T: Send + 'static>(
    then: &str,
    execs: fn(&Mutex<Option<gpucell_sandbox::EventSender>>) -> T,
) -> Option<(RunReport, String, String, T)> {
    let (state, image) = env()?;
    let node = Node::new("/", state.path(), None, &Config::default());
    let mut req = RunRequest::new(&image);
    req.network.mode = Some(gpucell_net::NetworkMode::None);
    req.command = vec![
        "sh".into(),
        "-c".into(),
        format!("while [ ! -e /tmp/stop ]; do sleep 0.1; done; {then}"),
    ];
    req.accel = AccelRequest::Tcg;
    let handoff = Handoff::default();
    let shared = Arc::clone(&handoff.0);
    let thread = std::thread::spawn(move || execs(&shared));
    let (out, err) = (Buffer::default(), Buffer::default());
    let mut obs = handoff;
    let report = gpucell_runtime::run(&node, req, io(&out, &err), &mut obs);
    let seen = thread.join().unwrap();
    Some((report, out.text(), err.text(), seen))
}

#[test]
fn an_exec_runs_in_the_workloads_container_while_it_runs() {
    let Some((report, out, err, seen)) = run_with_execs("echo main-done", execs_against) else {
        return;
    };
    assert_eq!(report.error, None, "{:?} {err}", report.error);
    assert_eq!(report.exit_code, 0);
    assert_eq!(out, "main-done\n");
    assert_eq!(seen[1], "exit ExitStatus { code: Some(7), signal: None }");
    // Its pid 1 is the workload: the same pid namespace; its cwd the spec's.
    assert_eq!(
        seen[2],
        "exec-out\nsh -c while [ ! -e /tmp/stop ]; do sleep 0.1; done; echo main-done \n/tmp\n"
    );
    assert_eq!(seen[3], "killed ExitStatus { code: None, signal: Some(9) }");
    assert!(
        seen[4].starts_with("refused the agent refused the process: "),
        "{}",
        seen[4]
    );
    assert!(seen[4].contains("/no/such/tool"), "{}", seen[4]);
    assert_eq!(seen[5], "stop ExitStatus { code: Some(0), signal: None }");
}

/// A terminal exec beside a workload without one: its tty, its first size, a resize
/// after it printed that, input echoed and read; then the exec that ends the workload.
/// Returns the exec's status and output.
fn terminal_exec_against(
    sandbox: &Mutex<Option<gpucell_sandbox::EventSender>>,
) -> (gpucell_protocol::ExitStatus, String) {
    use gpucell_runtime::{exec_in, ProcIo};
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(300);
    let tx = loop {
        if let Some(tx) = sandbox.lock().unwrap().clone() {
            break tx;
        }
        assert!(Instant::now() < deadline, "no sandbox");
        std::thread::sleep(Duration::from_millis(50));
    };
    tx.wait_running(Duration::from_secs(300)).unwrap();
    let out = Buffer::default();
    let (stdin_r, mut stdin_w) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut spec = proc_spec("tty; stty size; read x; stty size; echo got:$x");
    spec.terminal = true;
    spec.window = Some(gpucell_protocol::WindowSize { rows: 10, cols: 20 });
    let io = ProcIo {
        stdout: Box::new(out.clone()),
        stderr: Box::new(out.clone()),
        stdin: Some(Box::new(stdin_r)),
    };
    let exec = exec_in(&tx, spec, io).unwrap();
    while !out.text().contains("10 20") {
        assert!(Instant::now() < deadline, "{:?}", out.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(exec.resize(0, 20).is_err());
    exec.resize(40, 100).unwrap();
    stdin_w.write_all(b"hi\n").unwrap();
    let status = exec.wait().unwrap();
    let io = ProcIo {
        stdout: Box::new(Buffer::default()),
        stderr: Box::new(Buffer::default()),
        stdin: None,
    };
    let stop = exec_in(&tx, proc_spec("touch /tmp/stop"), io).unwrap();
    stop.wait().unwrap();
    (status, out.text())
}

#[test]
fn an_exec_with_a_terminal_gets_a_pty_sized_and_resized() {
    let Some((report, out, err, (status, seen))) = run_with_execs("tty", terminal_exec_against)
    else {
        return;
    };
    assert_eq!(report.error, None, "{:?} {err}", report.error);
    // The workload has no terminal; the exec has its own.
    assert_eq!(out, "not a tty\n");
    assert_eq!(status.code, Some(0), "{seen:?}");
    let lines: Vec<&str> = seen.split("\r\n").collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{seen:?}");
    assert_eq!(
        &lines[1..],
        ["10 20", "hi", "40 100", "got:hi", ""],
        "{seen:?}"
    );
}
