//! What `/metrics` exposes: the recorder with explicit histogram buckets per series, a HELP text for
//! every series, and the per-environment queue gauges, which are computed from the store at scrape time.
//!
//! Why the queue gauges are not recorded through the `metrics` facade: they describe the database, not
//! this process. Read at scrape time they are the same on every server of a cluster, they never go stale
//! (an environment that is deleted simply stops appearing), and nothing has to keep them up to date
//! between scrapes. Their cardinality is bounded by [`GAUGE_ENVIRONMENTS`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tether_core::WorkState;
use tether_store::{ArchiveFilter, Cursor, PageRequest};

use crate::service::App;

/// At most this many environments get queue gauges: the first, in id order (the oldest), among the
/// self-hosted ones that are not archived. When there are more, `tether_queue_gauges_truncated` is 1.
/// Each environment costs 8 series.
pub const GAUGE_ENVIRONMENTS: u32 = 200;

/// HTTP requests: most answer in milliseconds; a long poll waits up to 1 s; streams last longer.
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Queueing delays: from an immediate hand-off to a queue that waited for a worker for minutes.
const QUEUE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Worker reaction times: an ack or first heartbeat follows a delivery within a lease (60 s default).
const WORKER_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// A commit is one fsync (SQLite) or a round trip (PostgreSQL).
const COMMIT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The histograms of a worker's pace between its calls (§11.4).
pub const ENQUEUE_TO_DELIVERY: &str = "tether_enqueue_to_delivery_seconds";
pub const DELIVERY_TO_ACK: &str = "tether_delivery_to_ack_seconds";
pub const ACK_TO_FIRST_HEARTBEAT: &str = "tether_ack_to_first_heartbeat_seconds";
const PACE_HISTOGRAMS: &[&str] = &[ENQUEUE_TO_DELIVERY, DELIVERY_TO_ACK, ACK_TO_FIRST_HEARTBEAT];

/// Every histogram and its buckets.
pub const HISTOGRAMS: &[(&str, &[f64])] = &[
    ("tether_http_request_duration_seconds", REQUEST_BUCKETS),
    (ENQUEUE_TO_DELIVERY, QUEUE_BUCKETS),
    (DELIVERY_TO_ACK, WORKER_BUCKETS),
    (ACK_TO_FIRST_HEARTBEAT, WORKER_BUCKETS),
    ("tether_store_commit_duration_seconds", COMMIT_BUCKETS),
    ("tether_store_commit_batch_size", BATCH_BUCKETS),
];

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide metrics recorder once (several servers in one test process share it).
pub fn install() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in HISTOGRAMS {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
                    .expect("bucket lists are not empty");
            }
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    metrics::gauge!("tether_build_info", "version" => env!("CARGO_PKG_VERSION"))
                        .set(1.0);
                    // Counters without labels are there from the start, at 0: a rate over a
                    // series that appears only with its first event misses that event, and an
                    // alert on it cannot tell "none yet" from "not exported".
                    for name in UNLABELLED_COUNTERS {
                        metrics::counter!(*name).increment(0);
                    }
                    for service in crate::services::NAMES {
                        metrics::counter!(crate::services::RESTARTS, "service" => service)
                            .increment(0);
                    }
                    // So are the pace histograms, which a server whose workers all claim never
                    // observes (a claim acks and makes its first heartbeat at its delivery).
                    for name in PACE_HISTOGRAMS {
                        let _registered = metrics::histogram!(*name);
                    }
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// Records one answered request in `tether_http_requests_total` and
/// `tether_http_request_duration_seconds`, labelled by method, matched route (`{param}` written
/// `:param`, which PromQL's RE2 matchers and simple text-format parsers take as it is) and status.
///
/// The handles of each series are kept once the recorder is installed, so a request builds no label
/// strings and looks nothing up in the registry (an idle worker's re-poll is the commonest request,
/// and every one records). At most [`REMEMBERED_SERIES`] are kept, a bound on the map whatever
/// clients send; beyond it a request takes the registry's path.
pub fn record_request(method: &str, route: &str, status: u16, elapsed: Duration) {
    let method = method_label(method);
    let seconds = elapsed.as_secs_f64();
    let installed = matches!(PROMETHEUS.get(), Some(Some(_)));
    let remembered = request_series();
    if installed {
        let by_route = remembered.read().expect("series lock");
        if let Some(series) = by_route.get(route).and_then(|list| {
            list.iter()
                .find(|s| s.method == method && s.status == status)
        }) {
            series.requests.increment(1);
            series.duration.record(seconds);
            return;
        }
    }
    let labels = [
        ("method", method.to_owned()),
        ("route", route_label(route)),
        ("status", status.to_string()),
    ];
    let series = RequestSeries {
        method: method.to_owned(),
        status,
        requests: metrics::counter!("tether_http_requests_total", &labels),
        duration: metrics::histogram!("tether_http_request_duration_seconds", &labels),
    };
    series.requests.increment(1);
    series.duration.record(seconds);
    if installed {
        let mut by_route = remembered.write().expect("series lock");
        if by_route.values().map(Vec::len).sum::<usize>() < REMEMBERED_SERIES {
            by_route.entry(route.to_owned()).or_default().push(series);
        }
    }
}

