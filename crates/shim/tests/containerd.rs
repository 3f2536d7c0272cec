//! The shim under a real containerd (Debian's, fetched by scripts/fetch-containerd.sh
//! into target/containerd, or the directory named by GPUCELL_TEST_CONTAINERD), with its
//! own config, root and state directories, the native snapshotter and a busybox image
//! imported offline. Each task boots a real microVM (TCG unless GPUCELL_ACCEL says
//! otherwise). Skips with a printed reason when not root, without guest artifacts
//! (GPUCELL_TEST_STATE_DIR), QEMU, umoci/busybox-static, or containerd.
//!
//! One test, in steps, so that the VMs boot one after another on a small machine:
//! `ctr run` prints the output and returns the exit code; its `--mount`s of kubelet-like
//! volumes reach the guest and a host directory is refused; kill and delete work; exec
//! runs in the task's VM beside it (output, exit code, kill); containerd killed and restarted while a task runs: the task survives and its
//! exit is still reported.
//!
//! A second test drives `ctr run -t` and `ctr tasks exec -t` under `script` (a pty for
//! ctr): the process has a `/dev/pts/N` in the guest, its stderr on the terminal, the
//! size ctr's `ResizePty` sets, and typed input read through the stdin FIFO.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{demo_image_archive, processes_mentioning, IMAGE};
const RUNTIME: &str = "io.containerd.gpucell.v1";

/// A containerd of the test's own, and where its files are.
struct Env {
    dir: tempfile::TempDir,
    bin: PathBuf,
    path: String,
    containerd: Option<Child>,
}

