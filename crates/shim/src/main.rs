//! containerd starts this binary as `containerd-shim-gpucell-v1` (runtime
//! `io.containerd.gpucell.v1`): `start` spawns the pod's server and prints its address,
//! `delete` cleans up after a lost server, and the server itself serves the task API.

use std::fs::OpenOptions;
use std::sync::Mutex;

use containerd_shim::Config;
use gpucell_shim::{GpucellShim, RUNTIME_ID};

/// The server logs to the bundle's `log` FIFO, which containerd reads into its own log.
fn init_logging() {
    let is_server = std::env::args().any(|a| a == "-socket");
    if !is_server {
        return;
    }
    let Ok(log) = OpenOptions::new().read(true).write(true).open("log") else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GPUCELL_SHIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(log))
        .init();
}

#[tokio::main]
async fn main() {
    init_logging();
    let config = Config {
        // Logging is ours (tracing), to the same FIFO.
        no_setup_logger: true,
        default_log_level: "info".into(),
        // The run core waits for its own QEMU processes: a reaper would take their exit.
        no_reaper: true,
        no_sub_reaper: true,
    };
    containerd_shim::asynchronous::run::<GpucellShim>(RUNTIME_ID, Some(config)).await;
}
