//! Secrets: minting, hashing and the `secret` payload carried by polled work items (§11.1).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde_json::json;
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

/// The `secret` field of a polled work item.
pub fn work_secret(session_token: &str, api_base_url: &str) -> String {
    let payload = json!({ "sessions_token": session_token, "api_base_url": api_base_url });
    URL_SAFE_NO_PAD.encode(payload.to_string())
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

    #[test]
    fn work_secret_round_trips() {
        let encoded = work_secret("tth_ses_x", "http://h/api/v1/cloud");
        let decoded: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(encoded).unwrap()).unwrap();
        assert_eq!(decoded["sessions_token"], "tth_ses_x");
        assert_eq!(decoded["api_base_url"], "http://h/api/v1/cloud");
    }
}
