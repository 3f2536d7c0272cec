//! A streaming tar reader for untrusted layers: ustar, GNU long names and PAX headers,
//! every size bounded, every malformed or truncated header an error naming its offset.

use std::io::{self, Read};

/// Largest PAX extended header or GNU long name/link accepted.
pub const MAX_EXTENSION_BYTES: u64 = 1024 * 1024;
const BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("tar stream truncated at byte {offset} (inside {what}); the layer is incomplete")]
    Truncated { offset: u64, what: &'static str },
    #[error("tar header at byte {offset}: checksum mismatch; the layer is corrupt or not a tar")]
    Checksum { offset: u64 },
    #[error("tar header at byte {offset}: field {field} is not a valid number")]
    Number { offset: u64, field: &'static str },
    #[error("tar header at byte {offset}: {what} of {size} bytes is larger than the {MAX_EXTENSION_BYTES}-byte limit")]
    ExtensionTooLarge {
        offset: u64,
        what: &'static str,
        size: u64,
    },
    #[error("tar header at byte {offset}: malformed PAX record")]
    Pax { offset: u64 },
    #[error("tar entry {path:?}: unsupported entry type {typeflag:?} (sparse and multi-volume entries are refused)")]
    Unsupported { path: String, typeflag: char },
    #[error("reading the tar stream at byte {offset}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// One entry's metadata; its data is read with [`TarReader::data`].
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub size: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    pub fn display_path(&self) -> String {
        String::from_utf8_lossy(&self.path)
            .chars()
            .take(300)
            .collect()
    }
}

pub struct TarReader<R> {
    inner: R,
    offset: u64,
    /// Data bytes of the current entry not read yet, then padding to skip.
    remaining: u64,
    padding: u64,
    done: bool,
}

#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<i64>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> TarReader<R> {
        TarReader {
            inner,
            offset: 0,
            remaining: 0,
            padding: 0,
            done: false,
        }
    }

    /// Gives back the underlying reader (positioned after the last block read).
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next entry, or `None` at the end-of-archive marker (or a clean end of input).
    pub fn next_entry(&mut self) -> Result<Option<Entry>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip_rest()?;
        let mut pending = Pending::default();
        loop {
            let header_offset = self.offset;
            let Some(block) = self.read_header()? else {
                self.done = true;
                return Ok(None);
            };
            verify_checksum(&block, header_offset)?;
            let typeflag = block[156];
            let size = match pending.size.take() {
                Some(s) if !matches!(typeflag, b'x' | b'g' | b'L' | b'K') => s,
                _ => number(&block[124..136], header_offset, "size")?,
            };
            self.remaining = size;
            self.padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
            if matches!(typeflag, b'x' | b'g' | b'L' | b'K') {
                self.read_extension(typeflag, size, header_offset, &mut pending)?;
                continue;
            }
            return entry_from_header(&block, header_offset, size, &mut pending).map(Some);
        }
    }

    /// The next header block; `None` at a clean end of input or the all-zero
    /// end-of-archive block.
    fn read_header(&mut self) -> Result<Option<[u8; BLOCK]>, TarError> {
        let mut block = [0u8; BLOCK];
        let n = self.read_full(&mut block)?;
        if n == 0 {
            // No end-of-archive marker: accepted, as many writers omit it.
            return Ok(None);
        }
        if n < BLOCK {
            return Err(TarError::Truncated {
                offset: self.offset,
                what: "a header",
            });
        }
        if block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        Ok(Some(block))
    }

    /// Reads the data of a PAX header or GNU long name/link of `size` bytes into
    /// `pending`, for the entry that follows.
    fn read_extension(
        &mut self,
        typeflag: u8,
        size: u64,
        header_offset: u64,
        pending: &mut Pending,
    ) -> Result<(), TarError> {
        let what = match typeflag {
            b'x' | b'g' => "PAX header",
            b'L' => "GNU long name",
            _ => "GNU long link",
        };
        if size > MAX_EXTENSION_BYTES {
            return Err(TarError::ExtensionTooLarge {
                offset: header_offset,
                what,
                size,
            });
        }
        let mut data = vec![0u8; size as usize];
        if self.read_full(&mut data)? < data.len() {
            return Err(TarError::Truncated {
                offset: self.offset,
                what,
            });
        }
        self.remaining = 0;
        self.skip_rest()?;
        match typeflag {
            b'x' => parse_pax(&data, header_offset, pending)?,
            b'g' => {} // global headers carry nothing a layer needs
            b'L' => pending.path = Some(trim_nul(&data).to_vec()),
            _ => pending.link = Some(trim_nul(&data).to_vec()),
        }
        Ok(())
    }

    /// A reader over the current entry's data.
    pub fn data(&mut self) -> EntryData<'_, R> {
        EntryData { tar: self }
    }

    fn skip_rest(&mut self) -> Result<(), TarError> {
        let mut left = self.remaining + self.padding;
        let mut buf = [0u8; 8192];
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = self.read_some(&mut buf[..want])?;
            if n == 0 {
                return Err(TarError::Truncated {
                    offset: self.offset,
                    what: "entry data",
                });
            }
            left -= n as u64;
        }
        self.remaining = 0;
        self.padding = 0;
        Ok(())
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(TarError::Truncated {
                        offset: self.offset,
                        what: "the compressed stream",
                    })
                }
                Err(source) => {
                    return Err(TarError::Io {
                        offset: self.offset,
                        source,
                    })
                }
            }
        }
    }

    fn read_full(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        let mut filled = 0;
        while filled < buf.len() {
            let n = self.read_some(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        Ok(filled)
    }
}

/// Reads exactly the current entry's data; a short stream is an error.
pub struct EntryData<'a, R> {
    tar: &'a mut TarReader<R>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.tar.remaining == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.tar.remaining) as usize;
        let n = self
            .tar
            .read_some(&mut buf[..want])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                TarError::Truncated {
                    offset: self.tar.offset,
                    what: "entry data",
                },
            ));
        }
        self.tar.remaining -= n as u64;
        Ok(n)
    }
}

