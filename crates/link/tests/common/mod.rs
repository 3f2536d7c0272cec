//! What the link's tests share: the reference control plane (tests/control-plane) over
//! real WebSockets on localhost, and a recording fake of the daemon.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use gpucell_link::{LinkConfig, LinkError, LinkOpError, NodeOps};
use gpucell_test_control_plane::{ControlPlane, Event, ServerConfig};
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

pub const TOKEN: &str = "node-token-1234";
pub const NODE: &str = "node-a";
pub const WAIT: Duration = Duration::from_secs(15);

/// Records every call; deploys take `deploy_delay` and fail when the spec says `"fail": true`.
pub struct FakeOps {
    calls: Mutex<Vec<String>>,
    deploy_delay: Duration,
    pub status_tx: broadcast::Sender<Value>,
}

impl FakeOps {
    pub fn new(deploy_delay: Duration) -> Arc<Self> {
        Arc::new(FakeOps {
            calls: Mutex::new(Vec::new()),
            deploy_delay,
            status_tx: broadcast::channel(16).0,
        })
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    pub fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| *c == call).count()
    }
}

#[async_trait]
impl NodeOps for FakeOps {
    async fn deploy(&self, deployment_id: &str, spec: Value) -> Result<Value, LinkOpError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("deploy:{deployment_id}"));
        tokio::time::sleep(self.deploy_delay).await;
        if spec.get("fail") == Some(&json!(true)) {
            return Err(LinkOpError::new(
                "invalid_spec",
                "field `image`: not a reference",
            ));
        }
        Ok(
            json!({"sandbox_id": format!("sb-{deployment_id}"), "state": "running", "image": spec["image"]}),
        )
    }

    async fn stop(&self, deployment_id: &str) -> Result<Value, LinkOpError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("stop:{deployment_id}"));
        Ok(json!({"sandbox_id": format!("sb-{deployment_id}"), "state": "exited"}))
    }

    async fn inventory(&self) -> Value {
        json!({"gpus": [{"bdf": "0000:41:00.0", "state": "free"}]})
    }

    async fn states(&self) -> Value {
        let deployed: Vec<String> = self
            .calls()
            .into_iter()
            .filter_map(|c| c.strip_prefix("deploy:").map(str::to_string))
            .collect();
        json!({ "deployments": deployed })
    }

    fn status_updates(&self) -> Option<broadcast::Receiver<Value>> {
        Some(self.status_tx.subscribe())
    }
}

pub struct Node {
    pub handle: JoinHandle<Result<(), LinkError>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Node {
    pub fn start(cfg: LinkConfig, ops: Arc<FakeOps>) -> Node {
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(gpucell_link::run(cfg, ops, async move {
            let _ = stopped.await;
        }));
        Node {
            handle,
            stop: Some(stop),
        }
    }

    pub async fn shutdown(mut self) -> Result<(), LinkError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.handle)
            .await
            .expect("the link ends within 5 s of shutdown")
            .expect("the link task does not panic")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

pub async fn control_plane(offline_after: Duration) -> ControlPlane {
    let mut cfg = ServerConfig::new(TOKEN);
    cfg.offline_after = offline_after;
    ControlPlane::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap()
}

pub fn link_cfg(cp: &ControlPlane) -> LinkConfig {
    let mut cfg = LinkConfig::new(cp.url(), TOKEN, NODE);
    cfg.heartbeat_ms = 100;
    cfg.backoff_min_ms = 20;
    cfg.backoff_max_ms = 200;
    cfg.connect_timeout_ms = 3000;
    cfg
}

pub fn count(events: &[Event], kind: &str) -> usize {
    events
        .iter()
        .filter(|e| e.message_type() == Some(kind))
        .count()
}

pub fn connects(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Connected { .. }))
        .count()
}

/// Starts a control plane and a registered node.
pub async fn registered(delay: Duration) -> (ControlPlane, Node, Arc<FakeOps>) {
    let cp = control_plane(Duration::from_secs(60)).await;
    let ops = FakeOps::new(delay);
    let node = Node::start(link_cfg(&cp), ops.clone());
    cp.wait_for("register", WAIT, |e| count(e, "register") == 1)
        .await
        .unwrap();
    (cp, node, ops)
}
