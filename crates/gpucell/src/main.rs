//! The `gpucell` command line. Thin: each verb in `commands/` parses its
//! arguments, calls the libraries, and prints.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;

use commands::Global;

#[derive(Parser, Debug)]
#[command(
    name = "gpucell",
    version,
    about = "Run OCI images in microVMs with whole GPUs passed through by VFIO"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check whether this host can run GPU sandboxes, and say how to fix what is missing.
    Doctor(commands::doctor::DoctorArgs),
    /// List, bind, unbind and release GPUs and other PCI functions.
    #[command(subcommand)]
    Gpu(commands::gpu::GpuCommand),
    /// Plan and apply the boot configuration (kernel command line, modules, vfio-pci binding).
    #[command(subcommand)]
    Host(commands::host::HostCommand),
    /// Pull or import an image into the store.
    Pull(commands::pull::PullArgs),
    /// Manage stored images.
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// Build and inspect guest artifacts (kernel and init image).
    #[command(subcommand)]
    Guest(commands::guest::GuestCommand),
    /// Run a command from an image inside its own microVM.
    Run(Box<commands::run::RunArgs>),
    /// Export a guest flavour for Kata Containers (QEMU configuration and RuntimeClass).
    #[command(subcommand)]
    Kata(commands::kata::KataCommand),
    /// Run the Kubernetes device plugin (gpucell-device-plugin) with these arguments.
    DevicePlugin(commands::device_plugin::DevicePluginArgs),
    /// Deploy a sandbox to the node daemon (gpucelld); it runs in the background.
    Deploy(Box<commands::daemon::DeployArgs>),
    /// List the node daemon's sandboxes.
    Ps(commands::daemon::PsArgs),
    /// Print a daemon sandbox's output.
    Logs(commands::daemon::LogsArgs),
    /// Stop a daemon sandbox (SIGTERM, then SIGKILL after its grace period).
    Stop(commands::daemon::StopArgs),
    /// Check the state directory's files; `--repair` removes or rebuilds what is safe.
    Fsck(commands::fsck::FsckArgs),
}

/// The process's first instant, for the run report's `spawn` phase.
pub(crate) static PROCESS_START: std::sync::OnceLock<std::time::Instant> =
    std::sync::OnceLock::new();

fn main() -> ExitCode {
    PROCESS_START.get_or_init(std::time::Instant::now);
    let cli = Cli::parse();
    commands::init_logging(&cli.global);
    let result = match cli.command {
        Command::Doctor(a) => commands::doctor::run(&cli.global, a),
        Command::Gpu(c) => commands::gpu::run(&cli.global, c),
        Command::Host(c) => commands::host::run(&cli.global, c),
        Command::Pull(a) => commands::pull::run(&cli.global, a),
        Command::Image(c) => commands::image::run(&cli.global, c),
        Command::Guest(c) => commands::guest::run(&cli.global, c),
        Command::Run(a) => commands::run::run(&cli.global, *a),
        Command::Kata(c) => commands::kata::run(&cli.global, c),
        Command::DevicePlugin(a) => commands::device_plugin::run(&cli.global, a),
        Command::Deploy(a) => commands::daemon::deploy(&cli.global, *a),
        Command::Ps(a) => commands::daemon::ps(&cli.global, a),
        Command::Logs(a) => commands::daemon::logs(&cli.global, a),
        Command::Stop(a) => commands::daemon::stop(&cli.global, a),
        Command::Fsck(a) => commands::fsck::run(&cli.global, a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            commands::print_error_chain(&err);
            ExitCode::from(commands::EXIT_GPUCELL_FAILED)
        }
    }
}
