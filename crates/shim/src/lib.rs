//! `containerd-shim-gpucell-v1`: a containerd runtime v2 shim (task API v2, built on the
//! `containerd-shim` crate 0.11) that runs each task in a gpucell microVM through the run
//! core. One shim process serves a pod (the tasks of one CRI sandbox, or the single task
//! of a `ctr run`) and owns its QEMU processes, so containerd may restart meanwhile.
//! See docs/shim.md.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod bundle;
pub mod devices;
pub mod events;
pub mod launcher;
pub mod pod;
pub mod pod_resources;
pub mod service;
pub mod stdio;
pub mod task;
pub mod volumes;

pub use service::{GpucellShim, RUNTIME_ID};
pub use task::TaskService;
