//! Processes besides the workload in a running sandbox: an exec in its container
//! ([`EventSender::exec`](crate::EventSender::exec)) or a container added to the pod.
//!
//! The table of processes is shared by the relay (which runs the session and hands it
//! the agent's `Proc*` frames) and the callers on other threads (which start, signal and
//! wait). It opens when the workload has started and closes when the session ends: a
//! process still running then ends with [`ExecError::SessionEnded`].

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gpucell_protocol::{
    ContainerAdd, ExitStatus, FrameError, FromGuest, FromHost, ProcSpec, ProcStart, RunSpec,
    WindowSize, MAX_DATA_PAYLOAD, MAX_PROCS,
};

/// How long the agent may take to answer a start with `ProcStarted` or `ProcError`
/// (an added container mounts its disk first).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ExecError {
    #[error("the sandbox's workload is not running (not started yet, or ended)")]
    NotRunning,
    #[error("{0} processes already run in the sandbox besides its workload, the most allowed")]
    TooMany(usize),
    #[error("the agent refused the process: {0}")]
    Refused(String),
    #[error("the agent did not answer the start within {0:?}")]
    StartTimeout(Duration),
    #[error("sending to the agent failed: {0}")]
    Send(String),
    #[error("the sandbox ended before the process did: {0}")]
    SessionEnded(String),
    #[error("the container's disk in the VM: {0}")]
    Plug(String),
    #[error("{0}")]
    BadSize(String),
}

/// A process's streams on the host.
pub struct ProcIo {
    pub stdout: Box<dyn Write + Send>,
    pub stderr: Box<dyn Write + Send>,
    /// Forwarded to the process when set; `None` closes its stdin at once.
    pub stdin: Option<Box<dyn Read + Send>>,
}

/// Sends one message to the agent (the relay's writer, shared).
pub(crate) type Sender = Arc<dyn Fn(&FromHost) -> Result<(), FrameError> + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Starting,
    Running(i32),
    Done(Result<ExitStatus, ExecError>),
}

struct Entry {
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    state: State,
}

impl Entry {
    /// The agent sends a process's output before its end: once it has ended, its writers
    /// are closed, so that whoever reads them (containerd's FIFOs: CRI's ExecSync waits
    /// for their EOF) sees the end at once, not when the handle is dropped.
    fn close_output(&mut self) {
        self.stdout = Box::new(std::io::sink());
        self.stderr = Box::new(std::io::sink());
    }
}

#[derive(Default)]
struct Inner {
    sender: Option<Sender>,
    /// Why the table closed; `None` before it opened or while open.
    closed: Option<String>,
    next_id: u32,
    procs: HashMap<u32, Entry>,
}

/// The processes of one sandbox session.
#[derive(Default)]
pub(crate) struct ProcTable {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl ProcTable {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The workload has started: processes may be started through `sender`.
    pub(crate) fn open(&self, sender: Sender) {
        let mut g = self.lock();
        if g.closed.is_none() {
            g.sender = Some(sender);
        }
        self.changed.notify_all();
    }

    /// Waits until the workload runs (processes may start), the session ends, or
    /// `timeout` passes.
    pub(crate) fn wait_open(&self, timeout: Duration) -> Result<(), ExecError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            if let Some(why) = &g.closed {
                return Err(ExecError::SessionEnded(why.clone()));
            }
            if g.sender.is_some() {
                return Ok(());
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(ExecError::NotRunning);
            };
            g = match self.changed.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The session is over: every process not yet done ends with `why`.
    pub(crate) fn close(&self, why: &str) {
        let mut g = self.lock();
        g.sender = None;
        g.closed = Some(why.to_string());
        for e in g.procs.values_mut() {
            if !matches!(e.state, State::Done(_)) {
                e.state = State::Done(Err(ExecError::SessionEnded(why.to_string())));
                e.close_output();
            }
        }
        self.changed.notify_all();
    }

