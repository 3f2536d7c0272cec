//! One run, as the protocol describes it: hello, run spec, devices, start, stream, exit.
//! The guest side of it (devices, the workload process) goes through [`Workload`].

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use gpucell_protocol::{
    DeviceInfo, ExitStatus, FrameError, FrameReader, FrameWriter, FromGuest, FromHost, GuestHello,
    RunSpec, MAX_DATA_PAYLOAD, PROTOCOL_VERSION,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use crate::chain;
use crate::container::Stdio;
use crate::workload::{Workload, WorkloadError};

/// Most stdin bytes buffered for a workload that does not read; beyond it the agent stops
/// reading the channel until the workload catches up.
const MAX_STDIN_BUFFER: usize = 1 << 20;
/// After the workload exits, output is drained until its pipes reach EOF (its pid
/// namespace dies with it, so nothing else holds them), or until they stay silent this
/// long: a guard, not the normal path.
const DRAIN: Duration = Duration::from_secs(5);
/// After `Exited`, how long the agent keeps the channel open for the host's `Shutdown`
/// before powering off anyway. Powering off at once can drop the last frames still in
/// flight on vsock (the host then reads a reset instead of the exit).
const LINGER: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("channel")]
    Frame(#[from] FrameError),
    #[error("host speaks protocol version {0}, the agent {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("host sent {0} where the agent expected {1}")]
    Unexpected(&'static str, &'static str),
    #[error("the host asked to shut down")]
    Shutdown,
    #[error("PCI device(s) {0} did not appear within {1} ms")]
    MissingDevices(String, u64),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("{0} failed")]
    Sys(&'static str, #[source] Errno),
    #[error("NVIDIA driver bring-up")]
    Driver(#[from] crate::nvidia::NvidiaError),
}

/// Protocol state of one session over `channel`.
pub struct Session {
    reader: FrameReader<File>,
    writer: FrameWriter<File>,
}

fn name_of(m: &FromHost) -> &'static str {
    match m {
        FromHost::Hello(_) => "Hello",
        FromHost::Run(_) => "Run",
        FromHost::Stdin(_) => "Stdin",
        FromHost::StdinEof => "StdinEof",
        FromHost::Signal(_) => "Signal",
        FromHost::Shutdown => "Shutdown",
        FromHost::ProcStart(_) => "ProcStart",
        FromHost::ProcStdin { .. } => "ProcStdin",
        FromHost::ProcStdinEof { .. } => "ProcStdinEof",
        FromHost::ProcSignal { .. } => "ProcSignal",
        FromHost::ContainerAdd(_) => "ContainerAdd",
    }
}

impl Session {
    pub fn new(channel: File) -> std::io::Result<Self> {
        let w = channel.try_clone()?;
        Ok(Self {
            reader: FrameReader::new(channel),
            writer: FrameWriter::new(w),
        })
    }

    pub fn send(&mut self, m: &FromGuest) -> Result<(), FrameError> {
        m.send(&mut self.writer)
    }

    fn recv(&mut self) -> Result<FromHost, FrameError> {
        FromHost::decode(self.reader.read_frame()?)
    }

    /// Sends `Error{message}`; errors sending it are only logged (the VM powers off next).
    pub fn report(&mut self, message: &str) {
        if let Err(e) = self.send(&FromGuest::Error {
            message: message.to_owned(),
        }) {
            tracing::error!(error = %e, "could not report the error to the host");
        }
    }

    /// Hello exchange; returns the run spec.
    pub fn handshake(&mut self, kernel: String, uptime_ms: u64) -> Result<RunSpec, SessionError> {
        self.send(&FromGuest::Hello(GuestHello {
            version: PROTOCOL_VERSION,
            agent: env!("CARGO_PKG_VERSION").to_owned(),
            kernel,
            uptime_ms,
        }))?;
        match self.recv()? {
            FromHost::Hello(h) if h.version == PROTOCOL_VERSION => {}
            FromHost::Hello(h) => return Err(SessionError::Version(h.version)),
            FromHost::Shutdown => return Err(SessionError::Shutdown),
            other => return Err(SessionError::Unexpected(name_of(&other), "Hello")),
        }
        match self.recv()? {
            FromHost::Run(spec) => Ok(*spec),
            FromHost::Shutdown => Err(SessionError::Shutdown),
            other => Err(SessionError::Unexpected(name_of(&other), "Run")),
        }
    }

