//! How a started task runs: the seam between the task service and the run core. The real
//! [`NodeLauncher`] boots a gpucell microVM with `gpucell_runtime::run_with_rootfs`; the
//! task service's tests use a fake.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use gpucell_runtime::{Node, Observer, RootfsSource, RunReport, RunRequest};
use gpucell_sandbox::{EventSender, SessionIo};

/// What starting a task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub request: RunRequest,
    /// The task's root filesystem, prepared by containerd.
    pub rootfs: PathBuf,
    /// A CRI pod's sandbox (pause) container: no VM is started for it; it holds until
    /// signalled (see [`hold`]).
    pub sandbox: bool,
}

/// Runs a task to its end. Called on a thread of its own: it may block for as long as
/// the task runs.
pub trait Launcher: Send + Sync + 'static {
    /// Runs `launch` with its streams on `io`; the observer's `sandbox_starting` receives
    /// the handle that signals the workload. The report's `exit_code` is the task's.
    fn run(&self, launch: Launch, io: SessionIo, obs: &mut dyn Observer) -> RunReport;
}

/// Runs each task in its own gpucell microVM on `node`.
pub struct NodeLauncher {
    pub node: Node,
}

impl Launcher for NodeLauncher {
    fn run(&self, launch: Launch, io: SessionIo, obs: &mut dyn Observer) -> RunReport {
        // The run core owns the streams while it runs; a failure is told on the task's
        // stderr afterwards, as `gpucell run` tells it on its own.
        let stderr = SharedWriter::new(io.stderr);
        let io = SessionIo {
            stdout: io.stdout,
            stderr: Box::new(stderr.clone()),
            stdin: io.stdin,
        };
        let report = gpucell_runtime::run_with_rootfs(
            &self.node,
            launch.request,
            &RootfsSource::Directory(launch.rootfs),
            io,
            obs,
        );
        if let Some(error) = &report.error {
            let mut w = stderr;
            let _ = writeln!(w, "gpucell: error: {error}");
            if let Some(tail) = report.console_tail.as_deref().filter(|t| !t.is_empty()) {
                let _ = writeln!(w, "--- last lines of the guest console ---\n{tail}");
            }
        }
        report
    }
}

/// A writer shared by the run core and the launcher.
#[derive(Clone)]
struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedWriter {
    fn new(w: Box<dyn Write + Send>) -> Self {
        SharedWriter(Arc::new(Mutex::new(w)))
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut w) => w.write(buf),
            Err(p) => p.into_inner().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.lock() {
            Ok(mut w) => w.flush(),
            Err(p) => p.into_inner().flush(),
        }
    }
}

/// Signals for a task's workload: queued until its sandbox starts, then forwarded.
#[derive(Debug, Default)]
pub struct Control {
    inner: Mutex<ControlState>,
}

#[derive(Debug, Default)]
struct ControlState {
    events: Option<EventSender>,
    /// `events` belongs to a running sandbox (not to [`hold`]).
    sandbox: bool,
    pending: Vec<i32>,
}

impl Control {
    /// Forwards `signal` to the workload, or queues it until the sandbox starts.
    pub fn signal(&self, signal: i32) {
        let mut s = match self.inner.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match &s.events {
            Some(e) => e.signal(signal),
            None => s.pending.push(signal),
        }
    }

    /// The running sandbox's handle (to start execs in it); `None` before it starts and
    /// for a pod's sandbox container, which runs no VM.
    pub fn sandbox(&self) -> Option<EventSender> {
        let s = match self.inner.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.sandbox.then(|| s.events.clone()).flatten()
    }

    fn attach(&self, events: EventSender) {
        let mut s = match self.inner.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        for sig in s.pending.drain(..) {
            events.signal(sig);
        }
        s.events = Some(events);
    }
}

/// A pod's sandbox (pause) container: runs nothing and ends on the first signal, with 0
/// for SIGTERM or SIGINT (as `pause` does) and 128+N for any other signal N.
pub fn hold(control: &Control) -> i32 {
    let (tx, rx) = gpucell_sandbox::event_channel();
    control.attach(tx);
    loop {
        if let Some(sig) = rx.next_signal(std::time::Duration::from_secs(3600)) {
            return match sig {
                libc::SIGTERM | libc::SIGINT => 0,
                s => 128 + s,
            };
        }
    }
}

/// The observer of a task's run: it hands the sandbox's signal handle to [`Control`].
pub struct TaskObserver {
    pub task: String,
    pub control: Arc<Control>,
}

impl Observer for TaskObserver {
    fn warning(&mut self, message: &str) {
        tracing::warn!(task = %self.task, "{message}");
    }

    fn sandbox_starting(&mut self, events: EventSender) {
        self.control.attach(events);
        let mut s = match self.control.inner.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.sandbox = true;
    }
}
