use super::Global;

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {}

pub fn run(_global: &Global, command: ImageCommand) -> anyhow::Result<u8> {
    match command {}
}
