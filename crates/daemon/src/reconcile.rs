//! Moving sandboxes along: starting supervisors, following their progress, noticing
//! their end, restarting by policy, escalating stops, and — once at start — adopting
//! the supervisors a previous daemon left running.

use std::path::Path;

use gpucell_api::{Desired, RestartPolicy, SandboxState};
use gpucell_host::devices::record::Owner;

use crate::logs::{now_ms, LogFile};
use crate::metrics::{PhaseLabel, StateLabel};
use crate::service::{enter, Inner, Service, DEFAULT_GRACE_MS};
use crate::store::Record;
use crate::supervise::{write_atomic, Progress, OWNER, REQUEST, STATE};

/// Longest wait between restarts.
const MAX_BACKOFF_MS: u64 = 60_000;

/// Wait before restart number `n` (1-based): 1 s, 2 s, 4 s ... at most a minute.
pub fn backoff_ms(n: u32) -> u64 {
    1000u64
        .saturating_mul(1u64 << n.saturating_sub(1).min(16))
        .min(MAX_BACKOFF_MS)
}

/// Whether a run that ended this way is started again.
pub fn should_restart(policy: RestartPolicy, desired: Desired, failed: bool) -> bool {
    desired == Desired::Running
        && match policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Always => true,
        }
}

impl Service {
    /// Once at start: sweeps run directories of dead runs, adopts live supervisors, and
    /// settles the rest through one [`Service::tick`].
    pub fn reconcile(&self) {
        gpucell_sandbox::rundir::sweep_stale(&self.settings.run_root());
        {
            let mut inner = self.lock();
            let ids: Vec<String> = inner.records.keys().cloned().collect();
            for id in ids {
                self.adopt_orphan(&mut inner, &id);
            }
        }
        self.tick();
        self.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A pending record without a supervisor whose directory names a live one: the
    /// daemon died between starting it and recording it.
    fn adopt_orphan(&self, inner: &mut Inner, id: &str) {
        let dir = self.settings.sandbox_dir(id);
        let Some(rec) = inner.records.get_mut(id) else {
            return;
        };
        if rec.supervisor.is_some() || rec.status.state.is_terminal() {
            if let Some(owner) = rec.supervisor {
                if self.launcher.alive(&owner) {
                    tracing::info!(id, pid = owner.pid, "adopting the running sandbox");
                }
            }
            return;
        }
        let owner: Option<Owner> = std::fs::read(dir.join(OWNER))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(owner) = owner.filter(|o| self.launcher.alive(o)) {
            tracing::info!(
                id,
                pid = owner.pid,
                "adopting a sandbox started just before the last daemon stopped"
            );
            rec.supervisor = Some(owner);
            let rec = rec.clone();
            self.persist(inner, rec);
        }
    }

    /// One pass over every sandbox.
    pub fn tick(&self) {
        let mut inner = self.lock();
        let ids: Vec<String> = inner.records.keys().cloned().collect();
        for id in ids {
            self.step(&mut inner, &id);
        }
        self.count_states(&inner);
    }

    fn count_states(&self, inner: &Inner) {
        for state in SandboxState::ALL {
            let n = inner
                .records
                .values()
                .filter(|r| r.status.state == state)
                .count();
            self.metrics
                .sandboxes
                .get_or_create(&StateLabel {
                    state: state.as_str().into(),
                })
                .set(n as i64);
        }
    }

    fn step(&self, inner: &mut Inner, id: &str) {
        let Some(rec) = inner.records.get(id).cloned() else {
            return;
        };
        match (rec.status.state, rec.supervisor) {
            (SandboxState::Exited | SandboxState::Failed, _) => {}
            (SandboxState::Pending, None) => {
                if rec.status.desired == Desired::Stopped {
                    let mut rec = rec;
                    enter(&mut rec.status, SandboxState::Exited);
                    self.persist(inner, rec);
                } else if rec.next_start_ms.is_none_or(|t| t <= now_ms()) {
                    self.start_locked(inner, id);
                }
            }
            (_, None) => {
                // A run state without a supervisor: the record was written, the start failed.
                let mut rec = rec;
                self.ended(&mut rec, None);
                self.persist(inner, rec);
            }
            (_, Some(owner)) => self.observe(inner, rec, owner),
        }
    }

    /// Follows a sandbox with a supervisor.
    fn observe(&self, inner: &mut Inner, mut rec: Record, owner: Owner) {
        let dir = self.settings.sandbox_dir(&rec.status.id);
        let before = rec.status.clone();
        let before_kill = rec.kill_at_ms;
        let progress = Progress::read(&dir);
        if self.launcher.alive(&owner) {
            if let Some(p) = &progress {
                merge(&mut rec, p);
            }
            rec.status.devices = held_devices(&self.settings.state_dir, &owner);
            if let Some(at) = rec.kill_at_ms.filter(|at| *at <= now_ms()) {
                tracing::warn!(id = %rec.status.id, pid = owner.pid, "grace period over; killing the sandbox");
                self.launcher.signal(&owner, libc::SIGKILL);
                rec.kill_at_ms = Some(at + 5_000);
            }
        } else {
            self.ended(&mut rec, progress.as_ref());
        }
        if rec.status != before || rec.kill_at_ms != before_kill {
            self.persist(inner, rec);
        }
    }

    /// The supervisor is gone: records how the run ended, cleans what it left, and
    /// decides about a restart.
    fn ended(&self, rec: &mut Record, progress: Option<&Progress>) {
        let id = rec.status.id.clone();
        match progress {
            Some(p) if p.done => {
                merge(rec, p);
                rec.status.exit_code = p.exit_code;
                rec.status.error = p.error.clone();
                rec.status.report = p.report.clone();
                self.observe_phases(p);
            }
            _ if rec.kill_at_ms.is_some() && rec.status.desired == Desired::Stopped => {
                // Stopped the hard way: SIGKILL after the grace period.
                rec.status.exit_code = Some(128 + libc::SIGKILL);
                rec.status.error = Some(format!(
                    "stopped: killed after its grace period of {} ms",
                    rec.request.stop_grace_ms.unwrap_or(DEFAULT_GRACE_MS)
                ));
            }
            _ => {
                if let Some(p) = progress {
                    merge(rec, p);
                }
                let pid = rec.supervisor.map(|o| o.pid).unwrap_or(0);
                rec.status.exit_code = None;
                rec.status.error = Some(format!(
                    "the sandbox's supervisor (pid {pid}) ended before its run did (killed, or it crashed; see {})",
                    self.settings.sandbox_dir(&id).join(crate::supervise::SUPERVISOR_LOG).display()
                ));
            }
        }
        let killed = rec.kill_at_ms.is_some() && rec.status.desired == Desired::Stopped;
        let crashed = !killed && !progress.is_some_and(|p| p.done);
        let state = if crashed || progress.is_some_and(|p| p.state == Some(SandboxState::Failed)) {
            SandboxState::Failed
        } else {
            SandboxState::Exited
        };
        let failed = state == SandboxState::Failed || rec.status.exit_code != Some(0);
        // QEMU died with its supervisor (PDEATHSIG); its run directory goes now, and the
        // devices the run did not give back are reset and returned (or quarantined) by
        // the allocator's rules.
        gpucell_sandbox::rundir::sweep_stale(&self.settings.run_root());
        if let Some(owner) = rec.supervisor.filter(|_| crashed || killed) {
            for note in self.launcher.reclaim_devices(&owner) {
                tracing::info!(id = %id, "{note}");
                self.note(&id, &note);
            }
        }
        rec.status.devices.clear();
        rec.supervisor = None;
        rec.kill_at_ms = None;
        enter(&mut rec.status, state);
        if should_restart(rec.request.restart, rec.status.desired, failed) {
            rec.status.restarts += 1;
            let wait = backoff_ms(rec.status.restarts);
            rec.next_start_ms = Some(now_ms() + wait);
            self.metrics.restarts.inc();
            self.note(
                &id,
                &format!(
                    "restarting in {} ms (restart {})",
                    wait, rec.status.restarts
                ),
            );
            self.emit(&rec.status);
            enter(&mut rec.status, SandboxState::Pending);
        }
    }

    fn observe_phases(&self, p: &Progress) {
        for (phase, ms) in &p.phases_ms {
            self.metrics
                .phases
                .get_or_create(&PhaseLabel {
                    phase: phase.clone(),
                })
                .observe(*ms as f64 / 1000.0);
        }
        if p.phases_ms.contains_key("image") {
            self.metrics.pulls.inc();
        }
    }

    /// A line of the daemon's own in a sandbox's log.
    fn note(&self, id: &str, message: &str) {
        if let Ok(mut log) = LogFile::open(
            &self.settings.sandbox_dir(id),
            crate::logs::DEFAULT_MAX_BYTES,
        ) {
            log.write_line("gpucell", message);
        }
    }

    pub(crate) fn persist(&self, inner: &mut Inner, rec: Record) {
        if let Err(e) = inner.store.put(&rec) {
            tracing::error!("{}", gpucell_common::chain_string(&e));
        }
        let changed = inner
            .records
            .get(&rec.status.id)
            .is_none_or(|old| old.status.state != rec.status.state);
        if changed {
            self.emit(&rec.status);
        }
        inner.records.insert(rec.status.id.clone(), rec);
    }

    /// Starts a supervisor for a pending sandbox; a failure to start fails the sandbox.
    pub(crate) fn start_locked(&self, inner: &mut Inner, id: &str) {
        let Some(mut rec) = inner.records.get(id).cloned() else {
            return;
        };
        let dir = self.settings.sandbox_dir(id);
        if self.supervisor_running(&dir) {
            // A supervisor started by a daemon that died before recording it: adopt it
            // once it has written who it is (within a tick or two), never start a second.
            let owner: Option<Owner> = std::fs::read(dir.join(OWNER))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(owner) = owner.filter(|o| self.launcher.alive(o)) {
                tracing::info!(id, pid = owner.pid, "adopting a supervisor nobody recorded");
                rec.supervisor = Some(owner);
                self.persist(inner, rec);
            }
            return;
        }
        rec.next_start_ms = None;
        match self.prepare(&dir, &rec).and_then(|()| {
            self.launcher
                .launch(&dir)
                .map_err(|e| gpucell_common::chain_string(&e))
        }) {
            Ok(owner) => rec.supervisor = Some(owner),
            Err(error) => {
                tracing::error!(id, "{error}");
                rec.status.error = Some(error);
                enter(&mut rec.status, SandboxState::Failed);
            }
        }
        self.persist(inner, rec);
    }

    /// True when a supervisor holds the directory's lock.
    fn supervisor_running(&self, dir: &Path) -> bool {
        dir.is_dir()
            && matches!(
                crate::supervise::lock(dir),
                Err(crate::supervise::SuperviseError::Busy(_))
            )
    }

    /// The sandbox directory with the request, and without the last run's progress.
    fn prepare(&self, dir: &Path, rec: &Record) -> Result<(), String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the sandbox directory {}: {e}", dir.display()))?;
        for stale in [STATE, OWNER] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        let request = serde_json::to_vec(&rec.request.run).unwrap_or_default();
        write_atomic(dir, REQUEST, &request).map_err(|e| gpucell_common::chain_string(&e))
    }
}

