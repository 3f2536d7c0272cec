//! The host side of the agent protocol against a fake guest over a socketpair:
//! the happy path, stdin and signals, and a guest that is silent, floods, lies or
//! sends garbage.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gpucell_protocol::{
    ExitStatus, FrameReader, FrameWriter, FromGuest, FromHost, GuestHello, Kind, RootfsSpec,
    RunSpec, PROTOCOL_VERSION,
};
use gpucell_sandbox::channel::{relay, Limits, SessionError, SessionIo};
use gpucell_sandbox::event_channel;

fn spec() -> RunSpec {
    RunSpec {
        args: vec!["/bin/true".into()],
        env: vec!["PATH=/bin".into()],
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

fn hello() -> FromGuest {
    FromGuest::Hello(GuestHello {
        version: PROTOCOL_VERSION,
        agent: "fake".into(),
        kernel: "6.1.0-test".into(),
        uptime_ms: 42,
    })
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

/// Counts and hashes without keeping the bytes.
#[derive(Clone, Default)]
struct Counter(Arc<Mutex<(u64, u64)>>);
impl Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut g = self.0.lock().unwrap();
        g.0 += b.len() as u64;
        for &x in b {
            g.1 = g.1.wrapping_mul(31).wrapping_add(x as u64);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Guest {
    w: FrameWriter<UnixStream>,
    r: FrameReader<UnixStream>,
}
impl Guest {
    fn send(&mut self, m: FromGuest) {
        m.send(&mut self.w).unwrap();
    }
    fn recv(&mut self) -> FromHost {
        FromHost::decode(self.r.read_frame().unwrap()).unwrap()
    }
    /// Reads the host's Hello and Run.
    fn handshake(&mut self) -> RunSpec {
        assert!(matches!(self.recv(), FromHost::Hello(h) if h.version == PROTOCOL_VERSION));
        match self.recv() {
            FromHost::Run(s) => *s,
            m => panic!("expected Run, got {m:?}"),
        }
    }
}

struct Run {
    result: Result<gpucell_sandbox::SessionReport, SessionError>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    elapsed: Duration,
}

fn run_with<F>(
    limits: Limits,
    stdin: Option<Box<dyn Read + Send>>,
    signals: &[(Duration, i32)],
    guest: F,
) -> (Run, JoinHandle<()>)
where
    F: FnOnce(Guest) + Send + 'static,
{
    let (host, g) = UnixStream::pair().unwrap();
    let gw = g.try_clone().unwrap();
    let h = std::thread::spawn(move || {
        guest(Guest {
            w: FrameWriter::new(gw),
            r: FrameReader::new(g),
        })
    });
    let (tx, rx) = event_channel();
    for &(after, sig) in signals {
        let tx = tx.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            tx.signal(sig);
        });
    }
    let out = Sink::default();
    let err = Sink::default();
    let io = SessionIo {
        stdout: Box::new(out.clone()),
        stderr: Box::new(err.clone()),
        stdin,
    };
    let start = Instant::now();
    let reader = host.try_clone().unwrap();
    let result = relay(
        reader,
        host.try_clone().unwrap(),
        &spec(),
        io,
        &limits,
        rx,
        &mut || None,
    );
    let elapsed = start.elapsed();
    host.shutdown(std::net::Shutdown::Both).ok();
    let stdout = out.0.lock().unwrap().clone();
    let stderr = err.0.lock().unwrap().clone();
    (
        Run {
            result,
            stdout,
            stderr,
            elapsed,
        },
        h,
    )
}

fn quick() -> Limits {
    Limits {
        hello_timeout: Duration::from_secs(2),
        start_timeout: Duration::from_secs(2),
        run_timeout: Some(Duration::from_secs(10)),
        signal_grace: Duration::from_secs(2),
        max_log_bytes: 1024,
    }
}

#[test]
fn happy_path_relays_output_and_exit_code() {
    let (run, h) = run_with(quick(), None, &[], |mut g| {
        g.send(hello());
        let spec = g.handshake();
        assert_eq!(spec.args, vec!["/bin/true".to_string()]);
        assert!(matches!(g.recv(), FromHost::StdinEof));
        g.send(FromGuest::Devices(vec![]));
        g.send(FromGuest::Started { pid: 7 });
        g.send(FromGuest::Stdout(b"hello ".to_vec()));
        g.send(FromGuest::Stderr(b"oops".to_vec()));
        g.send(FromGuest::Stdout(b"world".to_vec()));
        g.send(FromGuest::Exited(ExitStatus {
            code: Some(3),
            signal: None,
        }));
        // The host asks the agent to power off once the workload is done.
        assert!(matches!(g.recv(), FromHost::Shutdown));
    });
    h.join().unwrap();
    let report = run.result.unwrap();
    assert_eq!(report.status.shell_code(), 3);
    assert_eq!(report.guest_pid, Some(7));
    assert_eq!(report.hello.uptime_ms, 42);
    assert_eq!(run.stdout, b"hello world");
    assert_eq!(run.stderr, b"oops");
    assert_eq!(report.stdout_bytes, 11);
}

#[test]
fn stdin_is_forwarded_then_closed() {
    let input = vec![b'x'; 200_000];
    let expect = input.clone();
    let (run, h) = run_with(
        quick(),
        Some(Box::new(std::io::Cursor::new(input))),
        &[],
        move |mut g| {
            g.send(hello());
            g.handshake();
            g.send(FromGuest::Started { pid: 1 });
            let mut got = Vec::new();
            loop {
                match g.recv() {
                    FromHost::Stdin(d) => got.extend(d),
                    FromHost::StdinEof => break,
                    m => panic!("unexpected {m:?}"),
                }
            }
            assert_eq!(got, expect);
            g.send(FromGuest::Exited(ExitStatus {
                code: Some(0),
                signal: None,
            }));
        },
    );
    h.join().unwrap();
    assert_eq!(run.result.unwrap().status.shell_code(), 0);
}

#[test]
fn signals_are_forwarded_to_the_workload() {
    let (run, h) = run_with(
        quick(),
        None,
        &[(Duration::from_millis(200), 15)],
        |mut g| {
            g.send(hello());
            g.handshake();
            g.recv(); // StdinEof
            g.send(FromGuest::Started { pid: 1 });
            match g.recv() {
                FromHost::Signal(15) => {}
                m => panic!("expected Signal(15), got {m:?}"),
            }
            g.send(FromGuest::Exited(ExitStatus {
                code: None,
                signal: Some(15),
            }));
        },
    );
    h.join().unwrap();
    let report = run.result.unwrap();
    assert_eq!(report.status.shell_code(), 143);
    assert_eq!(report.signals_forwarded, vec![15]);
}

#[test]
fn a_workload_ignoring_signals_is_given_up_on_after_the_grace_period() {
    let (run, _h) = run_with(
        quick(),
        None,
        &[(Duration::from_millis(100), 2)],
        |mut g| {
            g.send(hello());
            g.handshake();
            g.send(FromGuest::Started { pid: 1 });
            std::thread::sleep(Duration::from_secs(5));
        },
    );
    assert!(
        matches!(run.result, Err(SessionError::Interrupted(2))),
        "{:?}",
        run.result.err()
    );
    assert!(run.elapsed < Duration::from_secs(4), "{:?}", run.elapsed);
}

#[test]
fn a_silent_guest_times_out() {
    let (run, _h) = run_with(quick(), None, &[], |g| {
        std::thread::sleep(Duration::from_secs(4));
        drop(g);
    });
    assert!(
        matches!(run.result, Err(SessionError::HelloTimeout(_))),
        "{:?}",
        run.result.err()
    );
    assert!(run.elapsed >= Duration::from_secs(2) && run.elapsed < Duration::from_secs(3));
}

#[test]
fn a_guest_that_never_starts_the_workload_times_out() {
    let (run, _h) = run_with(quick(), None, &[], |mut g| {
        g.send(hello());
        g.handshake();
        std::thread::sleep(Duration::from_secs(4));
    });
    assert!(
        matches!(run.result, Err(SessionError::StartTimeout(_))),
        "{:?}",
        run.result.err()
    );
}

#[test]
fn oversized_frame_is_refused() {
    let (run, _h) = run_with(quick(), None, &[], |mut g| {
        g.send(hello());
        g.handshake();
        // Announces 1 GiB of stdout.
        let mut hdr = (1u32 << 30).to_be_bytes().to_vec();
        hdr.push(Kind::Stdout as u8);
        g.w.get_mut().write_all(&hdr).unwrap();
        std::thread::sleep(Duration::from_secs(1));
    });
    let err = run.result.unwrap_err();
    assert!(matches!(err, SessionError::Protocol(_)), "{err}");
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("over the limit"), "{chain}");
}

#[test]
fn garbage_is_refused() {
    let (run, _h) = run_with(quick(), None, &[], |mut g| {
        g.w.get_mut().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_secs(1));
    });
    assert!(
        matches!(run.result, Err(SessionError::Protocol(_))),
        "{:?}",
        run.result.err()
    );
}

