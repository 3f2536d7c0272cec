//! Exec processes of a task: `ctr task exec` and CRI's `ExecSync`. `exec` records the
//! process (its OCI process spec and stdio FIFOs); `start` runs it in the task's VM
//! through the agent ([`gpucell_runtime::exec_in`]); its exit is a `/tasks/exit` event
//! with the exec's id and answers `wait`. With a terminal, the process gets a pty in the
//! guest (its output on stdout; containerd sends no stderr) and `ResizePty` sizes it.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use containerd_shim::{api, TtrpcResult};
use containerd_shim_protos::events::task::{TaskExecAdded, TaskExecStarted, TaskExit};
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::Code;
use gpucell_protocol::ProcSpec;
use gpucell_runtime::{ExecHandle, ProcIo};
use tokio::sync::watch;

use super::{lock, status, timestamp, Container, Exit, Phase, TaskService, EXIT_KILLED};
use crate::stdio::StdioPaths;

/// One exec process of a task.
pub(super) struct ExecProc {
    pub id: String,
    pub stdio: StdioPaths,
    spec: Mutex<Option<ProcSpec>>,
    pub phase: Mutex<Phase>,
    pub exit_tx: watch::Sender<Option<Exit>>,
    handle: Mutex<Option<Arc<ExecHandle>>>,
}

impl ExecProc {
    pub fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }
}

/// The exec's process spec (OCI `Process` JSON, as containerd sends it) in the agent's
/// terms; the errors say what is wrong with it.
pub(super) fn proc_spec(req: &api::ExecProcessRequest) -> Result<ProcSpec, String> {
    let any = req
        .spec
        .as_ref()
        .ok_or("the request carries no process spec")?;
    let p: oci_spec::runtime::Process = serde_json::from_slice(&any.value)
        .map_err(|e| format!("the process spec is not an OCI process: {e}"))?;
    let args = p.args().clone().unwrap_or_default();
    if args.first().is_none_or(|a| a.is_empty()) {
        return Err("the process spec has an empty args: give the exec a command".into());
    }
    let terminal = req.terminal || p.terminal().unwrap_or(false);
    let window = p.console_size().as_ref().and_then(|b| {
        let size = gpucell_protocol::WindowSize {
            rows: u16::try_from(b.height()).ok()?,
            cols: u16::try_from(b.width()).ok()?,
        };
        size.problem().is_none().then_some(size)
    });
    Ok(ProcSpec {
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd: p.cwd().to_string_lossy().into_owned(),
        user: format!("{}:{}", p.user().uid(), p.user().gid()),
        container: None,
        terminal,
        window: window.filter(|_| terminal),
    })
}

impl TaskService {
    pub(super) fn get_exec(&self, c: &Container, exec_id: &str) -> TtrpcResult<Arc<ExecProc>> {
        lock(&c.execs).get(exec_id).cloned().ok_or_else(|| {
            status(
                Code::NOT_FOUND,
                format!("task {:?} has no exec {exec_id:?}", c.id),
            )
        })
    }