/// See [`record_request`].
pub const REMEMBERED_SERIES: usize = 1_024;

/// A matched route as the metrics' `route` label and the access log both write it: `:param` for
/// each parameter (`/sessions/:session_id`), the form dashboards over these series already use.
pub fn route_label(route: &str) -> String {
    route.replace('{', ":").replace('}', "")
}

/// The method as a label: one of HTTP's own, or `other`. Any token is a valid method, and a series
/// once registered lives as long as the process: a label taken from the client as it came would let
/// anyone, without a credential, grow the registry and every scrape without bound.
fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    KNOWN
        .into_iter()
        .find(|known| *known == method)
        .unwrap_or("other")
}

struct RequestSeries {
    method: String,
    status: u16,
    requests: Counter,
    duration: Histogram,
}

fn request_series() -> &'static RwLock<HashMap<String, Vec<RequestSeries>>> {
    static SERIES: OnceLock<RwLock<HashMap<String, Vec<RequestSeries>>>> = OnceLock::new();
    SERIES.get_or_init(Default::default)
}

/// The counters that carry no labels.
const UNLABELLED_COUNTERS: &[&str] = &[
    "tether_lease_expiries_total",
    "tether_http_connections_refused_total",
    "tether_http_connections_displaced_total",
    "tether_worker_polls_unrecorded_total",
];

