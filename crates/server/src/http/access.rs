//! Who may do what (§11.1), enforced from the route table: every route of `routes.rs` declares its
//! [`Access`], and the router's guard of each route ([`super::guard_route`]) [`admit`]s its requests
//! by that declaration. No handler
//! checks rights itself; a handler runs only for a caller the table admits.
//!
//! The guard keeps D-32's order: it authenticates (401), then checks what the caller may do (403), and
//! only then do the handler's lookups (404) and parameter checks (400) run. Where a right depends on a
//! record (a session, the sessions that use an agent), the guard reads that record; a session it read
//! is handed to the handler ([`ReadableSession`]) instead of being read twice.

use axum::extract::{FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use tether_core::resources::Session;
use tether_store::{PageRequest, SessionFilter};

use super::budget;
use super::extract::{Caller, Params};
use super::routes::Access;
use crate::error::{ApiError, ApiResult};
use crate::service::tokens::Principal;
use crate::service::App;

/// What [`admit`] judges a route's requests by: the application and the route's declared access.
#[derive(Clone)]
pub struct Guard {
    pub app: App,
    pub access: Access,
}

/// Admits a request by its route's declared [`Access`], or answers 401 or 403 (or 404 for a session
/// that does not exist, once the caller may know) so that the handler never runs.
pub async fn admit(guard: &Guard, request: Request) -> Result<Request, Response> {
    if guard.access == Access::Public {
        return Ok(request);
    }
    if guard.access == Access::Metrics {
        return match metrics_granted(&guard.app, request.headers()) {
            Ok(()) => Ok(request),
            Err(refusal) => Err(refusal.into_response()),
        };
    }
    let (mut parts, body) = request.into_parts();
    match grant(guard, &mut parts).await {
        Ok(()) => Ok(Request::from_parts(parts, body)),
        Err(refusal) => {
            // The body is not read for a caller refused here (it would cost the memory budget), but a
            // small one is drained so that the connection can carry the client's next request.
            budget::drain_refused(Request::from_parts(parts, body)).await;
            Err(refusal)
        }
    }
}

/// `/metrics` takes the metrics token when the server has one, and no other credential: a scraper
/// holds no right to anything else, and an admin token is not sent where a scraper's would do.
fn metrics_granted(app: &App, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &app.config.metrics_token_hash else {
        return Ok(());
    };
    super::extract::one_credential_header(headers)?;
    let presented = super::extract::bearer(headers).ok_or_else(|| {
        ApiError::unauthorized(
            "this server's metrics token is required, as Authorization: Bearer <token>",
        )
    })?;
    // Compared as hashes, as every credential is: how much of one matches says nothing of the token.
    if crate::credentials::hash(&presented) == *expected {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "that is not this server's metrics token",
        ))
    }
}

/// Authenticates the caller and checks the route's access rule, leaving the principal (and the session
/// it may read) in the request's extensions; the refusal to answer otherwise.
async fn grant(guard: &Guard, parts: &mut Parts) -> Result<(), Response> {
    let Caller(principal) = Caller::from_request_parts(parts, &guard.app)
        .await
        .map_err(IntoResponse::into_response)?;
    let path = RawPathParams::from_request_parts(parts, &guard.app)
        .await
        // A path that cannot be decoded: the handler's own extractor would refuse it the same way.
        .map_err(IntoResponse::into_response)?;
    let path: Vec<(String, String)> = path
        .iter()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    let target = |name: &str| {
        path.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| {
                panic!(
                    "a route declared {:?} has no {{{name}}} in its path",
                    guard.access
                )
            })
    };
    let granted = match guard.access {
        Access::Public | Access::Metrics => Ok(None),
        Access::Admin => admin(&principal).map(|()| None),
        Access::Environment => environment(&principal, target("environment_id")).map(|()| None),
        Access::WorkItem => {
            work_item(&principal, target("environment_id"), target("work_id")).map(|()| None)
        }
        Access::Session => readable_session(&guard.app, &principal, target("session_id"))
            .await
            .map(Some),
        Access::Agent => readable_agent(&guard.app, &principal, target("agent_id"))
            .await
            .map(|()| None),
        Access::SessionList => {
            let params = Params::parse(parts.uri.query().unwrap_or(""));
            params
                .get("environment_id")
                .and_then(|filter| session_list(&principal, filter))
                .map(|()| None)
        }
    };
    let session = granted.map_err(IntoResponse::into_response)?;
    if let Some(session) = session {
        parts.extensions.insert(ReadableSession(session));
    }
    // The handler's `Caller` takes the principal from here instead of authenticating again.
    parts.extensions.insert(principal);
    Ok(())
}

