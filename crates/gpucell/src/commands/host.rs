use super::Global;

#[derive(clap::Subcommand, Debug)]
pub enum HostCommand {}

pub fn run(_global: &Global, command: HostCommand) -> anyhow::Result<u8> {
    match command {}
}
