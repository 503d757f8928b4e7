//! The heartbeat task of one item (§8 step 3): renews the lease with the item's session token, first
//! with `NO_HEARTBEAT`, then echoing each `last_heartbeat` verbatim, at the core's cadence
//! (`tether_core::lease::heartbeat_interval`); and says when the server asked for a stop or the lease
//! is gone.
//!
//! The lease is also the worker's own: [`WorkerLease`] (in the core) keeps the moment the program must
//! be dead by, counted on this process's monotonic clock from the *send* of the last heartbeat the
//! server accepted. Every request is cut off at that moment, and the waits of the supervisor
//! ([`Heartbeat::established`], [`Heartbeat::event`], [`Heartbeat::lost`]) carry their own timer for it,
//! so that the program dies in time whatever the network does: answers that fail fast, then hang, or
//! never come.
//!
//! A heartbeat without an answer half-way through its timeout is sent again beside it, on a fresh
//! connection (`tether_core::lease::hedge_after`): the pooled one it went on may be dead without a
//! word (a NAT or a failover that forgot it), or the server may be slow to answer (its database just
//! stopped answering, and the answer will promise amnesty); whichever answers first is taken. A try
//! that got no answer may still have been accepted, and moved the lease's `last_heartbeat` on; a try
//! expecting the old value then gets 412 with the value the server holds
//! (`error.details.current_state`), and the worker takes it up and tries once more. It can be no other
//! worker's: the server hands the item to another only after the lease expired, and this worker stops
//! beating before then.

use std::future::Future;
use std::time::Duration;

use tether_client::{Client, Error, Heartbeat as Beat, HeartbeatOptions, WorkState, NO_HEARTBEAT};
use tether_core::lease::{heartbeat_interval, hedge_after, WorkerLease, HEARTBEAT_INTERVAL_MAX};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::deadman;
use crate::error::answered;

/// One lease renewal of one item: the heartbeat call. The worker's is [`ItemLease`] (HTTP, with the
/// item's session token); the unit tests below script the server's answers on tokio's paused clock.
pub trait Renew: Send + Sync + 'static {
    fn renew(
        &self,
        options: HeartbeatOptions,
        connection: Connection,
    ) -> impl Future<Output = Result<Beat, Error>> + Send;
}

/// Which connection a heartbeat goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// Any the client keeps open (the first try of a beat).
    Pooled,
    /// One of its own (the second try of a beat, and every try after a beat that got no answer).
    Fresh,
}

impl Connection {
    /// `client` sending on this kind of connection.
    pub fn of(self, client: &Client) -> Client {
        match self {
            Connection::Pooled => client.clone(),
            Connection::Fresh => client.on_fresh_connections(),
        }
    }
}

/// What the tries of one beat came to ([`Beats::round`]).
struct Round {
    /// The first answer of the server, with the send time of the try it answers; `None` when no
    /// try was answered in time (the last transport failure, if any, is given as the answer).
    answer: Option<(Instant, Result<Beat, Error>)>,
    /// A try ended without an answer, or was still under way when the round ended: the server may
    /// have accepted it unseen.
    unanswered: bool,
}

/// The heartbeat call of one item, over HTTP.
pub struct ItemLease {
    /// Carries the item's session token.
    pub client: Client,
    pub environment_id: String,
    pub work_id: String,
}

impl Renew for ItemLease {
    async fn renew(
        &self,
        options: HeartbeatOptions,
        connection: Connection,
    ) -> Result<Beat, Error> {
        connection
            .of(&self.client)
            .heartbeat(&self.environment_id, &self.work_id, &options)
            .await
    }
}

/// What the supervisor of the item needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lease {
    /// No heartbeat accepted yet: the program must not start.
    Pending,
    Held,
    /// The item is `stopping`: end the program gracefully, then confirm the stop.
    StopRequested,
    /// The item is not this worker's any more: kill the program at once and leave the item alone.
    Lost(String),
}

/// The provisional lease of the ack, as far as the worker can know it: the shortest TTL of §8. It only
/// bounds how long the first heartbeat is tried; the program starts after the first accepted one.
const PROVISIONAL_TTL: Duration = Duration::from_secs(10);

/// What one heartbeat answer means.
#[derive(Debug, PartialEq)]
enum Verdict {
    Renewed {
        stopping: bool,
    },
    Lost(String),
    /// 412, and the lease's `last_heartbeat` is now this: another heartbeat moved it. If one of this
    /// worker's own went unanswered, it was that one.
    Moved {
        last_heartbeat: String,
        why: String,
    },
    /// The server could not write (its database is away) and promises that no lease expires before
    /// this long after it can again.
    Amnesty(Duration),
    /// Worth another try while the lease may still be alive.
    Retry(String),
}