    /// One whole session as PID 1 runs it: hello, the warnings from before the channel
    /// opened as `Log`, the run, and `Error` to the host for whatever failed. A host that
    /// asks to shut down ends the session without an error.
    pub fn serve(
        &mut self,
        workload: &mut dyn Workload,
        kernel: String,
        uptime_ms: u64,
        early: Vec<String>,
    ) -> Result<(), SessionError> {
        let spec = match self.handshake(kernel, uptime_ms) {
            Ok(spec) => spec,
            Err(SessionError::Shutdown) => return Ok(()),
            Err(e) => {
                self.report(&chain(&e));
                return Err(e);
            }
        };
        for message in early {
            self.send(&FromGuest::Log { message })?;
        }
        match self.run(&spec, workload) {
            Ok(()) => {
                self.await_shutdown(LINGER);
                Ok(())
            }
            Err(SessionError::Shutdown) => Ok(()),
            Err(e) => {
                self.report(&chain(&e));
                Err(e)
            }
        }
    }

    /// Holds the channel after `Exited` until the host says `Shutdown`, closes it, breaks
    /// the protocol or stays silent for `limit`; whatever else it sends is dropped.
    pub fn await_shutdown(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::debug!("no Shutdown from the host; powering off anyway");
                return;
            }
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let chan = self.reader.get_ref().as_fd();
            let mut fds = [PollFd::new(chan, PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(_) => return,
            }
            match self.recv() {
                Ok(FromHost::Shutdown) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Runs the spec to completion and sends `Exited`.
    pub fn run(&mut self, spec: &RunSpec, workload: &mut dyn Workload) -> Result<(), SessionError> {
        let found = self.check_devices(spec, workload)?;
        if let Some(r) = workload.bring_up_driver(&found, &spec.rootfs.device)? {
            self.send(&FromGuest::Driver(r))?;
        }
        let (pid, stdio) = workload.start(spec)?;
        tracing::info!(pid = pid.as_raw(), "workload started");
        self.send(&FromGuest::Started { pid: pid.as_raw() })?;
        let status = self.pump(stdio, workload)?;
        self.send(&FromGuest::Exited(status))?;
        Ok(())
    }

    /// Waits for the PCI functions the spec names and sends what the guest sees; fails
    /// naming the ones that did not appear.
    fn check_devices(
        &mut self,
        spec: &RunSpec,
        workload: &mut dyn Workload,
    ) -> Result<Vec<DeviceInfo>, SessionError> {
        let wait = Duration::from_millis(spec.device_wait_ms.min(600_000));
        let (found, missing) = workload.wait_for_devices(&spec.devices, wait);
        self.send(&FromGuest::Devices(found.clone()))?;
        if missing.is_empty() {
            return Ok(found);
        }
        let ids: Vec<String> = missing
            .iter()
            .map(|d| format!("{:04x}:{:04x}", d.vendor, d.device))
            .collect();
        Err(SessionError::MissingDevices(
            ids.join(", "),
            spec.device_wait_ms,
        ))
    }

    /// Streams stdio and host messages until the workload has exited and its output is
    /// drained. Reaps every child that reaches PID 1 on the way.
    fn pump(
        &mut self,
        stdio: Stdio,
        workload: &mut dyn Workload,
    ) -> Result<ExitStatus, SessionError> {
        let mut p = Pump::new(stdio);
        loop {
            if let Some(status) = p.finished() {
                return Ok(status);
            }
            p.close_stdin_when_done();
            let read_channel = p.pending.len() < MAX_STDIN_BUFFER;
            let ready = self.wait(&p, workload.exit_fd(), read_channel)?;
            // Children first, so an exit is seen even while output keeps coming.
            if readable(ready.exit) {
                p.reap(workload);
            }
            self.forward_output(&mut p, ready.outs)?;
            p.feed_stdin(ready.stdin);
            if read_channel && readable(ready.channel) {
                self.host_message(&mut p, workload)?;
            }
        }
    }

    /// Polls the channel, the exit notifications and the workload's pipes; returns what
    /// each is ready for. After the exit, wakes at least every 100 ms to end the drain.
    fn wait(
        &self,
        p: &Pump,
        exit_fd: BorrowedFd<'_>,
        read_channel: bool,
    ) -> Result<Ready, SessionError> {
        let chan = self.reader.get_ref().as_fd();
        let mut fds = Vec::with_capacity(5);
        fds.push(PollFd::new(chan, interest(read_channel, PollFlags::POLLIN)));
        fds.push(PollFd::new(exit_fd, PollFlags::POLLIN));
        for o in p.outs.iter().flatten() {
            fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
        }
        if let Some(i) = p.stdin.as_ref() {
            let want_out = !p.pending.is_empty();
            fds.push(PollFd::new(
                i.as_fd(),
                interest(want_out, PollFlags::POLLOUT),
            ));
        }
        let timeout = if p.status.is_some() {
            PollTimeout::from(100u16)
        } else {
            PollTimeout::NONE
        };
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(SessionError::Sys("poll", e)),
        }
        let mut rev = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()));
        let mut next = || rev.next().unwrap_or(PollFlags::empty());
        let mut ready = Ready {
            channel: next(),
            exit: next(),
            outs: [PollFlags::empty(); 2],
            stdin: PollFlags::empty(),
        };
        for (slot, r) in p.outs.iter().zip(ready.outs.iter_mut()) {
            if slot.is_some() {
                *r = next();
            }
        }
        if p.stdin.is_some() {
            ready.stdin = next();
        }
        Ok(ready)
    }

    /// Reads what the workload wrote and sends it as `Stdout`/`Stderr`; a pipe at EOF or
    /// broken is closed.
    fn forward_output(&mut self, p: &mut Pump, ready: [PollFlags; 2]) -> Result<(), SessionError> {
        for (n, r) in ready.into_iter().enumerate() {
            let Some(fd) = p.outs[n].as_ref() else {
                continue;
            };
            if !readable(r) {
                continue;
            }
            match nix::unistd::read(fd.as_raw_fd(), &mut p.buf) {
                Ok(0) => p.outs[n] = None,
                Ok(k) => {
                    let data = p.buf[..k].to_vec();
                    let msg = if n == 0 {
                        FromGuest::Stdout(data)
                    } else {
                        FromGuest::Stderr(data)
                    };
                    self.send(&msg)?;
                    p.output_seen();
                }
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(_) => p.outs[n] = None,
            }
        }
        Ok(())
    }

    /// Handles one host message during the run. Shutdown, a host that is gone and a
    /// frame that breaks the protocol kill the workload and end the session.
    fn host_message(
        &mut self,
        p: &mut Pump,
        workload: &mut dyn Workload,
    ) -> Result<(), SessionError> {
        match self.recv() {
            Ok(FromHost::Stdin(d)) => p.queue_stdin(d),
            Ok(FromHost::StdinEof) => p.stdin_eof = true,
            Ok(FromHost::Signal(n)) => match Signal::try_from(n) {
                Ok(sig) if p.status.is_none() => workload.signal(sig),
                Ok(_) => {}
                Err(_) => tracing::warn!(signal = n, "host sent an invalid signal number"),
            },
            Ok(FromHost::Shutdown) => {
                workload.signal(Signal::SIGKILL);
                return Err(SessionError::Shutdown);
            }
            Ok(other) => {
                tracing::warn!(
                    message = name_of(&other),
                    "unexpected message during the run; ignored"
                );
            }
            Err(FrameError::Closed) | Err(FrameError::Truncated) | Err(FrameError::Io(_)) => {
                // The host is gone: nobody is left to report to.
                workload.signal(Signal::SIGKILL);
                return Err(SessionError::Frame(FrameError::Closed));
            }
            Err(e) => {
                workload.signal(Signal::SIGKILL);
                return Err(e.into());
            }
        }
        Ok(())
    }
}

