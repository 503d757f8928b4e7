//! TLS to PostgreSQL, configured from the connection URL the way libpq reads it.
//!
//! `sslmode` and `sslrootcert` are libpq options that `tokio-postgres` does not understand (it knows
//! `disable`, `prefer` and `require`, and never verifies anything by itself), so they are taken out of
//! the URL here and turned into a rustls client configuration:
//!
//! | `sslmode` | TLS | certificate chain checked | host name checked |
//! |---|---|---|---|
//! | `disable` | never | — | — |
//! | `prefer` (default) | when the server offers it | no | no |
//! | `require` | always | only when `sslrootcert` is given (as libpq does) | no |
//! | `verify-ca` | always | yes | no |
//! | `verify-full` | always | yes | yes |
//!
//! `sslrootcert` names a PEM file of trusted certificates, or `system` for the operating system's
//! store. Without it the verifying modes use `~/.postgresql/root.crt` when that file exists (libpq's
//! default) and the system's store otherwise — where libpq would refuse to connect, this picks the
//! store a managed database's certificate is most likely to chain to.
//!
//! The crypto provider is chosen here (ring) rather than taken from a process-wide default, so that the
//! store does not depend on what other crates in the binary enabled.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres::Config;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{StoreError, StoreResult};

/// libpq's `sslmode` values that Tether honours (`allow` is refused: it tries plain text first, which
/// no deployment that cares about TLS wants, and `tokio-postgres` cannot express it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = StoreError;

    fn from_str(value: &str) -> StoreResult<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(invalid(format!(
                    "sslmode={other} is not supported; use disable, prefer, require, verify-ca or \
                     verify-full"
                )))
            }
        })
    }
}

/// Where trusted certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootSource {
    /// `sslrootcert=<path>`: a PEM file.
    File(PathBuf),
    /// `sslrootcert=system`.
    System,
    /// No `sslrootcert`: libpq's `~/.postgresql/root.crt` if present, else the system's store.
    Default,
}

/// The TLS part of a connection URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    pub mode: SslMode,
    pub roots: RootSource,
}

/// A driver configuration and the TLS connector that goes with it.
pub struct Connection {
    pub config: Config,
    pub tls: MakeRustlsConnect,
    pub options: TlsOptions,
    /// The URL without the options taken out, for building related URLs (test databases).
    pub driver_url: String,
}

/// Parses a `postgres://` URL or a `key=value` connection string, taking out `sslmode` and
/// `sslrootcert` and reading the rest with `tokio-postgres`.
pub fn parse(url: &str) -> StoreResult<Connection> {
    let (driver_url, options) = split_tls_options(url)?;
    let mut config = Config::from_str(&driver_url)
        .map_err(|e| invalid(format!("invalid PostgreSQL URL: {e}")))?;
    config.ssl_mode(match options.mode {
        SslMode::Disable => DriverSslMode::Disable,
        SslMode::Prefer => DriverSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
    });
    let tls = MakeRustlsConnect::new(client_config(&options)?);
    Ok(Connection {
        config,
        tls,
        options,
        driver_url,
    })
}

/// Splits the libpq TLS options off a connection string.
pub fn split_tls_options(url: &str) -> StoreResult<(String, TlsOptions)> {
    let mut mode = None;
    let mut root = None;
    let mut take = |key: &str, value: &str| -> StoreResult<bool> {
        match key {
            "sslmode" => mode = Some(value.parse::<SslMode>()?),
            "sslrootcert" => {
                root = Some(if value == "system" {
                    RootSource::System
                } else {
                    RootSource::File(PathBuf::from(value))
                })
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = form_urlencoded::Serializer::new(String::new());
                let mut any = false;
                for (key, value) in form_urlencoded::parse(query.as_bytes()) {
                    if !take(&key, &value)? {
                        kept.append_pair(&key, &value);
                        any = true;
                    }
                }
                if any {
                    format!("{base}?{}", kept.finish())
                } else {
                    base.to_owned()
                }
            }
        }
    } else if let Some(scheme) = other_url_scheme(url) {
        return Err(invalid(format!(
            "invalid PostgreSQL connection string: a URL must start with postgresql:// (or \
             postgres://), not {scheme}://"
        )));
    } else {
        let mut kept = Vec::new();
        for (key, value, raw) in key_value_pairs(url)? {
            if !take(&key, &value)? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    let roots = root.unwrap_or(RootSource::Default);
    Ok((
        rest,
        TlsOptions {
            mode: mode.unwrap_or(SslMode::Prefer),
            roots,
        },
    ))
}

/// The scheme of a URL that is not PostgreSQL's (`mysql` of `mysql://…`), which would otherwise be
/// read as a libpq keyword/value string and refused for something it does not say. A keyword/value
/// string has no `://` before its first `=` or blank.
fn other_url_scheme(text: &str) -> Option<&str> {
    let (scheme, _) = text.split_once("://")?;
    let looks_like_one = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    looks_like_one.then_some(scheme)
}

/// The `key = value` pairs of a libpq keyword/value string, each with its raw text. Values may be
/// single-quoted, with `\'` and `\\` escapes inside.
fn key_value_pairs(text: &str) -> StoreResult<Vec<(String, String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(invalid(format!(
                "invalid PostgreSQL connection string: `{key}` has no value"
            )));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(invalid(
                            "invalid PostgreSQL connection string: unterminated quote".into(),
                        ))
                    }
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => {
                        if let Some((_, c)) = chars.next() {
                            value.push(c);
                        }
                    }
                    Some((_, c)) => value.push(c),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map_or(text.len(), |&(i, _)| i);
        pairs.push((key, value, text[start..end].trim_end().to_owned()));
    }
    Ok(pairs)
}

