//! `gpucell kata export`: a built guest flavour as a Kata Containers QEMU configuration,
//! with its RuntimeClass and containerd entry (the logic is in gpucell-kata).

use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;

use super::{print_json, Global};

#[derive(clap::Subcommand, Debug)]
pub enum KataCommand {
    /// Write a Kata QEMU configuration, RuntimeClass and containerd entry for a built flavour.
    Export(ExportArgs),
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The guest flavour (built with `gpucell guest build --flavour NAME`).
    #[arg(long)]
    pub flavour: String,
    /// Output directory. Default: <state-dir>/kata/<flavour>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The QEMU binary Kata runs.
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Guest memory besides the pod's limits (Kata's default_memory), in MiB.
    #[arg(long, default_value_t = 8192)]
    pub memory_mib: u32,
    /// vCPUs besides the pod's limits.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// PCIe root ports for cold-plugged GPUs. Default: one per GPU of this node.
    #[arg(long)]
    pub root_ports: Option<u32>,
    /// RuntimeClass name and containerd handler. Default: kata-gpucell-<flavour>.
    #[arg(long)]
    pub name: Option<String>,
    /// Boot this init image instead of the flavour's (e.g. one that carries kata-agent).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    schema: &'static str,
    name: String,
    flavour: String,
    config: PathBuf,
    runtime_class: PathBuf,
    containerd: PathBuf,
    root_ports: u32,
    hole64_bytes: u64,
}

pub fn run(global: &Global, command: KataCommand) -> anyhow::Result<u8> {
    let KataCommand::Export(a) = command;
    let art = gpucell_guest::load(&global.state_dir, &a.flavour)?;
    let abs =
        |p: PathBuf| std::path::absolute(&p).with_context(|| format!("resolving {}", p.display()));
    let guest = gpucell_kata::KataGuest {
        flavour: art.flavour.clone(),
        kernel: abs(art.kernel.clone())?,
        initrd: abs(a.initrd.clone().unwrap_or(art.initrd.clone()))?,
    };
    let gpus = gpucell_kata::NodeGpus::read(&gpucell_host::HostRoot::new(&global.host_root))?;
    let opts = gpucell_kata::ExportOptions {
        qemu_path: a.qemu,
        memory_mib: a.memory_mib,
        vcpus: a.vcpus,
        root_ports: a.root_ports,
        name: a.name,
    };
    let export = gpucell_kata::export(&guest, gpus, &opts)?;
    let out = a
        .out
        .unwrap_or_else(|| global.state_dir.join("kata").join(&a.flavour));
    let w = gpucell_kata::write(&export, &out)?;
    let report = Report {
        schema: "gpucell.kata-export/v1",
        name: export.name.clone(),
        flavour: guest.flavour,
        config: w.config,
        runtime_class: w.runtime_class,
        containerd: w.containerd,
        root_ports: export.root_ports,
        hole64_bytes: export.hole64_bytes,
    };
    if global.json {
        print_json(&report)?;
    } else {
        println!("Kata configuration  {}", report.config.display());
        println!("RuntimeClass        {}", report.runtime_class.display());
        println!("containerd entry    {}", report.containerd.display());
        println!(
            "handler {}: {} root port(s), 64-bit hole for this node's GPUs {} GiB (stated in the file; Kata has no key for it)",
            report.name,
            report.root_ports,
            report.hole64_bytes >> 30
        );
    }
    Ok(0)
}
