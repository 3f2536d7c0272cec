//! One run, as the protocol describes it: hello, run spec, devices, start, stream, exit.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use gpucell_protocol::{
    ExitStatus, FrameError, FrameReader, FrameWriter, FromGuest, FromHost, GuestHello, RunSpec,
    MAX_DATA_PAYLOAD, PROTOCOL_VERSION,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::container::{self, ContainerError, Stdio};
use crate::devices;

/// Most stdin bytes buffered for a workload that does not read; beyond it the agent stops
/// reading the channel until the workload catches up.
const MAX_STDIN_BUFFER: usize = 1 << 20;
/// After the workload exits, output is drained until its pipes reach EOF (its pid
/// namespace dies with it, so nothing else holds them), or until they stay silent this
/// long: a guard, not the normal path.
const DRAIN: Duration = Duration::from_secs(5);

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
    Container(#[from] ContainerError),
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

    /// Runs the spec to completion and sends `Exited`.
    pub fn run(&mut self, spec: &RunSpec, sigfd: &SignalFd) -> Result<(), SessionError> {
        let wait = Duration::from_millis(spec.device_wait_ms.min(600_000));
        let (found, missing) =
            devices::wait_for(Path::new("/sys/bus/pci/devices"), &spec.devices, wait);
        self.send(&FromGuest::Devices(found.clone()))?;
        if !missing.is_empty() {
            let ids: Vec<String> = missing
                .iter()
                .map(|d| format!("{:04x}:{:04x}", d.vendor, d.device))
                .collect();
            return Err(SessionError::MissingDevices(
                ids.join(", "),
                spec.device_wait_ms,
            ));
        }
        if let Some(r) = crate::nvidia::bring_up_for_run(&found, &spec.rootfs.device)? {
            self.send(&FromGuest::Driver(r))?;
        }
        let root = container::mount_rootfs(spec)?;
        let prepared = container::prepare(&root, spec)?;
        let (pid, stdio) = container::spawn(&prepared)?;
        tracing::info!(pid = pid.as_raw(), "workload started");
        self.send(&FromGuest::Started { pid: pid.as_raw() })?;
        let status = self.pump(pid, stdio, sigfd)?;
        self.send(&FromGuest::Exited(status))?;
        Ok(())
    }

    /// Streams stdio and host messages until the workload has exited and its output is
    /// drained. Reaps every child that reaches PID 1 on the way.
    fn pump(
        &mut self,
        pid: Pid,
        stdio: Stdio,
        sigfd: &SignalFd,
    ) -> Result<ExitStatus, SessionError> {
        let Stdio {
            stdin,
            stdout,
            stderr,
        } = stdio;
        let mut stdin = Some(stdin);
        let mut outs: [Option<OwnedFd>; 2] = [Some(stdout), Some(stderr)];
        let mut pending: VecDeque<u8> = VecDeque::new();
        let mut stdin_eof = false;
        let mut status: Option<ExitStatus> = None;
        let mut drain_until: Option<Instant> = None;
        let channel_open = true;
        let mut buf = vec![0u8; MAX_DATA_PAYLOAD];

        loop {
            if let Some(s) = status {
                let drained = outs.iter().all(Option::is_none);
                if drained || drain_until.is_some_and(|d| Instant::now() >= d) {
                    return Ok(s);
                }
            }
            if stdin.is_some() && pending.is_empty() && (stdin_eof || status.is_some()) {
                stdin = None; // closes the pipe: the workload sees EOF
            }
            let chan = self.reader.get_ref().as_fd();
            let mut fds = Vec::with_capacity(5);
            let read_chan = channel_open && pending.len() < MAX_STDIN_BUFFER;
            fds.push(PollFd::new(
                chan,
                if read_chan {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                },
            ));
            fds.push(PollFd::new(sigfd.as_fd(), PollFlags::POLLIN));
            for o in outs.iter().flatten() {
                fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
            }
            let want_out = !pending.is_empty();
            if let Some(i) = stdin.as_ref() {
                fds.push(PollFd::new(
                    i.as_fd(),
                    if want_out {
                        PollFlags::POLLOUT
                    } else {
                        PollFlags::empty()
                    },
                ));
            }
            let timeout = if status.is_some() {
                PollTimeout::from(100u16)
            } else {
                PollTimeout::NONE
            };
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(SessionError::Sys("poll", e)),
            }
            let rev: Vec<PollFlags> = fds
                .iter()
                .map(|f| f.revents().unwrap_or(PollFlags::empty()))
                .collect();
            drop(fds);
            let ready = |r: PollFlags| {
                r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
            };

            // Children first, so an exit is seen even while output keeps coming.
            if ready(rev[1]) {
                while let Ok(Some(_)) = sigfd.read_signal() {}
                if let Some(s) = reap(pid) {
                    tracing::info!(?s, "workload exited");
                    status = Some(s);
                    drain_until = Some(Instant::now() + DRAIN);
                }
            }
            // Output.
            let mut idx = 2;
            for (n, slot) in outs.iter_mut().enumerate() {
                let Some(fd) = slot.as_ref() else { continue };
                let r = rev[idx];
                idx += 1;
                if !ready(r) {
                    continue;
                }
                match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                    Ok(0) => *slot = None,
                    Ok(k) => {
                        let data = buf[..k].to_vec();
                        let msg = if n == 0 {
                            FromGuest::Stdout(data)
                        } else {
                            FromGuest::Stderr(data)
                        };
                        self.send(&msg)?;
                        if status.is_some() {
                            drain_until = Some(Instant::now() + DRAIN);
                        }
                    }
                    Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                    Err(_) => *slot = None,
                }
            }
            // Stdin.
            if let Some(fd) = stdin.as_ref() {
                let r = rev[idx];
                if r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
                    stdin = None;
                    pending.clear();
                } else if r.contains(PollFlags::POLLOUT) {
                    let (a, _) = pending.as_slices();
                    match nix::unistd::write(fd, a) {
                        Ok(k) => {
                            pending.drain(..k);
                        }
                        Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                        Err(_) => {
                            stdin = None;
                            pending.clear();
                        }
                    }
                }
            }
            // Host messages.
            if read_chan && ready(rev[0]) {
                match self.recv() {
                    Ok(FromHost::Stdin(d)) => {
                        if stdin.is_some() && !stdin_eof {
                            pending.extend(d);
                        }
                    }
                    Ok(FromHost::StdinEof) => stdin_eof = true,
                    Ok(FromHost::Signal(n)) => match Signal::try_from(n) {
                        Ok(sig) if status.is_none() => {
                            let _ = kill(pid, sig);
                        }
                        Ok(_) => {}
                        Err(_) => tracing::warn!(signal = n, "host sent an invalid signal number"),
                    },
                    Ok(FromHost::Shutdown) => {
                        let _ = kill(pid, Signal::SIGKILL);
                        return Err(SessionError::Shutdown);
                    }
                    Ok(other) => {
                        tracing::warn!(
                            message = name_of(&other),
                            "unexpected message during the run; ignored"
                        );
                    }
                    Err(FrameError::Closed)
                    | Err(FrameError::Truncated)
                    | Err(FrameError::Io(_)) => {
                        // The host is gone: nobody is left to report to.
                        let _ = kill(pid, Signal::SIGKILL);
                        return Err(SessionError::Frame(FrameError::Closed));
                    }
                    Err(e) => {
                        let _ = kill(pid, Signal::SIGKILL);
                        return Err(e.into());
                    }
                }
            }
        }
    }
}

/// Reaps every exited child; returns the workload's status if it was among them.
fn reap(workload: Pid) -> Option<ExitStatus> {
    let mut found = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, code)) if p == workload => {
                found = Some(ExitStatus {
                    code: Some(code),
                    signal: None,
                })
            }
            Ok(WaitStatus::Signaled(p, sig, _)) if p == workload => {
                found = Some(ExitStatus {
                    code: None,
                    signal: Some(sig as i32),
                })
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(_) => {}
        }
    }
}

/// Blocks SIGCHLD and returns a signalfd for it (so poll sees child exits).
pub fn sigchld_fd() -> Result<SignalFd, SessionError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block()
        .map_err(|e| SessionError::Sys("blocking SIGCHLD", e))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| SessionError::Sys("signalfd", e))
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
