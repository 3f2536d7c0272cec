//! The host side of the agent protocol: wait for the agent's hello, send the run spec,
//! relay stdin, stdout, stderr and signals, and collect the exit status.
//!
//! The guest is hostile. Frames are size-checked by the protocol crate before any
//! allocation; here every wait has a deadline, the queue between the reader thread and
//! the relay is bounded (a flooding guest is throttled, not buffered), message order is
//! enforced, and agent log messages have a byte budget.

use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpucell_protocol::{
    DeviceInfo, ExitStatus, FrameError, FrameReader, FrameWriter, FromGuest, FromHost, GuestHello,
    HostHello, ProcSpec, RunSpec, WindowSize, MAX_DATA_PAYLOAD, PROTOCOL_VERSION,
};

use crate::exec::{ExecError, ExecHandle, ProcIo, Procs};
use crate::hotplug::Hotplug;

/// Frames queued between the reader thread and the relay (each at most 256 KiB).
const QUEUE_DEPTH: usize = 16;
/// How often the relay checks deadlines and the VM.
const TICK: Duration = Duration::from_millis(50);
/// After the VM is gone, how long frames still in flight are waited for.
const VM_GONE_DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the guest agent did not say hello within {0:?}: the guest kernel or the agent did not come up")]
    HelloTimeout(Duration),
    #[error("the agent did not start the workload within {0:?} of the run request")]
    StartTimeout(Duration),
    #[error("the workload did not finish within the --timeout of {0:?}")]
    Timeout(Duration),
    #[error("the agent sent a malformed frame")]
    Protocol(#[source] FrameError),
    #[error("the agent sent {got} where {expected} was expected")]
    Unexpected { expected: &'static str, got: String },
    #[error("the agent speaks protocol version {theirs}, this gpucell speaks {ours}: rebuild the guest with `gpucell guest build`")]
    Version { ours: u32, theirs: u32 },
    #[error("the agent closed the channel before the workload exited")]
    ChannelClosed,
    #[error("the VM stopped before the workload finished: {0}")]
    VmGone(String),
    #[error("the agent could not run the workload: {0}")]
    Agent(String),
    #[error("sending to the agent failed")]
    Send(#[source] FrameError),
    #[error("interrupted by signal {0} before the workload started or exited")]
    Interrupted(i32),
}

/// Deadlines and budgets of one session.
#[derive(Debug, Clone)]
pub struct Limits {
    /// From the start of the session to the agent's hello (kernel boot + agent start).
    pub hello_timeout: Duration,
    /// From the run request to `Started` (includes the agent's device wait).
    pub start_timeout: Duration,
    /// From the run request to `Exited`; `None` waits for ever.
    pub run_timeout: Option<Duration>,
    /// After a forwarded signal, how long the workload has to exit.
    pub signal_grace: Duration,
    /// Total bytes of agent log messages shown; the rest are counted and dropped.
    pub max_log_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            hello_timeout: Duration::from_secs(60),
            start_timeout: Duration::from_secs(60),
            run_timeout: None,
            signal_grace: Duration::from_secs(10),
            max_log_bytes: 256 * 1024,
        }
    }
}

/// Something that happened, delivered to the relay loop.
#[derive(Debug)]
pub enum Event {
    Guest(FromGuest),
    ChannelError(FrameError),
    ChannelClosed,
    /// A signal gpucell received, to forward to the workload.
    Signal(i32),
    /// The workload's terminal has a new size.
    Resize(WindowSize),
}

/// Where the relay sends events from outside (signal handlers), and where processes
/// besides the workload are started once it runs.
#[derive(Clone)]
pub struct EventSender(SyncSender<Event>, Procs, Hotplug);

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSender")
    }
}

impl EventSender {
    /// Starts `spec` in the running workload's container (an exec) and returns once the
    /// agent started it; its output goes to `io` as it comes.
    pub fn exec(&self, spec: ProcSpec, io: ProcIo) -> Result<ExecHandle, ExecError> {
        self.1.exec(spec, io)
    }

    /// Starts a further container of the pod whose root filesystem disk (`spec.rootfs`)
    /// is already plugged into the VM.
    pub fn add_container(&self, spec: RunSpec, io: ProcIo) -> Result<ExecHandle, ExecError> {
        self.1.add_container(spec, io)
    }

