//! The eight work endpoints (§6) plus history and workers (§11).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, State};
use axum::http::{HeaderName, HeaderValue};
use axum::Json;
use tether_api as api;
use tether_core::ids::IdKind;
use tether_core::resources::Environment;
use tether_core::work::ExpectedHeartbeat;
use tether_core::{WorkItem, WorkState};
use tether_store::WorkFilter;

use super::extract::{Caller, IdempotencyKey, JsonBody, Params, Wire, WorkerId};
use super::{decode, wire, RoutineAccess};
use crate::credentials;
use crate::dialect::Dialect;
use crate::error::{ApiError, ApiResult};
use crate::listener::{YieldGuard, Yieldable};
use crate::service::tokens::Principal;
use crate::service::work::{ClaimAsk, Claimed, KeyedTry, StopAsk, TrySent};
use crate::service::App;

/// The work list clamps `limit` above 100 instead of refusing it (D-4).
const WORK_LIST_MAX: u32 = 100;

/// The D-32 prefix of every endpoint on one work item, after the caller's rights (403, checked by the
/// route's authorization): the environment (404, then 400 when it has no queue), the item (404, after
/// lazy expiry). Headers, parameters and bodies are judged only after it, so that a 400 never reveals
/// anything about an item the caller cannot see.
async fn item_in_queue(
    app: &App,
    env_id: &str,
    work_id: &str,
) -> ApiResult<(Arc<Environment>, WorkItem)> {
    let env = app.work_environment(env_id).await?;
    let item = app.get_work(&env, work_id).await?;
    Ok((env, item))
}

/// The same D-32 order for the endpoints of the worker cycle (ack, heartbeat, stop), without reading the
/// item twice: their operation reads it once itself and answers the same 404 for an unknown item, so
/// the item is read up front only when the request's own inputs are refused, to put its 404 first.
async fn judged<T>(
    app: &App,
    env_id: &str,
    work_id: &str,
    inputs: ApiResult<T>,
) -> ApiResult<(Arc<Environment>, T)> {
    let env = app.work_environment(env_id).await?;
    match inputs {
        Ok(inputs) => Ok((env, inputs)),
        Err(refused) => {
            app.get_work(&env, work_id).await?;
            Err(refused)
        }
    }
}

pub async fn list(
    State(app): State<App>,
    Path(env_id): Path<String>,
    params: Params,
) -> ApiResult<Json<api::Page<api::WorkItem>>> {
    let env = app.work_environment(&env_id).await?;
    let page = params.page(WORK_LIST_MAX, true, Some(IdKind::Work))?;
    let filter = work_filter(&params)?;
    let items = app.list_work(&env, &filter, &page).await?;
    Ok(Json(wire::list(
        &items,
        |i| i.id.clone(),
        |i| wire::work(i, None),
    )))
}

/// The list's filters (Tether extensions, combined): `state` keeps the items in one of the states
/// given (repeated or comma-separated); `cause=poison` keeps the items stopped as poison (D-5) that no
/// one has requeued yet.
fn work_filter(params: &Params) -> ApiResult<WorkFilter> {
    let mut filter = WorkFilter {
        states: work_states(params)?,
        ..WorkFilter::default()
    };
    match params.get("cause")? {
        None => {}
        Some("poison") => filter.poison = true,
        Some(_) => {
            return Err(ApiError::bad_param(
                "cause",
                "cause must be `poison` (items stopped after too many lease expiries)",
            ))
        }
    }
    Ok(filter)
}

/// The `state` filter of the work list (a Tether extension): repeated or comma-separated states.
fn work_states(params: &Params) -> ApiResult<Vec<WorkState>> {
    params
        .all("state")
        .iter()
        .map(|raw| {
            WorkState::parse(raw).ok_or_else(|| {
                ApiError::bad_param(
                    "state",
                    "state must be one of queued, starting, active, stopping, stopped",
                )
            })
        })
        .collect()
}

/// A poll's answer: the item delivered, if any.
type PollAnswer = ApiResult<(
    Option<Extension<RoutineAccess>>,
    Json<Option<api::WorkItem>>,
)>;
/// A claim's answer: the item delivered and its lease, if any, and the stop it made first
/// ([`api::STOPPED_HEADER`]).
type ClaimAnswer = ApiResult<(
    Option<Extension<RoutineAccess>>,
    Option<[(HeaderName, HeaderValue); 1]>,
    Json<Option<api::Claim>>,
)>;

