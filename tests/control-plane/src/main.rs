//! `gpucell-test-control-plane`: the reference control plane as a process, for trying a
//! node by hand. Events are printed as JSON lines on stdout; commands are read as JSON
//! lines on stdin:
//!
//! ```text
//! {"deploy": "NODE", "deployment_id": "d1", "spec": {...}}
//! {"stop": "NODE", "deployment_id": "d1"}
//! {"send": "NODE", "text": "any text frame"}
//! {"drop": "NODE"}
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gpucell_test_control_plane::{ControlPlane, ServerConfig};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(about = "A reference control plane for gpucell nodes (tests only)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8765")]
    listen: SocketAddr,
    /// The node token to accept.
    #[arg(long, env = "GPUCELL_CP_TOKEN")]
    token: String,
    /// Seconds without a heartbeat before a node is marked offline.
    #[arg(long, default_value_t = 60)]
    offline_after_secs: u64,
    /// Serve wss:// with this PEM certificate chain (needs --key).
    #[arg(long, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// The PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let mut cfg = ServerConfig::new(args.token);
    cfg.offline_after = Duration::from_secs(args.offline_after_secs);
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        cfg.tls = Some(gpucell_test_control_plane::tls_config(cert, key)?);
    }
    let cp = ControlPlane::start(args.listen, cfg).await?;
    eprintln!("listening on {}", cp.url());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut printed = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let events = cp.events();
                for e in &events[printed..] {
                    println!("{}", serde_json::to_string(e).context("encoding an event")?);
                }
                printed = events.len();
            }
            line = lines.next_line() => {
                let Some(line) = line.context("reading stdin")? else { return Ok(()) };
                if let Err(e) = command(&cp, &line) {
                    eprintln!("error: {e:#}");
                }
            }
        }
    }
}

fn command(cp: &ControlPlane, line: &str) -> anyhow::Result<()> {
    let cmd: Value = serde_json::from_str(line).context("a command must be one JSON object")?;
    let str_field = |name: &str| cmd.get(name).and_then(Value::as_str);
    let id = || str_field("deployment_id").context("field `deployment_id` is missing");
    if let Some(node) = str_field("deploy") {
        let spec = cmd.get("spec").cloned().unwrap_or(Value::Null);
        cp.deploy(node, id()?, spec)?;
    } else if let Some(node) = str_field("stop") {
        cp.stop(node, id()?)?;
    } else if let Some(node) = str_field("send") {
        cp.send_text(node, str_field("text").context("field `text` is missing")?)?;
    } else if let Some(node) = str_field("drop") {
        cp.drop_connection(node)?;
    } else {
        anyhow::bail!("unknown command: use deploy, stop, send or drop");
    }
    Ok(())
}
