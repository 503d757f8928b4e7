//! The route table: every endpoint once, with its handler, who may call it, and what the OpenAPI
//! document says about it. The router ([`super::router`]) and the document ([`super::openapi`]) are both
//! built from this table, so an endpoint cannot be served without being documented, or documented
//! without being served; and the router puts each route behind the authorization its [`Access`]
//! declares ([`super::access::authorize`]), so what the document says of credentials is what is enforced.

use axum::handler::Handler;
use axum::routing::{on, MethodFilter, MethodRouter};

use tether_api as api;
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use super::{dashboard, events, ops, resources as r, work};
use crate::service::App;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Delete => MethodFilter::DELETE,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Delete => "DELETE",
        }
    }
}

/// Which credentials an endpoint takes (§11.1); enforced by [`super::access::authorize`]. The kinds
/// that name a target read it from the path: `{environment_id}`, `{environment_id}` and `{work_id}`,
/// `{session_id}`, `{agent_id}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No credential at all (operations surface).
    Public,
    /// No credential, unless the server was given a metrics token (`--metrics-token`): then that
    /// token, and nothing else.
    Metrics,
    /// An admin token.
    Admin,
    /// An admin token or the key of the environment in the path.
    Environment,
    /// An admin token, the key of the environment in the path, or the item's session token.
    WorkItem,
    /// An admin token, the key of the session's environment, or the session token of its live item.
    Session,
    /// An admin token, or a worker credential of an environment where a session uses the agent.
    Agent,
    /// An admin token, or an environment key (which sees its own environment's sessions only).
    SessionList,
}

impl Access {
    pub fn describe(self) -> &'static str {
        match self {
            Access::Public => "No credential.",
            Access::Metrics => {
                "No credential, unless the server was started with `--metrics-token`: then that \
                 token, as `Authorization: Bearer`."
            }
            Access::Admin => "Credential: an admin token.",
            Access::Environment => "Credential: an admin token or this environment's key.",
            Access::WorkItem => {
                "Credential: an admin token, this environment's key, or the item's session token \
                 (from the `secret` of the poll that delivered it)."
            }
            Access::Session => {
                "Credential: an admin token, the key of the session's environment, or the session \
                 token of the session's live work item."
            }
            Access::Agent => {
                "Credential: an admin token, or a worker credential of an environment with a session \
                 on this agent."
            }
            Access::SessionList => {
                "Credential: an admin token, or an environment key (it lists its own environment's \
                 sessions only)."
            }
        }
    }
}

/// Where a documented parameter travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    Query,
    Header,
    /// The worker identity header, whose name is the dialect's (`Dialect::worker_headers`).
    WorkerHeader,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Integer,
    String,
    Boolean,
    Timestamp,
    /// Repeatable (`name=a&name=b`, `name[]=a`, or comma-separated).
    Strings,
    /// One of these words.
    OneOf(&'static [&'static str]),
}

#[derive(Clone, Copy, Debug)]
pub struct Param {
    pub name: &'static str,
    pub at: At,
    pub ty: Ty,
    pub doc: &'static str,
}

const fn q(name: &'static str, ty: Ty, doc: &'static str) -> Param {
    Param {
        name,
        at: At::Query,
        ty,
        doc,
    }
}

/// A body's type in the wire model (`tether-api`): its OpenAPI component name and schemas come from the
/// type itself, so the document cannot describe a shape other than the one the handler produces.
#[derive(Clone, Copy)]
pub struct Shape {
    /// The component's name.
    pub name: fn() -> String,
    /// The component's schema.
    pub schema: fn() -> RefOr<Schema>,
    /// The components it refers to, recursively.
    pub dependencies: fn(&mut Vec<(String, RefOr<Schema>)>),
    /// The schema of a list page (§1.8) of it.
    pub page: fn() -> RefOr<Schema>,
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&(self.name)())
    }
}

/// The [`Shape`] of `T`.
pub fn shape<T: ToSchema + 'static>() -> Shape {
    Shape {
        name: || T::name().into_owned(),
        schema: T::schema,
        dependencies: T::schemas,
        page: <api::Page<T> as PartialSchema>::schema,
    }
}

