//! Cleaning a function after a sandbox had it: reset through sysfs, then check that it
//! answers with the identity it had when it was handed out.
//!
//! - `reset_method` lists what the kernel can do (`flr`, `pm`, `bus`, ...): `1` is
//!   written to `<fn>/reset`, through the [`SysfsWriter`], and the kernel tries them in order.
//! - No `reset_method`: the kernel knows no way to reset the function, so whatever the last
//!   tenant left in it (GPU memory, queues, keys) may still be there. Such a function is
//!   quarantined, unless its `vendor:device` is listed in `<state>/devices/policy.toml`
//!   under `allow_no_reset` (QEMU's `edu` device in tests): then only the check runs.
//! - The check reads the first 4 bytes of `<fn>/config`: they must give the vendor and
//!   device recorded at allocation; `ffff` means the function no longer answers.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bdf::Bdf;
use crate::bind::SysfsWriter;
use crate::pci::PciFunction;
use crate::root::HostRoot;
use crate::sysfs;

/// Why a function could not be cleaned; the text becomes its quarantine reason.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("{bdf} ({id}) has no reset method (sysfs has no reset_method for it), so the last tenant's state may remain; list {id} under allow_no_reset in {} only if that is safe", policy.display())]
    NoResetMethod {
        bdf: Bdf,
        id: String,
        policy: PathBuf,
    },
    #[error("{bdf}: cannot read it from sysfs")]
    Read {
        bdf: Bdf,
        #[source]
        source: crate::pci::PciError,
    },
    #[error("{bdf}: reset failed (writing 1 to {} with methods {methods})", path.display())]
    Reset {
        bdf: Bdf,
        path: PathBuf,
        methods: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{bdf}: cannot read its config space ({})", path.display())]
    Config {
        bdf: Bdf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{bdf}: config space ({}) gave {len} bytes, fewer than 4", path.display())]
    ShortConfig { bdf: Bdf, path: PathBuf, len: usize },
    #[error("{bdf} does not answer: its config space reads {found} (expected {expected})")]
    NotAnswering {
        bdf: Bdf,
        found: String,
        expected: String,
    },
    #[error("{bdf} reads {found} from its config space, not {expected} as when it was handed out")]
    IdentityChanged {
        bdf: Bdf,
        found: String,
        expected: String,
    },
    #[error("{} is not valid ({why}); expected allow_no_reset = [\"vvvv:dddd\", ...]", path.display())]
    Policy { path: PathBuf, why: String },
}

/// Which functions may be handed out again without a reset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResetPolicy {
    /// `(vendor, device)` pairs for which the config-space check alone is enough.
    pub allow_no_reset: Vec<(u16, u16)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow_no_reset: Vec<String>,
}

fn parse_id(s: &str) -> Option<(u16, u16)> {
    let (v, d) = s.split_once(':')?;
    let hex = |x: &str| {
        (x.len() == 4 && x.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u16::from_str_radix(x, 16).ok())
            .flatten()
    };
    Some((hex(v)?, hex(d)?))
}

impl ResetPolicy {
    /// Reads `<state>/devices/policy.toml`; the default (no exception) when missing.
    pub fn load(state_dir: &Path) -> Result<Self, ResetError> {
        let path = super::record::policy_path(state_dir);
        let bad = |why: String| ResetError::Policy {
            path: path.clone(),
            why,
        };
        let text = match sysfs::read_raw(&path) {
            Ok(t) => t,
            Err(e) if e.is_not_found() => return Ok(Self::default()),
            Err(e) => return Err(bad(gpucell_common::chain_string(&e))),
        };
        if text.len() > 64 * 1024 {
            return Err(bad("larger than 64 KiB".into()));
        }
        let file: PolicyFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut out = Self::default();
        for id in file.allow_no_reset.iter().take(1024) {
            let pair = parse_id(&id.to_ascii_lowercase())
                .ok_or_else(|| bad(format!("`{}` is not vendor:device", sysfs::printable(id))))?;
            out.allow_no_reset.push(pair);
        }
        Ok(out)
    }