/// [`api::STOPPED_HEADER`] for `stopped`, as the store holds it: its id is well-formed (D-1), so
/// always a header's value; a body's id that is not one names no item, and the stop answers 404
/// for it (D-2) before this is reached.
fn stopped_header(stopped: &WorkItem) -> ApiResult<[(HeaderName, HeaderValue); 1]> {
    let value = HeaderValue::from_str(&stopped.id)
        .map_err(|_| ApiError::internal(format!("a stored work id is {:?}", stopped.id)))?;
    Ok([(HeaderName::from_static(api::STOPPED_HEADER), value)])
}

/// An `async` block, not an `async fn`: an `async fn` keeps its arguments as they came beside the
/// copies its body moves on, all through the poll's wait.
#[allow(clippy::manual_async_fn)]
pub fn poll(
    State(app): State<App>,
    Caller(p): Caller,
    Wire(dialect): Wire,
    worker: Result<WorkerId, ApiError>,
    Path(env_id): Path<String>,
    params: Params,
    connection: Option<Extension<Yieldable>>,
) -> impl std::future::Future<Output = PollAnswer> + Send + 'static {
    async move {
        let take = TakeInputs::judge(&app, dialect, &env_id, worker, &params).await?;
        let _yielding = take.yields(connection);
        let (worker, issuer) = (take.worker.as_deref(), p.credential_id());
        let claimed = app
            .poll(&take.env, worker, issuer, take.block, take.reclaim_ms)
            .await?;
        let routine = RoutineAccess::unless_taken(&claimed);
        Ok((routine, Json(claimed.map(|c| delivered(&app, dialect, &c)))))
    }
}

/// Claim (a Tether extension): a poll that also acks the item and makes its first heartbeat, so that
/// a worker's cycle is this request and the stop (`tether_core::work::claim`). It takes the poll's
/// parameters, and the heartbeat's `desired_ttl_seconds`.
///
/// With a body's `stop`, it first stops the item the worker has finished (`work::stop_with_claim`),
/// so that a worker taking one item after another needs one request per item. The stop is a write
/// of its own, made once the parameters and the body are judged and before the claim takes or waits
/// for anything; if it is refused, the request answers its refusal and claims nothing. The answer
/// names the stopped item in [`api::STOPPED_HEADER`].
#[allow(clippy::manual_async_fn)] // an `async` block on purpose, as `poll`'s
pub fn claim(
    State(app): State<App>,
    Caller(p): Caller,
    Wire(dialect): Wire,
    // Who claims: the worker, and the key of its claim's tries, as one extractor.
    (worker, key): (Result<WorkerId, ApiError>, Result<IdempotencyKey, ApiError>),
    // The queue and the connection that waits on it, as one extractor.
    (Path(env_id), connection): (Path<String>, Option<Extension<Yieldable>>),
    params: Params,
    body: Result<JsonBody, ApiError>,
) -> impl std::future::Future<Output = ClaimAnswer> + Send + 'static {
    async move {
        let take = TakeInputs::judge(&app, dialect, &env_id, worker, &params).await?;
        let ttl = desired_ttl(&params)?;
        let IdempotencyKey(key) = key?;
        let sent = try_sent(&params)?;
        if sent != TrySent::First && key.is_none() {
            return Err(ApiError::bad_param(
                "retry",
                "retry says that this is a claim sent again: send it with the Idempotency-Key of its \
                 first try",
            ));
        }
        let (worker, issuer) = (take.worker.as_deref(), p.credential_id());
        // Every try of one claim names the same session token; only the claimant can derive it.
        let token = match (key, worker) {
            (Some(k), Some(worker)) => Some(credentials::claim_token(
                &k.claimant_secret,
                &take.env.id,
                worker,
                &k.key,
            )),
            // The token is the claimant's: without a worker's id, two claimants sharing a
            // credential and a key would be answered each other's item.
            (Some(_), None) => return Err(ApiError::bad_param(
                "Idempotency-Key",
                "a claim sent with an Idempotency-Key must name its worker (the Worker-ID header)",
            )),
            (None, _) => None,
        };
        let ask = ClaimAsk {
            desired_ttl_seconds: ttl,
            keyed: token.as_deref().map(|session_token| KeyedTry {
                session_token,
                sent,
            }),
        };
        let api::ClaimRequest { stop } = decode::optional(body)?;
        let mut stopped = None;
        if let Some(stop) = stop {
            let token_hash = credentials::hash(&stop.session_token);
            let unless_turn_open = stop.unless_turn_open.unwrap_or(false);
            let item = app
                .stop_with_claim(&take.env, &stop.work_id, &token_hash, unless_turn_open)
                .await?;
            stopped = Some(stopped_header(&item)?);
        }
        // Only now may the connection be given up to a new client (`TakeInputs::yields`): a cut
        // during the stop's write would leave its caller not knowing whether the item stopped.
        let _yielding = take.yields(connection);
        let claimed = app
            .claim(&take.env, worker, issuer, take.block, take.reclaim_ms, ask)
            .await?;
        // A claim that stopped an item did something, whatever it took.
        let routine = RoutineAccess::unless_taken(&claimed).filter(|_| stopped.is_none());
        Ok((
            routine,
            stopped,
            Json(claimed.map(|c| {
                let lease = c.lease.as_ref().expect("a claim starts a lease");
                api::Claim {
                    object: "work_claim".into(),
                    work: delivered(&app, dialect, &c),
                    lease: wire::heartbeat(lease),
                    earlier_try: c.earlier_try,
                    extra: Default::default(),
                }
            })),
        ))
    }
}

