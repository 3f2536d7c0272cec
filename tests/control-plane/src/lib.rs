//! A reference control plane for gpucell's node link, for tests. Not part of the product.
//!
//! It accepts node WebSockets (checking the bearer token), records everything it sees as
//! [`Event`]s, lets a test send `deploy`/`stop` (or any text) to a node, drops connections
//! on demand, and marks a node offline when no heartbeat came for `offline_after`
//! (closing its connection with code 4001 "heartbeat timeout").
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

/// The close code sent to a node marked offline.
pub const OFFLINE_CLOSE_CODE: u16 = 4001;
/// The close code sent to a node's older connection when it registers on a new one.
pub const REPLACED_CLOSE_CODE: u16 = 4002;

/// Errors of the reference control plane.
#[derive(Debug, thiserror::Error)]
pub enum CpError {
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("node `{0}` has no open connection")]
    NotConnected(String),
    #[error("TLS certificate or key {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    #[error("waited {after:?} for {what}; events so far: {events}")]
    Timeout {
        what: String,
        after: Duration,
        events: String,
    },
}

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The token nodes must send as `Authorization: Bearer <token>`.
    pub token: String,
    /// A node without a heartbeat for this long is marked offline.
    pub offline_after: Duration,
    /// Largest message accepted from a node.
    pub max_message_bytes: usize,
    /// Serve `wss://` with this certificate (see [`tls_config`]); plain `ws://` when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ServerConfig {
    pub fn new(token: impl Into<String>) -> Self {
        ServerConfig {
            token: token.into(),
            offline_after: Duration::from_secs(60),
            max_message_bytes: 1 << 20,
            tls: None,
        }
    }
}

/// Something the server saw, in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A handshake refused (bad or missing token).
    Refused { reason: String },
    /// A WebSocket was accepted.
    Connected { conn: u64 },
    /// A text frame from a node; `message` is its JSON, or `{"unparsed": text}`.
    Message {
        conn: u64,
        node_id: Option<String>,
        message: Value,
    },
    /// The node was marked offline (no heartbeat for `offline_after`).
    Offline { node_id: String },
    /// A connection ended.
    Disconnected {
        conn: u64,
        node_id: Option<String>,
        reason: String,
    },
}

impl Event {
    /// The `type` of a node message, if this is one.
    pub fn message_type(&self) -> Option<&str> {
        match self {
            Event::Message { message, .. } => message.get("type").and_then(Value::as_str),
            _ => None,
        }
    }

    /// The payload of a node message of type `kind`.
    pub fn payload_of(&self, kind: &str) -> Option<&Value> {
        match self {
            Event::Message { message, .. } if self.message_type() == Some(kind) => {
                message.get("payload")
            }
            _ => None,
        }
    }
}

enum Command {
    Text(String),
    Binary(Vec<u8>),
    /// Close the TCP connection at once, without a close handshake.
    Drop,
    Close(u16, String),
}

struct NodeState {
    conn: Option<u64>,
    last_heartbeat: Instant,
    online: bool,
}

#[derive(Default)]
struct State {
    events: Vec<Event>,
    conns: HashMap<u64, mpsc::UnboundedSender<Command>>,
    nodes: HashMap<String, NodeState>,
    next_conn: u64,
}

struct Inner {
    cfg: ServerConfig,
    state: Mutex<State>,
    /// The number of events, for waiters.
    count: watch::Sender<usize>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, event: Event) {
        let n = {
            let mut st = self.lock();
            st.events.push(event);
            st.events.len()
        };
        self.count.send_replace(n);
    }
}

/// A running reference control plane; dropping it stops it.
pub struct ControlPlane {
    inner: Arc<Inner>,
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for tx in self.inner.lock().conns.values() {
            let _ = tx.send(Command::Drop);
        }
    }
}

