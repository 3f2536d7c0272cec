//! Index, manifest and config documents: parsing (with size bounds), choosing the
//! linux/amd64 manifest of a multi-platform index, and the runtime config of an image.

use std::collections::BTreeMap;

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestError};

/// Largest manifest, index or config document accepted (registries use the same bound).
pub const MAX_DOCUMENT_BYTES: u64 = 4 * 1024 * 1024;
/// Most layers an image may have.
pub const MAX_LAYERS: usize = 256;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{what} {digest}: not valid JSON of the expected shape")]
    Json {
        what: &'static str,
        digest: Digest,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest {digest}: media type {media_type:?} is neither an OCI/Docker image manifest nor an index")]
    UnknownMediaType { digest: Digest, media_type: String },
    #[error("index {digest}: no manifest for linux/amd64 (platforms present: {present}); pick an image built for linux/amd64")]
    NoPlatform { digest: Digest, present: String },
    #[error("index {digest} points to another index more than once; nesting this deep is refused")]
    TooDeep { digest: Digest },
    #[error("manifest {digest}: {count} layers, more than the {MAX_LAYERS} allowed")]
    TooManyLayers { digest: Digest, count: usize },
    #[error("manifest {digest}: layer {layer} has media type {media_type:?}, which is not a tar layer (plain, gzip or zstd)")]
    NotALayer {
        digest: Digest,
        layer: String,
        media_type: String,
    },
    #[error("{what} {digest}: bad digest in a descriptor")]
    Descriptor {
        what: &'static str,
        digest: Digest,
        #[source]
        source: DigestError,
    },
    #[error(
        "config {digest}: {layers} layers in the manifest but {diff_ids} diff_ids in the config"
    )]
    DiffIdCount {
        digest: Digest,
        layers: usize,
        diff_ids: usize,
    },
}

/// A parsed top-level document: either an index (multi-platform) or an image manifest.
pub enum Document {
    Index(Box<ImageIndex>),
    Manifest(Box<ImageManifest>),
}

/// Parses a manifest or index, telling them apart by `mediaType` (or by shape when absent).
pub fn parse_document(digest: &Digest, bytes: &[u8]) -> Result<Document, ManifestError> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let json = |what, source| ManifestError::Json {
        what,
        digest: digest.clone(),
        source,
    };
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| json("manifest", e))?;
    let is_index = match probe.media_type.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        None => probe.manifests.is_some(),
        Some(other) => {
            return Err(ManifestError::UnknownMediaType {
                digest: digest.clone(),
                media_type: other.chars().take(120).collect(),
            })
        }
    };
    if is_index {
        Ok(Document::Index(Box::new(
            serde_json::from_slice(bytes).map_err(|e| json("index", e))?,
        )))
    } else {
        Ok(Document::Manifest(Box::new(
            serde_json::from_slice(bytes).map_err(|e| json("manifest", e))?,
        )))
    }
}

/// Picks the linux/amd64 manifest of an index. Attestation entries (unknown/unknown) are
/// skipped; an index of one manifest without a platform is taken as it is.
pub fn select_platform(digest: &Digest, index: &ImageIndex) -> Result<Digest, ManifestError> {
    select_platform_from(digest, index.manifests())
}

pub fn select_platform_from(
    digest: &Digest,
    manifests: &[Descriptor],
) -> Result<Digest, ManifestError> {
    let descriptor_digest = |d: &Descriptor| {
        Digest::parse(d.digest().as_ref()).map_err(|source| ManifestError::Descriptor {
            what: "index",
            digest: digest.clone(),
            source,
        })
    };
    let mut fallback = None;
    for d in manifests {
        match d.platform() {
            Some(p) if *p.os() == Os::Linux && *p.architecture() == Arch::Amd64 => {
                return descriptor_digest(d);
            }
            None if manifests.len() == 1 => fallback = Some(d),
            _ => {}
        }
    }
    if let Some(d) = fallback {
        return descriptor_digest(d);
    }
    let present: Vec<String> = manifests
        .iter()
        .filter_map(|d| d.platform().as_ref())
        .map(|p| format!("{}/{}", p.os(), p.architecture()))
        .collect();
    Err(ManifestError::NoPlatform {
        digest: digest.clone(),
        present: if present.is_empty() {
            "none".into()
        } else {
            present.join(", ")
        },
    })
}

/// Compression of a layer blob, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        // Encrypted layers (`+encrypted`) cannot be unpacked without keys: refused.
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    /// Compression told by the first bytes of a blob (registries sometimes mislabel).
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// One layer of a stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    /// Digest of the uncompressed tar, from the config's `rootfs.diff_ids`.
    pub diff_id: Digest,
}

/// What `docker run` takes from an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    pub os: String,
    pub architecture: String,
}

