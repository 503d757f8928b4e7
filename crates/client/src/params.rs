//! Query parameters: pagination (§1.8), list filters, and the options of poll and heartbeat (§6).

use std::time::Duration;

use crate::types::SessionStatus;

/// The value of `expected_last_heartbeat` that claims the first heartbeat of a lease (§5.2).
pub const NO_HEARTBEAT: &str = "NO_HEARTBEAT";

/// Query pairs in the order they are sent.
pub(crate) type Query = Vec<(&'static str, String)>;

/// Pagination (§1.8). At most one of `page`, `after_id` and `before_id` may be set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListParams {
    /// Page size, 1‥100 (server default 20).
    pub limit: Option<u32>,
    /// The `next_page` cursor of the previous page.
    pub page: Option<String>,
    /// Items strictly after this id.
    pub after_id: Option<String>,
    /// Items strictly before this id.
    pub before_id: Option<String>,
}

impl ListParams {
    /// A first page of `limit` items.
    pub fn limit(limit: u32) -> Self {
        ListParams {
            limit: Some(limit),
            ..Default::default()
        }
    }

    /// The same parameters continuing at `cursor` (a `next_page` value); `None` restarts from the
    /// beginning.
    pub fn at(&self, cursor: Option<String>) -> Self {
        ListParams {
            limit: self.limit,
            page: cursor,
            after_id: None,
            before_id: None,
        }
    }

    /// The pagination parameters; a listing with filters adds its own to these.
    pub(crate) fn query(&self) -> Query {
        let mut query = Query::new();
        if let Some(limit) = self.limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(page) = &self.page {
            query.push(("page", page.clone()));
        }
        if let Some(after) = &self.after_id {
            query.push(("after_id", after.clone()));
        }
        if let Some(before) = &self.before_id {
            query.push(("before_id", before.clone()));
        }
        query
    }
}

/// Listing environments or agents: pagination plus the archive and creation-time filters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListResources {
    /// Pagination.
    pub list: ListParams,
    /// Include archived resources (excluded by default).
    pub include_archived: bool,
    /// Only resources created at or after this RFC 3339 instant.
    pub created_gte: Option<String>,
    /// Only resources created at or before this RFC 3339 instant.
    pub created_lte: Option<String>,
}

impl ListResources {
    pub(crate) fn query(&self) -> Query {
        let mut q = self.list.query();
        push_archive_and_created(
            &mut q,
            self.include_archived,
            self.created_gte.as_deref(),
            self.created_lte.as_deref(),
        );
        q
    }
}

/// The archive and creation-time filters that resource and session listings share.
fn push_archive_and_created(
    q: &mut Query,
    include_archived: bool,
    created_gte: Option<&str>,
    created_lte: Option<&str>,
) {
    if include_archived {
        q.push(("include_archived", "true".into()));
    }
    if let Some(t) = created_gte {
        q.push(("created_at[gte]", t.to_owned()));
    }
    if let Some(t) = created_lte {
        q.push(("created_at[lte]", t.to_owned()));
    }
}

/// Listing sessions (§12.2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListSessions {
    /// Pagination.
    pub list: ListParams,
    /// Only sessions of this agent.
    pub agent_id: Option<String>,
    /// Only sessions on this environment.
    pub environment_id: Option<String>,
    /// Only sessions in one of these statuses (empty: all).
    pub statuses: Vec<SessionStatus>,
    /// Include archived sessions (excluded by default).
    pub include_archived: bool,
    /// Only sessions created at or after this RFC 3339 instant.
    pub created_gte: Option<String>,
    /// Only sessions created at or before this RFC 3339 instant.
    pub created_lte: Option<String>,
}

impl ListSessions {
    pub(crate) fn query(&self) -> Query {
        let mut q = self.list.query();
        if let Some(a) = &self.agent_id {
            q.push(("agent_id", a.clone()));
        }
        if let Some(e) = &self.environment_id {
            q.push(("environment_id", e.clone()));
        }
        if !self.statuses.is_empty() {
            let joined: Vec<&str> = self.statuses.iter().map(SessionStatus::as_str).collect();
            q.push(("statuses", joined.join(",")));
        }
        push_archive_and_created(
            &mut q,
            self.include_archived,
            self.created_gte.as_deref(),
            self.created_lte.as_deref(),
        );
        q
    }
}

/// Order of an event listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// Oldest first (the server's default).
    #[default]
    Asc,
    /// Newest first.
    Desc,
}

/// Listing a session's events (§12.3).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListEvents {
    /// Pagination.
    pub list: ListParams,
    /// Order; ascending when `None`.
    pub order: Option<Order>,
}

impl ListEvents {
    pub(crate) fn query(&self) -> Query {
        let mut q = self.list.query();
        match self.order {
            None => {}
            Some(Order::Asc) => q.push(("order", "asc".into())),
            Some(Order::Desc) => q.push(("order", "desc".into())),
        }
        q
    }
}

