use crate::commands::Global;

#[derive(clap::Args, Debug)]
pub struct ListArgs {}

pub fn run(_global: &Global, _args: ListArgs) -> anyhow::Result<u8> {
    anyhow::bail!("`gpucell gpu list` is not built yet")
}
