//! A typed async client of Tether's HTTP API (the `/api/v1/cloud` dialect; contract in SPEC.md).
//!
//! ```no_run
//! # async fn demo() -> tether_client::Result<()> {
//! use tether_client::{Client, CreateAgent, CreateEnvironment, CreateSession, PollOptions};
//!
//! let client = Client::new("http://127.0.0.1:4780", "tth_adm_…")?;
//! let env = client.create_environment(&CreateEnvironment::self_hosted("laptop")).await?;
//! let agent = client.create_agent(&CreateAgent::new("helper", "some-model")).await?;
//! client.create_session(&CreateSession::new(agent.id.as_str(), env.id.as_str())).await?;
//!
//! let poll = PollOptions { block_ms: Some(999), worker_id: Some("w1".into()), ..Default::default() };
//! if let Some(item) = client.poll_work(&env.id, &poll).await? {
//!     let secret = item.decode_secret()?.expect("polled items carry a secret");
//!     client.ack_work(&env.id, &item.id, Some("w1")).await?;
//!     println!("serving {:?} with {}", item.session_id(), secret.sessions_token);
//! }
//! # Ok(()) }
//! ```
//!
//! * [`Client`] has one method per endpoint; lists return one [`Page`], and [`paginate`] /
//!   [`collect_all`] walk every page.
//! * Refusals come back as [`Error::Api`] carrying the server's error envelope ([`ApiError`]:
//!   `status`, `kind` (the envelope's `type`), `message`, `param`, `code`, `details`); transport
//!   failures have their own variants, and [`Error::is_retryable`] says which are worth another try.
//! * Responses keep fields this client does not model in `extra`, so they re-serialize losslessly.

#![warn(missing_docs)]

mod client;
mod error;
mod pages;
mod params;
mod sse;
pub mod text;
mod types;

pub use client::{
    Client, ClientBuilder, API_PREFIX, DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT,
    DEFAULT_TIMEOUT, MAX_RESPONSE_BYTES,
};
pub use error::{ApiError, Error, Result};
pub use pages::{collect_all, paginate, Paginated};
pub use params::{
    ClaimOptions, ClaimTry, HeartbeatOptions, ListEvents, ListParams, ListResources, ListSessions,
    Order, PollOptions, NO_HEARTBEAT,
};
pub use reqwest::Method;
pub use sse::{EventStream, SseEvent, MAX_EVENT_BYTES};
pub use types::{
    event_type, Agent, AgentRef, Cancel, Claim, CreateAgent, CreateEnvironment, CreateSession,
    Credential, Deleted, Environment, Event, Heartbeat, Metadata, MetadataPatch, NewEvent, Page,
    PostEvents, PostedEvents, QueueStats, SecretError, Session, SessionStatus, StopThenClaim,
    StopWithClaim, UpdateAgent, UpdateEnvironment, UpdateSession, WorkData, WorkHistory, WorkItem,
    WorkSecret, WorkState, WorkTransition, Worker, WorkerItem,
};
