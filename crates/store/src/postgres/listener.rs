//! The notification listener: one connection per process listening on [`CHANNEL`], reconnecting with
//! backoff, and the [`Health`] it shares with the executor, which tracks outages and recoveries.
//!
//! Notifications are a hint only; nothing here is needed for correctness. The same connection
//! probes the database every [`PROBE_INTERVAL`]: a database that keeps its connections open but
//! stops answering (frozen, its host paused, a partition that drops packets) would otherwise hold
//! every request for as long as it lasts, since no error ever comes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{describe, is_connection_failure, CHANNEL};
use crate::Notice;

/// `NOTIFY` payloads must stay below 8000 bytes.
const MAX_PAYLOAD: usize = 7_000;
/// Notices buffered per subscriber; a slow one sees `Lagged` and runs a full pass instead.
pub(super) const NOTICE_BUFFER: usize = 1_024;
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the listening connection asks the database for a trivial answer.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe unanswered for this long makes the database unresponsive ([`Health::unresponsive`]).
/// With the interval, a database that stops answering is noticed within 3 s: before the next
/// heartbeat of a worker on the shortest lease (10 s, a beat every 5 s) runs out of time, so that
/// it gets the 503 that promises lease amnesty rather than no answer.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting the listener, the startup exchange included (`connect_timeout` bounds only the TCP
/// connection, and a frozen database accepts those).
const LISTEN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the database was lost, and how many times it came back.
#[derive(Default)]
pub(super) struct Health {
    pub(super) lost: AtomicBool,
    pub(super) reconnections: AtomicU64,
    /// How many times `lost` went from false to true.
    pub(super) losses: AtomicU64,
    /// True from a probe that went unanswered (or a listener's connection that the database did
    /// not let through in time) until the database answers again: every statement under way is
    /// given up with `Unavailable`, and each one sent meanwhile gets [`PROBE_TIMEOUT`] to answer
    /// (see the executor). An answer to the listener's probe or to one of those clears it.
    pub(super) unresponsive: tokio::sync::watch::Sender<bool>,
    /// How many times `unresponsive` was set: a statement's answer clears it only when no probe
    /// failed after the statement was sent ([`Health::answered_since`]).
    pub(super) unanswered_probes: AtomicU64,
    /// Makes "count the recovery, then clear the flag" one step, so that whoever sees the flag clear
    /// also sees the count that goes with it.
    recovering: Mutex<()>,
}

impl Health {
    pub(super) fn lost(&self, why: &str) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            self.losses.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(reason = %why, "lost the database");
        }
    }

    /// The database did not answer: an outage, and what is under way is given up.
    pub(super) fn unresponsive(&self, why: &str) {
        // Lost first: the requests given up now promise amnesty.
        self.lost(why);
        self.unanswered_probes.fetch_add(1, Ordering::SeqCst);
        self.unresponsive.send_replace(true);
    }

    /// The database answered something sent while it was taken as unresponsive, after the
    /// `unanswered_probes`-th probe failed and before any later one did.
    pub(super) fn answered_since(&self, unanswered_probes: u64) {
        if self.unanswered_probes.load(Ordering::SeqCst) == unanswered_probes {
            self.answered();
        }
    }

    /// The listener's own connection got an answer.
    fn answered(&self) {
        self.unresponsive
            .send_if_modified(|u| std::mem::replace(u, false));
    }

    pub(super) fn reached(&self) {
        if !self.lost.load(Ordering::SeqCst) {
            return;
        }
        let _guard = self.recovering.lock().expect("health lock");
        if self.lost.load(Ordering::SeqCst) {
            self.reconnections.fetch_add(1, Ordering::SeqCst);
            self.lost.store(false, Ordering::SeqCst);
            tracing::info!("the database is reachable again");
        }
    }
}

