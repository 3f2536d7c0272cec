//! The plugin's life: serve each resource on its own socket in the kubelet's
//! device-plugin directory, register it with the kubelet, keep the device list and health
//! current, and serve and register again when the kubelet restarts (it wipes the directory
//! and creates `kubelet.sock` anew).
//!
//! Changes are found by polling every [`PluginConfig::poll`]: the GPUs under the host root,
//! the allocator's records (`<state>/devices/quarantine.json`, replaced by rename, so a
//! watch on the file would go stale), and the identity (device and inode) of
//! `kubelet.sock` and of each plugin socket.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gpucell_host::HostRoot;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Endpoint, Uri};

use crate::api::device_plugin_server::DevicePluginServer;
use crate::api::registration_client::RegistrationClient;
use crate::api::RegisterRequest;
use crate::cdi::{self, CdiError};
use crate::resources::{self, Naming, Resource, ResourceError};
use crate::service::{self, PluginService};

/// The kubelet's device-plugin directory.
pub const DEFAULT_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
/// The kubelet's registration socket, inside the plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";
/// The device plugin API version.
pub const API_VERSION: &str = "v1beta1";
/// How long one registration call may take.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping server may take to close its connections.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors running the plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Resources(#[from] ResourceError),
    #[error(transparent)]
    Cdi(#[from] CdiError),
    #[error("no NVIDIA GPU under {}; run the plugin only on GPU nodes (a node selector)", root.display())]
    NoGpus { root: PathBuf },
    #[error("cannot listen on {}; is the kubelet's device-plugin directory writable?", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the kubelet at {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the kubelet at {} refused {resource}: {message}", path.display())]
    Refused {
        path: PathBuf,
        resource: String,
        message: String,
    },
    #[error("reading the GPUs failed: {0}")]
    Task(String),
    #[error("the kubelet at {} did not answer within {}s", path.display(), REGISTER_TIMEOUT.as_secs())]
    Timeout { path: PathBuf },
}

/// What the plugin serves and where.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// sysfs, /dev... are read under it.
    pub root: HostRoot,
    /// gpucell's state directory (the allocator's records are in `<state>/devices`).
    pub state_dir: PathBuf,
    pub naming: Naming,
    /// The kubelet's device-plugin directory ([`DEFAULT_PLUGIN_DIR`]).
    pub plugin_dir: PathBuf,
    /// Where CDI specs are written ([`cdi::DEFAULT_CDI_DIR`]).
    pub cdi_dir: PathBuf,
    /// How often health and the kubelet socket are checked.
    pub poll: Duration,
}

impl PluginConfig {
    /// The defaults of a real node, reading the host at `/`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            root: HostRoot::new("/"),
            state_dir: state_dir.into(),
            naming: Naming::default(),
            plugin_dir: PathBuf::from(DEFAULT_PLUGIN_DIR),
            cdi_dir: PathBuf::from(cdi::DEFAULT_CDI_DIR),
            poll: Duration::from_secs(2),
        }
    }

    /// `<plugin dir>/kubelet.sock`.
    pub fn kubelet_socket(&self) -> PathBuf {
        self.plugin_dir.join(KUBELET_SOCKET)
    }

    /// The socket file name of a resource (`gpucell-H200.sock`), relative to the plugin dir.
    pub fn endpoint(class: &str) -> String {
        format!("gpucell-{class}.sock")
    }
}

/// The file identity (device, inode) of `path`, if it exists.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// One resource being served.
struct Served {
    class: String,
    socket: PathBuf,
    socket_id: Option<(u64, u64)>,
    state: watch::Sender<Resource>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Served {
    /// Binds `<plugin dir>/gpucell-<class>.sock` (replacing a stale one) and serves on it.
    fn start(config: &PluginConfig, resource: Resource) -> Result<Self, PluginError> {
        let class = resource.class.clone();
        let socket = config.plugin_dir.join(PluginConfig::endpoint(&class));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(|source| PluginError::Listen {
            path: socket.clone(),
            source,
        })?;
        let (state, state_rx) = watch::channel(resource);
        let (stop, stop_rx) = watch::channel(false);
        let svc = PluginService::new(state_rx, stop_rx.clone(), config.cdi_dir.clone());
        let stop_wait = stop_rx;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let shown = socket.display().to_string();
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(svc))
                .serve_with_incoming_shutdown(incoming, service::stopped(stop_wait))
                .await;
            if let Err(e) = served {
                tracing::error!("serving {shown}: {}", gpucell_common::chain_string(&e));
            }
        });
        Ok(Self {
            class,
            socket_id: identity(&socket),
            socket,
            state,
            stop,
            task,
        })
    }

    /// Stops serving and removes the socket (if it is still ours).
    async fn shut(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
            task.abort();
        }
        if self.socket_id.is_some() && identity(&self.socket) == self.socket_id {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// Registers `resource` (served at `endpoint`) with the kubelet at `kubelet`.
pub async fn register(kubelet: &Path, endpoint: &str, resource: &str) -> Result<(), PluginError> {
    let path = kubelet.to_owned();
    let connect = {
        let path = path.clone();
        tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        })
    };
    let call = async {
        // The URI is required by the API but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://kubelet.invalid")
            .connect_with_connector(connect)
            .await
            .map_err(|source| PluginError::Connect {
                path: path.clone(),
                source,
            })?;
        RegistrationClient::new(channel)
            .register(RegisterRequest {
                version: API_VERSION.to_owned(),
                endpoint: endpoint.to_owned(),
                resource_name: resource.to_owned(),
                options: Some(service::options()),
            })
            .await
            .map_err(|s| PluginError::Refused {
                path: path.clone(),
                resource: resource.to_owned(),
                message: s.message().to_owned(),
            })
    };
    match tokio::time::timeout(REGISTER_TIMEOUT, call).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(PluginError::Timeout { path }),
    }
}