/// The entry a (non-extension) header describes, with what `pending` extensions set
/// overriding the header's fields.
fn entry_from_header(
    block: &[u8; BLOCK],
    header_offset: u64,
    size: u64,
    pending: &mut Pending,
) -> Result<Entry, TarError> {
    let typeflag = block[156];
    let path = match pending.path.take() {
        Some(p) => p,
        None => ustar_path(block),
    };
    let kind = entry_kind(typeflag, &path)?;
    // Only regular files carry data; any size on other entries is skipped.
    Ok(Entry {
        link: pending
            .link
            .take()
            .unwrap_or_else(|| trim_nul(&block[157..257]).to_vec()),
        mode: number(&block[100..108], header_offset, "mode")? as u32 & 0o7777,
        uid: match pending.uid {
            Some(u) => u,
            None => number(&block[108..116], header_offset, "uid")?,
        },
        gid: match pending.gid {
            Some(g) => g,
            None => number(&block[116..124], header_offset, "gid")?,
        },
        mtime: match pending.mtime {
            Some(m) => m,
            None => i64::try_from(number(&block[136..148], header_offset, "mtime")?).unwrap_or(0),
        },
        size: if kind == Kind::File { size } else { 0 },
        xattrs: std::mem::take(&mut pending.xattrs),
        path,
        kind,
    })
}

/// The kind of an entry from its type flag; sparse, multi-volume and unknown types are
/// refused.
fn entry_kind(typeflag: u8, path: &[u8]) -> Result<Kind, TarError> {
    let kind = match typeflag {
        b'0' | 0 | b'7' => Kind::File,
        b'1' => Kind::HardLink,
        b'2' => Kind::Symlink,
        b'3' => Kind::CharDevice,
        b'4' => Kind::BlockDevice,
        b'5' => Kind::Dir,
        b'6' => Kind::Fifo,
        other => {
            return Err(TarError::Unsupported {
                path: String::from_utf8_lossy(path).chars().take(300).collect(),
                typeflag: other as char,
            })
        }
    };
    // Old tars mark directories with a trailing slash on a regular entry.
    if kind == Kind::File && typeflag == 0 && path.ends_with(b"/") {
        Ok(Kind::Dir)
    } else {
        Ok(kind)
    }
}

