//! Request bodies into the `tether-api` request types (§1.3, §1.7).
//!
//! A body is read through the request-memory budget as JSON (`JsonBody`), must be an object, and is then
//! deserialized into its request type with `serde_path_to_error`: the path's first segment is the
//! error's `param`, and each request type words the message for its fields as the API always has —
//! serde's own wording ("invalid type: integer `5`, expected a string") is not part of the contract.

use serde::de::value::MapDeserializer;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use serde_path_to_error::Segment;
use tether_api as api;
use tether_core::events::MAX_EVENTS_PER_BATCH;
use tether_core::metadata::MetadataError;

use super::extract::JsonBody;
use crate::error::{ApiError, ApiResult};

/// A request type and the wording of its field errors.
pub trait RequestBody: DeserializeOwned {
    /// The fields in the order they are judged: of several bad fields, the first in this order is the
    /// one reported (serde alone would report the first in the map's, i.e. alphabetical, order).
    const FIELDS: &'static [&'static str];
    /// The fields that must be present. An absent one is read as `null`, so that it is reported in its
    /// turn, with the message for `null` ("… is required").
    const REQUIRED: &'static [&'static str] = &[];

    /// The message for a field that did not deserialize: `param` is the top-level field, `rest` the
    /// path below it (e.g. the metadata key), `serde` serde's own message.
    fn field_message(param: &str, rest: &[String], serde: &str) -> String;
}

/// An optional body (absent or empty reads as `{}`) into `T`. Handlers call this after their lookups,
/// so a bad body (400) never outranks 403/404 (D-32).
pub fn optional<T: RequestBody>(body: Result<JsonBody, ApiError>) -> ApiResult<T> {
    fields(JsonBody::object(body)?)
}

/// A body that must be there (updates) into `T`.
pub fn required<T: RequestBody>(body: Result<JsonBody, ApiError>) -> ApiResult<T> {
    fields(JsonBody::required_object(body)?)
}

fn fields<T: RequestBody>(mut object: Map<String, Value>) -> ApiResult<T> {
    debug_assert!(
        T::REQUIRED.iter().all(|name| T::FIELDS.contains(name)),
        "a required field has its place in the order"
    );
    let mut ordered: Vec<(String, Value)> = Vec::with_capacity(object.len() + T::REQUIRED.len());
    for name in T::FIELDS {
        match object.remove(*name) {
            Some(value) => ordered.push(((*name).to_owned(), value)),
            None if T::REQUIRED.contains(name) => ordered.push(((*name).to_owned(), Value::Null)),
            None => {}
        }
    }
    // Fields the type does not know come last; serde ignores them (§1.3).
    ordered.extend(object);
    let fields = MapDeserializer::<_, serde_json::Error>::new(ordered.into_iter());
    serde_path_to_error::deserialize(fields).map_err(|e| {
        let mut segments = e.path().iter().map(|segment| match segment {
            Segment::Map { key } | Segment::Enum { variant: key } => key.clone(),
            Segment::Seq { index } => index.to_string(),
            Segment::Unknown => String::new(),
        });
        let serde = e.inner().to_string();
        match segments.next() {
            Some(param) if !param.is_empty() => {
                let rest: Vec<String> = segments.collect();
                let message = T::field_message(&param, &rest, &serde);
                ApiError::bad_param(&param, message)
            }
            // A field the type requires is missing: serde reports it at the root.
            _ => match missing_field(&serde) {
                Some(param) => {
                    let message = T::field_message(param, &[], &serde);
                    ApiError::bad_param(param, message)
                }
                None => ApiError::bad_request(serde),
            },
        }
    })
}

/// The field named by serde's "missing field `x`" message.
fn missing_field(serde: &str) -> Option<&str> {
    serde
        .strip_prefix("missing field `")?
        .split('`')
        .next()
        .filter(|f| !f.is_empty())
}

/// A metadata merge patch that did not deserialize: not an object, or a value that is neither a string
/// nor null (the core's wording, as `metadata::patch_from_json` gives it).
fn metadata_patch_message(rest: &[String]) -> String {
    match rest.first() {
        Some(key) => MetadataError::PatchValueInvalid(key.clone()).to_string(),
        None => MetadataError::NotAnObject.to_string(),
    }
}

