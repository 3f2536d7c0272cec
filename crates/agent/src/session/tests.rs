//! The agent's session against a test host over a socketpair, both speaking the real
//! protocol: a run from hello to exit, stdin and signals, shutdown and a vanished host,
//! missing devices, a workload that cannot start, and a host that sends garbage. The
//! workload is a plain child process ([`ChildWorkload`]) in place of the container that
//! PID 1 starts; everything else is the code the guest runs.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gpucell_protocol::{
    DeviceInfo, DeviceMatch, ExitStatus, FrameError, FrameReader, FrameWriter, FromGuest, FromHost,
    GuestHello, HostHello, Kind, ProcSpec, RootfsSpec, RunSpec, WindowSize, MAX_DATA_PAYLOAD,
    MAX_RUN_PAYLOAD, PROTOCOL_VERSION,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{Session, SessionError};
use crate::container::{self, ContainerError, Stdio};
use crate::devices;
use crate::workload::{Workload, WorkloadError};

/// How long any one step may take before the test fails instead of hanging.
const STEP: Duration = Duration::from_secs(20);

/// The workload as a plain child process (the spec's argv, environment and working
/// directory) and the PCI functions of a fake sysfs directory; execs and added containers
/// are plain children too. A thread per child waits for it and then makes `exit_fd`
/// readable, as SIGCHLD does for the real signalfd.
struct ChildWorkload {
    devices_dir: tempfile::TempDir,
    exit_r: UnixStream,
    exit_w: UnixStream,
    waiters: Vec<JoinHandle<()>>,
    /// Every child started.
    children: Vec<Pid>,
    /// The workload's pid once started.
    pid: Option<Pid>,
    /// Exits not yet returned by `reap`.
    unreaped: Arc<Mutex<Vec<(Pid, ExitStatus)>>>,
    /// Every exit so far.
    statuses: Arc<Mutex<HashMap<Pid, ExitStatus>>>,
    /// The target each exec was started in, and the ids of added containers.
    exec_targets: Vec<Pid>,
    added: Vec<u32>,
    removed: Vec<u32>,
}

