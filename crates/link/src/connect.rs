//! One connection attempt: the upgrade request with the bearer token, size limits, a
//! timeout, and a refused token told apart from other failures.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::config::LinkConfig;

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connecting to {url}")]
    Ws {
        url: String,
        #[source]
        source: tungstenite::Error,
    },
    #[error("the control plane at {url} refused this node (HTTP {status}): check [link] node_token and node_id")]
    Refused { url: String, status: StatusCode },
    #[error("connecting to {url} took longer than {after:?} ([link] connect_timeout_ms)")]
    Timeout { url: String, after: Duration },
}

pub(crate) async fn connect(
    cfg: &LinkConfig,
    connector: Option<Connector>,
) -> Result<Ws, ConnectError> {
    let url = cfg.url.clone();
    let ws_err = |source| ConnectError::Ws {
        url: url.clone(),
        source,
    };
    let mut request = cfg.url.as_str().into_client_request().map_err(ws_err)?;
    let bearer = HeaderValue::from_str(&format!("Bearer {}", cfg.node_token))
        .map_err(|e| ws_err(tungstenite::Error::HttpFormat(e.into())))?;
    request.headers_mut().insert("authorization", bearer);
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(cfg.max_message_bytes))
        .max_frame_size(Some(cfg.max_message_bytes));
    let attempt =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(ws_config), true, connector);
    match tokio::time::timeout(cfg.connect_timeout(), attempt).await {
        Err(_) => Err(ConnectError::Timeout {
            url,
            after: cfg.connect_timeout(),
        }),
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(response)))
            if matches!(
                response.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ) =>
        {
            Err(ConnectError::Refused {
                url,
                status: response.status(),
            })
        }
        Ok(Err(e)) => Err(ws_err(e)),
    }
}
