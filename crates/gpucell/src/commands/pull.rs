use super::Global;

#[derive(clap::Args, Debug)]
pub struct PullArgs {}

pub fn run(_global: &Global, _args: PullArgs) -> anyhow::Result<u8> {
    anyhow::bail!("`gpucell pull` is not built yet")
}