impl ChildWorkload {
    fn new() -> Self {
        let (exit_r, exit_w) = UnixStream::pair().unwrap();
        exit_r.set_nonblocking(true).unwrap();
        Self {
            devices_dir: tempfile::tempdir().unwrap(),
            exit_r,
            exit_w,
            waiters: Vec::new(),
            children: Vec::new(),
            pid: None,
            unreaped: Arc::default(),
            statuses: Arc::default(),
            exec_targets: Vec::new(),
            added: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// Adds a PCI function to the fake sysfs, as the guest kernel lists it.
    fn with_device(self, bdf: &str, vendor: u16, device: u16, class: u32) -> Self {
        let d = self.devices_dir.path().join(bdf);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("vendor"), format!("0x{vendor:04x}\n")).unwrap();
        fs::write(d.join("device"), format!("0x{device:04x}\n")).unwrap();
        fs::write(d.join("class"), format!("0x{class:06x}\n")).unwrap();
        self
    }

    fn started(&self) -> bool {
        self.pid.is_some()
    }

    /// How the child `pid` ended; fails the test if it is still running after [`STEP`].
    fn status_of(&self, pid: Pid) -> ExitStatus {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(s) = self.statuses.lock().unwrap().get(&pid) {
                return *s;
            }
            assert!(Instant::now() < deadline, "process {pid} is still running");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How the workload ended.
    fn final_status(&mut self) -> ExitStatus {
        self.status_of(self.pid.unwrap())
    }

    /// Starts `args` as a plain child with its pipes, non-blocking on the agent's side;
    /// with `terminal`, a pty of that first size instead (see [`tty::spawn_on_pty`]).
    fn spawn(
        &mut self,
        args: &[String],
        env: &[String],
        cwd: &str,
        terminal: Option<Option<WindowSize>>,
    ) -> Result<(Pid, Stdio), WorkloadError> {
        let (exe, args) = args
            .split_first()
            .ok_or_else(|| ContainerError::Child("empty argv".into()))?;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env_clear()
            .envs(env.iter().filter_map(|e| e.split_once('=')))
            .current_dir(if cwd.is_empty() { "/" } else { cwd });
        let (mut child, stdio) = match terminal {
            Some(window) => tty::spawn_on_pty(&mut cmd, window),
            None => {
                let mut child = cmd
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .map_err(|e| ContainerError::Child(format!("{exe}: {e}")))?;
                let stdio = Stdio {
                    stdin: OwnedFd::from(child.stdin.take().unwrap()),
                    stdout: OwnedFd::from(child.stdout.take().unwrap()),
                    stderr: Some(OwnedFd::from(child.stderr.take().unwrap())),
                    pty: None,
                };
                (child, stdio)
            }
        };
        for fd in [
            Some(&stdio.stdin),
            Some(&stdio.stdout),
            stdio.stderr.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            container::set_nonblocking(fd);
        }
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        self.children.push(pid);
        let (unreaped, statuses) = (Arc::clone(&self.unreaped), Arc::clone(&self.statuses));
        let mut exit_w = self.exit_w.try_clone().unwrap();
        self.waiters.push(std::thread::spawn(move || {
            let s = child.wait().unwrap();
            let status = ExitStatus {
                code: s.code(),
                signal: s.signal(),
            };
            statuses.lock().unwrap().insert(pid, status);
            unreaped.lock().unwrap().push((pid, status));
            exit_w.write_all(b"x").unwrap();
        }));
        Ok((pid, stdio))
    }
}

impl Workload for ChildWorkload {
    fn wait_for_devices(
        &mut self,
        wanted: &[DeviceMatch],
        wait: Duration,
    ) -> (Vec<DeviceInfo>, Vec<DeviceMatch>) {
        devices::wait_for(self.devices_dir.path(), wanted, wait)
    }

    fn start(&mut self, spec: &RunSpec) -> Result<(Pid, Stdio), WorkloadError> {
        let terminal = spec.terminal.then_some(spec.window);
        let (pid, stdio) = self.spawn(&spec.args, &spec.env, &spec.cwd, terminal)?;
        self.pid = Some(pid);
        Ok((pid, stdio))
    }

    fn exec(&mut self, target: Pid, spec: &ProcSpec) -> Result<(Pid, Stdio), WorkloadError> {
        self.exec_targets.push(target);
        let terminal = spec.terminal.then_some(spec.window);
        self.spawn(&spec.args, &spec.env, &spec.cwd, terminal)
    }

    fn add_container(&mut self, id: u32, spec: &RunSpec) -> Result<(Pid, Stdio), WorkloadError> {
        self.added.push(id);
        let terminal = spec.terminal.then_some(spec.window);
        self.spawn(&spec.args, &spec.env, &spec.cwd, terminal)
    }

    fn remove_container(&mut self, id: u32) {
        self.removed.push(id);
    }

    fn exit_fd(&self) -> BorrowedFd<'_> {
        self.exit_r.as_fd()
    }

    fn reap(&mut self) -> Vec<(Pid, ExitStatus)> {
        let mut b = [0u8; 16];
        while matches!((&self.exit_r).read(&mut b), Ok(n) if n > 0) {}
        std::mem::take(&mut *self.unreaped.lock().unwrap())
    }

    fn kill(&mut self, pid: Pid, signal: Signal) {
        // Only a child not yet reaped: its pid is still its own.
        if !self.statuses.lock().unwrap().contains_key(&pid) {
            let _ = kill(pid, signal);
        }
    }
}

impl Drop for ChildWorkload {
    fn drop(&mut self) {
        for pid in self.children.clone() {
            self.kill(pid, Signal::SIGKILL);
        }
        for w in self.waiters.drain(..) {
            let _ = w.join();
        }
    }
}

/// The host end of the channel.
struct Host {
    r: FrameReader<UnixStream>,
    w: FrameWriter<UnixStream>,
}

/// What the workload wrote and how it ended, as the host saw it.
#[derive(Debug, Default)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<ExitStatus>,
}

