//! A started QEMU and what the run does with it: pin, connect the agent, relay the
//! session, shut down.

use super::*;

/// A started QEMU and its monitor: the phases after the spawn work on this. Dropping
/// it kills QEMU's process group.
pub(super) struct Vm {
    pub(super) qemu: QemuProcess,
    /// Shared with the hot-plug of a pod's disks while the session runs.
    pub(super) qmp: Arc<Mutex<Qmp>>,
    pub(super) spawned_at: Instant,
    /// When QMP answered.
    pub(super) ready_at: Instant,
}

impl Vm {
    pub(super) fn qmp(&self) -> std::sync::MutexGuard<'_, Qmp> {
        match self.qmp.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Pins the vCPU threads to `cpus` (with `--pin-cpus`) and QEMU's other threads to
    /// all of them.
    pub(super) fn pin(&mut self, cpus: Option<&[u32]>) -> Result<Vec<VcpuPin>, RunError> {
        let Some(cpus) = cpus else {
            return Ok(Vec::new());
        };
        let pid = self.qemu.pid();
        crate::devices::pin_vcpus(&mut self.qmp(), cpus)
            .and_then(|p| {
                let tids: Vec<i32> = p.iter().map(|v| v.thread_id).collect();
                crate::devices::pin_emulator_threads(pid, &tids, cpus).map(|_| p)
            })
            .map_err(|e| with_logs(e.into(), &self.qemu))
    }

    /// Connects to the agent: the virtio-serial socket at once, or the vsock
    /// connection from the guest's CID within the boot timeout.
    pub(super) fn connect_agent(
        &mut self,
        plan: &Plan,
        listener: Option<&VsockListener>,
        agent_path: &Path,
        hello_timeout: Duration,
    ) -> Result<Stream, RunError> {
        let (Some(listener), Some(cid)) = (listener, plan.vsock_cid) else {
            return match UnixStream::connect(agent_path) {
                Ok(s) => {
                    let _ = s.set_write_timeout(Some(AGENT_WRITE_TIMEOUT));
                    Ok(Stream::Serial(s))
                }
                Err(source) => Err(with_logs(
                    SandboxError::AgentConnect {
                        path: agent_path.to_path_buf(),
                        source,
                    },
                    &self.qemu,
                )),
            };
        };
        let deadline = Instant::now() + hello_timeout;
        let qemu = &mut self.qemu;
        let accepted =
            listener.accept_from(cid, deadline, &mut || matches!(qemu.try_wait(), Ok(None)));
        let conn = accepted.map_err(|e| {
            let error = match self.qemu.wait_timeout(Duration::from_millis(200)) {
                Ok(Some(status)) => SandboxError::VmExited {
                    status: status.to_string(),
                    stderr: self.qemu.stderr().tail_lines(5),
                },
                // Still running: where its vCPUs are tells a guest that never booted
                // from one whose agent failed.
                _ => SandboxError::VsockStalled {
                    source: e,
                    vm: self.qmp().vm_state(),
                },
            };
            with_logs(error, &self.qemu)
        })?;
        if let Err(e) = crate::vsock::set_send_timeout(&conn, AGENT_WRITE_TIMEOUT) {
            tracing::warn!(error = %e, "cannot bound writes to the agent's vsock connection");
        }
        Ok(Stream::Vsock(conn))
    }

    /// Why the VM is no longer running, if it is not: QEMU exited, or (asked over QMP
    /// at most once a second) the guest stopped.
    pub(super) fn gone(&mut self, last_status: &mut Instant) -> Option<String> {
        match self.qemu.try_wait() {
            Ok(Some(st)) => {
                let said = self.qemu.stderr().tail_lines(3);
                return Some(format!(
                    "QEMU exited ({}){}",
                    describe_exit(&st),
                    qemu_said(&said)
                ));
            }
            Ok(None) => {}
            Err(e) => return Some(e.to_string()),
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            *last_status = Instant::now();
            let status = self.qmp().status();
            if let Ok(s) = status {
                if matches!(
                    s.as_str(),
                    "internal-error" | "guest-panicked" | "io-error" | "shutdown"
                ) {
                    return Some(format!("the VM stopped (QEMU status {s})"));
                }
            }
        }
        None
    }

    /// Runs the session with the agent over `stream`. The outer error is a channel that
    /// could not be split; the inner one the session's own.
    pub(super) fn relay_session(
        &mut self,
        stream: &Stream,
        agent_path: &Path,
        spec: &RunSpec,
        io: SessionIo,
        limits: &Limits,
        events: EventReceiver,
    ) -> Result<crate::channel::SessionReport, SessionOrRun> {
        let (reader, writer) = stream.halves().map_err(|source| {
            SessionOrRun::Run(with_logs(
                SandboxError::AgentConnect {
                    path: agent_path.to_path_buf(),
                    source,
                },
                &self.qemu,
            ))
        })?;
        // The relay polls this to learn that the VM died or stopped under it.
        let mut last_status = Instant::now();
        let mut vm_gone = || self.gone(&mut last_status);
        relay(reader, writer, spec, io, limits, events, &mut vm_gone).map_err(SessionOrRun::Session)
    }

    /// Shuts down: the agent powers off after Exited (and on Shutdown); give it a
    /// moment when `graceful`, then ask QEMU to quit, then kill it.
    pub(super) fn shut_down(&mut self, graceful: bool) {
        let exited = graceful && matches!(self.qemu.wait_timeout(POWEROFF_GRACE), Ok(Some(_)));
        if !exited {
            let _ = self.qmp().quit();
            if !matches!(self.qemu.wait_timeout(QUIT_GRACE), Ok(Some(_))) {
                tracing::warn!(pid = self.qemu.pid(), "QEMU did not quit; killing it");
            }
        }
        self.qemu.kill();
    }

    /// Ends a run whose session failed, with the guest's and QEMU's last words.
    pub(super) fn fail(&mut self, e: SessionOrRun) -> RunError {
        let e = match e {
            // Dropping the VM kills QEMU.
            SessionOrRun::Run(r) => return r,
            SessionOrRun::Session(e) => e,
        };
        let graceful = matches!(e, SessionError::Interrupted(_) | SessionError::Timeout(_));
        self.shut_down(graceful);
        // Let the capture threads take QEMU's last words.
        std::thread::sleep(Duration::from_millis(50));
        with_logs(e.into(), &self.qemu)
    }
}

/// How a session ended without the workload's exit.
pub(super) enum SessionOrRun {
    /// The channel could not be set up.
    Run(RunError),
    Session(SessionError),
}