fn setup() -> Option<Env> {
    let common::Prepared { dir, bin } = common::prepare("gs", &[])?;
    let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-gpucell-v1"));
    let path = format!(
        "{}:{}:{}",
        shim.parent()?.display(),
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut env = Env {
        dir,
        bin,
        path,
        containerd: None,
    };
    env.write_config();
    env.start();
    if !env.import_image() {
        return None;
    }
    Some(env)
}

impl Env {
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn sock(&self) -> String {
        self.p("c.sock").display().to_string()
    }

    fn write_config(&self) {
        let d = self.dir.path().display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/st\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n"
        );
        std::fs::write(self.p("config.toml"), config).unwrap();
    }

    /// Starts containerd and waits for its socket.
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.p("containerd.log"))
            .unwrap();
        let mut cmd = Command::new(self.bin.join("containerd"));
        cmd.arg("--config")
            .arg(self.p("config.toml"))
            .env("PATH", &self.path)
            .env("GPUCELL_STATE_DIR", self.p("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if std::env::var_os("GPUCELL_ACCEL").is_none() {
            cmd.env("GPUCELL_ACCEL", "tcg");
        }
        self.containerd = Some(cmd.spawn().unwrap());
        let t = Instant::now();
        while !self.p("c.sock").exists() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "containerd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // The socket appears before the services answer.
        while !self.ctr(&["version"]).status.success() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "containerd does not answer: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// containerd killed as a crash would (SIGKILL), then started again.
    fn restart(&mut self) {
        if let Some(mut c) = self.containerd.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        std::fs::remove_file(self.p("c.sock")).ok();
        self.start();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.p("containerd.log")).unwrap_or_default()
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("ctr"));
        c.arg("-a").arg(self.sock()).args(args).stdin(Stdio::null());
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().unwrap()
    }

    /// The demo image (umoci, busybox), named for containerd, imported offline.
    fn import_image(&self) -> bool {
        let Some(tar) = demo_image_archive(self.dir.path(), IMAGE) else {
            return false;
        };
        let out = self.ctr(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            tar.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "import: {}", text(&out.stderr));
        true
    }

    /// `ctr run` of the demo image with the gpucell runtime.
    fn run(&self, extra: &[&str], id: &str, command: &[&str]) -> Output {
        let mut args = vec!["run", "--snapshotter", "native", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(command);
        self.ctr(&args)
    }

    fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr(&["tasks", "ls"]);
        text(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
    }

    fn wait_for(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < limit,
                "timed out waiting for {what}; containerd log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn wait_for_file(&self, path: &Path, needle: &str) {
        self.wait_for(
            &format!("{needle:?} in {}", path.display()),
            Duration::from_secs(180),
            || std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)),
        );
    }

    /// Shim processes serving this containerd.
    fn shims(&self) -> Vec<u32> {
        processes_mentioning(&self.sock(), "containerd-shim-gpucell")
    }

    /// No VM, shim, disk or run directory is left.
    fn assert_clean(&self) {
        let state = self.p("state").display().to_string();
        self.wait_for("the shims to exit", Duration::from_secs(20), || {
            self.shims().is_empty()
        });
        assert!(
            processes_mentioning(&state, "qemu-system").is_empty(),
            "QEMU left behind"
        );
        for d in ["state/tmp", "state/run"] {
            let left: Vec<_> = std::fs::read_dir(self.p(d))
                .map(|r| r.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "left behind in {d}: {left:?}");
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.containerd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Shims a failed step left: they were started for this test only.
        for pid in self.shims() {
            // SAFETY: plain kill(2) of a process this test's containerd started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run_prints_output_and_returns_the_exit_code(env: &Env) {
    let out = env.run(
        &["--rm"],
        "t1",
        &[
            "sh",
            "-c",
            "echo hello-from-gpucell; echo to-stderr >&2; exit 3",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "stderr: {}\n{}",
        text(&out.stderr),
        env.log()
    );
    assert_eq!(text(&out.stdout), "hello-from-gpucell\n");
    assert!(
        text(&out.stderr).contains("to-stderr"),
        "{}",
        text(&out.stderr)
    );
    // stdin reaches the workload through containerd's FIFO.
    let mut child = env
        .ctr_cmd(&[
            "run",
            "--rm",
            "--snapshotter",
            "native",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t1s",
        ])
        .args(["sh", "-c", "read x; echo got:$x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped-input\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        text(&out.stdout),
        "got:piped-input\n",
        "{}",
        text(&out.stderr)
    );
    // A command the image does not have: the task fails, and says why.
    let out = env.run(&["--rm"], "t1b", &["/no/such/binary"]);
    assert_ne!(out.status.code(), Some(0));
}

/// `ctr run --mount` of a kubelet-like Secret (its `..data` layout, 3 MiB: a run frame
/// over the 256 KiB of other control frames) and emptyDir: the secret's keys are read,
/// read-only; the emptyDir is writable. A plain host directory is
/// refused, by name.
fn ctr_run_mounts(env: &Env) {
    let vols = env.p("kubelet/pods/u1/volumes");
    let tok = vols.join("kubernetes.io~secret/tok");
    std::fs::create_dir_all(tok.join("..2026_12_03_11_00_00.1")).unwrap();
    std::fs::write(tok.join("..2026_12_03_11_00_00.1/token"), "sekrit\n").unwrap();
    // Three files of the most one file may have: the run frame is over 3 MiB.
    for i in 0..3 {
        let blob = tok.join(format!("..2026_12_03_11_00_00.1/blob{i}"));
        std::fs::write(blob, vec![b'b'; gpucell_protocol::MAX_VOLUME_FILE as usize]).unwrap();
    }
    std::os::unix::fs::symlink("..2026_12_03_11_00_00.1", tok.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", tok.join("token")).unwrap();
    let scratch = vols.join("kubernetes.io~empty-dir/scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mount = |src: &std::path::Path, dst: &str, opts: &str| {
        format!(
            "type=bind,src={},dst={dst},options=rbind:{opts}",
            src.display()
        )
    };
    let (m1, m2, m3) = (
        mount(&tok, "/var/run/secrets/tok", "ro"),
        mount(&scratch, "/scratch", "rw"),
        // One key alone (a subPath): a file mount.
        mount(&tok.join("token"), "/etc/token", "ro"),
    );
    let out = env.run(
        &["--rm", "--mount", &m1, "--mount", &m2, "--mount", &m3],
        "t1v",
        &[
            "sh",
            "-c",
            "cat /var/run/secrets/tok/token; cat /var/run/secrets/tok/..data/blob* | wc -c; \
             cat /etc/token; \
             echo w > /scratch/f && cat /scratch/f; \
             touch /var/run/secrets/tok/x 2>/dev/null && echo writable || echo read-only",
        ],
    );
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), "sekrit\n3145728\nsekrit\nw\nread-only\n"),
        "stderr: {}\n{}",
        text(&out.stderr),
        env.log()
    );
    let host = env.p("srv");
    std::fs::create_dir_all(&host).unwrap();
    let out = env.run(
        &["--rm", "--mount", &mount(&host, "/data", "ro")],
        "t1h",
        &["true"],
    );
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("/data") && err.contains(host.to_str().unwrap()) && err.contains("host paths"),
        "{err}"
    );
}

fn kill_exec_and_delete(env: &Env) {
    let log = env.p("t2.log");
    let uri = format!("file://{}", log.display());
    let out = env.run(
        &["-d", "--log-uri", &uri],
        "t2",
        &["sh", "-c", "echo started; sleep 600"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    env.wait_for_file(&log, "started");
    assert_eq!(env.task_status("t2").as_deref(), Some("RUNNING"));
    exec_in_a_running_task(env, "t2");
    let out = env.ctr(&["tasks", "kill", "-s", "SIGKILL", "t2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    env.wait_for("t2 to stop", Duration::from_secs(60), || {
        env.task_status("t2").as_deref() == Some("STOPPED")
    });
    let out = env.ctr(&["tasks", "delete", "t2"]);
    assert!(
        text(&out.stderr).contains("exit code 137"),
        "{}",
        text(&out.stderr)
    );
    assert!(env.ctr(&["containers", "rm", "t2"]).status.success());
    assert_eq!(env.task_status("t2"), None);
}

/// `ctr tasks exec` in the running task `id`: output and exit code come back while the
/// task runs on, and a killed exec ends with the signal.
fn exec_in_a_running_task(env: &Env, id: &str) {
    let exec = env.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        id,
        "sh",
        "-c",
        "echo exec-out; echo exec-err >&2; cat /proc/1/cmdline; exit 4",
    ]);
    assert_eq!(exec.status.code(), Some(4), "{}", text(&exec.stderr));
    let out = text(&exec.stdout);
    assert!(out.starts_with("exec-out\n"), "{out}");
    // The exec sees the task's own processes: it runs in the same container.
    assert!(out.contains("sleep"), "{out}");
    assert!(
        text(&exec.stderr).contains("exec-err"),
        "{}",
        text(&exec.stderr)
    );
    let mut long = env
        .ctr_cmd(&[
            "tasks",
            "exec",
            "--exec-id",
            "e2",
            id,
            "sh",
            "-c",
            "echo e2-started; exec sleep 600",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A kill between the exec's create and its start would end it unstarted (as runc
    // does) and fail ctr's start: wait until it runs.
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(long.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first, "e2-started\n");
    // Refused until the exec is known and started.
    env.wait_for("exec e2 to take SIGKILL", Duration::from_secs(60), || {
        let killed = env.ctr(&["tasks", "kill", "--exec-id", "e2", "-s", "SIGKILL", id]);
        killed.status.success()
    });
    let out = long.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    assert_eq!(env.task_status(id).as_deref(), Some("RUNNING"));
}

fn task_survives_a_containerd_restart(env: &mut Env) {
    let log = env.p("t3.log");
    let uri = format!("file://{}", log.display());
    let out = env.run(
        &["-d", "--log-uri", &uri],
        "t3",
        &["sh", "-c", "echo started; sleep 10; echo done; exit 5"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    env.wait_for_file(&log, "started");
    let shims = env.shims();
    assert_eq!(shims.len(), 1, "one shim for t3");
    env.restart();
    assert_eq!(env.shims(), shims, "the shim survived the restart");
    let events_log = env.p("events.log");
    let mut events = env
        .ctr_cmd(&["events"])
        .stdout(std::fs::File::create(&events_log).unwrap())
        .spawn()
        .unwrap();
    assert_eq!(env.task_status("t3").as_deref(), Some("RUNNING"));
    env.wait_for_file(&log, "done");
    env.wait_for("t3 to stop", Duration::from_secs(60), || {
        env.task_status("t3").as_deref() == Some("STOPPED")
    });
    let out = env.ctr(&["tasks", "delete", "t3"]);
    assert!(
        text(&out.stderr).contains("exit code 5"),
        "{}",
        text(&out.stderr)
    );
    assert!(env.ctr(&["containers", "rm", "t3"]).status.success());
    // The shim's first publish after the restart finds the old connection closed; it
    // reconnects and sends the event again.
    env.wait_for_file(&events_log, "/tasks/exit");
    events.kill().unwrap();
    events.wait().unwrap();
    let seen = std::fs::read_to_string(&events_log).unwrap();
    let exit = seen
        .lines()
        .find(|l| l.contains("/tasks/exit") && l.contains("t3"))
        .unwrap_or_else(|| panic!("no /tasks/exit for t3 after the restart:\n{seen}"));
    assert!(exit.contains("\"exit_status\":5"), "{exit}");
}

#[test]
fn ctr_run_kill_exec_delete_and_containerd_restart() {
    let Some(mut env) = setup() else { return };
    run_prints_output_and_returns_the_exit_code(&env);
    ctr_run_mounts(&env);
    kill_exec_and_delete(&env);
    task_survives_a_containerd_restart(&mut env);
    env.assert_clean();
}

/// `cmd` run by `script` on a pty of its own sized `rows` x `cols`: ctr's stdin and
/// stdout are a terminal, as at a user's shell.
fn under_script(env: &Env, rows: u16, cols: u16, cmd: &Command, input: &[u8]) -> Output {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    let mut line = format!("stty rows {rows} cols {cols}; {}", quote(cmd.get_program()));
    for a in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(a));
    }
    let mut child = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("PATH", &env.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Prints the tty, then the size once the client's `ResizePty` has set it (the
/// terminal starts at 0x0, where busybox's `stty size` fails: ctr sizes it after the
/// start).
const TTY_SCRIPT: &str = "tty; i=0; \
    until [ -n \"$(stty size 2>/dev/null | grep -v '^0 0$')\" ] || [ $i -ge 100 ]; \
    do sleep 0.1; i=$((i+1)); done; stty size; echo err-too >&2";

#[test]
fn ctr_run_t_and_exec_t_get_a_terminal_sized_by_resize_pty() {
    if !Path::new("/usr/bin/script").exists() {
        eprintln!("skipping: script (util-linux) is not installed");
        return;
    }
    let Some(env) = setup() else { return };
    let run = env.ctr_cmd(&[
        "run",
        "-t",
        "--rm",
        "--snapshotter",
        "native",
        "--runtime",
        RUNTIME,
        IMAGE,
        "tt1",
        "sh",
        "-c",
        &format!("{TTY_SCRIPT}; read x; echo got:$x"),
    ]);
    let out = under_script(&env, 21, 73, &run, b"typed\n");
    let s = text(&out.stdout);
    assert!(s.contains("/dev/pts/"), "{s:?} {}", env.log());
    assert!(s.contains("21 73\r"), "{s:?}");
    assert!(s.contains("err-too\r"), "stderr on the terminal: {s:?}");
    // Typed input travels through ctr's stdin FIFO to the terminal and is read.
    assert!(s.contains("got:typed\r"), "{s:?}");
    // An exec with a terminal in a task without one.
    let log = env.p("tt2.log");
    let uri = format!("file://{}", log.display());
    let out = env.run(
        &["-d", "--log-uri", &uri],
        "tt2",
        &["sh", "-c", "echo started; tty; sleep 600"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    env.wait_for_file(&log, "not a tty");
    let exec = env.ctr_cmd(&[
        "tasks",
        "exec",
        "-t",
        "--exec-id",
        "et",
        "tt2",
        "sh",
        "-c",
        TTY_SCRIPT,
    ]);
    let out = under_script(&env, 33, 101, &exec, b"");
    let s = text(&out.stdout);
    assert!(s.contains("/dev/pts/"), "{s:?} {}", env.log());
    assert!(s.contains("33 101\r"), "{s:?}");
    assert!(env
        .ctr(&["tasks", "kill", "-s", "SIGKILL", "tt2"])
        .status
        .success());
    env.wait_for("tt2 to stop", Duration::from_secs(60), || {
        env.task_status("tt2").as_deref() == Some("STOPPED")
    });
    assert!(env.ctr(&["tasks", "delete", "tt2"]).status.success());
    assert!(env.ctr(&["containers", "rm", "tt2"]).status.success());
    env.assert_clean();
}
