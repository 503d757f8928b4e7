//! The state fields: closed sets on the server, open sets for readers (an unknown value is kept as
//! `Other`, so that a newer server's states do not break an older client).

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;

/// Declares an enum over the string values of a state field that keeps unknown values as `Other`. Its
/// OpenAPI schema is a string enum of the known values (what this server sends).
macro_rules! string_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A value this crate does not know, as the server sent it.
            Other(String),
        }

        impl $name {
            /// The values this crate knows, in their wire spelling.
            pub const KNOWN: &'static [&'static str] = &[$($text,)*];

            /// The wire spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)*
                    $name::Other(s) => s,
                }
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($text => $name::$variant,)*
                    _ => $name::Other(s),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::from(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_owned()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some($name::KNOWN.iter().copied()))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

string_enum! {
    /// The state of a work item (§2.3). Live states are all but `Stopped`.
    pub enum WorkState {
        /// Waiting for a worker (possibly delivered by a poll and not yet acknowledged).
        Queued = "queued",
        /// Acknowledged by a worker, no heartbeat yet.
        Starting = "starting",
        /// Heartbeating.
        Active = "active",
        /// A graceful stop was requested; the worker drains and confirms with another stop.
        Stopping = "stopping",
        /// Terminal.
        Stopped = "stopped",
    }
}

impl WorkState {
    /// Everything but `stopped` (and unknown states) is live.
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            WorkState::Queued | WorkState::Starting | WorkState::Active | WorkState::Stopping
        )
    }
}

string_enum! {
    /// The status of a session (§2.2).
    pub enum SessionStatus {
        /// Waiting for input.
        Idle = "idle",
        /// A turn is being served.
        Running = "running",
        /// Its work item lost its lease and went back to the queue.
        Rescheduling = "rescheduling",
        /// Final.
        Terminated = "terminated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_states_survive_a_round_trip() {
        let s: WorkState = serde_json::from_value(json!("paused")).unwrap();
        assert_eq!(s, WorkState::Other("paused".into()));
        assert_eq!(serde_json::to_value(&s).unwrap(), json!("paused"));
        let s: WorkState = serde_json::from_value(json!("active")).unwrap();
        assert_eq!(s, WorkState::Active);
        assert!(s.is_live());
    }
}