/// `retry`: `true` (or `1`) for a claim sent again, `only` for one sent again that must take no
/// new work, `false` (or `0`, or absent) for a first try.
fn try_sent(params: &Params) -> ApiResult<TrySent> {
    match params.get("retry")? {
        None | Some("false" | "0") => Ok(TrySent::First),
        Some("true" | "1") => Ok(TrySent::Again),
        Some("only") => Ok(TrySent::AgainTakingNothing),
        Some(_) => Err(ApiError::bad_param(
            "retry",
            "retry must be true, false or only",
        )),
    }
}

/// A poll's or a claim's item, with its `secret` (§11.1): the session token and the base URL of
/// the dialect it was taken through.
fn delivered(app: &App, dialect: Dialect, claimed: &Claimed) -> api::WorkItem {
    let base = format!(
        "{}{}",
        app.config.public_url.trim_end_matches('/'),
        dialect.prefix()
    );
    let secret = api::WorkSecret::new(claimed.session_token.clone(), base).encode();
    wire::work(&claimed.item, Some(secret))
}

/// What a poll or a claim asks for (§6.2), judged in this order: the environment (404, then 400
/// when it has no queue), the `Worker-ID`, `block_ms`, `reclaim_older_than_ms`.
struct TakeInputs {
    env: Arc<Environment>,
    worker: Option<String>,
    block: Option<Duration>,
    reclaim_ms: i64,
}

impl TakeInputs {
    async fn judge(
        app: &App,
        dialect: Dialect,
        env_id: &str,
        worker: Result<WorkerId, ApiError>,
        params: &Params,
    ) -> ApiResult<TakeInputs> {
        let env = app.work_environment(env_id).await?;
        let WorkerId(worker) = worker?;
        let block = match params.int("block_ms")? {
            None => None,
            Some(ms @ 1..=999) => Some(Duration::from_millis(ms as u64)),
            Some(_) => {
                return Err(ApiError::bad_param(
                    "block_ms",
                    "block_ms must be an integer from 1 to 999",
                ))
            }
        };
        let reclaim_ms = match params.int("reclaim_older_than_ms")? {
            None => app.config.default_reclaim_ms,
            Some(ms) if ms >= dialect.min_reclaim_ms() => ms,
            Some(_) => {
                return Err(ApiError::bad_param(
                    "reclaim_older_than_ms",
                    format!(
                        "reclaim_older_than_ms must be an integer of at least {}",
                        dialect.min_reclaim_ms()
                    ),
                ))
            }
        };
        Ok(TakeInputs {
            env,
            worker,
            block,
            reclaim_ms,
        })
    }

    /// A long poll (or claim) gives its place at the connection cap to a new client, as an event
    /// stream does, until it is answered: otherwise one environment's key holding every place with
    /// polls sent back to back keeps every other client out, admins and other environments' workers
    /// included. A worker whose poll is cut so polls again, as after any lost connection; an item
    /// taken in the moment it was cut is handed out again once its delivery may be reclaimed (a
    /// poll's) or its lease runs out (a claim's, unless a try sent again with its key gets it back
    /// first). One that answers at once has no place to give.
    fn yields(&self, connection: Option<Extension<Yieldable>>) -> Option<YieldGuard> {
        self.block?;
        connection.map(|Extension(c)| c.mark())
    }
}

