//! Environments, agents, sessions and credentials (§7.1, §11.1, §12.1, §12.2).

use axum::extract::{Path, State};
use axum::Json;
use tether_api as api;
use tether_core::ids::{self, IdKind};
use tether_core::resources::CredentialKind;
use tether_core::session::SessionStatus;
use tether_store::{ArchiveFilter, SessionFilter};

use super::access::ReadableSession;
use super::extract::{Caller, JsonBody, Params, Wire};
use super::{decode, wire};
use crate::error::{ApiError, ApiResult};
use crate::service::tokens::Principal;
use crate::service::App;

fn archive_filter(params: &Params) -> ApiResult<ArchiveFilter> {
    Ok(ArchiveFilter {
        include_archived: params.bool("include_archived")?.unwrap_or(false),
        created_gte: params.timestamp("created_at[gte]")?,
        created_lte: params.timestamp("created_at[lte]")?,
    })
}

pub async fn create_environment(
    State(app): State<App>,
    Wire(d): Wire,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::Environment>> {
    // D-32: the body is judged (400) after the caller's rights (403) and the target (404).
    let request: api::CreateEnvironment = decode::optional(body)?;
    let env = app
        .create_environment(request.into(), d.default_environment_config())
        .await?;
    Ok(Json(wire::environment(&env)))
}

pub async fn list_environments(
    State(app): State<App>,
    Wire(d): Wire,
    params: Params,
) -> ApiResult<Json<api::Page<api::Environment>>> {
    let page = params.page(d.max_list_limit(), false, Some(IdKind::Environment))?;
    let envs = app
        .list_environments(&archive_filter(&params)?, &page)
        .await?;
    Ok(Json(wire::list(&envs, |e| e.id.clone(), wire::environment)))
}

pub async fn get_environment(
    State(app): State<App>,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Environment>> {
    Ok(Json(wire::environment(&app.environment(&id).await?)))
}

pub async fn update_environment(
    State(app): State<App>,
    Path(id): Path<String>,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::Environment>> {
    app.environment(&id).await?;
    let request: api::UpdateEnvironment = decode::required(body)?;
    Ok(Json(wire::environment(
        &app.update_environment(&id, request.into()).await?,
    )))
}

pub async fn archive_environment(
    State(app): State<App>,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Environment>> {
    Ok(Json(wire::environment(
        &app.archive_environment(&id).await?,
    )))
}

pub async fn delete_environment(
    State(app): State<App>,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Deleted>> {
    app.delete_environment(&id).await?;
    Ok(Json(wire::deleted(&id, "environment_deleted")))
}

pub async fn create_key(
    State(app): State<App>,
    Path(id): Path<String>,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::Credential>> {
    app.environment(&id).await?;
    let request: api::CreateCredential = decode::optional(body)?;
    let (credential, secret) = app.create_environment_key(&id, request.into()).await?;
    Ok(Json(wire::new_credential(&credential, &secret)))
}

pub async fn list_keys(
    State(app): State<App>,
    Path(id): Path<String>,
    params: Params,
) -> ApiResult<Json<api::Page<api::Credential>>> {
    let page = params.page(100, false, Some(IdKind::EnvironmentKey))?;
    let keys = app
        .list_credentials(CredentialKind::Environment, Some(&id), &page)
        .await?;
    Ok(Json(wire::list(&keys, |c| c.id.clone(), wire::credential)))
}

pub async fn revoke_key(
    State(app): State<App>,
    Path((id, key_id)): Path<(String, String)>,
) -> ApiResult<Json<api::Credential>> {
    app.environment(&id).await?;
    Ok(Json(wire::credential(
        &app.revoke_credential(CredentialKind::Environment, Some(&id), &key_id)
            .await?,
    )))
}

pub async fn create_token(
    State(app): State<App>,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::Credential>> {
    let request: api::CreateCredential = decode::optional(body)?;
    let (credential, secret) = app.create_admin_token(request.into()).await?;
    Ok(Json(wire::new_credential(&credential, &secret)))
}

pub async fn list_tokens(
    State(app): State<App>,
    params: Params,
) -> ApiResult<Json<api::Page<api::Credential>>> {
    let page = params.page(100, false, Some(IdKind::Token))?;
    let tokens = app
        .list_credentials(CredentialKind::Admin, None, &page)
        .await?;
    Ok(Json(wire::list(
        &tokens,
        |c| c.id.clone(),
        wire::credential,
    )))
}

pub async fn revoke_token(
    State(app): State<App>,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Credential>> {
    Ok(Json(wire::credential(
        &app.revoke_credential(CredentialKind::Admin, None, &id)
            .await?,
    )))
}

pub async fn create_agent(
    State(app): State<App>,
    Wire(d): Wire,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::Agent>> {
    let request: api::CreateAgent = decode::optional(body)?;
    Ok(Json(wire::agent(
        &app.create_agent(request.into()).await?,
        d,
    )))
}

pub async fn list_agents(
    State(app): State<App>,
    Wire(d): Wire,
    params: Params,
) -> ApiResult<Json<api::Page<api::Agent>>> {
    let page = params.page(d.max_list_limit(), false, Some(IdKind::Agent))?;
    let agents = app.list_agents(&archive_filter(&params)?, &page).await?;
    Ok(Json(wire::list(
        &agents,
        |a| a.id.clone(),
        |a| wire::agent(a, d),
    )))
}

pub async fn get_agent(
    State(app): State<App>,
    Wire(d): Wire,
    Path(id): Path<String>,
    params: Params,
) -> ApiResult<Json<api::Agent>> {
    let agent = app.agent(&id).await?;
    // `?version=n` reads an earlier version (both SDKs' `agents.retrieve(id, version=…)`).
    let agent = match params.int("version")? {
        None => agent,
        Some(version) => app.agent_version(&id, version).await?,
    };
    Ok(Json(wire::agent(&agent, d)))
}

pub async fn update_agent(
    State(app): State<App>,
    Wire(d): Wire,
    Path(id): Path<String>,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::Agent>> {
    app.agent(&id).await?;
    let request: api::UpdateAgent = decode::required(body)?;
    Ok(Json(wire::agent(
        &app.update_agent(&id, request.into()).await?,
        d,
    )))
}

pub async fn archive_agent(
    State(app): State<App>,
    Wire(d): Wire,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Agent>> {
    Ok(Json(wire::agent(&app.archive_agent(&id).await?, d)))
}

pub async fn create_session(
    State(app): State<App>,
    Wire(d): Wire,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::Session>> {
    let request: api::CreateSession = decode::optional(body)?;
    let session = app.create_session(request.into()).await?;
    Ok(Json(wire::session(&session, d)))
}

pub async fn list_sessions(
    State(app): State<App>,
    Caller(p): Caller,
    Wire(d): Wire,
    params: Params,
) -> ApiResult<Json<api::Page<api::Session>>> {
    let page = params.page(d.max_list_limit(), false, Some(IdKind::Session))?;
    let archive = archive_filter(&params)?;
    let statuses = params
        .all("statuses")
        .iter()
        .map(|s| {
            SessionStatus::parse(s).ok_or_else(|| {
                ApiError::bad_param("statuses", format!("unknown session status {s:?}"))
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let mut filter = SessionFilter {
        agent_id: params.get("agent_id")?.map(str::to_owned),
        environment_id: params.get("environment_id")?.map(str::to_owned),
        statuses,
        include_archived: archive.include_archived,
        created_gte: archive.created_gte,
        created_lte: archive.created_lte,
    };
    // A worker credential sees the sessions of its own environment only (the route's authorization
    // refused any other environment it named).
    if let Principal::EnvironmentKey { environment_id, .. } = &p {
        filter.environment_id = Some(environment_id.clone());
    }
    // An id filter that is not shaped like an id of its kind matches no session: answered without asking
    // the store, which could not even be asked about some strings (PostgreSQL text holds no NUL).
    let matches_nothing = filter
        .agent_id
        .as_deref()
        .is_some_and(|a| !ids::is_well_formed(IdKind::Agent, a))
        || filter
            .environment_id
            .as_deref()
            .is_some_and(|e| !ids::is_well_formed(IdKind::Environment, e));
    let sessions = if matches_nothing {
        tether_store::Page {
            items: Vec::new(),
            has_more: false,
        }
    } else {
        app.list_sessions(&filter, &page).await?
    };
    Ok(Json(wire::list(
        &sessions,
        |s| s.id.clone(),
        |s| wire::session(s, d),
    )))
}

pub async fn get_session(
    Wire(d): Wire,
    ReadableSession(session): ReadableSession,
) -> ApiResult<Json<api::Session>> {
    Ok(Json(wire::session(&session, d)))
}

pub async fn update_session(
    State(app): State<App>,
    Wire(d): Wire,
    Path(id): Path<String>,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::Session>> {
    app.session(&id).await?;
    let request: api::UpdateSession = decode::required(body)?;
    Ok(Json(wire::session(
        &app.update_session(&id, request.into()).await?,
        d,
    )))
}

pub async fn archive_session(
    State(app): State<App>,
    Wire(d): Wire,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Session>> {
    Ok(Json(wire::session(&app.archive_session(&id).await?, d)))
}

pub async fn delete_session(
    State(app): State<App>,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Deleted>> {
    app.delete_session(&id).await?;
    Ok(Json(wire::deleted(&id, "session_deleted")))
}