/// The HELP text of every series the recorder carries.
fn describe() {
    describe_gauge!(
        "tether_build_info",
        "Always 1; the version label is the server's version."
    );
    describe_counter!(
        "tether_http_requests_total",
        "HTTP requests answered, by method, matched route and status."
    );
    describe_histogram!(
        "tether_http_request_duration_seconds",
        Unit::Seconds,
        "Time from request to response head, by method, matched route and status."
    );
    describe_histogram!(
        ENQUEUE_TO_DELIVERY,
        Unit::Seconds,
        "Time a work item waited in the queue before a poll handed it out."
    );
    describe_histogram!(
        DELIVERY_TO_ACK,
        Unit::Seconds,
        "Time from a poll's delivery to the worker's ack (a claim, which acks at its delivery, adds none)."
    );
    describe_histogram!(
        ACK_TO_FIRST_HEARTBEAT,
        Unit::Seconds,
        "Time from an ack to the first heartbeat (the item becomes active; a claim, which makes both at once, adds none)."
    );
    describe_histogram!(
        "tether_store_commit_duration_seconds",
        Unit::Seconds,
        "Time one store commit took (a group of writes on SQLite, one transaction on PostgreSQL)."
    );
    describe_histogram!(
        "tether_store_commit_batch_size",
        "Writes committed together by one SQLite group commit."
    );
    describe_counter!(
        "tether_work_transitions_total",
        "Work item state changes committed, by cause (§11.2)."
    );
    describe_counter!(
        "tether_lease_expiries_total",
        "Leases an expiry pass settled as expired (an item renewed meanwhile is not counted)."
    );
    describe_gauge!(
        "tether_long_poll_waiters",
        "Long polls blocked in this process."
    );
    describe_gauge!(
        crate::disk::FREE_BYTES_GAUGE,
        Unit::Bytes,
        "Bytes free on the disk of the embedded store's files, read once a second (absent on \
         PostgreSQL, or with --min-free-disk 0); under --min-free-disk, requests that add records \
         are refused."
    );
    describe_gauge!(
        "tether_session_streams",
        "Session event streams open on this process."
    );
    describe_gauge!(
        "tether_http_connections",
        "Client connections this process holds open (plain and TLS)."
    );
    describe_counter!(
        "tether_http_connections_refused_total",
        "Connections closed on arrival because --max-connections were already open, each with \
         other work in flight."
    );
    describe_counter!(
        "tether_http_connections_displaced_total",
        "Connections that arrived at --max-connections and took the place of an open one that was \
         waiting without a request in flight, or doing nothing but event streams and bodies still \
         arriving (which was closed)."
    );
    describe_counter!(
        crate::services::RESTARTS,
        "Runs of a background service (dispatcher, sampler, disk_watch) that panicked; each is \
         started again a second later."
    );
    describe_counter!(
        "tether_worker_polls_unrecorded_total",
        "Polls served but not recorded for workers_polling and the workers listing, because their \
         environment already had 10,000 workers recorded (made-up Worker-IDs)."
    );
    describe_counter!(
        "tether_http_connections_timed_out_total",
        "Connections closed by a timeout, by reason (handshake, header, idle, write_stalled)."
    );
}

/// One per-environment gauge family: name, help.
const QUEUE_GAUGES: &[(&str, &str)] = &[
    (
        "tether_queue_depth",
        "Queued work items no poll has handed out yet (the autoscaling signal).",
    ),
    (
        "tether_queue_pending",
        "Queued work items handed out but not acknowledged yet.",
    ),
    (
        "tether_queue_items",
        "Live work items by state (stopped items are not counted).",
    ),
    (
        "tether_queue_oldest_queued_age_seconds",
        "Age of the oldest queued work item; 0 when none is queued.",
    ),
    (
        "tether_queue_workers_polling",
        "Distinct workers that polled in the last 30 seconds.",
    ),
];

/// How long one reading of the queue gauges serves every scrape. Reading them costs the database a
/// count over each environment's live items, and `/metrics` takes no credential: without a bound,
/// a client that floods it (16 at once, 50,000 queued items on SQLite) took an unrelated request
/// from 1.6 ms to 244 ms at the median. Scrapers come every few seconds; one reading a second is
/// as fresh as they can tell.
pub const QUEUE_GAUGES_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The last reading of the queue gauges: scrapes that come together, or within
/// [`QUEUE_GAUGES_TTL`] of it, share it, and only one reading runs at a time. While one runs, a
/// scrape takes the last reading rather than queue behind a store that answers slowly.
#[derive(Default)]
pub struct QueueGaugeCache {
    last: std::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<str>)>>,
    reading: tokio::sync::Mutex<()>,
}

impl QueueGaugeCache {
    /// The last reading, if it is younger than `age`.
    fn younger_than(&self, age: std::time::Duration) -> Option<std::sync::Arc<str>> {
        let last = self.last.lock().expect("gauge cache lock");
        last.as_ref()
            .filter(|(read_at, _)| read_at.elapsed() < age)
            .map(|(_, text)| text.clone())
    }
}