fn judge(result: &Result<Beat, Error>) -> Verdict {
    match result {
        Ok(beat) if !beat.lease_extended => {
            Verdict::Lost("the server did not extend the lease".into())
        }
        Ok(beat) => match beat.state {
            WorkState::Active => Verdict::Renewed { stopping: false },
            WorkState::Stopping => Verdict::Renewed { stopping: true },
            ref other => Verdict::Lost(format!("the heartbeat says the item is {other}")),
        },
        // A refused certificate stays refused: retrying would only keep the program running on a lease
        // this worker can no longer renew (the poll loop ends the worker on the same error).
        Err(e) if e.is_tls() => Verdict::Lost(format!("the server's TLS was refused ({e})")),
        Err(e) => match e.status() {
            Some(412) => {
                let why = format!("another heartbeat holds the lease ({e})");
                match current_heartbeat(e) {
                    Some(last_heartbeat) => Verdict::Moved {
                        last_heartbeat,
                        why,
                    },
                    None => Verdict::Lost(why),
                }
            }
            Some(409) => Verdict::Lost(format!(
                "the item went back to the queue or was stopped ({e})"
            )),
            Some(401) => Verdict::Lost(format!(
                "the item's session token died: it was stopped, handed to another worker, its lease ran out, or its key was revoked ({e})"
            )),
            Some(503) => match amnesty_promised(e) {
                Some(grace) => Verdict::Amnesty(grace),
                None => Verdict::Retry(crate::error::described(e)),
            },
            _ if e.is_retryable() => Verdict::Retry(crate::error::described(e)),
            Some(_) => Verdict::Lost(format!("the server refused the heartbeat ({e})")),
            None => Verdict::Retry(crate::error::described(e)),
        },
    }
}

/// The `last_heartbeat` a 412 says the lease has now (`error.details.current_state`), when the
/// item is still leased.
fn current_heartbeat(e: &Error) -> Option<String> {
    let Error::Api(api) = e else { return None };
    let current = api.details.as_ref()?.get("current_state")?;
    let leased = matches!(
        current.get("state")?.as_str()?,
        "starting" | "active" | "stopping"
    );
    let last = current.get("last_heartbeat")?.as_str()?;
    leased.then(|| last.to_owned())
}

/// The amnesty a 503 promises: `error.code = "store_unavailable"` (or `"store_outcome_unknown"`,
/// a heartbeat that may have been applied as its connection to the database was lost) with
/// `error.details.lease_amnesty_ms`, the window the server extends every lease to once it can write again.
pub(crate) fn amnesty_promised(e: &Error) -> Option<Duration> {
    let Error::Api(api) = e else { return None };
    if !matches!(
        api.code.as_deref(),
        Some("store_unavailable" | "store_outcome_unknown")
    ) {
        return None;
    }
    let ms = api.details.as_ref()?.get("lease_amnesty_ms")?.as_u64()?;
    Some(Duration::from_millis(ms))
}

/// The running heartbeat task of one item. Dropping it stops the task.
pub struct Heartbeat {
    task: JoinHandle<()>,
    state: watch::Receiver<Lease>,
    /// When the program must be dead by; moves with every renewal (and amnesty).
    kill_at: watch::Receiver<Instant>,
    /// When the dead man's switch ends the worker if the program still runs ([`super::deadman`]).
    last_resort: watch::Receiver<Instant>,
    /// Why renewals fail, from the first failure after a renewal until the next renewal.
    trouble: watch::Receiver<Option<String>>,
}

impl Heartbeat {
    /// Starts beating at once through `renewer`; `acked` is when the ack that gave the provisional
    /// lease was sent.
    pub fn start(
        renewer: impl Renew,
        worker_id: String,
        desired_ttl: Option<u32>,
        acked: Instant,
    ) -> Heartbeat {
        Heartbeat::begin(renewer, worker_id, desired_ttl, acked, None)
    }

    /// Goes on beating for an item taken by a claim sent at `sent` (`POST …/work/claim`), whose
    /// answer carried the first heartbeat's, `first`: the lease is held from the start, its
    /// deadline counted from the claim's sending, and the next beat echoes `first.last_heartbeat`
    /// when the cadence calls for it.
    pub fn start_claimed(
        renewer: impl Renew,
        worker_id: String,
        desired_ttl: Option<u32>,
        sent: Instant,
        first: Beat,
    ) -> Heartbeat {
        Heartbeat::begin(renewer, worker_id, desired_ttl, sent, Some(first))
    }

    fn begin(
        renewer: impl Renew,
        worker_id: String,
        desired_ttl: Option<u32>,
        origin: Instant,
        first: Option<Beat>,
    ) -> Heartbeat {
        let (lease, held) = match &first {
            None => (
                WorkerLease::acknowledged(Duration::ZERO, PROVISIONAL_TTL),
                Lease::Pending,
            ),
            Some(beat) => {
                let ttl = Duration::from_secs(beat.ttl_seconds.into());
                let held = match judge(&Ok(beat.clone())) {
                    Verdict::Renewed { stopping: true } => Lease::StopRequested,
                    Verdict::Renewed { stopping: false } => Lease::Held,
                    // Not a lease this worker may run a program under (`lease_extended` false, a
                    // state that ends the item).
                    Verdict::Lost(why) => Lease::Lost(why),
                    other => unreachable!("an answer judged as a failure: {other:?}"),
                };
                let lease = WorkerLease::acknowledged(Duration::ZERO, ttl);
                // An item taken up late (one a claim brought while its worker was still busy
                // with the item before, say) may hold a lease that has run out by the worker's
                // own reckoning: no program may start under it.
                let held = match held {
                    Lease::Held | Lease::StopRequested
                        if origin + lease.kill_at() <= Instant::now() =>
                    {
                        Lease::Lost("the lease ran out before the item was taken up".into())
                    }
                    held => held,
                };
                (lease, held)
            }
        };
        // A lease lost from the start is not beaten for.
        let beating = !matches!(held, Lease::Lost(_));
        let (tx, state) = watch::channel(held);
        let (deadline_tx, kill_at) = watch::channel(origin + lease.kill_at());
        let (last_resort_tx, last_resort) = watch::channel(origin + lease.last_resort());
        let (trouble_tx, trouble) = watch::channel(None);
        let task = tokio::spawn(async move {
            let beats = Beats {
                renewer: &renewer,
                worker_id: &worker_id,
                desired_ttl,
                origin,
                state: &tx,
                kill_at: &deadline_tx,
                last_resort: &last_resort_tx,
                trouble: &trouble_tx,
            };
            if beating {
                let outcome = beats.run(lease, first).await;
                tx.send_replace(Lease::Lost(outcome));
            }
            // The senders stay, so that waiting on them never sees a closed channel.
            std::future::pending::<()>().await;
        });
        Heartbeat {
            task,
            state,
            kill_at,
            last_resort,
            trouble,
        }
    }