    /// Plugs `disk` (the container's root filesystem, opened read-only) into the running
    /// VM on a spare port, then starts the container on it (`spec.rootfs.device` is set
    /// to the disk's serial; without its own `gpu`, it gets the VM's driver injection).
    /// Returns the container's process and the disk's serial, for
    /// [`EventSender::remove_container_disk`] once it has ended. The VM must have been
    /// made with spare ports ([`crate::Sandbox::with_spare_ports`]).
    pub fn add_container_on_disk(
        &self,
        disk: BorrowedFd<'_>,
        mut spec: RunSpec,
        io: ProcIo,
    ) -> Result<(ExecHandle, String), ExecError> {
        let serial = self
            .2
            .plug(disk)
            .map_err(|e| ExecError::Plug(crate::hotplug::describe(&e)))?;
        spec.rootfs.device = format!("{}{serial}", gpucell_protocol::DISK_SERIAL_PREFIX);
        if spec.gpu.is_none() {
            // The VM's GPUs and driver are the pod's: each container may use them.
            spec.gpu = self.2.gpu();
        }
        match self.1.add_container(spec, io) {
            Ok(h) => Ok((h, serial)),
            Err(e) => {
                // The agent never mounted it: the disk comes out again.
                if let Err(u) = self.remove_container_disk(&serial) {
                    tracing::warn!(error = %u, "unplugging the disk of a container that did not start");
                }
                Err(e)
            }
        }
    }

    /// Unplugs the disk `serial` of an added container that has ended, so that its
    /// port takes another container.
    pub fn remove_container_disk(&self, serial: &str) -> Result<(), ExecError> {
        self.2
            .unplug(serial)
            .map_err(|e| ExecError::Plug(crate::hotplug::describe(&e)))
    }

    /// Waits until the workload runs (execs and added containers may start): `Ok` then;
    /// the session's end or `NotRunning` after `timeout` otherwise.
    pub fn wait_running(&self, timeout: Duration) -> Result<(), ExecError> {
        self.1.wait_open(timeout)
    }

    pub(crate) fn hotplug(&self) -> &Hotplug {
        &self.2
    }

    /// Sets the size of the workload's terminal (`rows` x `cols`, each 1 to 10000; a
    /// workload without a terminal ignores it). Queued like a signal: never blocks, and
    /// a full queue drops it with a warning.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ExecError> {
        let size = WindowSize { rows, cols };
        if let Some(problem) = size.problem() {
            return Err(ExecError::BadSize(problem));
        }
        if let Err(TrySendError::Full(_)) = self.0.try_send(Event::Resize(size)) {
            tracing::warn!(rows, cols, "event queue full, terminal resize dropped");
        }
        Ok(())
    }

    /// Queues a signal for forwarding; never blocks (a full queue drops it with a warning).
    pub fn signal(&self, signal: i32) {
        if let Err(TrySendError::Full(_)) = self.0.try_send(Event::Signal(signal)) {
            tracing::warn!(signal, "event queue full, signal dropped");
        }
    }
}

/// The receiving end, consumed by [`relay`].
pub struct EventReceiver {
    rx: Receiver<Event>,
    tx: SyncSender<Event>,
    procs: Procs,
}

impl std::fmt::Debug for EventReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventReceiver")
    }
}

