//! The shim process: containerd's `start` and `delete` subcommands, and the long-lived
//! server that owns the pod's VMs (so a containerd restart leaves them running).
//!
//! The node is read from the environment containerd passes on: `GPUCELL_STATE_DIR`
//! (default `/var/lib/gpucell`), `GPUCELL_HOST_ROOT` (default `/`), `GPUCELL_CONFIG`
//! (default `/etc/gpucell/config.toml` under the host root, when it exists),
//! `GPUCELL_QEMU`, `GPUCELL_ACCEL` and `GPUCELL_KVM_PROBE_TIMEOUT`, as `gpucell run`
//! reads them; and where a pod's devices are learnt: `GPUCELL_POD_RESOURCES` (the
//! kubelet's PodResources socket, default `/var/lib/kubelet/pod-resources/kubelet.sock`
//! under the host root; `off` asks no kubelet) and `GPUCELL_POD_RESOURCE_PREFIXES`
//! (comma-separated resource name prefixes, default `gpucell.io/`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Config, Error, Flags, StartOpts};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use gpucell_host::HostRoot;
use gpucell_runtime::{AccelRequest, Node};

use crate::events::{self, EventRx, EventTx};
use crate::launcher::NodeLauncher;
use crate::pod_resources::{self, Kubelet, PodResources};
use crate::task::{Settings, TaskService, EXIT_KILLED};

/// The runtime name containerd knows the shim by.
pub const RUNTIME_ID: &str = "io.containerd.gpucell.v1";
/// Default state directory, as `gpucell`'s.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/gpucell";

/// Errors reading the node's settings from the environment.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading gpucell's configuration")]
    Config(#[source] gpucell_runtime::ConfigError),
    #[error("environment variable {name}: {value:?} {problem}")]
    Variable {
        name: &'static str,
        value: String,
        problem: &'static str,
    },
}

/// The node and accelerator of the tasks, from `env` (a variable's value by name).
pub fn settings_from(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Node, AccelRequest), SettingsError> {
    let host_root = PathBuf::from(env("GPUCELL_HOST_ROOT").unwrap_or_else(|| "/".into()));
    let state_dir =
        PathBuf::from(env("GPUCELL_STATE_DIR").unwrap_or_else(|| DEFAULT_STATE_DIR.into()));
    let config = match env("GPUCELL_CONFIG") {
        Some(p) => gpucell_runtime::Config::load(Path::new(&p), true),
        None => gpucell_runtime::Config::load(
            &host_root.join(gpucell_runtime::DEFAULT_CONFIG_PATH.trim_start_matches('/')),
            false,
        ),
    }
    .map_err(SettingsError::Config)?;
    let qemu = env("GPUCELL_QEMU").map(PathBuf::from);
    let mut node = Node::new(&host_root, &state_dir, qemu.as_deref(), &config);
    use gpucell_sandbox::accel::{parse_probe_timeout, PROBE_TIMEOUT_ENV};
    if let Some(v) = env(PROBE_TIMEOUT_ENV) {
        node.kvm_probe_timeout = Some(parse_probe_timeout(&v).ok_or(SettingsError::Variable {
            name: PROBE_TIMEOUT_ENV,
            value: v.clone(),
            problem: "is not a number of seconds between 1 and 600",
        })?);
    }
    let accel = match env("GPUCELL_ACCEL") {
        Some(v) => v.parse().map_err(|_| SettingsError::Variable {
            name: "GPUCELL_ACCEL",
            value: v.clone(),
            problem: "is not one of auto, kvm, tcg",
        })?,
        None => config.run.accel.unwrap_or_default(),
    };
    Ok((node, accel))
}

/// The kubelet's PodResources API, from `env` (none when turned off).
pub fn pod_resources_from(
    env: &dyn Fn(&str) -> Option<String>,
    host_root: &HostRoot,
) -> Option<Kubelet> {
    let socket = match env("GPUCELL_POD_RESOURCES") {
        Some(v) if v == "off" => return None,
        Some(v) => PathBuf::from(v),
        None => host_root
            .path()
            .join(pod_resources::DEFAULT_SOCKET.trim_start_matches('/')),
    };
    let prefixes = match env("GPUCELL_POD_RESOURCE_PREFIXES") {
        Some(v) => v
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
        None => vec![pod_resources::DEFAULT_PREFIX.to_string()],
    };
    Some(Kubelet { socket, prefixes })
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The shim as `containerd_shim::asynchronous::run` drives it.
pub struct GpucellShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    events: EventTx,
    events_rx: std::sync::Mutex<Option<EventRx>>,
}

/// How long an exiting shim waits for its last events to reach containerd.
const EVENT_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

