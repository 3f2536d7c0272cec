use super::Global;

#[derive(clap::Subcommand, Debug)]
pub enum GuestCommand {}

pub fn run(_global: &Global, command: GuestCommand) -> anyhow::Result<u8> {
    match command {}
}