/// A complete metadata map that did not deserialize (`metadata::from_json`'s wording).
fn metadata_message(rest: &[String]) -> String {
    match rest.first() {
        Some(key) => MetadataError::ValueNotString(key.clone()).to_string(),
        None => MetadataError::NotAnObject.to_string(),
    }
}

/// A required string: `null` (or absence, read as `null`) is "required", anything else not a string.
fn required_string_message(param: &str, serde: &str) -> String {
    if serde.starts_with("invalid type: null") || serde.starts_with("missing field") {
        format!("{param} is required")
    } else {
        format!("{param} must be a string")
    }
}

impl RequestBody for api::CreateEnvironment {
    const FIELDS: &'static [&'static str] = &["name", "description", "config", "metadata", "scope"];
    const REQUIRED: &'static [&'static str] = &["name"];

    fn field_message(param: &str, rest: &[String], serde: &str) -> String {
        match param {
            "name" => required_string_message(param, serde),
            "description" | "scope" => format!("{param} must be a string"),
            "metadata" => metadata_message(rest),
            _ => serde.to_owned(),
        }
    }
}

impl RequestBody for api::UpdateEnvironment {
    const FIELDS: &'static [&'static str] = &["name", "description", "metadata", "config"];

    fn field_message(param: &str, rest: &[String], serde: &str) -> String {
        match param {
            "name" | "description" => format!("{param} must be a string"),
            "metadata" => metadata_patch_message(rest),
            _ => serde.to_owned(),
        }
    }
}

impl RequestBody for api::CreateAgent {
    const FIELDS: &'static [&'static str] = &[
        "name",
        "model",
        "description",
        "system",
        "tools",
        "skills",
        "mcp_servers",
        "execution_identity",
        "metadata",
    ];
    const REQUIRED: &'static [&'static str] = &["name", "model"];

    fn field_message(param: &str, rest: &[String], serde: &str) -> String {
        match param {
            "name" => required_string_message(param, serde),
            "metadata" => metadata_message(rest),
            _ => agent_field_message(param, serde),
        }
    }
}

impl RequestBody for api::UpdateAgent {
    const FIELDS: &'static [&'static str] = &[
        "name",
        "model",
        "description",
        "system",
        "tools",
        "skills",
        "mcp_servers",
        "execution_identity",
        "version",
        "metadata",
    ];

    fn field_message(param: &str, rest: &[String], serde: &str) -> String {
        match param {
            "name" => format!("{param} must be a string"),
            "version" => "version must be a positive integer".to_owned(),
            "metadata" => metadata_patch_message(rest),
            _ => agent_field_message(param, serde),
        }
    }
}

/// The wording of the fields a new agent and an agent update share.
fn agent_field_message(param: &str, serde: &str) -> String {
    match param {
        "description" | "system" => format!("{param} must be a string"),
        "tools" | "skills" | "mcp_servers" => format!("{param} must be an array"),
        _ => serde.to_owned(),
    }
}

impl RequestBody for api::StopRequest {
    const FIELDS: &'static [&'static str] = &["force", "hold_next_item", "unless_turn_open"];

    fn field_message(param: &str, _: &[String], serde: &str) -> String {
        match param {
            "force" | "hold_next_item" | "unless_turn_open" => {
                format!("{param} must be a boolean")
            }
            _ => serde.to_owned(),
        }
    }
}

impl RequestBody for api::ClaimRequest {
    const FIELDS: &'static [&'static str] = &["stop"];

    fn field_message(param: &str, rest: &[String], serde: &str) -> String {
        // The path's first segment is `stop`; the field inside it is named in the message.
        let field = rest
            .first()
            .map(String::as_str)
            .or_else(|| missing_field(serde));
        match (param, field) {
            ("stop", Some(field @ ("work_id" | "session_token"))) => {
                format!("stop.{}", required_string_message(field, serde))
            }
            ("stop", Some("unless_turn_open")) => "stop.unless_turn_open must be a boolean".into(),
            ("stop", _) => {
                "stop must be an object with the item's work_id and session_token".to_owned()
            }
            _ => serde.to_owned(),
        }
    }
}

impl RequestBody for api::RequeueRequest {
    const FIELDS: &'static [&'static str] = &["reason"];

    fn field_message(param: &str, _: &[String], serde: &str) -> String {
        match param {
            "reason" => "reason must be a string".to_owned(),
            _ => serde.to_owned(),
        }
    }
}

