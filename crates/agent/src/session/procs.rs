//! The processes of a run as the session pumps them: the workload and, beside it, the
//! execs and added containers the host started by id. Each has its own pipes, its own
//! stdin queue and its own exit; the session polls them all in its one loop.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use gpucell_protocol::ExitStatus;
use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::unistd::Pid;

use crate::container::Stdio;

/// After a process exits, output is drained until its pipes reach EOF, or until they
/// stay silent this long: a guard, not the normal path.
pub(super) const DRAIN: Duration = Duration::from_secs(5);

/// One process of the run.
pub(super) struct Proc {
    /// `None`: the workload; else the host's id.
    pub id: Option<u32>,
    pub pid: Pid,
    /// An added container (execs may target it), not an exec.
    pub container: bool,
    pub stdin: Option<OwnedFd>,
    /// stdout, stderr; `None` once at EOF.
    pub outs: [Option<OwnedFd>; 2],
    pub pending: VecDeque<u8>,
    pub stdin_eof: bool,
    pub status: Option<ExitStatus>,
    drain_until: Option<Instant>,
    /// The pty's master when the process has a terminal (its size is set on it).
    pty: Option<OwnedFd>,
}

/// What poll reported for each descriptor of a [`Proc`].
#[derive(Clone, Copy)]
pub(super) struct ProcReady {
    pub outs: [PollFlags; 2],
    pub stdin: PollFlags,
}

impl Default for ProcReady {
    fn default() -> Self {
        Self {
            outs: [PollFlags::empty(); 2],
            stdin: PollFlags::empty(),
        }
    }
}

impl Proc {
    pub fn new(id: Option<u32>, pid: Pid, stdio: Stdio, container: bool) -> Self {
        let Stdio {
            stdin,
            stdout,
            stderr,
            pty,
        } = stdio;
        Self {
            id,
            pid,
            container,
            stdin: Some(stdin),
            outs: [Some(stdout), stderr],
            pending: VecDeque::new(),
            stdin_eof: false,
            status: None,
            drain_until: None,
            pty,
        }
    }

    /// The host's stdin ended. A pipe is closed once what is queued is written; a
    /// terminal is not closed (that would not end the process's input) but sent its
    /// end-of-file character, as a user typing ^D.
    pub fn end_stdin(&mut self) {
        if self.stdin_eof {
            return;
        }
        if let (Some(pty), Some(_)) = (self.pty.as_ref(), self.stdin.as_ref()) {
            self.pending.push_back(crate::container::eof_char(pty));
        }
        self.stdin_eof = true;
    }

    /// Sets the terminal's size; a process without a terminal ignores it.
    pub fn resize(&self, size: gpucell_protocol::WindowSize) {
        if let Some(pty) = self.pty.as_ref() {
            if let Err(e) = crate::container::set_size(pty, size) {
                tracing::warn!(id = ?self.id, error = %e, "setting the terminal's size");
            }
        }
    }

    pub fn running(&self) -> bool {
        self.status.is_none()
    }

    /// The exit status once the process has exited and its output is drained (or has
    /// stayed silent for [`DRAIN`]).
    pub fn finished(&self) -> Option<ExitStatus> {
        let status = self.status?;
        let drained = self.outs.iter().all(Option::is_none);
        (drained || self.drain_until.is_some_and(|d| Instant::now() >= d)).then_some(status)
    }

    /// Closes the process's stdin (it sees EOF) once everything queued is written and
    /// the host sent EOF or the process exited.
    pub fn close_stdin_when_done(&mut self) {
        if self.stdin.is_some()
            && self.pending.is_empty()
            && (self.stdin_eof || self.status.is_some())
        {
            self.stdin = None;
        }
    }

    pub fn exited(&mut self, status: ExitStatus) {
        self.status = Some(status);
        self.drain_until = Some(Instant::now() + DRAIN);
    }

    /// Output after the exit pushes the end of the drain back.
    pub fn output_seen(&mut self) {
        if self.status.is_some() {
            self.drain_until = Some(Instant::now() + DRAIN);
        }
    }

    pub fn queue_stdin(&mut self, data: Vec<u8>) {
        if self.stdin.is_some() && !self.stdin_eof {
            self.pending.extend(data);
        }
    }

    /// Writes queued stdin when the pipe has room; a broken pipe drops what is queued.
    pub fn feed_stdin(&mut self, ready: PollFlags) {
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

/// Every process of the run; the workload is first and stays until the run ends.
pub(super) struct Procs {
    pub list: Vec<Proc>,
}

impl Procs {
    pub fn new(workload: Proc) -> Self {
        Self {
            list: vec![workload],
        }
    }

    pub fn workload(&self) -> &Proc {
        &self.list[0]
    }

    pub fn by_id(&mut self, id: u32) -> Option<&mut Proc> {
        self.list.iter_mut().find(|p| p.id == Some(id))
    }

    /// Processes besides the workload.
    pub fn extra(&self) -> usize {
        self.list.len() - 1
    }

    /// Stdin bytes queued for all processes.
    pub fn pending(&self) -> usize {
        self.list.iter().map(|p| p.pending.len()).sum()
    }

    /// Some process has exited and is still draining: poll must wake to end the drain.
    pub fn draining(&self) -> bool {
        self.list.iter().any(|p| p.status.is_some())
    }

    /// Records the statuses of reaped children; returns whether the workload was among
    /// them. Pids the session did not start (orphans) are ignored.
    pub fn reaped(&mut self, exits: Vec<(Pid, ExitStatus)>) -> bool {
        let mut workload = false;
        for (pid, status) in exits {
            if let Some((i, p)) = self
                .list
                .iter_mut()
                .enumerate()
                .find(|(_, p)| p.pid == pid && p.running())
            {
                tracing::info!(id = ?p.id, ?status, "process exited");
                p.exited(status);
                workload |= i == 0;
            }
        }
        workload
    }

    /// Removes and returns the processes besides the workload that have finished.
    pub fn take_finished(&mut self) -> Vec<(u32, ExitStatus, bool)> {
        let mut done = Vec::new();
        self.list.retain(|p| match (p.id, p.finished()) {
            (Some(id), Some(status)) => {
                done.push((id, status, p.container));
                false
            }
            _ => true,
        });
        done
    }
}
