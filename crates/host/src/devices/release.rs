//! Giving devices back: [`Allocation::release`] after the VM exits (reset, check,
//! return or quarantine), and `gpucell gpu release BDF` ([`DevicePool::release_device`]).

use serde::Serialize;

use crate::bdf::Bdf;
use crate::bind::holders::OpenFiles;
use crate::bind::SysfsWriter;
use gpucell_common::chain_string;

use super::alloc::{Allocation, DevicePool};
use super::record::{self, now_unix, DevicesLock, QuarantineEntry};
use super::reset::{self, Cleaned, ResetPolicy};
use super::DevicesError;

/// What releasing an allocation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReleaseReport {
    /// Reset (or checked) and back in the pool.
    pub returned: Vec<(Bdf, Cleaned)>,
    /// Failed their reset or check: not handed out again until `gpucell gpu release`.
    pub quarantined: Vec<QuarantineEntry>,
    /// Not touched because another process (a QEMU still running) has the group's
    /// `/dev/vfio/N` open, with who holds it. Their records stay: once the owner is gone
    /// and the group is closed, the next allocation (or `gpucell gpu release`) resets them.
    pub kept: Vec<(Bdf, String)>,
}

impl Allocation {
    /// Resets and checks each device, then returns it to the pool or quarantines it.
    /// Call it after the VM has exited: a device whose `/dev/vfio/N` another process
    /// still has open is left alone and stays allocated ([`ReleaseReport::kept`]).
    pub fn release(mut self) -> Result<ReleaseReport, DevicesError> {
        self.release_inner()
    }

    #[tracing::instrument(skip(self), fields(sandbox = %self.sandbox))]
    fn release_inner(&mut self) -> Result<ReleaseReport, DevicesError> {
        let Some(mut writer) = self.writer.take() else {
            return Ok(ReleaseReport::default());
        };
        let pool = &self.pool;
        let policy = pool.policy().unwrap_or_else(|e| {
            tracing::warn!("{}; no device is exempt from reset", chain_string(&e));
            ResetPolicy::default()
        });
        let mut report = ReleaseReport::default();
        let open = OpenFiles::scan(&pool.proc_root);
        let me = std::process::id();
        for d in &self.devices {
            let node = format!("/dev/vfio/{}", d.iommu_group);
            let holder = open
                .holders_of(&node)
                .iter()
                .find(|(pid, _)| *pid != me && *pid != self.owner.pid);
            if let Some((pid, cmd)) = holder {
                let who = format!("{node} is open by pid {pid} ({cmd})");
                tracing::warn!(bdf = %d.bdf, "not reset: {who}; kept as busy");
                report.kept.push((d.bdf, who));
                continue;
            }
            match reset::reset_and_check(
                &pool.root,
                &pool.state_dir,
                d.bdf,
                (d.vendor, d.device),
                &policy,
                &mut *writer,
            ) {
                Ok(c) => report.returned.push((d.bdf, c)),
                Err(e) => {
                    let reason = chain_string(&e);
                    tracing::warn!(bdf = %d.bdf, "quarantined: {reason}");
                    report.quarantined.push(QuarantineEntry {
                        bdf: d.bdf,
                        vendor: d.vendor,
                        device: d.device,
                        reason,
                        since_unix: now_unix(),
                        sandbox: Some(self.sandbox.clone()),
                    });
                }
            }
        }
        let _lock = DevicesLock::take(&pool.state_dir)?;
        let mut quarantine = record::load_quarantine(&pool.state_dir)?;
        let mut allocations = record::load_allocations(&pool.state_dir)?;
        if !report.quarantined.is_empty() {
            for q in &report.quarantined {
                quarantine.put(q.clone());
            }
            record::save_quarantine(&pool.state_dir, &quarantine)?;
        }
        let before = allocations.allocations.len();
        allocations.allocations.retain(|a| {
            !(a.sandbox == self.sandbox
                && a.owner == self.owner
                && !report.kept.iter().any(|(b, _)| *b == a.bdf))
        });
        if allocations.allocations.len() != before {
            record::save_allocations(&pool.state_dir, &allocations)?;
        }
        tracing::info!(
            returned = report.returned.len(),
            quarantined = report.quarantined.len(),
            "released"
        );
        Ok(report)
    }
}