impl Host {
    fn send(&mut self, m: FromHost) {
        m.send(&mut self.w).unwrap();
    }

    /// Writes bytes as they are, framed or not.
    fn raw(&mut self, bytes: &[u8]) {
        self.w.get_mut().write_all(bytes).unwrap();
    }

    fn try_recv(&mut self) -> Result<FromGuest, FrameError> {
        FromGuest::decode(self.r.read_frame()?)
    }

    fn recv(&mut self) -> FromGuest {
        self.try_recv().unwrap()
    }

    fn hello(&mut self) -> GuestHello {
        match self.recv() {
            FromGuest::Hello(h) => h,
            m => panic!("expected Hello, got {m:?}"),
        }
    }

    fn handshake(&mut self, spec: RunSpec) {
        self.hello();
        self.send(FromHost::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }));
        self.send(FromHost::Run(Box::new(spec)));
    }

    /// Hello, run, no devices; returns the workload's pid.
    fn start(&mut self, spec: RunSpec) -> i32 {
        self.handshake(spec);
        assert_eq!(self.recv(), FromGuest::Devices(vec![]));
        self.started()
    }

    fn started(&mut self) -> i32 {
        match self.recv() {
            FromGuest::Started { pid } => pid,
            m => panic!("expected Started, got {m:?}"),
        }
    }

    /// The workload's output until `Exited`.
    fn until_exit(&mut self) -> Output {
        let mut out = Output::default();
        loop {
            match self.recv() {
                FromGuest::Stdout(d) => {
                    assert!(d.len() <= MAX_DATA_PAYLOAD);
                    out.stdout.extend(d)
                }
                FromGuest::Stderr(d) => out.stderr.extend(d),
                FromGuest::Exited(s) => {
                    out.status = Some(s);
                    return out;
                }
                m => panic!("unexpected {m:?} during the run; so far {out:?}"),
            }
        }
    }

    /// The `Error` the agent reports before it stops.
    fn error(&mut self) -> String {
        match self.recv() {
            FromGuest::Error { message } => message,
            m => panic!("expected Error, got {m:?}"),
        }
    }

    /// The agent has closed the channel: the session is over.
    fn closed(&mut self) {
        match self.try_recv() {
            Err(FrameError::Closed) => {}
            other => panic!("expected the channel to close, got {other:?}"),
        }
    }
}

/// How the agent's session ended.
struct Ended {
    result: Result<(), SessionError>,
    workload: ChildWorkload,
}

