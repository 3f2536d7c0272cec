//! Path checks and small filesystem helpers of the unpacker.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, Mode, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use tracing::warn;

use super::{LayerCtx, UnpackError, MAX_DEPTH, MAX_PATH_BYTES};

#[derive(Debug, thiserror::Error)]
#[error("unpacked size limit exceeded")]
pub(super) struct CapExceeded;

/// Counts decompressed bytes and fails past the cap.
pub(super) struct Capped<R> {
    pub(super) inner: R,
    pub(super) count: u64,
    pub(super) max: u64,
    pub(super) exceeded: bool,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.max {
            self.exceeded = true;
            return Err(io::Error::other(CapExceeded));
        }
        Ok(n)
    }
}

/// Splits an entry name into checked components (`./a//b` → `a`, `b`).
pub fn split_path(raw: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if raw.len() > MAX_PATH_BYTES {
        return Err("path longer than 4096 bytes");
    }
    if raw.contains(&0) {
        return Err("path contains a NUL byte");
    }
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path has a '..' component"),
            c if c.len() > 255 => return Err("path component longer than 255 bytes"),
            c => out.push(c),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err("path deeper than 256 directories");
    }
    Ok(out)
}

pub(super) fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

pub(super) fn ts(secs: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}
pub(super) fn mkdir(
    ctx: &LayerCtx<'_>,
    dirfd: BorrowedFd<'_>,
    name: &[u8],
) -> Result<(), UnpackError> {
    rustix::fs::mkdirat(dirfd, os(name), Mode::from_raw_mode(0o700))
        .map_err(ctx.io("create the directory"))
}

pub(super) fn stat_nofollow(dirfd: BorrowedFd<'_>, name: &[u8]) -> Option<rustix::fs::Stat> {
    rustix::fs::statat(dirfd, os(name), AtFlags::SYMLINK_NOFOLLOW).ok()
}

pub(super) fn list_dir(fd: BorrowedFd<'_>) -> Result<Vec<Vec<u8>>, Errno> {
    let mut out = Vec::new();
    let mut dir = rustix::fs::Dir::read_from(fd)?;
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    }
    Ok(out)
}

/// Xattrs in the `user.`, `security.` and `trusted.` namespaces are kept; overlayfs'
/// own attributes and anything else are dropped. A filesystem that cannot store one
/// gets a warning, not a failure.
pub(super) fn set_xattrs(ctx: &LayerCtx<'_>, fd: BorrowedFd<'_>, xattrs: &[(Vec<u8>, Vec<u8>)]) {
    for (name, value) in xattrs {
        let ok_ns = name.starts_with(b"user.")
            || name.starts_with(b"security.")
            || (name.starts_with(b"trusted.") && !name.starts_with(b"trusted.overlay."));
        if !ok_ns || name.contains(&0) || name.len() > 255 || value.len() > 64 * 1024 {
            warn!(layer = ctx.layer, entry = %ctx.entry, xattr = %String::from_utf8_lossy(name), "xattr dropped");
            continue;
        }
        if let Err(e) = rustix::fs::fsetxattr(fd, os(name), value, XattrFlags::empty()) {
            warn!(layer = ctx.layer, entry = %ctx.entry, xattr = %String::from_utf8_lossy(name), error = %e, "xattr not kept");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn split_refuses_escapes() {
        assert_eq!(split_path(b"./a//b/").unwrap(), vec![&b"a"[..], &b"b"[..]]);
        assert!(split_path(b"").unwrap().is_empty());
        assert!(split_path(b"a/../b").is_err());
        assert!(split_path(b"/etc/passwd").is_err());
        assert!(split_path(&[b'a'; 300]).is_err());
        assert!(split_path(&b"a/".repeat(300)).is_err());
    }
}