/// The text of a scrape that answers are still handing out. `/metrics` is public, and its text grows
/// with the environments (up to [`GAUGE_ENVIRONMENTS`]' gauges, some 100 KB): a client that asked for it
/// many times at once and read none of the answers would otherwise make the server hold a copy per ask.
/// A scrape that comes while another one's text is still being handed out, and is younger than
/// [`QUEUE_GAUGES_TTL`], shares it; any other scrape renders afresh, so a scraper that reads its answers
/// always gets the counters as they are now. Scrapes that come together may each render, one per
/// runtime thread at most (rendering does not wait).
#[derive(Default)]
pub struct LiveScrape {
    /// When the last text was rendered (tokio's clock, which tests can move), and the text while any
    /// answer still holds it.
    last: std::sync::Mutex<Option<(tokio::time::Instant, std::sync::Weak<String>)>>,
}

/// A scrape's text shared by the answers handing it out.
struct SharedText(std::sync::Arc<String>);

impl AsRef<[u8]> for SharedText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl LiveScrape {
    /// The text of a live scrape young enough to share, or else `render`'s.
    pub fn text(&self, render: impl FnOnce() -> String) -> bytes::Bytes {
        let text = match self.live() {
            Some(text) => text,
            None => {
                let text = std::sync::Arc::new(render());
                *self.last.lock().expect("scrape lock") = Some((
                    tokio::time::Instant::now(),
                    std::sync::Arc::downgrade(&text),
                ));
                text
            }
        };
        bytes::Bytes::from_owner(SharedText(text))
    }

    fn live(&self) -> Option<std::sync::Arc<String>> {
        let last = self.last.lock().expect("scrape lock");
        let (at, text) = last.as_ref()?;
        if at.elapsed() >= QUEUE_GAUGES_TTL {
            return None;
        }
        text.upgrade()
    }
}

/// The per-environment queue gauges in Prometheus text format, read from the store at most once per
/// [`QUEUE_GAUGES_TTL`] (see [`QueueGaugeCache`]).
pub async fn queue_gauges(app: &App) -> std::sync::Arc<str> {
    let cache = &app.queue_gauges;
    if let Some(text) = cache.younger_than(QUEUE_GAUGES_TTL) {
        return text;
    }
    let reading = match cache.reading.try_lock() {
        Ok(reading) => reading,
        Err(_) => match cache.younger_than(std::time::Duration::MAX) {
            // A reading is under way: the one before it will do.
            Some(stale) => return stale,
            // The first: wait for it.
            None => cache.reading.lock().await,
        },
    };
    // Another scrape may have read while this one waited.
    if let Some(text) = cache.younger_than(QUEUE_GAUGES_TTL) {
        return text;
    }
    let text: std::sync::Arc<str> = read_queue_gauges(app).await.into();
    *cache.last.lock().expect("gauge cache lock") = Some((std::time::Instant::now(), text.clone()));
    drop(reading);
    text
}

/// Environments read at most per reading of the queue gauges, to find the self-hosted ones among them.
const GAUGE_SCAN: u32 = 10 * GAUGE_ENVIRONMENTS;

/// The first [`GAUGE_ENVIRONMENTS`] self-hosted environments that are not archived, oldest first, and
/// whether there are more. Cloud environments have no queue, so they take no place among them: they
/// are read past, [`GAUGE_SCAN`] environments at most, after which the gauges count as truncated.
async fn self_hosted_environments(
    app: &App,
) -> tether_store::StoreResult<(Vec<tether_core::resources::Environment>, bool)> {
    let mut hosted = Vec::new();
    let mut read = 0;
    let mut page = PageRequest::first(GAUGE_ENVIRONMENTS + 1);
    loop {
        let got = app
            .store
            .list_environments(&ArchiveFilter::default(), &page)
            .await?;
        read += got.items.len() as u32;
        let last = got.items.last().map(|e| e.id.clone());
        hosted.extend(got.items.into_iter().filter(|e| e.is_self_hosted()));
        if hosted.len() > GAUGE_ENVIRONMENTS as usize {
            hosted.truncate(GAUGE_ENVIRONMENTS as usize);
            return Ok((hosted, true));
        }
        match last {
            Some(last) if got.has_more && read < GAUGE_SCAN => page.cursor = Cursor::After(last),
            _ => return Ok((hosted, got.has_more)),
        }
    }
}