impl RequestBody for api::WorkMetadataPatch {
    const FIELDS: &'static [&'static str] = &["metadata"];

    fn field_message(param: &str, rest: &[String], serde: &str) -> String {
        match param {
            "metadata" => metadata_patch_message(rest),
            _ => serde.to_owned(),
        }
    }
}

impl RequestBody for api::CreateCredential {
    const FIELDS: &'static [&'static str] = &["name"];

    fn field_message(param: &str, _: &[String], serde: &str) -> String {
        match param {
            "name" => "name must be a string (omit it for none)".to_owned(),
            _ => serde.to_owned(),
        }
    }
}

impl RequestBody for api::UpdateSession {
    const FIELDS: &'static [&'static str] = &["title", "metadata"];

    fn field_message(param: &str, rest: &[String], serde: &str) -> String {
        match param {
            "title" => "title must be a string".to_owned(),
            "metadata" => metadata_patch_message(rest),
            _ => serde.to_owned(),
        }
    }
}

impl RequestBody for api::CreateSession {
    const FIELDS: &'static [&'static str] = &[
        "environment_id",
        "agent",
        "title",
        "resources",
        "budget",
        "metadata",
        "environment_variables",
        "initial_events",
    ];
    const REQUIRED: &'static [&'static str] = &["environment_id", "agent"];

    fn field_message(param: &str, rest: &[String], serde: &str) -> String {
        match param {
            "environment_id" => required_string_message(param, serde),
            // `AgentRef` words its own refusals.
            "agent" => serde.to_owned(),
            "title" => "title must be a string".to_owned(),
            "resources" => "resources must be an array".to_owned(),
            "metadata" => metadata_message(rest),
            "environment_variables" => match rest.first() {
                Some(key) => format!("{param}.{key} must be a string"),
                None => format!("{param} must be an object of strings"),
            },
            "initial_events" => events_message(param, serde),
            _ => serde.to_owned(),
        }
    }
}

impl RequestBody for api::PostEvents {
    const FIELDS: &'static [&'static str] = &["events"];
    const REQUIRED: &'static [&'static str] = &["events"];

    fn field_message(param: &str, _: &[String], serde: &str) -> String {
        match param {
            "events" => events_message(param, serde),
            _ => serde.to_owned(),
        }
    }
}

