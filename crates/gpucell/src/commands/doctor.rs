use super::Global;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {}

pub fn run(_global: &Global, _args: DoctorArgs) -> anyhow::Result<u8> {
    anyhow::bail!("`gpucell doctor` is not built yet")
}
