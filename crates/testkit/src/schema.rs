//! Every response a test sees, checked against the schema `/openapi.json` declares for its route and
//! status, so that a change of the wire model that the document does not follow (or the reverse) fails
//! a test. The document is the server's own (`tether_server::http::openapi::document`, what
//! `/openapi.json` serves); schemas are compiled once per route and status.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// `(method, path template, status)`.
type Answer = (String, String, String);

struct Document {
    doc: Value,
    /// Each answer's compiled schema, or `None` when that answer has no JSON schema (a stream, a file,
    /// text).
    compiled: Mutex<HashMap<Answer, Option<std::sync::Arc<jsonschema::Validator>>>>,
}

fn document() -> &'static Document {
    static DOC: OnceLock<Document> = OnceLock::new();
    DOC.get_or_init(|| Document {
        doc: serde_json::to_value(tether_server::http::openapi::document())
            .expect("the OpenAPI document serializes"),
        compiled: Mutex::new(HashMap::new()),
    })
}

/// The documented path template that `path` is an instance of: same segment count, equal literal
/// segments; among several (`/work/poll` and `/work/{work_id}`), the one with the most literal segments.
fn template<'a>(paths: &'a serde_json::Map<String, Value>, path: &str) -> Option<&'a str> {
    let wanted: Vec<&str> = path.split('/').collect();
    paths
        .keys()
        .filter_map(|t| {
            let segments: Vec<&str> = t.split('/').collect();
            if segments.len() != wanted.len() {
                return None;
            }
            let mut literal = 0;
            for (s, w) in segments.iter().zip(&wanted) {
                if s.starts_with('{') && s.ends_with('}') {
                    if w.is_empty() {
                        return None;
                    }
                } else if s == w {
                    literal += 1;
                } else {
                    return None;
                }
            }
            Some((literal, t.as_str()))
        })
        .max_by_key(|(literal, _)| *literal)
        .map(|(_, t)| t)
}

fn compile(doc: &Value, path: &str, method: &str, status: &str) -> Option<jsonschema::Validator> {
    let responses = &doc["paths"][path][method]["responses"];
    let response = responses
        .get(status)
        .or_else(|| responses.get("default"))
        .unwrap_or_else(|| {
            panic!("{method} {path}: the document declares no answer {status} (nor a default)")
        });
    let schema = response["content"]["application/json"].get("schema")?;
    // The response schema, with the document's components beside it so that its `$ref`s resolve.
    let mut root = json!({"components": doc["components"].clone()});
    for (k, v) in schema.as_object().expect("a schema is an object") {
        root[k] = v.clone();
    }
    Some(
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| {
                panic!("{method} {path} {status}: the schema does not compile: {e}")
            }),
    )
}

/// Panics unless `body` — the JSON answer (with `status`) to `method` on `url` — matches the schema
/// the document declares for it. Answers that are not JSON, and paths outside the document (tests of
/// unknown routes), are not checked.
#[track_caller]
pub fn check_response(
    method: &Method,
    url: &str,
    status: StatusCode,
    content_type: Option<&str>,
    body: &Value,
) {
    if !content_type.is_some_and(|t| t.starts_with("application/json")) {
        return;
    }
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return;
    };
    let document = document();
    let Some(paths) = document.doc["paths"].as_object() else {
        return;
    };
    let Some(path) = template(paths, parsed.path()) else {
        return;
    };
    let method = method.as_str().to_ascii_lowercase();
    if paths[path].get(&method).is_none() {
        return;
    }
    let status = status.as_u16().to_string();
    let key = (method.clone(), path.to_owned(), status.clone());
    let validator = {
        let mut compiled = document.compiled.lock().expect("schema cache");
        compiled
            .entry(key)
            .or_insert_with(|| {
                compile(&document.doc, path, &method, &status).map(std::sync::Arc::new)
            })
            .clone()
    };
    let Some(validator) = validator else {
        return;
    };
    let problems: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("at {}: {e}", e.instance_path()))
        .collect();
    assert!(
        problems.is_empty(),
        "{} {path} answered {status} with a body that does not match /openapi.json:\n  {}\nbody: {body}",
        method.to_ascii_uppercase(),
        problems.join("\n  ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_prefer_literal_segments() {
        let paths: serde_json::Map<String, Value> = [
            (
                "/v1/environments/{environment_id}/work/{work_id}",
                json!({}),
            ),
            ("/v1/environments/{environment_id}/work/poll", json!({})),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(
            template(&paths, "/v1/environments/env_1/work/poll"),
            Some("/v1/environments/{environment_id}/work/poll")
        );
        assert_eq!(
            template(&paths, "/v1/environments/env_1/work/work_1"),
            Some("/v1/environments/{environment_id}/work/{work_id}")
        );
        assert_eq!(template(&paths, "/v1/agents"), None);
    }

    #[test]
    fn a_body_that_drifts_from_the_document_fails() {
        let url = "http://127.0.0.1:1/api/v1/cloud/environments/env_1/work/stats";
        let good = json!({
            "type": "work_queue_stats", "depth": 0, "pending": 0, "oldest_queued_at": null,
            "workers_polling": 0, "states": {}
        });
        let check = |body: &Value| {
            check_response(
                &Method::GET,
                url,
                StatusCode::OK,
                Some("application/json"),
                body,
            )
        };
        check(&good);
        let mut drifted = good.clone();
        drifted["depth"] = json!("zero");
        let outcome = std::panic::catch_unwind(|| check(&drifted));
        assert!(outcome.is_err(), "a string depth must not match the schema");
        let mut missing = good;
        missing.as_object_mut().unwrap().remove("oldest_queued_at");
        let outcome = std::panic::catch_unwind(|| check(&missing));
        assert!(outcome.is_err(), "a required field may not be missing");
    }
}
