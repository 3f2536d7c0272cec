//! `oci-archive:` and `docker-archive:` files (what skopeo and `docker save` write):
//! extracted to a temporary directory in the store (regular files only, names checked,
//! sizes bounded), then read as a layout or converted from docker's `manifest.json`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::blobs::BlobStore;
use crate::digest::{hash_reader, Digest};
use crate::manifest::{Compression, MAX_DOCUMENT_BYTES, OCI_MANIFEST};
use crate::source::{read_bounded, verify, Files, Source, SourceError, MAX_BLOB_BYTES};
use crate::tarstream::{Kind, TarReader};
use crate::unpack::split_path;
use crate::Error;

/// Most files an archive may hold.
pub const MAX_ARCHIVE_FILES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive {file}: opening it")]
    Open {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("archive {file}: malformed tar")]
    Tar {
        file: PathBuf,
        #[source]
        source: crate::tarstream::TarError,
    },
    #[error("archive {file}: entry {entry:?}: {reason}")]
    Entry {
        file: PathBuf,
        entry: String,
        reason: String,
    },
    #[error("archive {file}: more than {MAX_ARCHIVE_FILES} files")]
    TooManyFiles { file: PathBuf },
    #[error("archive {file}: extracting into {tmp}")]
    Write {
        file: PathBuf,
        tmp: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The regular files of an archive, copied into `into` and mapped by their names.
pub fn extract(file: &Path, into: &Path) -> Result<HashMap<String, PathBuf>, ArchiveError> {
    let open = |source| ArchiveError::Open {
        file: file.to_owned(),
        source,
    };
    let mut f = File::open(file).map_err(open)?;
    let mut head = [0u8; 4];
    let n = f.read(&mut head).map_err(open)?;
    f.rewind().map_err(open)?;
    let buffered = BufReader::with_capacity(256 * 1024, f);
    let reader: Box<dyn Read> = match Compression::sniff(&head[..n]) {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(open)?)
        }
    };
    let mut tar = TarReader::new(reader.take(MAX_BLOB_BYTES));
    let mut files = HashMap::new();
    let mut links = Vec::new();
    let entry_err = |entry: &str, reason: &str| ArchiveError::Entry {
        file: file.to_owned(),
        entry: entry.into(),
        reason: reason.into(),
    };
    let write_err = |source| ArchiveError::Write {
        file: file.to_owned(),
        tmp: into.to_owned(),
        source,
    };
    let mut buf = vec![0u8; 256 * 1024];
    while let Some(e) = tar.next_entry().map_err(|source| ArchiveError::Tar {
        file: file.to_owned(),
        source,
    })? {
        let name = e.display_path();
        let comps = split_path(&e.path).map_err(|r| entry_err(&name, r))?;
        let key = String::from_utf8(comps.join(&b'/'))
            .map_err(|_| entry_err(&name, "name is not UTF-8"))?;
        if files.len() + links.len() >= MAX_ARCHIVE_FILES {
            return Err(ArchiveError::TooManyFiles {
                file: file.to_owned(),
            });
        }
        match e.kind {
            Kind::File => {
                let dest = into.join(format!("f{}", files.len()));
                let mut out = File::create_new(&dest).map_err(write_err)?;
                let mut data = tar.data();
                loop {
                    let n = data.read(&mut buf).map_err(|source| ArchiveError::Tar {
                        file: file.to_owned(),
                        source: crate::tarstream::TarError::Io { offset: 0, source },
                    })?;
                    if n == 0 {
                        break;
                    }
                    out.write_all(&buf[..n]).map_err(write_err)?;
                }
                files.insert(key, dest);
            }
            // Legacy `docker save` links identical layers to each other.
            Kind::Symlink | Kind::HardLink => links.push((key, e.kind, e.link.clone(), name)),
            _ => {}
        }
    }
    for (key, kind, link, name) in links {
        let base = match kind {
            Kind::Symlink => key.rsplit_once('/').map_or("", |(d, _)| d).to_owned(),
            _ => String::new(),
        };
        let target = normalize(&base, &String::from_utf8_lossy(&link))
            .ok_or_else(|| entry_err(&name, "link leads outside the archive"))?;
        if let Some(p) = files.get(&target).cloned() {
            files.insert(key, p);
        }
    }
    Ok(files)
}

