//! A misbehaving guest keeps the host bounded: a fake agent on the other end of a
//! socketpair floods output and logs, sends garbage, drips a frame byte by byte, says
//! nothing while holding the channel open, or stops reading what the host sends. Each
//! ends with a clear error (or a clean exit), the host's resident memory stays flat
//! (measured from /proc/self/status), and no thread is left behind once the channel is
//! closed.
//!
//! One test in its own binary, so that no other test's memory or threads are counted.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpucell_protocol::{
    ExitStatus, FrameReader, FrameWriter, FromGuest, FromHost, GuestHello, Kind, RootfsSpec,
    RunSpec, MAX_CONTROL_PAYLOAD, MAX_DATA_PAYLOAD, PROTOCOL_VERSION,
};
use gpucell_sandbox::channel::{relay, Limits, SessionError, SessionIo, SessionReport};
use gpucell_sandbox::event_channel;

fn spec() -> RunSpec {
    RunSpec {
        args: vec!["/bin/true".into()],
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

fn limits() -> Limits {
    Limits {
        hello_timeout: Duration::from_secs(2),
        start_timeout: Duration::from_secs(2),
        run_timeout: Some(Duration::from_secs(60)),
        signal_grace: Duration::from_secs(1),
        max_log_bytes: 64 * 1024,
    }
}

fn status_field(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

fn rss_kib() -> u64 {
    status_field("VmRSS:")
}

fn threads() -> u64 {
    status_field("Threads:")
}

/// Samples VmRSS every 5 ms until dropped; `peak()` is the highest seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start() -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib()));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Sampler {
            stop,
            peak,
            handle: Some(handle),
        }
    }
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// An output sink that is slow (a terminal, a full pipe) and keeps nothing.
struct Slow {
    bytes: Arc<AtomicU64>,
    delay: Duration,
}
impl Write for Slow {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        self.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Outcome {
    result: Result<SessionReport, SessionError>,
    elapsed: Duration,
    stdout_bytes: u64,
}

/// Runs one session against `guest` (given its end of the channel), closes the host's
/// end afterwards as the sandbox does, and joins the guest.
fn session(
    delay: Duration,
    limits: &Limits,
    guest: impl FnOnce(UnixStream) + Send + 'static,
) -> Outcome {
    session_with(delay, limits, None, guest)
}

/// As [`session`], with the workload's stdin fed from `stdin` and host writes bounded by
/// the send timeout the sandbox puts on every agent connection.
fn session_with(
    delay: Duration,
    limits: &Limits,
    stdin: Option<Box<dyn std::io::Read + Send>>,
    guest: impl FnOnce(UnixStream) + Send + 'static,
) -> Outcome {
    let (host, g) = UnixStream::pair().unwrap();
    if stdin.is_some() {
        gpucell_sandbox::vsock::set_send_timeout(&host, Duration::from_millis(500)).unwrap();
    }
    let h = std::thread::spawn(move || guest(g));
    let (_tx, rx) = event_channel();
    let bytes = Arc::new(AtomicU64::new(0));
    let io = SessionIo {
        stdout: Box::new(Slow {
            bytes: bytes.clone(),
            delay,
        }),
        stderr: Box::new(std::io::sink()),
        stdin,
    };
    let start = Instant::now();
    let result = relay(
        host.try_clone().unwrap(),
        host.try_clone().unwrap(),
        &spec(),
        io,
        limits,
        rx,
        &mut || None,
    );
    let elapsed = start.elapsed();
    host.shutdown(std::net::Shutdown::Both).ok();
    drop(host);
    h.join().unwrap();
    Outcome {
        result,
        elapsed,
        stdout_bytes: bytes.load(Ordering::Relaxed),
    }
}

fn hello() -> FromGuest {
    FromGuest::Hello(GuestHello {
        version: PROTOCOL_VERSION,
        agent: "fake".into(),
        kernel: "6.1.0-test".into(),
        uptime_ms: 1,
    })
}

/// Says hello, reads the run request, reports the workload started.
fn start(g: &UnixStream) -> FrameWriter<UnixStream> {
    let mut w = FrameWriter::new(g.try_clone().unwrap());
    let mut r = FrameReader::new(g.try_clone().unwrap());
    hello().send(&mut w).unwrap();
    for _ in 0..2 {
        FromHost::decode(r.read_frame().unwrap()).unwrap();
    }
    // Drain whatever else the host sends (StdinEof, Shutdown) so it never blocks.
    std::thread::spawn(move || while r.read_frame().is_ok() {});
    FromGuest::Started { pid: 1 }.send(&mut w).unwrap();
    w
}

/// Waits (bounded) for the thread count to come back to `want`.
fn threads_back_to(want: u64) -> u64 {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let now = threads();
        if now <= want || Instant::now() > until {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stdout flood of `total` bytes in full frames, with logs in between, then an exit.
fn flood(total: usize) -> impl FnOnce(UnixStream) + Send + 'static {
    move |g| {
        let mut w = start(&g);
        let chunk = vec![b'x'; MAX_DATA_PAYLOAD];
        let log = "l".repeat(MAX_CONTROL_PAYLOAD - 64);
        let mut sent = 0;
        while sent < total {
            if FromGuest::Stdout(chunk.clone()).send(&mut w).is_err() {
                return;
            }
            sent += chunk.len();
            if sent % (4 << 20) == 0 {
                let _ = FromGuest::Log {
                    message: log.clone(),
                }
                .send(&mut w);
            }
        }
        let _ = FromGuest::Exited(ExitStatus {
            code: Some(0),
            signal: None,
        })
        .send(&mut w);
    }
}

#[test]
fn a_misbehaving_guest_keeps_host_memory_flat_and_leaves_nothing_behind() {
    // Warm up allocator and thread stacks with one small session.
    let warm = session(Duration::ZERO, &limits(), flood(1 << 20));
    assert!(warm.result.is_ok(), "{:?}", warm.result.err());
    let threads0 = threads_back_to(1);
    let rss0 = rss_kib();
    let sampler = Sampler::start();
    let mut report = Vec::new();

    // 1. 512 MiB of stdout and 128 log messages of 256 KiB, as fast as the guest can.
    const FLOOD: usize = 512 << 20;
    let o = session(Duration::ZERO, &limits(), flood(FLOOD));
    let r = o.result.unwrap();
    assert_eq!(
        (r.stdout_bytes, o.stdout_bytes),
        (FLOOD as u64, FLOOD as u64)
    );
    assert!(r.log_bytes_dropped > 0, "the log budget was used up");
    report.push(format!("fast flood {:?}", o.elapsed));

    // 2. The same guest against a slow terminal: it is throttled, not buffered.
    let mut slow = limits();
    slow.run_timeout = Some(Duration::from_secs(2));
    let o = session(Duration::from_millis(2), &slow, flood(1 << 30));
    assert!(
        matches!(o.result, Err(SessionError::Timeout(_))),
        "{:?}",
        o.result.err()
    );
    assert!(
        o.stdout_bytes < 256 << 20,
        "{} bytes in 2 s at 2 ms a frame?",
        o.stdout_bytes
    );
    assert!(o.elapsed < Duration::from_secs(4), "{:?}", o.elapsed);
    report.push(format!("slow sink {:?}", o.elapsed));

    // 3. Garbage instead of a hello.
    let o = session(Duration::ZERO, &limits(), |mut g| {
        let junk: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let _ = g.write_all(&junk);
        std::thread::sleep(Duration::from_millis(200));
    });
    let err = o.result.unwrap_err();
    assert!(matches!(err, SessionError::Protocol(_)), "{err}");
    assert!(err.to_string().contains("malformed frame"), "{err}");

    // 4. A frame announced at the control limit, then dripped one byte every 20 ms: the
    //    hello deadline fires; the reader blocked in the frame ends when the channel closes.
    let o = session(Duration::ZERO, &limits(), |mut g| {
        let mut header = ((MAX_CONTROL_PAYLOAD + 1) as u32).to_be_bytes().to_vec();
        header.push(Kind::Log as u8);
        g.write_all(&header).unwrap();
        while g.write_all(b"{").is_ok() {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert!(
        matches!(o.result, Err(SessionError::HelloTimeout(_))),
        "{:?}",
        o.result.err()
    );
    assert!(o.elapsed < Duration::from_secs(3), "{:?}", o.elapsed);

    // 5. Silent, holding the channel open; then started but never exiting (run timeout).
    let o = session(Duration::ZERO, &limits(), |g| {
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut &g, &mut buf);
    });
    assert!(
        matches!(o.result, Err(SessionError::HelloTimeout(_))),
        "{:?}",
        o.result.err()
    );
    let mut short = limits();
    short.run_timeout = Some(Duration::from_secs(1));
    let o = session(Duration::ZERO, &short, |g| {
        let _w = start(&g);
        let mut buf = [0u8; 1];
        while std::io::Read::read(&mut &g, &mut buf).unwrap_or(0) > 0 {}
    });
    assert!(
        matches!(o.result, Err(SessionError::Timeout(_))),
        "{:?}",
        o.result.err()
    );
    assert!(o.elapsed < Duration::from_secs(2), "{:?}", o.elapsed);

    // 6. A guest that stops reading while the host forwards endless stdin: host writes
    //    time out, so the run timeout still ends the session and the stdin thread ends.
    //    (Without the send timeout this session hangs for ever.)
    let o = session_with(
        Duration::ZERO,
        &short,
        Some(Box::new(std::io::repeat(b'i'))),
        |g| {
            let mut w = FrameWriter::new(g.try_clone().unwrap());
            let mut r = FrameReader::new(g.try_clone().unwrap());
            hello().send(&mut w).unwrap();
            for _ in 0..2 {
                FromHost::decode(r.read_frame().unwrap()).unwrap();
            }
            FromGuest::Started { pid: 1 }.send(&mut w).unwrap();
            // Never reads again; lives until the host closes the channel.
            let alive = FromGuest::Log {
                message: "alive".into(),
            };
            while alive.send(&mut w).is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        },
    );
    assert!(
        matches!(o.result, Err(SessionError::Timeout(_))),
        "{:?}",
        o.result.err()
    );
    assert!(o.elapsed < Duration::from_secs(4), "{:?}", o.elapsed);

    let peak = sampler.finish();
    let threads1 = threads_back_to(threads0);
    let rss1 = rss_kib();
    eprintln!(
        "rss before {rss0} KiB, peak {peak} KiB, after {rss1} KiB; threads {threads0} -> {threads1}; {report:?}"
    );
    // The queue holds at most 16 frames of 256 KiB; allow for allocator slack.
    assert!(
        peak < rss0 + 32 * 1024,
        "peak RSS grew by {} KiB",
        peak - rss0
    );
    assert!(
        rss1 < rss0 + 16 * 1024,
        "RSS grew by {} KiB",
        rss1.saturating_sub(rss0)
    );
    assert_eq!(
        threads1, threads0,
        "every reader thread ended with its channel"
    );
}
