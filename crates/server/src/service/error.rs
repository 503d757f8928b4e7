//! What the service answers when it does not do what it was asked: a domain error that says what went
//! wrong, never how HTTP shows it. `crate::error` maps each variant to its status and envelope (§1.7).

use tether_core::events::Refusal;
use tether_core::ids::IdKind;
use tether_core::metadata::MetadataError;
use tether_core::work::WorkError;
use tether_store::StoreError;

use crate::telemetry::SharedRateLimitedLog;

/// The kinds of record a lookup can miss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    Environment,
    Agent,
    /// A version of an agent that exists.
    AgentVersion(u32),
    Session,
    /// A work item of the environment the request names.
    Work,
    /// An admin token or an environment key (of the environment the request names).
    Credential(tether_core::resources::CredentialKind),
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// No such record (or none the caller may know of there).
    #[error("{}", not_found_message(*.kind, .id))]
    NotFound { kind: Missing, id: String },
    /// A parameter or body field the service cannot take; `param` names it when it is one field.
    #[error("{message}")]
    Invalid {
        param: Option<String>,
        message: String,
    },
    /// An event bigger than the event limit.
    #[error("{param} is {size} bytes of JSON; an event may be at most {limit} bytes")]
    EventTooLarge {
        param: String,
        size: usize,
        limit: usize,
    },
    /// The presented credential is unknown, revoked, or (a session token) no longer live.
    #[error("the credential is invalid, revoked or expired")]
    Unauthenticated,
    /// A session token whose item's lease ran out: dead as any other, with the reason a worker needs
    /// (its item goes back to the queue and will be served again, rather than having ended).
    #[error(
        "this session token's lease ran out: its work item goes back to the queue, for another worker"
    )]
    LeaseLapsed,
    /// The caller may not ask for this (beyond what the route's access admits), e.g. a worker sending a
    /// user-side event.
    #[error("{message}")]
    Forbidden {
        param: Option<String>,
        message: String,
    },
    /// The work-item state machine refused the operation (§5).
    #[error(transparent)]
    Refused(#[from] WorkError),
    /// The session's turn rules refused an event (§12.3, §12.4).
    #[error("{}", .0.reason)]
    EventRefused(Refusal),
    /// The operation does not fit the state of the records around it, e.g. a requeue for a session
    /// that already has a live item.
    #[error("{message}")]
    InvalidState { message: String },
    /// The environment still has sessions and cannot be deleted.
    #[error("{sessions} session(s) still reference this environment; delete them first")]
    EnvironmentInUse { sessions: u64 },
    /// Archiving what is archived already (`what`: "agent", "environment", "session").
    #[error("the {what} is already archived")]
    AlreadyArchived { what: &'static str },
    /// An update named a version that is no longer the current one.
    #[error("the agent is at version {current}, not {expected}; read it again and retry")]
    VersionMismatch { current: u32, expected: u32 },
    /// The environment's workers and keys hold as many event streams as they may
    /// ([`super::ServiceConfig::max_streams_per_environment`]).
    #[error(
        "environment {environment_id} has {limit} event streams open, the most its keys and \
         session tokens may hold at once (--max-streams-per-environment): close one first"
    )]
    TooManyStreams {
        environment_id: String,
        limit: usize,
    },
    /// Lost every race with concurrent changes ([`super::MAX_ATTEMPTS`]).
    #[error("the request kept losing races with concurrent changes; retry it")]
    Contended,
    /// The store cannot reach its database. `lease_amnesty_ms`: the promise that no lease expires
    /// because of the outage (see [`super::App::with_amnesty_promise`]). `outcome_unknown`: the
    /// connection was lost after a write went out for its commit ([`StoreError::OutcomeUnknown`]),
    /// so it may have been applied; else nothing was written.
    #[error("{}", unavailable_said_to_the_client(*outcome_unknown))]
    StoreUnavailable {
        lease_amnesty_ms: Option<i64>,
        outcome_unknown: bool,
    },
    /// The database's disk is full: the write was not made ([`StoreError::Full`]).
    #[error("the database's disk is full: nothing was written; the same request can succeed once space is freed")]
    StoreFull,
    /// The store's disk has less free space than the server keeps ([`crate::disk`]): the request
    /// would add records, and is refused before it is tried.
    #[error(
        "the store's disk has {free} bytes free, less than the {floor} this server keeps \
         (--min-free-disk): new sessions, environments, agents and events are refused until \
         space is freed"
    )]
    DiskLow { free: u64, floor: u64 },
    /// Anything else the store failed at.
    #[error("internal storage error")]
    Internal,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a client is told of an outage: that it may send the request again, unless its write may
/// have been applied (sent again, a session or an event would then be made twice).
fn unavailable_said_to_the_client(outcome_unknown: bool) -> &'static str {
    if outcome_unknown {
        "the connection to the database was lost while this request's write was being committed: \
         it may have been applied. Read what it would have changed before sending it again"
    } else {
        "the database is unavailable; retry shortly"
    }
}

impl Error {
    /// The store could not reach its database ([`StoreError::is_unavailable`], which this error is
    /// made from): an outage, said once by the store itself.
    pub fn is_outage(&self) -> bool {
        matches!(self, Error::StoreUnavailable { .. })
    }
}

