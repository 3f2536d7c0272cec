//! The daemon's one service type: every operation the HTTP handlers (and a control-plane
//! link) call. `deploy`, `stop`, `get`, `list`, `inventory` and `states` are plain
//! methods; [`Service::tick`] (in `reconcile`) moves sandboxes along.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use gpucell_api::{
    ApiError, DeployRequest, Desired, SandboxList, SandboxState, SandboxStatus, StateEvent,
};
use tokio::sync::broadcast;

use crate::launcher::Launcher;
use crate::logs::now_ms;
use crate::metrics::Metrics;
use crate::store::{Record, Store, StoreError};
use crate::validate;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    BadRequest(ApiError),
    #[error("{0}")]
    Conflict(ApiError),
    #[error("no sandbox {0:?} on this node")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create the sandbox directory {path:?}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ServiceError {
    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        match self {
            ServiceError::BadRequest(_) => 400,
            ServiceError::Conflict(_) => 409,
            ServiceError::NotFound(_) => 404,
            ServiceError::Store(_) | ServiceError::Dir { .. } => 500,
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ApiError {
        match self {
            ServiceError::BadRequest(e) | ServiceError::Conflict(e) => e.clone(),
            ServiceError::NotFound(_) => ApiError::field("id", self.to_string()),
            _ => ApiError::new(gpucell_common::chain_string(self)),
        }
    }
}

/// How long a stop waits after SIGTERM before SIGKILL, unless the request says.
pub const DEFAULT_GRACE_MS: u64 = 10_000;

/// Where the daemon keeps things and how it starts supervisors.
#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub host_root: PathBuf,
    pub default_guest: String,
    /// Where `/proc` is read to check supervisors (`/` but in tests).
    pub proc_dir: PathBuf,
}

impl Settings {
    pub fn daemon_dir(&self) -> PathBuf {
        self.state_dir.join("daemon")
    }
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.daemon_dir().join("sandboxes").join(id)
    }
    pub fn run_root(&self) -> PathBuf {
        self.state_dir.join("run")
    }
}

pub(crate) struct Inner {
    pub store: Store,
    pub records: BTreeMap<String, Record>,
}

pub struct Service {
    pub settings: Settings,
    pub(crate) launcher: Box<dyn Launcher>,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) events: broadcast::Sender<StateEvent>,
    pub metrics: Metrics,
    pub(crate) ready: AtomicBool,
}

