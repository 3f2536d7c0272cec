//! Applying layers to a directory, safely. Every entry path is split into components
//! and resolved one `openat(O_NOFOLLOW)` at a time from a directory fd of the root, so
//! nothing is ever created or written outside the root: `..`, absolute names, symlinks
//! on the way (planted by any layer) and hard links out of the tree are refused.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use tracing::{debug, warn};

use crate::digest::{Digest, HashingReader};
use crate::manifest::Compression;
use crate::tarstream::{Entry, Kind, TarError, TarReader};

mod helpers;

pub use helpers::split_path;
use helpers::{list_dir, mkdir, os, set_xattrs, stat_nofollow, ts, CapExceeded, Capped};

/// Longest entry path accepted, and most components in it.
pub const MAX_PATH_BYTES: usize = 4096;
pub const MAX_DEPTH: usize = 256;
/// Directory fds kept open while unpacking (well under the usual 1024-fd limit).
const MAX_CACHED_DIRS: usize = 512;

/// Bounds on what unpacking an image may produce. Both must be positive
/// ([`crate::StoreOptions::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Total uncompressed tar bytes over all layers (the decompression-bomb cap).
    pub max_bytes: u64,
    /// Total entries over all layers.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 30,
            max_entries: 4_000_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: entry {entry:?}: {reason}; refusing the layer")]
    Unsafe {
        layer: String,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: malformed tar")]
    Tar {
        layer: String,
        #[source]
        source: TarError,
    },
    #[error("layer {layer}: unpacked size exceeds the limit of {limit} bytes (a decompression bomb, or raise the limit)")]
    TooLarge { layer: String, limit: u64 },
    #[error("layer {layer}: more than {limit} entries in the image")]
    TooManyEntries { layer: String, limit: u64 },
    #[error(
        "layer {layer}: uncompressed content is {actual}, but the image config says {expected}"
    )]
    DiffId {
        layer: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("layer {layer}: entry {entry:?}: {op}")]
    Io {
        layer: String,
        entry: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("opening the unpack root {path}")]
    Root {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

struct DirMeta {
    mode: u32,
    mtime: i64,
}

/// Applies layers, in order, to one root directory.
pub struct Unpacker {
    root: OwnedFd,
    limits: Limits,
    bytes: u64,
    entries: u64,
    as_root: bool,
    warned_owner: bool,
    dir_meta: HashMap<Vec<u8>, DirMeta>,
    /// Directories already resolved, by their joined path. Only removals can make an
    /// entry stale, and every removal clears the whole cache.
    cache: HashMap<Vec<u8>, OwnedFd>,
    buf: Vec<u8>,
    /// Device nodes dropped so far.
    pub dropped_devices: u64,
}

struct LayerCtx<'a> {
    layer: &'a str,
    entry: String,
}

