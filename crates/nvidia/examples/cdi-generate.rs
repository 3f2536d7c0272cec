//! Prints the CDI spec of the NVIDIA driver under a root, as JSON:
//!
//! ```text
//! cargo run -p gpucell-nvidia --example cdi-generate -- [--driver-root DIR] [--dev-root DIR]
//!     [--proc-gpus DIR] [--host-root DIR] [--driver-version V] [--lib-dir DIR]...
//!     [--bin-dir DIR]... [--container-lib-dir DIR] [--hook-path PATH]
//! ```
//!
//! Defaults: driver root `/`, the default search paths, no device root, no GPU. On a
//! machine with a loaded driver, `--dev-root /dev --proc-gpus /proc/driver/nvidia/gpus`
//! gives the spec `nvidia-ctk cdi generate` would (with gpucell's hooks). Files skipped go
//! to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use gpucell_nvidia::cdi::{generate, gpus_from_proc, GenerateOptions};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("cdi-generate: {msg}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut o = GenerateOptions::new("/");
    let (mut libs, mut bins) = (Vec::new(), Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--driver-root" => o.driver_root = PathBuf::from(value()?),
            "--dev-root" => o.dev_root = Some(PathBuf::from(value()?)),
            "--proc-gpus" => o.gpus = gpus_from_proc(&PathBuf::from(value()?))?,
            "--host-root" => o.host_root = Some(PathBuf::from(value()?)),
            "--driver-version" => o.driver_version = Some(value()?),
            "--lib-dir" => libs.push(value()?),
            "--bin-dir" => bins.push(value()?),
            "--container-lib-dir" => o.container_lib_dir = value()?,
            "--hook-path" => o.hook_path = value()?,
            other => {
                return Err(format!("unknown argument `{other}` (see the source's header)").into())
            }
        }
    }
    if !libs.is_empty() {
        o.lib_dirs = libs;
    }
    if !bins.is_empty() {
        o.bin_dirs = bins;
    }
    let g = generate(&o)?;
    for w in &g.warnings {
        eprintln!("cdi-generate: {w}");
    }
    print!("{}", g.spec.to_json());
    Ok(())
}