pub async fn stats(
    State(app): State<App>,
    Path(env_id): Path<String>,
) -> ApiResult<Json<api::QueueStats>> {
    let env = app.work_environment(&env_id).await?;
    let stats = app.queue_stats(&env).await?;
    Ok(Json(api::QueueStats {
        object: "work_queue_stats".into(),
        depth: stats.counts.depth,
        pending: stats.counts.pending,
        oldest_queued_at: stats.counts.oldest_queued_at.map(|t| t.to_rfc3339()),
        workers_polling: Some(stats.workers_polling),
        states: stats
            .counts
            .states
            .iter()
            .map(|(s, n)| (s.as_str().to_owned(), *n))
            .collect(),
        extra: Default::default(),
    }))
}

/// The last hour of queue statistics, as sampled by this server (`crate::sampler`).
pub async fn stats_history(
    State(app): State<App>,
    Path(env_id): Path<String>,
) -> ApiResult<Json<api::QueueStatsHistory>> {
    let env = app.work_environment(&env_id).await?;
    let since = app
        .now()
        .minus_millis(crate::sampler::RETENTION.as_millis() as i64);
    let data = app
        .queue_history
        .since(&env.id, since)
        .iter()
        .map(|s| api::QueueSample {
            at: s.at.to_rfc3339(),
            depth: s.depth,
            pending: s.pending,
            starting: s.starting,
            active: s.active,
            stopping: s.stopping,
            workers_polling: s.workers_polling,
        })
        .collect();
    Ok(Json(api::QueueStatsHistory {
        object: "work_queue_stats_history".into(),
        environment_id: env.id.clone(),
        interval_seconds: app.config.sample_interval.as_secs_f64(),
        data,
    }))
}

pub async fn get(
    State(app): State<App>,
    Path((env_id, work_id)): Path<(String, String)>,
) -> ApiResult<Json<api::WorkItem>> {
    let (_, item) = item_in_queue(&app, &env_id, &work_id).await?;
    Ok(Json(wire::work(&item, None)))
}