/// The request body.
#[derive(Clone, Copy, Debug)]
pub enum Body {
    /// None is read; any body is ignored.
    None,
    /// Optional (absent, empty and `{}` are the same).
    Optional(Shape),
    /// Required.
    Required(Shape),
}

/// The successful answer.
#[derive(Clone, Copy, Debug)]
pub enum Returns {
    /// 200 with the type.
    Json(Shape),
    /// 200 with a list envelope of the type.
    List(Shape),
    /// 200 with the type, or the JSON literal `null`.
    JsonOrNull(Shape),
    /// 200 with the first type, or 202 with the second.
    JsonOr202(Shape, Shape),
    /// 200 `text/event-stream`.
    EventStream,
    /// 200 `text/plain`.
    Text,
    /// 200 with any JSON document (the OpenAPI document itself).
    AnyJson,
    /// 200 with a file of the dashboard (HTML, JavaScript, CSS or SVG).
    File,
}

pub struct Endpoint {
    pub verb: Verb,
    /// Relative to the dialect prefix for API endpoints; absolute for the operations surface.
    pub path: &'static str,
    pub route: MethodRouter<App>,
    pub operation: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub access: Access,
    pub params: Vec<Param>,
    pub body: Body,
    pub returns: Returns,
    /// A GET that changes state (the poll claims an item; [`Endpoint::no_head`]).
    pub changes_state: bool,
}

fn ep<H, T>(verb: Verb, path: &'static str, operation: &'static str, handler: H) -> Endpoint
where
    H: Handler<T, App>,
    T: 'static,
{
    Endpoint {
        verb,
        path,
        route: on(verb.filter(), handler),
        operation,
        tag: "",
        summary: "",
        access: Access::Admin,
        params: Vec::new(),
        body: Body::None,
        returns: Returns::AnyJson,
        changes_state: false,
    }
}

impl Endpoint {
    fn doc(mut self, tag: &'static str, summary: &'static str) -> Self {
        self.tag = tag;
        self.summary = summary;
        self
    }

    fn access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    fn params(mut self, params: &[Param]) -> Self {
        self.params.extend_from_slice(params);
        self
    }

    fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    fn returns(mut self, returns: Returns) -> Self {
        self.returns = returns;
        self
    }

    /// For a GET that changes state (the poll claims an item): HEAD is refused instead of being
    /// served by the GET handler, as the router would otherwise do. A HEAD request is safe by
    /// definition (RFC 9110 §9.2.1), and its answer has no body: a HEAD poll would claim an item, mint
    /// its session token and show a worker that nobody can see.
    /// Every other method gets the same 405: the router's own would offer HEAD in `Allow`.
    fn no_head(mut self) -> Self {
        assert_eq!(self.verb, Verb::Get, "HEAD is served only by GET routes");
        self.route = self.route.head(only_get).fallback(only_get);
        self.changes_state = true;
        self
    }
}

/// 405 with `Allow: GET`, after draining what it can of the body, as the router's own 405 does.
async fn only_get(request: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    super::budget::drain_refused(request).await;
    let mut response =
        crate::error::ApiError::for_status(axum::http::StatusCode::METHOD_NOT_ALLOWED)
            .into_response();
    response.headers_mut().insert(
        axum::http::header::ALLOW,
        axum::http::HeaderValue::from_static("GET"),
    );
    response
}

const PAGE: &[Param] = &[
    q("limit", Ty::Integer, "Page size, from 1 (default 20) to the dialect's largest (100 on /api/v1/cloud, 1000 on /v1)."),
    q("page", Ty::String, "Cursor: the `next_page` of the previous page."),
    q("after_id", Ty::String, "Cursor: items strictly after this id."),
    q("before_id", Ty::String, "Cursor: items strictly before this id."),
];
const ARCHIVED: &[Param] = &[
    q(
        "include_archived",
        Ty::Boolean,
        "Also list archived resources (default false).",
    ),
    q(
        "created_at[gte]",
        Ty::Timestamp,
        "Created at or after this instant.",
    ),
    q(
        "created_at[lte]",
        Ty::Timestamp,
        "Created at or before this instant.",
    ),
];
const BLOCK_MS: Param = q(
    "block_ms",
    Ty::Integer,
    "Wait up to this long (1 to 999 ms) for an item; absent: answer at once.",
);
const RECLAIM_OLDER_THAN_MS: Param = q(
    "reclaim_older_than_ms",
    Ty::Integer,
    "Re-deliver un-acked deliveries older than this (default 5000; at least 0 on /api/v1/cloud, 1 on /v1).",
);
const DESIRED_TTL_SECONDS: Param = q(
    "desired_ttl_seconds",
    Ty::Integer,
    "Lease length wanted; clamped into the server's bounds (10 to 600 by default).",
);
const WORKER_ID: Param = Param {
    name: "worker-id",
    at: At::WorkerHeader,
    ty: Ty::String,
    doc: "Stable worker identity: 1 to 256 printable ASCII characters.",
};

