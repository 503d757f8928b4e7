//! The records Tether keeps besides work items: environments, agents, sessions, events and credentials.
//! They are plain data; the rules that validate their input live beside them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::metadata::Metadata;
use crate::session::SessionStatus;
use crate::time::Timestamp;

/// The largest `setup_script` accepted (D-20).
pub const MAX_SETUP_SCRIPT_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    pub id: String,
    pub name: String,
    pub description: String,
    /// Normalised config (`managed` already rewritten to `cloud`).
    pub config: Value,
    pub metadata: Metadata,
    pub scope: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub archived_at: Option<Timestamp>,
}

impl Environment {
    pub fn kind(&self) -> &str {
        self.config
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("cloud")
    }

    pub fn is_self_hosted(&self) -> bool {
        self.kind() == "self_hosted"
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub message: String,
}

fn config_error(message: impl Into<String>) -> ConfigError {
    ConfigError {
        message: message.into(),
    }
}

/// Validates and normalises an environment `config` (§2.1, D-17, D-20).
pub fn normalize_config(value: &Value) -> Result<Value, ConfigError> {
    let Value::Object(map) = value else {
        return Err(config_error("config must be an object with a \"type\""));
    };
    let kind = match map.get("type") {
        Some(Value::String(k)) => k.as_str(),
        Some(_) => return Err(config_error("config.type must be a string")),
        None => {
            return Err(config_error(
                "config.type is required (\"self_hosted\" or \"cloud\")",
            ))
        }
    };
    if let Some(script) = map.get("setup_script") {
        match script {
            Value::String(s) if s.len() <= MAX_SETUP_SCRIPT_BYTES => {}
            Value::String(_) => {
                return Err(config_error("config.setup_script may be at most 64 KiB"))
            }
            Value::Null => {}
            _ => return Err(config_error("config.setup_script must be a string")),
        }
    }
    match kind {
        "self_hosted" => {
            if let Some(extra) = map
                .keys()
                .find(|k| !matches!(k.as_str(), "type" | "setup_script"))
            {
                return Err(config_error(format!(
                    "config.{extra} is not allowed for a self_hosted environment"
                )));
            }
            Ok(Value::Object(map.clone()))
        }
        "cloud" | "managed" => {
            let mut out: Map<String, Value> = map.clone();
            out.insert("type".into(), Value::String("cloud".into()));
            if let Some(networking) = map.get("networking") {
                validate_networking(networking)?;
            }
            if let Some(packages) = map.get("packages") {
                validate_packages(packages)?;
            }
            Ok(Value::Object(out))
        }
        other => Err(config_error(format!(
            "config.type {other:?} is not one of \"self_hosted\", \"cloud\""
        ))),
    }
}

fn validate_networking(value: &Value) -> Result<(), ConfigError> {
    if value.is_null() {
        return Ok(());
    }
    let Value::Object(map) = value else {
        return Err(config_error("config.networking must be an object"));
    };
    match map.get("type").and_then(Value::as_str) {
        Some("unrestricted" | "limited" | "allowed_hosts") => {}
        _ => {
            return Err(config_error(
                "config.networking.type must be one of \"unrestricted\", \"limited\", \"allowed_hosts\"",
            ))
        }
    }
    if let Some(hosts) = map.get("allowed_hosts") {
        if !is_string_array(hosts) {
            return Err(config_error(
                "config.networking.allowed_hosts must be an array of strings",
            ));
        }
    }
    for flag in ["allow_package_managers", "allow_mcp_servers"] {
        if map
            .get(flag)
            .is_some_and(|v| !v.is_boolean() && !v.is_null())
        {
            return Err(config_error(format!(
                "config.networking.{flag} must be a boolean"
            )));
        }
    }
    Ok(())
}

fn validate_packages(value: &Value) -> Result<(), ConfigError> {
    if value.is_null() {
        return Ok(());
    }
    let Value::Object(map) = value else {
        return Err(config_error("config.packages must be an object"));
    };
    for manager in ["apt", "pip", "npm", "cargo", "gem", "go"] {
        if let Some(list) = map.get(manager) {
            if !list.is_null() && !is_string_array(list) {
                return Err(config_error(format!(
                    "config.packages.{manager} must be an array of strings"
                )));
            }
        }
    }
    Ok(())
}

fn is_string_array(value: &Value) -> bool {
    value
        .as_array()
        .is_some_and(|a| a.iter().all(Value::is_string))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub name: String,
    /// A model name, or an object with an `id` and settings; stored as given.
    pub model: Value,
    pub description: Option<String>,
    pub system: Option<String>,
    pub tools: Value,
    pub skills: Value,
    pub mcp_servers: Value,
    /// Who the agent acts as (`{"type": …, …}`), stored as given; `None` when it was never set, so that
    /// each dialect can show its own default. Absent from agents stored before the field existed.
    #[serde(default)]
    pub execution_identity: Option<Value>,
    pub metadata: Metadata,
    pub version: u32,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub archived_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    /// The agent at the version the session uses.
    pub agent: Agent,
    pub environment_id: String,
    pub status: SessionStatus,
    pub title: Option<String>,
    pub metadata: Metadata,
    pub environment_variables: BTreeMap<String, String>,
    pub resources: Value,
    pub budget: Option<Value>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub archived_at: Option<Timestamp>,
    /// Runnable input arrived while the live item was `stopping` (§7.3 rule 3).
    pub pending_input: bool,
    /// The id of the newest event, so that new ids can be kept strictly increasing.
    pub last_event_id: Option<String>,
    /// The session's next item is held until this moment: a program of an item stopped by someone
    /// other than its worker may run until then (see `work::Step::holder_may_run_until`,
    /// [`crate::session::hold_next_item`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_item_not_before: Option<Timestamp>,
    /// How many turns input has started: which turn is open, told to a worker whose stop would
    /// have failed it ([`crate::work::WorkError::TurnOpen`]). 0 in a session stored before it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub turns_started: u64,
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

/// One entry of a session's append-only event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionEvent {
    pub id: String,
    pub session_id: String,
    /// The whole event as it is rendered (`id`, `type`, `processed_at`, and the type's fields).
    pub body: Value,
}

/// The kinds of credential (§11.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    Admin,
    Environment,
}