/// A store that cannot serve is logged at `warn` once a while at most
/// ([`crate::telemetry::RateLimitedLog`]), with how many failures went unlogged, and each at
/// `debug`: in an outage every request and every background duty's tick fails alike, and the store
/// says the outage itself as it begins and as it ends ("lost the database", "the database is
/// reachable again"). A pool whose connections are all busy is said the same way.
fn unavailable_said(reason: &str) {
    static LINES: SharedRateLimitedLog = SharedRateLimitedLog::new();
    match LINES.due() {
        Some(unlogged) => {
            tracing::warn!(%reason, unlogged_since_last = unlogged, "store unavailable")
        }
        None => tracing::debug!(%reason, "store unavailable"),
    }
}

/// A full disk fails every write alike until an operator frees space: said at `error` once a
/// while at most, as [`unavailable_said`] says an outage.
fn disk_full_said(reason: &str) {
    static LINES: SharedRateLimitedLog = SharedRateLimitedLog::new();
    match LINES.due() {
        Some(unlogged) => tracing::error!(
            %reason,
            unlogged_since_last = unlogged,
            "the database's disk is full: writes fail until space is freed"
        ),
        None => tracing::debug!(%reason, "the database's disk is full"),
    }
}

fn not_found_message(kind: Missing, id: &str) -> String {
    let missing = missing_message(kind, id);
    // An id of another kind given where this one goes (`--agent env_…`): said, for it is the
    // likeliest reason, and a plain "no agent env_…" leaves the caller to spot it.
    let expected = match kind {
        Missing::Environment => IdKind::Environment,
        Missing::Agent | Missing::AgentVersion(_) => IdKind::Agent,
        Missing::Session => IdKind::Session,
        Missing::Work => IdKind::Work,
        Missing::Credential(tether_core::resources::CredentialKind::Admin) => IdKind::Token,
        Missing::Credential(tether_core::resources::CredentialKind::Environment) => {
            IdKind::EnvironmentKey
        }
    };
    match IdKind::of(id) {
        Some(given) if given != expected => {
            format!("{missing}: {id} is {}'s id", given.noun())
        }
        _ => missing,
    }
}

fn missing_message(kind: Missing, id: &str) -> String {
    match kind {
        Missing::Environment => format!("no environment {id}"),
        Missing::Agent => format!("no agent {id}"),
        Missing::AgentVersion(version) => format!("agent {id} has no version {version}"),
        Missing::Session => format!("no session {id}"),
        Missing::Work => format!("no work item {id} in this environment"),
        Missing::Credential(tether_core::resources::CredentialKind::Admin) => {
            format!("no admin token {id}")
        }
        Missing::Credential(tether_core::resources::CredentialKind::Environment) => {
            format!("no key {id} of this environment")
        }
    }
}

impl Error {
    pub fn not_found(kind: Missing, id: &str) -> Error {
        Error::NotFound {
            kind,
            id: id.to_owned(),
        }
    }

    /// A bad value of one named parameter or field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Error {
        Error::Invalid {
            param: Some(param.to_owned()),
            message: message.into(),
        }
    }

    /// A request the service cannot take as a whole (no one field to blame).
    pub fn malformed(message: impl Into<String>) -> Error {
        Error::Invalid {
            param: None,
            message: message.into(),
        }
    }

    pub fn invalid_state(message: impl Into<String>) -> Error {
        Error::InvalidState {
            message: message.into(),
        }
    }
}

/// Every metadata map in the API is the `metadata` field (§1.9).
impl From<MetadataError> for Error {
    fn from(e: MetadataError) -> Self {
        Error::invalid("metadata", e.to_string())
    }
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Self {
        Error::EventRefused(refusal)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Error::Contended,
            StoreError::Unavailable(reason) => {
                unavailable_said(&reason);
                Error::StoreUnavailable {
                    lease_amnesty_ms: None,
                    outcome_unknown: false,
                }
            }
            StoreError::OutcomeUnknown(reason) => {
                unavailable_said(&reason);
                Error::StoreUnavailable {
                    lease_amnesty_ms: None,
                    outcome_unknown: true,
                }
            }
            StoreError::Full(reason) => {
                disk_full_said(&reason);
                Error::StoreFull
            }
            StoreError::Internal(reason) => {
                tracing::error!(%reason, "store error");
                Error::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_of_another_kind_is_said_to_be_one() {
        let env = "env_019f3be4fd2475d9a784bf2c739e1194";
        let agent = "agent_019f3be4fd2475d9a784bf2c739e1194";
        let message = Error::not_found(Missing::Agent, env).to_string();
        assert_eq!(
            message,
            format!("no agent {env}: {env} is an environment's id")
        );
        let message = Error::not_found(Missing::Environment, agent).to_string();
        assert_eq!(
            message,
            format!("no environment {agent}: {agent} is an agent's id")
        );
        // Of its own kind, or no id at all: the plain message.
        assert_eq!(
            Error::not_found(Missing::Agent, agent).to_string(),
            format!("no agent {agent}")
        );
        assert_eq!(
            Error::not_found(Missing::Session, "x").to_string(),
            "no session x"
        );
    }
}
