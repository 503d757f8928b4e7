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

/// The session token of a claim sent with an idempotency key (Tether's claim): the same for every
/// try of that claim, so that a try whose earlier one committed finds the item that try leased by
/// the token's hash (`App::claim`). Its secret is the credential the claimant presented
/// (`claimant_secret`, the key or admin token itself, which the server keeps only as a hash of its
/// own) as much as the idempotency key: neither a key that others could guess (a counter, a
/// time-based UUID, one written to a proxy's log) nor a copy of the database gives anyone the
/// token. Distinct per environment and per worker, so that two workers that happened to use one
/// key claim an item each. Fields are separated by NUL, which none of them can hold (credentials,
/// ids and keys are printable ASCII).
pub fn claim_token(
    claimant_secret: &str,
    environment_id: &str,
    worker_id: &str,
    idempotency_key: &str,
) -> String {
    let mut digest = Sha256::new();
    for field in [
        "tether claim token v1",
        claimant_secret,
        environment_id,
        worker_id,
        idempotency_key,
    ] {
        debug_assert!(!field.contains('\0'));
        digest.update(field.as_bytes());
        digest.update([0u8]);
    }
    format!(
        "{SESSION_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(digest.finalize())
    )
}

/// SHA-256 of a secret, lowercase hex. Only this is stored. Every authenticated request computes one
/// (the credential cache is keyed by it).
pub fn hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Lowercase hex, written into one allocation (a `format!` per byte cost more than the SHA-256).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// The first characters of a secret, enough to tell keys apart in a listing.
pub fn hint(secret: &str) -> String {
    secret.chars().take(12).collect::<String>() + "…"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff, 0x5c]), "000fa0ff5c");
        // The well-known digest of the empty string.
        assert_eq!(
            hash(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn a_claims_token_is_the_same_for_its_tries_and_differs_in_every_input() {
        let token = claim_token("cred", "env", "w", "key-0123456789abcdef");
        assert_eq!(
            token,
            claim_token("cred", "env", "w", "key-0123456789abcdef")
        );
        assert!(token.starts_with(SESSION_PREFIX));
        assert_eq!(token.len(), mint(SESSION_PREFIX).len());
        for other in [
            claim_token("cred2", "env", "w", "key-0123456789abcdef"),
            claim_token("cred", "env2", "w", "key-0123456789abcdef"),
            claim_token("cred", "env", "w2", "key-0123456789abcdef"),
            claim_token("cred", "env", "", "key-0123456789abcdef"),
            claim_token("cred", "env", "w", "key-0123456789abcdeF"),
            // The separator keeps fields apart: no shifting of characters between them.
            claim_token("cre", "denv", "w", "key-0123456789abcdef"),
        ] {
            assert_ne!(token, other);
        }
    }

    #[test]
    fn minted_secrets_have_the_documented_shape() {
        let s = mint(ADMIN_PREFIX);
        assert!(s.starts_with(ADMIN_PREFIX));
        assert_eq!(s.len(), ADMIN_PREFIX.len() + 43);
        assert_ne!(s, mint(ADMIN_PREFIX));
        assert_eq!(hash(&s).len(), 64);
    }
}
