//! Where image content is read from during an import: an OCI layout (a directory, or
//! the files of an extracted archive), a converted docker-archive, or a registry.
//! Every document and blob a source yields is checked against its digest.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

use oci_spec::image::ImageIndex;

use crate::blobs::BlobStore;
use crate::digest::Digest;
use crate::manifest::{self, MAX_DOCUMENT_BYTES};
use crate::Error;

/// Largest layer blob accepted from any source.
pub const MAX_BLOB_BYTES: u64 = 64 << 30;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{source_name}: {path} is missing; is this an OCI image layout (index.json, blobs/sha256/...)?")]
    Missing { source_name: String, path: String },
    #[error("{source_name}: reading {path}")]
    Io {
        source_name: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{source_name}: {path} is larger than {limit} bytes")]
    TooLarge {
        source_name: String,
        path: String,
        limit: u64,
    },
    #[error("{source_name}: {path} is not valid JSON of the expected shape")]
    Json {
        source_name: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{source_name}: {digest} hashes to {actual}; the source is corrupt or was tampered with"
    )]
    Mismatch {
        source_name: String,
        digest: Digest,
        actual: Digest,
    },
    #[error("{source_name}: no image tagged {tag:?} (tags present: {present})")]
    NoSuchTag {
        source_name: String,
        tag: String,
        present: String,
    },
    #[error("{source_name}: holds {count} images; name one with :TAG (tags present: {present})")]
    Ambiguous {
        source_name: String,
        count: usize,
        present: String,
    },
    #[error("{source_name}: holds no image")]
    Empty { source_name: String },
    #[error("{source_name}: blob {digest} is not in it")]
    NoBlob { source_name: String, digest: Digest },
}

/// A place image content is imported from.
pub trait Source {
    /// Names the source in messages (`oci:/path:tag`).
    fn name(&self) -> String;
    /// The digest and bytes of the document (index or manifest) the reference names.
    fn top(&self) -> Result<(Digest, Vec<u8>), Error>;
    /// A manifest, index or config by digest, verified and bounded.
    fn document(&self, digest: &Digest) -> Result<Vec<u8>, Error>;
    /// An image config blob (`size` from its descriptor), verified and bounded.
    fn config(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, Error> {
        let _ = size;
        self.document(digest)
    }
    /// Copies a blob into the store (verified there).
    fn blob_into(&self, digest: &Digest, size: u64, store: &BlobStore) -> Result<(), Error>;
}

pub(crate) fn read_bounded(
    source_name: &str,
    path: &str,
    reader: impl Read,
    limit: u64,
) -> Result<Vec<u8>, SourceError> {
    let mut bytes = Vec::new();
    reader
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| SourceError::Io {
            source_name: source_name.into(),
            path: path.into(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(SourceError::TooLarge {
            source_name: source_name.into(),
            path: path.into(),
            limit,
        });
    }
    Ok(bytes)
}

pub(crate) fn verify(source_name: &str, digest: &Digest, bytes: &[u8]) -> Result<(), SourceError> {
    let actual = Digest::of(bytes);
    if &actual != digest {
        return Err(SourceError::Mismatch {
            source_name: source_name.into(),
            digest: digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// The files of a layout: a directory, or files extracted from an archive by their
/// names inside it.
pub enum Files {
    Dir(PathBuf),
    Map(HashMap<String, PathBuf>),
}

impl Files {
    pub fn open(&self, source_name: &str, rel: &str) -> Result<File, SourceError> {
        let path = match self {
            Files::Dir(d) => Some(d.join(rel)),
            Files::Map(m) => m.get(rel).cloned(),
        };
        let missing = || SourceError::Missing {
            source_name: source_name.into(),
            path: rel.into(),
        };
        let path = path.ok_or_else(missing)?;
        File::open(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                missing()
            } else {
                SourceError::Io {
                    source_name: source_name.into(),
                    path: rel.into(),
                    source,
                }
            }
        })
    }
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout (`oci:DIR[:TAG]`, or an extracted `oci-archive:`).
pub struct Layout {
    pub name: String,
    pub files: Files,
    pub tag: Option<String>,
}

impl Layout {
    fn blob_path(digest: &Digest) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }
}

impl Source for Layout {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn top(&self) -> Result<(Digest, Vec<u8>), Error> {
        let file = self.files.open(&self.name, "index.json")?;
        let bytes = read_bounded(&self.name, "index.json", file, MAX_DOCUMENT_BYTES)?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|source| SourceError::Json {
                source_name: self.name.clone(),
                path: "index.json".into(),
                source,
            })?;
        let tags: Vec<String> = index
            .manifests()
            .iter()
            .filter_map(|d| d.annotations().as_ref()?.get(REF_NAME).cloned())
            .collect();
        let present = if tags.is_empty() {
            "none".to_owned()
        } else {
            tags.join(", ")
        };
        let candidates: Vec<_> = match &self.tag {
            Some(t) => index
                .manifests()
                .iter()
                .filter(|d| {
                    d.annotations()
                        .as_ref()
                        .and_then(|a| a.get(REF_NAME))
                        .is_some_and(|n| n == t || n.rsplit_once(':').is_some_and(|(_, x)| x == t))
                })
                .cloned()
                .collect(),
            None => index.manifests().clone(),
        };
        let index_digest = Digest::of(&bytes);
        let chosen = match candidates.len() {
            0 => {
                return Err(match &self.tag {
                    Some(t) => SourceError::NoSuchTag {
                        source_name: self.name.clone(),
                        tag: t.clone(),
                        present,
                    },
                    None => SourceError::Empty {
                        source_name: self.name.clone(),
                    },
                }
                .into())
            }
            1 => Digest::parse(candidates[0].digest().as_ref()).map_err(|source| {
                manifest::ManifestError::Descriptor {
                    what: "index",
                    digest: index_digest.clone(),
                    source,
                }
            })?,
            n => {
                // Several descriptors: a multi-platform index written flat; choose by platform.
                if candidates.iter().all(|d| d.platform().is_some()) {
                    manifest::select_platform_from(&index_digest, &candidates)?
                } else {
                    return Err(SourceError::Ambiguous {
                        source_name: self.name.clone(),
                        count: n,
                        present,
                    }
                    .into());
                }
            }
        };
        let doc = self.document(&chosen)?;
        Ok((chosen, doc))
    }

    fn document(&self, digest: &Digest) -> Result<Vec<u8>, Error> {
        let rel = Layout::blob_path(digest);
        let file = self.files.open(&self.name, &rel)?;
        let bytes = read_bounded(&self.name, &rel, file, MAX_DOCUMENT_BYTES)?;
        verify(&self.name, digest, &bytes)?;
        Ok(bytes)
    }

    fn blob_into(&self, digest: &Digest, size: u64, store: &BlobStore) -> Result<(), Error> {
        let rel = Layout::blob_path(digest);
        let file = self.files.open(&self.name, &rel)?;
        store.insert_reader(digest, file, Some(size), MAX_BLOB_BYTES)?;
        Ok(())
    }
}
