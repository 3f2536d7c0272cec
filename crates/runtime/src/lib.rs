//! The run core of gpucell: one typed contract for a run, shared by every front end
//! (the `gpucell` CLI, the node daemon, the containerd shim).
//!
//! ```text
//! RunRequest ──validate──► image ─► guest ─► accelerator ─► devices ─► sandbox ─► release
//!                                                                          │
//!                                   Observer (phases, warnings) ◄──────────┤
//!                                   SessionIo (stdout, stderr, stdin) ◄────┘
//!                                                                          ▼
//!                                                                      RunReport
//! ```
//!
//! - [`request`]: [`RunRequest`], validated once with errors that name the field.
//! - [`report`]: [`RunReport`], which *is* `gpucell run --json`'s document, and
//!   [`DryRunReport`].
//! - [`run()`]: a run; [`dry_run()`]: everything up to the point of no return.
//! - [`config`]: `/etc/gpucell/config.toml`; [`node`]: what a run knows of its node.
//! - [`fsck`]: the state directory checked and repaired (`gpucell fsck`).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod devices;
pub mod driver;
pub mod driver_select;
pub mod dry_run;
pub mod exec;
pub mod fsck;
pub mod network;
pub mod node;
pub mod observer;
pub mod pod;
pub mod report;
pub mod request;
pub mod rootfs;
pub mod run;

pub use config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
pub use dry_run::dry_run;
pub use exec::{exec_in, ExecError, ExecHandle, ProcIo};
pub use node::Node;
pub use observer::{Observer, Phase, Quiet};
pub use pod::{add_container, AddError, AddedContainer};
pub use report::{DryRunReport, RunReport, RUN_REPORT_SCHEMA};
pub use request::{AccelRequest, DeviceSpec, RequestError, RunRequest};
pub use rootfs::{RootfsError, RootfsSource};
pub use run::{run, run_since, run_with_rootfs, EXIT_RUN_FAILED, EXIT_TIMEOUT};

/// Why a run (or a dry run) failed. The message of each variant names what failed; the
/// cause follows as its source.
#[derive(Debug, thiserror::Error)]
pub enum RunFailure {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    RunId(gpucell_sandbox::rundir::RunDirError),
    #[error("opening the image store")]
    StoreOpen(#[source] Box<gpucell_image::Error>),
    #[error("getting image {reference}")]
    Image {
        reference: String,
        #[source]
        source: Box<gpucell_image::Error>,
    },
    #[error("building the guest disk of {reference}")]
    Disk {
        reference: String,
        #[source]
        source: Box<gpucell_image::Error>,
    },
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    #[error(transparent)]
    Guest(#[from] gpucell_guest::Error),
    #[error(transparent)]
    Accel(#[from] gpucell_sandbox::accel::AccelError),
    #[error("allocating the requested devices")]
    Devices(#[source] gpucell_host::devices::DevicesError),
    #[error(transparent)]
    Spec(#[from] gpucell_sandbox::spec::SpecError),
    #[error(transparent)]
    SandboxSetup(gpucell_sandbox::SandboxError),
    #[error(transparent)]
    Sandbox(Box<gpucell_sandbox::RunError>),
    #[error("the sandbox network")]
    Network(#[source] gpucell_net::NetError),
    #[error(transparent)]
    NetworkRequest(gpucell_net::spec::SpecError),
    #[error("attaching the VM to the pod's network")]
    PodNetwork(#[source] gpucell_net::pod::PodError),
    #[error("reading gpucell's driver table")]
    DriverTable(#[source] gpucell_guest::driver::TableError),
    #[error("choosing the guest driver")]
    Driver(#[source] driver::ChoiceError),
    #[error("the devices taken ({taken}) are not the ones the driver was chosen for ({planned}): another run took one in between; run again")]
    Changed { planned: String, taken: String },
}

/// An error and each of its causes, `: `-separated, each said once.
pub use gpucell_common::chain_string as error_chain;