#[test]
fn out_of_order_and_wrong_version_are_refused() {
    let (run, _h) = run_with(quick(), None, &[], |mut g| {
        g.send(FromGuest::Exited(ExitStatus {
            code: Some(0),
            signal: None,
        }));
        std::thread::sleep(Duration::from_secs(1));
    });
    assert!(matches!(
        run.result,
        Err(SessionError::Unexpected {
            expected: "Hello",
            ..
        })
    ));

    let (run, _h) = run_with(quick(), None, &[], |mut g| {
        g.send(hello());
        g.handshake();
        g.send(FromGuest::Exited(ExitStatus {
            code: Some(0),
            signal: None,
        }));
        std::thread::sleep(Duration::from_secs(1));
    });
    assert!(
        matches!(run.result, Err(SessionError::Unexpected { .. })),
        "exit before start"
    );

    let (run, _h) = run_with(quick(), None, &[], |mut g| {
        g.send(FromGuest::Hello(GuestHello {
            version: PROTOCOL_VERSION + 1,
            agent: "x".into(),
            kernel: "x".into(),
            uptime_ms: 0,
        }));
        std::thread::sleep(Duration::from_secs(1));
    });
    assert!(matches!(run.result, Err(SessionError::Version { .. })));
}

#[test]
fn a_guest_closing_early_is_reported() {
    let (run, _h) = run_with(quick(), None, &[], |mut g| {
        g.send(hello());
        g.handshake();
        assert!(matches!(g.recv(), FromHost::StdinEof));
        g.send(FromGuest::Started { pid: 1 });
    });
    assert!(
        matches!(run.result, Err(SessionError::ChannelClosed)),
        "{:?}",
        run.result.err()
    );
}

