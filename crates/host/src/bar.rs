//! Base address registers, parsed from a function's sysfs `resource` file.
//!
//! Each line of `resource` is `start end flags` in hexadecimal. Lines 0-5 are the six
//! BARs, line 6 the expansion ROM, later lines bridge windows and SR-IOV BARs. A BAR
//! with start and end both 0 is not implemented.

use std::path::Path;

use serde::Serialize;

use crate::sysfs::SysfsError;

/// `IORESOURCE_IO`: the BAR is I/O port space.
pub const IORESOURCE_IO: u64 = 0x100;
/// `IORESOURCE_MEM`: the BAR is memory space.
pub const IORESOURCE_MEM: u64 = 0x200;
/// `IORESOURCE_PREFETCH`: memory BAR marked prefetchable.
pub const IORESOURCE_PREFETCH: u64 = 0x2000;
/// `IORESOURCE_MEM_64`: 64-bit memory BAR.
pub const IORESOURCE_MEM_64: u64 = 0x0010_0000;

/// Number of standard BARs of a type-0 function.
pub const BAR_COUNT: usize = 6;

/// What address space a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BarKind {
    Memory,
    Io,
}

/// One implemented BAR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bar {
    /// BAR number, 0-5.
    pub index: u8,
    pub kind: BarKind,
    /// Size in bytes (`end - start + 1`).
    pub size: u64,
    /// Host physical address where the kernel placed it.
    pub start: u64,
    pub is_64bit: bool,
    pub prefetchable: bool,
}

/// Parses the content of a `resource` file (named `path` in errors) into its implemented
/// BARs (lines 0-5). Lines after the sixth are ignored.
pub fn parse_resource(path: &Path, text: &str) -> Result<Vec<Bar>, SysfsError> {
    let mut bars = Vec::new();
    // Trailing blank lines carry no BAR; blank lines in between would shift indices
    // and are rejected below.
    for (index, line) in text.trim_end().lines().take(BAR_COUNT).enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [start, end, flags] = fields.as_slice() else {
            return Err(SysfsError::garbled(
                path,
                line,
                "three hexadecimal numbers per line",
            ));
        };
        let expected = "a hexadecimal address or flag word";
        let start: u64 = crate::sysfs::parse_hex(path, start, expected)?;
        let end: u64 = crate::sysfs::parse_hex(path, end, expected)?;
        let flags: u64 = crate::sysfs::parse_hex(path, flags, expected)?;
        if start == 0 && end == 0 {
            continue;
        }
        if end < start {
            return Err(SysfsError::garbled(
                path,
                line,
                "an end address not below the start",
            ));
        }
        let kind = if flags & IORESOURCE_MEM != 0 {
            BarKind::Memory
        } else if flags & IORESOURCE_IO != 0 {
            BarKind::Io
        } else {
            // Neither memory nor I/O: not a decoded BAR (e.g. disabled or unassigned).
            continue;
        };
        let Some(size) = (end - start).checked_add(1) else {
            return Err(SysfsError::garbled(
                path,
                line,
                "a BAR smaller than the address space",
            ));
        };
        bars.push(Bar {
            index: index as u8,
            kind,
            size,
            start,
            is_64bit: flags & IORESOURCE_MEM_64 != 0,
            prefetchable: flags & IORESOURCE_PREFETCH != 0,
        });
    }
    Ok(bars)
}

/// Formats a byte count with binary units: `256 GiB`, `16 MiB`, `1.5 KiB`, `512 B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        whole /= 1024;
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if bytes & (scale - 1) == 0 {
        format!("{whole} {}", UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const H200: &str = "0x0000104002000000 0x0000104002ffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000100000000000 0x0000103fffffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000104000000000 0x0000104001ffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

    #[test]
    fn parses_a_real_h200_resource_file() {
        let bars = parse_resource(Path::new("resource"), H200).unwrap();
        let sizes: Vec<(u8, u64)> = bars.iter().map(|b| (b.index, b.size)).collect();
        assert_eq!(sizes, vec![(0, 16 << 20), (2, 256 << 30), (4, 32 << 20)]);
        assert!(bars
            .iter()
            .all(|b| b.is_64bit && b.prefetchable && b.kind == BarKind::Memory));
        assert_eq!(bars[1].start, 0x1000_0000_0000);
    }

    #[test]
    fn reads_io_and_32bit_bars() {
        let text = "0x00000000fb000000 0x00000000fbffffff 0x0000000000040200
0x000000000000e000 0x000000000000e07f 0x0000000000040101
";
        let bars = parse_resource(Path::new("r"), text).unwrap();
        assert_eq!(bars[0].kind, BarKind::Memory);
        assert!(!bars[0].is_64bit && !bars[0].prefetchable);
        assert_eq!(bars[1].kind, BarKind::Io);
        assert_eq!(bars[1].size, 128);
    }

    #[test]
    fn garbled_lines_are_errors_naming_the_file() {
        for bad in [
            "0x1 0x2\n",
            "0x1000 0x0fff 0x200\n",
            "zz 0x10 0x200\n",
            "0x0 0xffffffffffffffff 0x200\n",
            "0x0 0x10 0x200 0x4\n",
        ] {
            let err = parse_resource(Path::new("/x/resource"), bad).unwrap_err();
            assert!(err.to_string().contains("/x/resource"), "{bad:?}: {err}");
        }
        assert!(parse_resource(Path::new("r"), "").unwrap().is_empty());
        let trailing = "0x1000 0x1fff 0x200\n\n";
        assert_eq!(parse_resource(Path::new("r"), trailing).unwrap().len(), 1);
        assert!(parse_resource(Path::new("r"), "\n0x1000 0x1fff 0x200\n").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(256 << 30), "256 GiB");
        assert_eq!(human_size(16 << 20), "16 MiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
    }
}