impl Service {
    /// Opens (or creates) the store under the state directory. Nothing runs until
    /// [`Service::reconcile`].
    pub fn open(
        settings: Settings,
        launcher: Box<dyn Launcher>,
    ) -> Result<Arc<Service>, ServiceError> {
        let dir = settings.daemon_dir().join("sandboxes");
        std::fs::create_dir_all(&dir).map_err(|source| ServiceError::Dir {
            path: dir.clone(),
            source,
        })?;
        let store = Store::open(&settings.daemon_dir().join("daemon.db"))?;
        let records = store
            .all()?
            .into_iter()
            .map(|r| (r.status.id.clone(), r))
            .collect();
        let (events, _) = broadcast::channel(1024);
        Ok(Arc::new(Service {
            settings,
            launcher,
            inner: Mutex::new(Inner { store, records }),
            events,
            metrics: Metrics::new(),
            ready: AtomicBool::new(false),
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data: every change is one put.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<StateEvent> {
        self.events.subscribe()
    }

    pub(crate) fn emit(&self, status: &SandboxStatus) {
        let _ = self.events.send(StateEvent {
            id: status.id.clone(),
            state: status.state,
            t_ms: now_ms(),
            exit_code: status.exit_code,
        });
    }

    /// A deploy from any JSON (the control-plane link passes its payload here).
    pub fn deploy_value(
        &self,
        body: serde_json::Value,
    ) -> Result<(bool, SandboxStatus), ServiceError> {
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        self.deploy_bytes(&bytes)
    }

    /// A deploy from a request body: `(created, status)`; `created` is false when a
    /// sandbox with this id already existed with the same request (idempotent).
    pub fn deploy_bytes(&self, body: &[u8]) -> Result<(bool, SandboxStatus), ServiceError> {
        let req = validate::parse(body).map_err(ServiceError::BadRequest)?;
        self.deploy(req)
    }

    pub fn deploy(&self, mut req: DeployRequest) -> Result<(bool, SandboxStatus), ServiceError> {
        let host = validate::Host {
            host_root: &self.settings.host_root,
            state_dir: &self.settings.state_dir,
            default_guest: &self.settings.default_guest,
        };
        validate::check(&req, &host).map_err(ServiceError::BadRequest)?;
        let id = match req.id.clone() {
            Some(id) => id,
            None => new_id(),
        };
        req.id = Some(id.clone());
        let mut inner = self.lock();
        if let Some(existing) = inner.records.get(&id) {
            if existing.request == req {
                return Ok((false, existing.status.clone()));
            }
            return Err(ServiceError::Conflict(ApiError::field(
                "id",
                format!("sandbox {id} exists with another request; stop and remove it (DELETE /v1/sandboxes/{id}?remove=1) or choose another id"),
            )));
        }
        self.check_devices(&inner, &req)?;
        let record = new_record(id.clone(), req);
        // Written before anything runs: a daemon killed now finds it pending and starts it.
        inner.store.put(&record)?;
        let status = record.status.clone();
        inner.records.insert(id.clone(), record);
        self.metrics.deploys.inc();
        self.emit(&status);
        self.start_locked(&mut inner, &id);
        let status = inner
            .records
            .get(&id)
            .map(|r| r.status.clone())
            .unwrap_or(status);
        Ok((true, status))
    }

    /// Refuses a request naming a device another sandbox asked for or holds.
    fn check_devices(&self, inner: &Inner, req: &DeployRequest) -> Result<(), ServiceError> {
        let wanted = validate::named_devices(req);
        if wanted.is_empty() {
            return Ok(());
        }
        let conflict = |bdf: &gpucell_host::bdf::Bdf, holder: String| {
            let mut e = ApiError::field(
                "run.devices",
                format!("device {bdf} is not free: sandbox {holder} holds it"),
            );
            e.holder = Some(holder);
            ServiceError::Conflict(e)
        };
        for other in inner.records.values() {
            if other.status.state.is_terminal() {
                continue;
            }
            let theirs = validate::named_devices(&other.request);
            if let Some(bdf) = wanted.iter().find(|b| theirs.contains(b)) {
                return Err(conflict(bdf, other.status.id.clone()));
            }
        }
        let held = gpucell_host::devices::allocations(&self.settings.state_dir).unwrap_or_default();
        for a in held {
            let owner_alive = a.owner.is_alive(&self.settings.proc_dir);
            if owner_alive && wanted.contains(&a.bdf) {
                return Err(conflict(&a.bdf, a.sandbox.clone()));
            }
        }
        Ok(())
    }

    /// Asks a sandbox to stop: SIGTERM, then SIGKILL after its grace period. With
    /// `remove`, a sandbox that has ended is forgotten (its record, logs and directory).
    pub fn stop(&self, id: &str, remove: bool) -> Result<Option<SandboxStatus>, ServiceError> {
        let mut inner = self.lock();
        let Some(rec) = inner.records.get_mut(id) else {
            return Err(ServiceError::NotFound(id.to_string()));
        };
        let state = rec.status.state;
        if remove && state.is_terminal() {
            inner.store.remove(id)?;
            inner.records.remove(id);
            let _ = std::fs::remove_dir_all(self.settings.sandbox_dir(id));
            return Ok(None);
        }
        rec.status.desired = Desired::Stopped;
        rec.next_start_ms = None;
        let supervisor = rec.supervisor;
        match state {
            SandboxState::Pending if supervisor.is_none() => {
                enter(&mut rec.status, SandboxState::Exited);
            }
            SandboxState::Exited | SandboxState::Failed | SandboxState::Stopping => {}
            _ => {
                enter(&mut rec.status, SandboxState::Stopping);
                let grace = rec.request.stop_grace_ms.unwrap_or(DEFAULT_GRACE_MS);
                rec.kill_at_ms = Some(now_ms() + grace);
            }
        }
        let rec = rec.clone();
        inner.store.put(&rec)?;
        drop(inner);
        if rec.status.state == SandboxState::Stopping {
            if let Some(owner) = supervisor {
                self.launcher.signal(&owner, libc::SIGTERM);
            }
        }
        self.emit(&rec.status);
        Ok(Some(rec.status))
    }

    pub fn get(&self, id: &str) -> Result<SandboxStatus, ServiceError> {
        self.lock()
            .records
            .get(id)
            .map(|r| r.status.clone())
            .ok_or_else(|| ServiceError::NotFound(id.to_string()))
    }

    pub fn list(&self) -> SandboxList {
        SandboxList {
            sandboxes: self
                .lock()
                .records
                .values()
                .map(|r| r.status.clone())
                .collect(),
        }
    }

    /// The list as JSON (for the control-plane link's heartbeat).
    pub fn states(&self) -> serde_json::Value {
        serde_json::to_value(self.list()).unwrap_or_default()
    }

    /// `GET /v1/node`'s body.
    pub fn inventory(&self) -> serde_json::Value {
        crate::inventory::inventory(self)
    }

    /// The health check of a sandbox, when its request has one.
    pub fn health_check(&self, id: &str) -> Option<gpucell_api::HealthCheck> {
        self.lock()
            .records
            .get(id)
            .and_then(|r| r.request.health.clone())
    }

    /// Takes the result of a health check into the sandbox's status (stored when its
    /// health changes).
    pub fn record_health(&self, id: &str, threshold: u32, result: Result<(), String>) {
        let mut inner = self.lock();
        let Some(rec) = inner.records.get_mut(id) else {
            return;
        };
        if rec.status.state != SandboxState::Running {
            return;
        }
        let next = crate::health::next(rec.status.health.as_ref(), threshold, result);
        let flipped = rec.status.health.as_ref().map(|h| h.healthy) != Some(next.healthy);
        rec.status.health = Some(next);
        if flipped {
            let rec = rec.clone();
            if let Err(e) = inner.store.put(&rec) {
                tracing::error!("{}", gpucell_common::chain_string(&e));
            }
        }
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.settings.sandbox_dir(id)
    }

    pub fn proc_dir(&self) -> &Path {
        &self.settings.proc_dir
    }
}

pub(crate) fn enter(status: &mut SandboxStatus, state: SandboxState) {
    if status.state != state {
        status.state = state;
        status.timestamps.insert(state, now_ms());
    }
}

fn new_record(id: String, req: DeployRequest) -> Record {
    let now = now_ms();
    Record {
        status: SandboxStatus {
            id,
            image: req.run.image.clone(),
            state: SandboxState::Pending,
            desired: Desired::Running,
            created_ms: now,
            timestamps: BTreeMap::from([(SandboxState::Pending, now)]),
            exit_code: None,
            error: None,
            devices: Vec::new(),
            health: None,
            restarts: 0,
            phases_ms: BTreeMap::new(),
            labels: req.labels.clone(),
            restart: req.restart,
            run_id: None,
            report: None,
        },
        request: req,
        supervisor: None,
        next_start_ms: None,
        kill_at_ms: None,
    }
}

/// A new deployment id: 12 hex digits from the kernel's random source.
fn new_id() -> String {
    gpucell_sandbox::rundir::new_run_id()
        .map(|id| id.chars().take(12).collect())
        .unwrap_or_else(|_| format!("{:x}", now_ms()))
}
