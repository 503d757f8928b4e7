//! Rendering records as the JSON the wire expects (§2). One function per resource, used by both dialects;
//! where the dialects render a field differently the function takes the [`Dialect`] and asks its table.

use serde_json::{json, Value};
use tether_core::resources::{Agent, Credential, Environment, Session};
use tether_core::{Timestamp, WorkItem};
use tether_store::{HistoryRow, Page};

use crate::dialect::Dialect;

fn ts(t: Option<Timestamp>) -> Value {
    t.map_or(Value::Null, |t| json!(t.to_rfc3339()))
}

pub fn environment(env: &Environment) -> Value {
    json!({
        "id": env.id,
        "type": "environment",
        "name": env.name,
        "description": env.description,
        "config": env.config,
        "metadata": env.metadata,
        "scope": env.scope,
        "status": if env.archived_at.is_some() { "archived" } else { "ready" },
        "archived": env.archived_at.is_some(),
        "archived_at": ts(env.archived_at),
        "created_at": env.created_at.to_rfc3339(),
        "updated_at": env.updated_at.to_rfc3339(),
    })
}

/// A work item; `secret` is set only on poll responses (§2.3).
pub fn work(item: &WorkItem, secret: Option<&str>) -> Value {
    json!({
        "id": item.id,
        "type": "work",
        "environment_id": item.environment_id,
        "data": { "type": item.data.kind, "id": item.data.id },
        "state": item.state.as_str(),
        "created_at": item.created_at.to_rfc3339(),
        "acknowledged_at": ts(item.acknowledged_at),
        "started_at": ts(item.started_at),
        "latest_heartbeat_at": ts(item.latest_heartbeat_at),
        "stop_requested_at": ts(item.stop_requested_at),
        "stopped_at": ts(item.stopped_at),
        "metadata": item.metadata,
        "secret": secret,
        "delivery_count": item.delivery_count,
        "requeue_count": item.requeue_count,
    })
}

pub fn agent(agent: &Agent, dialect: Dialect) -> Value {
    let model = match &agent.model {
        Value::String(name) if dialect.agent_model_as_object() => json!({ "id": name }),
        other => other.clone(),
    };
    let execution_identity = agent
        .execution_identity
        .clone()
        .unwrap_or_else(|| dialect.default_execution_identity());
    json!({
        "id": agent.id,
        "type": "agent",
        "name": agent.name,
        "model": model,
        "description": agent.description,
        "system": agent.system,
        "tools": agent.tools,
        "skills": agent.skills,
        "mcp_servers": agent.mcp_servers,
        "execution_identity": execution_identity,
        "metadata": agent.metadata,
        "version": agent.version,
        "created_at": agent.created_at.to_rfc3339(),
        "updated_at": agent.updated_at.to_rfc3339(),
        "archived_at": ts(agent.archived_at),
    })
}

/// A session. Workers iterate `resources` and `agent.skills`, and the Anthropic SDK requires
/// `outcome_evaluations`, `stats`, `usage` and `vault_ids`: all of them are always present.
pub fn session(s: &Session, dialect: Dialect) -> Value {
    json!({
        "id": s.id,
        "type": "session",
        "agent": agent(&s.agent, dialect),
        "agent_id": s.agent.id,
        "environment_id": s.environment_id,
        "status": s.status.as_str(),
        "turn_status": if s.status == tether_core::session::SessionStatus::Running { "running" } else { "idle" },
        "title": s.title,
        "metadata": s.metadata,
        "environment_variables": s.environment_variables,
        "resources": s.resources,
        "vault_ids": [],
        "memory_store_ids": [],
        "deployment_id": null,
        "outcome_evaluations": [],
        "stats": { "active_seconds": 0, "duration_seconds": 0 },
        "usage": { "total_credits": 0 },
        "created_at": s.created_at.to_rfc3339(),
        "updated_at": s.updated_at.to_rfc3339(),
        "archived_at": ts(s.archived_at),
    })
}

/// A credential as listed (never with its secret).
pub fn credential(c: &Credential) -> Value {
    json!({
        "id": c.id,
        "type": match c.kind { tether_core::resources::CredentialKind::Admin => "token", tether_core::resources::CredentialKind::Environment => "environment_key" },
        "name": c.name,
        "environment_id": c.environment_id,
        "hint": c.hint,
        "created_at": c.created_at.to_rfc3339(),
        "revoked_at": ts(c.revoked_at),
    })
}

/// A credential just minted, with its secret shown this once.
pub fn new_credential(c: &Credential, secret: &str) -> Value {
    let mut v = credential(c);
    v["token"] = json!(secret);
    v
}

/// The list envelope (§1.8). `next_page` is the last id when more follow (D-3).
pub fn list<T>(
    page: &Page<T>,
    id_of: impl Fn(&T) -> String,
    render: impl Fn(&T) -> Value,
) -> Value {
    let first = page.items.first().map(&id_of);
    let last = page.items.last().map(&id_of);
    json!({
        "data": page.items.iter().map(render).collect::<Vec<_>>(),
        "first_id": first,
        "last_id": last,
        "has_more": page.has_more,
        "next_page": if page.has_more { last.clone() } else { None },
    })
}

pub fn history(work_id: &str, item: &WorkItem, page: &Page<HistoryRow>) -> Value {
    let data: Vec<Value> = page
        .items
        .iter()
        .map(|row| {
            let t = &row.transition;
            json!({
                "type": "work_transition",
                "at": t.at.to_rfc3339(),
                "from": t.from.map(|s| s.as_str()),
                "to": t.to.as_str(),
                "cause": t.cause.as_str(),
                "worker_id": t.worker_id,
                "detail": t.detail,
            })
        })
        .collect();
    let first = page.items.first().map(|r| r.seq.to_string());
    let last = page.items.last().map(|r| r.seq.to_string());
    json!({
        "work_id": work_id,
        "data": data,
        "first_id": first,
        "last_id": last,
        "has_more": page.has_more,
        "next_page": if page.has_more { last.clone() } else { None },
        "heartbeat_count": item.heartbeat_count,
    })
}