#[test]
fn agent_errors_are_reported() {
    let (run, _h) = run_with(quick(), None, &[], |mut g| {
        g.send(hello());
        g.handshake();
        g.send(FromGuest::Error {
            message: "no such file: /bin/nope".into(),
        });
        std::thread::sleep(Duration::from_millis(500));
    });
    let err = run.result.unwrap_err();
    assert!(err.to_string().contains("/bin/nope"), "{err}");
}

#[test]
fn a_large_stream_arrives_intact_and_endless_output_hits_the_timeout() {
    // 32 MiB through the relay, checksum compared.
    const TOTAL: usize = 32 << 20;
    let counter = Counter::default();
    let (host, g) = UnixStream::pair().unwrap();
    let gw = g.try_clone().unwrap();
    let h = std::thread::spawn(move || {
        let mut guest = Guest {
            w: FrameWriter::new(gw),
            r: FrameReader::new(g),
        };
        guest.send(hello());
        guest.handshake();
        guest.send(FromGuest::Started { pid: 1 });
        let chunk: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 256) as u8).collect();
        let mut sent = 0;
        let mut sum = 0u64;
        while sent < TOTAL {
            let n = chunk.len().min(TOTAL - sent);
            for &x in &chunk[..n] {
                sum = sum.wrapping_mul(31).wrapping_add(x as u64);
            }
            guest.send(FromGuest::Stdout(chunk[..n].to_vec()));
            sent += n;
        }
        guest.send(FromGuest::Exited(ExitStatus {
            code: Some(0),
            signal: None,
        }));
        sum
    });
    let (_tx, rx) = event_channel();
    let io = SessionIo {
        stdout: Box::new(counter.clone()),
        stderr: Box::new(std::io::sink()),
        stdin: None,
    };
    let r = relay(
        host.try_clone().unwrap(),
        host.try_clone().unwrap(),
        &spec(),
        io,
        &quick(),
        rx,
        &mut || None,
    );
    let sum = h.join().unwrap();
    assert_eq!(r.unwrap().stdout_bytes, TOTAL as u64);
    let got = *counter.0.lock().unwrap();
    assert_eq!(got, (TOTAL as u64, sum));

    // A guest that never stops writing still hits the run timeout.
    let mut limits = quick();
    limits.run_timeout = Some(Duration::from_secs(1));
    let (run, _h) = run_with(limits, None, &[], |mut g| {
        g.send(hello());
        g.handshake();
        g.send(FromGuest::Started { pid: 1 });
        let chunk = vec![b'y'; 65536];
        while FromGuest::Stdout(chunk.clone()).send(&mut g.w).is_ok() {}
    });
    assert!(
        matches!(run.result, Err(SessionError::Timeout(_))),
        "{:?}",
        run.result.err()
    );
    assert!(run.elapsed < Duration::from_secs(3));
    assert!(!run.stdout.is_empty());
}