/// Serves one session over a socketpair: the agent in a thread, `host` here. The host
/// end closes when `host` returns.
fn session<R>(
    mut workload: ChildWorkload,
    early: &[&str],
    host: impl FnOnce(&mut Host) -> R,
) -> (R, Ended) {
    let (h, a) = UnixStream::pair().unwrap();
    h.set_read_timeout(Some(STEP)).unwrap();
    h.set_write_timeout(Some(STEP)).unwrap();
    let early = early.iter().map(|s| s.to_string()).collect();
    let agent = std::thread::spawn(move || {
        let mut s = Session::new(File::from(OwnedFd::from(a))).unwrap();
        let result = s.serve(&mut workload, "6.1.0-test".into(), 42, early);
        Ended { result, workload }
    });
    let mut host_end = Host {
        r: FrameReader::new(h.try_clone().unwrap()),
        w: FrameWriter::new(h),
    };
    let out = host(&mut host_end);
    drop(host_end);
    let deadline = Instant::now() + STEP;
    while !agent.is_finished() {
        assert!(Instant::now() < deadline, "the session did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    (out, agent.join().unwrap())
}

fn spec(script: &str) -> RunSpec {
    RunSpec {
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/usr/bin:/bin".into()],
        cwd: "/".into(),
        user: String::new(),
        hostname: "cell".into(),
        rootfs: RootfsSpec {
            device: "/dev/vda".into(),
            fstype: "erofs".into(),
        },
        overlay_bytes: None,
        devices: vec![],
        device_wait_ms: 0,
        gpu: None,
        pod_sandbox: false,
        etc_files: Vec::new(),
        terminal: false,
        window: None,
        volumes: Vec::new(),
    }
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(payload.len() + 1)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    f.push(kind);
    f.extend_from_slice(payload);
    f
}

#[test]
fn a_run_from_hello_to_exit_code() {
    let gpu = DeviceMatch {
        vendor: 0x10de,
        device: 0x2335,
    };
    let workload = ChildWorkload::new().with_device("0000:01:00.0", 0x10de, 0x2335, 0x030200);
    let mut s = spec("echo out; echo err >&2; echo more; exit 3");
    s.devices = vec![gpu];
    s.device_wait_ms = 5000;
    let (out, mut ended) = session(workload, &["loading module x failed"], |host| {
        let hello = host.hello();
        assert_eq!(hello.version, PROTOCOL_VERSION);
        assert_eq!(hello.agent, env!("CARGO_PKG_VERSION"));
        assert_eq!((hello.kernel.as_str(), hello.uptime_ms), ("6.1.0-test", 42));
        host.send(FromHost::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }));
        host.send(FromHost::Run(Box::new(s)));
        assert_eq!(
            host.recv(),
            FromGuest::Log {
                message: "loading module x failed".into()
            }
        );
        assert_eq!(
            host.recv(),
            FromGuest::Devices(vec![DeviceInfo {
                bdf: "0000:01:00.0".into(),
                vendor: 0x10de,
                device: 0x2335,
                class: 0x030200,
            }])
        );
        let pid = host.started();
        let out = host.until_exit();
        host.send(FromHost::Shutdown);
        host.closed();
        (pid, out)
    });
    ended.result.unwrap();
    let (pid, out) = out;
    assert_eq!(Some(pid), ended.workload.pid.map(Pid::as_raw));
    assert_eq!(out.stdout, b"out\nmore\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.unwrap().shell_code(), 3);
    assert_eq!(ended.workload.final_status().code, Some(3));
}

#[test]
fn stdin_beyond_the_buffer_reaches_the_workload_and_comes_back_whole() {
    // Three times the agent's stdin buffer: it must stop reading the channel and resume.
    let data: Vec<u8> = (0..3usize << 20).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let (out, mut ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("exec cat"));
        let mut w = FrameWriter::new(host.w.get_ref().try_clone().unwrap());
        let writer = std::thread::spawn(move || {
            for chunk in sent.chunks(MAX_DATA_PAYLOAD) {
                FromHost::Stdin(chunk.to_vec()).send(&mut w).unwrap();
            }
            FromHost::StdinEof.send(&mut w).unwrap();
        });
        let out = host.until_exit();
        writer.join().unwrap();
        out
    });
    ended.result.unwrap();
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "stdout differs from stdin");
    assert_eq!(out.status.unwrap().code, Some(0));
    assert_eq!(ended.workload.final_status().code, Some(0));
}

#[test]
fn host_signals_reach_the_workload_and_bad_ones_are_ignored() {
    let t = Instant::now();
    let (out, mut ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("exec sleep 30"));
        // Neither ends the run: an invalid signal number, a message out of place.
        host.send(FromHost::Signal(9999));
        host.send(FromHost::Hello(HostHello { version: 1 }));
        host.send(FromHost::Signal(libc::SIGTERM));
        host.until_exit()
    });
    ended.result.unwrap();
    assert_eq!(out.status.unwrap().signal, Some(libc::SIGTERM));
    assert_eq!(ended.workload.final_status().signal, Some(libc::SIGTERM));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn output_written_after_the_exit_is_drained() {
    let (out, ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("echo first; (sleep 0.3; echo late) & exit 0"));
        host.until_exit()
    });
    ended.result.unwrap();
    assert_eq!(out.stdout, b"first\nlate\n");
    assert_eq!(out.status.unwrap().code, Some(0));
}