impl ControlPlane {
    /// Listens on `bind` (port 0 picks a free one).
    pub async fn start(bind: SocketAddr, cfg: ServerConfig) -> Result<Self, CpError> {
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|source| CpError::Bind { addr: bind, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| CpError::Bind { addr: bind, source })?;
        let inner = Arc::new(Inner {
            cfg,
            state: Mutex::new(State::default()),
            count: watch::channel(0).0,
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&inner)));
        let monitor = tokio::spawn(offline_monitor(Arc::clone(&inner)));
        Ok(ControlPlane {
            inner,
            addr,
            tasks: vec![accept, monitor],
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL nodes connect to.
    pub fn url(&self) -> String {
        if self.inner.cfg.tls.is_some() {
            format!("wss://localhost:{}/v1/node", self.addr.port())
        } else {
            format!("ws://{}/v1/node", self.addr)
        }
    }

    /// Everything seen so far.
    pub fn events(&self) -> Vec<Event> {
        self.inner.lock().events.clone()
    }

    /// Payloads of the messages of type `kind` that `node_id` sent, in order.
    pub fn payloads(&self, node_id: &str, kind: &str) -> Vec<Value> {
        self.inner
            .lock()
            .events
            .iter()
            .filter(|e| matches!(e, Event::Message { node_id: Some(n), .. } if n == node_id))
            .filter_map(|e| e.payload_of(kind).cloned())
            .collect()
    }

    /// True while the node has sent a heartbeat within `offline_after`.
    pub fn is_online(&self, node_id: &str) -> bool {
        self.inner
            .lock()
            .nodes
            .get(node_id)
            .is_some_and(|n| n.online)
    }

    /// Waits until `done` holds for the events, or `after` passes.
    pub async fn wait_for(
        &self,
        what: &str,
        after: Duration,
        done: impl Fn(&[Event]) -> bool,
    ) -> Result<Vec<Event>, CpError> {
        let mut rx = self.inner.count.subscribe();
        let deadline = tokio::time::Instant::now() + after;
        loop {
            // Not under the lock: `done` may call back into the control plane.
            let events = self.events();
            if done(&events) {
                return Ok(events);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let events = serde_json::to_string(&self.events()).unwrap_or_default();
                return Err(CpError::Timeout {
                    what: what.to_string(),
                    after,
                    events,
                });
            }
        }
    }

    /// Sends `{"type": kind, "payload": payload}` to the node's current connection.
    pub fn send(&self, node_id: &str, kind: &str, payload: Value) -> Result<(), CpError> {
        let text = json!({"type": kind, "payload": payload}).to_string();
        self.command(node_id, Command::Text(text))
    }

    /// Sends `deploy`.
    pub fn deploy(&self, node_id: &str, deployment_id: &str, spec: Value) -> Result<(), CpError> {
        self.send(
            node_id,
            "deploy",
            json!({"deployment_id": deployment_id, "spec": spec}),
        )
    }

    /// Sends `stop`.
    pub fn stop(&self, node_id: &str, deployment_id: &str) -> Result<(), CpError> {
        self.send(node_id, "stop", json!({"deployment_id": deployment_id}))
    }

    /// Sends any text frame, well-formed or not.
    pub fn send_text(&self, node_id: &str, text: impl Into<String>) -> Result<(), CpError> {
        self.command(node_id, Command::Text(text.into()))
    }

    /// Sends a binary frame.
    pub fn send_binary(&self, node_id: &str, bytes: Vec<u8>) -> Result<(), CpError> {
        self.command(node_id, Command::Binary(bytes))
    }

    /// Cuts the node's connection at once, as a crashed server would.
    pub fn drop_connection(&self, node_id: &str) -> Result<(), CpError> {
        self.command(node_id, Command::Drop)
    }

    fn command(&self, node_id: &str, cmd: Command) -> Result<(), CpError> {
        let st = self.inner.lock();
        let tx = st
            .nodes
            .get(node_id)
            .and_then(|n| n.conn)
            .and_then(|c| st.conns.get(&c))
            .ok_or_else(|| CpError::NotConnected(node_id.to_string()))?;
        tx.send(cmd)
            .map_err(|_| CpError::NotConnected(node_id.to_string()))
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        match listener.accept().await {
            Ok((tcp, _peer)) => {
                let inner = Arc::clone(&inner);
                tokio::spawn(async move {
                    match inner.cfg.tls.clone() {
                        None => serve(tcp, inner).await,
                        Some(tls) => match TlsAcceptor::from(tls).accept(tcp).await {
                            Ok(stream) => serve(stream, inner).await,
                            Err(e) => inner.record(Event::Refused {
                                reason: format!("TLS handshake: {e}"),
                            }),
                        },
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn offline_monitor(inner: Arc<Inner>) {
    let period = (inner.cfg.offline_after / 10).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        let mut went_offline = Vec::new();
        {
            let mut st = inner.lock();
            let State { nodes, conns, .. } = &mut *st;
            for (id, node) in nodes.iter_mut() {
                if node.online && node.last_heartbeat.elapsed() > inner.cfg.offline_after {
                    node.online = false;
                    went_offline.push(id.clone());
                    if let Some(tx) = node.conn.and_then(|c| conns.get(&c)) {
                        let _ = tx.send(Command::Close(
                            OFFLINE_CLOSE_CODE,
                            "heartbeat timeout".to_string(),
                        ));
                    }
                }
            }
        }
        for node_id in went_offline {
            inner.record(Event::Offline { node_id });
        }
    }
}

fn check_token(inner: &Inner, req: &Request) -> Result<(), String> {
    let expected = format!("Bearer {}", inner.cfg.token);
    match req.headers().get("authorization").map(|v| v.to_str()) {
        None => Err("no Authorization header".to_string()),
        Some(Ok(v)) if v == expected => Ok(()),
        Some(_) => Err("wrong token".to_string()),
    }
}

async fn serve<S>(tcp: S, inner: Arc<Inner>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let auth_inner = Arc::clone(&inner);
    // The handshake callback's signature is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        match check_token(&auth_inner, req) {
            Ok(()) => Ok(resp),
            Err(reason) => {
                auth_inner.record(Event::Refused {
                    reason: reason.clone(),
                });
                let mut err = ErrorResponse::new(Some(format!("unauthorized: {reason}")));
                *err.status_mut() = StatusCode::UNAUTHORIZED;
                Err(err)
            }
        }
    };
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(inner.cfg.max_message_bytes))
        .max_frame_size(Some(inner.cfg.max_message_bytes));
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(ws_config)).await
    else {
        return;
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = {
        let mut st = inner.lock();
        st.next_conn += 1;
        let conn = st.next_conn;
        st.conns.insert(conn, tx);
        conn
    };
    inner.record(Event::Connected { conn });
    let mut node_id = None;
    let reason = connection(ws, &inner, conn, &mut node_id, rx).await;
    {
        let mut st = inner.lock();
        st.conns.remove(&conn);
        if let Some(node) = node_id.as_ref().and_then(|n| st.nodes.get_mut(n)) {
            if node.conn == Some(conn) {
                node.conn = None;
            }
        }
    }
    inner.record(Event::Disconnected {
        conn,
        node_id,
        reason,
    });
}

/// Serves one connection until it ends; returns why.
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    inner: &Inner,
    conn: u64,
    node_id: &mut Option<String>,
    mut rx: mpsc::UnboundedReceiver<Command>,
) -> String {
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                let frame = match cmd {
                    None | Some(Command::Drop) => return "dropped by the server".to_string(),
                    Some(Command::Text(t)) => Message::text(t),
                    Some(Command::Binary(b)) => Message::binary(b),
                    Some(Command::Close(code, reason)) => {
                        let close = CloseFrame { code: CloseCode::from(code), reason: reason.clone().into() };
                        let _ = sink.send(Message::Close(Some(close))).await;
                        return format!("closed by the server: {code} {reason}");
                    }
                };
                if let Err(e) = sink.send(frame).await {
                    return format!("send failed: {e}");
                }
            }
            frame = stream.next() => {
                let text = match frame {
                    None => return "closed by the node".to_string(),
                    Some(Err(e)) => return format!("read failed: {e}"),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(f))) => return format!("closed by the node: {f:?}"),
                    Some(Ok(_)) => continue,
                };
                if let Some(reply) = on_text(inner, conn, node_id, text.as_str()) {
                    if let Err(e) = sink.send(Message::text(reply.to_string())).await {
                        return format!("send failed: {e}");
                    }
                }
            }
        }
    }
}