impl EventReceiver {
    /// The next signal queued for the workload, waiting at most `timeout`; other events
    /// are skipped. For front ends that test their signal plumbing without a sandbox.
    pub fn next_signal(&self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok(Event::Signal(s)) => return Some(s),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}

pub fn event_channel() -> (EventSender, EventReceiver) {
    let (tx, rx) = sync_channel(QUEUE_DEPTH);
    let procs = Procs::default();
    (
        EventSender(tx.clone(), procs.clone(), Hotplug::default()),
        EventReceiver { rx, tx, procs },
    )
}

/// A channel whose workload already runs, without a guest: what would go to the agent
/// is dropped. For tests of front ends that hold a running sandbox's handle.
#[cfg(feature = "test-support")]
pub fn running_event_channel() -> (EventSender, EventReceiver) {
    let (tx, rx) = event_channel();
    tx.1 .0
        .open(Arc::new(|_: &gpucell_protocol::FromHost| Ok(())));
    (tx, rx)
}

/// The workload's standard streams on the host.
pub struct SessionIo {
    pub stdout: Box<dyn Write + Send>,
    pub stderr: Box<dyn Write + Send>,
    /// Forwarded to the workload when set; `None` closes its stdin at once.
    pub stdin: Option<Box<dyn Read + Send>>,
}

/// What happened in a session that ended with the workload's exit.
#[derive(Debug, Clone)]
pub struct SessionReport {
    pub status: ExitStatus,
    pub hello: GuestHello,
    pub devices: Vec<DeviceInfo>,
    /// When the agent reported the devices it found (runs with devices only).
    pub devices_at: Option<Instant>,
    pub guest_pid: Option<i32>,
    pub hello_at: Instant,
    pub run_sent_at: Instant,
    pub started_at: Option<Instant>,
    pub exited_at: Instant,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub signals_forwarded: Vec<i32>,
    pub log_bytes_dropped: u64,
    /// The NVIDIA driver bring-up of a driver flavour, and when it was reported.
    pub driver: Option<gpucell_protocol::DriverReport>,
    pub driver_at: Option<Instant>,
}

type SharedWriter<W> = Arc<Mutex<FrameWriter<W>>>;

fn send<W: Write>(w: &SharedWriter<W>, msg: &FromHost) -> Result<(), SessionError> {
    let mut guard = match w.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    msg.send(&mut guard).map_err(SessionError::Send)
}

fn kind_name(m: &FromGuest) -> String {
    match m {
        FromGuest::Hello(_) => "Hello",
        FromGuest::Devices(_) => "Devices",
        FromGuest::Started { .. } => "Started",
        FromGuest::Stdout(_) => "Stdout",
        FromGuest::Stderr(_) => "Stderr",
        FromGuest::Exited(_) => "Exited",
        FromGuest::Error { .. } => "Error",
        FromGuest::Log { .. } => "Log",
        FromGuest::Driver(_) => "Driver",
        FromGuest::ProcStarted { .. } => "ProcStarted",
        FromGuest::ProcStdout { .. } => "ProcStdout",
        FromGuest::ProcStderr { .. } => "ProcStderr",
        FromGuest::ProcExited { .. } => "ProcExited",
        FromGuest::ProcError { .. } => "ProcError",
    }
    .to_string()
}

/// Runs one session over `reader`/`writer` (two handles of the same channel).
///
/// `vm_gone` is polled every tick and returns why the VM is no longer running, if it
/// isn't. The reader thread ends when the channel is closed or the receiver is gone;
/// the caller closes the channel after this returns.
pub fn relay<R, W>(
    reader: R,
    writer: W,
    spec: &RunSpec,
    io: SessionIo,
    limits: &Limits,
    events: EventReceiver,
    vm_gone: &mut dyn FnMut() -> Option<String>,
) -> Result<SessionReport, SessionError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let EventReceiver { rx, tx, procs } = events;
    spawn_reader(reader, tx);
    let writer: SharedWriter<W> = Arc::new(Mutex::new(FrameWriter::new(writer)));
    let result = relay_inner(&writer, spec, io, limits, rx, &procs, vm_gone);
    procs.0.close(&match &result {
        Ok(r) => format!("its workload exited with {}", r.status.shell_code()),
        Err(e) => e.to_string(),
    });
    // Whatever happened, ask the agent to power off (it does so after Exited anyway).
    // Best effort: the writer's own timeout bounds this.
    if !matches!(
        result,
        Err(SessionError::VmGone(_)) | Err(SessionError::ChannelClosed)
    ) {
        if let Err(e) = send(&writer, &FromHost::Shutdown) {
            tracing::debug!(error = %e, "could not send Shutdown to the agent");
        }
    }
    result
}

