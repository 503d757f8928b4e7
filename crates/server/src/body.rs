//! Reading fields out of JSON request bodies with errors that name the field (§1.7 `param`), in the
//! service's terms (`Error::Invalid`).

use serde_json::{Map, Value};
use tether_core::metadata::{self, Metadata};

use crate::service::{Error, Result};

/// A request body that must be a JSON object; `None` (no body, or an empty one) reads as `{}`. Any
/// other JSON value, `null` included, is refused: §1.3 lets an optional body be absent, empty or `{}`,
/// and a `null` that stood for "graceful" or "no change" would hide a client's bug.
pub fn object(body: Option<Value>) -> Result<Map<String, Value>> {
    match body {
        None => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(Error::malformed("the request body must be a JSON object")),
    }
}

/// A request body that must be present and a JSON object (updates: an absent body is a client's
/// mistake, not an update that changes nothing).
pub fn required_object(body: Option<Value>) -> Result<Map<String, Value>> {
    match body {
        None => Err(Error::malformed("this request needs a JSON object body")),
        some => object(some),
    }
}

pub fn required_string(body: &Map<String, Value>, field: &str) -> Result<String> {
    match body.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(Error::invalid(field, format!("{field} is required"))),
        Some(_) => Err(Error::invalid(field, format!("{field} must be a string"))),
    }
}

/// `Ok(None)` when absent or null.
pub fn optional_string(body: &Map<String, Value>, field: &str) -> Result<Option<String>> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Error::invalid(field, format!("{field} must be a string"))),
    }
}

/// An optional array, stored as given; absent means `[]`.
pub fn optional_array(body: &Map<String, Value>, field: &str) -> Result<Value> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(Value::Array(Vec::new())),
        Some(v @ Value::Array(_)) => Ok(v.clone()),
        Some(_) => Err(Error::invalid(field, format!("{field} must be an array"))),
    }
}

/// A complete metadata map (create).
pub fn metadata(body: &Map<String, Value>) -> Result<Metadata> {
    match body.get("metadata") {
        None => Ok(Metadata::new()),
        Some(v) => metadata::from_json(v).map_err(Error::from),
    }
}

/// A flat string→string map such as `environment_variables`.
pub fn string_map(
    body: &Map<String, Value>,
    field: &str,
) -> Result<std::collections::BTreeMap<String, String>> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(Default::default()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(Error::invalid(
                    field,
                    format!("{field}.{k} must be a string"),
                )),
            })
            .collect(),
        Some(_) => Err(Error::invalid(
            field,
            format!("{field} must be an object of strings"),
        )),
    }
}

/// Checks a name-like string: non-empty and at most `max` characters.
pub fn bounded_name(value: String, field: &str, max: usize) -> Result<String> {
    let chars = value.chars().count();
    if chars == 0 || value.trim().is_empty() {
        return Err(Error::invalid(field, format!("{field} must not be empty")));
    }
    if chars > max {
        return Err(Error::invalid(
            field,
            format!("{field} may be at most {max} characters"),
        ));
    }
    Ok(value)
}
