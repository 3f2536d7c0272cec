//! TLS for `wss://` URLs: rustls with the ring provider, the system's roots and an
//! optional extra CA file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tokio_tungstenite::Connector;

use crate::config::LinkConfig;

/// The largest CA file read.
const MAX_CA_FILE_BYTES: u64 = 4 << 20;

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[link] ca_file {path}: cannot read it")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("[link] ca_file {path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("no CA certificates to check the control plane's certificate: install ca-certificates or set [link] ca_file")]
    NoRoots,
    #[error("TLS setup")]
    Rustls(#[source] rustls::Error),
}

/// The connector for the configured URL: `None` for `ws://`.
pub fn connector(cfg: &LinkConfig) -> Result<Option<Connector>, TlsError> {
    if !cfg.is_tls() {
        return Ok(None);
    }
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    if !native.errors.is_empty() {
        tracing::debug!(errors = ?native.errors, "some system CA certificates could not be loaded");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &cfg.ca_file {
        add_ca_file(&mut roots, path)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Connector::Rustls(Arc::new(config))))
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    use std::io::Read;
    let read_err = |source| TlsError::ReadCa {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE_BYTES + 1)
        .read_to_end(&mut pem)
        .map_err(read_err)?;
    let bad = |reason: String| TlsError::BadCa {
        path: path.to_path_buf(),
        reason,
    };
    if pem.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(bad(format!("larger than {MAX_CA_FILE_BYTES} bytes")));
    }
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("a certificate was refused: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(bad("holds no PEM CERTIFICATE block".to_string()));
    }
    Ok(())
}
