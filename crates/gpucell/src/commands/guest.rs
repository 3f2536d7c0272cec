//! `gpucell guest build|show|list`: guest kernel and init image artifacts.

use std::path::PathBuf;

use anyhow::Context;

use super::{print_json, Global};

#[derive(clap::Subcommand, Debug)]
pub enum GuestCommand {
    /// Build the guest kernel and init image of a flavour (does nothing when up to date).
    Build(BuildArgs),
    /// Show the manifest of a built flavour.
    Show(ShowArgs),
    /// List the known flavours and whether each is built.
    List,
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Flavour to build.
    #[arg(long, default_value = gpucell_guest::DEFAULT_FLAVOUR)]
    pub flavour: String,
    /// Static gpucell-agent binary to use as /init (default: $GPUCELL_AGENT, next to
    /// gpucell, or ./target/x86_64-unknown-linux-gnu/release/gpucell-agent).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Use this kernel .deb instead of downloading the flavour's package with apt.
    #[arg(long)]
    pub kernel_deb: Option<PathBuf>,
    /// Rebuild even when the cached build matches the inputs.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    #[arg(long, default_value = gpucell_guest::DEFAULT_FLAVOUR)]
    pub flavour: String,
}

pub fn run(global: &Global, command: GuestCommand) -> anyhow::Result<u8> {
    match command {
        GuestCommand::Build(a) => build(global, a),
        GuestCommand::Show(a) => show(global, a),
        GuestCommand::List => list(global),
    }
}

fn build(global: &Global, a: BuildArgs) -> anyhow::Result<u8> {
    let opts = gpucell_guest::BuildOptions {
        flavour: a.flavour,
        agent: a.agent,
        kernel_deb: a.kernel_deb,
        force: a.force,
    };
    let art = gpucell_guest::build(&global.state_dir, &opts)?;
    if global.json {
        print_json(&art)?;
    } else {
        let m = &art.manifest;
        println!(
            "guest flavour `{}` {} in {}",
            art.flavour,
            if art.cached { "is up to date" } else { "built" },
            art.dir.display()
        );
        println!(
            "  kernel     {} ({} {})",
            m.kernel_release, m.kernel_package, m.kernel_package_version
        );
        println!(
            "  vmlinux    {} ({} bytes)",
            art.kernel.display(),
            m.vmlinux.size
        );
        println!(
            "  initramfs  {} ({} bytes)",
            art.initrd.display(),
            m.initramfs.size
        );
        println!("  modules    {}", m.modules.join(" "));
    }
    Ok(0)
}

fn show(global: &Global, a: ShowArgs) -> anyhow::Result<u8> {
    let art = gpucell_guest::load(&global.state_dir, &a.flavour)?;
    if global.json {
        print_json(&art)?;
    } else {
        print!("{}", art.manifest.to_json());
    }
    Ok(0)
}

#[derive(serde::Serialize)]
struct FlavourRow {
    #[serde(flatten)]
    flavour: gpucell_guest::Flavour,
    built: Option<String>,
}

fn list(global: &Global) -> anyhow::Result<u8> {
    let rows: Vec<FlavourRow> = gpucell_guest::FLAVOURS
        .iter()
        .map(|f| FlavourRow {
            flavour: f.clone(),
            built: gpucell_guest::load(&global.state_dir, f.name)
                .ok()
                .map(|a| a.manifest.kernel_release),
        })
        .collect();
    if global.json {
        print_json(&rows).context("printing the flavour list")?;
    } else {
        for r in rows {
            println!(
                "{:<12} {:<24} {}",
                r.flavour.name,
                r.built
                    .as_deref()
                    .map_or("not built".to_owned(), |k| format!("built ({k})")),
                r.flavour.description
            );
        }
    }
    Ok(0)
}