const RETRY: Param = q(
    "retry",
    Ty::OneOf(&["true", "false", "only", "1", "0"]),
    "This claim is one sent again with its first try's Idempotency-Key, that try's answer unheard. \
     `true`: it answers the item an earlier try took, also one taken while it waited, and \
     otherwise claims as a first try. `only`, for a worker that takes no new work (one that is \
     draining): it answers the item an earlier try took, or at once nothing, taking no other \
     item and not waiting (`block_ms` does not apply). `false` or absent: a first try.",
);
const IDEMPOTENCY_KEY: Param = Param {
    name: "Idempotency-Key",
    at: At::Header,
    ty: Ty::String,
    doc:
        "Makes the claim safe to send again: every try of one claim sends the same key (16 to 255 \
          printable ASCII characters without spaces, random; it may be sent in double quotes) and \
          hands out the same session token. A try sent \
          again with `retry=true` or `retry=only` answers the item an earlier try took, and its \
          lease, with `earlier_try`; a try without it does so only when it loses a race for a \
          queued item to that earlier try. Needs a Worker-ID.",
};

/// Every endpoint of one dialect, relative to its prefix (both dialects serve the same table).
pub fn api() -> Vec<Endpoint> {
    use Access::*;
    use Body::{Optional, Required};
    use Returns::*;
    use Verb::*;
    vec![
        // Environments (§7.1) and their keys (§11.1).
        ep(Get, "/environments", "listEnvironments", r::list_environments)
            .doc("environments", "List environments")
            .params(PAGE)
            .params(ARCHIVED)
            .returns(List(shape::<api::Environment>())),
        ep(Post, "/environments", "createEnvironment", r::create_environment)
            .doc("environments", "Create an environment")
            .body(Required(shape::<api::CreateEnvironment>()))
            .returns(Json(shape::<api::Environment>())),
        ep(Get, "/environments/{environment_id}", "getEnvironment", r::get_environment)
            .doc("environments", "Get an environment")
            .access(Environment)
            .returns(Json(shape::<api::Environment>())),
        ep(Post, "/environments/{environment_id}", "updateEnvironment", r::update_environment)
            .doc("environments", "Update an environment (partial; metadata is a merge patch)")
            .body(Required(shape::<api::UpdateEnvironment>()))
            .returns(Json(shape::<api::Environment>())),
        ep(Delete, "/environments/{environment_id}", "deleteEnvironment", r::delete_environment)
            .doc("environments", "Delete an environment and its queue")
            .returns(Json(shape::<api::Deleted>())),
        ep(Post, "/environments/{environment_id}/archive", "archiveEnvironment", r::archive_environment)
            .doc("environments", "Archive an environment")
            .returns(Json(shape::<api::Environment>())),
        ep(Get, "/environments/{environment_id}/keys", "listEnvironmentKeys", r::list_keys)
            .doc("credentials", "List the environment's keys (never their secrets)")
            .params(PAGE)
            .returns(List(shape::<api::Credential>())),
        ep(Post, "/environments/{environment_id}/keys", "createEnvironmentKey", r::create_key)
            .doc("credentials", "Mint an environment key (its secret is shown once)")
            .body(Optional(shape::<api::CreateCredential>()))
            .returns(Json(shape::<api::Credential>())),
        ep(Delete, "/environments/{environment_id}/keys/{key_id}", "revokeEnvironmentKey", r::revoke_key)
            .doc("credentials", "Revoke an environment key")
            .returns(Json(shape::<api::Credential>())),
        ep(Get, "/environments/{environment_id}/workers", "listWorkers", work::workers)
            .doc("work", "Workers seen polling in the last 5 minutes, with the live items they hold")
            .access(Environment)
            .returns(Json(shape::<api::Workers>())),
        // The work queue (§6).
        ep(Get, "/environments/{environment_id}/work", "listWork", work::list)
            .doc("work", "List work items in queue order")
            .access(Environment)
            .params(PAGE)
            .params(&[q("state", Ty::Strings, "Tether extension: only items in one of these states (`state=queued&state=active` or `state=queued,active`); absent: every state.")])
            .params(&[q("cause", Ty::String, "Tether extension: `poison` lists only the items stopped after too many lease expiries (D-5) that no one has requeued yet.")])
            .returns(List(shape::<api::WorkItem>())),
        ep(Get, "/environments/{environment_id}/work/poll", "pollWork", work::poll)
            .doc("work", "Claim one queued item (`null` when there is none)")
            .access(Environment)
            .params(&[
                BLOCK_MS,
                RECLAIM_OLDER_THAN_MS,
                WORKER_ID,
            ])
            .returns(JsonOrNull(shape::<api::WorkItem>()))
            .no_head(),
        ep(Post, "/environments/{environment_id}/work/claim", "claimWork", work::claim)
            .doc("work", "Tether extension: claim one queued item and start its lease, as a poll, its ack and a first heartbeat at once (`null` when there is none); then heartbeat with the answer's `lease.last_heartbeat`, and stop, or send the stop with the next claim (the body's `stop`; the answer's `Tether-Stopped` header then names the item stopped)")
            .access(Environment)
            .params(&[
                BLOCK_MS,
                RECLAIM_OLDER_THAN_MS,
                DESIRED_TTL_SECONDS,
                WORKER_ID,
                IDEMPOTENCY_KEY,
                RETRY,
            ])
            .body(Optional(shape::<api::ClaimRequest>()))
            .returns(JsonOrNull(shape::<api::Claim>())),
        ep(Get, "/environments/{environment_id}/work/stats", "workStats", work::stats)
            .doc("work", "Queue statistics")
            .access(Environment)
            .returns(Json(shape::<api::QueueStats>())),
        ep(Get, "/environments/{environment_id}/work/stats/history", "workStatsHistory", work::stats_history)
            .doc("work", "Tether extension: the queue statistics of the last hour, sampled every `interval_seconds` by the server that answers")
            .access(Environment)
            .returns(Json(shape::<api::QueueStatsHistory>())),
        ep(Get, "/environments/{environment_id}/work/{work_id}", "getWork", work::get)
            .doc("work", "Get a work item")
            .access(WorkItem)
            .returns(Json(shape::<api::WorkItem>())),
        ep(Post, "/environments/{environment_id}/work/{work_id}", "updateWork", work::update)
            .doc("work", "Merge-patch a work item's metadata")
            .access(WorkItem)
            .body(Optional(shape::<api::WorkMetadataPatch>()))
            .returns(Json(shape::<api::WorkItem>())),
        ep(Post, "/environments/{environment_id}/work/{work_id}/ack", "ackWork", work::ack)
            .doc("work", "Acknowledge a delivered item (queued → starting)")
            .access(WorkItem)
            .params(&[WORKER_ID])
            .returns(Json(shape::<api::WorkItem>())),
        ep(Post, "/environments/{environment_id}/work/{work_id}/heartbeat", "heartbeatWork", work::heartbeat)
            .doc("work", "Renew the lease (the first heartbeat makes the item active)")
            .access(WorkItem)
            .params(&[
                q("expected_last_heartbeat", Ty::String, "`NO_HEARTBEAT`, or the `last_heartbeat` of the previous answer; absent: unconditional."),
                DESIRED_TTL_SECONDS,
                WORKER_ID,
            ])
            .returns(Json(shape::<api::Heartbeat>())),
        ep(Post, "/environments/{environment_id}/work/{work_id}/stop", "stopWork", work::stop)
            .doc("work", "Request, confirm or force a stop")
            .access(WorkItem)
            .body(Optional(shape::<api::StopRequest>()))
            .returns(Json(shape::<api::WorkItem>())),
        ep(Post, "/environments/{environment_id}/work/{work_id}/requeue", "requeueWork", work::requeue)
            .doc("work", "Tether extension: give the session of a stopped item (e.g. poison) a fresh queued item; the history of both says who requeued it and why")
            .body(Optional(shape::<api::RequeueRequest>()))
            .returns(Json(shape::<api::WorkItem>())),
        ep(Get, "/environments/{environment_id}/work/{work_id}/history", "workHistory", work::history)
            .doc("work", "Every state change of a work item, oldest first")
            .access(WorkItem)
            .params(&[
                q("limit", Ty::Integer, "Page size, 1 to 100 (default 20)."),
                q("page", Ty::String, "Cursor: the `next_page` of the previous page."),
            ])
            .returns(Json(shape::<api::WorkHistory>())),
        // Agents (§12.1).
        ep(Get, "/agents", "listAgents", r::list_agents)
            .doc("agents", "List agents")
            .params(PAGE)
            .params(ARCHIVED)
            .returns(List(shape::<api::Agent>())),
        ep(Post, "/agents", "createAgent", r::create_agent)
            .doc("agents", "Create an agent (version 1)")
            .body(Required(shape::<api::CreateAgent>()))
            .returns(Json(shape::<api::Agent>())),
        ep(Get, "/agents/{agent_id}", "getAgent", r::get_agent)
            .doc("agents", "Get an agent, at its current or an earlier version")
            .access(Agent)
            .params(&[q("version", Ty::Integer, "Read this version instead of the current one.")])
            .returns(Json(shape::<api::Agent>())),
        ep(Post, "/agents/{agent_id}", "updateAgent", r::update_agent)
            .doc("agents", "Update an agent: a new version; `version` in the body must match the current one")
            .body(Required(shape::<api::UpdateAgent>()))
            .returns(Json(shape::<api::Agent>())),
        ep(Post, "/agents/{agent_id}/archive", "archiveAgent", r::archive_agent)
            .doc("agents", "Archive an agent")
            .returns(Json(shape::<api::Agent>())),
        // Sessions (§12.2) and their events (§12.3).
        ep(Get, "/sessions", "listSessions", r::list_sessions)
            .doc("sessions", "List sessions")
            .access(SessionList)
            .params(PAGE)
            .params(ARCHIVED)
            .params(&[
                q("agent_id", Ty::String, "Only sessions of this agent."),
                q("environment_id", Ty::String, "Only sessions in this environment."),
                q("statuses", Ty::Strings, "Only sessions in one of these statuses (`statuses[]=idle&statuses[]=running` or `statuses=idle,running`)."),
            ])
            .returns(List(shape::<api::Session>())),
        ep(Post, "/sessions", "createSession", r::create_session)
            .doc("sessions", "Create a session (on a self-hosted environment, enqueues its first work item)")
            .body(Required(shape::<api::CreateSession>()))
            .returns(Json(shape::<api::Session>())),
        ep(Get, "/sessions/{session_id}", "getSession", r::get_session)
            .doc("sessions", "Get a session")
            .access(Session)
            .returns(Json(shape::<api::Session>())),
        ep(Post, "/sessions/{session_id}", "updateSession", r::update_session)
            .doc("sessions", "Update a session's title and metadata")
            .body(Required(shape::<api::UpdateSession>()))
            .returns(Json(shape::<api::Session>())),
        ep(Delete, "/sessions/{session_id}", "deleteSession", r::delete_session)
            .doc("sessions", "Delete a session (force-stops its live work item)")
            .returns(Json(shape::<api::Deleted>())),
        ep(Post, "/sessions/{session_id}/archive", "archiveSession", r::archive_session)
            .doc("sessions", "Archive a session (force-stops its live work item)")
            .returns(Json(shape::<api::Session>())),
        ep(Post, "/sessions/{session_id}/cancel", "cancelSession", events::cancel)
            .doc("sessions", "Interrupt the running turn (202), or do nothing while idle (200)")
            .returns(JsonOr202(shape::<api::Session>(), shape::<api::Canceling>())),
        ep(Get, "/sessions/{session_id}/events", "listEvents", events::list_events)
            .doc("events", "List a session's events")
            .access(Session)
            .params(PAGE)
            .params(&[
                q("order", Ty::String, "`asc` (default) or `desc`."),
                q("types", Ty::Strings, "Only events of these types (`types[]=agent.message&types[]=…`)."),
                q("created_at[gt]", Ty::Timestamp, "Processed after this instant."),
                q("created_at[gte]", Ty::Timestamp, "Processed at or after this instant."),
                q("created_at[lt]", Ty::Timestamp, "Processed before this instant."),
                q("created_at[lte]", Ty::Timestamp, "Processed at or before this instant."),
            ])
            .returns(List(shape::<api::Event>())),
        ep(Post, "/sessions/{session_id}/events", "postEvents", events::post_events)
            .doc("events", "Append 1 to 100 events (workers: agent-side events and tool results only)")
            .access(Session)
            .body(Required(shape::<api::PostEvents>()))
            .returns(Json(shape::<api::PostedEvents>())),
        ep(Get, "/sessions/{session_id}/events/stream", "streamEvents", events::stream)
            .doc("events", "Follow a session's events as Server-Sent Events")
            .access(Session)
            .params(&[
                Param {
                    name: "Last-Event-ID",
                    at: At::Header,
                    ty: Ty::String,
                    doc: "Replay every event after this one first.",
                },
                q("last_event_id", Ty::String, "The same as the Last-Event-ID header, for clients that cannot set headers."),
            ])
            .returns(EventStream),
        // Admin tokens (§11.1).
        ep(Get, "/tokens", "listTokens", r::list_tokens)
            .doc("credentials", "List admin tokens (never their secrets)")
            .params(PAGE)
            .returns(List(shape::<api::Credential>())),
        ep(Post, "/tokens", "createToken", r::create_token)
            .doc("credentials", "Mint an admin token (its secret is shown once)")
            .body(Optional(shape::<api::CreateCredential>()))
            .returns(Json(shape::<api::Credential>())),
        ep(Delete, "/tokens/{token_id}", "revokeToken", r::revoke_token)
            .doc("credentials", "Revoke an admin token")
            .returns(Json(shape::<api::Credential>())),
    ]
}

