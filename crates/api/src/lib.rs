//! The node daemon's HTTP API (`gpucelld`, docs/daemon.md, docs/openapi.json): the
//! serde types every party shares (the daemon, the `gpucell` CLI, a control-plane link),
//! and a small client over the daemon's unix socket.
//!
//! Bodies are JSON. Times are milliseconds since the Unix epoch (`*_ms`).

#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::collections::BTreeMap;

use gpucell_runtime::RunRequest;
use serde::{Deserialize, Serialize};

pub mod client;

pub use client::{Client, ClientError};

/// Where the daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/run/gpucell/gpucell.sock";
/// Largest request body the daemon reads.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest deployment id.
pub const MAX_ID_LEN: usize = 64;

/// What the daemon does when a sandbox's workload ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it ended.
    #[default]
    Never,
    /// Start it again when it exited non-zero or failed.
    OnFailure,
    /// Start it again whenever it ends, unless it was stopped.
    Always,
}

/// A health check of a running sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// HTTP GET of `http://127.0.0.1:{port}{path}` on the host: `port` is a host port the
    /// request publishes (`run.network`).
    pub http: HttpCheck,
    /// Time between checks (default 10 s).
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// Consecutive failures that make the sandbox unhealthy (default 3).
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    /// The host address to connect to (default 127.0.0.1).
    #[serde(default = "default_host")]
    pub host: String,
    pub port: u16,
    #[serde(default = "default_path")]
    pub path: String,
}

fn default_interval() -> u64 {
    10_000
}
fn default_threshold() -> u32 {
    3
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_path() -> String {
    "/health".into()
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// Deployment id (letters, digits, `-`, `_`, `.`; at most 64). A deploy with the id of
    /// an existing sandbox returns that sandbox and changes nothing (idempotent). Default:
    /// a new random id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What to run, as `gpucell run` takes it.
    pub run: RunRequest,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// How long a stop waits after SIGTERM before the VM is killed (default 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_ms: Option<u64>,
}

impl DeployRequest {
    pub fn new(run: RunRequest) -> Self {
        DeployRequest {
            id: None,
            run,
            restart: RestartPolicy::Never,
            health: None,
            labels: BTreeMap::new(),
            stop_grace_ms: None,
        }
    }
}

/// A sandbox's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Recorded, not started yet (or waiting for its restart).
    Pending,
    /// Fetching the image and building its disk.
    Pulling,
    /// Guest, accelerator and devices; QEMU starting.
    Booting,
    /// QEMU runs the guest and the workload.
    Running,
    /// The workload ended; `exit_code` says how.
    Exited,
    /// gpucell could not run it, or its supervisor died.
    Failed,
    /// A stop was asked for; the workload has its grace period.
    Stopping,
}

impl SandboxState {
    pub const ALL: [SandboxState; 7] = [
        SandboxState::Pending,
        SandboxState::Pulling,
        SandboxState::Booting,
        SandboxState::Running,
        SandboxState::Exited,
        SandboxState::Failed,
        SandboxState::Stopping,
    ];

    /// Exited or failed: nothing runs.
    pub fn is_terminal(self) -> bool {
        matches!(self, SandboxState::Exited | SandboxState::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Pending => "pending",
            SandboxState::Pulling => "pulling",
            SandboxState::Booting => "booting",
            SandboxState::Running => "running",
            SandboxState::Exited => "exited",
            SandboxState::Failed => "failed",
            SandboxState::Stopping => "stopping",
        }
    }
}

/// What the owner wants of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    #[default]
    Running,
    Stopped,
}

/// A sandbox's health, when it has a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    pub healthy: bool,
    pub consecutive_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_ms: Option<u64>,
}

/// `GET /v1/sandboxes/{id}`; `GET /v1/sandboxes` lists these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxStatus {
    pub id: String,
    /// The image reference the sandbox runs (`run.image` of its request).
    #[serde(default)]
    pub image: String,
    pub state: SandboxState,
    pub desired: Desired,
    pub created_ms: u64,
    /// When the sandbox last entered each state.
    #[serde(default)]
    pub timestamps: BTreeMap<SandboxState, u64>,
    /// The workload's exit code (128+N for signal N, 124 timeout, 125 gpucell failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why the last run failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// PCI addresses of the devices the current run holds.
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthStatus>,
    /// How many times the daemon started it again.
    #[serde(default)]
    pub restarts: u32,
    /// Milliseconds spent in each run phase of the current or last run.
    #[serde(default)]
    pub phases_ms: BTreeMap<String, u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub restart: RestartPolicy,
    /// The run id (run directory) of the current or last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The last run's report (`gpucell run --json`'s document, docs/run-report.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

/// `GET /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxStatus>,
}

/// Every error body: what went wrong, and the request field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// With a device conflict: the sandbox that holds the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

impl ApiError {
    pub fn new(error: impl Into<String>) -> Self {
        ApiError {
            error: error.into(),
            field: None,
            holder: None,
        }
    }
    pub fn field(field: impl Into<String>, error: impl Into<String>) -> Self {
        ApiError {
            error: error.into(),
            field: Some(field.into()),
            holder: None,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.error),
            None => f.write_str(&self.error),
        }
    }
}

/// One line of a sandbox's output, as `GET /v1/sandboxes/{id}/logs` streams it (one JSON
/// object a line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub t_ms: u64,
    /// `stdout`, `stderr`, or `gpucell` (the daemon's own notes: restarts, failures).
    pub stream: String,
    pub line: String,
}

/// One server-sent event of `GET /v1/events` (event name `state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateEvent {
    pub id: String,
    pub state: SandboxState,
    pub t_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// Checks a deployment id: 1-64 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub fn check_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::field(
            "id",
            format!("{id:?} is not a deployment id: use 1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.', not starting with '.' or '-'"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_request_defaults_and_unknown_fields() {
        let d: DeployRequest =
            serde_json::from_str(r#"{"run":{"image":"oci:/x:y"},"restart":"on-failure"}"#).unwrap();
        assert_eq!(d.restart, RestartPolicy::OnFailure);
        assert_eq!(d.run.memory_mib, 512);
        assert!(
            serde_json::from_str::<DeployRequest>(r#"{"run":{"image":"x"},"bogus":1}"#).is_err()
        );
        assert!(serde_json::from_str::<DeployRequest>(
            r#"{"run":{"image":"x"},"restart":"sometimes"}"#
        )
        .is_err());
    }

    #[test]
    fn ids() {
        assert!(check_id("web-1.a_b").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert_eq!(
                check_id(bad).unwrap_err().field.as_deref(),
                Some("id"),
                "{bad}"
            );
        }
    }

    #[test]
    fn states_serialize_lowercase_and_key_maps() {
        let mut m = BTreeMap::new();
        m.insert(SandboxState::Running, 5u64);
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"running":5}"#);
        for s in SandboxState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
