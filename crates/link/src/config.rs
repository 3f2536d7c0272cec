//! `[link]` in /etc/gpucell/config.toml: where the control plane is and how to talk to it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors in a `[link]` section.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("[link] url `{url}`: {reason}")]
    Url { url: String, reason: String },
    #[error("[link] {field}: {reason}")]
    Field { field: &'static str, reason: String },
}

/// The control-plane link's configuration.
///
/// The token is sent as `Authorization: Bearer <node_token>` and never printed: `Debug`
/// shows it as `<redacted>` and serializing leaves it out.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// `wss://host[:port]/path` (TLS with rustls), or `ws://` for tests and trusted networks.
    pub url: String,
    /// The secret this node authenticates with. Never serialized: a configuration printed
    /// back shows every other key.
    #[serde(skip_serializing)]
    pub node_token: String,
    /// The id the node registers under.
    pub node_id: String,
    /// Interval between heartbeats (the control plane marks a node offline after 60 s without one).
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// First reconnect delay; it doubles after each failed attempt.
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Largest reconnect delay.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// How long one connection attempt (TCP, TLS and the WebSocket handshake) may take.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Largest message accepted from the control plane.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// PEM file of extra CA certificates for `wss://` (a private control plane); the
    /// system's roots are trusted as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_heartbeat_ms() -> u64 {
    30_000
}
fn default_backoff_min_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_max_message_bytes() -> usize {
    1 << 20
}

/// The smallest accepted `max_message_bytes`: room for any message the node must read.
pub const MIN_MESSAGE_BYTES: usize = 4096;
/// The largest accepted `max_message_bytes`.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

impl fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkConfig")
            .field("url", &self.url)
            .field("node_token", &"<redacted>")
            .field("node_id", &self.node_id)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("backoff_min_ms", &self.backoff_min_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl LinkConfig {
    /// A configuration with the defaults for everything but the three required fields.
    pub fn new(
        url: impl Into<String>,
        node_token: impl Into<String>,
        node_id: impl Into<String>,
    ) -> Self {
        LinkConfig {
            url: url.into(),
            node_token: node_token.into(),
            node_id: node_id.into(),
            heartbeat_ms: default_heartbeat_ms(),
            backoff_min_ms: default_backoff_min_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            max_message_bytes: default_max_message_bytes(),
            ca_file: None,
        }
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn backoff_min(&self) -> Duration {
        Duration::from_millis(self.backoff_min_ms)
    }
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// True for `wss://` URLs.
    pub fn is_tls(&self) -> bool {
        self.url.starts_with("wss://")
    }

    /// Checks every field; the error names the field and what to put there.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url_err = |reason: &str| ConfigError::Url {
            url: self.url.clone(),
            reason: reason.to_string(),
        };
        let rest = self
            .url
            .strip_prefix("wss://")
            .or_else(|| self.url.strip_prefix("ws://"))
            .ok_or_else(|| url_err("must start with wss:// (or ws:// for tests)"))?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty() {
            return Err(url_err("has no host"));
        }
        if host.contains('@') {
            return Err(url_err(
                "must not hold credentials: put the secret in node_token",
            ));
        }
        if self
            .url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(url_err("holds whitespace or control characters"));
        }
        let field = |field: &'static str, reason: &str| ConfigError::Field {
            field,
            reason: reason.to_string(),
        };
        if self.node_token.is_empty() {
            return Err(field(
                "node_token",
                "is empty: set the token the control plane issued for this node",
            ));
        }
        if !self.node_token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(field(
                "node_token",
                "must be printable ASCII without spaces",
            ));
        }
        crate::protocol::validate_deployment_id(&self.node_id).map_err(|_| {
            field(
                "node_id",
                "must be 1 to 64 characters of A-Z, a-z, 0-9 and . _ -, not starting with . or -",
            )
        })?;
        if self.heartbeat_ms < 10 || self.heartbeat_ms > 600_000 {
            return Err(field(
                "heartbeat_ms",
                "must be between 10 and 600000 (the protocol's default is 30000)",
            ));
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            return Err(field(
                "backoff_min_ms",
                "must be at least 1 and at most backoff_max_ms",
            ));
        }
        if self.backoff_max_ms > 3_600_000 {
            return Err(field(
                "backoff_max_ms",
                "must be at most 3600000 (one hour)",
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err(field("connect_timeout_ms", "must be at least 1"));
        }
        if !(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&self.max_message_bytes) {
            return Err(field(
                "max_message_bytes",
                "must be between 4096 and 67108864",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> LinkConfig {
        LinkConfig::new("wss://cp.example.com/v1/node", "s3cret-token", "node-1")
    }

    #[test]
    fn defaults_follow_the_protocol() {
        let c = good();
        assert_eq!(c.heartbeat(), Duration::from_secs(30));
        assert!(c.validate().is_ok());
        assert!(c.is_tls());
    }

    #[test]
    fn debug_never_shows_the_token() {
        let text = format!("{:?}", good());
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("<redacted>"));
        let json = serde_json::to_string(&good()).unwrap();
        assert!(!json.contains("s3cret"), "{json}");
        assert!(json.contains("node-1"), "{json}");
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: Vec<(LinkConfig, &str)> = vec![
            (
                LinkConfig {
                    url: "http://x".into(),
                    ..good()
                },
                "url",
            ),
            (
                LinkConfig {
                    url: "ws://".into(),
                    ..good()
                },
                "url",
            ),
            (
                LinkConfig {
                    url: "wss://user:pw@x/".into(),
                    ..good()
                },
                "url",
            ),
            (
                LinkConfig {
                    url: "wss://x/ a".into(),
                    ..good()
                },
                "url",
            ),
            (
                LinkConfig {
                    node_token: String::new(),
                    ..good()
                },
                "node_token",
            ),
            (
                LinkConfig {
                    node_token: "a b".into(),
                    ..good()
                },
                "node_token",
            ),
            (
                LinkConfig {
                    node_id: "../n".into(),
                    ..good()
                },
                "node_id",
            ),
            (
                LinkConfig {
                    heartbeat_ms: 0,
                    ..good()
                },
                "heartbeat_ms",
            ),
            (
                LinkConfig {
                    backoff_min_ms: 0,
                    ..good()
                },
                "backoff_min_ms",
            ),
            (
                LinkConfig {
                    backoff_min_ms: 90_000,
                    ..good()
                },
                "backoff_min_ms",
            ),
            (
                LinkConfig {
                    backoff_max_ms: 4_000_000,
                    backoff_min_ms: 1,
                    ..good()
                },
                "backoff_max_ms",
            ),
            (
                LinkConfig {
                    connect_timeout_ms: 0,
                    ..good()
                },
                "connect_timeout_ms",
            ),
            (
                LinkConfig {
                    max_message_bytes: 10,
                    ..good()
                },
                "max_message_bytes",
            ),
        ];
        for (cfg, field) in cases {
            let err = cfg
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(field), "{cfg:?}: `{err}` should name {field}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }
}
