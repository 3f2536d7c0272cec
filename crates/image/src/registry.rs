//! Pulling from registries with `oci-client` (anonymous, basic or bearer-token auth).
//! Index resolution and every digest check use the same code as local layouts; the
//! client only moves bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWrite;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;

use crate::blobs::BlobStore;
use crate::digest::Digest;
use crate::manifest::{DOCKER_LIST, DOCKER_MANIFEST, MAX_DOCUMENT_BYTES, OCI_INDEX, OCI_MANIFEST};
use crate::reference::RegistryRef;
use crate::source::{verify, Source, MAX_BLOB_BYTES};
use crate::Error;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {registry}: starting the network runtime")]
    Runtime {
        registry: String,
        #[source]
        source: io::Error,
    },
    #[error("{reference}: {what} (check the name, the network, and the registry credentials)")]
    Client {
        reference: String,
        what: &'static str,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("{reference}: manifest of {size} bytes is larger than {MAX_DOCUMENT_BYTES}")]
    TooLarge { reference: String, size: usize },
    #[error("{reference}: registry answered digest {answered} but the reference pins {pinned}")]
    Pinned {
        reference: String,
        answered: Digest,
        pinned: Digest,
    },
    #[error("{reference}: downloading blob {digest} into {path}")]
    Download {
        reference: String,
        digest: Digest,
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How to reach registries: credentials and the transport.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryOptions {
    pub auth: RegistryCredentials,
    /// Plain HTTP instead of HTTPS (a local test registry only).
    pub insecure: bool,
}

/// Credentials sent to every registry pulled from. Anonymous pulls still get the
/// registry's bearer token through its token endpoint. In a config file:
/// `auth = { kind = "bearer", token = "..." }` or
/// `auth = { kind = "basic", username = "...", password = "..." }`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RegistryCredentials {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    Bearer {
        token: String,
    },
}

/// Never prints a secret.
impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Self::Bearer { .. } => f
                .debug_struct("Bearer")
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

impl RegistryCredentials {
    fn to_auth(&self) -> RegistryAuth {
        match self {
            Self::Anonymous => RegistryAuth::Anonymous,
            Self::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Self::Bearer { token } => RegistryAuth::Bearer(token.clone()),
        }
    }
}

pub struct Registry {
    reference: RegistryRef,
    oci_ref: oci_client::Reference,
    client: Client,
    auth: RegistryAuth,
    runtime: tokio::runtime::Runtime,
}

impl Registry {
    pub fn new(
        reference: RegistryRef,
        options: &RegistryOptions,
    ) -> Result<Registry, RegistryError> {
        // rustls needs a process-wide crypto provider; a second install is a no-op error.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| RegistryError::Runtime {
                registry: reference.registry.clone(),
                source,
            })?;
        let protocol = if options.insecure {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            ..ClientConfig::default()
        });
        Ok(Registry {
            oci_ref: reference.to_oci(),
            reference,
            client,
            auth: options.auth.to_auth(),
            runtime,
        })
    }

    fn raw(&self, r: &oci_client::Reference) -> Result<(Digest, Vec<u8>), Error> {
        let name = self.reference.to_string();
        let accepted = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
        let (bytes, _claimed) = self
            .runtime
            .block_on(self.client.pull_manifest_raw(r, &self.auth, &accepted))
            .map_err(|source| RegistryError::Client {
                reference: name.clone(),
                what: "fetching the manifest",
                source,
            })?;
        if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
            return Err(RegistryError::TooLarge {
                reference: name,
                size: bytes.len(),
            }
            .into());
        }
        // The digest is computed here, never taken from the registry's header.
        Ok((Digest::of(&bytes), bytes.to_vec()))
    }
}

impl Source for Registry {
    fn name(&self) -> String {
        self.reference.to_string()
    }

    fn top(&self) -> Result<(Digest, Vec<u8>), Error> {
        let (digest, bytes) = self.raw(&self.oci_ref)?;
        if let Some(pinned) = &self.reference.digest {
            if pinned != &digest {
                return Err(RegistryError::Pinned {
                    reference: self.name(),
                    answered: digest,
                    pinned: pinned.clone(),
                }
                .into());
            }
        }
        Ok((digest, bytes))
    }

    fn document(&self, digest: &Digest) -> Result<Vec<u8>, Error> {
        let r = self.oci_ref.clone_with_digest(digest.to_string());
        let (actual, bytes) = self.raw(&r)?;
        verify(&self.name(), digest, &bytes)?;
        debug_assert_eq!(&actual, digest);
        Ok(bytes)
    }

    fn config(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, Error> {
        if size > MAX_DOCUMENT_BYTES {
            return Err(RegistryError::TooLarge {
                reference: self.name(),
                size: size as usize,
            }
            .into());
        }
        let mut out = Bounded::new(Vec::new(), size);
        self.runtime
            .block_on(
                self.client
                    .pull_blob(&self.oci_ref, digest.to_string().as_str(), &mut out),
            )
            .map_err(|source| RegistryError::Client {
                reference: self.name(),
                what: "fetching the image config",
                source,
            })?;
        verify(&self.name(), digest, &out.inner)?;
        Ok(out.inner)
    }

    /// Hashes the bytes as they are written to a temporary file in the store, then
    /// checks and renames that file: each layer is written once.
    fn blob_into(&self, digest: &Digest, size: u64, store: &BlobStore) -> Result<(), Error> {
        if size > MAX_BLOB_BYTES {
            return Err(crate::blobs::BlobError::TooLarge {
                digest: digest.clone(),
                limit: MAX_BLOB_BYTES,
            }
            .into());
        }
        let download_err = |path: &std::path::Path| {
            let (reference, digest, path) = (self.name(), digest.clone(), path.to_owned());
            move |source| RegistryError::Download {
                reference,
                digest,
                path,
                source,
            }
        };
        let tmp = store.temp_file().map_err(download_err(store.tmp_dir()))?;
        let file = tmp.reopen().map_err(download_err(tmp.path()))?;
        let mut out = Bounded::new(tokio::fs::File::from_std(file), size);
        self.runtime
            .block_on(
                self.client
                    .pull_blob(&self.oci_ref, digest.to_string().as_str(), &mut out),
            )
            .map_err(|source| RegistryError::Client {
                reference: self.name(),
                what: "downloading a layer",
                source,
            })?;
        let (written, actual) = out.finish();
        store.insert_hashed_file(digest, tmp.into_temp_path(), actual, written, size)?;
        Ok(())
    }
}

/// Refuses to write more than the descriptor's size: a registry cannot fill the disk
/// or memory past what the manifest announced. Hashes what it writes.
struct Bounded<W> {
    inner: W,
    left: u64,
    written: u64,
    hasher: Sha256,
}

impl<W> Bounded<W> {
    fn new(inner: W, size: u64) -> Bounded<W> {
        Bounded {
            inner,
            left: size,
            written: 0,
            hasher: Sha256::new(),
        }
    }

    /// The bytes written and their digest.
    fn finish(self) -> (u64, Digest) {
        (self.written, Digest::from_hasher(self.hasher))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Bounded<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return Poll::Ready(Err(io::Error::other(
                "registry sent more bytes than the descriptor's size",
            )));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.left -= n as u64;
                this.written += n as u64;
                this.hasher.update(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
