//! The supervisor: one process per run of a sandbox (`gpucelld supervise --dir D`),
//! started by the daemon in its own session so that it and its QEMU outlive a daemon
//! that dies. It runs the run core on `D/request.json`, writes the workload's output to
//! `D/log` ([`crate::logs`]) and its progress to `D/state.json` ([`Progress`]), and
//! forwards SIGTERM/SIGINT to the workload (the run core then gives it its grace period
//! and stops the VM). QEMU dies with it (`PR_SET_PDEATHSIG`), so a supervisor killed by
//! SIGKILL leaves no VM running.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use gpucell_api::SandboxState;
use gpucell_host::devices::record::Owner;
use gpucell_runtime::{Node, Observer, Phase, RunReport, RunRequest};
use gpucell_sandbox::{EventSender, SessionIo};
use serde::{Deserialize, Serialize};

use crate::logs::{now_ms, LogFile, StreamWriter};

pub const REQUEST: &str = "request.json";
pub const STATE: &str = "state.json";
pub const OWNER: &str = "supervisor.json";
/// Held (flock) by the supervisor for its whole life: while it is held, a run of this
/// sandbox is going on, whatever the daemon's records say.
pub const LOCK: &str = "supervisor.lock";
/// Where the supervisor's own messages go.
pub const SUPERVISOR_LOG: &str = "supervisor.log";

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("cannot read the run request {path:?}")]
    Request {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the run request {path:?} is not valid: {problem}")]
    BadRequest { path: PathBuf, problem: String },
    #[error("cannot write {path:?}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read this process's start time")]
    Owner(#[source] gpucell_host::devices::record::RecordError),
    #[error(transparent)]
    Log(#[from] crate::logs::LogError),
    #[error("another supervisor runs the sandbox in {0:?}")]
    Busy(PathBuf),
    #[error("cannot install the SIGTERM/SIGINT handlers")]
    Signals(#[source] std::io::Error),
}

/// What a supervisor reports of its run, rewritten whole at each change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub state: Option<SandboxState>,
    #[serde(default)]
    pub timestamps: BTreeMap<SandboxState, u64>,
    #[serde(default)]
    pub phases_ms: BTreeMap<String, u64>,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub report: Option<serde_json::Value>,
    /// The run returned: `exit_code` and `report` are final.
    #[serde(default)]
    pub done: bool,
}

impl Progress {
    /// `D/state.json`; `None` when absent or unreadable (a supervisor that died before
    /// writing it).
    pub fn read(dir: &Path) -> Option<Progress> {
        let text = std::fs::read(dir.join(STATE)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Writes `D/state.json` atomically (temporary file, fsync, rename).
    pub fn write(&self, dir: &Path) -> Result<(), SuperviseError> {
        write_atomic(dir, STATE, &serde_json::to_vec(self).unwrap_or_default())
    }

    fn enter(&mut self, state: SandboxState) {
        if self.state != Some(state) {
            self.state = Some(state);
            self.timestamps.insert(state, now_ms());
        }
    }
}

/// Writes `dir/name` through a temporary file and a rename, with fsync, so that a
/// reader sees the old or the new content, never a part.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SuperviseError> {
    use std::io::Write;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let err = |source| SuperviseError::Write {
        path: path.clone(),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

/// The state a phase puts the sandbox in.
fn state_of(phase: Phase) -> Option<SandboxState> {
    match phase {
        Phase::Validate | Phase::Image => Some(SandboxState::Pulling),
        Phase::Guest | Phase::Accel | Phase::Devices => Some(SandboxState::Booting),
        Phase::Sandbox => Some(SandboxState::Running),
        Phase::Release | Phase::Done => None,
    }
}

fn phase_name(phase: Phase) -> String {
    serde_json::to_value(phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{phase:?}"))
}

/// A stop asked for by signal, and where to forward it once the sandbox runs.
#[derive(Default)]
struct Stop {
    requested: AtomicBool,
    events: Mutex<Option<EventSender>>,
}

impl Stop {
    fn signal(&self, sig: i32) {
        self.requested.store(true, Ordering::SeqCst);
        if let Ok(events) = self.events.lock() {
            if let Some(e) = events.as_ref() {
                e.signal(sig);
            }
        }
    }
}

struct Supervision {
    dir: PathBuf,
    progress: Progress,
    current: Option<(Phase, Instant)>,
    stop: Arc<Stop>,
    log: Arc<Mutex<LogFile>>,
}

impl Supervision {
    fn save(&self) {
        if let Err(e) = self.progress.write(&self.dir) {
            tracing::warn!("{}", gpucell_common::chain_string(&e));
        }
    }

    fn close_phase(&mut self) {
        if let Some((phase, at)) = self.current.take() {
            let ms = at.elapsed().as_millis() as u64;
            *self
                .progress
                .phases_ms
                .entry(phase_name(phase))
                .or_default() += ms;
        }
    }
}

impl Observer for Supervision {
    fn phase(&mut self, phase: Phase) {
        self.close_phase();
        self.current = Some((phase, Instant::now()));
        if let Some(state) = state_of(phase) {
            self.progress.enter(state);
        }
        self.save();
    }

    fn warning(&mut self, message: &str) {
        if let Ok(mut log) = self.log.lock() {
            log.write_line("gpucell", &format!("warning: {message}"));
        }
    }

    fn sandbox_starting(&mut self, events: EventSender) {
        if let Ok(mut slot) = self.stop.events.lock() {
            if self.stop.requested.load(Ordering::SeqCst) {
                events.signal(libc::SIGTERM);
            }
            *slot = Some(events);
        }
    }
}

/// Forwards SIGTERM and SIGINT to `stop` from a thread, until the process ends.
fn install_signals(stop: Arc<Stop>) -> Result<(), SuperviseError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(SuperviseError::Signals)?;
    std::thread::Builder::new()
        .name("stop".into())
        .spawn(move || {
            for sig in signals.forever() {
                stop.signal(sig);
            }
        })
        .map_err(SuperviseError::Signals)?;
    Ok(())
}

/// Runs the sandbox described in `dir`; returns the workload's exit code.
/// Takes the sandbox directory's lock, or says that a supervisor holds it.
pub fn lock(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, SuperviseError> {
    let path = dir.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| SuperviseError::Write {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| SuperviseError::Busy(dir.to_path_buf()))
}

pub fn supervise(node: &Node, dir: &Path, log_max_bytes: u64) -> Result<i32, SuperviseError> {
    // Held until the process exits.
    let _lock = lock(dir)?;
    let owner = Owner::current(Path::new("/proc")).map_err(SuperviseError::Owner)?;
    write_atomic(dir, OWNER, &serde_json::to_vec(&owner).unwrap_or_default())?;
    let path = dir.join(REQUEST);
    let text = std::fs::read(&path).map_err(|source| SuperviseError::Request {
        path: path.clone(),
        source,
    })?;
    let request: RunRequest =
        serde_json::from_slice(&text).map_err(|e| SuperviseError::BadRequest {
            path: path.clone(),
            problem: e.to_string(),
        })?;
    let stop = Arc::new(Stop::default());
    install_signals(stop.clone())?;
    let log = Arc::new(Mutex::new(LogFile::open(dir, log_max_bytes)?));
    let mut sup = Supervision {
        dir: dir.to_path_buf(),
        progress: Progress::default(),
        current: None,
        stop,
        log: log.clone(),
    };
    sup.progress.enter(SandboxState::Pulling);
    sup.save();
    let io = SessionIo {
        stdout: Box::new(StreamWriter::new(log.clone(), "stdout")),
        stderr: Box::new(StreamWriter::new(log.clone(), "stderr")),
        stdin: None,
    };
    let report = gpucell_runtime::run(node, request, io, &mut sup);
    sup.close_phase();
    finish(&mut sup, &report);
    Ok(report.exit_code)
}

fn finish(sup: &mut Supervision, report: &RunReport) {
    let failed = report.error.is_some() && report.status.is_none();
    sup.progress.enter(if failed {
        SandboxState::Failed
    } else {
        SandboxState::Exited
    });
    sup.progress.exit_code = Some(report.exit_code);
    sup.progress.error = report.error.clone();
    sup.progress.run_id = report.run_id.clone();
    sup.progress.report = serde_json::to_value(report).ok();
    sup.progress.done = true;
    if let Some(error) = &report.error {
        if let Ok(mut log) = sup.log.lock() {
            log.write_line("gpucell", &format!("error: {error}"));
        }
    }
    sup.save();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_and_phases_map_to_states() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Progress::read(dir.path()).is_none());
        let mut p = Progress::default();
        p.enter(SandboxState::Booting);
        p.phases_ms.insert("image".into(), 5);
        p.write(dir.path()).unwrap();
        assert_eq!(Progress::read(dir.path()).unwrap(), p);
        assert_eq!(state_of(Phase::Image), Some(SandboxState::Pulling));
        assert_eq!(state_of(Phase::Devices), Some(SandboxState::Booting));
        assert_eq!(state_of(Phase::Sandbox), Some(SandboxState::Running));
        assert_eq!(phase_name(Phase::Accel), "accel");
    }
}
