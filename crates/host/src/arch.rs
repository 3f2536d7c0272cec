//! GPU architecture by device id, from the table shipped in `data/gpu-architectures.toml`.

use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// The table compiled into the binary.
pub const EMBEDDED_TABLE: &str = include_str!("../../../data/gpu-architectures.toml");

/// NVIDIA GPU architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Architecture {
    Maxwell,
    Pascal,
    Volta,
    Turing,
    Ampere,
    Hopper,
    Ada,
    Blackwell,
}

impl Architecture {
    /// True for architectures NVIDIA's open kernel modules support (Turing and newer).
    pub fn has_open_kernel_modules(self) -> bool {
        self >= Self::Turing
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Errors loading an architecture table.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("GPU architecture table is not valid TOML of the expected shape")]
    Parse(#[source] toml::de::Error),
    #[error("GPU architecture table: range {first:#06x}-{last:#06x} ends before it starts")]
    BadRange { first: u16, last: u16 },
    #[error("GPU architecture table: ranges {a} and {b} overlap; make them disjoint")]
    Overlap { a: String, b: String },
    #[error("GPU architecture table: device id {id:#06x} is listed twice")]
    DuplicateId { id: u16 },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdEntry {
    id: u16,
    architecture: Architecture,
    model: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeEntry {
    first: u16,
    last: u16,
    architecture: Architecture,
    chip: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    #[serde(default)]
    id: Vec<IdEntry>,
    #[serde(default)]
    range: Vec<RangeEntry>,
}

/// What the table says about one device id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchMatch {
    pub architecture: Architecture,
    /// The product (explicit entries) or chip (ranges) the entry names.
    pub label: String,
}

/// A validated architecture table.
#[derive(Debug, Clone)]
pub struct ArchTable {
    ids: Vec<IdEntry>,
    ranges: Vec<RangeEntry>,
}

impl ArchTable {
    /// Parses and validates a table: ranges well-formed and disjoint, ids unique.
    pub fn from_toml(text: &str) -> Result<Self, ArchError> {
        let raw: RawTable = toml::from_str(text).map_err(ArchError::Parse)?;
        let mut ranges = raw.range;
        ranges.sort_by_key(|r| r.first);
        for r in &ranges {
            if r.last < r.first {
                return Err(ArchError::BadRange {
                    first: r.first,
                    last: r.last,
                });
            }
        }
        for pair in ranges.windows(2) {
            if let [a, b] = pair {
                if b.first <= a.last {
                    return Err(ArchError::Overlap {
                        a: format!("{} {:#06x}-{:#06x}", a.chip, a.first, a.last),
                        b: format!("{} {:#06x}-{:#06x}", b.chip, b.first, b.last),
                    });
                }
            }
        }
        let mut ids = raw.id;
        ids.sort_by_key(|e| e.id);
        for pair in ids.windows(2) {
            if let [a, b] = pair {
                if a.id == b.id {
                    return Err(ArchError::DuplicateId { id: a.id });
                }
            }
        }
        Ok(Self { ids, ranges })
    }

    /// The table shipped with gpucell. Parsed once; an error here is a packaging bug and
    /// is logged, after which every lookup answers `None`.
    pub fn embedded() -> Option<&'static Self> {
        static TABLE: OnceLock<Option<ArchTable>> = OnceLock::new();
        TABLE
            .get_or_init(|| match Self::from_toml(EMBEDDED_TABLE) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!("{}", gpucell_common::chain_string(&e));
                    None
                }
            })
            .as_ref()
    }

    /// The architecture of NVIDIA device id `device`: an explicit entry, else a range.
    pub fn lookup(&self, device: u16) -> Option<ArchMatch> {
        if let Ok(i) = self.ids.binary_search_by_key(&device, |e| e.id) {
            let e = self.ids.get(i)?;
            return Some(ArchMatch {
                architecture: e.architecture,
                label: e.model.clone(),
            });
        }
        self.ranges
            .iter()
            .find(|r| (r.first..=r.last).contains(&device))
            .map(|r| ArchMatch {
                architecture: r.architecture,
                label: r.chip.clone(),
            })
    }

    /// Number of entries (explicit ids, ranges).
    pub fn len(&self) -> (usize, usize) {
        (self.ids.len(), self.ranges.len())
    }
}

