//! Image references: local transports (`oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
//! `docker-archive:FILE[:TAG]`), registry references (`docker.io/library/busybox:1.36`,
//! `ghcr.io/org/img@sha256:...`, optionally prefixed `docker://`) and stored digests.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::digest::Digest;

/// Longest reference accepted.
pub const MAX_REFERENCE_LEN: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference is longer than {MAX_REFERENCE_LEN} bytes")]
    TooLong,
    #[error(
        "image reference {reference:?}: {transport}: needs a path, e.g. {transport}:/path/to/image"
    )]
    MissingPath {
        reference: String,
        transport: &'static str,
    },
    #[error("image reference {reference:?} is not a valid registry reference (expected [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST])")]
    Registry {
        reference: String,
        #[source]
        source: oci_spec::distribution::ParseError,
    },
    #[error("image reference {reference:?}: the digest is not sha256:<64 hex digits>")]
    Digest { reference: String },
    #[error("image reference {reference:?}: the tag contains characters a tag cannot have")]
    BadTag { reference: String },
    #[error("image reference {reference:?}: repository {repository:?} must be lower-case letters, digits and . _ - / separators")]
    BadRepository {
        reference: String,
        repository: String,
    },
}

/// A registry reference after normalization (`busybox` → `docker.io/library/busybox:latest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl RegistryRef {
    pub fn to_oci(&self) -> oci_spec::distribution::Reference {
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => oci_spec::distribution::Reference::with_tag_and_digest(
                self.registry.clone(),
                self.repository.clone(),
                t.clone(),
                d.to_string(),
            ),
            (_, Some(d)) => oci_spec::distribution::Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                d.to_string(),
            ),
            (t, None) => oci_spec::distribution::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                t.clone().unwrap_or_else(|| "latest".into()),
            ),
        }
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    OciLayout {
        dir: PathBuf,
        tag: Option<String>,
    },
    OciArchive {
        file: PathBuf,
        tag: Option<String>,
    },
    DockerArchive {
        file: PathBuf,
        tag: Option<String>,
    },
    Registry(RegistryRef),
    /// `sha256:<hex>`: an image already in the store, by manifest digest.
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if s.len() > MAX_REFERENCE_LEN {
            return Err(ReferenceError::TooLong);
        }
        for (prefix, transport) in [
            ("oci:", "oci"),
            ("oci-archive:", "oci-archive"),
            ("docker-archive:", "docker-archive"),
        ] {
            if let Some(rest) = s.strip_prefix(prefix) {
                let (path, tag) = split_path_tag(rest);
                if path.as_os_str().is_empty() {
                    return Err(ReferenceError::MissingPath {
                        reference: s.into(),
                        transport,
                    });
                }
                if let Some(t) = &tag {
                    if t.is_empty() || t.len() > 256 || t.chars().any(|c| c.is_control()) {
                        return Err(ReferenceError::BadTag {
                            reference: s.into(),
                        });
                    }
                }
                let path = std::path::absolute(&path).unwrap_or(path);
                return Ok(match transport {
                    "oci" => Reference::OciLayout { dir: path, tag },
                    "oci-archive" => Reference::OciArchive { file: path, tag },
                    _ => Reference::DockerArchive { file: path, tag },
                });
            }
        }
        if s.starts_with("sha256:") {
            return Digest::parse(s)
                .map(Reference::Digest)
                .map_err(|_| ReferenceError::Digest {
                    reference: s.into(),
                });
        }
        let name = s.strip_prefix("docker://").unwrap_or(s);
        let parsed: oci_spec::distribution::Reference =
            name.parse().map_err(|source| ReferenceError::Registry {
                reference: s.into(),
                source,
            })?;
        // The parser lets an upper-case repository through when the registry is implied
        // (`Foo/bar`), but not in the canonical form it normalizes to
        // (`docker.io/Foo/bar:latest`): refuse it here, as registries do.
        let repository = parsed.repository();
        if !repository
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' | b'/'))
        {
            return Err(ReferenceError::BadRepository {
                reference: s.into(),
                repository: repository.into(),
            });
        }
        let digest = match parsed.digest() {
            Some(d) => Some(Digest::parse(d).map_err(|_| ReferenceError::Digest {
                reference: s.into(),
            })?),
            None => None,
        };
        let tag = match (parsed.tag(), &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Reference::Registry(RegistryRef {
            registry: parsed.registry().to_owned(),
            repository: parsed.repository().to_owned(),
            tag,
            digest,
        }))
    }

    /// The name the store records for this reference.
    pub fn canonical(&self) -> String {
        let with_tag = |transport: &str, p: &Path, t: &Option<String>| match t {
            Some(t) => format!("{transport}:{}:{t}", p.display()),
            None => format!("{transport}:{}", p.display()),
        };
        match self {
            Reference::OciLayout { dir, tag } => with_tag("oci", dir, tag),
            Reference::OciArchive { file, tag } => with_tag("oci-archive", file, tag),
            Reference::DockerArchive { file, tag } => with_tag("docker-archive", file, tag),
            Reference::Registry(r) => r.to_string(),
            Reference::Digest(d) => d.to_string(),
        }
    }
}