    /// Calls `told` when renewals start failing (with why) and when one gets through again
    /// (`None`), once each way: an operator sees a lease in danger before it is lost.
    pub fn on_trouble(&self, told: impl Fn(Option<&str>) + Send + 'static) {
        let mut trouble = self.trouble.clone();
        tokio::spawn(async move {
            // Ends with the beats' task, which drops the sender.
            while trouble.changed().await.is_ok() {
                told(trouble.borrow_and_update().as_deref());
            }
        });
    }

    /// Arms the dead man's switch for the program about to start; drop the guard once it is reaped.
    pub fn dead_man(&self) -> deadman::Guard {
        deadman::Guard::arm(self.last_resort.clone())
    }

    /// Waits for the first answer that settles the lease: `Held` (start the program), a stop request,
    /// or a loss.
    pub async fn established(&mut self) -> Lease {
        self.wait(|l| *l != Lease::Pending).await
    }

    /// Waits until the lease is anything but plainly held.
    pub async fn event(&mut self) -> Lease {
        self.wait(|l| !matches!(l, Lease::Held | Lease::Pending))
            .await
    }

    /// The lease's deadline as the worker knows it, followed as it moves, for waits that outlive
    /// this handle's borrow.
    pub fn deadline(&self) -> Deadline {
        Deadline(self.kill_at.clone())
    }

    /// Waits until the lease is lost; returns why.
    pub async fn lost(&mut self) -> String {
        match self.wait(|l| matches!(l, Lease::Lost(_))).await {
            Lease::Lost(why) => why,
            _ => unreachable!("waited for a lost lease"),
        }
    }

    /// Waits until the state satisfies `until`, or the kill deadline passes, whichever comes first: the
    /// deadline is kept here, independently of the heartbeat task's progress.
    async fn wait(&mut self, until: impl Fn(&Lease) -> bool) -> Lease {
        let mut state = self.state.clone();
        let changed = async {
            match state.wait_for(|l| until(l)).await {
                Ok(lease) => lease.clone(),
                Err(_) => Lease::Lost("the heartbeat task ended".into()),
            }
        };
        tokio::select! {
            lease = changed => lease,
            why = deadline_passed(self.kill_at.clone()) => Lease::Lost(why),
        }
    }
}

/// Returns once the kill deadline (as it stands at that moment) has passed.
async fn deadline_passed(kill_at: watch::Receiver<Instant>) -> String {
    Deadline(kill_at).passed_by(Duration::ZERO).await;
    "the lease deadline passed without a renewal".into()
}

/// An item's kill deadline (the moment its program must be dead by), followed as renewals and
/// amnesty move it.
#[derive(Clone)]
pub struct Deadline(watch::Receiver<Instant>);

impl Deadline {
    #[cfg(test)]
    pub(crate) fn for_tests(deadline: watch::Receiver<Instant>) -> Deadline {
        Deadline(deadline)
    }

    /// Whether the deadline, as it stands now, has passed.
    pub fn has_passed(&self) -> bool {
        *self.0.borrow() <= Instant::now()
    }