#[test]
fn shutdown_kills_the_workload_and_ends_the_session_quietly() {
    let ((), mut ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("exec sleep 30"));
        host.send(FromHost::Shutdown);
        host.closed();
    });
    ended.result.unwrap();
    assert_eq!(ended.workload.final_status().signal, Some(libc::SIGKILL));
}

#[test]
fn after_the_exit_the_agent_holds_the_channel_until_the_host_says_shutdown() {
    let (held, ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("exit 0"));
        host.until_exit();
        // Still open well after the exit: a read times out instead of seeing EOF.
        host.r
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let held = matches!(host.try_recv(), Err(FrameError::Io(ref e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        host.r.get_ref().set_read_timeout(Some(STEP)).unwrap();
        let asked = Instant::now();
        host.send(FromHost::Shutdown);
        host.closed();
        (held, asked.elapsed())
    });
    ended.result.unwrap();
    assert!(
        held.0,
        "the agent closed the channel before the host's Shutdown"
    );
    assert!(
        held.1 < Duration::from_secs(2),
        "Shutdown took {:?}",
        held.1
    );
}

#[test]
fn a_vanished_host_kills_the_workload() {
    let ((), mut ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("exec sleep 30"));
    });
    assert!(
        matches!(ended.result, Err(SessionError::Frame(FrameError::Closed))),
        "{:?}",
        ended.result
    );
    assert_eq!(ended.workload.final_status().signal, Some(libc::SIGKILL));
}

#[test]
fn an_oversized_frame_during_the_run_is_refused_and_reported() {
    let (message, mut ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("exec sleep 30"));
        // Announces 4 GiB of stdin: refused on the header, before any allocation.
        host.raw(&[0xff, 0xff, 0xff, 0xff, Kind::Stdin as u8]);
        let message = host.error();
        host.closed();
        message
    });
    assert_eq!(
        message,
        "channel: frame of kind Stdin announces 4294967294 payload bytes, over the limit of 65536"
    );
    assert!(
        matches!(
            ended.result,
            Err(SessionError::Frame(FrameError::TooLarge {
                kind: Kind::Stdin,
                ..
            }))
        ),
        "{:?}",
        ended.result
    );
    assert_eq!(ended.workload.final_status().signal, Some(libc::SIGKILL));
}