/// Validates a manifest's layers and binds them to the config's diff_ids.
pub fn layers_of(
    manifest_digest: &Digest,
    manifest: &ImageManifest,
    config_digest: &Digest,
    config: &ImageConfiguration,
) -> Result<Vec<Layer>, ManifestError> {
    let descs = manifest.layers();
    if descs.len() > MAX_LAYERS {
        return Err(ManifestError::TooManyLayers {
            digest: manifest_digest.clone(),
            count: descs.len(),
        });
    }
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != descs.len() {
        return Err(ManifestError::DiffIdCount {
            digest: config_digest.clone(),
            layers: descs.len(),
            diff_ids: diff_ids.len(),
        });
    }
    let mut out = Vec::with_capacity(descs.len());
    for (d, diff_id) in descs.iter().zip(diff_ids) {
        let media_type = d.media_type().to_string();
        let digest_str = d.digest().to_string();
        if Compression::from_media_type(&media_type).is_none() {
            return Err(ManifestError::NotALayer {
                digest: manifest_digest.clone(),
                layer: digest_str,
                media_type,
            });
        }
        let digest = Digest::parse(&digest_str).map_err(|source| ManifestError::Descriptor {
            what: "manifest",
            digest: manifest_digest.clone(),
            source,
        })?;
        let diff_id = Digest::parse(diff_id).map_err(|source| ManifestError::Descriptor {
            what: "config",
            digest: config_digest.clone(),
            source,
        })?;
        out.push(Layer {
            digest,
            size: d.size(),
            media_type,
            diff_id,
        });
    }
    Ok(out)
}

/// The config descriptor's digest of a manifest.
pub fn config_digest(manifest_digest: &Digest, m: &ImageManifest) -> Result<Digest, ManifestError> {
    Digest::parse(m.config().digest().as_ref()).map_err(|source| ManifestError::Descriptor {
        what: "manifest",
        digest: manifest_digest.clone(),
        source,
    })
}

pub fn parse_config(digest: &Digest, bytes: &[u8]) -> Result<ImageConfiguration, ManifestError> {
    serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
        what: "config",
        digest: digest.clone(),
        source,
    })
}

/// The runtime part of an image configuration.
pub fn runtime_config(config: &ImageConfiguration) -> ImageConfig {
    let mut out = ImageConfig {
        os: config.os().to_string(),
        architecture: config.architecture().to_string(),
        ..ImageConfig::default()
    };
    if let Some(c) = config.config() {
        out.entrypoint = c.entrypoint().clone().unwrap_or_default();
        out.cmd = c.cmd().clone().unwrap_or_default();
        out.env = c.env().clone().unwrap_or_default();
        out.working_dir = c.working_dir().clone().unwrap_or_default();
        out.user = c.user().clone().unwrap_or_default();
        out.labels = c.labels().clone().unwrap_or_default().into_iter().collect();
        out.stop_signal = c.stop_signal().clone();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    /// A Docker manifest list as Docker Hub serves it, with a BuildKit attestation entry.
    fn docker_list() -> Vec<u8> {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST,
            "manifests": [
                {"mediaType": DOCKER_MANIFEST, "digest": d('a'), "size": 1,
                 "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": d('e'), "size": 1,
                 "platform": {"architecture": "unknown", "os": "unknown"},
                 "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
                {"mediaType": DOCKER_MANIFEST, "digest": d('b'), "size": 1,
                 "platform": {"architecture": "amd64", "os": "linux"}},
            ]
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn docker_manifest_list_resolves_to_amd64() {
        let bytes = docker_list();
        let digest = Digest::of(&bytes);
        let Document::Index(index) = parse_document(&digest, &bytes).unwrap() else {
            panic!("a manifest list parsed as a manifest");
        };
        assert_eq!(
            select_platform(&digest, &index).unwrap().to_string(),
            d('b')
        );
    }

    #[test]
    fn index_without_amd64_names_its_platforms() {
        let bytes = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": d('a'), "size": 1,
                           "platform": {"architecture": "s390x", "os": "linux"}}]
        })
        .to_string();
        let digest = Digest::of(bytes.as_bytes());
        let Document::Index(index) = parse_document(&digest, bytes.as_bytes()).unwrap() else {
            panic!("not an index");
        };
        let err = select_platform(&digest, &index).unwrap_err().to_string();
        assert!(err.contains("linux/s390x"), "{err}");
    }

    #[test]
    fn docker_v2_manifest_and_foreign_media_types() {
        let bytes = serde_json::json!({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": d('c'), "size": 2},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": d('1'), "size": 3}]
        })
        .to_string();
        let digest = Digest::of(bytes.as_bytes());
        assert!(matches!(
            parse_document(&digest, bytes.as_bytes()).unwrap(),
            Document::Manifest(_)
        ));
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.cncf.helm.chart.content.v1.tar+gzip"),
            None
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip+encrypted"),
            None
        );
        let unknown = br#"{"schemaVersion":2,"mediaType":"application/x-evil"}"#;
        assert!(parse_document(&Digest::of(unknown), unknown).is_err());
        assert!(parse_document(&Digest::of(b"not json"), b"not json").is_err());
    }
}