/// Runs the plugin until `shutdown` completes: serves every resource, registers it, and
/// keeps both current. Plugin sockets are removed on the way out; CDI specs stay (they
/// only map names to nodes, and running containers were resolved through them).
pub async fn run(
    config: PluginConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PluginError> {
    config.naming.validate()?;
    let resources = discover(&config).await?;
    if resources.is_empty() {
        return Err(PluginError::NoGpus {
            root: config.root.path().to_owned(),
        });
    }
    for r in &resources {
        let path = cdi::write_spec(&config.cdi_dir, r)?;
        tracing::info!(resource = %r.name, devices = r.devices.len(), spec = %path.display(), "resource found");
    }
    let mut served: Vec<Served> = Vec::new();
    let mut registered_with: Option<(u64, u64)> = None;
    let mut current: BTreeMap<String, Resource> = resources
        .into_iter()
        .map(|r| (r.class.clone(), r))
        .collect();
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(config.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            _ = tick.tick() => {}
        }
        match discover(&config).await {
            Ok(found) => {
                if update(&mut current, found, &served) {
                    // A new model: serve and register it too.
                    registered_with = None;
                }
            }
            Err(e) => tracing::warn!("{}", gpucell_common::chain_string(&e)),
        }
        let kubelet = identity(&config.kubelet_socket());
        let sockets_ok = served.iter().all(|s| identity(&s.socket) == s.socket_id);
        if kubelet.is_some() && kubelet == registered_with && sockets_ok && !served.is_empty() {
            continue;
        }
        // First start, kubelet restarted, or our socket was removed: serve afresh.
        for s in served.drain(..) {
            s.shut().await;
        }
        registered_with = None;
        let Some(kubelet) = kubelet else {
            tracing::debug!("waiting for {}", config.kubelet_socket().display());
            continue;
        };
        let mut all_started = true;
        for r in current.values() {
            if let Err(e) = cdi::write_spec(&config.cdi_dir, r) {
                tracing::error!("{}", gpucell_common::chain_string(&e));
            }
            match Served::start(&config, r.clone()) {
                Ok(s) => served.push(s),
                Err(e) => {
                    all_started = false;
                    tracing::error!("{}; trying again", gpucell_common::chain_string(&e));
                }
            }
        }
        match register_all(&config, &served).await {
            Ok(()) if all_started => registered_with = Some(kubelet),
            Ok(()) => {}
            Err(e) => tracing::warn!("{}; trying again", gpucell_common::chain_string(&e)),
        }
    };
    for s in served.drain(..) {
        s.shut().await;
    }
    result
}

async fn register_all(config: &PluginConfig, served: &[Served]) -> Result<(), PluginError> {
    for s in served {
        let name = format!("{}/{}", config.naming.domain, s.class);
        register(
            &config.kubelet_socket(),
            &PluginConfig::endpoint(&s.class),
            &name,
        )
        .await?;
        tracing::info!(resource = %name, socket = %s.socket.display(), "registered with the kubelet");
    }
    Ok(())
}

/// Reads the resources off the async threads (sysfs reads block).
async fn discover(config: &PluginConfig) -> Result<Vec<Resource>, PluginError> {
    let (root, state, naming) = (
        config.root.clone(),
        config.state_dir.clone(),
        config.naming.clone(),
    );
    let found = tokio::task::spawn_blocking(move || resources::discover(&root, &state, &naming))
        .await
        .map_err(|e| PluginError::Task(e.to_string()))?;
    Ok(found?)
}

/// Applies a fresh reading: a resource's devices and health are replaced (its ListAndWatch
/// streams send when something changed); a GPU gone from sysfs stays listed, Unhealthy.
/// True when a new model appeared (added to `current`; the caller serves it).
fn update(
    current: &mut BTreeMap<String, Resource>,
    found: Vec<Resource>,
    served: &[Served],
) -> bool {
    let mut found: BTreeMap<String, Resource> =
        found.into_iter().map(|r| (r.class.clone(), r)).collect();
    for (class, r) in current.iter_mut() {
        let mut fresh = found.remove(class).unwrap_or_else(|| Resource {
            devices: Vec::new(),
            ..r.clone()
        });
        for old in &r.devices {
            if !fresh.devices.iter().any(|d| d.id == old.id) {
                let mut gone = old.clone();
                gone.health = resources::Health::Unhealthy("gone from the PCI bus".to_owned());
                fresh.devices.push(gone);
            }
        }
        fresh.devices.sort_by_key(|d| d.bdf);
        for d in &fresh.devices {
            let was = r.devices.iter().find(|o| o.id == d.id).map(|o| &o.health);
            if was != Some(&d.health) {
                match &d.health {
                    resources::Health::Healthy => {
                        tracing::info!(device = %d.id, resource = %r.name, "healthy")
                    }
                    resources::Health::Unhealthy(why) => {
                        tracing::warn!(device = %d.id, resource = %r.name, "unhealthy: {why}")
                    }
                }
            }
        }
        *r = fresh;
        if let Some(s) = served.iter().find(|s| &s.class == class) {
            let r = r.clone();
            s.state.send_if_modified(|cur| {
                let changed = *cur != r;
                *cur = r;
                changed
            });
        }
    }
    let new = !found.is_empty();
    for (class, r) in found {
        tracing::info!(resource = %r.name, "a new GPU model appeared");
        current.insert(class, r);
    }
    new
}
