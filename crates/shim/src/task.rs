//! The task service containerd talks to (task API v2 over ttrpc): one shim process
//! serves the tasks of one pod: a CRI pod's containers in one microVM, a `ctr run` task in its own.
//!
//! Lifecycle: `create` reads the bundle (spec, rootfs, devices) and checks the request;
//! `start` runs it on a thread of its own through the [`Launcher`]; `kill` forwards a
//! signal to the workload in the guest; the run's end is the task's exit (`wait`,
//! `/tasks/exit`); `delete` forgets the task and unmounts what the shim mounted.
//! `exec` starts a process in the task's VM. The containers of a CRI pod share one VM
//! (see [`crate::pod`]).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::{api, TtrpcContext, TtrpcResult};
use containerd_shim_protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskIO, TaskStart};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use gpucell_host::HostRoot;
use gpucell_runtime::AccelRequest;
use tokio::sync::watch;

use crate::bundle::TaskSpec;
use crate::events::EventTx;
use crate::launcher::{Control, Launch, Launcher, SharedWriter, TaskObserver};
use crate::pod::{Learn, Pod};
use crate::pod_resources::{PodName, PodResources};
use crate::stdio::StdioPaths;

mod exec;
mod rootfs;
use exec::ExecProc;
use rootfs::{rootfs_dir, unmount};

/// Exit code of a task killed before it started, or lost with its shim (128 + SIGKILL).
pub const EXIT_KILLED: u32 = 137;
/// The file in the bundle that receives the run report of a finished task.
pub const REPORT_FILE: &str = "gpucell-report.json";

/// What a task service needs from its node.
pub struct Settings {
    pub launcher: Arc<dyn Launcher>,
    pub host_root: HostRoot,
    pub accel: AccelRequest,
    /// Where a pod learns the devices of all its containers when its VM boots (the
    /// kubelet's PodResources API); none: each container's own.
    pub pod_resources: Option<Arc<dyn PodResources>>,
    /// Set when the node's settings could not be read: every `create` fails with it.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exit {
    code: u32,
    at: SystemTime,
}

struct Container {
    id: String,
    bundle: String,
    stdio: StdioPaths,
    launch: Mutex<Option<Launch>>,
    phase: Mutex<Phase>,
    exit_tx: watch::Sender<Option<Exit>>,
    control: Arc<Control>,
    /// The rootfs the shim mounted itself (unmounted on delete).
    mounted: Option<PathBuf>,
    /// Exec processes by exec id.
    execs: Mutex<HashMap<String, Arc<ExecProc>>>,
    /// The CRI pod the task belongs to: its sandbox container, or an application
    /// container that joins the pod's VM. `None`: the task boots a VM of its own.
    pod: Option<Arc<Pod>>,
}

impl Container {
    fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }
}

/// The task service of one shim process.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    events: EventTx,
    exit: Arc<ExitSignal>,
    pid: u32,
    /// Each pod's network namespace, from its sandbox container (see
    /// `TaskSpec::join_pod_netns`).
    pod_netns: Mutex<HashMap<String, PathBuf>>,
    /// The CRI pods served, by pod id (from their sandbox containers).
    pods: Mutex<HashMap<String, Arc<Pod>>>,
}

/// How long a stopped pod sandbox waits for its VM to power off.
const POD_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    MessageField::some(Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    })
}

fn phase_status(p: Phase) -> Status {
    match p {
        Phase::Created => Status::CREATED,
        Phase::Running => Status::RUNNING,
        Phase::Stopped => Status::STOPPED,
    }
}

/// What a wait for an exit returns once it came (or its sender is gone).
async fn wait_exit(mut rx: watch::Receiver<Option<Exit>>) -> TtrpcResult<api::WaitResponse> {
    let exit = rx
        .wait_for(Option::is_some)
        .await
        .map_err(|e| status(Code::INTERNAL, e.to_string()))?
        .unwrap_or(Exit {
            code: EXIT_KILLED,
            at: SystemTime::now(),
        });
    Ok(api::WaitResponse {
        exit_status: exit.code,
        exited_at: timestamp(exit.at),
        ..Default::default()
    })
}