/// Takes a live supervisor's progress into the record (a stop in progress stays).
fn merge(rec: &mut Record, p: &Progress) {
    if let Some(state) = p.state {
        if rec.status.state != SandboxState::Stopping && !state.is_terminal() {
            enter(&mut rec.status, state);
        }
    }
    for (s, t) in &p.timestamps {
        if !s.is_terminal() {
            rec.status.timestamps.insert(*s, *t);
        }
    }
    rec.status.phases_ms = p.phases_ms.clone();
    if p.run_id.is_some() {
        rec.status.run_id = p.run_id.clone();
    }
}

/// PCI addresses the allocator records as held by this supervisor.
fn held_devices(state_dir: &Path, owner: &Owner) -> Vec<String> {
    gpucell_host::devices::allocations(state_dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.owner == *owner)
        .map(|a| a.bdf.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute() {
        assert_eq!(backoff_ms(1), 1000);
        assert_eq!(backoff_ms(2), 2000);
        assert_eq!(backoff_ms(4), 8000);
        assert_eq!(backoff_ms(7), 60_000);
        assert_eq!(backoff_ms(u32::MAX), 60_000);
    }

    #[test]
    fn restart_policy() {
        use RestartPolicy::*;
        assert!(!should_restart(Never, Desired::Running, true));
        assert!(should_restart(OnFailure, Desired::Running, true));
        assert!(!should_restart(OnFailure, Desired::Running, false));
        assert!(should_restart(Always, Desired::Running, false));
        assert!(!should_restart(Always, Desired::Stopped, true));
    }
}