/// Keeps one connection listening on [`CHANNEL`], reconnecting with backoff whenever it drops.
pub(super) async fn listen(
    config: Config,
    tls: MakeRustlsConnect,
    notices: broadcast::Sender<Notice>,
    health: Arc<Health>,
    origin: String,
) {
    let mut backoff = LISTEN_BACKOFF_MIN;
    let mut listened_before = false;
    let mut refused_before = false;
    // Why the last listening connection ended, while its reconnection at once is under way: a cut
    // that this attempt does not get past, listening again, is an outage after all.
    let mut cut: Option<String> = None;
    loop {
        let mut reconnect_at_once = false;
        let mut listening = false;
        let mut cut_now = None;
        let connected =
            tokio::time::timeout(LISTEN_CONNECT_TIMEOUT, config.connect(tls.clone())).await;
        match connected {
            Err(_) => health.unresponsive(&format!(
                "the database did not let the listener connect within {LISTEN_CONNECT_TIMEOUT:?}"
            )),
            Ok(Ok((client, mut connection))) => {
                let messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                let mut messages = std::pin::pin!(messages);
                let deliver = |message: AsyncMessage| {
                    if let AsyncMessage::Notification(n) = message {
                        for notice in decode_payload(n.payload(), &origin) {
                            let _ = notices.send(notice);
                        }
                    }
                };
                // The connection has to be driven for LISTEN to complete.
                let statement = format!("LISTEN {CHANNEL}");
                let mut subscribe = std::pin::pin!(client.batch_execute(&statement));
                // Err((whether the database was lost, why)). Bounded as a probe is: something
                // between (a pooler) may take the connection in and then hold the statement for
                // as long as the database is away.
                let subscribing = async {
                    loop {
                        tokio::select! {
                            r = &mut subscribe => break match r {
                                Ok(()) => Ok(()),
                                Err(e) => Err((is_connection_failure(&e), describe(&e))),
                            },
                            m = messages.next() => match m {
                                Some(Ok(message)) => deliver(message),
                                Some(Err(e)) => break Err((true, describe(&e))),
                                None => break Err((true, "the connection closed".into())),
                            },
                        }
                    }
                };
                let subscribed = match tokio::time::timeout(PROBE_TIMEOUT, subscribing).await {
                    Ok(subscribed) => subscribed,
                    Err(_) => {
                        let why =
                            format!("the database did not answer LISTEN within {PROBE_TIMEOUT:?}");
                        health.unresponsive(&why);
                        Err((true, why))
                    }
                };
                match subscribed {
                    Ok(()) => {
                        listening = true;
                        health.answered();
                        health.reached();
                        backoff = LISTEN_BACKOFF_MIN;
                        if std::mem::replace(&mut listened_before, true) {
                            // Whatever was announced while this connection was down is lost.
                            let _ = notices.send(Notice::Resync);
                        }
                        let listening_since = std::time::Instant::now();
                        let why = loop {
                            let probe = async {
                                tokio::time::sleep(PROBE_INTERVAL).await;
                                tokio::time::timeout(PROBE_TIMEOUT, client.simple_query("")).await
                            };
                            let mut probe = std::pin::pin!(probe);
                            let ended = loop {
                                tokio::select! {
                                    m = messages.next() => match m {
                                        Some(Ok(message)) => deliver(message),
                                        Some(Err(e)) => break Some(describe(&e)),
                                        None => break Some("the listening connection closed".to_owned()),
                                    },
                                    answer = &mut probe => break match answer {
                                        Ok(Ok(_)) => {
                                            health.answered();
                                            None
                                        }
                                        Ok(Err(e)) => Some(describe(&e)),
                                        Err(_) => {
                                            let why = format!(
                                                "the database did not answer within {PROBE_TIMEOUT:?}"
                                            );
                                            health.unresponsive(&why);
                                            Some(why)
                                        }
                                    },
                                }
                            };
                            if let Some(why) = ended {
                                break why;
                            }
                        };
                        // A connection that ended is not yet an outage: a proxy, a firewall or an
                        // operator may cut it while the database stays up, and an outage costs every
                        // live lease an amnesty (the reconnection the service counts), so cuts
                        // repeated often enough would keep an abandoned item from ever lapsing.
                        // Reconnecting at once tells the two apart: unless the next attempt listens
                        // again (within the probe's bound), the cut is counted as the loss after
                        // all, below; and the pool reports its own failures too. (A probe left
                        // unanswered has already made the database unresponsive.)
                        tracing::info!(reason = %why, "the listening connection ended; reconnecting");
                        // At once only after a connection that lived: one that ends as soon as it
                        // listens is retried with backoff.
                        reconnect_at_once = listening_since.elapsed() >= PROBE_INTERVAL;
                        cut_now = Some(why);
                    }
                    Err((true, why)) => health.lost(&why),
                    Err((false, why)) => {
                        // An engine without LISTEN: correctness never needed it, only promptness.
                        if !std::mem::replace(&mut refused_before, true) {
                            tracing::warn!(error = %why, "the database refuses LISTEN; changes made \
                                through other servers reach this one on the dispatcher's tick");
                        }
                        backoff = LISTEN_BACKOFF_MAX;
                    }
                }
            }
            Ok(Err(e)) if is_connection_failure(&e) => health.lost(&describe(&e)),
            Ok(Err(e)) => tracing::warn!(error = %describe(&e), "cannot connect the listener"),
        }
        if let Some(why) = std::mem::replace(&mut cut, cut_now) {
            if !listening {
                health.lost(&format!("{why}, and listening again failed"));
            }
        }
        if reconnect_at_once {
            continue;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}

/// `{"o": origin, "w": [environment ids], "s": [session ids]}`.
pub(super) fn encode_payloads(notices: &[Notice], origin: &str) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut work = Vec::new();
    let mut sessions = Vec::new();
    let mut size = 0;
    let flush = |work: &mut Vec<&str>, sessions: &mut Vec<&str>, payloads: &mut Vec<String>| {
        if !work.is_empty() || !sessions.is_empty() {
            payloads.push(serde_json::json!({"o": origin, "w": work, "s": sessions}).to_string());
        }
        work.clear();
        sessions.clear();
    };
    for notice in notices {
        let id = match notice {
            Notice::WorkClaimable { environment_id } => environment_id.as_str(),
            Notice::Session { session_id } => session_id.as_str(),
            Notice::Resync => continue,
        };
        if size + id.len() + 4 > MAX_PAYLOAD - origin.len() - 32 {
            flush(&mut work, &mut sessions, &mut payloads);
            size = 0;
        }
        size += id.len() + 4;
        match notice {
            Notice::WorkClaimable { .. } => work.push(id),
            Notice::Session { .. } => sessions.push(id),
            Notice::Resync => {}
        }
    }
    flush(&mut work, &mut sessions, &mut payloads);
    payloads
}

fn decode_payload(payload: &str, origin: &str) -> Vec<Notice> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(payload) else {
        tracing::debug!(payload, "ignoring a notification that is not ours");
        return Vec::new();
    };
    if value["o"].as_str() == Some(origin) {
        return Vec::new();
    }
    let ids = |key: &str| -> Vec<String> {
        value[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out: Vec<Notice> = ids("w")
        .into_iter()
        .map(|environment_id| Notice::WorkClaimable { environment_id })
        .collect();
    out.extend(
        ids("s")
            .into_iter()
            .map(|session_id| Notice::Session { session_id }),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_answer_to_what_was_sent_after_the_last_unanswered_probe_ends_unresponsiveness() {
        let health = Health::default();
        let before = health.unanswered_probes.load(Ordering::SeqCst);
        health.unresponsive("no answer");
        assert!(*health.unresponsive.borrow());
        assert!(
            health.lost.load(Ordering::SeqCst),
            "an outage: amnesty is promised"
        );
        // Sent before that probe failed: its answer says nothing of now.
        health.answered_since(before);
        assert!(*health.unresponsive.borrow());
        // Sent after it: the database answers again.
        let after = health.unanswered_probes.load(Ordering::SeqCst);
        health.answered_since(after);
        assert!(!*health.unresponsive.borrow());
        // Counting the recovery is the executor's and the listener's `reached`, apart.
        assert!(health.lost.load(Ordering::SeqCst));
        health.reached();
        assert!(!health.lost.load(Ordering::SeqCst));
        assert_eq!(health.reconnections.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn payloads_round_trip_and_skip_their_origin() {
        let notices = vec![
            Notice::WorkClaimable {
                environment_id: "env_1".into(),
            },
            Notice::Session {
                session_id: "sess_1".into(),
            },
        ];
        let payloads = encode_payloads(&notices, "me");
        assert_eq!(payloads.len(), 1);
        assert_eq!(decode_payload(&payloads[0], "other"), notices);
        assert!(decode_payload(&payloads[0], "me").is_empty());
        assert!(decode_payload("not json", "other").is_empty());
    }

    #[test]
    fn large_announcements_are_split_below_the_payload_limit() {
        let notices: Vec<Notice> = (0..2_000)
            .map(|i| Notice::WorkClaimable {
                environment_id: format!("env_{i:032x}"),
            })
            .collect();
        let payloads = encode_payloads(&notices, "me");
        assert!(payloads.len() > 1);
        assert!(payloads.iter().all(|p| p.len() < 8_000));
        let decoded: Vec<Notice> = payloads
            .iter()
            .flat_map(|p| decode_payload(p, "other"))
            .collect();
        assert_eq!(decoded, notices);
    }
}
