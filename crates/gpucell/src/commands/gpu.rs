//! `gpucell gpu ...`: list (list.rs), bind and unbind (bind.rs).

use super::Global;

mod bind;
mod list;

#[derive(clap::Subcommand, Debug)]
pub enum GpuCommand {
    /// One row per GPU with its passthrough state.
    List(list::ListArgs),
    /// Bind GPUs (and the rest of their IOMMU groups) to vfio-pci.
    Bind(bind::BindArgs),
    /// Return GPUs to the drivers they had before `bind`.
    Unbind(bind::UnbindArgs),
}

pub fn run(global: &Global, command: GpuCommand) -> anyhow::Result<u8> {
    match command {
        GpuCommand::List(a) => list::run(global, a),
        GpuCommand::Bind(a) => bind::bind(global, a),
        GpuCommand::Unbind(a) => bind::unbind(global, a),
    }
}