/// Looks `device` (vendor 0x10de) up in the embedded table.
pub fn architecture_of(device: u16) -> Option<Architecture> {
    ArchTable::embedded()?
        .lookup(device)
        .map(|m| m.architecture)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn embedded_table_parses_and_covers_the_required_gpus() {
        let t = ArchTable::from_toml(EMBEDDED_TABLE).unwrap();
        let cases = [
            (0x1e04, Architecture::Turing),    // RTX 2080 Ti
            (0x1f08, Architecture::Turing),    // RTX 2060
            (0x1eb8, Architecture::Turing),    // T4
            (0x2204, Architecture::Ampere),    // RTX 3090
            (0x2489, Architecture::Ampere),    // RTX 3060 Ti
            (0x20b2, Architecture::Ampere),    // A100 80GB SXM
            (0x2684, Architecture::Ada),       // RTX 4090
            (0x2882, Architecture::Ada),       // RTX 4060
            (0x27b8, Architecture::Ada),       // L4
            (0x26b9, Architecture::Ada),       // L40S
            (0x2330, Architecture::Hopper),    // H100 SXM
            (0x2335, Architecture::Hopper),    // H200
            (0x2901, Architecture::Blackwell), // B200
            (0x2b85, Architecture::Blackwell), // RTX 5090
            (0x2c02, Architecture::Blackwell), // RTX 5080
            (0x2f04, Architecture::Blackwell), // RTX 5070
            (0x2d04, Architecture::Blackwell), // RTX 5060 Ti
        ];
        for (id, arch) in cases {
            assert_eq!(
                t.lookup(id).map(|m| m.architecture),
                Some(arch),
                "{id:#06x}"
            );
        }
        assert_eq!(t.lookup(0x2335).unwrap().label, "H200 SXM 141GB");
        assert_eq!(t.lookup(0x0001), None);
        assert_eq!(architecture_of(0x2335), Some(Architecture::Hopper));
    }

    /// Cross-checks the table against the chip names in the PCI ID database: every device
    /// whose name starts with a chip code (TU104, GA102, AD102GL, GH100, GB202, ...) and
    /// that the table covers must get that chip's architecture, and every GPU-like entry
    /// of the chips gpucell targets must be covered.
    #[test]
    fn table_agrees_with_the_pci_id_database() {
        let t = ArchTable::from_toml(EMBEDDED_TABLE).unwrap();
        let vendor = <pci_ids::Vendor as pci_ids::FromId<u16>>::from_id(0x10de).unwrap();
        let mut checked = 0;
        for dev in vendor.devices() {
            let name = dev.name();
            let arch = match name.get(..2) {
                Some("GP") => Architecture::Pascal,
                Some("GV") => Architecture::Volta,
                Some("TU") => Architecture::Turing,
                Some("GA") => Architecture::Ampere,
                Some("GH") => Architecture::Hopper,
                Some("AD") => Architecture::Ada,
                Some("GB") => Architecture::Blackwell,
                _ => continue,
            };
            let non_gpu = ["Audio", "USB", "UCSI", "Serial", "NVSwitch", "NVLink"]
                .iter()
                .any(|w| name.contains(w));
            if non_gpu {
                continue;
            }
            match t.lookup(dev.id()) {
                Some(m) => {
                    assert_eq!(m.architecture, arch, "{:#06x} {name}", dev.id());
                    checked += 1;
                }
                None => {
                    let targeted = ["TU", "GA", "AD", "GH"].iter().any(|p| name.starts_with(p))
                        || ["GB100", "GB202", "GB203", "GB205", "GB206", "GB207"]
                            .iter()
                            .any(|p| name.starts_with(p));
                    assert!(!targeted, "{:#06x} {name} is not in the table", dev.id());
                }
            }
        }
        assert!(checked > 300, "only {checked} ids cross-checked");
    }

    #[test]
    fn bad_tables_are_rejected() {
        let overlap = "[[range]]\nfirst=1\nlast=10\narchitecture=\"Ada\"\nchip=\"a\"\n\
                       [[range]]\nfirst=10\nlast=12\narchitecture=\"Ada\"\nchip=\"b\"\n";
        assert!(matches!(
            ArchTable::from_toml(overlap),
            Err(ArchError::Overlap { .. })
        ));
        let backwards = "[[range]]\nfirst=10\nlast=1\narchitecture=\"Ada\"\nchip=\"a\"\n";
        assert!(matches!(
            ArchTable::from_toml(backwards),
            Err(ArchError::BadRange { .. })
        ));
        let dup = "[[id]]\nid=1\narchitecture=\"Ada\"\nmodel=\"a\"\n[[id]]\nid=1\narchitecture=\"Ada\"\nmodel=\"b\"\n";
        assert!(matches!(
            ArchTable::from_toml(dup),
            Err(ArchError::DuplicateId { id: 1 })
        ));
        let unknown_arch = "[[id]]\nid=1\narchitecture=\"Fermi2\"\nmodel=\"a\"\n";
        assert!(ArchTable::from_toml(unknown_arch).is_err());
        let typo = "[[id]]\nid=1\narch=\"Ada\"\nmodel=\"a\"\n";
        assert!(ArchTable::from_toml(typo).is_err());
        let too_big = "[[id]]\nid=0x10000\narchitecture=\"Ada\"\nmodel=\"a\"\n";
        assert!(ArchTable::from_toml(too_big).is_err());
    }
}
