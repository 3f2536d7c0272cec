//! The verbs that talk to the node daemon (`gpucelld`, docs/daemon.md) through its unix
//! socket: `deploy`, `ps`, `logs`, `stop`. Thin: they build API requests, call
//! gpucell-api's client, and print.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use gpucell_api::{Client, DeployRequest, LogLine, RestartPolicy, SandboxStatus};

use super::{print_json, write_stdout, Global};

#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// The daemon's unix socket.
    #[arg(long, default_value = gpucell_api::DEFAULT_SOCKET, env = "GPUCELL_SOCKET")]
    pub socket: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Deployment id (default: a random one); deploying the same id again is a no-op.
    #[arg(long)]
    pub id: Option<String>,
    /// Restart policy: never, on-failure or always (exponential backoff).
    #[arg(long, default_value = "never")]
    pub restart: String,
    /// A label KEY=VALUE; repeatable.
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// How long a stop waits after SIGTERM before the VM is killed (e.g. 10s).
    #[arg(long, value_name = "DURATION")]
    pub stop_grace: Option<String>,
    #[command(flatten)]
    pub run: super::run::RunArgs,
}

#[derive(clap::Args, Debug)]
pub struct PsArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Keep printing new output until the sandbox has ended.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(long, short = 'n')]
    pub tail: Option<usize>,
    /// Prefix each line with its time (UTC) and stream.
    #[arg(long, short = 't')]
    pub timestamps: bool,
    pub id: String,
}

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Wait until the sandbox has ended.
    #[arg(long, short = 'w')]
    pub wait: bool,
    /// Forget a sandbox that has ended (its record and logs).
    #[arg(long)]
    pub rm: bool,
    pub id: String,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn restart_policy(s: &str) -> anyhow::Result<RestartPolicy> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| anyhow::anyhow!("--restart {s:?}: use never, on-failure or always"))
}

pub fn deploy(global: &Global, args: DeployArgs) -> anyhow::Result<u8> {
    if args.run.dry_run || args.run.qemu.is_some() {
        anyhow::bail!("--dry-run and --qemu are for `gpucell run`; the daemon runs its own QEMU");
    }
    let mut labels = BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?}: use KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let stop_grace_ms = args
        .stop_grace
        .as_deref()
        .map(gpucell_sandbox::spec::parse_duration)
        .transpose()?
        .map(|d| d.as_millis() as u64);
    let request = DeployRequest {
        id: args.id.clone(),
        run: super::run::request(global, &args.run)?,
        restart: restart_policy(&args.restart)?,
        health: None,
        labels,
        stop_grace_ms,
    };
    let client = Client::new(&args.daemon.socket);
    let status = runtime()?.block_on(client.deploy(&request))?;
    if global.json {
        print_json(&status)?;
    } else {
        write_stdout(&format!("{}\n", status.id))?;
    }
    Ok(0)
}

fn age(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn row(s: &SandboxStatus) -> String {
    let image = if s.image.is_empty() { "-" } else { &s.image };
    let since = s.timestamps.get(&s.state).copied().unwrap_or(s.created_ms);
    format!(
        "{:<20} {:<9} {:>5} {:>8} {:>6} {:<24} {}\n",
        s.id,
        s.state.as_str(),
        s.exit_code.map_or("-".into(), |c| c.to_string()),
        s.restarts,
        age(since),
        if s.devices.is_empty() {
            "-".into()
        } else {
            s.devices.join(",")
        },
        image,
    )
}

pub fn ps(global: &Global, args: PsArgs) -> anyhow::Result<u8> {
    let client = Client::new(&args.daemon.socket);
    let list = runtime()?.block_on(client.list())?;
    if global.json {
        print_json(&list)?;
        return Ok(0);
    }
    let mut out = format!(
        "{:<20} {:<9} {:>5} {:>8} {:>6} {:<24} {}\n",
        "ID", "STATE", "EXIT", "RESTARTS", "SINCE", "DEVICES", "IMAGE"
    );
    for s in &list.sandboxes {
        out.push_str(&row(s));
    }
    write_stdout(&out)?;
    Ok(0)
}

fn print_line(l: &LogLine, timestamps: bool) {
    use std::io::Write;
    let text = if timestamps {
        format!(
            "{}.{:03}Z {} {}\n",
            gpucell_host::devices::record::format_utc(l.t_ms / 1000).trim_end_matches('Z'),
            l.t_ms % 1000,
            l.stream,
            l.line
        )
    } else {
        format!("{}\n", l.line)
    };
    let _ = if l.stream == "stdout" {
        std::io::stdout().write_all(text.as_bytes())
    } else {
        std::io::stderr().write_all(text.as_bytes())
    };
}

pub fn logs(_global: &Global, args: LogsArgs) -> anyhow::Result<u8> {
    let client = Client::new(&args.daemon.socket);
    runtime()?.block_on(client.logs(&args.id, args.tail, args.follow, |l| {
        print_line(&l, args.timestamps)
    }))?;
    Ok(0)
}

pub fn stop(global: &Global, args: StopArgs) -> anyhow::Result<u8> {
    let client = Client::new(&args.daemon.socket);
    let rt = runtime()?;
    let mut status = rt.block_on(client.stop(&args.id))?;
    if args.wait || args.rm {
        while !status.state.is_terminal() {
            std::thread::sleep(std::time::Duration::from_millis(200));
            status = rt.block_on(client.get(&args.id))?;
        }
    }
    if args.rm {
        let uri = format!("/v1/sandboxes/{}?remove=1", args.id);
        let r = rt.block_on(client.send(hyper::Method::DELETE, &uri, None))?;
        anyhow::ensure!(
            r.status().is_success(),
            "removing {}: the daemon answered {}",
            args.id,
            r.status()
        );
    }
    if global.json {
        print_json(&status)?;
    } else {
        write_stdout(&format!("{} {}\n", status.id, status.state.as_str()))?;
    }
    Ok(0)
}
