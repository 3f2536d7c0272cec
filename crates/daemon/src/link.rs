//! The control-plane link (gpucell-link, docs/control-plane.md) on top of the daemon's
//! [`Service`]: a `deploy` message is a `POST /v1/sandboxes` body whose id is the
//! deployment id, `stop` is `DELETE /v1/sandboxes/{id}`, and the link's `register` and
//! `heartbeat` carry `GET /v1/node` and `GET /v1/sandboxes`.

use std::sync::Arc;

use gpucell_link::{LinkOpError, NodeOps};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::service::{Service, ServiceError};

pub struct LinkOps(pub Arc<Service>);

fn op_error(e: ServiceError) -> LinkOpError {
    let code = match e.status() {
        400 | 413 | 422 => "invalid_spec",
        404 => "not_found",
        409 => "conflict",
        _ => "internal",
    };
    let body = e.body();
    let message = match body.field {
        Some(f) => format!("{f}: {}", body.error),
        None => body.error,
    };
    LinkOpError::new(code, message)
}

fn join_error(e: tokio::task::JoinError) -> LinkOpError {
    LinkOpError::new("internal", e.to_string())
}

/// `spec` with its `id` set to the deployment id (a spec naming another id is refused).
pub fn spec_with_id(deployment_id: &str, mut spec: Value) -> Result<Value, LinkOpError> {
    let obj = spec.as_object_mut().ok_or_else(|| {
        LinkOpError::new(
            "invalid_spec",
            "the spec must be a POST /v1/sandboxes body (a JSON object)",
        )
    })?;
    match obj.get("id") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == deployment_id => {}
        Some(other) => {
            return Err(LinkOpError::new(
                "invalid_spec",
                format!("id: {other} differs from the deployment id {deployment_id:?}"),
            ))
        }
    }
    obj.insert("id".into(), Value::String(deployment_id.into()));
    Ok(spec)
}

#[async_trait::async_trait]
impl NodeOps for LinkOps {
    async fn deploy(&self, deployment_id: &str, spec: Value) -> Result<Value, LinkOpError> {
        let spec = spec_with_id(deployment_id, spec)?;
        let s = self.0.clone();
        let (_created, status) = tokio::task::spawn_blocking(move || s.deploy_value(spec))
            .await
            .map_err(join_error)?
            .map_err(op_error)?;
        Ok(serde_json::to_value(status).unwrap_or_default())
    }

    async fn stop(&self, deployment_id: &str) -> Result<Value, LinkOpError> {
        let (s, id) = (self.0.clone(), deployment_id.to_string());
        let status = tokio::task::spawn_blocking(move || s.stop(&id, false))
            .await
            .map_err(join_error)?
            .map_err(op_error)?;
        Ok(serde_json::to_value(status).unwrap_or_default())
    }

    async fn inventory(&self) -> Value {
        let s = self.0.clone();
        tokio::task::spawn_blocking(move || s.inventory())
            .await
            .unwrap_or_default()
    }

    async fn states(&self) -> Value {
        let s = self.0.clone();
        tokio::task::spawn_blocking(move || s.states())
            .await
            .unwrap_or_default()
    }

    fn status_updates(&self) -> Option<broadcast::Receiver<Value>> {
        Some(gpucell_link::json_updates(self.0.subscribe()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_deployment_id_is_the_sandbox_id() {
        let v = spec_with_id("web-1", serde_json::json!({"run": {"image": "x"}})).unwrap();
        assert_eq!(v["id"], "web-1");
        let v = spec_with_id("web-1", serde_json::json!({"id": "web-1"})).unwrap();
        assert_eq!(v["id"], "web-1");
        let e = spec_with_id("web-1", serde_json::json!({"id": "other"})).unwrap_err();
        assert_eq!(e.code, "invalid_spec");
        assert!(e.message.contains("other"), "{}", e.message);
        assert!(spec_with_id("web-1", serde_json::json!([1])).is_err());
    }
}
