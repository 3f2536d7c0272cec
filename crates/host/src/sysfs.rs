//! Bounded, validating readers for sysfs and procfs attribute files.
//!
//! Every file under the host root is treated as hostile: reads are capped, text must be
//! UTF-8, numbers must parse, and every error names the file it came from.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Largest attribute file read, in bytes. Real sysfs attributes are one page at most;
/// `/proc/cpuinfo` of a large host is the biggest text read here.
pub const MAX_ATTR_BYTES: u64 = 4 * 1024 * 1024;

/// Largest directory listing accepted (PCI functions, group members, ...).
pub const MAX_DIR_ENTRIES: usize = 65_536;

/// A sysfs/procfs file or link that could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is larger than {limit} bytes, which no kernel attribute is", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{} is not UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("{} is empty", path.display())]
    Empty { path: PathBuf },
    #[error("{} holds `{value}`, expected {expected}", path.display())]
    Garbled {
        path: PathBuf,
        value: String,
        expected: &'static str,
    },
    #[error("{} has more than {limit} entries", path.display())]
    TooManyEntries { path: PathBuf, limit: usize },
}

impl SysfsError {
    /// The file this error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::TooLarge { path, .. }
            | Self::NotUtf8 { path }
            | Self::Empty { path }
            | Self::Garbled { path, .. }
            | Self::TooManyEntries { path, .. } => path,
        }
    }

    /// True when the file or link does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn garbled(path: &Path, value: &str, expected: &'static str) -> Self {
        Self::Garbled {
            path: path.to_owned(),
            value: printable(value),
            expected,
        }
    }
}

/// An error and its causes on one line: `a: b: c` (the one home is
/// [`gpucell_common::chain_string`]; this name stays for the callers outside this crate).
pub use gpucell_common::chain_string as error_chain;

/// Shortens and escapes untrusted text for an error message or log line.
pub fn printable(value: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = value
        .chars()
        .take(MAX)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > MAX {
        out.push('…');
    }
    out
}

/// Reads a whole file as UTF-8, at most [`MAX_ATTR_BYTES`], without trimming.
pub fn read_raw(path: &Path) -> Result<String, SysfsError> {
    let file = File::open(path).map_err(|e| SysfsError::io(path, e))?;
    let mut buf = Vec::new();
    file.take(MAX_ATTR_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| SysfsError::io(path, e))?;
    if buf.len() as u64 > MAX_ATTR_BYTES {
        return Err(SysfsError::TooLarge {
            path: path.to_owned(),
            limit: MAX_ATTR_BYTES,
        });
    }
    String::from_utf8(buf).map_err(|_| SysfsError::NotUtf8 {
        path: path.to_owned(),
    })
}

/// Reads a one-value attribute: UTF-8, trimmed, not empty.
pub fn read_text(path: &Path) -> Result<String, SysfsError> {
    let text = read_raw(path)?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SysfsError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(trimmed.to_owned())
}

/// Like [`read_text`], but a missing file is `Ok(None)`.
pub fn read_text_opt(path: &Path) -> Result<Option<String>, SysfsError> {
    match read_text(path) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses `0x…` (or bare) hexadecimal into an integer that must fit `T`.
pub fn parse_hex<T: TryFrom<u64>>(
    path: &Path,
    text: &str,
    expected: &'static str,
) -> Result<T, SysfsError> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SysfsError::garbled(path, text, expected));
    }
    u64::from_str_radix(digits, 16)
        .ok()
        .and_then(|v| T::try_from(v).ok())
        .ok_or_else(|| SysfsError::garbled(path, text, expected))
}

/// Reads a hexadecimal attribute such as `vendor` (`0x10de`).
pub fn read_hex<T: TryFrom<u64>>(path: &Path, expected: &'static str) -> Result<T, SysfsError> {
    let text = read_text(path)?;
    parse_hex(path, &text, expected)
}

/// Reads a decimal attribute.
pub fn read_dec<T: std::str::FromStr>(
    path: &Path,
    expected: &'static str,
) -> Result<T, SysfsError> {
    let text = read_text(path)?;
    text.parse()
        .map_err(|_| SysfsError::garbled(path, &text, expected))
}

