//! The content-addressed blob directory: `blobs/sha256/<hex>`. A blob becomes visible
//! only after its bytes were hashed and matched the digest it is stored under (written to
//! a temporary file in the store, then renamed).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use gpucell_common::AtomicFile;

use crate::digest::{Digest, HashingReader};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {digest}: content does not match its digest (got {actual}, {size} bytes); the source is corrupt or was tampered with")]
    Mismatch {
        digest: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("blob {digest}: larger than the {limit}-byte limit for this kind of blob")]
    TooLarge { digest: Digest, limit: u64 },
    #[error("blob {digest}: size is {actual} bytes but its descriptor says {expected}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest} is not in the store at {path}; pull or import the image again")]
    Missing { digest: Digest, path: PathBuf },
    #[error("blob {digest}: {op} {path}")]
    Io {
        digest: Digest,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The blob directory of a store.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    /// `dir` holds the blobs; `tmp` is a directory on the same filesystem for partial files.
    pub fn new(dir: PathBuf, tmp: PathBuf) -> BlobStore {
        BlobStore { dir, tmp }
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Stores what `reader` yields under `digest` after checking it hashes to `digest`
    /// (and is `expected_size` long when given, and at most `limit` bytes). Nothing is
    /// visible under the digest unless the check passed.
    pub fn insert_reader(
        &self,
        digest: &Digest,
        reader: impl Read,
        expected_size: Option<u64>,
        limit: u64,
    ) -> Result<u64, BlobError> {
        let io_err = |op, path: &Path| {
            let digest = digest.clone();
            let path = path.to_owned();
            move |source| BlobError::Io {
                digest,
                op,
                path,
                source,
            }
        };
        let dest = self.path(digest);
        let mut tmp = AtomicFile::create_in(&dest, &self.tmp)
            .map_err(io_err("create a temporary file in", &self.tmp))?;
        let mut hashing = HashingReader::new(reader.take(limit.saturating_add(1)));
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = hashing
                .read(&mut buf)
                .map_err(io_err("read the source of", &self.path(digest)))?;
            if n == 0 {
                break;
            }
            tmp.write_all(&buf[..n])
                .map_err(io_err("write", tmp.temp_path()))?;
        }
        let size = hashing.count();
        if size > limit {
            return Err(BlobError::TooLarge {
                digest: digest.clone(),
                limit,
            });
        }
        let (actual, _) = hashing
            .finish(0)
            .map_err(io_err("read the source of", &self.path(digest)))?;
        if &actual != digest {
            return Err(BlobError::Mismatch {
                digest: digest.clone(),
                actual,
                size,
            });
        }
        if let Some(expected) = expected_size {
            if expected != size {
                return Err(BlobError::SizeMismatch {
                    digest: digest.clone(),
                    expected,
                    actual: size,
                });
            }
        }
        tmp.commit()
            .map_err(io_err("sync and rename a verified blob to", &dest))?;
        Ok(size)
    }

    /// Puts `file`, written in the store's temp directory by a caller that hashed
    /// exactly the bytes it wrote (`actual`, `size`), under `digest`: checked against
    /// `digest` and `expected_size`, then synced and renamed (one write of the bytes,
    /// where [`BlobStore::insert_reader`] copies them). On a mismatch `file` is removed.
    pub fn insert_hashed_file(
        &self,
        digest: &Digest,
        file: tempfile::TempPath,
        actual: Digest,
        size: u64,
        expected_size: u64,
    ) -> Result<u64, BlobError> {
        if &actual != digest {
            return Err(BlobError::Mismatch {
                digest: digest.clone(),
                actual,
                size,
            });
        }
        if size != expected_size {
            return Err(BlobError::SizeMismatch {
                digest: digest.clone(),
                expected: expected_size,
                actual: size,
            });
        }
        let dest = self.path(digest);
        gpucell_common::atomic::rename_synced(&file, &dest).map_err(|source| BlobError::Io {
            digest: digest.clone(),
            op: "sync and rename a verified blob to",
            path: dest.clone(),
            source,
        })?;
        // Renamed: nothing is left at the temporary path to remove.
        let _ = file.keep();
        Ok(size)
    }

    /// Stores `bytes` and returns their digest.
    pub fn insert_bytes(&self, bytes: &[u8]) -> Result<Digest, BlobError> {
        let digest = Digest::of(bytes);
        if !self.contains(&digest) {
            self.insert_reader(&digest, bytes, Some(bytes.len() as u64), bytes.len() as u64)?;
        }
        Ok(digest)
    }

    /// Reads a small blob (manifest, config) whole, checking its size bound and digest again.
    pub fn read_verified(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, BlobError> {
        let path = self.path(digest);
        let file = self.open(digest)?;
        let mut bytes = Vec::new();
        file.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|source| BlobError::Io {
                digest: digest.clone(),
                op: "read",
                path: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > limit {
            return Err(BlobError::TooLarge {
                digest: digest.clone(),
                limit,
            });
        }
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(BlobError::Mismatch {
                digest: digest.clone(),
                actual,
                size: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    pub fn open(&self, digest: &Digest) -> Result<File, BlobError> {
        let path = self.path(digest);
        File::open(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                BlobError::Missing {
                    digest: digest.clone(),
                    path: path.clone(),
                }
            } else {
                BlobError::Io {
                    digest: digest.clone(),
                    op: "open",
                    path: path.clone(),
                    source,
                }
            }
        })
    }

    /// Every blob in the store (files whose names are not digests are ignored).
    pub fn list(&self) -> io::Result<Vec<(Digest, u64)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Ok(d) = Digest::from_hex(&name) {
                out.push((d, entry.metadata()?.len()));
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn remove(&self, digest: &Digest) -> io::Result<()> {
        match fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

impl BlobStore {
    /// A temporary file in the store's temp directory, removed when dropped.
    pub fn temp_file(&self) -> io::Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix("dl-")
            .tempfile_in(&self.tmp)
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }
}
