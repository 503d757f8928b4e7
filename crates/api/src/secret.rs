//! The `secret` of a polled work item (§11.1): URL-safe base64 of a small JSON object. The server encodes
//! it and workers decode it, both with this one definition.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The decoded `secret`: the item's own bearer token and the base URL (with the dialect prefix) the
/// worker should call with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkSecret {
    /// e.g. `http://host:4780/api/v1/cloud`. (Declared first: the encoded payload keeps the byte
    /// layout it had when it was a sorted JSON map.)
    #[serde(default)]
    pub api_base_url: Option<String>,
    /// `tth_ses_…`: may heartbeat, stop, get and update this one item, read its session and agent, and
    /// post worker-side events to the session. Dies when the item is re-delivered or stops.
    pub sessions_token: String,
}

/// Why a `secret` could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct SecretError(pub String);

/// URL-safe base64; encodes without padding, decodes with or without it.
const ENGINE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl WorkSecret {
    /// The secret of an item served with `sessions_token` from `api_base_url`.
    pub fn new(sessions_token: impl Into<String>, api_base_url: impl Into<String>) -> WorkSecret {
        WorkSecret {
            sessions_token: sessions_token.into(),
            api_base_url: Some(api_base_url.into()),
        }
    }

    /// Decodes the URL-safe base64 JSON payload.
    pub fn decode(secret: &str) -> Result<WorkSecret, SecretError> {
        let bytes = ENGINE
            .decode(secret.trim())
            .map_err(|e| SecretError(format!("not URL-safe base64: {e}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| SecretError(format!("not the expected JSON object: {e}")))
    }

    /// The wire form: URL-safe base64 without padding of the JSON object.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a WorkSecret always serializes");
        ENGINE.encode(json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_with_or_without_padding() {
        let secret = WorkSecret::new("tth_ses_abc", "http://h:1/api/v1/cloud");
        let encoded = secret.encode();
        assert!(!encoded.contains('='));
        assert_eq!(WorkSecret::decode(&encoded).unwrap(), secret);
        let padded =
            base64::engine::general_purpose::URL_SAFE.encode(serde_json::to_vec(&secret).unwrap());
        assert_eq!(WorkSecret::decode(&padded).unwrap(), secret);
        assert!(WorkSecret::decode("!!!").is_err());
        assert!(WorkSecret::decode(&ENGINE.encode(b"[1]")).is_err());
    }

    #[test]
    fn the_payload_names_its_fields_as_documented() {
        let encoded = WorkSecret::new("tth_ses_x", "http://h/api/v1/cloud").encode();
        let decoded: serde_json::Value =
            serde_json::from_slice(&ENGINE.decode(encoded).unwrap()).unwrap();
        assert_eq!(decoded["sessions_token"], "tth_ses_x");
        assert_eq!(decoded["api_base_url"], "http://h/api/v1/cloud");
    }
}
