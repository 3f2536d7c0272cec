//! The HTTP API (axum): thin handlers over [`Service`]. Every error is an [`ApiError`]
//! JSON body with a 4xx or 5xx status. docs/openapi.json describes it, and is served at
//! `/v1/openapi.json`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::Stream;
use gpucell_api::{ApiError, MAX_BODY_BYTES};
use serde::Deserialize;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::logs;
use crate::service::{Service, ServiceError};

/// The OpenAPI document, the same bytes as docs/openapi.json.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

type Shared = Arc<Service>;

pub fn router(service: Shared) -> Router {
    Router::new()
        .route("/v1/sandboxes", get(list).post(deploy))
        .route("/v1/sandboxes/{id}", get(status).delete(stop))
        .route("/v1/sandboxes/{id}/logs", get(logs_handler))
        .route("/v1/events", get(events))
        .route("/v1/node", get(node))
        .route("/v1/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(404, ApiError::new("no such endpoint; see /v1/openapi.json")) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(service)
}

fn error(status: u16, body: ApiError) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

fn service_error(e: ServiceError) -> Response {
    if e.status() >= 500 {
        tracing::error!("{}", gpucell_common::chain_string(&e));
    }
    error(e.status(), e.body())
}

/// Runs a blocking service call (the store writes with fsync) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(service_error),
        Err(e) => Err(error(500, ApiError::new(format!("internal error: {e}")))),
    }
}

async fn deploy(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                e.status().as_u16(),
                ApiError::field("body", format!("{e} (the limit is {MAX_BODY_BYTES} bytes)")),
            )
        }
    };
    match blocking(move || s.deploy_bytes(&body)).await {
        Ok((created, status)) => {
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (code, Json(status)).into_response()
        }
        Err(r) => r,
    }
}

async fn list(State(s): State<Shared>) -> Response {
    Json(s.list()).into_response()
}

async fn status(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match s.get(&id) {
        Ok(st) => Json(st).into_response(),
        Err(e) => service_error(e),
    }
}

#[derive(Deserialize)]
struct StopQuery {
    #[serde(default)]
    remove: Option<u8>,
}

async fn stop(
    State(s): State<Shared>,
    Path(id): Path<String>,
    q: Result<Query<StopQuery>, QueryRejection>,
) -> Response {
    let remove = match q {
        Ok(Query(q)) => q.remove.unwrap_or(0) != 0,
        Err(e) => return error(400, ApiError::field("remove", e.body_text())),
    };
    match blocking(move || s.stop(&id, remove)).await {
        Ok(Some(st)) => (StatusCode::ACCEPTED, Json(st)).into_response(),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    follow: Option<u8>,
    #[serde(default)]
    tail: Option<usize>,
}

async fn logs_handler(
    State(s): State<Shared>,
    Path(id): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return error(400, ApiError::field("follow/tail", e.body_text())),
    };
    if let Err(e) = s.get(&id) {
        return service_error(e);
    }
    let dir = s.sandbox_dir(&id);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let follow = q.follow.unwrap_or(0) != 0;
    tokio::spawn(async move {
        let _ = stream_logs(s, id, dir, q.tail, follow, tx).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap_or_else(|e| error(500, ApiError::new(e.to_string())))
}

fn encode(lines: &[gpucell_api::LogLine]) -> Bytes {
    let mut out = Vec::new();
    for l in lines {
        if serde_json::to_writer(&mut out, l).is_ok() {
            out.push(b'\n');
        }
    }
    Bytes::from(out)
}

/// Sends the tail, then (following) new lines until the sandbox has ended and nothing
/// more comes, or the client goes away.
async fn stream_logs(
    s: Shared,
    id: String,
    dir: std::path::PathBuf,
    tail: Option<usize>,
    follow: bool,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>,
) -> Result<(), ()> {
    let d = dir.clone();
    let (lines, mut offset) = tokio::task::spawn_blocking(move || logs::tail(&d, tail))
        .await
        .map_err(|_| ())?
        .map_err(|_| ())?;
    tx.send(Ok(encode(&lines))).await.map_err(|_| ())?;
    if !follow {
        return Ok(());
    }
    loop {
        let ended = s.get(&id).map(|st| st.state.is_terminal()).unwrap_or(true);
        let d = dir.clone();
        let (lines, next) = tokio::task::spawn_blocking(move || logs::read_from(&d, offset))
            .await
            .map_err(|_| ())?
            .map_err(|_| ())?;
        offset = next;
        if !lines.is_empty() {
            tx.send(Ok(encode(&lines))).await.map_err(|_| ())?;
        } else if ended {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tx.closed() => return Err(()),
        }
    }
}

async fn events(State(s): State<Shared>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = tokio_stream::wrappers::BroadcastStream::new(s.subscribe());
    let stream = rx.filter_map(|e| {
        let e = e.ok()?;
        Some(Ok(Event::default()
            .event("state")
            .data(serde_json::to_string(&e).unwrap_or_default())))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn node(State(s): State<Shared>) -> Response {
    match tokio::task::spawn_blocking(move || s.inventory()).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(500, ApiError::new(e.to_string())),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Refuses a request without `Authorization: Bearer <token>` (the TCP listener's guard).
pub async fn bearer(
    State(token): State<Arc<String>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        next.run(request).await
    } else {
        error(
            401,
            ApiError::field(
                "authorization",
                "a valid `Authorization: Bearer <token>` header is required",
            ),
        )
    }
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(s): State<Shared>) -> Response {
    if s.is_ready() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "reconciling\n").into_response()
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    let s2 = s.clone();
    // The GPU gauges are read at scrape time.
    let _ = tokio::task::spawn_blocking(move || s2.inventory()).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}
