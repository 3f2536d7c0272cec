//! The link itself: connect, register, heartbeat, answer deploy/stop, reconnect.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use gpucell_common::chain_string;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::{ConfigError, LinkConfig};
use crate::connect::{connect, ConnectError, Ws};
use crate::deployments::{self, DeployAction, Deployments, DEFAULT_CAPACITY};
use crate::ops::{LinkOpError, NodeOps};
use crate::protocol::{
    self, ErrorCode, Heartbeat, NodeMessage, OpResult, Register, Rejection, ServerMessage,
};
use crate::tls::{self, TlsError};

type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Messages waiting to be sent while the link is down.
const OUTBOX: usize = 1024;
/// A connection that receives nothing (not even a pong) for this many heartbeats is dead.
const DEAD_AFTER_HEARTBEATS: u32 = 3;
/// ... and never sooner than this.
const DEAD_AFTER_MIN: Duration = Duration::from_secs(10);

/// Why the link could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Runs the link until `shutdown` completes: connects, registers, heartbeats, answers
/// `deploy` and `stop` through `ops`, and reconnects with jittered exponential backoff
/// whenever the connection is lost. It never stops a sandbox on its own: a node cut off
/// from its control plane keeps its workloads running.
///
/// Returns an error only when the configuration cannot work (a bad field, an unreadable
/// CA file); connection failures are logged and retried.
pub async fn run(
    cfg: LinkConfig,
    ops: Arc<dyn NodeOps>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), LinkError> {
    run_with_state(cfg, ops, shutdown, watch::channel(LinkState::default()).0).await
}

/// [`run`], publishing the link's state (for the daemon's node status and metrics).
pub async fn run_with_state(
    cfg: LinkConfig,
    ops: Arc<dyn NodeOps>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    state: watch::Sender<LinkState>,
) -> Result<(), LinkError> {
    cfg.validate()?;
    let connector = tls::connector(&cfg)?;
    let (out_tx, out_rx) = mpsc::channel(OUTBOX);
    let status_rx = ops.status_updates();
    let mut link = Link {
        shared: Arc::new(Shared {
            cfg,
            ops,
            deployments: Mutex::new(Deployments::new(DEFAULT_CAPACITY)),
            out_tx,
        }),
        out_rx,
        status_rx,
        unsent: VecDeque::new(),
        shutdown: Box::pin(shutdown),
        state,
    };
    link.run(connector).await;
    link.set_state(false, None);
    Ok(())
}

/// Where the link stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LinkState {
    /// Registered on an open connection.
    pub connected: bool,
    /// Connections registered since the link started.
    pub connections: u64,
    /// When `connected` last changed (Unix ms; 0 before the first change).
    pub since_ms: u64,
    /// Why the last connection attempt failed or the last connection ended.
    pub last_error: Option<String>,
}

/// What the link and its spawned deploy/stop tasks share.
struct Shared {
    cfg: LinkConfig,
    ops: Arc<dyn NodeOps>,
    deployments: Mutex<Deployments>,
    /// Results of deploy/stop tasks; sent on the current connection or the next one.
    out_tx: mpsc::Sender<NodeMessage>,
}

