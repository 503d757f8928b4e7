//! Who may do what (§11.1). Each check answers 403 for an authenticated caller without the right.

use tether_core::resources::Session;

use crate::error::{ApiError, ApiResult};
use crate::service::tokens::Principal;
use crate::service::App;

fn forbidden() -> ApiError {
    ApiError::forbidden("this credential may not perform this request")
}

pub fn admin(p: &Principal) -> ApiResult<()> {
    match p {
        Principal::Admin { .. } => Ok(()),
        _ => Err(forbidden()),
    }
}

/// Queue-wide work endpoints (list, poll, stats, ack, history, workers) of one environment.
pub fn environment(p: &Principal, environment_id: &str) -> ApiResult<()> {
    match p {
        Principal::Admin { .. } => Ok(()),
        Principal::EnvironmentKey {
            environment_id: e, ..
        } if e == environment_id => Ok(()),
        _ => Err(forbidden()),
    }
}

/// Endpoints on one work item (get, metadata, heartbeat, stop; and ack by its own session token). A
/// session token is bound to its environment too: under another environment's path it is the wrong
/// environment (403), not a lookup that happens to miss.
pub fn work_item(p: &Principal, environment_id: &str, work_id: &str) -> ApiResult<()> {
    match p {
        Principal::SessionToken {
            work_id: w,
            environment_id: e,
            ..
        } if w == work_id && e == environment_id => Ok(()),
        other => environment(other, environment_id),
    }
}

/// Reading a session (and its events), or posting worker-side events to it.
pub fn session(p: &Principal, session_id: &str, session_environment_id: &str) -> ApiResult<()> {
    match p {
        Principal::SessionToken { session_id: s, .. } if s == session_id => Ok(()),
        other => environment(other, session_environment_id),
    }
}

/// The session a caller names, if it may read it (and post to it, within the event rules): an admin, an
/// environment key of the session's environment, or the session token of the session's live item.
pub async fn readable_session(app: &App, p: &Principal, id: &str) -> ApiResult<Session> {
    if let Principal::SessionToken { session_id, .. } = p {
        // Known before any lookup: a session token serves exactly one session (D-32: 403 before 404).
        if session_id != id {
            return Err(ApiError::forbidden(
                "a session token may only use its own session",
            ));
        }
    }
    let found = app.session(id).await?;
    session(p, &found.id, &found.environment_id)?;
    Ok(found)
}

/// Whether the caller is a worker credential (environment key or session token).
pub fn is_worker(p: &Principal) -> bool {
    !matches!(p, Principal::Admin { .. })
}
