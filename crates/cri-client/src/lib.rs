//! Test support: a small client of the Kubernetes Container Runtime Interface (CRI v1),
//! the API the kubelet speaks to containerd's CRI plugin, used by the shim's tests to run
//! pods through containerd as Kubernetes would.
//!
//! The API is generated at build time by tonic from `proto/api.proto`, vendored unchanged
//! from `k8s.io/cri-api` **v0.36.3** (`pkg/apis/runtime/v1/api.proto`, commit
//! 1733b6a9fa123c5887eefa14523c532b12827f73 of the kubernetes/cri-api repository,
//! Apache-2.0). Only the proto is taken; protox parses it, so no `protoc` is needed.
//! containerd 1.6 and later serve this `runtime.v1` package.
//!
//! [`CriClient`] is blocking (a one-thread tokio runtime of its own), so that plain
//! `#[test]` functions can drive containerd step by step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

pub mod v1 {
    //! Generated from `proto/api.proto` (package `runtime.v1`).
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("runtime.v1");
}

use v1::runtime_service_client::RuntimeServiceClient;
use v1::*;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot start the client's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot connect to the CRI socket {path:?}; is containerd's CRI plugin enabled?")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {call} did not answer within {} s", .limit.as_secs())]
    Timeout { call: &'static str, limit: Duration },
    #[error("CRI {call} failed: {}", .source.message())]
    Call {
        call: &'static str,
        #[source]
        source: tonic::Status,
    },
}

/// The longest any one call may take.
pub const CALL_LIMIT: Duration = Duration::from_secs(180);

/// A blocking CRI v1 client over a unix socket.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<tonic::transport::Channel>,
}

impl CriClient {
    /// Connects to the CRI socket at `path` (containerd's gRPC socket).
    pub fn connect(path: &Path) -> Result<CriClient, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let socket = path.to_path_buf();
        let connect = tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        });
        // The URI is required by the API but unused: the connector dials the socket.
        let channel = rt
            .block_on(
                Endpoint::from_static("http://cri.invalid")
                    .connect_timeout(Duration::from_secs(10))
                    .connect_with_connector(connect),
            )
            .map_err(|source| CriError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(CriClient {
            rt,
            client: RuntimeServiceClient::new(channel),
        })
    }

    /// Waits for one RPC's answer, at most [`CALL_LIMIT`] (a hung runtime fails the
    /// caller instead of hanging it).
    fn block<T>(
        &self,
        call: &'static str,
        rpc: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CriError> {
        self.rt
            .block_on(async { tokio::time::timeout(CALL_LIMIT, rpc).await })
            .map_err(|_| CriError::Timeout {
                call,
                limit: CALL_LIMIT,
            })?
            .map(tonic::Response::into_inner)
            .map_err(|source| CriError::Call { call, source })
    }

    /// The runtime's name, version and CRI API version.
    pub fn version(&self) -> Result<VersionResponse, CriError> {
        self.block(
            "Version",
            self.client.clone().version(VersionRequest::default()),
        )
    }

    /// Creates and starts a pod sandbox with `runtime_handler`; returns its id.
    pub fn run_pod_sandbox(
        &self,
        config: PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String, CriError> {
        let req = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: runtime_handler.to_string(),
        };
        self.block("RunPodSandbox", self.client.clone().run_pod_sandbox(req))
            .map(|r| r.pod_sandbox_id)
    }

    /// Creates a container in pod `pod_id` (whose config was `sandbox`); returns its id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: ContainerConfig,
        sandbox: PodSandboxConfig,
    ) -> Result<String, CriError> {
        let req = CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox),
        };
        self.block("CreateContainer", self.client.clone().create_container(req))
            .map(|r| r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let req = StartContainerRequest {
            container_id: id.to_string(),
        };
        self.block("StartContainer", self.client.clone().start_container(req))
            .map(drop)
    }

    /// The container's status (`None` in the response when it is unknown).
    pub fn container_status(&self, id: &str) -> Result<ContainerStatus, CriError> {
        let req = ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        self.block("ContainerStatus", self.client.clone().container_status(req))
            .map(|r| r.status.unwrap_or_default())
    }

    /// Runs `cmd` in the container and waits (at most `timeout_s`, 0: no limit).
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> Result<ExecSyncResponse, CriError> {
        let req = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_s,
        };
        self.block("ExecSync", self.client.clone().exec_sync(req))
    }

    /// Stops the container, killing it after `timeout_s` seconds.
    pub fn stop_container(&self, id: &str, timeout_s: i64) -> Result<(), CriError> {
        let req = StopContainerRequest {
            container_id: id.to_string(),
            timeout: timeout_s,
        };
        self.block("StopContainer", self.client.clone().stop_container(req))
            .map(drop)
    }

    pub fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let req = RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.block("RemoveContainer", self.client.clone().remove_container(req))
            .map(drop)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let req = StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.block("StopPodSandbox", self.client.clone().stop_pod_sandbox(req))
            .map(drop)
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.block(
            "RemovePodSandbox",
            self.client.clone().remove_pod_sandbox(req),
        )
        .map(drop)
    }
}

/// A pod's configuration with the given name and log directory, in the node's network
/// namespace (so that containerd needs no CNI plugin).
pub fn pod_config(name: &str, log_directory: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            namespace: "default".to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: log_directory.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container's configuration: `image`, `command`, its log at `log_path` (relative to
/// the pod's log directory).
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    log_path: &str,
) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: log_path.to_string(),
        ..Default::default()
    }
}

/// The text of a CRI container log (`<time> <stream> <tag> <line>` per line): the lines
/// only.
pub fn log_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_drops_time_stream_and_tag() {
        let log = "2026-12-03T04:00:00.1Z stdout F hello world\n\
                   2026-12-03T04:00:00.2Z stderr F oops\nbroken\n";
        assert_eq!(log_lines(log), ["hello world", "oops"]);
    }

    #[test]
    fn pod_config_uses_the_node_network() {
        let c = pod_config("p1", Path::new("/tmp/logs"));
        let ns = c
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options)
            .unwrap_or_default();
        assert_eq!(ns.network, NamespaceMode::Node as i32);
    }

    #[test]
    fn connecting_to_a_missing_socket_fails_with_its_path() {
        let dir = std::env::temp_dir().join("gpucell-cri-client-no-such.sock");
        let e = CriClient::connect(&dir).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.contains("no-such.sock")),
            "{e:?}"
        );
    }
}
