//! gpucell's node daemon (`gpucelld`, docs/daemon.md): the HTTP API over a unix socket,
//! one supervisor process per sandbox, an SQLite store written before acting, and the
//! reconciliation that adopts what a previous daemon left running.
//!
//! The control-plane link (`link`, gpucell-link) and other front ends call [`service::Service`]: `deploy_value`,
//! `stop`, `inventory`, `states`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod health;
pub mod http;
pub mod inventory;
pub mod launcher;
pub mod link;
pub mod logs;
pub mod metrics;
pub mod reconcile;
pub mod serve;
pub mod service;
pub mod store;
pub mod supervise;
pub mod tls;
pub mod validate;

pub use service::{Service, ServiceError, Settings};
#[cfg(test)]
mod service_tests;
