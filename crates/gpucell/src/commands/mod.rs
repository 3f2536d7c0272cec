//! One module per verb. Each exposes its clap arguments and a
//! `run(&Global, Args) -> anyhow::Result<u8>` returning the process exit code.

use std::path::PathBuf;

pub mod daemon;
pub mod device_plugin;
pub mod doctor;
pub mod envconfig;
pub mod fsck;
pub mod gpu;
pub mod guest;
pub mod host;
pub mod image;
pub mod kata;
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
    /// Configuration file (unknown keys are refused; see docs/config.md). Default:
    /// /etc/gpucell/config.toml when it exists.
    #[arg(long, global = true, env = "GPUCELL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (-v info, -vv debug, -vvv trace); `RUST_LOG` overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Global {
    /// The node as the run core sees it: the host and state roots, the configuration
    /// file, and the image settings of `GPUCELL_*` variables over the file's.
    pub fn node(&self, qemu: Option<&std::path::Path>) -> anyhow::Result<gpucell_runtime::Node> {
        let config = self.config()?;
        let mut node = gpucell_runtime::Node::new(&self.host_root, &self.state_dir, qemu, &config);
        if let Some(t) = kvm_probe_timeout_env()? {
            node.kvm_probe_timeout = Some(t);
        }
        node.store = envconfig::store_options(config.image)?;
        Ok(node)
    }

    /// The KVM boot probe's time limit: `GPUCELL_KVM_PROBE_TIMEOUT` seconds when set,
    /// else the configuration file's `run.kvm_probe_timeout_ms`, else the probe's default.
    pub fn kvm_probe_timeout(&self) -> anyhow::Result<std::time::Duration> {
        Ok(match kvm_probe_timeout_env()? {
            Some(t) => t,
            None => self
                .config()?
                .kvm_probe_timeout()
                .unwrap_or(gpucell_sandbox::accel::DEFAULT_PROBE_TIMEOUT),
        })
    }

    /// The configuration file: the one named by `--config` (which must exist), else
    /// /etc/gpucell/config.toml under the host root when it exists, else the defaults.
    pub fn config(&self) -> anyhow::Result<gpucell_runtime::Config> {
        let config = match &self.config {
            Some(p) => gpucell_runtime::Config::load(p, true)?,
            None => {
                let default = self
                    .host_root
                    .join(gpucell_runtime::DEFAULT_CONFIG_PATH.trim_start_matches('/'));
                gpucell_runtime::Config::load(&default, false)?
            }
        };
        Ok(config)
    }
}

/// `GPUCELL_KVM_PROBE_TIMEOUT` (seconds, 1 to 600) when set; any other value is an error
/// naming the variable.
fn kvm_probe_timeout_env() -> anyhow::Result<Option<std::time::Duration>> {
    use gpucell_sandbox::accel::{parse_probe_timeout, PROBE_TIMEOUT_ENV};
    match std::env::var(PROBE_TIMEOUT_ENV) {
        Ok(v) => match parse_probe_timeout(&v) {
            Some(t) => Ok(Some(t)),
            None => anyhow::bail!(
                "environment variable {PROBE_TIMEOUT_ENV}: {v:?} is not a number of seconds between 1 and 600; fix or unset it"
            ),
        },
        Err(_) => Ok(None),
    }
}

pub fn init_logging(global: &Global) {
    use tracing_subscriber::EnvFilter;
    let default = match global.verbose {
        // netlink-packet-route warns about every kernel attribute newer than itself.
        0 => "warn,netlink_packet_route=error",
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
    eprintln!("error: {}", gpucell_common::chain_string(err.as_ref()));
}

/// Opens the image store with the options from the environment ([`envconfig`]),
/// `adjust`ed by the command's own flags.
pub fn open_store(
    global: &Global,
    adjust: impl FnOnce(&mut gpucell_image::StoreOptions),
) -> anyhow::Result<gpucell_image::Store> {
    use anyhow::Context;
    let mut options = envconfig::store_options(global.config()?.image)?;
    adjust(&mut options);
    gpucell_image::Store::open_with(&global.state_dir, options)
        .with_context(|| format!("opening the image store in {}", global.state_dir.display()))
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
