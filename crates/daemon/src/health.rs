//! Health checks of running sandboxes: an HTTP GET of `http://{host}:{port}{path}` on
//! the host (a port the sandbox publishes), every `interval_ms`; `failure_threshold`
//! failures in a row make it unhealthy, one success healthy again. The result is
//! reported in the sandbox's status; it does not restart anything (a control plane
//! decides what to do with an unhealthy replica).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gpucell_api::{HealthCheck, HealthStatus, SandboxState};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::logs::now_ms;
use crate::service::Service;

/// Time limit of one check.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One GET; `Err` says why it failed (connection, timeout, status).
pub async fn probe(check: &HealthCheck) -> Result<(), String> {
    let addr = format!("{}:{}", check.http.host, check.http.port);
    let path = if check.http.path.starts_with('/') {
        check.http.path.clone()
    } else {
        format!("/{}", check.http.path)
    };
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP to {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::get(&path)
            .header("host", addr.as_str())
            .header("user-agent", "gpucelld-health")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("GET {path}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("GET http://{addr}{path}: {}", resp.status()))
        }
    };
    match tokio::time::timeout(CHECK_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "GET http://{addr}{path}: no answer within {} s",
            CHECK_TIMEOUT.as_secs()
        )),
    }
}

/// The next health after a check.
pub fn next(
    prev: Option<&HealthStatus>,
    threshold: u32,
    result: Result<(), String>,
) -> HealthStatus {
    let failures = match &result {
        Ok(()) => 0,
        Err(_) => prev.map_or(0, |p| p.consecutive_failures).saturating_add(1),
    };
    HealthStatus {
        // Healthy until `threshold` failures in a row.
        healthy: failures < threshold.max(1),
        consecutive_failures: failures,
        last_error: result.err(),
        checked_ms: Some(now_ms()),
    }
}

/// Checks every running sandbox with a health check when its interval has passed.
/// Runs until the process ends.
pub async fn run(service: Arc<Service>, tick: Duration) {
    let mut due: HashMap<String, u64> = HashMap::new();
    loop {
        tokio::time::sleep(tick).await;
        let now = now_ms();
        let checks: Vec<(String, HealthCheck)> = service
            .list()
            .sandboxes
            .into_iter()
            .filter(|s| s.state == SandboxState::Running)
            .filter_map(|s| service.health_check(&s.id).map(|h| (s.id, h)))
            .collect();
        due.retain(|id, _| checks.iter().any(|(c, _)| c == id));
        for (id, check) in checks {
            let at = due.entry(id.clone()).or_insert(now + check.interval_ms);
            if *at > now {
                continue;
            }
            *at = now + check.interval_ms;
            let s = service.clone();
            tokio::spawn(async move {
                let result = probe(&check).await;
                s.record_health(&id, check.failure_threshold, result);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(port: u16, path: &str) -> HealthCheck {
        serde_json::from_value(serde_json::json!({"http": {"port": port, "path": path}})).unwrap()
    }

    #[test]
    fn threshold_counts_failures_in_a_row() {
        let a = next(None, 2, Err("x".into()));
        assert!(a.healthy);
        let b = next(Some(&a), 2, Err("y".into()));
        assert!(!b.healthy);
        assert_eq!(b.last_error.as_deref(), Some("y"));
        let c = next(Some(&b), 2, Ok(()));
        assert!(c.healthy && c.consecutive_failures == 0 && c.last_error.is_none());
    }

    #[test]
    fn probes_a_real_server() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
            tokio::spawn(async move { axum::serve(listener, app).await });
            probe(&check(port, "/health")).await.unwrap();
            let err = probe(&check(port, "/nope")).await.unwrap_err();
            assert!(err.contains("404"), "{err}");
            // A closed port.
            let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let cport = closed.local_addr().unwrap().port();
            drop(closed);
            let err = probe(&check(cport, "/health")).await.unwrap_err();
            assert!(err.contains("connecting"), "{err}");
        });
    }
}