fn forbidden() -> ApiError {
    ApiError::forbidden("this credential may not perform this request")
}

fn admin(p: &Principal) -> ApiResult<()> {
    match p {
        Principal::Admin { .. } => Ok(()),
        _ => Err(forbidden()),
    }
}

/// Queue-wide work endpoints (list, poll, stats, ack, history, workers) of one environment.
fn environment(p: &Principal, environment_id: &str) -> ApiResult<()> {
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
fn work_item(p: &Principal, environment_id: &str, work_id: &str) -> ApiResult<()> {
    match p {
        Principal::SessionToken {
            work_id: w,
            environment_id: e,
            ..
        } if w == work_id && e == environment_id => Ok(()),
        other => environment(other, environment_id),
    }
}

/// The session a caller names, if it may read it (and post to it, within the event rules): an admin, an
/// environment key of the session's environment, or the session token of the session's live item.
async fn readable_session(app: &App, p: &Principal, id: &str) -> ApiResult<Session> {
    if let Principal::SessionToken { session_id, .. } = p {
        // Known before any lookup: a session token serves exactly one session (D-32: 403 before 404).
        if session_id != id {
            return Err(ApiError::forbidden(
                "a session token may only use its own session",
            ));
        }
    }
    let found = app.session(id).await?;
    match p {
        Principal::SessionToken { session_id, .. } if *session_id == found.id => {}
        other => environment(other, &found.environment_id)?,
    }
    Ok(found)
}

/// An agent may be read by an admin, by the session token of a session on it, and by a key of an
/// environment where some session uses it. At any of its versions: SPEC §11.1 grants "the agents
/// of sessions in it", and an agent is one resource across its versions. A key or token thus also
/// reads versions made after its sessions'; an agent whose later versions must stay with their
/// own environments is better made anew for each (confining a key to its sessions' versions would
/// mean reading every session of its environment, whose agent version only its document holds).
async fn readable_agent(app: &App, p: &Principal, id: &str) -> ApiResult<()> {
    match p {
        Principal::Admin { .. } => Ok(()),
        Principal::SessionToken { session_id, .. } => {
            let session = app.session(session_id).await?;
            if session.agent.id != id {
                return Err(ApiError::forbidden(
                    "this credential may only read the agent of its session",
                ));
            }
            Ok(())
        }
        Principal::EnvironmentKey { environment_id, .. } => {
            let refused = || {
                ApiError::forbidden(
                    "this credential may only read agents of its environment's sessions",
                )
            };
            // No session has an agent of a malformed id: answered without asking the store, which
            // could not even be asked about some strings (PostgreSQL text holds no NUL).
            if !tether_core::ids::is_well_formed(tether_core::ids::IdKind::Agent, id) {
                return Err(refused());
            }
            let filter = SessionFilter {
                agent_id: Some(id.to_owned()),
                environment_id: Some(environment_id.clone()),
                include_archived: true,
                ..Default::default()
            };
            let used = app.list_sessions(&filter, &PageRequest::first(1)).await?;
            if used.items.is_empty() {
                return Err(refused());
            }
            Ok(())
        }
    }
}

/// Listing sessions: an admin lists any; an environment key lists its own environment's only (the
/// handler confines the listing to it); a session token none.
fn session_list(p: &Principal, environment_filter: Option<&str>) -> ApiResult<()> {
    match p {
        Principal::Admin { .. } => Ok(()),
        Principal::EnvironmentKey { environment_id, .. } => {
            if environment_filter.is_some_and(|e| e != environment_id) {
                return Err(ApiError::forbidden(
                    "this credential may only list its own environment's sessions",
                ));
            }
            Ok(())
        }
        Principal::SessionToken { .. } => {
            Err(ApiError::forbidden("a session token may not list sessions"))
        }
    }
}

/// The session of a route declared [`Access::Session`], as [`admit`] read it for the caller.
#[derive(Clone)]
pub struct ReadableSession(pub Session);

impl<S: Send + Sync> FromRequestParts<S> for ReadableSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.remove::<ReadableSession>().ok_or_else(|| {
            // Only a route the table declares `Access::Session` carries one.
            tracing::error!("a handler asked for the session of a route without session access");
            ApiError::internal("internal error")
        })
    }
}

/// Whether the caller is a worker credential (environment key or session token).
pub fn is_worker(p: &Principal) -> bool {
    !matches!(p, Principal::Admin { .. })
}