fn relay_inner<W: Write + Send + 'static>(
    writer: &SharedWriter<W>,
    spec: &RunSpec,
    mut io: SessionIo,
    limits: &Limits,
    rx: Receiver<Event>,
    procs: &Procs,
    vm_gone: &mut dyn FnMut() -> Option<String>,
) -> Result<SessionReport, SessionError> {
    let begin = Instant::now();
    let mut waiter = Waiter {
        rx,
        vm_gone,
        gone: None,
        size: None,
    };
    // 1. The agent's hello.
    let hello = await_hello(&mut waiter, begin + limits.hello_timeout, limits)?;
    let hello_at = Instant::now();
    // 2. Our hello and the run request (with the terminal's size as last asked for
    // during the boot), then stdin.
    let sized;
    let spec = match waiter.size.take() {
        Some(w) if spec.terminal => {
            sized = RunSpec {
                window: Some(w),
                ..spec.clone()
            };
            &sized
        }
        _ => spec,
    };
    let run_sent_at = send_request(writer, spec, io.stdin.take())?;
    // 3. Relay until the workload exits.
    let mut session = Session {
        writer,
        procs,
        io,
        limits,
        report: SessionReport {
            status: ExitStatus {
                code: None,
                signal: None,
            },
            hello,
            devices: Vec::new(),
            devices_at: None,
            guest_pid: None,
            hello_at,
            run_sent_at,
            started_at: None,
            exited_at: run_sent_at,
            stdout_bytes: 0,
            stderr_bytes: 0,
            signals_forwarded: Vec::new(),
            log_bytes_dropped: 0,
            driver: None,
            driver_at: None,
        },
        start_deadline: run_sent_at + limits.start_timeout,
        run_deadline: limits.run_timeout.map(|t| run_sent_at + t),
        devices_seen: false,
        log_budget: limits.max_log_bytes,
        stdout_ok: true,
        stderr_ok: true,
        first_signal: None,
        pending_size: None,
    };
    loop {
        let (when, err) = match session.deadline() {
            Some((w, e)) => (Some(w), Some(e)),
            None => (None, None),
        };
        let ev = waiter.next(when, || {
            err.unwrap_or(SessionError::Timeout(Duration::ZERO))
        })?;
        if session.on_event(ev, &mut waiter)? {
            return Ok(session.report);
        }
    }
}

/// Takes events from the reader thread and signal handlers while watching the VM.
struct Waiter<'a> {
    rx: Receiver<Event>,
    /// The terminal's size last asked for before the run request went out.
    size: Option<WindowSize>,
    vm_gone: &'a mut dyn FnMut() -> Option<String>,
    /// Once the VM is gone: why, and until when frames still in flight are waited for.
    gone: Option<(String, Instant)>,
}

impl Waiter<'_> {
    /// The next event; `what()` once `deadline` passes.
    ///
    /// When the VM is gone, frames it sent last may still be in the socket or the queue
    /// (the reader thread lags under load): they are drained for a bounded time before
    /// giving up, so an `Exited` sent just before power-off is not lost.
    fn next(
        &mut self,
        deadline: Option<Instant>,
        what: impl FnOnce() -> SessionError,
    ) -> Result<Event, SessionError> {
        loop {
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    // A dead VM explains a missed deadline better than the deadline.
                    if let Some((why, _)) = &self.gone {
                        return Err(SessionError::VmGone(why.clone()));
                    }
                    return Err(what());
                }
            }
            match self.rx.recv_timeout(TICK) {
                Ok(ev) => return Ok(ev),
                Err(RecvTimeoutError::Timeout) => match &self.gone {
                    Some((why, until)) if Instant::now() >= *until => {
                        return Err(SessionError::VmGone(why.clone()));
                    }
                    Some(_) => {}
                    None => {
                        if let Some(why) = (self.vm_gone)() {
                            self.gone = Some((why, Instant::now() + VM_GONE_DRAIN));
                        }
                    }
                },
                Err(RecvTimeoutError::Disconnected) => return Ok(Event::ChannelClosed),
            }
        }
    }

    /// Why the channel closed: the VM may have died, and that explains it better.
    fn closed(&mut self) -> SessionError {
        std::thread::sleep(TICK);
        match (self.vm_gone)() {
            Some(why) => SessionError::VmGone(why),
            None => SessionError::ChannelClosed,
        }
    }
}

/// Waits for the agent's hello (logging its log messages meanwhile) and checks its
/// protocol version.
fn await_hello(
    waiter: &mut Waiter<'_>,
    deadline: Instant,
    limits: &Limits,
) -> Result<GuestHello, SessionError> {
    let hello = loop {
        let timeout = || SessionError::HelloTimeout(limits.hello_timeout);
        match waiter.next(Some(deadline), timeout)? {
            Event::Guest(FromGuest::Hello(h)) => break h,
            Event::Guest(FromGuest::Log { message }) => {
                tracing::info!(target: "agent", "{}", truncate(&message, 512));
            }
            Event::Guest(other) => {
                return Err(SessionError::Unexpected {
                    expected: "Hello",
                    got: kind_name(&other),
                })
            }
            Event::ChannelError(e) => return Err(SessionError::Protocol(e)),
            Event::ChannelClosed => return Err(waiter.closed()),
            // Nothing runs yet: a signal during boot cancels the run.
            Event::Signal(s) => return Err(SessionError::Interrupted(s)),
            // Nothing runs yet: the run request takes the size.
            Event::Resize(size) => waiter.size = Some(size),
        }
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(SessionError::Version {
            ours: PROTOCOL_VERSION,
            theirs: hello.version,
        });
    }
    tracing::debug!(agent = %hello.agent, kernel = %hello.kernel, uptime_ms = hello.uptime_ms, "agent hello");
    Ok(hello)
}

