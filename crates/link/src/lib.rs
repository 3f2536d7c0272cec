//! gpucell's link from a node to a control plane: one outbound WebSocket that registers
//! the node, sends heartbeats with the sandboxes' states, and answers `deploy` and `stop`
//! through the daemon's [`NodeOps`]. The protocol is in docs/control-plane.md.
//!
//! ```ignore
//! let link = tokio::spawn(gpucell_link::run(cfg, ops, async move { token.cancelled().await }));
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod backoff;
pub mod config;
mod connect;
pub mod deployments;
mod link;
pub mod ops;
pub mod protocol;
pub mod tls;

pub use config::{ConfigError, LinkConfig};
pub use link::{run, run_with_state, LinkError, LinkState};
pub use ops::{json_updates, LinkOpError, NodeOps};
pub use protocol::{NodeMessage, ServerMessage};
