//! gpucell's Kubernetes device plugin (API v1beta1): the node's GPUs as extended
//! resources, one per model (`gpucell.io/H200`), for pods that run in gpucell microVMs.
//!
//! - [`resources`]: discovery, naming (GPU database, overrides), device IDs (= CDI device
//!   names), health (quarantine and passthrough state from the allocator's records);
//! - [`prefer`]: GetPreferredAllocation (same NUMA node, then same NVLink clique);
//! - [`cdi`]: the host CDI spec written atomically under `/var/run/cdi`;
//! - [`service`]: the `DevicePlugin` gRPC service of one resource;
//! - [`runner`]: serving, registering with the kubelet, re-registering when it restarts.
//!
//! The API is generated at build time from the vendored `proto/api.proto` (kubelet
//! v0.32.7, gogoproto options removed) by tonic; protox parses it, so no `protoc` is needed.

pub mod api {
    //! Generated from `proto/api.proto` (package `v1beta1`).
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("v1beta1");
}
pub mod cdi;
pub mod prefer;
pub mod resources;
pub mod runner;
pub mod service;

pub use resources::{discover, Health, Naming, PluginDevice, Resource, ResourceError};
pub use runner::{register, run, PluginConfig, PluginError};