/// The operations surface (§11.4), outside the dialect prefixes.
pub fn ops() -> Vec<Endpoint> {
    use Access::Public;
    use Returns::*;
    use Verb::Get;
    vec![
        ep(Get, "/healthz", "healthz", ops::healthz)
            .doc("operations", "The process is up")
            .access(Public)
            .returns(Json(shape::<api::Health>())),
        ep(Get, "/readyz", "readyz", ops::readyz)
            .doc("operations", "The store answers (503 otherwise)")
            .access(Public)
            .returns(Json(shape::<api::Health>())),
        ep(Get, "/metrics", "metrics", ops::metrics)
            .doc("operations", "Prometheus metrics")
            .access(Access::Metrics)
            .returns(Text),
        ep(Get, "/", "dashboard", dashboard::index)
            .doc(
                "operations",
                "The dashboard, for a browser (sign in with an admin token)",
            )
            .access(Public)
            .returns(File),
        ep(Get, "/dashboard/{file}", "dashboardFile", dashboard::file)
            .doc(
                "operations",
                "A file of the dashboard (`ETag`, `Cache-Control: no-cache`)",
            )
            .access(Public)
            .returns(File),
        ep(Get, "/openapi.json", "openapi", super::openapi::serve)
            .doc("operations", "This document")
            .access(Public)
            .returns(AnyJson),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The authorization reads its targets from the path: a route declaring an access that names a
    /// target must have it in its path.
    #[test]
    fn every_route_names_the_targets_of_its_access() {
        for e in api().into_iter().chain(ops()) {
            let targets: &[&str] = match e.access {
                Access::Environment => &["environment_id"],
                Access::WorkItem => &["environment_id", "work_id"],
                Access::Session => &["session_id"],
                Access::Agent => &["agent_id"],
                Access::Public | Access::Metrics | Access::Admin | Access::SessionList => &[],
            };
            for target in targets {
                assert!(
                    e.path.contains(&format!("{{{target}}}")),
                    "{} {} is declared {:?} but has no {{{target}}}",
                    e.verb.as_str(),
                    e.path,
                    e.access
                );
            }
        }
    }
}