impl Drop for Allocation {
    /// Best effort: a guard dropped without [`Allocation::release`] (an early return, a
    /// panic) still resets and returns its devices; errors are logged.
    fn drop(&mut self) {
        if self.writer.is_some() {
            if let Err(e) = self.release_inner() {
                tracing::error!(
                    sandbox = %self.sandbox,
                    "releasing devices failed: {}; the next allocation retries",
                    chain_string(&e)
                );
            }
        }
    }
}

/// What `gpucell gpu release BDF` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum ReleaseOutcome {
    /// Taken out of quarantine (its config space answered, or `force`).
    Unquarantined { bdf: Bdf, forced: bool },
    /// Its sandbox was gone: reset, checked and returned.
    Reclaimed { bdf: Bdf, sandbox: String },
    /// Its sandbox was gone and its reset or check failed: now quarantined.
    Quarantined { bdf: Bdf, reason: String },
    /// Neither quarantined nor allocated.
    NotHeld { bdf: Bdf },
}

impl DevicePool {
    /// `gpucell gpu release BDF`. A quarantined function leaves quarantine when its config
    /// space gives the recorded identity (no reset is tried: a function that failed one
    /// may hang the host), or at once with `force`. A function allocated to a sandbox
    /// whose process is gone is reset, checked and returned. A function held by a live
    /// sandbox is refused.
    pub fn release_device(
        &self,
        bdf: Bdf,
        force: bool,
        writer: &mut dyn SysfsWriter,
    ) -> Result<ReleaseOutcome, DevicesError> {
        let _lock = DevicesLock::take(&self.state_dir)?;
        let mut allocations = record::load_allocations(&self.state_dir)?;
        let mut quarantine = record::load_quarantine(&self.state_dir)?;
        if let Some(a) = allocations
            .allocations
            .iter()
            .find(|a| a.bdf == bdf)
            .cloned()
        {
            if a.owner.is_alive(&self.proc_dir()) {
                return Err(DevicesError::InUse {
                    bdf,
                    sandbox: a.sandbox,
                    pid: a.owner.pid,
                });
            }
            let open = OpenFiles::scan(&self.proc_root);
            let node = format!("/dev/vfio/{}", a.iommu_group);
            if let Some((pid, cmd)) = open.holders_of(&node).first() {
                return Err(DevicesError::GroupOpen {
                    bdf,
                    node,
                    pid: *pid,
                    command: cmd.clone(),
                });
            }
            let policy = self.policy()?;
            let result = reset::reset_and_check(
                &self.root,
                &self.state_dir,
                bdf,
                (a.vendor, a.device),
                &policy,
                writer,
            );
            allocations.allocations.retain(|x| x.bdf != bdf);
            let outcome = match result {
                Ok(_) => ReleaseOutcome::Reclaimed {
                    bdf,
                    sandbox: a.sandbox,
                },
                Err(e) => {
                    let reason = chain_string(&e);
                    quarantine.put(QuarantineEntry {
                        bdf,
                        vendor: a.vendor,
                        device: a.device,
                        reason: reason.clone(),
                        since_unix: now_unix(),
                        sandbox: Some(a.sandbox),
                    });
                    record::save_quarantine(&self.state_dir, &quarantine)?;
                    ReleaseOutcome::Quarantined { bdf, reason }
                }
            };
            record::save_allocations(&self.state_dir, &allocations)?;
            return Ok(outcome);
        }
        let Some(q) = quarantine.get(bdf).cloned() else {
            return Ok(ReleaseOutcome::NotHeld { bdf });
        };
        if !force {
            reset::check_config(&self.root, bdf, (q.vendor, q.device))
                .map_err(|source| DevicesError::StillFailing { bdf, source })?;
        }
        quarantine.devices.retain(|e| e.bdf != bdf);
        record::save_quarantine(&self.state_dir, &quarantine)?;
        tracing::info!(%bdf, force, "released from quarantine");
        Ok(ReleaseOutcome::Unquarantined { bdf, forced: force })
    }
}
