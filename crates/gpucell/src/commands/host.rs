//! `gpucell host plan` and `gpucell host apply`: the boot configuration for VFIO.

use std::path::PathBuf;

use gpucell_host::bootcfg::{
    self, ApplyReport, BindingMode, BootPlan, FileAction, PlanRequest, Selection,
};
use gpucell_host::{Bdf, HostRoot};

use super::{print_json, Global};

#[derive(clap::Subcommand, Debug)]
pub enum HostCommand {
    /// Show the boot configuration changes as unified diffs, and the steps left.
    Plan(SelectArgs),
    /// Write the boot configuration (atomically, with `.gpucell-bak` backups).
    Apply(SelectArgs),
}

#[derive(clap::Args, Debug)]
pub struct SelectArgs {
    /// GPUs to hand to vfio-pci at boot, with the rest of their IOMMU groups.
    #[arg(
        long,
        value_name = "BDF,...",
        value_delimiter = ',',
        conflicts_with = "all"
    )]
    pub gpus: Vec<Bdf>,
    /// Every NVIDIA GPU (a GPU driving a display is skipped with a warning).
    #[arg(long)]
    pub all: bool,
    /// Bind by `options vfio-pci ids=VID:DID,...` instead of per-address udev rules.
    /// This claims EVERY device of those models on the host.
    #[arg(long)]
    pub ids_mode: bool,
    /// Root of the system whose /etc is configured (default: the host root).
    #[arg(long, value_name = "DIR")]
    pub target_root: Option<PathBuf>,
}

fn plan(global: &Global, args: &SelectArgs) -> anyhow::Result<BootPlan> {
    let host = HostRoot::new(&global.host_root);
    let target = HostRoot::new(
        args.target_root
            .clone()
            .unwrap_or_else(|| global.host_root.clone()),
    );
    let selection = if args.all {
        Selection::All
    } else if args.gpus.is_empty() {
        Selection::None
    } else {
        Selection::Gpus(args.gpus.clone())
    };
    let mode = if args.ids_mode {
        BindingMode::Ids
    } else {
        BindingMode::Udev
    };
    Ok(bootcfg::plan(
        &host,
        &target,
        &PlanRequest { selection, mode },
    )?)
}

fn print_steps(plan: &BootPlan) {
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    if !plan.steps.is_empty() {
        println!("Then run:");
        for s in &plan.steps {
            println!("  {:<22} # {}", s.command, s.why);
        }
    }
}

pub fn run(global: &Global, command: HostCommand) -> anyhow::Result<u8> {
    match command {
        HostCommand::Plan(args) => {
            let plan = plan(global, &args)?;
            if global.json {
                print_json(&plan)?;
                return Ok(0);
            }
            for f in &plan.files {
                match f.action {
                    FileAction::Unchanged => println!("unchanged: {}", f.path.display()),
                    _ => print!("{}", f.diff),
                }
            }
            if !plan.changes() {
                println!("nothing to change");
            }
            print_steps(&plan);
            Ok(0)
        }
        HostCommand::Apply(args) => {
            let plan = plan(global, &args)?;
            let report = bootcfg::apply(&plan)?;
            if global.json {
                #[derive(serde::Serialize)]
                struct Applied<'a> {
                    plan: &'a BootPlan,
                    applied: &'a ApplyReport,
                }
                print_json(&Applied {
                    plan: &plan,
                    applied: &report,
                })?;
                return Ok(0);
            }
            if report.written.is_empty() {
                println!("nothing to change");
            }
            for p in &report.written {
                println!("wrote {}", p.display());
            }
            for p in &report.backups {
                println!("kept the previous content in {}", p.display());
            }
            print_steps(&plan);
            Ok(0)
        }
    }
}
