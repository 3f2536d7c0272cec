//! Quarantined devices (docs/devices.md): one warning per function that failed its reset
//! or check after a sandbox, saying how to release it.

use std::path::Path;

use crate::devices;
use crate::devices::record::format_utc;
use gpucell_common::chain_string;

use super::Check;

pub(super) fn checks(state_dir: &Path) -> Vec<Check> {
    let entries = match devices::quarantined(state_dir) {
        Ok(e) => e,
        Err(e) => {
            return vec![Check::warn(
                "quarantine",
                "Quarantine",
                chain_string(&e),
                "allocation of devices is refused until the quarantine record is readable",
            )]
        }
    };
    entries
        .iter()
        .map(|q| {
            Check::warn(
                format!("quarantine:{}", q.bdf),
                format!("Quarantine {}", q.bdf),
                format!(
                    "{} ({:04x}:{:04x}) is quarantined since {}{}: {}",
                    q.bdf,
                    q.vendor,
                    q.device,
                    format_utc(q.since_unix),
                    q.sandbox
                        .as_deref()
                        .map(|s| format!(" (after sandbox {s})"))
                        .unwrap_or_default(),
                    q.reason
                ),
                format!(
                    "no sandbox gets it until released: check it (dmesg, lspci -vv -s {0}; a reboot resets it), then run `gpucell gpu release {0}`",
                    q.bdf
                ),
            )
        })
        .collect()
}
