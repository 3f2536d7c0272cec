//! One run, as the protocol describes it: hello, run spec, devices, start, stream, exit.
//! The guest side of it (devices, the workload process) goes through [`Workload`].

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use gpucell_protocol::{
    DeviceInfo, ExitStatus, FrameError, FrameReader, FrameWriter, FromGuest, FromHost, GuestHello,
    ProcSpec, RunSpec, MAX_DATA_PAYLOAD, MAX_PROCS, PROTOCOL_VERSION,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use crate::chain;
use crate::workload::{Workload, WorkloadError};

mod procs;
use procs::{Proc, ProcReady, Procs};

/// Most stdin bytes buffered for processes that do not read; beyond it the agent stops
/// reading the channel until they catch up.
const MAX_STDIN_BUFFER: usize = 1 << 20;
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
        FromHost::Resize { .. } => "Resize",
    }
}

impl Session {
    pub fn new(channel: File) -> std::io::Result<Self> {
        let w = channel.try_clone()?;
        Ok(Self {
            reader: FrameReader::new(channel).taking_runs(),
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
        let status = self.pump(Proc::new(None, pid, stdio, true), workload)?;
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
    /// drained, and every other process has ended (they are killed when the workload
    /// exits: the pod ends with it) and been reported by `ProcExited`. Reaps every child
    /// that reaches PID 1 on the way.
    fn pump(
        &mut self,
        main: Proc,
        workload: &mut dyn Workload,
    ) -> Result<ExitStatus, SessionError> {
        let mut procs = Procs::new(main);
        let mut buf = vec![0u8; MAX_DATA_PAYLOAD];
        loop {
            for (id, status, container) in procs.take_finished() {
                if container {
                    // Unmounted before the host hears of the end: it may unplug the disk.
                    workload.remove_container(id);
                }
                self.send(&FromGuest::ProcExited { id, status })?;
            }
            if procs.extra() == 0 {
                if let Some(status) = procs.workload().finished() {
                    return Ok(status);
                }
            }
            for p in &mut procs.list {
                p.close_stdin_when_done();
            }
            let read_channel = procs.pending() < MAX_STDIN_BUFFER;
            let ready = self.wait(&procs, workload.exit_fd(), read_channel)?;
            // Children first, so an exit is seen even while output keeps coming.
            if readable(ready.exit) && procs.reaped(workload.reap()) {
                kill_running(&procs, workload);
            }
            self.forward_output(&mut procs, &ready.procs, &mut buf)?;
            for (p, r) in procs.list.iter_mut().zip(&ready.procs) {
                p.feed_stdin(r.stdin);
            }
            if read_channel && readable(ready.channel) {
                self.host_message(&mut procs, workload)?;
            }
        }
    }

    /// Polls the channel, the exit notifications and every process's pipes; returns what
    /// each is ready for. While a process drains after its exit, wakes at least every
    /// 100 ms to end the drain.
    fn wait(
        &self,
        procs: &Procs,
        exit_fd: BorrowedFd<'_>,
        read_channel: bool,
    ) -> Result<Ready, SessionError> {
        let chan = self.reader.get_ref().as_fd();
        let mut fds = Vec::with_capacity(2 + 3 * procs.list.len());
        fds.push(PollFd::new(chan, interest(read_channel, PollFlags::POLLIN)));
        fds.push(PollFd::new(exit_fd, PollFlags::POLLIN));
        for p in &procs.list {
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
        }
        let timeout = if procs.draining() {
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
        let channel = next();
        let exit = next();
        let mut ready = Vec::with_capacity(procs.list.len());
        for p in &procs.list {
            let mut r = ProcReady::default();
            for (slot, f) in p.outs.iter().zip(r.outs.iter_mut()) {
                if slot.is_some() {
                    *f = next();
                }
            }
            if p.stdin.is_some() {
                r.stdin = next();
            }
            ready.push(r);
        }
        Ok(Ready {
            channel,
            exit,
            procs: ready,
        })
    }

    /// Reads what the processes wrote and sends it (`Stdout`/`Stderr` for the workload,
    /// `ProcStdout`/`ProcStderr` with the id for the others); a pipe at EOF or broken is
    /// closed.
    fn forward_output(
        &mut self,
        procs: &mut Procs,
        ready: &[ProcReady],
        buf: &mut [u8],
    ) -> Result<(), SessionError> {
        for (p, r) in procs.list.iter_mut().zip(ready) {
            for (n, flags) in r.outs.into_iter().enumerate() {
                let Some(fd) = p.outs[n].as_ref() else {
                    continue;
                };
                if !readable(flags) {
                    continue;
                }
                match nix::unistd::read(fd.as_raw_fd(), buf) {
                    Ok(0) => p.outs[n] = None,
                    Ok(k) => {
                        let data = buf[..k].to_vec();
                        let msg = match (p.id, n) {
                            (None, 0) => FromGuest::Stdout(data),
                            (None, _) => FromGuest::Stderr(data),
                            (Some(id), 0) => FromGuest::ProcStdout { id, data },
                            (Some(id), _) => FromGuest::ProcStderr { id, data },
                        };
                        self.send(&msg)?;
                        p.output_seen();
                    }
                    Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                    Err(_) => p.outs[n] = None,
                }
            }
        }
        Ok(())
    }

    /// Handles one host message during the run. Shutdown, a host that is gone and a
    /// frame that breaks the protocol kill every process and end the session. Messages
    /// for an id the agent does not run (it may have just exited) are dropped.
    fn host_message(
        &mut self,
        procs: &mut Procs,
        workload: &mut dyn Workload,
    ) -> Result<(), SessionError> {
        match self.recv() {
            Ok(FromHost::Stdin(d)) => procs.list[0].queue_stdin(d),
            Ok(FromHost::StdinEof) => procs.list[0].end_stdin(),
            Ok(FromHost::Signal(n)) => signal(&procs.list[0], n, workload),
            Ok(FromHost::ProcStart(start)) => {
                let launch = Launch::Exec(&start.spec);
                self.start_proc(procs, workload, start.id, launch)?
            }
            Ok(FromHost::ContainerAdd(add)) => {
                let launch = Launch::Container(&add.spec);
                self.start_proc(procs, workload, add.id, launch)?
            }
            Ok(FromHost::ProcStdin { id, data }) => {
                if let Some(p) = procs.by_id(id) {
                    p.queue_stdin(data);
                }
            }
            Ok(FromHost::ProcStdinEof { id }) => {
                if let Some(p) = procs.by_id(id) {
                    p.end_stdin();
                }
            }
            Ok(FromHost::Resize { id: None, size }) => procs.list[0].resize(size),
            Ok(FromHost::Resize { id: Some(id), size }) => {
                if let Some(p) = procs.by_id(id) {
                    p.resize(size);
                }
            }
            Ok(FromHost::ProcSignal { id, signal: n }) => {
                if let Some(p) = procs.by_id(id) {
                    signal(p, n, workload);
                }
            }
            Ok(FromHost::Shutdown) => {
                kill_running(procs, workload);
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
                kill_running(procs, workload);
                return Err(SessionError::Frame(FrameError::Closed));
            }
            Err(e) => {
                kill_running(procs, workload);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Starts process `id` and answers `ProcStarted`, or `ProcError` with the reason.
    fn start_proc(
        &mut self,
        procs: &mut Procs,
        workload: &mut dyn Workload,
        id: u32,
        launch: Launch<'_>,
    ) -> Result<(), SessionError> {
        match launch_proc(procs, workload, id, launch) {
            Ok(p) => {
                let pid = p.pid.as_raw();
                tracing::info!(id, pid, "process started");
                procs.list.push(p);
                self.send(&FromGuest::ProcStarted { id, pid })?;
            }
            Err(message) => {
                tracing::warn!(id, "{message}");
                self.send(&FromGuest::ProcError { id, message })?;
            }
        }
        Ok(())
    }
}

/// What a process id is started as.
enum Launch<'a> {
    Exec(&'a ProcSpec),
    Container(&'a RunSpec),
}

/// Checks the id, the bound and the target, then starts the process.
fn launch_proc(
    procs: &Procs,
    workload: &mut dyn Workload,
    id: u32,
    launch: Launch<'_>,
) -> Result<Proc, String> {
    if procs.list.iter().any(|p| p.id == Some(id)) {
        return Err(format!("process id {id} is already in use"));
    }
    if procs.extra() >= MAX_PROCS {
        return Err(format!(
            "{MAX_PROCS} processes already run besides the workload, the most the agent allows"
        ));
    }
    if !procs.workload().running() {
        return Err("the workload has exited: the pod is ending".into());
    }
    match launch {
        Launch::Exec(spec) => {
            let target = match spec.container {
                None => procs.workload().pid,
                Some(c) => procs
                    .list
                    .iter()
                    .find(|p| p.id == Some(c) && p.container && p.running())
                    .map(|p| p.pid)
                    .ok_or_else(|| format!("no running container has id {c}"))?,
            };
            let (pid, stdio) = workload.exec(target, spec).map_err(|e| chain(&e))?;
            Ok(Proc::new(Some(id), pid, stdio, false))
        }
        Launch::Container(spec) => {
            let (pid, stdio) = workload.add_container(id, spec).map_err(|e| chain(&e))?;
            Ok(Proc::new(Some(id), pid, stdio, true))
        }
    }
}

/// Delivers signal number `n` to `p` while it runs; an invalid number is ignored.
fn signal(p: &Proc, n: i32, workload: &mut dyn Workload) {
    match Signal::try_from(n) {
        Ok(sig) if p.running() => workload.kill(p.pid, sig),
        Ok(_) => {}
        Err(_) => tracing::warn!(signal = n, "host sent an invalid signal number"),
    }
}

/// SIGKILL to every process still running.
fn kill_running(procs: &Procs, workload: &mut dyn Workload) {
    for p in procs.list.iter().filter(|p| p.running()) {
        workload.kill(p.pid, Signal::SIGKILL);
    }
}

/// What poll reported: the channel, the exit notifications, each process in order.
struct Ready {
    channel: PollFlags,
    exit: PollFlags,
    procs: Vec<ProcReady>,
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