/// Joins `rel` to `base` lexically inside the archive; `None` if it climbs out.
fn normalize(base: &str, rel: &str) -> Option<String> {
    let mut out: Vec<&str> = if rel.starts_with('/') {
        Vec::new()
    } else {
        base.split('/').filter(|c| !c.is_empty()).collect()
    };
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A `docker-archive:` image, converted to an OCI manifest whose digest is stable for
/// the same archive content.
pub struct DockerArchive {
    name: String,
    manifest: (Digest, Vec<u8>),
    blobs: HashMap<Digest, PathBuf>,
}

impl DockerArchive {
    pub fn open(
        name: String,
        files: HashMap<String, PathBuf>,
        tag: Option<&str>,
    ) -> Result<DockerArchive, Error> {
        let files = Files::Map(files);
        let entries = read_docker_manifest(&name, &files)?;
        let chosen = choose_entry(&name, &entries, tag)?;
        if chosen.layers.len() > crate::manifest::MAX_LAYERS {
            return Err(SourceError::TooLarge {
                source_name: name,
                path: "manifest.json (layers)".into(),
                limit: crate::manifest::MAX_LAYERS as u64,
            }
            .into());
        }
        let mut blobs = HashMap::new();
        let mut config = describe_blob(&name, &files, &chosen.config, &mut blobs)?;
        config["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
        let layers = chosen
            .layers
            .iter()
            .map(|l| describe_blob(&name, &files, l, &mut blobs))
            .collect::<Result<Vec<_>, _>>()?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|source| SourceError::Json {
            source_name: name.clone(),
            path: "manifest.json".into(),
            source,
        })?;
        Ok(DockerArchive {
            name,
            manifest: (Digest::of(&bytes), bytes),
            blobs,
        })
    }
}

/// The entries of the archive's `manifest.json`.
fn read_docker_manifest(name: &str, files: &Files) -> Result<Vec<DockerManifestEntry>, Error> {
    let f = files.open(name, "manifest.json")?;
    let bytes = read_bounded(name, "manifest.json", f, MAX_DOCUMENT_BYTES)?;
    let entries = serde_json::from_slice(&bytes).map_err(|source| SourceError::Json {
        source_name: name.into(),
        path: "manifest.json".into(),
        source,
    })?;
    Ok(entries)
}

/// The entry tagged `tag`, or the only entry when no tag is asked for.
fn choose_entry<'a>(
    name: &str,
    entries: &'a [DockerManifestEntry],
    tag: Option<&str>,
) -> Result<&'a DockerManifestEntry, Error> {
    let present = entries
        .iter()
        .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(", ");
    match tag {
        Some(t) => entries
            .iter()
            .find(|e| {
                e.repo_tags.as_ref().is_some_and(|tags| {
                    tags.iter().any(|x| x == t || x.ends_with(&format!("/{t}")))
                })
            })
            .ok_or_else(|| {
                SourceError::NoSuchTag {
                    source_name: name.into(),
                    tag: t.into(),
                    present,
                }
                .into()
            }),
        None => match entries {
            [one] => Ok(one),
            [] => Err(SourceError::Empty {
                source_name: name.into(),
            }
            .into()),
            many => Err(SourceError::Ambiguous {
                source_name: name.into(),
                count: many.len(),
                present,
            }
            .into()),
        },
    }
}

/// The OCI descriptor of the archive file `rel` (its media type sniffed from its first
/// bytes), recording where the blob lies in `blobs`.
fn describe_blob(
    name: &str,
    files: &Files,
    rel: &str,
    blobs: &mut HashMap<Digest, PathBuf>,
) -> Result<serde_json::Value, Error> {
    let mut f = files.open(name, rel)?;
    let io_err = |source| SourceError::Io {
        source_name: name.into(),
        path: rel.into(),
        source,
    };
    let mut head = [0u8; 4];
    let n = f.read(&mut head).map_err(io_err)?;
    f.rewind().map_err(io_err)?;
    let (digest, size) = hash_reader(&mut f, MAX_BLOB_BYTES).map_err(io_err)?;
    let media_type = match Compression::sniff(&head[..n]) {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    };
    let path = match files {
        Files::Map(m) => m.get(rel).cloned().unwrap_or_default(),
        Files::Dir(d) => d.join(rel),
    };
    let value = serde_json::json!({
        "mediaType": media_type,
        "digest": digest.to_string(),
        "size": size,
    });
    blobs.insert(digest, path);
    Ok(value)
}

impl Source for DockerArchive {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn top(&self) -> Result<(Digest, Vec<u8>), Error> {
        Ok(self.manifest.clone())
    }

    fn document(&self, digest: &Digest) -> Result<Vec<u8>, Error> {
        if digest == &self.manifest.0 {
            return Ok(self.manifest.1.clone());
        }
        let path = self.blobs.get(digest).ok_or_else(|| SourceError::NoBlob {
            source_name: self.name.clone(),
            digest: digest.clone(),
        })?;
        let rel = path.display().to_string();
        let f = File::open(path).map_err(|source| SourceError::Io {
            source_name: self.name.clone(),
            path: rel.clone(),
            source,
        })?;
        let bytes = read_bounded(&self.name, &rel, f, MAX_DOCUMENT_BYTES)?;
        verify(&self.name, digest, &bytes)?;
        Ok(bytes)
    }

    fn blob_into(&self, digest: &Digest, size: u64, store: &BlobStore) -> Result<(), Error> {
        let path = self.blobs.get(digest).ok_or_else(|| SourceError::NoBlob {
            source_name: self.name.clone(),
            digest: digest.clone(),
        })?;
        let f = File::open(path).map_err(|source| SourceError::Io {
            source_name: self.name.clone(),
            path: path.display().to_string(),
            source,
        })?;
        store.insert_reader(digest, f, Some(size), MAX_BLOB_BYTES)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::normalize;

    #[test]
    fn normalize_stays_inside() {
        assert_eq!(
            normalize("a", "../b/layer.tar").as_deref(),
            Some("b/layer.tar")
        );
        assert_eq!(normalize("", "../x"), None);
        assert_eq!(normalize("a/b", "./c").as_deref(), Some("a/b/c"));
    }
}