    /// Returns once `after` has passed since the deadline, as the deadline stands at that moment.
    pub async fn passed_by(mut self, after: Duration) {
        loop {
            let at = *self.0.borrow_and_update() + after;
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {
                    if *self.0.borrow() + after <= Instant::now() {
                        return;
                    }
                }
                changed = self.0.changed() => {
                    if changed.is_err() {
                        // The task is gone; the last deadline still holds.
                        tokio::time::sleep_until(at).await;
                        return;
                    }
                }
            }
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The heartbeat loop of one item.
struct Beats<'a, R> {
    renewer: &'a R,
    worker_id: &'a str,
    desired_ttl: Option<u32>,
    /// The zero of the readings handed to [`WorkerLease`].
    origin: Instant,
    state: &'a watch::Sender<Lease>,
    kill_at: &'a watch::Sender<Instant>,
    last_resort: &'a watch::Sender<Instant>,
    trouble: &'a watch::Sender<Option<String>>,
}

impl<R: Renew> Beats<'_, R> {
    fn reading(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.origin)
    }

    /// Says why renewals fail, at the first failure since the last renewal.
    fn failing(&self, why: &str) {
        self.trouble.send_if_modified(|trouble| {
            let first = trouble.is_none();
            if first {
                *trouble = Some(why.to_owned());
            }
            first
        });
    }

    fn publish(&self, lease: &WorkerLease) {
        self.kill_at.send_replace(self.origin + lease.kill_at());
        self.last_resort
            .send_replace(self.origin + lease.last_resort());
    }

    /// Beats until the lease is lost; returns why. `first`: the first heartbeat's answer, when a
    /// claim made it; the next beat then waits for its turn.
    async fn run(&self, mut lease: WorkerLease, first: Option<Beat>) -> String {
        let mut expected = NO_HEARTBEAT.to_owned();
        let mut renewed_once = false;
        if let Some(beat) = first {
            expected = beat.last_heartbeat;
            renewed_once = true;
            let next = self.origin + heartbeat_interval(lease.ttl());
            tokio::time::sleep_until(next.min(self.origin + lease.kill_at())).await;
        }
        let mut last_error = String::from("none");
        // Since the last renewal: a try got no answer, so it may have been accepted unseen; and the
        // connection to use for the next.
        let mut unanswered = false;
        let mut connection = Connection::Pooled;
        loop {
            let sent = Instant::now();
            let Some(timeout) = lease.request_timeout(self.reading(sent)) else {
                return format!(
                    "no successful heartbeat before the lease deadline (last error: {last_error})"
                );
            };
            // Until the server said, the cadence is the longest (§8); the timeout is capped anyway.
            let interval = if renewed_once {
                heartbeat_interval(lease.ttl())
            } else {
                HEARTBEAT_INTERVAL_MAX
            };
            let options = HeartbeatOptions {
                expected_last_heartbeat: Some(expected.clone()),
                desired_ttl_seconds: self.desired_ttl,
                worker_id: Some(self.worker_id.to_owned()),
                timeout: Some(timeout.min(interval)),
            };
            let round = self.round(&options, connection).await;
            if round.unanswered {
                unanswered = true;
                connection = Connection::Fresh;
            }
            let Some((sent, result)) = round.answer else {
                last_error = "no answer in time".into();
                self.failing(&last_error);
                continue;
            };
            let answered_at = Instant::now();
            let wait = match judge(&result) {
                Verdict::Renewed { stopping } => {
                    let beat = result.expect("a renewal is a success");
                    expected = beat.last_heartbeat;
                    lease.renewed(
                        self.reading(sent),
                        Duration::from_secs(beat.ttl_seconds.into()),
                    );
                    renewed_once = true;
                    unanswered = false;
                    connection = Connection::Pooled;
                    self.publish(&lease);
                    self.trouble
                        .send_if_modified(|trouble| trouble.take().is_some());
                    self.state.send_if_modified(|l| {
                        let next = match l {
                            Lease::Pending | Lease::Held if stopping => Lease::StopRequested,
                            Lease::Pending => Lease::Held,
                            _ => return false,
                        };
                        *l = next;
                        true
                    });
                    heartbeat_interval(lease.ttl()).saturating_sub(sent.elapsed())
                }
                Verdict::Lost(why) => return why,
                Verdict::Moved {
                    last_heartbeat,
                    why,
                } => {
                    if !unanswered || last_heartbeat == expected {
                        return why;
                    }
                    // The try that got no answer was accepted: go on from the value it was given.
                    // The lease is renewed only by an answer this worker sees, from that try's send.
                    expected = last_heartbeat;
                    unanswered = false;
                    last_error = "a heartbeat was accepted without an answer".into();
                    continue;
                }
                Verdict::Amnesty(grace) => {
                    if lease.amnesty(self.reading(sent), self.reading(answered_at), grace) {
                        self.publish(&lease);
                    }
                    last_error = "the server's database is unavailable (amnesty promised)".into();
                    self.failing(&last_error);
                    (interval / 4).max(Duration::from_millis(250))
                }
                Verdict::Retry(why) => {
                    last_error = why;
                    self.failing(&last_error);
                    (interval / 4).max(Duration::from_millis(250))
                }
            };
            // Sleep no further than the deadline: the next round notices it has passed.
            let deadline = self.origin + lease.kill_at();
            tokio::time::sleep_until((Instant::now() + wait).min(deadline)).await;
        }
    }

    /// The tries of one beat: the first on `connection`; when it has no answer after
    /// [`hedge_after`] its timeout, a second on a fresh connection beside it. Ends at the first
    /// answer of either, or when the timeout is up (`options.timeout`, within the time left). A
    /// transport failure of one try before the other is sent ends the round (the caller retries
    /// after a pause); once both are under way, only both failing or the timeout does.
    async fn round(&self, options: &HeartbeatOptions, connection: Connection) -> Round {
        let start = Instant::now();
        let timeout = options.timeout.expect("a heartbeat's timeout is set");
        let deadline = start + timeout;
        let hedge_at = start + hedge_after(timeout);
        let first = self.renewer.renew(options.clone(), connection);
        tokio::pin!(first);
        let mut first_failed = None;
        let mut second = None;
        let mut second_failed = None;
        // The client's own timeout should end each call; the deadline below holds even if it does not.
        loop {
            tokio::select! {
                result = &mut first, if first_failed.is_none() => {
                    if answered(&result) {
                        return Round { answer: Some((start, result)), unanswered: second.is_some() };
                    }
                    first_failed = Some((start, result));
                    if second.is_none() {
                        return Round { answer: first_failed, unanswered: true };
                    }
                }
                result = async { second.as_mut().map(|(_, call): &mut (Instant, _)| call).expect("sent").await },
                    if second.is_some() && second_failed.is_none() =>
                {
                    let sent = second.as_ref().map(|(sent, _)| *sent).expect("sent");
                    if answered(&result) {
                        return Round { answer: Some((sent, result)), unanswered: true };
                    }
                    second_failed = Some((sent, result));
                }
                () = tokio::time::sleep_until(hedge_at), if second.is_none() => {
                    let call = Box::pin(self.renewer.renew(options.clone(), Connection::Fresh));
                    second = Some((Instant::now(), call));
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Round { answer: None, unanswered: true };
                }
            }
            if first_failed.is_some() && second_failed.is_some() {
                return Round {
                    answer: second_failed,
                    unanswered: true,
                };
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn beat(state: &str, extended: bool) -> Result<Beat, Error> {
        beat_with_ttl(state, extended, 60)
    }

    fn beat_with_ttl(state: &str, extended: bool, ttl_seconds: u32) -> Result<Beat, Error> {
        Ok(serde_json::from_value(serde_json::json!({
            "type": "work_heartbeat",
            "last_heartbeat": "2026-07-01T08:15:06.120394Z",
            "lease_extended": extended,
            "state": state,
            "ttl_seconds": ttl_seconds,
        }))
        .unwrap())
    }

    /// One scripted answer of the server: after `delay` (on tokio's paused clock), `answer`; a script
    /// that has run out never answers again.
    struct Step {
        delay: Duration,
        answer: Result<Beat, Error>,
    }

    fn at_once(answer: Result<Beat, Error>) -> Step {
        Step {
            delay: Duration::ZERO,
            answer,
        }
    }

    /// When each heartbeat was sent, and the `last_heartbeat` it expected.
    type Sent = std::sync::Arc<std::sync::Mutex<Vec<(Instant, Option<String>)>>>;

    /// The connection each heartbeat went on.
    type Connections = std::sync::Arc<std::sync::Mutex<Vec<Connection>>>;

    /// A server whose heartbeat answers are scripted; it records when each heartbeat was sent, what
    /// it expected and the connection it went on.
    struct Scripted {
        steps: std::sync::Mutex<std::collections::VecDeque<Step>>,
        sent: Sent,
        connections: Connections,
    }

    impl Scripted {
        fn new(steps: Vec<Step>) -> (Scripted, Sent) {
            let (server, sent, _) = Scripted::watching_connections(steps);
            (server, sent)
        }

        fn watching_connections(steps: Vec<Step>) -> (Scripted, Sent, Connections) {
            let sent = Sent::default();
            let connections = Connections::default();
            let server = Scripted {
                steps: std::sync::Mutex::new(steps.into()),
                sent: std::sync::Arc::clone(&sent),
                connections: std::sync::Arc::clone(&connections),
            };
            (server, sent, connections)
        }
    }

    impl Renew for Scripted {
        fn renew(
            &self,
            options: HeartbeatOptions,
            connection: Connection,
        ) -> impl Future<Output = Result<Beat, Error>> + Send {
            self.sent
                .lock()
                .unwrap()
                .push((Instant::now(), options.expected_last_heartbeat.clone()));
            self.connections.lock().unwrap().push(connection);
            let step = self.steps.lock().unwrap().pop_front();
            async move {
                match step {
                    Some(step) => {
                        tokio::time::sleep(step.delay).await;
                        step.answer
                    }
                    None => std::future::pending().await,
                }
            }
        }
    }

    fn unavailable() -> Result<Beat, Error> {
        refused(503)
    }

    /// The provisional lease of an ack sent at the test's start.
    fn provisional() -> WorkerLease {
        WorkerLease::acknowledged(Duration::ZERO, PROVISIONAL_TTL)
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_answers_never_lets_the_program_start() {
        let acked = Instant::now();
        let (server, sent) = Scripted::new(vec![]);
        let mut lease = Heartbeat::start(server, "w".into(), None, acked);
        let Lease::Lost(why) = lease.established().await else {
            panic!("a lease nobody renewed was taken as held");
        };
        assert!(why.contains("deadline"), "{why}");
        // Given up by the provisional deadline, counted from the send of the ack, and not before.
        assert_eq!(acked.elapsed(), provisional().kill_at());
        let sent = sent.lock().unwrap();
        assert_eq!(sent[0], (acked, Some(NO_HEARTBEAT.to_owned())));
    }

    /// A claim's answer made the first heartbeat: the lease is held at once, with the deadline the
    /// claim's send gives, and the next beat goes out one interval after that send and echoes the
    /// claim's `last_heartbeat`; with no answer to it, the lease is lost at that deadline.
    #[tokio::test(start_paused = true)]
    async fn a_claimed_lease_is_held_at_once_and_renewed_from_the_claims_heartbeat() {
        const TTL: u32 = 20;
        let sent_claim = Instant::now();
        tokio::time::advance(Duration::from_millis(300)).await;
        let first = beat_with_ttl("active", true, TTL).unwrap();
        let (server, sent) = Scripted::new(vec![]);
        let mut lease = Heartbeat::start_claimed(server, "w".into(), Some(TTL), sent_claim, first);
        assert_eq!(lease.established().await, Lease::Held);
        assert!(sent.lock().unwrap().is_empty(), "a beat before its turn");
        let why = lease.lost().await;
        assert!(why.contains("deadline"), "{why}");
        let claimed = WorkerLease::acknowledged(Duration::ZERO, Duration::from_secs(TTL.into()));
        assert_eq!(sent_claim.elapsed(), claimed.kill_at());
        let sent = sent.lock().unwrap();
        let interval = heartbeat_interval(Duration::from_secs(TTL.into()));
        assert_eq!(
            sent[0],
            (
                sent_claim + interval,
                Some("2026-07-01T08:15:06.120394Z".to_owned())
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_that_holds_no_lease_runs_nothing_and_beats_for_nothing() {
        let (server, sent) = Scripted::new(vec![]);
        let first = beat("stopped", true).unwrap();
        let mut lease = Heartbeat::start_claimed(server, "w".into(), None, Instant::now(), first);
        let Lease::Lost(why) = lease.established().await else {
            panic!("a stopped item's claim was taken as a lease");
        };
        assert!(why.contains("stopped"), "{why}");
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(sent.lock().unwrap().is_empty());

        let (server, _) = Scripted::new(vec![]);
        let first = beat("stopping", true).unwrap();
        let mut lease = Heartbeat::start_claimed(server, "w".into(), None, Instant::now(), first);
        assert_eq!(lease.established().await, Lease::StopRequested);
    }

    /// A claimed item taken up only after its lease ran out, as the worker reckons it, runs nothing
    /// and is not beaten for: a program started then would outlive its lease at once.
    #[tokio::test(start_paused = true)]
    async fn a_claimed_lease_that_ran_out_before_it_was_taken_up_runs_nothing() {
        const TTL: u32 = 20;
        let sent_claim = Instant::now();
        let claimed = WorkerLease::acknowledged(Duration::ZERO, Duration::from_secs(TTL.into()));
        tokio::time::advance(claimed.kill_at() + Duration::from_secs(1)).await;
        let (server, sent) = Scripted::new(vec![]);
        let first = beat_with_ttl("active", true, TTL).unwrap();
        let mut lease = Heartbeat::start_claimed(server, "w".into(), Some(TTL), sent_claim, first);
        // Lost from the start, not only by a wait that happens to see the deadline first (a wait
        // races the state against the deadline, and a state still held could win it).
        let Lease::Lost(why) = lease.state.borrow().clone() else {
            panic!("a lease past its deadline was taken as held");
        };
        assert!(why.contains("ran out before"), "{why}");
        assert!(matches!(lease.established().await, Lease::Lost(_)));
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(sent.lock().unwrap().is_empty());

        // Taken up before the deadline, it is still held.
        let sent_claim = Instant::now();
        tokio::time::advance(claimed.kill_at() - Duration::from_secs(5)).await;
        let (server, _) = Scripted::new(vec![]);
        let first = beat_with_ttl("active", true, TTL).unwrap();
        let mut lease = Heartbeat::start_claimed(server, "w".into(), Some(TTL), sent_claim, first);
        assert_eq!(lease.established().await, Lease::Held);

        // A lease whose stop was asked for runs out the same way, and the deadline itself is late.
        let stopping = beat_with_ttl("stopping", true, TTL).unwrap();
        let active = beat_with_ttl("active", true, TTL).unwrap();
        for (first, past) in [(stopping, Duration::from_secs(1)), (active, Duration::ZERO)] {
            let sent_claim = Instant::now();
            tokio::time::advance(claimed.kill_at() + past).await;
            let (server, _) = Scripted::new(vec![]);
            let lease = Heartbeat::start_claimed(server, "w".into(), Some(TTL), sent_claim, first);
            let state = lease.state.borrow().clone();
            assert!(matches!(state, Lease::Lost(_)), "{past:?} past: {state:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_come_at_the_cores_interval_and_the_deadline_follows_the_last_send() {
        const TTL: u32 = 20;
        const ROUND_TRIP: Duration = Duration::from_millis(300);
        let acked = Instant::now();
        let renewals = 4;
        let steps = (0..renewals)
            .map(|_| Step {
                delay: ROUND_TRIP,
                answer: beat_with_ttl("active", true, TTL),
            })
            .collect();
        let (server, sent) = Scripted::new(steps);
        let mut lease = Heartbeat::start(server, "w".into(), Some(TTL), acked);
        assert_eq!(lease.established().await, Lease::Held);
        let why = lease.lost().await;
        assert!(why.contains("deadline"), "{why}");
        let lost_at = acked.elapsed();

        let sent = sent.lock().unwrap();
        let interval = heartbeat_interval(Duration::from_secs(TTL.into()));
        // The first beat goes out at once and expects no earlier heartbeat; each later one echoes the
        // answer and leaves one interval after the send of the one before.
        assert_eq!(sent[0], (acked, Some(NO_HEARTBEAT.to_owned())));
        for pair in sent[..renewals].windows(2) {
            assert_eq!(pair[1].0 - pair[0].0, interval);
            assert_eq!(pair[1].1.as_deref(), Some("2026-07-01T08:15:06.120394Z"));
        }
        // The core's arithmetic, fed the same sends, gives the moment the program had to be dead by.
        let mut model = provisional();
        for (at, _) in &sent[..renewals] {
            model.renewed(*at - acked, Duration::from_secs(TTL.into()));
        }
        assert_eq!(lost_at, model.kill_at());
        assert!(lost_at < (sent[renewals - 1].0 - acked) + Duration::from_secs(TTL.into()));
    }

    #[tokio::test(start_paused = true)]
    async fn answers_that_fail_fast_then_hang_lose_the_lease_at_the_deadline_of_the_last_renewal() {
        let acked = Instant::now();
        let mut steps = vec![at_once(beat_with_ttl("active", true, 10))];
        steps.extend((0..5).map(|_| at_once(unavailable())));
        let (server, sent) = Scripted::new(steps);
        let mut lease = Heartbeat::start(server, "w".into(), None, acked);
        assert_eq!(lease.established().await, Lease::Held);
        lease.lost().await;
        let mut model = provisional();
        model.renewed(Duration::ZERO, Duration::from_secs(10));
        assert_eq!(acked.elapsed(), model.kill_at());
        // The failures were retried while the lease lasted (one every quarter interval).
        assert!(sent.lock().unwrap().len() >= 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_request_is_told_to_the_supervisor_and_the_lease_is_kept() {
        let acked = Instant::now();
        let (server, _) = Scripted::new(vec![
            at_once(beat_with_ttl("active", true, 30)),
            at_once(beat_with_ttl("stopping", true, 30)),
            at_once(beat_with_ttl("stopping", true, 30)),
        ]);
        let mut lease = Heartbeat::start(server, "w".into(), None, acked);
        assert_eq!(lease.established().await, Lease::Held);
        assert_eq!(lease.event().await, Lease::StopRequested);
        // Renewed at least twice: the deadline is past the first renewal's.
        let first = {
            let mut model = provisional();
            model.renewed(Duration::ZERO, Duration::from_secs(30));
            model.kill_at()
        };
        assert!(*lease.kill_at.borrow() > acked + first);
    }

    #[tokio::test(start_paused = true)]
    async fn a_promised_amnesty_keeps_the_program_past_its_lease_and_no_further() {
        let acked = Instant::now();
        let outage = outage(60_000);
        let mut steps = vec![at_once(beat_with_ttl("active", true, 10))];
        steps.extend((0..400).map(|_| at_once(Err(outage.clone().into()))));
        let (server, sent) = Scripted::new(steps);
        let mut lease = Heartbeat::start(server, "w".into(), None, acked);
        assert_eq!(lease.established().await, Lease::Held);
        lease.lost().await;
        let lost_at = acked.elapsed();
        // The same answers fed to the core's arithmetic.
        let mut model = provisional();
        model.renewed(Duration::ZERO, Duration::from_secs(10));
        let without_amnesty = model.kill_at();
        // Only the answered ones: after the script, heartbeats go unanswered.
        for (at, _) in sent.lock().unwrap().iter().skip(1).take(400) {
            model.amnesty(*at - acked, *at - acked, Duration::from_secs(60));
        }
        assert!(lost_at > without_amnesty, "the promise was not taken");
        assert_eq!(lost_at, model.kill_at());
    }

    fn refused(status: u16) -> Result<Beat, Error> {
        Err(refusal(status))
    }

    /// An accepted heartbeat that hands out `last_heartbeat`, with a lease of 10 s.
    fn beat_giving(last_heartbeat: &str) -> Result<Beat, Error> {
        let mut beat = beat_with_ttl("active", true, 10).unwrap();
        beat.last_heartbeat = last_heartbeat.to_owned();
        Ok(beat)
    }

    /// The 412 of a heartbeat whose expectation no longer holds: the lease's `last_heartbeat` is now
    /// `current`.
    fn moved_to(current: &str) -> Result<Beat, Error> {
        Err(tether_client::ApiError {
            status: 412,
            kind: "precondition_failed_error".into(),
            message: "expected_last_heartbeat does not match the current lease".into(),
            param: None,
            code: Some("lease_mismatch".into()),
            details: Some(serde_json::json!({
                "error_code": "heartbeat_precondition_failed",
                "current_state": {"state": "active", "ttl_seconds": 10, "last_heartbeat": current},
            })),
            request_id: None,
        }
        .into())
    }

    /// A try the server never answers (within any lease).
    fn hangs() -> Step {
        Step {
            delay: Duration::from_secs(3_600),
            answer: beat_giving("never seen"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_stuck_on_a_dead_connection_is_sent_again_beside_it_on_a_fresh_one() {
        let acked = Instant::now();
        let (server, sent, connections) = Scripted::watching_connections(vec![
            at_once(beat_giving("A")),
            hangs(),
            at_once(beat_giving("B")),
            at_once(beat_giving("C")),
        ]);
        let mut lease = Heartbeat::start(server, "w".into(), None, acked);
        assert_eq!(lease.established().await, Lease::Held);
        // Past the first renewal's deadline (8.9 s), and past the beat after the second renewal.
        tokio::time::sleep_until(acked + Duration::from_secs(13)).await;
        assert!(matches!(*lease.state.borrow(), Lease::Held));
        assert_eq!(
            *connections.lock().unwrap(),
            [
                Connection::Pooled,
                Connection::Pooled,
                Connection::Fresh,
                Connection::Pooled
            ]
        );
        let sent = sent.lock().unwrap();
        // The beat due at 5 s had 3.9 s: the second try went out half-way, and the next beat one
        // interval after the send of the one that renewed.
        let times: Vec<_> = sent.iter().map(|(at, _)| *at - acked).collect();
        assert_eq!(
            times,
            [
                Duration::ZERO,
                Duration::from_secs(5),
                Duration::from_millis(6_950),
                Duration::from_millis(11_950)
            ]
        );
        let expected: Vec<_> = sent.iter().map(|(_, e)| e.as_deref().unwrap()).collect();
        assert_eq!(expected, [NO_HEARTBEAT, "A", "A", "B"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_is_taken_while_the_second_try_beside_it_waits() {
        let acked = Instant::now();
        let (server, sent) = Scripted::new(vec![
            at_once(beat_giving("A")),
            // Answered after 2.5 s: past the second try's start, within the time left.
            Step {
                delay: Duration::from_millis(2_500),
                answer: beat_giving("B"),
            },
            hangs(),
            at_once(beat_giving("C")),
        ]);
        let mut lease = Heartbeat::start(server, "w".into(), None, acked);
        assert_eq!(lease.established().await, Lease::Held);
        tokio::time::sleep_until(acked + Duration::from_secs(11)).await;
        assert!(matches!(*lease.state.borrow(), Lease::Held));
        let sent = sent.lock().unwrap();
        // Renewed from the send of the slow try (5 s): the next beat went out at 10 s.
        let times: Vec<_> = sent.iter().map(|(at, _)| *at - acked).collect();
        assert_eq!(times[3], Duration::from_secs(10));
        assert_eq!(sent[3].1.as_deref(), Some("B"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_accepted_without_an_answer_is_taken_up_from_the_412_that_follows() {
        let acked = Instant::now();
        let (server, sent) = Scripted::new(vec![
            at_once(beat_giving("A")),
            // Accepted as "B", but its answer never comes.
            hangs(),
            at_once(moved_to("B")),
            at_once(beat_giving("C")),
            at_once(beat_giving("D")),
        ]);
        let mut lease = Heartbeat::start(server, "w".into(), None, acked);
        assert_eq!(lease.established().await, Lease::Held);
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert!(matches!(*lease.state.borrow(), Lease::Held));
        let sent = sent.lock().unwrap();
        let expected: Vec<_> = sent.iter().map(|(_, e)| e.as_deref().unwrap()).collect();
        assert_eq!(expected, [NO_HEARTBEAT, "A", "A", "B", "C"]);
        // Taken up at once: the try with "B" went out with the 412's answer.
        assert_eq!(sent[3].0, sent[2].0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_412_is_a_lost_lease_when_every_try_was_answered_or_once_taken_up() {
        // Runs `script`; returns how many heartbeats went out before the lease was lost.
        async fn lost_after(script: Vec<Step>) -> usize {
            let (server, sent) = Scripted::new(script);
            let mut lease = Heartbeat::start(server, "w".into(), None, Instant::now());
            assert_eq!(lease.established().await, Lease::Held);
            let why = lease.lost().await;
            assert!(why.contains("another heartbeat holds the lease"), "{why}");
            let sent = sent.lock().unwrap().len();
            sent
        }
        // Every try answered: someone else moved the lease.
        assert_eq!(
            lost_after(vec![at_once(beat_giving("A")), at_once(moved_to("B"))]).await,
            2
        );
        // Taken up once, refused again: the lease is another's.
        let script = vec![
            at_once(beat_giving("A")),
            hangs(),
            at_once(moved_to("B")),
            at_once(moved_to("B")),
        ];
        assert_eq!(lost_after(script).await, 4);
    }

    /// The 503 of a server whose database is away, promising `amnesty_ms` of lease amnesty.
    pub(crate) fn outage(amnesty_ms: u64) -> tether_client::ApiError {
        tether_client::ApiError {
            status: 503,
            kind: "overloaded_error".into(),
            message: "the database is unavailable".into(),
            param: None,
            code: Some("store_unavailable".into()),
            details: Some(serde_json::json!({ "lease_amnesty_ms": amnesty_ms })),
            request_id: None,
        }
    }

    /// The server's refusal with `status`, as the client reports it.
    pub(crate) fn refusal(status: u16) -> Error {
        refusal_with_code(status, None)
    }

    /// A refusal of `status` whose envelope names `code`.
    pub(crate) fn refusal_with_code(status: u16, code: Option<&str>) -> Error {
        tether_client::ApiError {
            status,
            kind: "x".into(),
            message: "no".into(),
            param: None,
            code: code.map(str::to_owned),
            details: None,
            request_id: Some("req_1".into()),
        }
        .into()
    }

    #[test]
    fn answers_are_judged_as_the_worker_protocol_says() {
        assert_eq!(
            judge(&beat("active", true)),
            Verdict::Renewed { stopping: false }
        );
        assert_eq!(
            judge(&beat("stopping", true)),
            Verdict::Renewed { stopping: true }
        );
        assert!(matches!(judge(&beat("active", false)), Verdict::Lost(_)));
        assert!(matches!(judge(&beat("stopped", true)), Verdict::Lost(_)));
        for lost in [401, 403, 404, 409, 412, 400] {
            assert!(matches!(judge(&refused(lost)), Verdict::Lost(_)), "{lost}");
        }
        let mut outage = outage(30_000);
        assert_eq!(
            judge(&Err(outage.clone().into())),
            Verdict::Amnesty(Duration::from_secs(30))
        );
        // A heartbeat that may have been applied as the server lost its database: the same promise.
        let mut unknown = outage.clone();
        unknown.code = Some("store_outcome_unknown".into());
        assert_eq!(
            judge(&Err(unknown.into())),
            Verdict::Amnesty(Duration::from_secs(30))
        );
        // Without the promise (or with a malformed one) a 503 is only worth another try.
        outage.details = Some(serde_json::json!({"lease_amnesty_ms": "soon"}));
        assert!(matches!(
            judge(&Err(outage.clone().into())),
            Verdict::Retry(_)
        ));
        outage.details = Some(serde_json::json!({"lease_amnesty_ms": 30_000}));
        outage.code = Some("busy".into());
        assert!(matches!(judge(&Err(outage.into())), Verdict::Retry(_)));
        let tls = Error::Tls {
            url: "https://server.example/x".into(),
            reason: "the server's certificate was refused: UnknownIssuer".into(),
        };
        assert!(matches!(judge(&Err(tls)), Verdict::Lost(_)));
        for transient in [408, 429, 500, 502, 503] {
            assert!(
                matches!(judge(&refused(transient)), Verdict::Retry(_)),
                "{transient}"
            );
        }
    }
}