/// The per-environment queue gauges in Prometheus text format, read from the store now.
async fn read_queue_gauges(app: &App) -> String {
    let (hosted, truncated) = match self_hosted_environments(app).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot list environments");
            return "# the store did not answer: no queue gauges in this scrape\n".to_owned();
        }
    };
    let truncated = u8::from(truncated);
    // Poll records wait in memory for the dispatcher's tick; this scrape counts them now.
    if let Err(e) = app.write_worker_records().await {
        tracing::warn!(error = %e, "metrics: cannot write the waiting poll records");
    }
    let now = app.now();
    let polling_since = now.minus_millis(app.config.workers_polling_window_ms);
    // name → lines
    let mut families: Vec<(&str, &str, Vec<String>)> = QUEUE_GAUGES
        .iter()
        .map(|(n, h)| (*n, *h, Vec::new()))
        .collect();
    for env in &hosted {
        // No expiry pass per environment here: the dispatcher's tick keeps leases timely.
        let (Ok(c), Ok(workers)) = (
            app.store.queue_counts(&env.id).await,
            app.store
                .workers_seen(&env.id, polling_since, app.workers_listed_at_most())
                .await,
        ) else {
            continue;
        };
        let label = format!("environment_id=\"{}\"", escape_label(&env.id));
        let age = c
            .oldest_queued_at
            .map_or(0.0, |t| now.millis_since(t).max(0) as f64 / 1000.0);
        families[0]
            .2
            .push(format!("tether_queue_depth{{{label}}} {}", c.depth));
        families[1]
            .2
            .push(format!("tether_queue_pending{{{label}}} {}", c.pending));
        for state in [
            WorkState::Queued,
            WorkState::Starting,
            WorkState::Active,
            WorkState::Stopping,
        ] {
            let n = c.states.get(&state).copied().unwrap_or(0);
            families[2].2.push(format!(
                "tether_queue_items{{{label},state=\"{}\"}} {n}",
                state.as_str()
            ));
        }
        families[3].2.push(format!(
            "tether_queue_oldest_queued_age_seconds{{{label}}} {age}"
        ));
        families[4].2.push(format!(
            "tether_queue_workers_polling{{{label}}} {}",
            workers.len()
        ));
    }
    let mut out = String::new();
    for (name, help, lines) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP tether_queue_gauges_truncated 1 when there are more than {GAUGE_ENVIRONMENTS} \
         environments and only the first {GAUGE_ENVIRONMENTS} have queue gauges.\n\
         # TYPE tether_queue_gauges_truncated gauge\n\
         tether_queue_gauges_truncated {truncated}"
    );
    out
}

/// Label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// At most one log line every [`RateLimitedLog::EVERY`] of something that can happen many times
/// a second (a flood of connections at the cap, a store that cannot serve during an outage), with
/// how many went unlogged since the line before.
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    /// When the last line went out, and how many came after it unlogged.
    last: Option<(std::time::Instant, u64)>,
}

impl RateLimitedLog {
    pub const EVERY: Duration = Duration::from_secs(10);

    pub const fn new() -> RateLimitedLog {
        RateLimitedLog { last: None }
    }

    /// One more at `now`: `Some(how many went unlogged since the last line)` when this one is to
    /// be logged.
    pub fn due_at(&mut self, now: std::time::Instant) -> Option<u64> {
        match &mut self.last {
            Some((said, unsaid)) if now.duration_since(*said) < Self::EVERY => {
                *unsaid += 1;
                None
            }
            last => {
                let unsaid = last.map_or(0, |(_, unsaid)| unsaid);
                *last = Some((now, 0));
                Some(unsaid)
            }
        }
    }

    /// [`RateLimitedLog::due_at`] now.
    pub fn due(&mut self) -> Option<u64> {
        self.due_at(std::time::Instant::now())
    }
}

