//! Metadata maps (§1.9): flat string→string, at most 16 keys, keys ≤ 64 and values ≤ 512 Unicode scalar
//! values. Patches upsert strings and delete on `null`; limits apply to the merged result (D-10).

use std::collections::BTreeMap;

use serde_json::Value;

pub type Metadata = BTreeMap<String, String>;

pub const MAX_KEYS: usize = 16;
pub const MAX_KEY_CHARS: usize = 64;
pub const MAX_VALUE_CHARS: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata must be a JSON object")]
    NotAnObject,
    #[error("metadata value for key {0:?} must be a string")]
    ValueNotString(String),
    #[error("metadata value for key {0:?} must be a string or null")]
    PatchValueInvalid(String),
    #[error("metadata may have at most {MAX_KEYS} keys")]
    TooManyKeys,
    #[error("metadata keys must be 1 to {MAX_KEY_CHARS} characters")]
    KeyLength,
    #[error("metadata values must be at most {MAX_VALUE_CHARS} characters (key {0:?})")]
    ValueTooLong(String),
}

/// Checks the limits of a complete map.
pub fn validate(map: &Metadata) -> Result<(), MetadataError> {
    if map.len() > MAX_KEYS {
        return Err(MetadataError::TooManyKeys);
    }
    for (k, v) in map {
        let key_chars = k.chars().count();
        if key_chars == 0 || key_chars > MAX_KEY_CHARS {
            return Err(MetadataError::KeyLength);
        }
        if v.chars().count() > MAX_VALUE_CHARS {
            return Err(MetadataError::ValueTooLong(k.clone()));
        }
    }
    Ok(())
}

/// Parses a complete map from JSON (creation bodies). `null` means empty.
pub fn from_json(value: &Value) -> Result<Metadata, MetadataError> {
    let map = match value {
        Value::Null => return Ok(Metadata::new()),
        Value::Object(map) => map,
        _ => return Err(MetadataError::NotAnObject),
    };
    let mut out = Metadata::new();
    for (k, v) in map {
        match v {
            Value::String(s) => {
                out.insert(k.clone(), s.clone());
            }
            _ => return Err(MetadataError::ValueNotString(k.clone())),
        }
    }
    validate(&out)?;
    Ok(out)
}

/// A parsed merge patch: `Some(value)` upserts, `None` deletes.
pub type MetadataPatch = BTreeMap<String, Option<String>>;

pub fn patch_from_json(value: &Value) -> Result<MetadataPatch, MetadataError> {
    let Value::Object(map) = value else {
        return Err(MetadataError::NotAnObject);
    };
    let mut out = MetadataPatch::new();
    for (k, v) in map {
        match v {
            Value::String(s) => {
                out.insert(k.clone(), Some(s.clone()));
            }
            Value::Null => {
                out.insert(k.clone(), None);
            }
            _ => return Err(MetadataError::PatchValueInvalid(k.clone())),
        }
    }
    Ok(out)
}

/// Applies a patch and checks the limits on the merged result.
pub fn merge(current: &Metadata, patch: &MetadataPatch) -> Result<Metadata, MetadataError> {
    let mut merged = current.clone();
    for (k, v) in patch {
        match v {
            Some(value) => {
                merged.insert(k.clone(), value.clone());
            }
            None => {
                merged.remove(k);
            }
        }
    }
    validate(&merged)?;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_upserts_and_deletes() {
        let cur: Metadata = [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        let patch = patch_from_json(&json!({"a": "x", "b": null, "c": "3"})).unwrap();
        let merged = merge(&cur, &patch).unwrap();
        assert_eq!(
            merged,
            [("a".into(), "x".into()), ("c".into(), "3".into())].into()
        );
    }

    #[test]
    fn limits_apply_to_the_merged_map() {
        let cur: Metadata = (0..16)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let add = patch_from_json(&json!({"extra": "v"})).unwrap();
        assert_eq!(merge(&cur, &add), Err(MetadataError::TooManyKeys));
        let swap = patch_from_json(&json!({"extra": "v", "k0": null})).unwrap();
        assert!(merge(&cur, &swap).is_ok());
    }

    #[test]
    fn lengths_count_unicode_scalars() {
        let key: String = "é".repeat(64);
        let ok: Metadata = [(key.clone(), "ü".repeat(512))].into();
        assert!(validate(&ok).is_ok());
        let long_key: Metadata = [("é".repeat(65), String::new())].into();
        assert_eq!(validate(&long_key), Err(MetadataError::KeyLength));
        let long_value: Metadata = [(key, "ü".repeat(513))].into();
        assert!(matches!(
            validate(&long_value),
            Err(MetadataError::ValueTooLong(_))
        ));
    }

    #[test]
    fn wrong_shapes_are_rejected() {
        assert_eq!(from_json(&json!([1])), Err(MetadataError::NotAnObject));
        assert!(matches!(
            from_json(&json!({"a": 1})),
            Err(MetadataError::ValueNotString(_))
        ));
        assert!(matches!(
            patch_from_json(&json!({"a": true})),
            Err(MetadataError::PatchValueInvalid(_))
        ));
        assert_eq!(from_json(&Value::Null), Ok(Metadata::new()));
    }
}