/// A stored credential: only the hash of its secret is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub id: String,
    pub kind: CredentialKind,
    /// For environment keys, the one environment they serve.
    pub environment_id: Option<String>,
    pub name: Option<String>,
    /// SHA-256 of the secret, lowercase hex.
    pub secret_hash: String,
    /// The first characters of the secret, so that a person can tell keys apart.
    pub hint: String,
    pub created_at: Timestamp,
    /// Kept in its own column, which a revocation updates alone; it is never written into the stored
    /// document, so the record cannot hold two answers to "is it revoked?".
    #[serde(skip_serializing, default)]
    pub revoked_at: Option<Timestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn self_hosted_accepts_only_setup_script() {
        assert!(normalize_config(&json!({"type": "self_hosted"})).is_ok());
        assert!(
            normalize_config(&json!({"type": "self_hosted", "setup_script": "echo hi"})).is_ok()
        );
        assert!(normalize_config(
            &json!({"type": "self_hosted", "networking": {"type": "limited"}})
        )
        .is_err());
        let big = "x".repeat(MAX_SETUP_SCRIPT_BYTES + 1);
        assert!(normalize_config(&json!({"type": "self_hosted", "setup_script": big})).is_err());
    }

    #[test]
    fn managed_is_an_alias_of_cloud() {
        let c =
            normalize_config(&json!({"type": "managed", "networking": {"type": "unrestricted"}}))
                .unwrap();
        assert_eq!(c["type"], "cloud");
    }

    #[test]
    fn bad_cloud_configs() {
        for bad in [
            json!({"type": "cloud", "networking": {"type": "open"}}),
            json!({"type": "cloud", "networking": {"type": "allowed_hosts", "allowed_hosts": [1]}}),
            json!({"type": "cloud", "packages": {"pip": "requests"}}),
            json!({"type": "kubernetes"}),
            json!({}),
            json!("self_hosted"),
        ] {
            assert!(normalize_config(&bad).is_err(), "{bad}");
        }
    }
}
