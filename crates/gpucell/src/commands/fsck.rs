//! `gpucell fsck [--repair]`: check the state directory's files (docs/security.md).

use gpucell_common::fsck::Outcome;

use super::Global;

/// Exit code when something is still damaged after the check (or the repair).
pub const EXIT_DAMAGED: u8 = 1;

#[derive(clap::Args, Debug)]
pub struct FsckArgs {
    /// Remove or rebuild what can be made again safely (blobs, records and disks of
    /// images, guest flavours, caches, leftovers); what cannot is only reported.
    #[arg(long)]
    pub repair: bool,
}

pub fn run(global: &Global, args: FsckArgs) -> anyhow::Result<u8> {
    let report = gpucell_runtime::fsck::fsck(&global.state_dir, args.repair)?;
    if global.json {
        super::print_json(&report)?;
    } else {
        let mut text = String::new();
        for f in &report.findings {
            let tag = match f.outcome {
                Outcome::Repairable(_) => "damaged",
                Outcome::Repaired(_) => "repaired",
                Outcome::Refused(_) => "refused",
                Outcome::RepairFailed(_) => "failed",
            };
            text.push_str(&format!("{tag}: {f}\n"));
        }
        text.push_str(&match (report.findings.is_empty(), report.damage_left) {
            (true, _) => format!("{}: clean\n", report.state_dir.display()),
            (false, false) => format!("{}: repaired\n", report.state_dir.display()),
            (false, true) if args.repair => format!(
                "{}: damage left that needs a hand (see above)\n",
                report.state_dir.display()
            ),
            (false, true) => format!(
                "{}: damaged; `gpucell fsck --repair` repairs what is safe to repair\n",
                report.state_dir.display()
            ),
        });
        super::write_stdout(&text)?;
    }
    Ok(if report.damage_left { EXIT_DAMAGED } else { 0 })
}
