//! From the domain's records (`tether-core`, `tether-store`) to the wire model (`tether-api`): every
//! answer is one of those types, so the bytes on the wire, the OpenAPI document and the client agree.
//! Where the dialects render a field differently, the conversion takes the [`Dialect`] and asks its table.

use serde_json::{Map, Value};
use tether_api as api;
use tether_core::resources::{Agent, Credential, CredentialKind, Environment, Session};
use tether_core::session::SessionStatus;
use tether_core::work::HeartbeatReply;
use tether_core::{Timestamp, WorkItem, WorkState};
use tether_store::{HistoryRow, Page};

use crate::dialect::Dialect;

fn ts(t: Timestamp) -> String {
    t.to_rfc3339()
}

fn maybe_ts(t: Option<Timestamp>) -> Option<String> {
    t.map(ts)
}

fn state(s: WorkState) -> api::WorkState {
    api::WorkState::from(s.as_str())
}

/// A stored JSON array (validated as one on the way in) as its elements.
fn array(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// A list page (§1.8) of `page`'s records, each rendered by `render`; the cursors are the records' ids.
pub fn list<T, W>(
    page: &Page<T>,
    id_of: impl Fn(&T) -> String,
    render: impl Fn(&T) -> W,
) -> api::Page<W> {
    let first_id = page.items.first().map(&id_of);
    let last_id = page.items.last().map(&id_of);
    api::Page {
        data: page.items.iter().map(render).collect(),
        first_id,
        next_page: if page.has_more { last_id.clone() } else { None },
        last_id,
        has_more: page.has_more,
    }
}

pub fn environment(env: &Environment) -> api::Environment {
    api::Environment {
        id: env.id.clone(),
        object: "environment".into(),
        name: env.name.clone(),
        description: Some(env.description.clone()),
        config: env.config.clone(),
        metadata: env.metadata.clone(),
        scope: env.scope.clone(),
        status: Some(
            if env.archived_at.is_some() {
                "archived"
            } else {
                "ready"
            }
            .into(),
        ),
        archived: Some(env.archived_at.is_some()),
        archived_at: maybe_ts(env.archived_at),
        created_at: ts(env.created_at),
        updated_at: ts(env.updated_at),
        extra: Map::new(),
    }
}

/// A work item; `secret` is set only on poll responses (§2.3).
pub fn work(item: &WorkItem, secret: Option<String>) -> api::WorkItem {
    api::WorkItem {
        id: item.id.clone(),
        object: "work".into(),
        environment_id: item.environment_id.clone(),
        data: api::WorkData {
            kind: item.data.kind.clone(),
            id: item.data.id.clone(),
        },
        state: state(item.state),
        created_at: ts(item.created_at),
        acknowledged_at: maybe_ts(item.acknowledged_at),
        started_at: maybe_ts(item.started_at),
        latest_heartbeat_at: maybe_ts(item.latest_heartbeat_at),
        stop_requested_at: maybe_ts(item.stop_requested_at),
        stopped_at: maybe_ts(item.stopped_at),
        metadata: item.metadata.clone(),
        secret,
        delivery_count: Some(u64::from(item.delivery_count)),
        requeue_count: Some(u64::from(item.requeue_count)),
        extra: Map::new(),
    }
}

pub fn agent(agent: &Agent, dialect: Dialect) -> api::Agent {
    let model =
        match &agent.model {
            Value::String(name) if dialect.agent_model_as_object() => Value::Object(
                Map::from_iter([("id".to_owned(), Value::String(name.clone()))]),
            ),
            other => other.clone(),
        };
    let execution_identity = agent
        .execution_identity
        .clone()
        .unwrap_or_else(|| dialect.default_execution_identity());
    api::Agent {
        id: agent.id.clone(),
        object: "agent".into(),
        name: agent.name.clone(),
        model,
        description: agent.description.clone(),
        system: agent.system.clone(),
        tools: array(&agent.tools),
        skills: array(&agent.skills),
        mcp_servers: array(&agent.mcp_servers),
        execution_identity: Some(execution_identity).filter(|v| !v.is_null()),
        metadata: agent.metadata.clone(),
        version: agent.version,
        created_at: ts(agent.created_at),
        updated_at: ts(agent.updated_at),
        archived_at: maybe_ts(agent.archived_at),
        extra: Map::new(),
    }
}

/// A session, with the fields the Anthropic SDK requires (`outcome_evaluations`, `stats`, `usage`,
/// `vault_ids`) always present.
pub fn session(s: &Session, dialect: Dialect) -> api::Session {
    api::Session {
        id: s.id.clone(),
        object: "session".into(),
        agent: agent(&s.agent, dialect),
        agent_id: s.agent.id.clone(),
        environment_id: s.environment_id.clone(),
        status: api::SessionStatus::from(s.status.as_str()),
        turn_status: Some(
            if s.status == SessionStatus::Running {
                "running"
            } else {
                "idle"
            }
            .into(),
        ),
        title: s.title.clone(),
        metadata: s.metadata.clone(),
        environment_variables: s.environment_variables.clone(),
        resources: array(&s.resources),
        vault_ids: Vec::new(),
        memory_store_ids: Vec::new(),
        deployment_id: None,
        outcome_evaluations: Vec::new(),
        stats: api::SessionStats::default(),
        usage: api::SessionUsage::default(),
        created_at: ts(s.created_at),
        updated_at: ts(s.updated_at),
        archived_at: maybe_ts(s.archived_at),
        extra: Map::new(),
    }
}

/// A credential as listed (never with its secret).
pub fn credential(c: &Credential) -> api::Credential {
    api::Credential {
        id: c.id.clone(),
        object: match c.kind {
            CredentialKind::Admin => "token",
            CredentialKind::Environment => "environment_key",
        }
        .into(),
        name: c.name.clone(),
        environment_id: c.environment_id.clone(),
        hint: Some(c.hint.clone()),
        created_at: ts(c.created_at),
        revoked_at: maybe_ts(c.revoked_at),
        token: None,
        extra: Map::new(),
    }
}

/// A credential just minted, with its secret shown this once.
pub fn new_credential(c: &Credential, secret: &str) -> api::Credential {
    api::Credential {
        token: Some(secret.to_owned()),
        ..credential(c)
    }
}

pub fn deleted(id: &str, object: &str) -> api::Deleted {
    api::Deleted {
        id: id.to_owned(),
        object: object.to_owned(),
    }
}

pub fn heartbeat(reply: &HeartbeatReply) -> api::Heartbeat {
    api::Heartbeat {
        object: "work_heartbeat".into(),
        last_heartbeat: ts(reply.last_heartbeat),
        lease_extended: reply.lease_extended,
        state: state(reply.state),
        ttl_seconds: reply.ttl_seconds,
        extra: Map::new(),
    }
}

pub fn history(work_id: &str, item: &WorkItem, page: &Page<HistoryRow>) -> api::WorkHistory {
    let data = page
        .items
        .iter()
        .map(|row| {
            let t = &row.transition;
            api::WorkTransition {
                object: "work_transition".into(),
                at: ts(t.at),
                from: t.from.map(state),
                to: state(t.to),
                cause: t.cause.as_str().to_owned(),
                worker_id: t.worker_id.clone(),
                detail: t.detail.clone().map(Value::String),
                extra: Map::new(),
            }
        })
        .collect();
    let cursors = list(page, |r| r.seq.to_string(), |_| ());
    api::WorkHistory {
        work_id: Some(work_id.to_owned()),
        data,
        first_id: cursors.first_id,
        last_id: cursors.last_id,
        has_more: cursors.has_more,
        next_page: cursors.next_page,
        heartbeat_count: Some(item.heartbeat_count),
    }
}

/// The workers seen polling, each with the live items it holds.
pub fn workers(seen: &[(String, Timestamp, Vec<WorkItem>)]) -> api::Workers {
    api::Workers {
        data: seen
            .iter()
            .map(|(worker, at, items)| api::Worker {
                object: "worker".into(),
                worker_id: worker.clone(),
                last_poll_at: ts(*at),
                items: items
                    .iter()
                    .map(|i| api::WorkerItem {
                        id: i.id.clone(),
                        state: state(i.state),
                        session_id: Some(i.data.id.clone()),
                    })
                    .collect(),
                extra: Map::new(),
            })
            .collect(),
    }
}
