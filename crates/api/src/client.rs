//! A small client of the daemon's API over its unix socket (hyper, one connection a
//! request). Async; a synchronous caller runs it on a current-thread tokio runtime.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::{ApiError, DeployRequest, LogLine, SandboxList, SandboxStatus};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the gpucell daemon at {path:?}; is gpucelld running (systemctl status gpucelld), and may you use its socket?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the gpucell daemon at {path:?}")]
    Http {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("building the request to {uri}")]
    Request {
        uri: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("the daemon answered {status}: {error}")]
    Api { status: u16, error: ApiError },
    #[error("the daemon's answer to {uri} is not the expected JSON")]
    Decode {
        uri: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The API error, when the daemon answered with one.
    pub fn api(&self) -> Option<(u16, &ApiError)> {
        match self {
            ClientError::Api { status, error } => Some((*status, error)),
            _ => None,
        }
    }
}

/// The daemon at a unix socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; the raw response (status and streaming body).
    pub async fn send(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.http(e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "gpucell");
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|source| ClientError::Request {
                uri: uri.to_string(),
                source,
            })?;
        sender.send_request(request).await.map_err(|e| self.http(e))
    }

    fn http(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            path: self.socket.clone(),
            source,
        }
    }

    /// A request whose answer is JSON of type `T`; an error status becomes
    /// [`ClientError::Api`].
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let response = self.send(method, uri, body).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.http(e))?
            .to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            uri: uri.to_string(),
            source,
        })
    }

    pub async fn deploy(&self, request: &DeployRequest) -> Result<SandboxStatus, ClientError> {
        let body = serde_json::to_vec(request).map_err(|source| ClientError::Decode {
            uri: "/v1/sandboxes".into(),
            source,
        })?;
        self.json(Method::POST, "/v1/sandboxes", Some(body)).await
    }

    pub async fn list(&self) -> Result<SandboxList, ClientError> {
        self.json(Method::GET, "/v1/sandboxes", None).await
    }

    pub async fn get(&self, id: &str) -> Result<SandboxStatus, ClientError> {
        self.json(Method::GET, &format!("/v1/sandboxes/{}", encode(id)), None)
            .await
    }

    /// Asks for a stop; the answer is the sandbox as it is then (usually `stopping`).
    pub async fn stop(&self, id: &str) -> Result<SandboxStatus, ClientError> {
        self.json(
            Method::DELETE,
            &format!("/v1/sandboxes/{}", encode(id)),
            None,
        )
        .await
    }

    pub async fn node(&self) -> Result<serde_json::Value, ClientError> {
        self.json(Method::GET, "/v1/node", None).await
    }

    /// Streams a sandbox's log lines to `each` (the last `tail`, then, with `follow`,
    /// new ones until the sandbox has ended); returns when the stream ends.
    pub async fn logs(
        &self,
        id: &str,
        tail: Option<usize>,
        follow: bool,
        mut each: impl FnMut(LogLine),
    ) -> Result<(), ClientError> {
        let mut uri = format!(
            "/v1/sandboxes/{}/logs?follow={}",
            encode(id),
            u8::from(follow)
        );
        if let Some(n) = tail {
            uri.push_str(&format!("&tail={n}"));
        }
        let response = self.send(Method::GET, &uri, None).await?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = body.collect().await.map_err(|e| self.http(e))?.to_bytes();
            return Err(api_error(status, &bytes));
        }
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.http(e))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let line = serde_json::from_slice(&line).map_err(|source| ClientError::Decode {
                    uri: uri.clone(),
                    source,
                })?;
                each(line);
            }
        }
        Ok(())
    }
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let error = serde_json::from_slice(body).unwrap_or_else(|_| {
        ApiError::new(String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned())
    });
    ClientError::Api {
        status: status.as_u16(),
        error,
    }
}

/// Percent-encodes what is not an id character, so a hostile id cannot change the path.
fn encode(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_encoded() {
        assert_eq!(super::encode("a/../b c"), "a%2F..%2Fb%20c");
    }
}