/// The workload's side of a run: its pipes, the stdin not yet written, how it ended.
struct Pump {
    stdin: Option<OwnedFd>,
    /// stdout, stderr; `None` once at EOF.
    outs: [Option<OwnedFd>; 2],
    pending: VecDeque<u8>,
    stdin_eof: bool,
    status: Option<ExitStatus>,
    drain_until: Option<Instant>,
    buf: Vec<u8>,
}

/// What poll reported for each descriptor of a [`Pump`].
struct Ready {
    channel: PollFlags,
    exit: PollFlags,
    outs: [PollFlags; 2],
    stdin: PollFlags,
}

fn readable(r: PollFlags) -> bool {
    r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
}

/// `flags` when `want`, else no events (the descriptor still reports hangups).
fn interest(want: bool, flags: PollFlags) -> PollFlags {
    if want {
        flags
    } else {
        PollFlags::empty()
    }
}

impl Pump {
    fn new(stdio: Stdio) -> Self {
        let Stdio {
            stdin,
            stdout,
            stderr,
        } = stdio;
        Self {
            stdin: Some(stdin),
            outs: [Some(stdout), Some(stderr)],
            pending: VecDeque::new(),
            stdin_eof: false,
            status: None,
            drain_until: None,
            buf: vec![0u8; MAX_DATA_PAYLOAD],
        }
    }

