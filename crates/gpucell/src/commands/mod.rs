//! One module per verb. Each exposes its clap arguments and a
//! `run(&Global, Args) -> anyhow::Result<u8>` returning the process exit code.

use std::path::PathBuf;

pub mod doctor;
pub mod gpu;
pub mod guest;
pub mod host;
pub mod image;
pub mod pull;
pub mod run;

/// Exit code when gpucell itself failed (as opposed to a workload or a check).
pub const EXIT_GPUCELL_FAILED: u8 = 2;

/// Flags every command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// Root under which every sysfs, procfs and /etc path of the host is read.
    #[arg(long, global = true, default_value = "/", env = "GPUCELL_HOST_ROOT")]
    pub host_root: PathBuf,
    /// Where gpucell keeps images, guest artifacts and allocation records.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/gpucell",
        env = "GPUCELL_STATE_DIR"
    )]
    pub state_dir: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (-v info, -vv debug, -vvv trace); `RUST_LOG` overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The KVM boot probe's time limit: `GPUCELL_KVM_PROBE_TIMEOUT` seconds when set (1 to
/// 600), with a warning and the default for anything else.
pub fn kvm_probe_timeout() -> std::time::Duration {
    use gpucell_sandbox::accel::{parse_probe_timeout, DEFAULT_PROBE_TIMEOUT, PROBE_TIMEOUT_ENV};
    match std::env::var(PROBE_TIMEOUT_ENV) {
        Ok(v) => parse_probe_timeout(&v).unwrap_or_else(|| {
            tracing::warn!(
                "{PROBE_TIMEOUT_ENV}={v:?} is not a number of seconds between 1 and 600; using {}s",
                DEFAULT_PROBE_TIMEOUT.as_secs()
            );
            DEFAULT_PROBE_TIMEOUT
        }),
        Err(_) => DEFAULT_PROBE_TIMEOUT,
    }
}

pub fn init_logging(global: &Global) {
    use tracing_subscriber::EnvFilter;
    let default = match global.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Prints an error and each of its causes once: `error: a: b: c`.
pub fn print_error_chain(err: &anyhow::Error) {
    let mut msg = String::from("error: ");
    let mut first = true;
    for cause in err.chain() {
        if !first {
            msg.push_str(": ");
        }
        msg.push_str(&cause.to_string());
        first = false;
    }
    eprintln!("{msg}");
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    write_stdout(&(serde_json::to_string_pretty(value)? + "\n"))
}

/// Writes to stdout; a closed pipe (`gpucell gpu list | head`) is not an error.
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}