/// The last path component of a symbolic link's target (`driver -> ../../bus/pci/drivers/nvidia`
/// gives `nvidia`). `Ok(None)` when the link does not exist. The target need not exist:
/// only the link itself is read.
pub fn link_name(path: &Path) -> Result<Option<String>, SysfsError> {
    let target = match std::fs::read_link(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SysfsError::io(path, e)),
    };
    let name = target.file_name().ok_or_else(|| {
        SysfsError::garbled(
            path,
            &target.to_string_lossy(),
            "a link to a named directory",
        )
    })?;
    let name = name.to_str().ok_or_else(|| SysfsError::NotUtf8 {
        path: path.to_owned(),
    })?;
    Ok(Some(name.to_owned()))
}

/// Names in a directory, sorted; at most [`MAX_DIR_ENTRIES`].
pub fn list_dir(path: &Path) -> Result<Vec<OsString>, SysfsError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| SysfsError::io(path, e))? {
        let entry = entry.map_err(|e| SysfsError::io(path, e))?;
        if names.len() == MAX_DIR_ENTRIES {
            return Err(SysfsError::TooManyEntries {
                path: path.to_owned(),
                limit: MAX_DIR_ENTRIES,
            });
        }
        names.push(entry.file_name());
    }
    names.sort();
    Ok(names)
}

/// Like [`list_dir`], but a missing directory is an empty list.
pub fn list_dir_opt(path: &Path) -> Result<Vec<OsString>, SysfsError> {
    match list_dir(path) {
        Err(e) if e.is_not_found() => Ok(Vec::new()),
        other => other,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_validates_attributes() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("vendor"), "0x10de\n").unwrap();
        std::fs::write(p("empty"), "\n").unwrap();
        std::fs::write(p("garbled"), "0xzz\n").unwrap();
        std::fs::write(p("binary"), [0xff, 0xfe, 0x00]).unwrap();
        std::fs::write(p("big"), "0x1ffff").unwrap();
        assert_eq!(
            read_hex::<u16>(&p("vendor"), "a vendor id").unwrap(),
            0x10de
        );
        assert!(matches!(
            read_hex::<u16>(&p("empty"), "x"),
            Err(SysfsError::Empty { .. })
        ));
        assert!(matches!(
            read_hex::<u16>(&p("binary"), "x"),
            Err(SysfsError::NotUtf8 { .. })
        ));
        assert!(matches!(
            read_hex::<u16>(&p("big"), "x"),
            Err(SysfsError::Garbled { .. })
        ));
        let err = read_hex::<u16>(&p("garbled"), "a vendor id").unwrap_err();
        assert_eq!(err.path(), p("garbled"));
        assert!(err.to_string().contains("garbled") && err.to_string().contains("0xzz"));
        assert!(read_text(&p("missing")).unwrap_err().is_not_found());
        assert_eq!(read_text_opt(&p("missing")).unwrap(), None);
    }

    #[test]
    fn oversized_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge");
        let f = File::create(&path).unwrap();
        f.set_len(MAX_ATTR_BYTES + 10).unwrap();
        assert!(matches!(read_raw(&path), Err(SysfsError::TooLarge { .. })));
    }

    #[test]
    fn links_give_their_last_component_even_when_dangling() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("driver");
        std::os::unix::fs::symlink("../../bus/pci/drivers/vfio-pci", &link).unwrap();
        assert_eq!(link_name(&link).unwrap().as_deref(), Some("vfio-pci"));
        assert_eq!(link_name(&dir.path().join("nope")).unwrap(), None);
        std::os::unix::fs::symlink("/", dir.path().join("root")).unwrap();
        assert!(link_name(&dir.path().join("root")).is_err());
    }

    #[test]
    fn printable_escapes_and_truncates() {
        assert_eq!(printable("a\nb"), "a\\nb");
        assert_eq!(printable(&"x".repeat(100)).chars().count(), 65);
    }
}