    /// Hands a `Proc*` message of the agent to its process; `false` when `m` is not one.
    /// Messages for ids the host does not run are dropped.
    pub(crate) fn on_guest(&self, m: &FromGuest) -> bool {
        let mut g = self.lock();
        let (id, state) = match m {
            FromGuest::ProcStarted { id, pid } => (*id, Some(State::Running(*pid))),
            FromGuest::ProcExited { id, status } => (*id, Some(State::Done(Ok(*status)))),
            FromGuest::ProcError { id, message } => {
                let message = message.chars().take(4096).collect();
                (*id, Some(State::Done(Err(ExecError::Refused(message)))))
            }
            FromGuest::ProcStdout { id, .. } | FromGuest::ProcStderr { id, .. } => (*id, None),
            _ => return false,
        };
        let Some(e) = g.procs.get_mut(&id) else {
            tracing::debug!(
                id,
                "agent message for a process the host does not run; dropped"
            );
            return true;
        };
        match (m, state) {
            (FromGuest::ProcStdout { data, .. }, _) => {
                let _ = e.stdout.write_all(data).and_then(|()| e.stdout.flush());
            }
            (FromGuest::ProcStderr { data, .. }, _) => {
                let _ = e.stderr.write_all(data).and_then(|()| e.stderr.flush());
            }
            (_, Some(s)) => {
                // A start answers only a process that is starting; an end is final.
                let fits = matches!(
                    (&e.state, &s),
                    (State::Starting, _) | (State::Running(_), State::Done(_))
                );
                if fits {
                    if matches!(s, State::Done(_)) {
                        e.close_output();
                    }
                    e.state = s;
                    self.changed.notify_all();
                }
            }
            _ => {}
        }
        true
    }

    /// Registers a process, sends its start and waits for the agent's answer.
    /// `terminal`: the process has one, and without stdin it stays open (as a terminal
    /// nobody types on) rather than getting an end-of-file.
    fn start(
        self: &Arc<Self>,
        message: impl FnOnce(u32) -> FromHost,
        io: ProcIo,
        terminal: bool,
    ) -> Result<ExecHandle, ExecError> {
        let ProcIo {
            stdout,
            stderr,
            stdin,
        } = io;
        let (id, sender) = {
            let mut g = self.lock();
            let sender = g.sender.clone().ok_or(ExecError::NotRunning)?;
            let running = g
                .procs
                .values()
                .filter(|e| !matches!(e.state, State::Done(_)))
                .count();
            if running >= MAX_PROCS {
                return Err(ExecError::TooMany(MAX_PROCS));
            }
            let id = g.next_id;
            g.next_id = g.next_id.wrapping_add(1);
            g.procs.insert(
                id,
                Entry {
                    stdout,
                    stderr,
                    state: State::Starting,
                },
            );
            (id, sender)
        };
        if let Err(e) = sender(&message(id)) {
            self.lock().procs.remove(&id);
            return Err(ExecError::Send(e.to_string()));
        }
        let handle = ExecHandle {
            id,
            table: Arc::clone(self),
            sender,
            pid: 0,
        };
        handle.await_start(stdin, terminal)
    }

    /// Waits until process `id` is no longer in `state`; `None` at the deadline.
    fn wait_state(
        &self,
        id: u32,
        until: Option<Instant>,
        done: fn(&State) -> bool,
    ) -> Option<State> {
        let mut g = self.lock();
        loop {
            let state = g.procs.get(&id).map(|e| e.state.clone())?;
            if done(&state) {
                return Some(state);
            }
            g = match until {
                None => match self.changed.wait(g) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                },
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    match self.changed.wait_timeout(g, left) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    }
                }
            };
        }
    }
}

/// A process started in a sandbox: its guest pid, a signal, its end.
pub struct ExecHandle {
    id: u32,
    table: Arc<ProcTable>,
    sender: Sender,
    pid: i32,
}

impl std::fmt::Debug for ExecHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecHandle")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .finish()
    }
}

impl ExecHandle {
    /// Waits for `ProcStarted` (then starts forwarding stdin) or the refusal.
    fn await_start(
        mut self,
        stdin: Option<Box<dyn Read + Send>>,
        terminal: bool,
    ) -> Result<Self, ExecError> {
        let until = Some(Instant::now() + START_TIMEOUT);
        let state = self
            .table
            .wait_state(self.id, until, |s| !matches!(s, State::Starting));
        match state {
            Some(State::Running(pid)) => self.pid = pid,
            Some(State::Done(Ok(_))) => {}
            Some(State::Done(Err(e))) => {
                self.table.lock().procs.remove(&self.id);
                return Err(e);
            }
            Some(State::Starting) | None => {
                self.table.lock().procs.remove(&self.id);
                return Err(ExecError::StartTimeout(START_TIMEOUT));
            }
        }
        match stdin {
            Some(r) => spawn_stdin(self.id, r, Arc::clone(&self.sender)),
            None if terminal => {}
            None => {
                let _ = (self.sender)(&FromHost::ProcStdinEof { id: self.id });
            }
        }
        Ok(self)
    }

