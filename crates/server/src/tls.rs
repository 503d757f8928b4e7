//! HTTPS: the server's certificate, loaded from PEM files and swappable while the server runs.
//!
//! rustls with the ring provider does the TLS (no OpenSSL). The certificate sits behind a
//! [`ReloadableCert`], a rustls certificate resolver: every new handshake asks it for the current
//! certificate, so [`TlsSettings::reload`] (called on SIGHUP) changes what new connections see without
//! touching the ones already open. A certificate that does not load leaves the old one in place.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate file {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("cannot read the private key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// The certificate chain (leaf first) and private key files, in PEM. The key may be PKCS#8
/// (`PRIVATE KEY`), PKCS#1 RSA (`RSA PRIVATE KEY`) or SEC1 EC (`EC PRIVATE KEY`).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads and checks both files: the chain is not empty, the key parses and matches the leaf.
    pub fn load(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain = read_chain(&self.cert)?;
        let key = read_key(&self.key)?;
        let provider = provider();
        let signing_key =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| TlsError::Key {
                    path: self.key.clone(),
                    reason: e.to_string(),
                })?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) => Ok(Arc::new(certified)),
            // The leaf's public key cannot be compared for this key type; the handshake will tell.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
                Ok(Arc::new(certified))
            }
            Err(_) => Err(TlsError::Mismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
            }),
        }
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = |reason: String| TlsError::Certificate {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(fail("no CERTIFICATE block in it".into()));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let fail = |reason: String| TlsError::Key {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        fail(format!(
            "no usable PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block ({e})"
        ))
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The current certificate, handed to every new handshake.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    fn get(&self) -> Arc<CertifiedKey> {
        // A poisoned lock still holds a whole Arc: the swap cannot be torn.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// TLS for the listener: the files, the resolver that serves their current content, and the rustls
/// configuration (HTTP/2 and HTTP/1.1 offered through ALPN).
#[derive(Clone, Debug)]
pub struct TlsSettings {
    files: TlsFiles,
    cert: Arc<ReloadableCert>,
    config: Arc<ServerConfig>,
}

/// ALPN protocol ids, most preferred first.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

impl TlsSettings {
    /// Loads the files; fails (for the server not to start) when they do not make a usable certificate.
    pub fn load(files: TlsFiles) -> Result<TlsSettings, TlsError> {
        let cert = Arc::new(ReloadableCert {
            current: RwLock::new(files.load()?),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(TlsSettings {
            files,
            cert,
            config: Arc::new(config),
        })
    }

    /// Reads the files again and, when they make a usable certificate, serves it to new connections.
    /// On error the certificate in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = self.files.load()?;
        self.cert.set(fresh);
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(dir: &Path, name: &str) -> TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn a_bad_reload_keeps_the_certificate_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let files = self_signed(dir.path(), "a");
        let settings = TlsSettings::load(files.clone()).unwrap();
        let before = settings.cert.get();

        // Someone else's key with our certificate.
        let other = self_signed(dir.path(), "b");
        std::fs::copy(&other.key, &files.key).unwrap();
        assert!(matches!(settings.reload(), Err(TlsError::Mismatch { .. })));
        std::fs::write(&files.cert, "nothing here").unwrap();
        let e = settings.reload().unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE block"), "{e}");
        assert!(Arc::ptr_eq(&before, &settings.cert.get()));

        // A good pair is taken.
        std::fs::copy(&other.cert, &files.cert).unwrap();
        settings.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &settings.cert.get()));
    }

    #[test]
    fn missing_files_say_which() {
        let files = TlsFiles {
            cert: "/nonexistent/server.crt".into(),
            key: "/nonexistent/server.key".into(),
        };
        let e = TlsSettings::load(files).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/server.crt"), "{e}");
    }
}