impl LayerCtx<'_> {
    fn unsafe_(&self, reason: impl Into<String>) -> UnpackError {
        UnpackError::Unsafe {
            layer: self.layer.into(),
            entry: self.entry.clone(),
            reason: reason.into(),
        }
    }
    fn io(&self, op: &'static str) -> impl FnOnce(Errno) -> UnpackError + '_ {
        move |e| UnpackError::Io {
            layer: self.layer.into(),
            entry: self.entry.clone(),
            op,
            source: e.into(),
        }
    }
    fn stdio(&self, op: &'static str) -> impl FnOnce(io::Error) -> UnpackError + '_ {
        move |source| UnpackError::Io {
            layer: self.layer.into(),
            entry: self.entry.clone(),
            op,
            source,
        }
    }
}

impl Unpacker {
    /// `root` must be an existing, empty directory that only this unpacker writes.
    pub fn new(root: &Path, limits: Limits) -> Result<Unpacker, UnpackError> {
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| UnpackError::Root {
            path: root.to_owned(),
            source: e.into(),
        })?;
        Ok(Unpacker {
            root: fd,
            limits,
            bytes: 0,
            entries: 0,
            as_root: rustix::process::geteuid().is_root(),
            warned_owner: false,
            dir_meta: HashMap::new(),
            cache: HashMap::new(),
            buf: vec![0u8; 256 * 1024],
            dropped_devices: 0,
        })
    }

    /// Applies one layer blob. `layer` names it in errors (its digest). The uncompressed
    /// stream must hash to `diff_id`.
    pub fn apply_layer(
        &mut self,
        layer: &str,
        blob: impl Read,
        compression: Compression,
        diff_id: &Digest,
    ) -> Result<(), UnpackError> {
        let blob = BufReader::with_capacity(256 * 1024, blob);
        let decoder: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(blob).map_err(
                |source| UnpackError::Io {
                    layer: layer.into(),
                    entry: String::new(),
                    op: "start the zstd decoder",
                    source,
                },
            )?),
        };
        let capped = Capped {
            inner: decoder,
            count: 0,
            max: self.limits.max_bytes.saturating_sub(self.bytes),
            exceeded: false,
        };
        let mut tar = TarReader::new(HashingReader::new(capped));
        let mut created: HashSet<Vec<u8>> = HashSet::new();
        let result = self.apply_entries(layer, &mut tar, &mut created);
        let hashing = tar.into_inner();
        let exceeded = hashing.get_ref().exceeded;
        let too_large = || UnpackError::TooLarge {
            layer: layer.into(),
            limit: self.limits.max_bytes,
        };
        if exceeded {
            return Err(too_large());
        }
        result?;
        // Trailing blocks after the end marker are part of the diff_id.
        let finished = hashing.finish(u64::MAX);
        let (actual, count) = match finished {
            Ok(v) => v,
            Err(source) if source.get_ref().is_some_and(|e| e.is::<CapExceeded>()) => {
                return Err(too_large())
            }
            Err(source) => {
                return Err(UnpackError::Tar {
                    layer: layer.into(),
                    source: TarError::Io { offset: 0, source },
                })
            }
        };
        self.bytes += count;
        if &actual != diff_id {
            return Err(UnpackError::DiffId {
                layer: layer.into(),
                expected: diff_id.clone(),
                actual,
            });
        }
        Ok(())
    }

    fn apply_entries<R: Read>(
        &mut self,
        layer: &str,
        tar: &mut TarReader<R>,
        created: &mut HashSet<Vec<u8>>,
    ) -> Result<(), UnpackError> {
        while let Some(entry) = tar.next_entry().map_err(|source| UnpackError::Tar {
            layer: layer.into(),
            source,
        })? {
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(UnpackError::TooManyEntries {
                    layer: layer.into(),
                    limit: self.limits.max_entries,
                });
            }
            let ctx = LayerCtx {
                layer,
                entry: entry.display_path(),
            };
            self.apply_entry(&ctx, &entry, tar, created)?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        ctx: &LayerCtx<'_>,
        e: &Entry,
        tar: &mut TarReader<R>,
        created: &mut HashSet<Vec<u8>>,
    ) -> Result<(), UnpackError> {
        let comps = split_path(&e.path).map_err(|r| ctx.unsafe_(r))?;
        let Some((name, parent)) = comps.split_last() else {
            // The root itself ("./").
            return self.apply_root(ctx, e);
        };
        let name = *name;
        if let Some(target) = name.strip_prefix(b".wh.") {
            return self.whiteout(ctx, parent, target, created);
        }
        let joined = comps.join(&b'/');
        let parent_fd = self
            .parent(ctx, parent, true, created)?
            .ok_or_else(|| ctx.unsafe_("parent directory vanished while unpacking"))?;
        let parent_fd = rustix::io::dup(parent_fd.as_fd()).map_err(ctx.io("dup a directory fd"))?;
        let dirfd = parent_fd.as_fd();
        created.insert(joined.clone());
        match e.kind {
            Kind::Dir => self.make_dir(ctx, dirfd, name, joined, e)?,
            Kind::File => self.write_file(ctx, dirfd, name, e, tar)?,
            Kind::Symlink => self.make_symlink(ctx, dirfd, name, e)?,
            Kind::HardLink => self.hardlink(ctx, dirfd, name, e, created)?,
            Kind::Fifo => self.make_fifo(ctx, dirfd, name, e)?,
            Kind::CharDevice | Kind::BlockDevice => {
                created.remove(&joined);
                self.dropped_devices += 1;
                warn!(layer = ctx.layer, entry = %ctx.entry, "device node dropped: images may not carry devices");
            }
        }
        Ok(())
    }

    /// The root entry ("./"): only a directory entry counts, for its owner and metadata.
    fn apply_root(&mut self, ctx: &LayerCtx<'_>, e: &Entry) -> Result<(), UnpackError> {
        if e.kind == Kind::Dir {
            self.dir_meta.insert(
                Vec::new(),
                DirMeta {
                    mode: e.mode,
                    mtime: e.mtime,
                },
            );
            let root = rustix::io::dup(self.root.as_fd()).map_err(ctx.io("dup the root fd"))?;
            self.chown_at(ctx, root.as_fd(), None, e)?;
        }
        Ok(())
    }

    /// Makes (or merges into) a directory; its mode and mtime are set at the end.
    fn make_dir(
        &mut self,
        ctx: &LayerCtx<'_>,
        dirfd: BorrowedFd<'_>,
        name: &[u8],
        joined: Vec<u8>,
        e: &Entry,
    ) -> Result<(), UnpackError> {
        let existing = stat_nofollow(dirfd, name);
        match existing {
            Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
            Some(_) => {
                self.remove_all(ctx, dirfd, name, 0)?;
                mkdir(ctx, dirfd, name)?;
            }
            None => mkdir(ctx, dirfd, name)?,
        }
        let fd = rustix::fs::openat(
            dirfd,
            os(name),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(ctx.io("open the directory just made"))?;
        self.chown_at(ctx, fd.as_fd(), None, e)?;
        set_xattrs(ctx, fd.as_fd(), &e.xattrs);
        self.dir_meta.insert(
            joined,
            DirMeta {
                mode: e.mode,
                mtime: e.mtime,
            },
        );
        Ok(())
    }

    /// Writes a regular file from the entry's data, then its owner, mode, xattrs, mtime.
    fn write_file<R: Read>(
        &mut self,
        ctx: &LayerCtx<'_>,
        dirfd: BorrowedFd<'_>,
        name: &[u8],
        e: &Entry,
        tar: &mut TarReader<R>,
    ) -> Result<(), UnpackError> {
        self.clear(ctx, dirfd, name)?;
        let fd = rustix::fs::openat(
            dirfd,
            os(name),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(ctx.io("create the file"))?;
        let mut file = File::from(fd);
        let mut data = tar.data();
        loop {
            let n = data
                .read(&mut self.buf)
                .map_err(ctx.stdio("read the entry data"))?;
            if n == 0 {
                break;
            }
            file.write_all(&self.buf[..n])
                .map_err(ctx.stdio("write the file"))?;
        }
        self.chown_at(ctx, file.as_fd(), None, e)?;
        rustix::fs::fchmod(&file, Mode::from_raw_mode(e.mode))
            .map_err(ctx.io("set the file mode"))?;
        set_xattrs(ctx, file.as_fd(), &e.xattrs);
        rustix::fs::futimens(&file, &ts(e.mtime)).map_err(ctx.io("set the mtime"))?;
        Ok(())
    }

    fn make_symlink(
        &mut self,
        ctx: &LayerCtx<'_>,
        dirfd: BorrowedFd<'_>,
        name: &[u8],
        e: &Entry,
    ) -> Result<(), UnpackError> {
        if e.link.is_empty() || e.link.contains(&0) {
            return Err(ctx.unsafe_("symlink with an empty or NUL-containing target"));
        }
        self.clear(ctx, dirfd, name)?;
        rustix::fs::symlinkat(os(&e.link), dirfd, os(name))
            .map_err(ctx.io("create the symlink"))?;
        self.chown_at(ctx, dirfd, Some(name), e)?;
        rustix::fs::utimensat(dirfd, os(name), &ts(e.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(ctx.io("set the symlink mtime"))?;
        Ok(())
    }

    fn make_fifo(
        &mut self,
        ctx: &LayerCtx<'_>,
        dirfd: BorrowedFd<'_>,
        name: &[u8],
        e: &Entry,
    ) -> Result<(), UnpackError> {
        self.clear(ctx, dirfd, name)?;
        rustix::fs::mknodat(
            dirfd,
            os(name),
            FileType::Fifo,
            Mode::from_raw_mode(e.mode),
            0,
        )
        .map_err(ctx.io("create the fifo"))?;
        self.chown_at(ctx, dirfd, Some(name), e)?;
        // mknod applied the umask; chown cleared nothing a fifo keeps.
        rustix::fs::chmodat(
            dirfd,
            os(name),
            Mode::from_raw_mode(e.mode),
            AtFlags::empty(),
        )
        .map_err(ctx.io("set the fifo mode"))?;
        Ok(())
    }

    fn hardlink(
        &mut self,
        ctx: &LayerCtx<'_>,
        dirfd: BorrowedFd<'_>,
        name: &[u8],
        e: &Entry,
        created: &mut HashSet<Vec<u8>>,
    ) -> Result<(), UnpackError> {
        let target =
            split_path(&e.link).map_err(|r| ctx.unsafe_(format!("hard link target: {r}")))?;
        let Some((tname, tparent)) = target.split_last() else {
            return Err(ctx.unsafe_("hard link to the root directory"));
        };
        let tparent_fd = self
            .parent(ctx, tparent, false, created)?
            .ok_or_else(|| ctx.unsafe_("hard link target does not exist in the image"))?;
        let tparent_fd =
            rustix::io::dup(tparent_fd.as_fd()).map_err(ctx.io("dup a directory fd"))?;
        let st = stat_nofollow(tparent_fd.as_fd(), tname)
            .ok_or_else(|| ctx.unsafe_("hard link target does not exist in the image"))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            return Err(ctx.unsafe_("hard link to a directory"));
        }
        if let Some(cur) = stat_nofollow(dirfd, name) {
            if cur.st_ino == st.st_ino && cur.st_dev == st.st_dev {
                return Ok(());
            }
        }
        self.clear(ctx, dirfd, name)?;
        rustix::fs::linkat(
            tparent_fd.as_fd(),
            os(tname),
            dirfd,
            os(name),
            AtFlags::empty(),
        )
        .map_err(ctx.io("create the hard link"))
    }

    fn whiteout(
        &mut self,
        ctx: &LayerCtx<'_>,
        parent: &[&[u8]],
        target: &[u8],
        created: &mut HashSet<Vec<u8>>,
    ) -> Result<(), UnpackError> {
        let Some(dir) = self.parent(ctx, parent, false, created)? else {
            return Ok(()); // nothing below to hide
        };
        let dir = rustix::io::dup(dir.as_fd()).map_err(ctx.io("dup a directory fd"))?;
        if target == b".wh..opq" {
            let prefix = parent.join(&b'/');
            let mut victims = Vec::new();
            for name in list_dir(dir.as_fd()).map_err(ctx.io("list an opaque directory"))? {
                let mut p = prefix.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&name);
                if !created.contains(&p) {
                    victims.push(name);
                }
            }
            for v in victims {
                self.remove_all(ctx, dir.as_fd(), &v, 0)?;
            }
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." || target.starts_with(b".wh.") {
            return Err(ctx.unsafe_("whiteout of an invalid name"));
        }
        self.remove_all(ctx, dir.as_fd(), target, 0)
    }

    /// Removes whatever is at `name` unless it is a directory about to be merged into.
    fn clear(
        &mut self,
        ctx: &LayerCtx<'_>,
        dirfd: BorrowedFd<'_>,
        name: &[u8],
    ) -> Result<(), UnpackError> {
        if stat_nofollow(dirfd, name).is_some() {
            self.remove_all(ctx, dirfd, name, 0)?;
        }
        Ok(())
    }

    fn remove_all(
        &mut self,
        ctx: &LayerCtx<'_>,
        dirfd: BorrowedFd<'_>,
        name: &[u8],
        depth: usize,
    ) -> Result<(), UnpackError> {
        let Some(st) = stat_nofollow(dirfd, name) else {
            return Ok(());
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if depth > MAX_DEPTH {
                return Err(ctx.unsafe_("directory tree too deep to remove"));
            }
            self.cache.clear();
            let sub = rustix::fs::openat(
                dirfd,
                os(name),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(ctx.io("open a directory to remove"))?;
            for child in list_dir(sub.as_fd()).map_err(ctx.io("list a directory to remove"))? {
                self.remove_all(ctx, sub.as_fd(), &child, depth + 1)?;
            }
            rustix::fs::unlinkat(dirfd, os(name), AtFlags::REMOVEDIR)
                .map_err(ctx.io("remove a directory"))?;
        } else {
            rustix::fs::unlinkat(dirfd, os(name), AtFlags::empty()).map_err(ctx.io("remove"))?;
        }
        Ok(())
    }

    /// The directory at `comps` under the root, walked without following symlinks;
    /// created (0755, root-owned) when missing and `create`, else `None`.
    fn parent(
        &mut self,
        ctx: &LayerCtx<'_>,
        comps: &[&[u8]],
        create: bool,
        created: &mut HashSet<Vec<u8>>,
    ) -> Result<Option<BorrowedFd<'_>>, UnpackError> {
        if comps.is_empty() {
            return Ok(Some(self.root.as_fd()));
        }
        let key = comps.join(&b'/');
        if self.cache.contains_key(&key) {
            return Ok(self.cache.get(&key).map(|fd| fd.as_fd()));
        }
        // Start from the deepest ancestor already open.
        let mut start = 0;
        for i in (1..comps.len()).rev() {
            if self.cache.contains_key(&comps[..i].join(&b'/')) {
                start = i;
                break;
            }
        }
        if self.cache.len() + comps.len() > MAX_CACHED_DIRS {
            self.cache.clear();
            start = 0;
        }
        for i in start..comps.len() {
            let c = comps[i];
            let at = if i == 0 {
                self.root.as_fd()
            } else {
                match self.cache.get(&comps[..i].join(&b'/')) {
                    Some(fd) => fd.as_fd(),
                    None => return Err(ctx.unsafe_("internal: directory cache lost an ancestor")),
                }
            };
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let next = match rustix::fs::openat(at, os(c), flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(at, os(c), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(ctx.io("create a parent directory")(e)),
                    }
                    created.insert(comps[..=i].join(&b'/'));
                    rustix::fs::openat(at, os(c), flags, Mode::empty())
                        .map_err(ctx.io("open a parent directory"))?
                }
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::LOOP) => {
                    return Err(ctx.unsafe_(format!(
                        "{:?} is a symlink; writing through symlinks is refused",
                        String::from_utf8_lossy(&comps[..=i].join(&b'/'))
                    )))
                }
                Err(Errno::NOTDIR) => {
                    return Err(ctx.unsafe_(format!(
                        "{:?} is not a directory",
                        String::from_utf8_lossy(&comps[..=i].join(&b'/'))
                    )))
                }
                Err(e) => return Err(ctx.io("open a parent directory")(e)),
            };
            self.cache.insert(comps[..=i].join(&b'/'), next);
        }
        Ok(self.cache.get(&key).map(|fd| fd.as_fd()))
    }

    fn chown_at(
        &mut self,
        ctx: &LayerCtx<'_>,
        fd: BorrowedFd<'_>,
        name: Option<&[u8]>,
        e: &Entry,
    ) -> Result<(), UnpackError> {
        let (Ok(uid), Ok(gid)) = (u32::try_from(e.uid), u32::try_from(e.gid)) else {
            return Err(ctx.unsafe_("uid or gid does not fit in 32 bits"));
        };
        if uid == u32::MAX || gid == u32::MAX {
            return Err(ctx.unsafe_("uid or gid is -1"));
        }
        if !self.as_root {
            if !self.warned_owner && (uid != 0 || gid != 0) {
                warn!("not running as root: file ownership from the image is not kept");
                self.warned_owner = true;
            }
            return Ok(());
        }
        let (u, g) = (
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        );
        match name {
            Some(n) => rustix::fs::chownat(fd, os(n), u, g, AtFlags::SYMLINK_NOFOLLOW),
            None => rustix::fs::fchown(fd, u, g),
        }
        .map_err(ctx.io("set the owner"))
    }

    /// Applies directory modes and mtimes, recorded while unpacking, once all layers are in.
    pub fn finish(mut self) -> Result<(), UnpackError> {
        let mut metas: Vec<(Vec<u8>, DirMeta)> = self.dir_meta.drain().collect();
        metas.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
        let mut scratch = HashSet::new();
        for (path, meta) in metas {
            let ctx = LayerCtx {
                layer: "(directory metadata)",
                entry: String::from_utf8_lossy(&path).into_owned(),
            };
            let comps: Vec<&[u8]> = if path.is_empty() {
                Vec::new()
            } else {
                path.split(|&b| b == b'/').collect()
            };
            let fd = match self.parent(&ctx, &comps, false, &mut scratch) {
                Ok(Some(fd)) => rustix::io::dup(fd).map_err(ctx.io("dup a directory fd"))?,
                Ok(None) | Err(_) => continue, // removed by a later layer
            };
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode))
                .map_err(ctx.io("set the directory mode"))?;
            rustix::fs::futimens(&fd, &ts(meta.mtime))
                .map_err(ctx.io("set the directory mtime"))?;
        }
        debug!(bytes = self.bytes, entries = self.entries, "unpacked");
        Ok(())
    }
}