/// Sends our hello and the run request, then starts forwarding `stdin` (or closes the
/// workload's stdin at once). Returns when the run request went out.
fn send_request<W: Write + Send + 'static>(
    writer: &SharedWriter<W>,
    spec: &RunSpec,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<Instant, SessionError> {
    send(
        writer,
        &FromHost::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }),
    )?;
    send(writer, &FromHost::Run(Box::new(spec.clone())))?;
    let run_sent_at = Instant::now();
    match stdin {
        Some(stdin) => spawn_stdin(stdin, Arc::clone(writer)),
        // A terminal without stdin stays open, as one nobody types on.
        None if spec.terminal => {}
        None => send(writer, &FromHost::StdinEof)?,
    }
    Ok(run_sent_at)
}

/// The relay after the run request: output, devices, start, exit, logs and signals.
struct Session<'a, W> {
    writer: &'a SharedWriter<W>,
    procs: &'a Procs,
    io: SessionIo,
    limits: &'a Limits,
    report: SessionReport,
    start_deadline: Instant,
    run_deadline: Option<Instant>,
    devices_seen: bool,
    log_budget: usize,
    stdout_ok: bool,
    stderr_ok: bool,
    first_signal: Option<(Instant, i32)>,
    /// A resize asked for before the workload started, sent once it has.
    pending_size: Option<WindowSize>,
}

impl<W: Write + Send + 'static> Session<'_, W> {
    /// The earliest of the applicable deadlines, with the error it fires.
    fn deadline(&self) -> Option<(Instant, SessionError)> {
        let mut deadline: Option<(Instant, SessionError)> = None;
        let mut consider = |d: Instant, e: SessionError| match &deadline {
            Some((cur, _)) if *cur <= d => {}
            _ => deadline = Some((d, e)),
        };
        if self.report.started_at.is_none() {
            consider(
                self.start_deadline,
                SessionError::StartTimeout(self.limits.start_timeout),
            );
        }
        if let (Some(d), Some(t)) = (self.run_deadline, self.limits.run_timeout) {
            consider(d, SessionError::Timeout(t));
        }
        if let Some((at, sig)) = self.first_signal {
            consider(
                at + self.limits.signal_grace,
                SessionError::Interrupted(sig),
            );
        }
        deadline
    }

    /// Handles one event; `true` when the workload exited.
    fn on_event(&mut self, ev: Event, waiter: &mut Waiter<'_>) -> Result<bool, SessionError> {
        let started = self.report.started_at.is_some();
        match ev {
            Event::Guest(FromGuest::Stdout(d)) => self.on_stdout(&d),
            Event::Guest(FromGuest::Stderr(d)) => self.on_stderr(&d),
            Event::Guest(FromGuest::Devices(d)) if !self.devices_seen && !started => {
                self.devices_seen = true;
                self.report.devices = d.into_iter().take(256).collect();
                self.report.devices_at = Some(Instant::now());
            }
            Event::Guest(FromGuest::Driver(d)) if self.report.driver.is_none() && !started => {
                tracing::info!(target: "agent", flavour = %d.flavour, gpus = d.gpus.len(), ms = d.driver_ready_ms, "{}", truncate(&d.message, 512));
                self.report.driver = Some(d);
                self.report.driver_at = Some(Instant::now());
            }
            Event::Guest(FromGuest::Started { pid }) if !started => {
                self.report.started_at = Some(Instant::now());
                self.report.guest_pid = Some(pid);
                let w = Arc::clone(self.writer);
                self.procs.0.open(Arc::new(move |m: &FromHost| {
                    let mut guard = match w.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    m.send(&mut guard)
                }));
                if let Some(size) = self.pending_size.take() {
                    send(self.writer, &FromHost::Resize { id: None, size })?;
                }
            }
            Event::Guest(ref m) if started && self.procs.0.on_guest(m) => {}
            Event::Guest(FromGuest::Exited(status)) if started => {
                self.report.status = status;
                self.report.exited_at = Instant::now();
                return Ok(true);
            }
            Event::Guest(FromGuest::Error { message }) => {
                return Err(SessionError::Agent(truncate(&message, 4096)));
            }
            Event::Guest(FromGuest::Log { message }) => self.on_log(&message),
            Event::Guest(other) => {
                return Err(SessionError::Unexpected {
                    expected: if started {
                        "output or Exited"
                    } else {
                        "Devices, Started or output"
                    },
                    got: kind_name(&other),
                })
            }
            Event::ChannelError(e) => return Err(SessionError::Protocol(e)),
            Event::ChannelClosed => return Err(waiter.closed()),
            Event::Signal(s) => self.on_signal(s)?,
            Event::Resize(size) if started => {
                send(self.writer, &FromHost::Resize { id: None, size })?;
            }
            Event::Resize(size) => self.pending_size = Some(size),
        }
        Ok(false)
    }

