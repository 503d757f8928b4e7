//! The two wire dialects (§9). Every difference between them is a field of [`Dialect`]'s table here;
//! handlers and views ask the table and never branch on the dialect themselves. docs/dialects.md says
//! why each entry is what it is.

use serde_json::{json, Value};

/// Which prefix a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// `/api/v1/cloud/…` — Qoder Cloud Agents.
    Qoder,
    /// `/v1/…` — Claude Managed Agents.
    Anthropic,
}

impl Dialect {
    /// Both dialects, in the order they are mounted and documented.
    pub const ALL: [Dialect; 2] = [Dialect::Qoder, Dialect::Anthropic];

    pub const fn prefix(self) -> &'static str {
        match self {
            Dialect::Qoder => "/api/v1/cloud",
            Dialect::Anthropic => "/v1",
        }
    }

    /// The dialect of a request's path: the one whose prefix it starts with, as a whole segment.
    /// `None` for the paths of neither (the operations surface, unknown paths).
    pub fn of_path(path: &str) -> Option<Dialect> {
        Dialect::ALL.into_iter().find(|d| {
            path.strip_prefix(d.prefix())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }

    /// A short name for documents (OpenAPI operation ids and tags).
    pub const fn name(self) -> &'static str {
        match self {
            Dialect::Qoder => "qoder",
            Dialect::Anthropic => "anthropic",
        }
    }

    /// Largest `limit` on list endpoints other than the work list (§9; the Anthropic worker lists
    /// session events with `limit=1000`).
    pub const fn max_list_limit(self) -> u32 {
        match self {
            Dialect::Qoder => 100,
            Dialect::Anthropic => 1000,
        }
    }

    /// Smallest `reclaim_older_than_ms` accepted on poll.
    pub const fn min_reclaim_ms(self) -> i64 {
        match self {
            Dialect::Qoder => 0,
            Dialect::Anthropic => 1,
        }
    }

    /// Header names that carry the worker identity, in order of preference.
    pub const fn worker_headers(self) -> &'static [&'static str] {
        match self {
            // The Qoder SDK sends `Worker-ID`; accepting the other name costs nothing.
            Dialect::Qoder => &["worker-id", "anthropic-worker-id"],
            Dialect::Anthropic => &["anthropic-worker-id", "worker-id"],
        }
    }

    /// Whether `x-api-key` is an accepted way to send a credential (Qoder documents it as a 401).
    pub const fn accepts_x_api_key(self) -> bool {
        matches!(self, Dialect::Anthropic)
    }

    /// Whether an agent's `model` is always rendered as an object `{"id": …}`. The Anthropic SDK's agent
    /// model requires the object form even when the agent was created from a model name; Qoder's SDK
    /// takes either, so there the model is shown as it was given.
    pub const fn agent_model_as_object(self) -> bool {
        matches!(self, Dialect::Anthropic)
    }

    /// What an agent created without an `execution_identity` shows in that field. The Anthropic SDK
    /// requires the field; Qoder does not model it.
    pub fn default_execution_identity(self) -> Value {
        match self {
            Dialect::Qoder => Value::Null,
            Dialect::Anthropic => json!({"type": "service_account"}),
        }
    }

    /// The `config` an environment gets when its create request has none (§7.1: required in the Qoder
    /// profile, optional in the Anthropic one, where an environment without a config is a managed one).
    pub fn default_environment_config(self) -> Option<Value> {
        match self {
            Dialect::Qoder => None,
            Dialect::Anthropic => {
                Some(json!({"type": "cloud", "networking": {"type": "unrestricted"}}))
            }
        }
    }

    /// The credentials a request may carry, as OpenAPI security scheme names (see
    /// `http::openapi`): bearer everywhere, `x-api-key` where [`Dialect::accepts_x_api_key`].
    pub fn security_schemes(self) -> &'static [&'static str] {
        if self.accepts_x_api_key() {
            &["bearer", "api_key"]
        } else {
            &["bearer"]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_belongs_to_the_dialect_whose_prefix_is_a_whole_segment_of_it() {
        for (path, dialect) in [
            ("/api/v1/cloud/environments", Some(Dialect::Qoder)),
            ("/api/v1/cloud", Some(Dialect::Qoder)),
            ("/v1/environments/env_1/work/poll", Some(Dialect::Anthropic)),
            ("/v1", Some(Dialect::Anthropic)),
            ("/v10/environments", None),
            ("/api/v1/cloudy", None),
            ("/healthz", None),
            ("/", None),
        ] {
            assert_eq!(Dialect::of_path(path), dialect, "{path}");
        }
    }
}