    fn allows_no_reset(&self, vendor: u16, device: u16) -> bool {
        self.allow_no_reset.contains(&(vendor, device))
    }
}

/// How a function was cleaned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Cleaned {
    /// Reset by the kernel with one of these methods, then checked.
    Reset { methods: Vec<String> },
    /// No reset method, allowed by the policy: checked only.
    CheckedOnly,
}

/// Resets `bdf` (when the kernel can) and checks that it answers as `vendor:device`.
#[tracing::instrument(skip(root, policy, writer, state_dir), fields(bdf = %bdf))]
pub fn reset_and_check(
    root: &HostRoot,
    state_dir: &Path,
    bdf: Bdf,
    (vendor, device): (u16, u16),
    policy: &ResetPolicy,
    writer: &mut dyn SysfsWriter,
) -> Result<Cleaned, ResetError> {
    let f = PciFunction::read(root, bdf).map_err(|source| ResetError::Read { bdf, source })?;
    let methods = f.reset_methods.clone().unwrap_or_default();
    let cleaned = if methods.is_empty() {
        if !policy.allows_no_reset(vendor, device) {
            return Err(ResetError::NoResetMethod {
                bdf,
                id: format!("{vendor:04x}:{device:04x}"),
                policy: super::record::policy_path(state_dir),
            });
        }
        tracing::info!("no reset method; allowed by policy, checking config space only");
        Cleaned::CheckedOnly
    } else {
        let path = root.pci_device(&bdf).join("reset");
        writer
            .write(&path, "1")
            .map_err(|source| ResetError::Reset {
                bdf,
                path: path.clone(),
                methods: methods.join(","),
                source,
            })?;
        tracing::info!(methods = %methods.join(","), "reset");
        Cleaned::Reset { methods }
    };
    check_config(root, bdf, (vendor, device))?;
    Ok(cleaned)
}

/// Reads the first bytes of `<fn>/config` and compares vendor and device with the
/// expected ones.
pub fn check_config(
    root: &HostRoot,
    bdf: Bdf,
    (vendor, device): (u16, u16),
) -> Result<(), ResetError> {
    let path = root.pci_device(&bdf).join("config");
    let err = |source| ResetError::Config {
        bdf,
        path: path.clone(),
        source,
    };
    let mut buf = Vec::with_capacity(64);
    std::fs::File::open(&path)
        .and_then(|f| f.take(64).read_to_end(&mut buf))
        .map_err(err)?;
    let [v0, v1, d0, d1, ..] = buf[..] else {
        return Err(ResetError::ShortConfig {
            bdf,
            path: path.clone(),
            len: buf.len(),
        });
    };
    let found_v = u16::from_le_bytes([v0, v1]);
    let found_d = u16::from_le_bytes([d0, d1]);
    let found = format!("{found_v:04x}:{found_d:04x}");
    let expected = format!("{vendor:04x}:{device:04x}");
    if found_v == 0xffff || (found_v == 0 && found_d == 0) {
        return Err(ResetError::NotAnswering {
            bdf,
            found,
            expected,
        });
    }
    if (found_v, found_d) != (vendor, device) {
        return Err(ResetError::IdentityChanged {
            bdf,
            found,
            expected,
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(parse_id("1234:11e8"), Some((0x1234, 0x11e8)));
        for bad in ["1234", "1234:11e", "12345:11e8", "zzzz:0000", ":"] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn policy_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ResetPolicy::load(dir.path()).unwrap(),
            ResetPolicy::default()
        );
        std::fs::create_dir_all(dir.path().join("devices")).unwrap();
        let p = dir.path().join("devices/policy.toml");
        std::fs::write(&p, "allow_no_reset = [\"1234:11E8\"]\n").unwrap();
        assert_eq!(
            ResetPolicy::load(dir.path()).unwrap().allow_no_reset,
            vec![(0x1234, 0x11e8)]
        );
        for bad in [
            "allow_no_reset = [\"edu\"]",
            "allow = []",
            "allow_no_reset = 1",
        ] {
            std::fs::write(&p, bad).unwrap();
            let err = ResetPolicy::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains("policy.toml"), "{err}");
        }
    }
}
