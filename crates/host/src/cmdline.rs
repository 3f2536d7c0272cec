//! The kernel command line, from `<root>/proc/cmdline`.

use crate::root::HostRoot;
use crate::sysfs::{self, SysfsError};

/// Errors reading the kernel command line.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("cannot read the kernel command line")]
    Read(#[source] SysfsError),
}

/// A parsed kernel command line: `key` or `key=value` words, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    params: Vec<(String, Option<String>)>,
}

impl KernelCmdline {
    /// Reads and parses `<root>/proc/cmdline`.
    pub fn read(root: &HostRoot) -> Result<Self, CmdlineError> {
        let text = sysfs::read_raw(&root.proc("cmdline")).map_err(CmdlineError::Read)?;
        Ok(Self::parse(&text))
    }

    /// Parses a command line. Quoted values (`key="a b"`) are kept whole.
    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        let mut word = String::new();
        let mut quoted = false;
        let mut push = |w: &mut String| {
            if !w.is_empty() {
                let (k, v) = match w.split_once('=') {
                    Some((k, v)) => (k.to_owned(), Some(v.trim_matches('"').to_owned())),
                    None => (w.clone(), None),
                };
                params.push((k, v));
                w.clear();
            }
        };
        for c in text.chars() {
            match c {
                '"' => {
                    quoted = !quoted;
                    word.push(c);
                }
                c if c.is_whitespace() && !quoted => push(&mut word),
                c => word.push(c),
            }
        }
        push(&mut word);
        Self { params }
    }

    /// The value of the last `key=value` for `key` (the kernel uses the last one), matched
    /// exactly (early parameters such as `intel_iommu` are not dash-insensitive);
    /// `Some(None)` when `key` appears without a value.
    pub fn get(&self, key: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref())
    }

    /// True when `key` appears at all.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The ACS override patch's parameter (`pcie_acs_override=downstream,multifunction`),
    /// which splits IOMMU groups without real isolation.
    pub fn acs_override(&self) -> Option<&str> {
        self.get("pcie_acs_override")
            .or_else(|| self.get("pcie-acs-override"))
            .map(|v| v.unwrap_or(""))
    }

    /// All parameters in order.
    pub fn params(&self) -> &[(String, Option<String>)] {
        &self.params
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_values_and_quotes() {
        let c = KernelCmdline::parse(
            "BOOT_IMAGE=/vmlinuz ro intel_iommu=on iommu=pt dyndbg=\"file a.c +p\" intel_iommu=off\n",
        );
        assert_eq!(c.get("intel_iommu"), Some(Some("off")));
        assert_eq!(c.get("ro"), Some(None));
        assert_eq!(c.get("dyndbg"), Some(Some("file a.c +p")));
        assert_eq!(c.get("amd_iommu"), None);
        assert_eq!(c.acs_override(), None);
        let c = KernelCmdline::parse("pcie-acs-override=downstream,multifunction");
        assert_eq!(c.acs_override(), Some("downstream,multifunction"));
    }
}
