//! Throwaway certificate authorities and server certificates, made at test time (nothing is committed).
//!
//! ```no_run
//! let ca = tether_testkit::tls::TestCa::new("test root");
//! let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
//! let dir = tempfile::tempdir().unwrap();
//! let (cert, key) = leaf.write(dir.path(), "server");
//! ```

use std::path::{Path, PathBuf};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_RSA_SHA256,
};

/// The formats a server key can come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256 in PKCS#8 (`PRIVATE KEY`).
    EcPkcs8,
    /// ECDSA P-256 in SEC1 (`EC PRIVATE KEY`).
    EcSec1,
    /// RSA 2048 in PKCS#8 (`PRIVATE KEY`).
    RsaPkcs8,
    /// RSA 2048 in PKCS#1 (`RSA PRIVATE KEY`).
    RsaPkcs1,
}

/// A certificate authority (a root, or an intermediate below one).
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// This CA's certificate, PEM.
    pub cert_pem: String,
    /// The certificates between a leaf it signs and the root, leaf side first (empty for a root).
    chain_pem: String,
}

/// A server certificate with its chain and key, PEM.
pub struct Leaf {
    /// The leaf, then the intermediates (what a server presents).
    pub chain_pem: String,
    pub key_pem: String,
}

impl Leaf {
    /// Writes `<name>.crt` and `<name>.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.chain_pem).expect("write the certificate");
        std::fs::write(&key, &self.key_pem).expect("write the key");
        (cert, key)
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl TestCa {
    /// A new root CA with an ECDSA P-256 key.
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("generate a CA key");
        let params = ca_params(name);
        let cert = params.self_signed(&key).expect("self-sign the CA");
        TestCa {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            chain_pem: String::new(),
        }
    }

    /// Writes this CA's certificate to `<dir>/<name>.pem`; returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, &self.cert_pem).expect("write the CA certificate");
        path
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, name: &str) -> TestCa {
        let key = KeyPair::generate().expect("generate a CA key");
        let params = ca_params(name);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign the intermediate");
        TestCa {
            issuer: Issuer::new(params, key),
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            cert_pem: cert.pem(),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses), with an EC key in PKCS#8.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, KeyKind::EcPkcs8, false)
    }

    /// A server certificate for `names` with a key of `kind`; `expired` makes one whose validity
    /// ended years ago.
    pub fn leaf_with(&self, names: &[&str], kind: KeyKind, expired: bool) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "tether test server");
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let (key, key_pem) = match kind {
            KeyKind::EcPkcs8 | KeyKind::EcSec1 => {
                let key = KeyPair::generate().expect("generate a key");
                let pem = if kind == KeyKind::EcSec1 {
                    pem("EC PRIVATE KEY", pkcs8_inner_key(key.serialized_der()))
                } else {
                    key.serialize_pem()
                };
                (key, pem)
            }
            KeyKind::RsaPkcs8 | KeyKind::RsaPkcs1 => rsa_key(kind),
        };
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem,
        }
    }
}

/// A certificate for `names` that is its own CA, as `openssl req -x509` makes by default: the server
/// presents it, and clients would trust it as their CA.
pub fn self_signed_ca_as_leaf(names: &[&str]) -> Leaf {
    let key = KeyPair::generate().expect("generate a key");
    let mut params = ca_params("tether self-signed");
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName((*n).try_into().expect("a DNS name")),
        })
        .collect();
    let cert = params.self_signed(&key).expect("self-sign");
    Leaf {
        chain_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn rsa_key(kind: KeyKind) -> (KeyPair, String) {
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::pkcs8::EncodePrivateKey as _;
    let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("an RSA key");
    let pkcs8 = private.to_pkcs8_der().expect("PKCS#8").as_bytes().to_vec();
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8.clone().into(), &PKCS_RSA_SHA256)
        .expect("rcgen takes the RSA key");
    let pem_text = if kind == KeyKind::RsaPkcs1 {
        private
            .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
            .expect("PKCS#1")
            .to_string()
    } else {
        pem("PRIVATE KEY", &pkcs8)
    };
    (key, pem_text)
}

/// The private key inside a PKCS#8 document (for EC keys: the SEC1 `ECPrivateKey`).
fn pkcs8_inner_key(pkcs8: &[u8]) -> &[u8] {
    let (_, body, _) = der(pkcs8); // PrivateKeyInfo SEQUENCE
    let (_, _, rest) = der(body); // version
    let (_, _, rest) = der(rest); // algorithm
    let (tag, key, _) = der(rest);
    assert_eq!(tag, 0x04, "PKCS#8 privateKey is an OCTET STRING");
    key
}

/// One DER element: (tag, contents, what follows).
fn der(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let (len, header) = match input[1] {
        n if n < 0x80 => (n as usize, 2),
        n => {
            let count = (n & 0x7f) as usize;
            let len = input[2..2 + count]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize);
            (len, 2 + count)
        }
    };
    (tag, &input[header..header + len], &input[header + len..])
}

fn pem(label: &str, der: &[u8]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in text.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