impl TaskService {
    /// A service whose events go to `events`; `exit` is signalled by `shutdown` when no
    /// task is left.
    pub fn new(settings: Settings, events: EventTx, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            inner: Arc::new(Inner {
                settings,
                containers: Mutex::new(HashMap::new()),
                pod_netns: Mutex::new(HashMap::new()),
                pods: Mutex::new(HashMap::new()),
                events,
                exit,
                pid: std::process::id(),
            }),
        }
    }

    fn send(&self, topic: &'static str, message: Box<dyn MessageDyn>) {
        self.inner.events.send(topic, message);
    }

    fn get(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        lock(&self.inner.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("task {id:?} does not exist")))
    }

    /// The task of `req`, checked and ready to start.
    fn prepare(&self, req: &api::CreateTaskRequest) -> Result<Container, String> {
        let s = &self.inner.settings;
        if let Some(e) = &s.error {
            return Err(e.clone());
        }
        let bundle = Path::new(&req.bundle);
        let spec = TaskSpec::load(bundle).map_err(|e| gpucell_runtime::error_chain(&e))?;
        let passed = crate::devices::map(&s.host_root, &spec.devices)
            .map_err(|e| gpucell_runtime::error_chain(&e))?;
        for p in &passed.ignored {
            tracing::warn!(task = %req.id, device = %p.display(), "not a VFIO device: it does not reach the VM");
        }
        let mut request = spec.request(&format!("containerd:{}", req.id), s.accel);
        request.devices.gpus = passed.gpus_field();
        request.devices.functions = passed.functions_field();
        spec.join_pod_netns(&req.id, &mut request, &mut lock(&self.inner.pod_netns));
        request.terminal = spec.terminal || req.terminal;
        request
            .clone()
            .validate()
            .map_err(|e| gpucell_runtime::error_chain(&e))?;
        let (rootfs, mounted) = rootfs_dir(&req.rootfs, &spec.root)?;
        let launch = Launch {
            request,
            rootfs,
            sandbox: spec.is_pod_sandbox(),
        };
        let pod_id = spec.pod_id(&req.id);
        let pod = if launch.sandbox {
            let name = PodName::from_annotations(&spec.annotations);
            let pod = Pod::new(pod_id, bundle.to_path_buf(), launch.clone(), name);
            lock(&self.inner.pods).insert(pod_id.to_string(), Arc::clone(&pod));
            Some(pod)
        } else if pod_id != req.id {
            lock(&self.inner.pods).get(pod_id).cloned()
        } else {
            None
        };
        let (exit_tx, _) = watch::channel(None);
        Ok(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            stdio: StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
            launch: Mutex::new(Some(launch)),
            phase: Mutex::new(Phase::Created),
            exit_tx,
            control: Arc::new(Control::default()),
            mounted,
            execs: Mutex::new(HashMap::new()),
            pod,
        })
    }

    /// Records the task's exit and tells containerd. The exit event is queued before
    /// `wait` or `delete` can see the exit, so that `/tasks/exit` precedes
    /// `/tasks/delete`.
    fn exited(&self, c: &Container, code: u32) {
        let mut phase = lock(&c.phase);
        let exit = Exit {
            code,
            at: SystemTime::now(),
        };
        self.send(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: c.id.clone(),
                id: c.id.clone(),
                pid: self.inner.pid,
                exit_status: code,
                exited_at: timestamp(exit.at),
                ..Default::default()
            }),
        );
        *phase = Phase::Stopped;
        c.exit_tx.send_replace(Some(exit));
    }

    /// Runs the task on a thread of its own until it ends.
    fn spawn_run(&self, c: Arc<Container>, launch: Launch) -> std::io::Result<()> {
        let service = self.clone();
        std::thread::Builder::new()
            .name(format!("task-{}", c.id))
            .spawn(move || {
                let code = service.run_task(&c, launch);
                service.exited(&c, code);
            })
            .map(|_| ())
    }

    fn run_task(&self, c: &Container, launch: Launch) -> u32 {
        if launch.sandbox {
            // No output will come: closing the streams at once tells the client so.
            drop(c.stdio.open());
            let code = crate::launcher::hold(&c.control) as u32;
            if let Some(pod) = &c.pod {
                pod.stop(POD_STOP_WAIT);
            }
            return code;
        }
        if let Some(pod) = &c.pod {
            return self.run_member(c, pod, launch);
        }
        let io = match c.stdio.open() {
            Ok(io) => io,
            Err(e) => {
                tracing::error!(task = %c.id, "{}", gpucell_runtime::error_chain(&e));
                return gpucell_runtime::EXIT_RUN_FAILED as u32;
            }
        };
        let mut obs = TaskObserver {
            task: c.id.clone(),
            control: Arc::clone(&c.control),
        };
        let report = self.inner.settings.launcher.run(launch, io, &mut obs);
        let path = Path::new(&c.bundle).join(REPORT_FILE);
        match serde_json::to_vec_pretty(&report) {
            Ok(json) => {
                if let Err(e) = std::fs::write(&path, json) {
                    tracing::warn!(path = %path.display(), error = %e, "writing the run report");
                }
            }
            Err(e) => tracing::warn!(error = %e, "serializing the run report"),
        }
        report.exit_code.clamp(0, 255) as u32
    }
}