/// The rustls configuration for `options`.
fn client_config(options: &TlsOptions) -> StoreResult<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS set-up failed: {e}")))?;
    // libpq's `require` authenticates the server only when a root certificate was named.
    let verify_chain = match options.mode {
        SslMode::Disable | SslMode::Prefer => false,
        SslMode::Require => matches!(options.roots, RootSource::File(_)),
        SslMode::VerifyCa | SslMode::VerifyFull => true,
    };
    let chain = if verify_chain {
        let roots = Arc::new(load_roots(&options.roots)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| invalid(format!("TLS set-up failed: {e}")))?;
        Some(webpki)
    } else {
        None
    };
    let verifier: Arc<dyn ServerCertVerifier> = match chain {
        Some(webpki) if options.mode == SslMode::VerifyFull => webpki,
        chain => Arc::new(LibpqVerifier { provider, chain }),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn load_roots(source: &RootSource) -> StoreResult<RootCertStore> {
    let file = match source {
        RootSource::File(path) => Some(path.clone()),
        RootSource::System => None,
        RootSource::Default => std::env::var_os("HOME")
            .map(|home| Path::new(&home).join(".postgresql/root.crt"))
            .filter(|path| path.is_file()),
    };
    let mut roots = RootCertStore::empty();
    match file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(&path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| invalid(format!("cannot read sslrootcert {}: {e}", path.display())))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(invalid(format!(
                    "sslrootcert {} holds no usable certificate",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(invalid(
                    "no trusted certificates in the system's store; name one with sslrootcert="
                        .into(),
                ));
            }
        }
    }
    Ok(roots)
}

fn invalid(message: String) -> StoreError {
    StoreError::Internal(message)
}

/// The server-certificate check of `prefer`, `require` and `verify-ca` (`verify-full` uses rustls's own
/// verifier as it is). With a `chain` verifier the chain must lead to a trusted root, whatever name the
/// certificate was issued to (`verify-ca`); without one, nothing about the certificate is checked — the
/// connection is encrypted, the server not authenticated, libpq's meaning of `prefer` and `require`.
/// The handshake signature is checked in every case, so the peer must hold the key of the certificate
/// it shows.
#[derive(Debug)]
struct LibpqVerifier {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // The name is checked last, after the chain and the validity period, so this error
            // means everything else was in order.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, TlsOptions) {
        split_tls_options(url).expect("parses")
    }

    #[test]
    fn url_options_are_taken_out_and_the_rest_kept() {
        let (rest, options) = split(
            "postgres://u@db.example:5432/tether?sslmode=verify-full&application_name=x&sslrootcert=/ca.pem",
        );
        assert_eq!(
            rest,
            "postgres://u@db.example:5432/tether?application_name=x"
        );
        assert_eq!(options.mode, SslMode::VerifyFull);
        assert_eq!(options.roots, RootSource::File("/ca.pem".into()));
    }

    #[test]
    fn defaults_are_libpqs() {
        let (rest, options) = split("postgresql://u@h/db");
        assert_eq!(rest, "postgresql://u@h/db");
        assert_eq!(options.mode, SslMode::Prefer);
        assert_eq!(options.roots, RootSource::Default);
        let (rest, options) = split("postgres://h/db?sslmode=require");
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(options.mode, SslMode::Require);
    }

    #[test]
    fn keyword_strings_are_read_like_libpq() {
        let (rest, options) = split(
            "host=localhost  sslrootcert = 'my ca.pem' user=postgres sslmode=verify-ca password='a\\'b'",
        );
        assert_eq!(rest, "host=localhost user=postgres password='a\\'b'");
        assert_eq!(options.mode, SslMode::VerifyCa);
        assert_eq!(options.roots, RootSource::File("my ca.pem".into()));
        let (_, options) = split("host=h sslrootcert=system");
        assert_eq!(options.roots, RootSource::System);
    }

    #[test]
    fn unknown_modes_and_broken_strings_are_refused() {
        for bad in [
            "postgres://h/db?sslmode=allow",
            "postgres://h/db?sslmode=VERIFY-FULL",
            "host=h sslmode",
            "host='h",
        ] {
            assert!(split_tls_options(bad).is_err(), "{bad}");
        }
        // Another database's URL is named as such, not misread as a keyword string.
        for (other, scheme) in [("mysql://x", "mysql"), ("sqlite+file://db", "sqlite+file")] {
            let error = split_tls_options(other).unwrap_err().to_string();
            assert!(
                error.contains(&format!("not {scheme}://")) && error.contains("postgresql://"),
                "{error}"
            );
        }
        // A keyword string whose value holds `://` is still one.
        let (kept, _) = split("host=h options='-c x=a://b'");
        assert_eq!(kept, "host=h options='-c x=a://b'");
    }

    #[test]
    fn every_mode_builds_a_configuration() {
        for mode in [SslMode::Disable, SslMode::Prefer, SslMode::Require] {
            let options = TlsOptions {
                mode,
                roots: RootSource::Default,
            };
            client_config(&options).expect("configuration");
        }
    }

    #[test]
    fn a_missing_root_file_is_a_clear_error() {
        let options = TlsOptions {
            mode: SslMode::VerifyFull,
            roots: RootSource::File("/nonexistent/ca.pem".into()),
        };
        let error = client_config(&options).expect_err("refused").to_string();
        assert!(
            error.contains("cannot read sslrootcert /nonexistent/ca.pem"),
            "{error}"
        );
    }
}
