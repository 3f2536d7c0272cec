//! `gpucell gpu ...`: list (list.rs), bind and unbind (bind.rs), release (release.rs).

use super::Global;

mod bind;
mod list;
mod release;

#[derive(clap::Subcommand, Debug)]
pub enum GpuCommand {
    /// One row per GPU with its passthrough state.
    List(list::ListArgs),
    /// Bind GPUs (and the rest of their IOMMU groups) to vfio-pci.
    Bind(bind::BindArgs),
    /// Return GPUs to the drivers they had before `bind`.
    Unbind(bind::UnbindArgs),
    /// Take devices out of quarantine (or reclaim those of a sandbox that is gone).
    Release(release::ReleaseArgs),
}

pub fn run(global: &Global, command: GpuCommand) -> anyhow::Result<u8> {
    match command {
        GpuCommand::List(a) => list::run(global, a),
        GpuCommand::Bind(a) => bind::bind(global, a),
        GpuCommand::Unbind(a) => bind::unbind(global, a),
        GpuCommand::Release(a) => release::run(global, a),
    }
}