#[test]
fn log_floods_are_capped_and_a_dead_vm_is_noticed() {
    let (run, _h) = run_with(quick(), None, &[], |mut g| {
        g.send(hello());
        g.handshake();
        for _ in 0..1000 {
            g.send(FromGuest::Log {
                message: "z".repeat(1000),
            });
        }
        g.send(FromGuest::Started { pid: 1 });
        g.send(FromGuest::Exited(ExitStatus {
            code: Some(0),
            signal: None,
        }));
    });
    let report = run.result.unwrap();
    assert!(
        report.log_bytes_dropped >= 999 * 1000,
        "{}",
        report.log_bytes_dropped
    );

    let (host, _g) = UnixStream::pair().unwrap();
    let (_tx, rx) = event_channel();
    let io = SessionIo {
        stdout: Box::new(std::io::sink()),
        stderr: Box::new(std::io::sink()),
        stdin: None,
    };
    let start = Instant::now();
    let mut polls = 0;
    let r = relay(
        host.try_clone().unwrap(),
        host,
        &spec(),
        io,
        &quick(),
        rx,
        &mut || {
            polls += 1;
            (polls > 3).then(|| "QEMU exited with signal 9".to_string())
        },
    );
    let err = r.unwrap_err();
    assert!(err.to_string().contains("signal 9"), "{err}");
    // Noticed, then frames in flight drained for a bounded time.
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_signal_during_boot_cancels_the_run() {
    let (run, _h) = run_with(quick(), None, &[(Duration::from_millis(100), 2)], |g| {
        std::thread::sleep(Duration::from_secs(3));
        drop(g);
    });
    assert!(
        matches!(run.result, Err(SessionError::Interrupted(2))),
        "{:?}",
        run.result.err()
    );
    assert!(run.elapsed < Duration::from_secs(1));
}

#[test]
fn an_exit_still_in_flight_when_the_vm_powers_off_is_not_lost() {
    let (host, g) = UnixStream::pair().unwrap();
    let gw = g.try_clone().unwrap();
    let _h = std::thread::spawn(move || {
        let mut guest = Guest {
            w: FrameWriter::new(gw),
            r: FrameReader::new(g),
        };
        guest.send(hello());
        guest.handshake();
        guest.recv(); // StdinEof
        guest.send(FromGuest::Started { pid: 1 });
        // The host sees the VM gone before these arrive (a lagging reader).
        std::thread::sleep(Duration::from_millis(400));
        guest.send(FromGuest::Stdout(b"last words".to_vec()));
        guest.send(FromGuest::Exited(ExitStatus {
            code: Some(5),
            signal: None,
        }));
        std::thread::sleep(Duration::from_secs(3));
    });
    let (_tx, rx) = event_channel();
    let out = Sink::default();
    let io = SessionIo {
        stdout: Box::new(out.clone()),
        stderr: Box::new(std::io::sink()),
        stdin: None,
    };
    let mut started = false;
    let report = relay(
        host.try_clone().unwrap(),
        host,
        &spec(),
        io,
        &quick(),
        rx,
        &mut || {
            // "Gone" from the first poll after the workload started.
            started = true;
            started.then(|| "QEMU exited (exit code 0)".to_string())
        },
    )
    .unwrap();
    assert_eq!(report.status.shell_code(), 5);
    assert_eq!(&*out.0.lock().unwrap(), b"last words");
}

#[test]
fn a_terminal_without_stdin_stays_open_and_resizes_reach_the_agent_once_it_runs() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (host, g) = UnixStream::pair().unwrap();
    g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let gw = g.try_clone().unwrap();
    let got = Arc::new(AtomicBool::new(false));
    let got_guest = Arc::clone(&got);
    let guest = std::thread::spawn(move || {
        let mut g = Guest {
            w: FrameWriter::new(gw),
            r: FrameReader::new(g),
        };
        g.send(hello());
        assert!(g.handshake().terminal);
        g.send(FromGuest::Started { pid: 1 });
        // No StdinEof first: the terminal nobody types on stays open.
        let first = g.recv();
        got_guest.store(true, Ordering::SeqCst);
        g.send(FromGuest::Exited(ExitStatus {
            code: Some(0),
            signal: None,
        }));
        first
    });
    let (tx, rx) = event_channel();
    assert!(tx.resize(0, 80).is_err());
    assert!(tx.resize(24, 10_001).is_err());
    // Until the workload runs a resize is dropped: send until the agent has one.
    let sizer = std::thread::spawn(move || {
        while !got.load(Ordering::SeqCst) {
            tx.resize(50, 132).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let io = SessionIo {
        stdout: Box::new(Sink::default()),
        stderr: Box::new(Sink::default()),
        stdin: None,
    };
    let spec = RunSpec {
        terminal: true,
        ..spec()
    };
    let result = relay(
        host.try_clone().unwrap(),
        host,
        &spec,
        io,
        &quick(),
        rx,
        &mut || None,
    );
    assert_eq!(
        guest.join().unwrap(),
        FromHost::Resize {
            id: None,
            size: gpucell_protocol::WindowSize {
                rows: 50,
                cols: 132
            }
        }
    );
    sizer.join().unwrap();
    assert_eq!(result.unwrap().status.code, Some(0));
}