/// A [`RateLimitedLog`] that any thread may ask, for a `static` of a function called from
/// anywhere.
#[derive(Debug, Default)]
pub struct SharedRateLimitedLog(std::sync::Mutex<RateLimitedLog>);

impl SharedRateLimitedLog {
    pub const fn new() -> SharedRateLimitedLog {
        SharedRateLimitedLog(std::sync::Mutex::new(RateLimitedLog::new()))
    }

    /// [`RateLimitedLog::due`]. A panic while the lock was held cannot leave the count wrong
    /// enough to matter: the lock is taken back.
    pub fn due(&self) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .due()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_once_a_while_with_what_went_unlogged_between() {
        let start = std::time::Instant::now();
        let mut lines = RateLimitedLog::new();
        assert_eq!(lines.due_at(start), Some(0), "the first is logged");
        // One a quarter of a second.
        let mut said = vec![];
        for quarter in 1..=120u32 {
            let at = start + Duration::from_millis(250) * quarter;
            if let Some(unsaid) = lines.due_at(at) {
                said.push((at - start, unsaid));
            }
        }
        let every = RateLimitedLog::EVERY;
        assert_eq!(said, vec![(every, 39), (every * 2, 39), (every * 3, 39)]);
        // After a quiet stretch the next is logged at once.
        let later = start + every * 10;
        assert_eq!(lines.due_at(later), Some(0));
        assert_eq!(lines.due_at(later + Duration::from_millis(1)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_scrape_shares_the_text_still_being_handed_out_and_renders_afresh_otherwise() {
        let live = LiveScrape::default();
        let mut renders = 0;
        let render = |n: &mut i32| {
            *n += 1;
            format!("render {n}")
        };
        let first = live.text(|| render(&mut renders));
        let shared = live.text(|| render(&mut renders));
        assert_eq!(renders, 1, "an answer still handing the text out shares it");
        assert_eq!(first, shared);
        assert_eq!(first.as_ptr(), shared.as_ptr(), "one copy");
        drop((first, shared));
        let fresh = live.text(|| render(&mut renders));
        assert_eq!(
            renders, 2,
            "once every answer is out, a scrape renders afresh"
        );
        assert_eq!(&fresh[..], b"render 2");
        // Still being handed out, but as old as a queue-gauge reading may be: not shared any more.
        tokio::time::advance(QUEUE_GAUGES_TTL).await;
        let later = live.text(|| render(&mut renders));
        assert_eq!(renders, 3, "a text a second old is rendered afresh");
        assert_eq!(&later[..], b"render 3");
        assert_eq!(&fresh[..], b"render 2");
    }

    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn requests_are_counted_per_method_route_and_status_through_the_kept_handles() {
        let handle = install().expect("the recorder installs");
        let route = "/test/{item_id}/records";
        for _ in 0..3 {
            record_request("GET", route, 200, Duration::from_millis(2));
        }
        record_request("GET", route, 404, Duration::from_millis(1));
        record_request("POST", route, 200, Duration::from_millis(1));
        // Methods of the client's own invention share one series.
        for invented in ["BREW", "M0001", "M0002"] {
            record_request(invented, route, 405, Duration::from_millis(1));
        }
        let text = handle.render();
        let series = |method: &str, status: u16| {
            sample(
                &text,
                &format!(
                    "tether_http_requests_total{{method=\"{method}\",route=\"/test/:item_id/records\",status=\"{status}\"}}"
                ),
            )
        };
        assert_eq!(series("GET", 200), Some(3.0), "{text}");
        assert_eq!(series("GET", 404), Some(1.0), "{text}");
        assert_eq!(series("POST", 200), Some(1.0), "{text}");
        assert_eq!(series("other", 405), Some(3.0), "{text}");
        assert!(!text.contains("BREW"), "{text}");
        let kept = request_series().read().unwrap();
        assert_eq!(kept.get(route).map(Vec::len), Some(4));
    }
}