    /// Records an exec of a running task.
    pub(super) fn add_exec(&self, req: &api::ExecProcessRequest) -> TtrpcResult<()> {
        let c = self.get(&req.id)?;
        if c.phase() != Phase::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("exec into task {:?}: the task is not running", req.id),
            ));
        }
        let spec = proc_spec(req).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!("exec {:?}: {e}", req.exec_id),
            )
        })?;
        let mut execs = lock(&c.execs);
        if execs.contains_key(&req.exec_id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("exec {:?} already exists", req.exec_id),
            ));
        }
        let (exit_tx, _) = watch::channel(None);
        execs.insert(
            req.exec_id.clone(),
            Arc::new(ExecProc {
                id: req.exec_id.clone(),
                stdio: StdioPaths {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
                spec: Mutex::new(Some(spec)),
                phase: Mutex::new(Phase::Created),
                exit_tx,
                handle: Mutex::new(None),
            }),
        );
        drop(execs);
        self.send(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(())
    }

    /// Starts an exec in the task's VM; blocks until the agent started it (run it on a
    /// blocking thread). Returns the guest pid.
    pub(super) fn start_exec(&self, c: &Arc<Container>, e: &Arc<ExecProc>) -> Result<u32, String> {
        let spec = {
            let mut phase = lock(&e.phase);
            if *phase != Phase::Created {
                return Err(format!("exec {:?} was started already", e.id));
            }
            let spec = lock(&e.spec).take().ok_or("the exec has no spec")?;
            *phase = Phase::Running;
            spec
        };
        let started = self.run_exec(c, e, spec);
        let handle = match started {
            Ok(h) => h,
            Err(message) => {
                self.exec_exited(c, e, gpucell_runtime::EXIT_RUN_FAILED as u32);
                return Err(message);
            }
        };
        let pid = u32::try_from(handle.pid()).unwrap_or(0);
        *lock(&e.handle) = Some(Arc::clone(&handle));
        let (service, c2, e2) = (self.clone(), Arc::clone(c), Arc::clone(e));
        let waiter = std::thread::Builder::new()
            .name(format!("exec-{}", e.id))
            .spawn(move || {
                let code = match handle.wait() {
                    Ok(s) => s.shell_code().clamp(0, 255) as u32,
                    Err(err) => {
                        tracing::warn!(exec = %e2.id, "{err}");
                        EXIT_KILLED
                    }
                };
                service.exec_exited(&c2, &e2, code);
            });
        if let Err(err) = waiter {
            return Err(format!("starting the exec's thread: {err}"));
        }
        self.send(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: e.id.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(pid)
    }

    fn run_exec(
        &self,
        c: &Container,
        e: &ExecProc,
        spec: ProcSpec,
    ) -> Result<Arc<ExecHandle>, String> {
        let (sandbox, container) = c.control.sandbox().ok_or_else(|| {
            format!(
                "task {:?} has no running VM to exec into (a pod's sandbox container runs none)",
                c.id
            )
        })?;
        let spec = ProcSpec { container, ..spec };
        let io = e
            .stdio
            .open()
            .map_err(|err| gpucell_runtime::error_chain(&err))?;
        let io = ProcIo {
            stdout: io.stdout,
            stderr: io.stderr,
            stdin: io.stdin,
        };
        gpucell_runtime::exec_in(&sandbox, spec, io)
            .map(Arc::new)
            .map_err(|err| gpucell_runtime::error_chain(&err))
    }

    /// Sets the size of exec `exec_id`'s terminal; one not started yet ignores it.
    pub(super) fn resize_exec(
        &self,
        c: &Container,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> TtrpcResult<Result<(), String>> {
        let e = self.get_exec(c, exec_id)?;
        let handle = lock(&e.handle).clone();
        Ok(match handle {
            Some(h) => h.resize(rows, cols).map_err(|e| e.to_string()),
            None => Ok(()),
        })
    }

    /// Records an exec's exit and tells containerd (`/tasks/exit` with the exec's id).
    pub(super) fn exec_exited(&self, c: &Container, e: &ExecProc, code: u32) {
        let mut phase = lock(&e.phase);
        let exit = Exit {
            code,
            at: SystemTime::now(),
        };
        self.send(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: c.id.clone(),
                id: e.id.clone(),
                pid: self.inner.pid,
                exit_status: code,
                exited_at: timestamp(exit.at),
                ..Default::default()
            }),
        );
        *phase = Phase::Stopped;
        e.exit_tx.send_replace(Some(exit));
    }

    /// Signals a running exec; one not started yet ends at once.
    pub(super) fn kill_exec(&self, c: &Container, e: &ExecProc, signal: i32) -> TtrpcResult<()> {
        let phase = *lock(&e.phase);
        match phase {
            Phase::Created => {
                lock(&e.spec).take();
                self.exec_exited(c, e, 128 + signal as u32);
                Ok(())
            }
            Phase::Running => {
                let handle = lock(&e.handle).clone();
                match handle {
                    Some(h) => h
                        .signal(signal)
                        .map_err(|err| status(Code::INTERNAL, err.to_string())),
                    // Still starting: the start's answer comes first.
                    None => Err(status(
                        Code::FAILED_PRECONDITION,
                        format!("exec {:?} is still starting", e.id),
                    )),
                }
            }
            Phase::Stopped => Err(status(
                Code::NOT_FOUND,
                format!("exec {:?}: process already finished", e.id),
            )),
        }
    }
}