#[async_trait]
impl Shim for GpucellShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let (events, rx) = events::channel();
        GpucellShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            events,
            events_rx: std::sync::Mutex::new(Some(rx)),
        }
    }

    /// Starts the pod's server, or answers with the address of the one already serving
    /// the pod (tasks of one CRI sandbox share a shim).
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = crate::bundle::pod_of(Path::new("."), &opts.id);
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd reads the address from here after a restart.
        tokio::fs::write("address", &address)
            .await
            .map_err(|e| Error::Other(format!("writing the shim address file: {e}")))?;
        Ok(address)
    }

    /// containerd's clean-up after a shim it cannot reach: the VMs died with that shim
    /// (QEMU gets SIGKILL when the thread that started it exits); what is left is a
    /// rootfs the shim mounted.
    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        // The root alone: a spec whose volumes are gone by now still names it.
        if let Some(root) = crate::bundle::root_of(Path::new(".")) {
            if let Some(root) = root.to_str() {
                // Nothing mounted there is not an error worth failing the clean-up for.
                let _ = containerd_shim::mount::umount_recursive(Some(root), libc::MNT_DETACH);
            }
        }
        let d = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(api::DeleteResponse {
            exit_status: EXIT_KILLED,
            exited_at: Some(Timestamp {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // The last task's exit and delete must reach containerd before the shim goes.
        self.events.drain(EVENT_DRAIN).await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        // The crate's publisher retries in the background, where an exiting shim loses
        // what it still holds: events::forward delivers in order and is waited for.
        let address = publisher.address.clone();
        drop(publisher);
        let rx = match self.events_rx.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(rx) = rx {
            tokio::spawn(events::forward(address, self.namespace.clone(), rx));
        }
        let tx = self.events.clone();
        let settings = match settings_from(&process_env) {
            Ok((node, accel)) => {
                let host_root = HostRoot::new(node.host_root.clone());
                Settings {
                    pod_resources: pod_resources_from(&process_env, &host_root)
                        .map(|k| Arc::new(k) as Arc<dyn PodResources>),
                    host_root,
                    launcher: Arc::new(NodeLauncher { node }),
                    accel,
                    error: None,
                }
            }
            Err(e) => {
                let msg = gpucell_runtime::error_chain(&e);
                tracing::error!("{msg}");
                Settings {
                    host_root: HostRoot::new("/"),
                    launcher: Arc::new(NodeLauncher {
                        node: Node::new("/", DEFAULT_STATE_DIR, None, &Default::default()),
                    }),
                    accel: AccelRequest::Auto,
                    pod_resources: None,
                    error: Some(msg),
                }
            }
        };
        TaskService::new(settings, tx, Arc::clone(&self.exit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let root = dir.path().to_string_lossy().into_owned();
        let s = state.to_string_lossy().into_owned();
        let env = |k: &str| match k {
            "GPUCELL_HOST_ROOT" => Some(root.clone()),
            "GPUCELL_STATE_DIR" => Some(s.clone()),
            "GPUCELL_ACCEL" => Some("tcg".into()),
            _ => None,
        };
        let (node, accel) = settings_from(&env).unwrap();
        assert_eq!(node.state_dir, state);
        assert_eq!(accel, AccelRequest::Tcg);
        let bad = |k: &str| (k == "GPUCELL_ACCEL").then(|| "fast".to_string());
        let err = settings_from(&bad).unwrap_err();
        assert!(err.to_string().contains("GPUCELL_ACCEL"), "{err}");
        let missing = |k: &str| (k == "GPUCELL_CONFIG").then(|| "/no/such/config.toml".to_string());
        assert!(settings_from(&missing).is_err());
    }

    #[test]
    fn the_kubelets_socket_and_prefixes_come_from_the_environment() {
        let root = HostRoot::new("/host");
        let k = pod_resources_from(&|_| None, &root).unwrap();
        assert_eq!(
            k.socket,
            Path::new("/host/var/lib/kubelet/pod-resources/kubelet.sock")
        );
        assert_eq!(k.prefixes, ["gpucell.io/"]);
        let env = |k: &str| match k {
            "GPUCELL_POD_RESOURCES" => Some("/run/k.sock".to_string()),
            "GPUCELL_POD_RESOURCE_PREFIXES" => Some("gpucell.io/, example.com/gpu,".to_string()),
            _ => None,
        };
        let k = pod_resources_from(&env, &root).unwrap();
        assert_eq!(k.socket, Path::new("/run/k.sock"));
        assert_eq!(k.prefixes, ["gpucell.io/", "example.com/gpu"]);
        let off = |k: &str| (k == "GPUCELL_POD_RESOURCES").then(|| "off".to_string());
        assert!(pod_resources_from(&off, &root).is_none());
    }
}