pub async fn update(
    State(app): State<App>,
    Caller(p): Caller,
    Path((env_id, work_id)): Path<(String, String)>,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::WorkItem>> {
    let (env, _) = item_in_queue(&app, &env_id, &work_id).await?;
    let api::WorkMetadataPatch { metadata } = decode::optional(body)?;
    let item = match metadata {
        None => app.get_work(&env, &work_id).await?,
        Some(patch) => app.patch_work_metadata(&env, &work_id, &patch, &p).await?,
    };
    Ok(Json(wire::work(&item, None)))
}

pub async fn ack(
    State(app): State<App>,
    Caller(p): Caller,
    worker: Result<WorkerId, ApiError>,
    Path((env_id, work_id)): Path<(String, String)>,
) -> ApiResult<Json<api::WorkItem>> {
    let (env, WorkerId(worker)) = judged(&app, &env_id, &work_id, worker).await?;
    let item = app.ack(&env, &work_id, worker.as_deref(), &p).await?;
    Ok(Json(wire::work(&item, None)))
}

pub async fn heartbeat(
    State(app): State<App>,
    Caller(p): Caller,
    worker: Result<WorkerId, ApiError>,
    Path((env_id, work_id)): Path<(String, String)>,
    params: Params,
) -> ApiResult<Json<api::Heartbeat>> {
    let answer = renew(&app, &p, worker, &env_id, &work_id, params).await;
    answer.map_err(|e| with_amnesty_promise(&app, e))
}

/// A heartbeat refused because the database is away carries the service's promise of lease amnesty
/// (`App::lease_amnesty_promise`) in `error.details.lease_amnesty_ms`.
fn with_amnesty_promise(app: &App, error: ApiError) -> ApiError {
    // Asked only for an outage's 503: asking notes a promise, which the amnesty after the outage
    // then owes.
    if !matches!(
        error.code,
        Some(crate::error::STORE_UNAVAILABLE | crate::error::STORE_OUTCOME_UNKNOWN)
    ) {
        return error;
    }
    match app.lease_amnesty_promise() {
        Some(ms) => error.with_details(serde_json::json!({ "lease_amnesty_ms": ms })),
        None => error,
    }
}

async fn renew(
    app: &App,
    caller: &Principal,
    worker: Result<WorkerId, ApiError>,
    env_id: &str,
    work_id: &str,
    params: Params,
) -> ApiResult<Json<api::Heartbeat>> {
    let inputs = heartbeat_inputs(worker, &params);
    let (env, (worker, expected, ttl)) = judged(app, env_id, work_id, inputs).await?;
    let reply = app
        .heartbeat(&env, work_id, expected, ttl, worker.as_deref(), caller)
        .await?;
    Ok(Json(wire::heartbeat(&reply)))
}

/// A heartbeat's worker, expected last heartbeat and desired TTL, judged in that order.
fn heartbeat_inputs(
    worker: Result<WorkerId, ApiError>,
    params: &Params,
) -> ApiResult<(Option<String>, ExpectedHeartbeat, Option<u32>)> {
    let WorkerId(worker) = worker?;
    let expected =
        ExpectedHeartbeat::parse(params.get("expected_last_heartbeat")?).ok_or_else(|| {
            ApiError::bad_param(
                "expected_last_heartbeat",
                "expected_last_heartbeat must be NO_HEARTBEAT or an RFC 3339 timestamp",
            )
        })?;
    let ttl = desired_ttl(params)?;
    Ok((worker, expected, ttl))
}

/// The lease length a heartbeat or a claim asks for (`desired_ttl_seconds`), clamped by the lease
/// policy afterwards.
fn desired_ttl(params: &Params) -> ApiResult<Option<u32>> {
    match params.get("desired_ttl_seconds")? {
        None => Ok(None),
        Some(raw) => match super::extract::integer(raw) {
            Some(n) if n > 0 => Ok(Some(n.min(i64::from(u32::MAX)) as u32)),
            _ => Err(ApiError::bad_param(
                "desired_ttl_seconds",
                "desired_ttl_seconds must be a positive integer",
            )),
        },
    }
}

pub async fn stop(
    State(app): State<App>,
    Caller(p): Caller,
    Wire(dialect): Wire,
    Path((env_id, work_id)): Path<(String, String)>,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::WorkItem>> {
    let stop = decode::optional::<api::StopRequest>(body);
    let (
        env,
        api::StopRequest {
            force,
            hold_next_item,
            unless_turn_open,
        },
    ) = judged(&app, &env_id, &work_id, stop).await?;
    let ask = StopAsk {
        force: force.unwrap_or(false),
        hold_next_item: hold_next_item.unwrap_or_else(|| p.holds_by_default(dialect)),
        unless_turn_open: unless_turn_open.unwrap_or(false),
    };
    let item = app.stop(&env, &work_id, ask, &p).await?;
    Ok(Json(wire::work(&item, None)))
}

/// Requeue (Tether extension): the session of a stopped item gets a fresh queued item.
pub async fn requeue(
    State(app): State<App>,
    Caller(p): Caller,
    Path((env_id, work_id)): Path<(String, String)>,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::WorkItem>> {
    let (env, _) = item_in_queue(&app, &env_id, &work_id).await?;
    let api::RequeueRequest { reason } = decode::optional(body)?;
    if reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > crate::service::requeue::MAX_REASON_CHARS)
    {
        return Err(ApiError::bad_param(
            "reason",
            format!(
                "reason must be at most {} characters",
                crate::service::requeue::MAX_REASON_CHARS
            ),
        ));
    }
    // Named as a stop names who asked for it: "admin token tok_…".
    let by = p.asker();
    let item = app
        .requeue_work(&env, &work_id, &by, reason.as_deref())
        .await?;
    Ok(Json(wire::work(&item, None)))
}

pub async fn history(
    State(app): State<App>,
    Path((env_id, work_id)): Path<(String, String)>,
    params: Params,
) -> ApiResult<Json<api::WorkHistory>> {
    let (env, _) = item_in_queue(&app, &env_id, &work_id).await?;
    let page = params.page(100, false, None)?;
    let after = match &page.cursor {
        tether_store::Cursor::Start => None,
        tether_store::Cursor::After(seq) => Some(
            seq.parse::<i64>()
                .map_err(|_| ApiError::bad_param("page", "page is not a valid cursor"))?,
        ),
        tether_store::Cursor::Before(_) => {
            return Err(ApiError::bad_param(
                "before_id",
                "history pages forward only",
            ))
        }
    };
    let (item, rows) = app.work_history(&env, &work_id, after, page.limit).await?;
    Ok(Json(wire::history(&work_id, &item, &rows)))
}

pub async fn workers(
    State(app): State<App>,
    Path(env_id): Path<String>,
) -> ApiResult<Json<api::Workers>> {
    let env = app.work_environment(&env_id).await?;
    let workers = app.workers(&env).await?;
    Ok(Json(wire::workers(&workers)))
}