fn trim_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn ustar_path(block: &[u8; BLOCK]) -> Vec<u8> {
    let name = trim_nul(&block[0..100]);
    let is_ustar = &block[257..263] == b"ustar\0";
    let prefix = if is_ustar {
        trim_nul(&block[345..500])
    } else {
        &[][..]
    };
    if prefix.is_empty() {
        name.to_vec()
    } else {
        let mut p = prefix.to_vec();
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

fn verify_checksum(block: &[u8; BLOCK], offset: u64) -> Result<(), TarError> {
    let stored = number(&block[148..156], offset, "checksum")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if stored == unsigned || i64::try_from(stored).ok() == Some(signed) {
        Ok(())
    } else {
        Err(TarError::Checksum { offset })
    }
}

/// Octal (NUL/space padded) or GNU base-256 numbers.
fn number(field: &[u8], offset: u64, name: &'static str) -> Result<u64, TarError> {
    let err = || TarError::Number {
        offset,
        field: name,
    };
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return Err(err()); // negative
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            v = v.checked_mul(256).ok_or_else(err)? + u64::from(b);
        }
        return Ok(v);
    }
    let s = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != b' ' && b != 0)
        .collect::<Vec<u8>>();
    if s.is_empty() {
        return Ok(0);
    }
    let mut v: u64 = 0;
    for b in s {
        if !(b'0'..=b'7').contains(&b) {
            return Err(err());
        }
        v = v.checked_mul(8).ok_or_else(err)? + u64::from(b - b'0');
    }
    Ok(v)
}

fn parse_pax(data: &[u8], offset: u64, p: &mut Pending) -> Result<(), TarError> {
    let err = || TarError::Pax { offset };
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest.iter().position(|&b| b == b' ').ok_or_else(err)?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(err)?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(err());
        }
        let record = &rest[sp + 1..len - 1];
        rest = &rest[len..];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(err)?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        let num = |v: &[u8]| -> Result<u64, TarError> {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(err)
        };
        match key {
            b"path" => p.path = Some(value.to_vec()),
            b"linkpath" => p.link = Some(value.to_vec()),
            b"size" => p.size = Some(num(value)?),
            b"uid" => p.uid = Some(num(value)?),
            b"gid" => p.gid = Some(num(value)?),
            b"mtime" => {
                let whole = value.split(|&b| b == b'.').next().unwrap_or_default();
                p.mtime = std::str::from_utf8(whole).ok().and_then(|s| s.parse().ok());
            }
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    p.xattrs.push((name.to_vec(), value.to_vec()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(number(b"0000644\0", 0, "m").unwrap(), 0o644);
        assert_eq!(number(b"  755 \0", 0, "m").unwrap(), 0o755);
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 1, 0], 0, "m").unwrap(), 256);
        assert!(number(b"0009\0", 0, "m").is_err());
        assert!(number(&[0xff; 12], 0, "m").is_err());
    }

    #[test]
    fn pax_records() {
        let mut p = Pending::default();
        let rec = b"20 path=a/long/name\n25 SCHILY.xattr.user.k=v\n";
        parse_pax(rec, 0, &mut p).unwrap();
        assert_eq!(p.path.as_deref(), Some(&b"a/long/name"[..]));
        assert_eq!(p.xattrs, vec![(b"user.k".to_vec(), b"v".to_vec())]);
        assert!(parse_pax(b"99 path=x\n", 0, &mut Pending::default()).is_err());
        assert!(parse_pax(b"5 path=x\n", 0, &mut Pending::default()).is_err());
    }
}
