//! Secrets: minting and hashing (§11.1). The `secret` payload of polled work items is
//! `tether_api::WorkSecret`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

pub const ADMIN_PREFIX: &str = "tth_adm_";
pub const ENVIRONMENT_PREFIX: &str = "tth_env_";
pub const SESSION_PREFIX: &str = "tth_ses_";

/// A fresh secret: the prefix and 256 random bits as 43 base64url characters.
pub fn mint(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// SHA-256 of a secret, lowercase hex. Only this is stored.
pub fn hash(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first characters of a secret, enough to tell keys apart in a listing.
pub fn hint(secret: &str) -> String {
    secret.chars().take(12).collect::<String>() + "…"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_secrets_have_the_documented_shape() {
        let s = mint(ADMIN_PREFIX);
        assert!(s.starts_with(ADMIN_PREFIX));
        assert_eq!(s.len(), ADMIN_PREFIX.len() + 43);
        assert_ne!(s, mint(ADMIN_PREFIX));
        assert_eq!(hash(&s).len(), 64);
    }
}