/// Records a node's message; returns an `error` to answer with, if any.
fn on_text(inner: &Inner, conn: u64, node_id: &mut Option<String>, text: &str) -> Option<Value> {
    let message: Value = serde_json::from_str(text).unwrap_or_else(|_| json!({ "unparsed": text }));
    let kind = message.get("type").and_then(Value::as_str).unwrap_or("");
    let payload_node = message
        .pointer("/payload/node_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut reply = None;
    {
        let mut st = inner.lock();
        match kind {
            "register" => {
                if let Some(id) = payload_node {
                    let older = st
                        .nodes
                        .get(&id)
                        .and_then(|n| n.conn)
                        .filter(|c| *c != conn);
                    if let Some(tx) = older.and_then(|c| st.conns.get(&c)) {
                        let _ = tx.send(Command::Close(
                            REPLACED_CLOSE_CODE,
                            "replaced by a newer connection".to_string(),
                        ));
                    }
                    st.nodes.insert(
                        id.clone(),
                        NodeState {
                            conn: Some(conn),
                            last_heartbeat: Instant::now(),
                            online: true,
                        },
                    );
                    *node_id = Some(id);
                }
            }
            "heartbeat" => {
                if let Some(node) = node_id.as_ref().and_then(|n| st.nodes.get_mut(n)) {
                    node.last_heartbeat = Instant::now();
                    node.online = true;
                }
            }
            "deploy_result" | "stop_result" | "status" | "error" => {}
            other => {
                reply = Some(json!({"type": "error", "payload": {
                    "code": "unknown_type",
                    "message": format!("unknown message type `{other}`"),
                }}));
            }
        }
        if node_id.is_none() && reply.is_none() {
            reply = Some(json!({"type": "error", "payload": {
                "code": "not_registered",
                "message": "send register first",
            }}));
        }
    }
    inner.record(Event::Message {
        conn,
        node_id: node_id.clone(),
        message,
    });
    reply
}

/// A rustls server configuration from PEM files: the certificate chain and its key.
pub fn tls_config(cert_pem: &Path, key_pem: &Path) -> Result<Arc<rustls::ServerConfig>, CpError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |path: &Path, reason: String| CpError::Tls {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert_pem)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(cert_pem, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| bad(key_pem, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| bad(cert_pem, e.to_string()))?;
    Ok(Arc::new(config))
}