/// Options of `GET …/work/poll` (§6.2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollOptions {
    /// Wait up to this long (1‥999 ms) for an item when none is claimable; `None` answers at once.
    pub block_ms: Option<u32>,
    /// Deliveries not acknowledged within this many milliseconds may be handed out again
    /// (server default 5000; 0 means at once).
    pub reclaim_older_than_ms: Option<u64>,
    /// Sent as `Worker-ID`: a stable identity lets the server protect the delivery from other workers'
    /// acks and count the worker in `workers_polling`.
    pub worker_id: Option<String>,
    /// How long the answer may take beyond `block_ms`; `None`: the client's timeout.
    pub timeout: Option<std::time::Duration>,
}

impl PollOptions {
    pub(crate) fn query(&self) -> Query {
        let mut q = Query::new();
        if let Some(ms) = self.block_ms {
            q.push(("block_ms", ms.to_string()));
        }
        if let Some(ms) = self.reclaim_older_than_ms {
            q.push(("reclaim_older_than_ms", ms.to_string()));
        }
        q
    }
}

/// Options of `POST …/work/claim` (a Tether extension): a poll's, and the lease length wanted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimOptions {
    /// `block_ms`, `reclaim_older_than_ms`, the Worker-ID and the timeout, as for a poll.
    pub poll: PollOptions,
    /// Ask for a lease of this many seconds (the server clamps it); `None`: the server's default.
    pub desired_ttl_seconds: Option<u32>,
    /// Sent as `Idempotency-Key`: makes the claim safe to send again. Send the same key with
    /// every try of one claim (a try whose answer was lost, say) and a fresh one for the next
    /// claim; a try after one that took an item answers that item again (`Claim::earlier_try`).
    /// Random, 16 to 255 printable ASCII characters; the claim must name its worker
    /// (`PollOptions::worker_id`).
    pub idempotency_key: Option<String>,
    /// Which try of the claim this is (`retry`); a try sent again carries the first try's
    /// `idempotency_key`.
    pub retry: ClaimTry,
}

/// Which try of a claim a request is (`retry`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClaimTry {
    /// The first: nothing is sent.
    #[default]
    First,
    /// Sent as `retry=true`: a try sent again after one whose answer was not heard. The server
    /// answers the item an earlier try took, also when the queue is empty or the earlier try
    /// commits while this one waits, and otherwise claims as a first try would.
    Again,
    /// Sent as `retry=only`: a try sent again by a worker that takes no new work (draining). The
    /// server answers the item an earlier try took, or at once nothing; it takes no other item.
    AgainTakingNothing,
}

impl ClaimOptions {
    pub(crate) fn query(&self) -> Query {
        let mut q = self.poll.query();
        if let Some(ttl) = self.desired_ttl_seconds {
            q.push(("desired_ttl_seconds", ttl.to_string()));
        }
        match self.retry {
            ClaimTry::First => {}
            ClaimTry::Again => q.push(("retry", "true".to_owned())),
            ClaimTry::AgainTakingNothing => q.push(("retry", "only".to_owned())),
        }
        q
    }
}

/// Options of `POST …/work/{id}/heartbeat` (§6.7).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatOptions {
    /// [`NO_HEARTBEAT`] for the first beat, then the previous answer's `last_heartbeat` verbatim;
    /// `None` heartbeats unconditionally.
    pub expected_last_heartbeat: Option<String>,
    /// Ask for a lease of this many seconds (the server clamps it); `None` keeps the current one.
    pub desired_ttl_seconds: Option<u32>,
    /// Sent as `Worker-ID`; a server refuses (412) a heartbeat from a worker that does not own the item.
    pub worker_id: Option<String>,
    /// Give up on this call after this long (the worker protocol uses its heartbeat interval);
    /// `None` uses the client's request timeout.
    pub timeout: Option<Duration>,
}

impl HeartbeatOptions {
    /// The first heartbeat after an ack.
    pub fn first() -> Self {
        HeartbeatOptions {
            expected_last_heartbeat: Some(NO_HEARTBEAT.to_owned()),
            ..Default::default()
        }
    }

    /// A heartbeat following one that answered `last_heartbeat`.
    pub fn after(last_heartbeat: impl Into<String>) -> Self {
        HeartbeatOptions {
            expected_last_heartbeat: Some(last_heartbeat.into()),
            ..Default::default()
        }
    }

    pub(crate) fn query(&self) -> Query {
        let mut q = Query::new();
        if let Some(e) = &self.expected_last_heartbeat {
            q.push(("expected_last_heartbeat", e.clone()));
        }
        if let Some(ttl) = self.desired_ttl_seconds {
            q.push(("desired_ttl_seconds", ttl.to_string()));
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claims_try_is_sent_as_retry() {
        let retry = |retry: ClaimTry| {
            let options = ClaimOptions {
                retry,
                ..ClaimOptions::default()
            };
            let query = options.query();
            let sent: Vec<_> = query.iter().filter(|(name, _)| *name == "retry").collect();
            sent.into_iter()
                .map(|(_, value)| value.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(retry(ClaimTry::First), Vec::<String>::new());
        assert_eq!(retry(ClaimTry::Again), ["true"]);
        assert_eq!(retry(ClaimTry::AgainTakingNothing), ["only"]);
    }
}