    /// The process's pid in the guest.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The host's id of the process on the channel.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends signal number `signal` to the process (it may have exited already).
    pub fn signal(&self, signal: i32) -> Result<(), ExecError> {
        (self.sender)(&FromHost::ProcSignal {
            id: self.id,
            signal,
        })
        .map_err(|e| ExecError::Send(e.to_string()))
    }

    /// Sets the size of the process's terminal (`rows` x `cols`, each 1 to 10000; a
    /// process without a terminal ignores it).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ExecError> {
        let size = WindowSize { rows, cols };
        if let Some(problem) = size.problem() {
            return Err(ExecError::BadSize(problem));
        }
        (self.sender)(&FromHost::Resize {
            id: Some(self.id),
            size,
        })
        .map_err(|e| ExecError::Send(e.to_string()))
    }

    /// Waits for the process to end, at most `timeout` (`None`: for ever). `Ok(None)`
    /// when it still runs at the deadline.
    pub fn wait_timeout(&self, timeout: Option<Duration>) -> Result<Option<ExitStatus>, ExecError> {
        let until = timeout.map(|t| Instant::now() + t);
        let state = self
            .table
            .wait_state(self.id, until, |s| matches!(s, State::Done(_)));
        match state {
            Some(State::Done(r)) => r.map(Some),
            Some(_) => Ok(None),
            None if until.is_some_and(|d| Instant::now() >= d) => Ok(None),
            None => Err(ExecError::SessionEnded("the process was forgotten".into())),
        }
    }

    /// Waits for the process to end.
    pub fn wait(&self) -> Result<ExitStatus, ExecError> {
        match self.wait_timeout(None)? {
            Some(s) => Ok(s),
            None => Err(ExecError::SessionEnded("the process was forgotten".into())),
        }
    }
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        let mut g = self.table.lock();
        if let Some(e) = g.procs.get(&self.id) {
            if matches!(e.state, State::Done(_)) {
                g.procs.remove(&self.id);
            }
        }
    }
}

/// Starts processes in the sandbox of one session; cloned into [`crate::EventSender`].
#[derive(Clone, Default)]
pub(crate) struct Procs(pub(crate) Arc<ProcTable>);

impl Procs {
    pub(crate) fn exec(&self, spec: ProcSpec, io: ProcIo) -> Result<ExecHandle, ExecError> {
        let terminal = spec.terminal;
        self.0.start(
            |id| FromHost::ProcStart(Box::new(ProcStart { id, spec })),
            io,
            terminal,
        )
    }

    pub(crate) fn wait_open(&self, timeout: Duration) -> Result<(), ExecError> {
        self.0.wait_open(timeout)
    }

    pub(crate) fn add_container(&self, spec: RunSpec, io: ProcIo) -> Result<ExecHandle, ExecError> {
        let terminal = spec.terminal;
        self.0.start(
            |id| FromHost::ContainerAdd(Box::new(ContainerAdd { id, spec })),
            io,
            terminal,
        )
    }
}

fn spawn_stdin(id: u32, mut stdin: Box<dyn Read + Send>, sender: Sender) {
    let res = std::thread::Builder::new()
        .name(format!("exec-stdin-{id}"))
        .spawn(move || {
            let mut buf = vec![0u8; MAX_DATA_PAYLOAD];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let data = buf[..n].to_vec();
                        if sender(&FromHost::ProcStdin { id, data }).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(id, error = %e, "reading an exec's stdin failed; closing it");
                        break;
                    }
                }
            }
            let _ = sender(&FromHost::ProcStdinEof { id });
        });
    if let Err(e) = res {
        tracing::error!(error = %e, "cannot start an exec's stdin thread");
    }
}
