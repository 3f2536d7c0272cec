//! How a started task runs: the seam between the task service and the run core. The real
//! [`NodeLauncher`] boots a gpucell microVM with `gpucell_runtime::run_with_rootfs`; the
//! task service's tests use a fake.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use gpucell_runtime::{
    AddedContainer, Node, Observer, ProcIo, RootfsSource, RunReport, RunRequest,
};
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

/// A container running in its pod's VM beside others (added to the VM, not its own
/// process).
pub trait Member: Send + Sync {
    /// Its pid in the guest.
    fn pid(&self) -> i32;
    /// The agent's id of the container (an exec into it names it).
    fn container(&self) -> u32;
    fn signal(&self, signal: i32) -> Result<(), String>;
    /// Waits for its end; the shell's exit code (128+N for signal N).
    fn wait(&self) -> Result<i32, String>;
    /// Sets the size of its terminal (one without a terminal ignores it).
    fn resize(&self, _rows: u16, _cols: u16) -> Result<(), String> {
        Ok(())
    }
}

impl Member for AddedContainer {
    fn pid(&self) -> i32 {
        self.handle.pid()
    }
    fn container(&self) -> u32 {
        self.handle.id()
    }
    fn signal(&self, signal: i32) -> Result<(), String> {
        self.handle.signal(signal).map_err(|e| e.to_string())
    }
    fn resize(&self, rows: u16, cols: u16) -> Result<(), String> {
        self.handle.resize(rows, cols).map_err(|e| e.to_string())
    }
    /// Waits for the container's end, then unplugs its disk (best effort: a VM that
    /// is gone, or a disk the guest keeps, only keeps its port).
    fn wait(&self) -> Result<i32, String> {
        let end = self.handle.wait();
        if end.is_ok() {
            if let Err(e) = self.release() {
                tracing::warn!(disk = %self.disk, error = %e, "unplugging an ended container's disk");
            }
        }
        end.map(|s| s.shell_code()).map_err(|e| e.to_string())
    }
}

/// Runs a task to its end. Called on a thread of its own: it may block for as long as
/// the task runs.
pub trait Launcher: Send + Sync + 'static {
    /// Runs `launch` with its streams on `io`; the observer's `sandbox_starting` receives
    /// the handle that signals the workload. The report's `exit_code` is the task's.
    fn run(&self, launch: Launch, io: SessionIo, obs: &mut dyn Observer) -> RunReport;

    /// Starts `launch` as a further container in the running pod VM behind `vm`, with
    /// its streams on `io`; returns once it runs.
    fn add_container(
        &self,
        _vm: &EventSender,
        _launch: Launch,
        _io: ProcIo,
    ) -> Result<Arc<dyn Member>, String> {
        Err("this launcher runs no pods".into())
    }
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

    fn add_container(
        &self,
        vm: &EventSender,
        launch: Launch,
        io: ProcIo,
    ) -> Result<Arc<dyn Member>, String> {
        gpucell_runtime::add_container(&self.node, vm, launch.request, &launch.rootfs, io)
            .map(|h| Arc::new(h) as Arc<dyn Member>)
            .map_err(|e| gpucell_runtime::error_chain(&e))
    }
}

/// A writer shared by the run core and the launcher.
#[derive(Clone)]
pub(crate) struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedWriter {
    pub(crate) fn new(w: Box<dyn Write + Send>) -> Self {
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
#[derive(Default)]
pub struct Control {
    inner: Mutex<ControlState>,
}

#[derive(Default)]
struct ControlState {
    target: Target,
    pending: Vec<i32>,
    /// The terminal's last size asked for before the task ran.
    pending_size: Option<(u16, u16)>,
}

/// Where a task's signals and execs go.
#[derive(Default)]
enum Target {
    /// Not started yet: signals are queued.
    #[default]
    Nothing,
    /// A pod's sandbox container, held by the shim ([`hold`]): no VM of its own.
    Held(EventSender),
    /// The task's own VM: its workload.
    Vm(EventSender),
    /// A container added to its pod's VM.
    Member {
        vm: EventSender,
        member: Arc<dyn Member>,
    },
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Control")
    }
}

impl Control {
    fn state(&self) -> std::sync::MutexGuard<'_, ControlState> {
        match self.inner.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// Forwards `signal` to the workload, or queues it until the sandbox starts.
    pub fn signal(&self, signal: i32) {
        let mut s = self.state();
        match &s.target {
            Target::Nothing => s.pending.push(signal),
            Target::Held(e) | Target::Vm(e) => e.signal(signal),
            Target::Member { member, .. } => {
                if let Err(e) = member.signal(signal) {
                    tracing::warn!(signal, error = %e, "signalling a pod's container");
                }
            }
        }
    }

    /// Sets the size of the task's terminal, or keeps it until the task runs.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), String> {
        let mut s = self.state();
        match &s.target {
            Target::Nothing => {
                s.pending_size = Some((rows, cols));
                Ok(())
            }
            Target::Held(_) => Ok(()),
            Target::Vm(e) => e.resize(rows, cols).map_err(|e| e.to_string()),
            Target::Member { member, .. } => member.resize(rows, cols),
        }
    }

    /// The running VM to start execs in, and the agent's id of the container there
    /// (`None`: the VM's own workload); `None` before it starts and for a pod's sandbox
    /// container.
    pub fn sandbox(&self) -> Option<(EventSender, Option<u32>)> {
        match &self.state().target {
            Target::Vm(e) => Some((e.clone(), None)),
            Target::Member { vm, member } => Some((vm.clone(), Some(member.container()))),
            Target::Nothing | Target::Held(_) => None,
        }
    }

    fn attach(&self, target: Target) {
        let mut s = self.state();
        s.target = target;
        let pending: Vec<i32> = s.pending.drain(..).collect();
        let size = s.pending_size.take();
        drop(s);
        for sig in pending {
            self.signal(sig);
        }
        if let Some((rows, cols)) = size {
            if let Err(e) = self.resize(rows, cols) {
                tracing::warn!(error = %e, "sizing the task's terminal");
            }
        }
    }

    /// The task runs as `member` of its pod's VM `vm`.
    pub fn attach_member(&self, vm: EventSender, member: Arc<dyn Member>) {
        self.attach(Target::Member { vm, member });
    }
}

/// A pod's sandbox (pause) container: runs nothing and ends on the first signal, with 0
/// for SIGTERM or SIGINT (as `pause` does) and 128+N for any other signal N.
pub fn hold(control: &Control) -> i32 {
    let (tx, rx) = gpucell_sandbox::event_channel();
    control.attach(Target::Held(tx));
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
        self.control.attach(Target::Vm(events));
    }
}
