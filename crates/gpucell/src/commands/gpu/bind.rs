use crate::commands::Global;

#[derive(clap::Args, Debug)]
pub struct BindArgs {}

#[derive(clap::Args, Debug)]
pub struct UnbindArgs {}

pub fn bind(_global: &Global, _args: BindArgs) -> anyhow::Result<u8> {
    anyhow::bail!("`gpucell gpu bind` is not built yet")
}

pub fn unbind(_global: &Global, _args: UnbindArgs) -> anyhow::Result<u8> {
    anyhow::bail!("`gpucell gpu unbind` is not built yet")
}
