//! The two wire dialects (§9). Every difference between them is a field of [`Dialect`]'s table here;
//! handlers ask the table and never branch on the dialect themselves.

/// Which prefix a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// `/api/v1/cloud/…` — Qoder Cloud Agents.
    Qoder,
    /// `/v1/…` — Claude Managed Agents.
    Anthropic,
}

impl Dialect {
    pub const fn prefix(self) -> &'static str {
        match self {
            Dialect::Qoder => "/api/v1/cloud",
            Dialect::Anthropic => "/v1",
        }
    }

    /// Largest `limit` on list endpoints other than the work list.
    pub const fn max_list_limit(self) -> u32 {
        match self {
            Dialect::Qoder => 100,
            Dialect::Anthropic => 1000,
        }
    }

    /// Smallest `reclaim_older_than_ms` accepted on poll.
    pub const fn min_reclaim_ms(self) -> i64 {
        match self {
            Dialect::Qoder => 0,
            Dialect::Anthropic => 1,
        }
    }

    /// Header names that carry the worker identity, in order of preference.
    pub const fn worker_headers(self) -> &'static [&'static str] {
        match self {
            // The Qoder SDK sends `Worker-ID`; accepting the other name costs nothing.
            Dialect::Qoder => &["worker-id", "anthropic-worker-id"],
            Dialect::Anthropic => &["anthropic-worker-id", "worker-id"],
        }
    }

    /// Whether `x-api-key` is an accepted way to send a credential (Qoder documents it as a 401).
    pub const fn accepts_x_api_key(self) -> bool {
        matches!(self, Dialect::Anthropic)
    }
}