impl TaskService {
    /// Runs a CRI application container in its pod's VM (booted for it when it is the
    /// pod's first) until it ends. A failure is told on the container's stderr.
    fn run_member(&self, c: &Container, pod: &Arc<Pod>, launch: Launch) -> u32 {
        let io = match c.stdio.open() {
            Ok(io) => io,
            Err(e) => {
                tracing::error!(task = %c.id, "{}", gpucell_runtime::error_chain(&e));
                return gpucell_runtime::EXIT_RUN_FAILED as u32;
            }
        };
        let stderr = SharedWriter::new(io.stderr);
        let launcher = &self.inner.settings.launcher;
        let learn = Learn {
            root: &self.inner.settings.host_root,
            resources: self.inner.settings.pod_resources.as_deref(),
        };
        let started = pod.join(launcher, launch, &learn).and_then(|(vm, launch)| {
            let io = gpucell_runtime::ProcIo {
                stdout: io.stdout,
                stderr: Box::new(stderr.clone()),
                stdin: io.stdin,
            };
            launcher.add_container(&vm, launch, io).map(|m| (vm, m))
        });
        let (vm, member) = match started {
            Ok(s) => s,
            Err(e) => {
                let mut w = stderr;
                let _ = writeln!(w, "gpucell: error: {e}");
                tracing::error!(task = %c.id, "{e}");
                return gpucell_runtime::EXIT_RUN_FAILED as u32;
            }
        };
        c.control.attach_member(vm, Arc::clone(&member));
        match member.wait() {
            Ok(code) => code.clamp(0, 255) as u32,
            Err(e) => {
                tracing::warn!(task = %c.id, "{e}");
                EXIT_KILLED
            }
        }
    }
}

