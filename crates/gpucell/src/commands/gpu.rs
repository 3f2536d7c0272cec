use super::Global;

#[derive(clap::Subcommand, Debug)]
pub enum GpuCommand {}

pub fn run(_global: &Global, command: GpuCommand) -> anyhow::Result<u8> {
    match command {}
}
