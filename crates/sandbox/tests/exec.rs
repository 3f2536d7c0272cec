//! Execs in a running sandbox against a fake agent over a socketpair: the relay runs the
//! session, the test starts processes through the event sender as the shim does, the
//! fake agent answers by id (echoes stdin as stdout, exits on stdin EOF or a signal).

#![allow(clippy::unwrap_used)]

use std::io::{Cursor, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpucell_protocol::{
    ExitStatus, FrameReader, FrameWriter, FromGuest, FromHost, GuestHello, ProcSpec, RootfsSpec,
    RunSpec, PROTOCOL_VERSION,
};
use gpucell_sandbox::channel::{relay, Limits, SessionIo};
use gpucell_sandbox::{event_channel, EventSender, ExecError, ProcIo};

fn spec() -> RunSpec {
    RunSpec {
        args: vec!["/bin/sleep".into()],
        env: vec![],
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

fn proc_spec(cmd: &str) -> ProcSpec {
    ProcSpec {
        args: vec![cmd.into()],
        env: vec![],
        cwd: "/".into(),
        user: String::new(),
        container: None,
        terminal: false,
        window: None,
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// The fake agent: the workload runs until the host signals it; each exec echoes its
/// stdin to stdout and exits 0 on EOF, or by the signal it is sent; `fail` is refused.
fn agent(stream: UnixStream) {
    let mut w = FrameWriter::new(stream.try_clone().unwrap());
    let mut r = FrameReader::new(stream);
    let mut send = |m: FromGuest| m.send(&mut w).unwrap();
    send(FromGuest::Hello(GuestHello {
        version: PROTOCOL_VERSION,
        agent: "fake".into(),
        kernel: "6.1.0-test".into(),
        uptime_ms: 1,
    }));
    loop {
        let Ok(frame) = r.read_frame() else { return };
        match FromHost::decode(frame).unwrap() {
            FromHost::Run(_) => send(FromGuest::Started { pid: 1 }),
            FromHost::ProcStart(p) if p.spec.args[0] == "fail" => send(FromGuest::ProcError {
                id: p.id,
                message: "no such file".into(),
            }),
            FromHost::ProcStart(p) => {
                send(FromGuest::ProcStarted {
                    id: p.id,
                    pid: 100 + p.id as i32,
                });
                // Output for an id the host never started is dropped.
                send(FromGuest::ProcStdout {
                    id: 999,
                    data: b"stray".to_vec(),
                });
            }
            FromHost::ProcStdin { id, data } => send(FromGuest::ProcStdout { id, data }),
            FromHost::ProcStdinEof { id } => send(FromGuest::ProcExited {
                id,
                status: ExitStatus {
                    code: Some(0),
                    signal: None,
                },
            }),
            FromHost::ProcSignal { id, signal } => send(FromGuest::ProcExited {
                id,
                status: ExitStatus {
                    code: None,
                    signal: Some(signal),
                },
            }),
            FromHost::Signal(s) => send(FromGuest::Exited(ExitStatus {
                code: None,
                signal: Some(s),
            })),
            FromHost::Shutdown => return,
            _ => {}
        }
    }
}

/// Runs a session with the fake agent; `body` gets the sender once the workload runs.
fn with_sandbox(body: impl FnOnce(&EventSender)) {
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = std::thread::spawn(move || agent(guest));
    let (tx, rx) = event_channel();
    let relay = std::thread::spawn(move || {
        let io = SessionIo {
            stdout: Box::new(Sink::default()),
            stderr: Box::new(Sink::default()),
            stdin: None,
        };
        let limits = Limits {
            hello_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(10),
            run_timeout: Some(Duration::from_secs(30)),
            ..Limits::default()
        };
        relay(
            host.try_clone().unwrap(),
            host,
            &spec(),
            io,
            &limits,
            rx,
            &mut || None,
        )
    });
    // The table opens at Started: retry until it does.
    for _ in 0..200 {
        match tx.exec(proc_spec("fail"), io(Sink::default(), None)) {
            Err(ExecError::NotRunning) => std::thread::sleep(Duration::from_millis(10)),
            _ => break,
        }
    }
    body(&tx);
    tx.signal(15);
    let report = relay.join().unwrap().unwrap();
    assert_eq!(report.status.signal, Some(15));
    agent.join().unwrap();
}

fn io(out: Sink, stdin: Option<Box<dyn std::io::Read + Send>>) -> ProcIo {
    ProcIo {
        stdout: Box::new(out),
        stderr: Box::new(Sink::default()),
        stdin,
    }
}

#[test]
fn an_exec_before_the_workload_runs_is_refused() {
    let (tx, _rx) = event_channel();
    let err = tx.exec(proc_spec("true"), io(Sink::default(), None));
    assert_eq!(err.unwrap_err(), ExecError::NotRunning);
}

#[test]
fn an_exec_gets_its_pid_stdin_output_and_exit() {
    with_sandbox(|tx| {
        let out = Sink::default();
        let stdin = Box::new(Cursor::new(b"hello exec".to_vec()));
        let h = tx
            .exec(proc_spec("cat"), io(out.clone(), Some(stdin)))
            .unwrap();
        assert_eq!(h.pid(), 100 + h.id() as i32);
        assert_eq!(h.wait().unwrap().code, Some(0));
        assert_eq!(out.take(), b"hello exec");
    });
}

#[test]
fn refused_killed_and_orphaned_execs_end_as_they_should() {
    with_sandbox(|tx| {
        let err = tx.exec(proc_spec("fail"), io(Sink::default(), None));
        assert_eq!(err.unwrap_err(), ExecError::Refused("no such file".into()));
        // A stdin that never ends keeps the exec running until it is killed.
        let (keep, never) = UnixStream::pair().unwrap();
        let h = tx
            .exec(
                proc_spec("sleep"),
                io(Sink::default(), Some(Box::new(never))),
            )
            .unwrap();
        assert_eq!(
            h.wait_timeout(Some(Duration::from_millis(200))).unwrap(),
            None
        );
        h.signal(9).unwrap();
        assert_eq!(h.wait().unwrap().signal, Some(9));
        drop(keep);
    });
    // An exec still running when the session ends learns that it did.
    let (keep, never) = UnixStream::pair().unwrap();
    let mut running = None;
    with_sandbox(|tx| {
        running = Some(
            tx.exec(
                proc_spec("sleep"),
                io(Sink::default(), Some(Box::new(never))),
            )
            .unwrap(),
        );
    });
    let err = running.unwrap().wait().unwrap_err();
    assert!(matches!(err, ExecError::SessionEnded(_)), "{err}");
    drop(keep);
}