/// A list of events that did not deserialize (its events are judged one by one later, by the core).
fn events_message(param: &str, serde: &str) -> String {
    if serde.starts_with("invalid type: null") || serde.starts_with("missing field") {
        format!("{param} is required (an array of 1 to {MAX_EVENTS_PER_BATCH} events)")
    } else {
        format!("{param} must be an array of events")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn decode<T: RequestBody>(body: Value) -> ApiResult<T> {
        fields(body.as_object().cloned().expect("an object"))
    }

    fn param_and_message<T: RequestBody + std::fmt::Debug>(body: Value) -> (String, String) {
        let e = decode::<T>(body).expect_err("a refusal");
        (e.param.clone().unwrap_or_default(), e.message.clone())
    }

    #[test]
    fn field_errors_name_the_field_in_the_api_wording() {
        assert_eq!(
            param_and_message::<api::StopRequest>(json!({"force": "yes"})),
            ("force".into(), "force must be a boolean".into())
        );
        assert_eq!(
            param_and_message::<api::UpdateSession>(json!({"metadata": {"k": 5}})),
            (
                "metadata".into(),
                "metadata value for key \"k\" must be a string or null".into()
            )
        );
        assert_eq!(
            param_and_message::<api::UpdateSession>(json!({"metadata": []})),
            ("metadata".into(), "metadata must be a JSON object".into())
        );
        assert_eq!(
            param_and_message::<api::CreateCredential>(json!({"name": null})),
            (
                "name".into(),
                "name must be a string (omit it for none)".into()
            )
        );
    }

    #[test]
    fn required_fields_are_judged_in_their_turn() {
        assert_eq!(
            param_and_message::<api::CreateEnvironment>(json!({"description": 1})),
            ("name".into(), "name is required".into())
        );
        assert_eq!(
            param_and_message::<api::CreateEnvironment>(json!({"name": 1})),
            ("name".into(), "name must be a string".into())
        );
        assert_eq!(
            param_and_message::<api::CreateEnvironment>(json!({"name": "n", "metadata": {"k": 1}})),
            (
                "metadata".into(),
                "metadata value for key \"k\" must be a string".into()
            )
        );
        let env: api::CreateEnvironment = decode(json!({"name": "n", "metadata": null})).unwrap();
        assert!(env.metadata.is_empty());
    }

    #[test]
    fn an_agent_update_tells_null_from_absence() {
        let update: api::UpdateAgent =
            decode(json!({"tools": null, "execution_identity": null})).unwrap();
        assert_eq!(update.tools, Some(Vec::new()));
        assert_eq!(update.skills, None);
        assert_eq!(update.execution_identity, Some(Value::Null));
        assert_eq!(
            param_and_message::<api::UpdateAgent>(json!({"version": -1})),
            (
                "version".into(),
                "version must be a positive integer".into()
            )
        );
    }

    #[test]
    fn the_first_bad_field_in_the_types_order_is_reported() {
        let (param, _) =
            param_and_message::<api::UpdateSession>(json!({"metadata": 1, "title": 2}));
        assert_eq!(param, "title");
    }

    #[test]
    fn nulls_read_as_absent_and_unknown_fields_are_ignored() {
        let stop: api::StopRequest = decode(json!({"force": null, "other": 1})).unwrap();
        assert_eq!(stop.force, None);
        let update: api::UpdateSession = decode(json!({"title": null, "metadata": null})).unwrap();
        assert_eq!(update.title, None);
        assert_eq!(update.metadata, None);
    }

    #[test]
    fn session_bodies_keep_the_api_wording() {
        let cases = [
            (json!({}), "environment_id", "environment_id is required"),
            (
                json!({"environment_id": "env_1"}),
                "agent",
                "agent is required",
            ),
            (
                json!({"environment_id": "env_1", "agent": 5}),
                "agent",
                "agent must be an agent id or {\"type\": \"agent\", \"id\": …}",
            ),
            (
                json!({"environment_id": "env_1", "agent": {"type": "agent"}}),
                "agent",
                "agent.id is required",
            ),
            (
                json!({"environment_id": "env_1", "agent": {"id": "a", "version": 0}}),
                "agent",
                "agent.version must be a positive integer",
            ),
            (
                json!({"environment_id": "env_1", "agent": "a", "environment_variables": {"K": 1}}),
                "environment_variables",
                "environment_variables.K must be a string",
            ),
            (
                json!({"environment_id": "env_1", "agent": "a", "environment_variables": []}),
                "environment_variables",
                "environment_variables must be an object of strings",
            ),
            (
                json!({"environment_id": "env_1", "agent": "a", "initial_events": "go"}),
                "initial_events",
                "initial_events must be an array of events",
            ),
        ];
        for (body, param, message) in cases {
            assert_eq!(
                param_and_message::<api::CreateSession>(body.clone()),
                (param.to_owned(), message.to_owned()),
                "{body}"
            );
        }
        let (param, message) = param_and_message::<api::CreateSession>(json!({
            "environment_id": "env_1", "agent": {"type": "agent_with_overrides", "id": "a"}
        }));
        assert_eq!(param, "agent");
        assert!(
            message.starts_with("agent.type \"agent_with_overrides\" is not supported"),
            "{message}"
        );
        let session: api::CreateSession = decode(json!({
            "environment_id": "env_1",
            "agent": {"type": "agent", "id": "a", "version": null},
            "metadata": null, "initial_events": null, "budget": null,
        }))
        .unwrap();
        assert_eq!(session.agent, api::AgentRef::Id("a".into()));
        assert!(session.initial_events.is_empty() && session.budget.is_none());
    }

    #[test]
    fn event_batches_must_be_arrays_whose_events_the_core_judges() {
        assert_eq!(
            param_and_message::<api::PostEvents>(json!({})),
            (
                "events".into(),
                "events is required (an array of 1 to 100 events)".into()
            )
        );
        assert_eq!(
            param_and_message::<api::PostEvents>(json!({"events": {}})),
            ("events".into(), "events must be an array of events".into())
        );
        // Any JSON value is an event here: its type's rules come later, from the core.
        let batch: api::PostEvents =
            decode(json!({"events": [7, {"type": "user.shout"}]})).unwrap();
        assert_eq!(batch.events.len(), 2);
    }
}