/// A terminal size as containerd sends it (height, width) in the agent's bounds.
fn window(height: u32, width: u32) -> Result<(u16, u16), String> {
    let size = gpucell_protocol::WindowSize {
        rows: u16::try_from(height).unwrap_or(u16::MAX),
        cols: u16::try_from(width).unwrap_or(u16::MAX),
    };
    match size.problem() {
        Some(p) => Err(p),
        None => Ok((size.rows, size.cols)),
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if lock(&self.inner.containers).contains_key(&req.id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("task {:?} already exists", req.id),
            ));
        }
        let service = self.clone();
        let r = req.clone();
        let container = tokio::task::spawn_blocking(move || service.prepare(&r))
            .await
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("task {:?}: {e}", req.id)))?;
        lock(&self.inner.containers).insert(req.id.clone(), Arc::new(container));
        self.send(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid: self.inner.pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid: self.inner.pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let c = self.get(&req.id)?;
        if !req.exec_id.is_empty() {
            let e = self.get_exec(&c, &req.exec_id)?;
            let service = self.clone();
            let pid = tokio::task::spawn_blocking(move || service.start_exec(&c, &e))
                .await
                .map_err(|e| status(Code::INTERNAL, e.to_string()))?
                .map_err(|e| {
                    status(
                        Code::FAILED_PRECONDITION,
                        format!("exec {:?}: {e}", req.exec_id),
                    )
                })?;
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let launch = {
            let mut phase = lock(&c.phase);
            if *phase != Phase::Created {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "task {:?} cannot start: it was started or killed already",
                        req.id
                    ),
                ));
            }
            let launch = lock(&c.launch).take().ok_or_else(|| {
                status(
                    Code::FAILED_PRECONDITION,
                    format!("task {:?} has no launch", req.id),
                )
            })?;
            *phase = Phase::Running;
            launch
        };
        if let Err(e) = self.spawn_run(Arc::clone(&c), launch) {
            self.exited(&c, gpucell_runtime::EXIT_RUN_FAILED as u32);
            return Err(status(
                Code::INTERNAL,
                format!("starting the task's thread: {e}"),
            ));
        }
        self.send(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: req.id.clone(),
                pid: self.inner.pid,
                ..Default::default()
            }),
        );
        Ok(api::StartResponse {
            pid: self.inner.pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let c = self.get(&req.id)?;
        if !req.exec_id.is_empty() {
            let e = self.get_exec(&c, &req.exec_id)?;
            let exit = e.exit();
            let phase = *lock(&e.phase);
            return Ok(api::StateResponse {
                id: e.id.clone(),
                bundle: c.bundle.clone(),
                pid: self.inner.pid,
                status: phase_status(phase).into(),
                stdin: e.stdio.stdin.clone(),
                stdout: e.stdio.stdout.clone(),
                stderr: e.stdio.stderr.clone(),
                exec_id: e.id.clone(),
                exit_status: exit.map(|e| e.code).unwrap_or(0),
                exited_at: exit.map(|e| timestamp(e.at)).unwrap_or_default(),
                ..Default::default()
            });
        }
        let exit = c.exit();
        let status = phase_status(c.phase());
        Ok(api::StateResponse {
            id: c.id.clone(),
            bundle: c.bundle.clone(),
            pid: self.inner.pid,
            status: status.into(),
            stdin: c.stdio.stdin.clone(),
            stdout: c.stdio.stdout.clone(),
            stderr: c.stdio.stderr.clone(),
            terminal: c.stdio.terminal,
            exit_status: exit.map(|e| e.code).unwrap_or(0),
            exited_at: exit.map(|e| timestamp(e.at)).unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let c = self.get(&req.id)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| {
                status(
                    Code::INVALID_ARGUMENT,
                    format!("signal {} is not a signal number", req.signal),
                )
            })?;
        if !req.exec_id.is_empty() {
            let e = self.get_exec(&c, &req.exec_id)?;
            self.kill_exec(&c, &e, signal)?;
            return Ok(api::Empty::default());
        }
        let phase = c.phase();
        match phase {
            Phase::Created => {
                // Nothing runs yet: the task ends here, as runc's init would.
                lock(&c.launch).take();
                self.exited(&c, 128 + signal as u32);
            }
            Phase::Running => c.control.signal(signal),
            Phase::Stopped => {
                return Err(status(
                    Code::NOT_FOUND,
                    format!("task {:?}: process already finished", req.id),
                ))
            }
        }
        Ok(api::Empty::default())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let c = self.get(&req.id)?;
        if !req.exec_id.is_empty() {
            let e = self.get_exec(&c, &req.exec_id)?;
            return wait_exit(e.exit_tx.subscribe()).await;
        }
        wait_exit(c.exit_tx.subscribe()).await
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let c = self.get(&req.id)?;
        if !req.exec_id.is_empty() {
            let e = self.get_exec(&c, &req.exec_id)?;
            if *lock(&e.phase) == Phase::Running {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("exec {:?} is running: kill it first", req.exec_id),
                ));
            }
            lock(&c.execs).remove(&req.exec_id);
            let exit = e.exit().unwrap_or(Exit {
                code: 0,
                at: SystemTime::now(),
            });
            return Ok(api::DeleteResponse {
                pid: self.inner.pid,
                exit_status: exit.code,
                exited_at: timestamp(exit.at),
                ..Default::default()
            });
        }
        if c.phase() == Phase::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("task {:?} is running: kill it first", req.id),
            ));
        }
        lock(&self.inner.containers).remove(&req.id);
        // A pod is known by its sandbox container's id: when that goes, so does the pod.
        lock(&self.inner.pods).remove(&req.id);
        if let Some(m) = &c.mounted {
            unmount(m);
        }
        let exit = c.exit().unwrap_or(Exit {
            code: 0,
            at: SystemTime::now(),
        });
        self.send(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: c.id.clone(),
                pid: self.inner.pid,
                exit_status: exit.code,
                exited_at: timestamp(exit.at),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid: self.inner.pid,
            exit_status: exit.code,
            exited_at: timestamp(exit.at),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let c = self.get(&req.id)?;
        let processes = match c.phase() {
            Phase::Stopped => Vec::new(),
            _ => vec![ProcessInfo {
                pid: self.inner.pid,
                ..Default::default()
            }],
        };
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        self.add_exec(&req)?;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.get(&req.id)?;
        let (rows, cols) = window(req.height, req.width).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!("resize of {:?}: {e}", req.id),
            )
        })?;
        let done = if req.exec_id.is_empty() {
            c.control.resize(rows, cols)
        } else {
            self.resize_exec(&c, &req.exec_id, rows, cols)?
        };
        done.map_err(|e| {
            status(
                Code::FAILED_PRECONDITION,
                format!("resize of {:?}: {e}", req.id),
            )
        })?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        self.get(&req.id)?;
        // stdin ends when the client closes its end of the FIFO.
        Ok(api::Empty::default())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = match self.get(&req.id) {
            Ok(_) => self.inner.pid,
            Err(_) => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: self.inner.pid,
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if lock(&self.inner.containers).is_empty() {
            self.inner.exit.signal();
        }
        Ok(api::Empty::default())
    }
}
