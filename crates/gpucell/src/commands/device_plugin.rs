//! `gpucell device-plugin ARGS...`: runs `gpucell-device-plugin` (its own crate and
//! binary) with the same arguments, found beside this binary or on `PATH`. The global
//! `--host-root` and `--state-dir` reach it as `GPUCELL_HOST_ROOT` and `GPUCELL_STATE_DIR`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use super::Global;

pub const BINARY: &str = "gpucell-device-plugin";

#[derive(clap::Args, Debug)]
pub struct DevicePluginArgs {
    /// Arguments for gpucell-device-plugin (`--help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

/// `gpucell-device-plugin` beside the running binary, else the bare name (looked up on `PATH`).
fn binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(BINARY)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(BINARY))
}

pub fn run(global: &Global, a: DevicePluginArgs) -> anyhow::Result<u8> {
    let bin = binary();
    let err = std::process::Command::new(&bin)
        .args(&a.args)
        .env("GPUCELL_HOST_ROOT", &global.host_root)
        .env("GPUCELL_STATE_DIR", &global.state_dir)
        .exec();
    Err(anyhow::Error::new(err).context(format!(
        "cannot run {}; install {BINARY} beside gpucell or on PATH",
        bin.display()
    )))
}