struct Link {
    shared: Arc<Shared>,
    out_rx: mpsc::Receiver<NodeMessage>,
    status_rx: Option<broadcast::Receiver<Value>>,
    /// Messages taken from the outbox whose send failed: first on the next connection.
    unsent: VecDeque<NodeMessage>,
    shutdown: Shutdown,
    state: watch::Sender<LinkState>,
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

impl Link {
    async fn run(&mut self, connector: Option<Connector>) {
        let cfg = &self.shared.cfg;
        let mut backoff = Backoff::new(cfg.backoff_min(), cfg.backoff_max());
        let url = cfg.url.clone();
        let backoff_max = cfg.backoff_max();
        loop {
            let attempt = tokio::select! {
                _ = &mut self.shutdown => return,
                r = connect(&self.shared.cfg, connector.clone()) => r,
            };
            match attempt {
                Ok(ws) => {
                    info!(url = %url, "connected to the control plane");
                    let started = Instant::now();
                    match self.session(ws).await {
                        SessionEnd::Shutdown => return,
                        SessionEnd::Lost(reason) => {
                            warn!(url = %url, reason = %reason, "lost the control plane; workloads keep running");
                            self.set_state(false, Some(reason));
                        }
                    }
                    if started.elapsed() >= backoff_max {
                        backoff.reset();
                    }
                }
                Err(e @ ConnectError::Refused { .. }) => {
                    error!(error = %e, "control plane connection refused");
                    self.set_state(false, Some(e.to_string()));
                    backoff.to_max();
                }
                Err(e) => {
                    let reason = chain_string(&e);
                    warn!(error = %reason, "control plane connection failed");
                    self.set_state(false, Some(reason));
                }
            }
            let delay = backoff.next_delay();
            debug!(?delay, "reconnecting after a delay");
            tokio::select! {
                _ = &mut self.shutdown => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Publishes a change of state; `error` is kept until the next failure replaces it.
    fn set_state(&self, connected: bool, error: Option<String>) {
        self.state.send_if_modified(|st| {
            let changed = st.connected != connected || error.is_some();
            if st.connected != connected {
                st.since_ms = now_ms();
                if connected {
                    st.connections += 1;
                }
            }
            st.connected = connected;
            if error.is_some() {
                st.last_error = error;
            }
            changed
        });
    }

    /// One connection: register, heartbeat, then serve until it ends.
    async fn session(&mut self, ws: Ws) -> SessionEnd {
        let (mut sink, mut stream) = ws.split();
        let shared = Arc::clone(&self.shared);
        let cfg = &shared.cfg;
        let register = NodeMessage::Register(Register {
            node_id: cfg.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: protocol::PROTOCOL_VERSION,
            inventory: shared.ops.inventory().await,
        });
        let mut seq = 0;
        let first_beat = heartbeat(&shared, &mut seq).await;
        for msg in [register, first_beat] {
            if let Err(e) = send(&mut sink, &msg, cfg).await {
                return SessionEnd::Lost(e);
            }
        }
        while let Some(msg) = self.unsent.pop_front() {
            if let Err(e) = send(&mut sink, &msg, cfg).await {
                self.unsent.push_front(msg);
                return SessionEnd::Lost(e);
            }
        }
        self.set_state(true, None);
        let period = cfg.heartbeat();
        let dead_after = (period * DEAD_AFTER_HEARTBEATS).max(DEAD_AFTER_MIN);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            let outgoing = tokio::select! {
                _ = &mut self.shutdown => {
                    close(&mut sink, CloseCode::Away, "node shutting down", cfg).await;
                    return SessionEnd::Shutdown;
                }
                _ = ticker.tick() => {
                    if last_heard.elapsed() > dead_after {
                        return SessionEnd::Lost(format!("nothing heard for {dead_after:?}"));
                    }
                    if let Err(e) = send_frame(&mut sink, Message::Ping(Default::default()), cfg).await {
                        return SessionEnd::Lost(e);
                    }
                    Some(heartbeat(&shared, &mut seq).await)
                }
                Some(msg) = self.out_rx.recv() => Some(msg),
                status = next_status(&mut self.status_rx) => status.map(NodeMessage::Status),
                frame = stream.next() => {
                    last_heard = Instant::now();
                    match frame {
                        None => return SessionEnd::Lost("the control plane closed the stream".into()),
                        Some(Err(e)) => return SessionEnd::Lost(chain_string(&e)),
                        Some(Ok(msg)) => match self.on_frame(msg) {
                            Ok(reply) => reply,
                            Err(reason) => return SessionEnd::Lost(reason),
                        },
                    }
                }
            };
            if let Some(msg) = outgoing {
                if let Err(e) = send(&mut sink, &msg, cfg).await {
                    if !matches!(msg, NodeMessage::Heartbeat(_)) {
                        self.unsent.push_back(msg);
                    }
                    return SessionEnd::Lost(e);
                }
            }
        }
    }

    /// Handles one frame; returns what to send at once, or why the connection is over.
    fn on_frame(&self, frame: Message) -> Result<Option<NodeMessage>, String> {
        let text = match frame {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return Ok(Some(
                    Rejection {
                        code: ErrorCode::Binary,
                        message: "binary frames are not part of the protocol: send JSON text"
                            .into(),
                        in_reply_to: None,
                    }
                    .to_message(),
                ))
            }
            Message::Close(frame) => {
                let why = frame
                    .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                    .unwrap_or_default();
                return Err(format!("the control plane closed the connection ({why})"));
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(None),
        };
        let max = self.shared.cfg.max_message_bytes;
        match protocol::parse_server_message(text.as_str(), max) {
            Err(rejection) => {
                warn!(code = rejection.code.as_str(), message = %rejection.message, "refused a control-plane message");
                Ok(Some(rejection.to_message()))
            }
            Ok(ServerMessage::Deploy {
                deployment_id,
                spec,
            }) => Ok(self.on_deploy(deployment_id, spec)),
            Ok(ServerMessage::Stop { deployment_id }) => {
                self.on_stop(deployment_id);
                Ok(None)
            }
            Ok(ServerMessage::Error(e)) => {
                warn!(code = %e.code, message = %e.message, in_reply_to = ?e.in_reply_to, "the control plane reported an error");
                Ok(None)
            }
        }
    }

    fn on_deploy(&self, deployment_id: String, spec: Value) -> Option<NodeMessage> {
        let action = lock(&self.shared.deployments).begin_deploy(&deployment_id);
        match action {
            DeployAction::Replay(result) | DeployAction::Refuse(result) => {
                info!(deployment_id = %deployment_id, ok = result.ok, "repeated deploy answered without deploying");
                Some(NodeMessage::DeployResult(result))
            }
            DeployAction::InFlight => {
                info!(deployment_id = %deployment_id, "repeated deploy ignored: the first is still running");
                None
            }
            DeployAction::Start => {
                info!(deployment_id = %deployment_id, "deploying");
                let shared = Arc::clone(&self.shared);
                tokio::spawn(async move {
                    let outcome = shared.ops.deploy(&deployment_id, spec).await;
                    let result = op_result(&deployment_id, outcome);
                    lock(&shared.deployments).finish_deploy(&result);
                    deliver(&shared, NodeMessage::DeployResult(result)).await;
                });
                None
            }
        }
    }

    fn on_stop(&self, deployment_id: String) {
        info!(deployment_id = %deployment_id, "stopping");
        lock(&self.shared.deployments).stopped(&deployment_id);
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let outcome = shared.ops.stop(&deployment_id).await;
            deliver(
                &shared,
                NodeMessage::StopResult(op_result(&deployment_id, outcome)),
            )
            .await;
        });
    }
}

async fn heartbeat(shared: &Shared, seq: &mut u64) -> NodeMessage {
    let msg = NodeMessage::Heartbeat(Heartbeat {
        node_id: shared.cfg.node_id.clone(),
        seq: *seq,
        sent_at_ms: now_ms(),
        sandboxes: shared.ops.states().await,
    });
    *seq += 1;
    msg
}

/// Queues a task's result for the current or next connection.
async fn deliver(shared: &Shared, msg: NodeMessage) {
    let kind = msg.kind();
    if shared.out_tx.send(msg).await.is_err() {
        debug!(kind, "the link has ended; result not sent");
    }
}

fn op_result(deployment_id: &str, outcome: Result<Value, LinkOpError>) -> OpResult {
    match outcome {
        Ok(sandbox) => OpResult {
            deployment_id: deployment_id.to_string(),
            ok: true,
            sandbox: Some(sandbox),
            error: None,
            replayed: false,
        },
        Err(e) => deployments::failure(deployment_id, &e.code, e.message),
    }
}

fn lock(m: &Mutex<Deployments>) -> std::sync::MutexGuard<'_, Deployments> {
    // The table stays consistent even if a holder panicked: every method leaves it whole.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn next_status(rx: &mut Option<broadcast::Receiver<Value>>) -> Option<Value> {
    let Some(receiver) = rx else {
        return std::future::pending().await;
    };
    loop {
        match receiver.recv().await {
            Ok(v) => return Some(v),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "status updates were dropped; the next heartbeat carries every state"
                );
            }
            Err(broadcast::error::RecvError::Closed) => {
                *rx = None;
                return None;
            }
        }
    }
}

type Sink = futures_util::stream::SplitSink<Ws, Message>;

async fn send(sink: &mut Sink, msg: &NodeMessage, cfg: &LinkConfig) -> Result<(), String> {
    let text = serde_json::to_string(msg).map_err(|e| format!("encoding {}: {e}", msg.kind()))?;
    debug!(kind = msg.kind(), bytes = text.len(), "sending");
    send_frame(sink, Message::text(text), cfg).await
}

/// Sends one frame; a peer that does not take it within the connect timeout is dead.
async fn send_frame(sink: &mut Sink, frame: Message, cfg: &LinkConfig) -> Result<(), String> {
    match tokio::time::timeout(cfg.connect_timeout(), sink.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(chain_string(&e)),
        Err(_) => Err(format!(
            "a send took longer than {:?}",
            cfg.connect_timeout()
        )),
    }
}

async fn close(sink: &mut Sink, code: CloseCode, reason: &str, cfg: &LinkConfig) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = send_frame(sink, frame, cfg).await;
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
