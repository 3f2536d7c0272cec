//! `gpucell gpu bind` and `gpucell gpu unbind`.
//!
//! Exit codes: 0 done (or nothing to do), 1 refused because the host uses a device,
//! 2 gpucell failed.

use gpucell_host::bind::{self, Action, BindPlan, KernelWriter, Outcome, Targets};
use gpucell_host::{Bdf, HostRoot};

use crate::commands::{print_json, Global};

/// Exit code when a device is in use on the host.
const EXIT_REFUSED: u8 = 1;

#[derive(clap::Args, Debug)]
pub struct BindArgs {
    /// PCI addresses of the GPUs; each brings every other endpoint of its IOMMU group.
    #[arg(
        value_name = "BDF",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub devices: Vec<Bdf>,
    /// Every NVIDIA GPU of the host.
    #[arg(long)]
    pub all: bool,
    /// Print the sysfs writes in order and write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Debug)]
pub struct UnbindArgs {
    /// PCI addresses of the GPUs; each brings every other endpoint of its IOMMU group.
    #[arg(
        value_name = "BDF",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub devices: Vec<Bdf>,
    /// Every NVIDIA GPU, and every function gpucell has a binding record of.
    #[arg(long)]
    pub all: bool,
    /// Print the sysfs writes in order and write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn targets(all: bool, devices: Vec<Bdf>) -> Targets {
    if all {
        Targets::All
    } else {
        Targets::Devices(devices)
    }
}

#[derive(serde::Serialize)]
struct Report<'a> {
    dry_run: bool,
    plan: &'a BindPlan,
    outcome: Option<&'a Outcome>,
}

fn print_plan(plan: &BindPlan, verb: &str) {
    for g in &plan.groups {
        let requested: Vec<String> = g.requested.iter().map(ToString::to_string).collect();
        println!("IOMMU group {} (for {})", g.group, requested.join(", "));
        for e in &g.endpoints {
            let what = match e.action {
                Action::Bind => format!("{} -> vfio-pci", e.driver),
                Action::AlreadyBound => format!("already on {}", e.driver),
                Action::Restore => {
                    let to = match e.record.as_ref().map(|r| &r.previous_driver) {
                        Some(Some(d)) => d.clone(),
                        Some(None) => "no driver".into(),
                        None => "the kernel's choice".into(),
                    };
                    format!("{} -> {to}", e.driver)
                }
                Action::NotBound => format!("not on vfio-pci ({}), nothing to {verb}", e.driver),
            };
            println!("  {} {}  {what}", e.bdf, e.id);
        }
        for b in &g.bridges {
            println!("  {b} bridge, left on its driver");
        }
    }
}

fn finish(
    global: &Global,
    plan: &BindPlan,
    dry_run: bool,
    verb: &str,
    execute: impl FnOnce(&BindPlan) -> Result<Outcome, bind::BindError>,
) -> anyhow::Result<u8> {
    if !plan.refusals.is_empty() {
        if global.json {
            print_json(&Report {
                dry_run,
                plan,
                outcome: None,
            })?;
        }
        for h in &plan.refusals {
            eprintln!("refused: {h}");
        }
        eprintln!("nothing was written");
        return Ok(EXIT_REFUSED);
    }
    if dry_run {
        if global.json {
            print_json(&Report {
                dry_run,
                plan,
                outcome: None,
            })?;
        } else {
            print_plan(plan, verb);
            for w in &plan.warnings {
                eprintln!("warning: {w}");
            }
            if plan.writes().next().is_none() {
                println!("nothing to {verb}");
            } else {
                println!("would write, in order:");
                for w in plan.writes() {
                    println!("  {w}");
                }
            }
        }
        return Ok(0);
    }
    let outcome = execute(plan)?;
    if global.json {
        print_json(&Report {
            dry_run,
            plan,
            outcome: Some(&outcome),
        })?;
    } else {
        print_plan(plan, verb);
        if outcome.changed.is_empty() {
            println!("nothing to {verb}");
        }
    }
    for w in &outcome.warnings {
        eprintln!("warning: {w}");
    }
    Ok(0)
}

pub fn bind(global: &Global, args: BindArgs) -> anyhow::Result<u8> {
    let root = HostRoot::new(&global.host_root);
    let plan = bind::plan_bind(&root, &targets(args.all, args.devices))?;
    finish(global, &plan, args.dry_run, "bind", |plan| {
        bind::execute_bind(&root, &global.state_dir, plan, &mut KernelWriter)
    })
}

pub fn unbind(global: &Global, args: UnbindArgs) -> anyhow::Result<u8> {
    let root = HostRoot::new(&global.host_root);
    let plan = bind::plan_unbind(&root, &global.state_dir, &targets(args.all, args.devices))?;
    finish(global, &plan, args.dry_run, "unbind", |plan| {
        bind::execute_unbind(&root, &global.state_dir, plan, &mut KernelWriter)
    })
}