    /// The exit status once the workload has exited and its output is drained (or has
    /// stayed silent for [`DRAIN`]).
    fn finished(&self) -> Option<ExitStatus> {
        let status = self.status?;
        let drained = self.outs.iter().all(Option::is_none);
        (drained || self.drain_until.is_some_and(|d| Instant::now() >= d)).then_some(status)
    }

    /// Closes the workload's stdin (it sees EOF) once everything queued is written and
    /// the host sent EOF or the workload exited.
    fn close_stdin_when_done(&mut self) {
        if self.stdin.is_some()
            && self.pending.is_empty()
            && (self.stdin_eof || self.status.is_some())
        {
            self.stdin = None;
        }
    }

    fn reap(&mut self, workload: &mut dyn Workload) {
        if let Some(s) = workload.reap() {
            tracing::info!(?s, "workload exited");
            self.status = Some(s);
            self.drain_until = Some(Instant::now() + DRAIN);
        }
    }

    /// Output after the exit pushes the end of the drain back.
    fn output_seen(&mut self) {
        if self.status.is_some() {
            self.drain_until = Some(Instant::now() + DRAIN);
        }
    }

    fn queue_stdin(&mut self, data: Vec<u8>) {
        if self.stdin.is_some() && !self.stdin_eof {
            self.pending.extend(data);
        }
    }

    /// Writes queued stdin when the pipe has room; a broken pipe drops what is queued.
    fn feed_stdin(&mut self, ready: PollFlags) {
        let Some(fd) = self.stdin.as_ref() else {
            return;
        };
        if ready.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
            self.stdin = None;
            self.pending.clear();
        } else if ready.contains(PollFlags::POLLOUT) {
            let (a, _) = self.pending.as_slices();
            match nix::unistd::write(fd, a) {
                Ok(k) => {
                    self.pending.drain(..k);
                }
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(_) => {
                    self.stdin = None;
                    self.pending.clear();
                }
            }
        }
    }
}

/// Guest uptime in ms from `/proc/uptime`.
pub fn uptime_ms() -> u64 {
    let mut s = String::new();
    let _ = File::open("/proc/uptime").and_then(|f| f.take(128).read_to_string(&mut s));
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |secs| (secs * 1000.0) as u64)
}

/// Kernel release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