    fn on_stdout(&mut self, d: &[u8]) {
        self.report.stdout_bytes += d.len() as u64;
        if self.stdout_ok && write_flush(&mut self.io.stdout, d).is_err() {
            tracing::warn!("stdout closed; discarding the rest of the workload's stdout");
            self.stdout_ok = false;
        }
    }

    fn on_stderr(&mut self, d: &[u8]) {
        self.report.stderr_bytes += d.len() as u64;
        if self.stderr_ok && write_flush(&mut self.io.stderr, d).is_err() {
            self.stderr_ok = false;
        }
    }

    /// Shows agent log messages within the byte budget; counts the rest.
    fn on_log(&mut self, message: &str) {
        if message.len() <= self.log_budget {
            self.log_budget -= message.len();
            tracing::info!(target: "agent", "{}", truncate(message, 4096));
            return;
        }
        if self.report.log_bytes_dropped == 0 {
            tracing::warn!(
                "agent log budget of {} bytes used up; dropping further agent logs",
                self.limits.max_log_bytes
            );
        }
        self.report.log_bytes_dropped += message.len() as u64;
    }

    /// Forwards a signal; a third one gives up on the workload.
    fn on_signal(&mut self, s: i32) -> Result<(), SessionError> {
        if let Some((_, first)) = self.first_signal {
            if self.report.signals_forwarded.len() >= 2 {
                return Err(SessionError::Interrupted(first));
            }
        }
        tracing::info!(signal = s, "forwarding signal to the workload");
        send(self.writer, &FromHost::Signal(s))?;
        self.report.signals_forwarded.push(s);
        self.first_signal.get_or_insert((Instant::now(), s));
        Ok(())
    }
}

fn write_flush(w: &mut Box<dyn Write + Send>, d: &[u8]) -> std::io::Result<()> {
    w.write_all(d)?;
    w.flush()
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

fn spawn_reader<R: Read + Send + 'static>(reader: R, tx: SyncSender<Event>) {
    let res = std::thread::Builder::new()
        .name("agent-reader".into())
        .spawn(move || {
            let mut frames = FrameReader::new(reader);
            loop {
                let ev = match frames.read_frame() {
                    Ok(raw) => match FromGuest::decode(raw) {
                        Ok(msg) => Event::Guest(msg),
                        Err(e) => Event::ChannelError(e),
                    },
                    Err(FrameError::Closed) => Event::ChannelClosed,
                    Err(e) => Event::ChannelError(e),
                };
                let last = !matches!(ev, Event::Guest(_));
                // Blocks while the queue is full: a flooding guest waits for us.
                if tx.send(ev).is_err() || last {
                    return;
                }
            }
        });
    if let Err(e) = res {
        tracing::error!(error = %e, "cannot start the agent reader thread");
    }
}

fn spawn_stdin<W: Write + Send + 'static>(
    mut stdin: Box<dyn Read + Send>,
    writer: SharedWriter<W>,
) {
    let res = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_DATA_PAYLOAD];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if send(&writer, &FromHost::Stdin(buf[..n].to_vec())).is_err() {
                            tracing::debug!("agent no longer takes stdin");
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading stdin failed; closing the workload's stdin");
                        break;
                    }
                }
            }
            let _ = send(&writer, &FromHost::StdinEof);
        });
    if let Err(e) = res {
        tracing::error!(error = %e, "cannot start the stdin thread");
    }
}
