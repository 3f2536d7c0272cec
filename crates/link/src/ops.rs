//! What the link asks of the node: the daemon implements [`NodeOps`].

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

/// A deploy or stop that the daemon refused or that failed; sent to the control plane
/// as `{"code", "message"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct LinkOpError {
    /// A short machine-readable reason, e.g. `invalid_spec`, `gpu_busy`, `not_found`.
    pub code: String,
    /// What went wrong and what to do, for a person.
    pub message: String,
}

impl LinkOpError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        LinkOpError {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// The node's side of the link. Payloads are opaque JSON to the link: the daemon
/// validates deployment specs and chooses what its inventory and states hold.
///
/// The link calls `deploy` at most once per deployment id while it remembers the id
/// (a bounded table, lost when the process restarts): a daemon should also treat a
/// deployment id it already knows as "answer with the existing sandbox".
#[async_trait]
pub trait NodeOps: Send + Sync {
    /// Starts a deployment and returns the sandbox's status (e.g. its id and state).
    async fn deploy(&self, deployment_id: &str, spec: Value) -> Result<Value, LinkOpError>;
    /// Stops a deployment and returns the sandbox's final status.
    async fn stop(&self, deployment_id: &str) -> Result<Value, LinkOpError>;
    /// What `register` carries: GPUs, flavours, capacity.
    async fn inventory(&self) -> Value;
    /// What each `heartbeat` carries: the state of every sandbox.
    async fn states(&self) -> Value;
    /// State changes to forward as `status` messages, each payload verbatim. Called once
    /// when the link starts; `None` (the default) sends none.
    fn status_updates(&self) -> Option<broadcast::Receiver<Value>> {
        None
    }
}

/// Turns a broadcast of the daemon's own event type into the JSON broadcast that
/// [`NodeOps::status_updates`] returns, by a task that forwards each event as JSON. The
/// task ends when the source closes or nobody listens any more. Call it inside a tokio
/// runtime (the link calls `status_updates` from `run`).
pub fn json_updates<T>(mut source: broadcast::Receiver<T>) -> broadcast::Receiver<Value>
where
    T: Serialize + Clone + Send + 'static,
{
    let (tx, rx) = broadcast::channel(1024);
    tokio::spawn(async move {
        loop {
            match source.recv().await {
                Ok(event) => {
                    let Ok(value) = serde_json::to_value(&event) else {
                        continue;
                    };
                    if tx.send(value).is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, Serialize)]
    struct Event {
        id: &'static str,
        state: &'static str,
    }

    #[tokio::test]
    async fn json_updates_forwards_as_json_and_ends_with_the_source() {
        let (tx, rx) = broadcast::channel(4);
        let mut json = json_updates(rx);
        tx.send(Event {
            id: "a",
            state: "running",
        })
        .unwrap();
        assert_eq!(
            json.recv().await.unwrap(),
            serde_json::json!({"id": "a", "state": "running"})
        );
        drop(tx);
        assert!(matches!(
            json.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
    }
}