#[test]
fn a_hostile_handshake_is_refused_with_a_clear_error() {
    let hello = frame(
        Kind::HostHello as u8,
        format!(r#"{{"version":{PROTOCOL_VERSION}}}"#).as_bytes(),
    );
    let oversized_run = {
        let len = u32::try_from(MAX_RUN_PAYLOAD + 2).unwrap();
        let mut f = len.to_be_bytes().to_vec();
        f.push(Kind::Run as u8);
        f
    };
    let cases: Vec<(&str, Vec<u8>, &str)> =
        vec![
        (
            "another version",
            frame(Kind::HostHello as u8, br#"{"version":99}"#),
            "host speaks protocol version 99, the agent 3",
        ),
        (
            "run before hello",
            frame(Kind::Run as u8, &FromHost::Run(Box::new(spec("true"))).encode().1),
            "host sent Run where the agent expected Hello",
        ),
        (
            "malformed run",
            [hello.clone(), frame(Kind::Run as u8, br#"{"args":"#)].concat(),
            "channel: frame of kind Run carries a malformed payload: ",
        ),
        (
            "a run spec missing fields",
            [hello.clone(), frame(Kind::Run as u8, br#"{"args":[]}"#)].concat(),
            "channel: frame of kind Run carries a malformed payload: missing field",
        ),
        (
            "a guest kind",
            frame(Kind::Stdout as u8, b"x"),
            "channel: frame of kind Stdout is not allowed in this direction",
        ),
        (
            "an unknown kind",
            frame(0xee, b""),
            "channel: unknown frame kind 0xee",
        ),
        (
            "an empty frame",
            vec![0, 0, 0, 0, Kind::HostHello as u8],
            "channel: frame of length 0 (a frame carries at least its kind byte)",
        ),
        (
            "an oversized run",
            [hello.clone(), oversized_run].concat(),
            "channel: frame of kind Run announces 25165825 payload bytes, over the limit of 25165824",
        ),
        (
            "a truncated frame",
            hello[..hello.len() - 2].to_vec(),
            "channel: peer closed the channel in the middle of a frame",
        ),
    ];
    for (what, bytes, expected) in cases {
        let (message, ended) = session(ChildWorkload::new(), &[], |host| {
            host.hello();
            host.raw(&bytes);
            if what == "a truncated frame" {
                host.w
                    .get_ref()
                    .shutdown(std::net::Shutdown::Write)
                    .unwrap();
            }
            let message = host.error();
            host.closed();
            message
        });
        assert!(
            message.starts_with(expected),
            "{what}: got `{message}`, expected `{expected}...`"
        );
        assert!(ended.result.is_err(), "{what}");
        assert!(!ended.workload.started(), "{what}");
    }
}

#[test]
fn shutdown_or_a_vanished_host_during_the_handshake_starts_nothing() {
    let ((), ended) = session(ChildWorkload::new(), &[], |host| {
        host.hello();
        host.send(FromHost::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }));
        host.send(FromHost::Shutdown);
        host.closed();
    });
    ended.result.unwrap();
    assert!(!ended.workload.started());

    let ((), ended) = session(ChildWorkload::new(), &[], |host| {
        host.hello();
    });
    assert!(
        matches!(ended.result, Err(SessionError::Frame(FrameError::Closed))),
        "{:?}",
        ended.result
    );
    assert!(!ended.workload.started());
}

#[test]
fn missing_devices_are_named_after_the_wait() {
    let workload = ChildWorkload::new().with_device("0000:01:00.0", 0x10de, 0x2335, 0x030200);
    let mut s = spec("true");
    s.devices = vec![
        DeviceMatch {
            vendor: 0x10de,
            device: 0x2335,
        },
        DeviceMatch {
            vendor: 0x1234,
            device: 0x11e8,
        },
    ];
    s.device_wait_ms = 50;
    let t = Instant::now();
    let ((seen, message), ended) = session(workload, &[], |host| {
        host.handshake(s);
        let seen = host.recv();
        (seen, host.error())
    });
    assert!(t.elapsed() >= Duration::from_millis(50));
    match seen {
        FromGuest::Devices(d) => {
            assert_eq!(d.len(), 1);
            assert_eq!(d[0].bdf, "0000:01:00.0");
        }
        m => panic!("expected Devices, got {m:?}"),
    }
    assert_eq!(
        message,
        "PCI device(s) 1234:11e8 did not appear within 50 ms"
    );
    assert!(matches!(
        ended.result,
        Err(SessionError::MissingDevices(..))
    ));
    assert!(!ended.workload.started());
}

#[test]
fn a_workload_that_cannot_start_is_reported() {
    let mut s = spec("");
    s.args = vec!["/nonexistent/workload".into()];
    let (message, ended) = session(ChildWorkload::new(), &[], |host| {
        host.handshake(s);
        assert_eq!(host.recv(), FromGuest::Devices(vec![]));
        let message = host.error();
        host.closed();
        message
    });
    assert!(
        message.starts_with("starting the workload failed: /nonexistent/workload: "),
        "{message}"
    );
    assert!(matches!(
        ended.result,
        Err(SessionError::Workload(WorkloadError::Container(
            ContainerError::Child(_)
        )))
    ));
}

mod procs;
mod tty;
