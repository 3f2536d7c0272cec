use super::Global;

#[derive(clap::Args, Debug)]
pub struct RunArgs {}

pub fn run(_global: &Global, _args: RunArgs) -> anyhow::Result<u8> {
    anyhow::bail!("`gpucell run` is not built yet")
}
