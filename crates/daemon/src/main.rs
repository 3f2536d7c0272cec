//! `gpucelld`: gpucell's node daemon (docs/daemon.md). `gpucelld serve` runs the HTTP
//! API on a unix socket; the hidden `gpucelld supervise` is the per-sandbox supervisor
//! the daemon starts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gpucell_daemon::serve::{self, ServeOptions};

#[derive(Parser, Debug)]
#[command(name = "gpucelld", version, about = "gpucell's node daemon")]
struct Cli {
    /// Root under which every sysfs, procfs and /etc path of the host is read.
    #[arg(long, global = true, default_value = "/", env = "GPUCELL_HOST_ROOT")]
    host_root: PathBuf,
    /// Where gpucell keeps images, guests, allocation records and the daemon's state.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/gpucell",
        env = "GPUCELL_STATE_DIR"
    )]
    state_dir: PathBuf,
    /// Configuration file (default: /etc/gpucell/config.toml when it exists).
    #[arg(long, global = true, env = "GPUCELL_CONFIG")]
    config: Option<PathBuf>,
    /// QEMU binary (default: the configuration file's `run.qemu`, else qemu-system-x86_64).
    #[arg(long, global = true, env = "GPUCELL_QEMU")]
    qemu: Option<PathBuf>,
    /// Largest size of a sandbox's log file before it is rotated (bytes).
    #[arg(long, global = true, default_value_t = gpucell_daemon::logs::DEFAULT_MAX_BYTES)]
    log_max_bytes: u64,
    /// More log output (-v info, -vv debug); `RUST_LOG` overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the API and supervise the sandboxes.
    Serve(ServeArgs),
    /// Run one sandbox (started by the daemon; not for direct use).
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// The unix socket to listen on.
    #[arg(long, default_value = gpucell_api::DEFAULT_SOCKET, env = "GPUCELL_SOCKET")]
    socket: PathBuf,
    /// Group that may use the socket (mode 0660); default: the daemon's own group.
    #[arg(long)]
    socket_group: Option<String>,
    /// Also listen on this TCP address (e.g. 0.0.0.0:7070); needs --token-file.
    #[arg(long, value_name = "ADDR:PORT")]
    tcp: Option<String>,
    /// File holding the bearer token TCP clients must send (`Authorization: Bearer ...`).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve TCP with TLS: the certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Connect out to a control plane: a TOML file with the link's settings (url,
    /// node_token, node_id, ...; docs/control-plane.md). It holds the node token: mode 0600.
    #[arg(long, value_name = "FILE")]
    link_config: Option<PathBuf>,
}

/// The control-plane link's settings from `--link-config`.
fn read_link_config(path: &std::path::Path) -> anyhow::Result<gpucell_link::LinkConfig> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the link configuration {}", path.display()))?;
    let cfg: gpucell_link::LinkConfig = toml::from_str(&text)
        .with_context(|| format!("the link configuration {} is not valid", path.display()))?;
    cfg.validate()
        .with_context(|| format!("the link configuration {}", path.display()))?;
    Ok(cfg)
}

/// The token of `--token-file`: its first line, at least 16 bytes.
fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(
        token.len() >= 16,
        "the token file {} must hold a token of at least 16 characters on its first line",
        path.display()
    );
    Ok(token)
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info,netlink_packet_route=error",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn node(cli: &Cli) -> anyhow::Result<gpucell_runtime::Node> {
    let config = match &cli.config {
        Some(p) => gpucell_runtime::Config::load(p, true)?,
        None => {
            let default = cli
                .host_root
                .join(gpucell_runtime::DEFAULT_CONFIG_PATH.trim_start_matches('/'));
            gpucell_runtime::Config::load(&default, false)?
        }
    };
    Ok(gpucell_runtime::Node::new(
        &cli.host_root,
        &cli.state_dir,
        cli.qemu.as_deref(),
        &config,
    ))
}

/// The flags a supervisor is started with, so that it sees the node as the daemon does.
fn global_args(cli: &Cli) -> Vec<String> {
    let mut a = vec![
        "--host-root".to_string(),
        cli.host_root.display().to_string(),
        "--state-dir".into(),
        cli.state_dir.display().to_string(),
        "--log-max-bytes".into(),
        cli.log_max_bytes.to_string(),
    ];
    if let Some(c) = &cli.config {
        a.extend(["--config".into(), c.display().to_string()]);
    }
    if let Some(q) = &cli.qemu {
        a.extend(["--qemu".into(), q.display().to_string()]);
    }
    a
}

fn run(cli: &Cli) -> anyhow::Result<u8> {
    let node = node(cli)?;
    match &cli.command {
        Command::Supervise { dir } => {
            let code = gpucell_daemon::supervise::supervise(&node, dir, cli.log_max_bytes)?;
            Ok(code.clamp(0, 255) as u8)
        }
        Command::Serve(args) => {
            let options = ServeOptions {
                socket: args.socket.clone(),
                socket_group: args.socket_group.clone(),
                tcp: args.tcp.clone(),
                token: args.token_file.as_deref().map(read_token).transpose()?,
                tls: args.tls_cert.clone().zip(args.tls_key.clone()),
                state_dir: cli.state_dir.clone(),
                host_root: cli.host_root.clone(),
                default_guest: node.default_guest.clone(),
                exe: std::env::current_exe()?,
                global_args: global_args(cli),
                link: args
                    .link_config
                    .as_deref()
                    .map(read_link_config)
                    .transpose()?,
            };
            serve::serve(options)?;
            Ok(0)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", gpucell_common::chain_string(e.as_ref()));
            ExitCode::from(2)
        }
    }
}
