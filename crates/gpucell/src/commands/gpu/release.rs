//! `gpucell gpu release BDF... [--force]`: take functions out of quarantine, or reclaim
//! functions whose sandbox is gone (see docs/devices.md).
//!
//! Exit codes: 0 done (or nothing to release), 1 refused (held by a running sandbox, or
//! still failing its check), 2 gpucell failed.

use gpucell_host::bind::KernelWriter;
use gpucell_host::devices::{DevicePool, DevicesError, ReleaseOutcome};
use gpucell_host::{Bdf, HostRoot};

use crate::commands::{print_json, write_stdout, Global};

/// Exit code when a function could not be released.
const EXIT_REFUSED: u8 = 1;

#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    /// PCI addresses of quarantined functions, or of functions whose sandbox is gone.
    #[arg(value_name = "BDF", required = true)]
    pub devices: Vec<Bdf>,
    /// Release from quarantine without checking that the config space answers.
    #[arg(long)]
    pub force: bool,
}

#[derive(serde::Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
enum Entry {
    Done(ReleaseOutcome),
    Refused { bdf: Bdf, reason: String },
}

fn describe(o: &ReleaseOutcome) -> String {
    match o {
        ReleaseOutcome::Unquarantined { bdf, forced: false } => {
            format!("{bdf}: released from quarantine (its config space answers)")
        }
        ReleaseOutcome::Unquarantined { bdf, forced: true } => {
            format!("{bdf}: released from quarantine without a check (--force)")
        }
        ReleaseOutcome::Reclaimed { bdf, sandbox } => {
            format!("{bdf}: sandbox {sandbox} is gone; reset, checked and returned to the pool")
        }
        ReleaseOutcome::Quarantined { bdf, reason } => format!(
            "{bdf}: sandbox is gone, but it failed its reset or check and is now quarantined: {reason}"
        ),
        ReleaseOutcome::NotHeld { bdf } => {
            format!("{bdf}: neither quarantined nor allocated; nothing to release")
        }
    }
}

pub fn run(global: &Global, args: ReleaseArgs) -> anyhow::Result<u8> {
    let pool = DevicePool::new(HostRoot::new(&global.host_root), &global.state_dir);
    let mut entries = Vec::new();
    let mut code = 0;
    for bdf in args.devices {
        match pool.release_device(bdf, args.force, &mut KernelWriter) {
            Ok(o) => {
                if matches!(o, ReleaseOutcome::Quarantined { .. }) {
                    code = EXIT_REFUSED;
                }
                entries.push(Entry::Done(o));
            }
            Err(
                e @ (DevicesError::InUse { .. }
                | DevicesError::GroupOpen { .. }
                | DevicesError::StillFailing { .. }),
            ) => {
                code = EXIT_REFUSED;
                entries.push(Entry::Refused {
                    bdf,
                    reason: gpucell_common::chain_string(&e),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    if global.json {
        print_json(&serde_json::json!({ "results": entries }))?;
    } else {
        let mut text = String::new();
        for e in &entries {
            match e {
                Entry::Done(o) => text.push_str(&(describe(o) + "\n")),
                Entry::Refused { reason, .. } => eprintln!("refused: {reason}"),
            }
        }
        write_stdout(&text)?;
    }
    Ok(code)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn global(root: &std::path::Path, state: &std::path::Path) -> Global {
        Global {
            host_root: root.to_owned(),
            state_dir: state.to_owned(),
            config: None,
            json: false,
            verbose: 0,
        }
    }

    /// A host with one function whose config space gives 10de:2330, quarantined.
    fn quarantined_host(config: [u8; 4]) -> (tempfile::TempDir, tempfile::TempDir, Bdf) {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let bdf: Bdf = "0000:10:00.0".parse().unwrap();
        let dev = root.path().join("sys/bus/pci/devices/0000:10:00.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("config"), config).unwrap();
        std::fs::create_dir_all(state.path().join("devices")).unwrap();
        std::fs::write(
            state.path().join("devices/quarantine.json"),
            r#"{"version":1,"devices":[{"bdf":"0000:10:00.0","vendor":4318,"device":9008,"reason":"reset failed","since_unix":1,"sandbox":"a"}]}"#,
        )
        .unwrap();
        (root, state, bdf)
    }

    #[test]
    fn release_takes_an_answering_function_out_of_quarantine() {
        let (root, state, bdf) = quarantined_host([0xde, 0x10, 0x30, 0x23]);
        let g = global(root.path(), state.path());
        let args = ReleaseArgs {
            devices: vec![bdf],
            force: false,
        };
        assert_eq!(run(&g, args).unwrap(), 0);
        let q = gpucell_host::devices::quarantined(state.path()).unwrap();
        assert!(q.is_empty(), "{q:?}");
    }

    #[test]
    fn release_refuses_a_silent_function_unless_forced() {
        let (root, state, bdf) = quarantined_host([0xff; 4]);
        let g = global(root.path(), state.path());
        let args = |force| ReleaseArgs {
            devices: vec![bdf],
            force,
        };
        assert_eq!(run(&g, args(false)).unwrap(), EXIT_REFUSED);
        assert_eq!(
            gpucell_host::devices::quarantined(state.path())
                .unwrap()
                .len(),
            1
        );
        assert_eq!(run(&g, args(true)).unwrap(), 0);
        assert!(gpucell_host::devices::quarantined(state.path())
            .unwrap()
            .is_empty());
    }
}
