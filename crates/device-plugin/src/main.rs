//! `gpucell-device-plugin`: the Kubernetes device plugin of a gpucell node. Runs until
//! SIGTERM or SIGINT; `--list` prints the resources it would serve and exits.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gpucell_device_plugin::{cdi, resources, runner, Naming, PluginConfig};
use gpucell_host::HostRoot;

#[derive(Parser, Debug)]
#[command(
    name = "gpucell-device-plugin",
    version,
    about = "Kubernetes device plugin: this node's GPUs as gpucell.io/<model> resources for gpucell microVMs"
)]
struct Args {
    /// Every sysfs and /dev path is read under this directory.
    #[arg(long, env = "GPUCELL_HOST_ROOT", default_value = "/")]
    host_root: PathBuf,
    /// gpucell's state directory (quarantine and allocations under devices/).
    #[arg(long, env = "GPUCELL_STATE_DIR", default_value = "/var/lib/gpucell")]
    state_dir: PathBuf,
    /// The kubelet's device-plugin directory (kubelet.sock lives there).
    #[arg(long, default_value = runner::DEFAULT_PLUGIN_DIR)]
    plugin_dir: PathBuf,
    /// Where the CDI specs are written.
    #[arg(long, default_value = cdi::DEFAULT_CDI_DIR)]
    cdi_dir: PathBuf,
    /// Resource domain: resources are DOMAIN/MODEL.
    #[arg(long, default_value = resources::DEFAULT_DOMAIN)]
    domain: String,
    /// Resource name for a PCI device id, over the GPU database: `2335=H200-SXM`. Repeatable.
    #[arg(long = "resource", value_name = "DEVICE=NAME")]
    resources: Vec<String>,
    /// GPUs linked by NVLink, as a comma-separated list of PCI addresses. Repeatable.
    #[arg(long = "nvlink-clique", value_name = "BDF,BDF,...")]
    cliques: Vec<String>,
    /// How often health and the kubelet socket are checked, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..=600_000))]
    poll_ms: u64,
    /// Print the resources and devices as JSON and exit.
    #[arg(long)]
    list: bool,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

fn config(args: &Args) -> anyhow::Result<PluginConfig> {
    let mut naming = Naming {
        domain: args.domain.clone(),
        ..Naming::default()
    };
    for r in &args.resources {
        naming.add_override(r)?;
    }
    for c in &args.cliques {
        naming.add_clique(c)?;
    }
    naming.validate()?;
    Ok(PluginConfig {
        root: HostRoot::new(&args.host_root),
        state_dir: args.state_dir.clone(),
        naming,
        plugin_dir: args.plugin_dir.clone(),
        cdi_dir: args.cdi_dir.clone(),
        poll: Duration::from_millis(args.poll_ms),
    })
}

fn list(config: &PluginConfig) -> anyhow::Result<()> {
    let found = resources::discover(&config.root, &config.state_dir, &config.naming)?;
    let doc: Vec<serde_json::Value> = found
        .iter()
        .map(|r| {
            serde_json::json!({
                "resource": r.name,
                "devices": r.devices.iter().map(|d| serde_json::json!({
                    "id": d.id,
                    "cdi_name": cdi::qualified_name(&r.name, &d.id),
                    "bdf": d.bdf.to_string(),
                    "iommu_group": d.iommu_group,
                    "numa_node": d.numa_node,
                    "health": d.health.api_str(),
                    "reason": match &d.health { gpucell_device_plugin::Health::Unhealthy(w) => Some(w), _ => None },
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let text = serde_json::to_string_pretty(&serde_json::json!({
        "schema": "gpucell.device-plugin-list/v1",
        "resources": doc,
    }))?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}") {
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<()> {
    let config = config(&args)?;
    if args.list {
        return list(&config);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(runner::run(config, shutdown_signal()))?;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("gpucell-device-plugin: {}", chain.join(": "));
            ExitCode::from(2)
        }
    }
}