/// `PATH[:TAG]`: a path that exists is taken whole; then the shortest existing prefix
/// before a `:` is the path and the rest the tag (`docker-archive:x.tar:busybox:1.36`);
/// otherwise the part after the last `:` is the tag when it has no `/`.
fn split_path_tag(rest: &str) -> (PathBuf, Option<String>) {
    if Path::new(rest).exists() {
        return (PathBuf::from(rest), None);
    }
    for (i, _) in rest.match_indices(':') {
        if i > 0 && Path::new(&rest[..i]).exists() {
            return (PathBuf::from(&rest[..i]), Some(rest[i + 1..].to_owned()));
        }
    }
    match rest.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') && !p.is_empty() => (PathBuf::from(p), Some(t.into())),
        _ => (PathBuf::from(rest), None),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reg(s: &str) -> RegistryRef {
        match Reference::parse(s).unwrap() {
            Reference::Registry(r) => r,
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    /// Found by the `image_reference` fuzz target: `Loorikeo/nc0s.c` parsed, its canonical
    /// form `docker.io/Loorikeo/nc0s.c:latest` did not.
    #[test]
    fn upper_case_repositories_are_refused_in_every_form() {
        for s in [
            "Loorikeo/nc0s.c",
            "docker.io/Loorikeo/nc0s.c",
            "Busybox",
            "ghcr.io/Org/img:v1",
        ] {
            let err = Reference::parse(s).unwrap_err();
            assert!(
                matches!(
                    err,
                    ReferenceError::BadRepository { .. } | ReferenceError::Registry { .. }
                ),
                "{s}: {err}"
            );
        }
        let r = Reference::parse("loorikeo/nc0s.c").unwrap();
        assert_eq!(Reference::parse(&r.canonical()).unwrap(), r);
    }

    #[test]
    fn normalizes_docker_hub_names() {
        let r = reg("busybox");
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        let r = reg("docker.io/library/busybox:1.36");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/busybox", Some("1.36"))
        );
        assert_eq!(
            reg("docker://alpine:3").to_string(),
            "docker.io/library/alpine:3"
        );
        assert_eq!(reg("user/app:v1").to_string(), "docker.io/user/app:v1");
    }

    #[test]
    fn parses_registry_with_port_and_digest() {
        let hex = "b".repeat(64);
        let r = reg(&format!("ghcr.io/org/img@sha256:{hex}"));
        assert_eq!(r.registry, "ghcr.io");
        assert_eq!(r.repository, "org/img");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.unwrap().hex(), hex);
        let r = reg("localhost:5000/a/b/c:tag");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost:5000", "a/b/c")
        );
        assert_eq!(r.to_oci().whole(), "localhost:5000/a/b/c:tag");
    }

    #[test]
    fn refuses_bad_registry_refs() {
        assert!(Reference::parse("has space/x").is_err());
        assert!(Reference::parse("repo:tag:extra").is_err());
        assert!(Reference::parse("a@sha256:short").is_err());
        assert!(Reference::parse("").is_err());
        assert!(Reference::parse(&"a".repeat(3000)).is_err());
        assert!(Reference::parse("ghcr.io/x@sha512:abcd").is_err());
    }

    #[test]
    fn parses_local_transports() {
        assert_eq!(
            Reference::parse("oci:/nonexistent/dir:v1").unwrap(),
            Reference::OciLayout {
                dir: "/nonexistent/dir".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            Reference::parse("oci-archive:/x/y.tar").unwrap(),
            Reference::OciArchive {
                file: "/x/y.tar".into(),
                tag: None
            }
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("img.tar");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(
            Reference::parse(&format!("docker-archive:{}:busybox:1.36", file.display())).unwrap(),
            Reference::DockerArchive {
                file,
                tag: Some("busybox:1.36".into())
            }
        );
        assert!(Reference::parse("oci:").is_err());
        let d = format!("sha256:{}", "c".repeat(64));
        assert!(matches!(
            Reference::parse(&d).unwrap(),
            Reference::Digest(_)
        ));
        assert!(Reference::parse("sha256:zz").is_err());
    }

    #[test]
    fn existing_path_with_colon_is_not_split() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a:b");
        std::fs::create_dir(&p).unwrap();
        let r = Reference::parse(&format!("oci:{}", p.display())).unwrap();
        assert_eq!(r, Reference::OciLayout { dir: p, tag: None });
    }
}
