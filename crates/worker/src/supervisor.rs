//! One claimed item from acknowledgement to its end (§8 steps 2–5): ack with the Worker-ID, start the
//! heartbeat, run PROGRAM, and end the item the way its ending calls for.
//!
//! | ending                          | program                          | item                              |
//! |---------------------------------|----------------------------------|-----------------------------------|
//! | the program exits               | –                                | exit status in metadata, force stop |
//! | the server asks for a stop      | SIGTERM, grace, SIGKILL          | exit status in metadata, plain stop (confirm) |
//! | the lease is lost               | SIGKILL at once                  | left alone: it is someone else's  |
//! | the worker's drain time is up   | SIGTERM, grace, SIGKILL          | stop requested, exit status, stop confirmed |
//! | the worker is forced to quit    | SIGKILL at once                  | force stop                        |

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tether_client::{Client, MetadataPatch, WorkItem, WorkState};
use tether_core::work;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::backoff::{retry, Backoff};
use crate::chain::{NextClaim, StopCarried};
use crate::claim::{is_plain_name, NOT_A_PLAIN_NAME};
use crate::heartbeat::{Connection, Deadline, Heartbeat, ItemLease, Lease, Renew};
use crate::program::{Confined, Exit, Running};
use crate::proxy::ApiProxy;
use crate::sandbox::Sandbox;
use crate::status::Outcome;
use crate::{reached, Phase, Shared};

/// What follows a PROGRAM that ended well ([`Item::stop_unless_turn_open`]).
enum AfterExit {
    /// The item is ended (or could not be, and was said so).
    Ended,
    /// A turn came while PROGRAM was ending: it runs again.
    RunAgain,
    /// The turn was left open by a run that did nothing: stop the item regardless.
    Stop,
}

/// How the worker took an item.
pub enum Taken {
    /// Delivered by a poll: the worker acks it, and its first heartbeat starts the lease.
    Polled,
    /// Claimed (`POST …/work/claim`) by a request sent at `sent`, which made the first heartbeat:
    /// `first` is its answer.
    Claimed {
        sent: tokio::time::Instant,
        first: tether_client::Heartbeat,
    },
}

/// Serves `item`, taken as `taken` says, holding `slot` (one unit of `--concurrency`) until it is
/// done; then, in the same slot, each item that the claim sent with an item's stop brought
/// ([`crate::chain`]).
pub async fn serve(shared: Arc<Shared>, item: WorkItem, taken: Taken, slot: OwnedSemaphorePermit) {
    let mut next = Some((item, taken));
    while let Some((item, taken)) = next.take() {
        let work_id = item.id.clone();
        let (mut calls, token) = HttpItem::new(&shared, &item);
        calls.next = NextClaim::for_item(&shared, &taken, token.as_deref()).map(Arc::new);
        let chained = calls.next.clone();
        let outcome = Item::new(&shared, &item, calls, token)
            .run(item.clone(), taken)
            .await;
        if let Some(dirs) = &shared.workdirs {
            if let Err(e) = dirs.finish(&work_id) {
                shared.report.warn(
                    "cannot remove the item's working directory",
                    &[("work_id", &work_id), ("error", &e.to_string())],
                );
            }
        }
        shared.report.finished(&work_id, outcome);
        next = chained.and_then(|chained| chained.take_brought());
        if let Some((item, _)) = next.as_ref().filter(|(item, _)| !is_plain_name(&item.id)) {
            // As the claim loop does: its lease lapses, and it goes back to the queue.
            shared
                .report
                .warn(NOT_A_PLAIN_NAME, &[("work_id", &format!("{:?}", item.id))]);
            next = None;
        }
    }
    drop(slot);
}

enum Ending {
    Exited(Exit),
    StopRequested,
    Lost(String),
    Shutdown,
}

/// How a termination (SIGTERM, grace, SIGKILL) came out.
enum Terminated {
    Exited(Exit),
    Lost(String),
}

/// The calls one item makes to the server after its claim. The worker's are [`HttpItem`]; the unit
/// tests below script the server's answers on tokio's paused clock.
pub(crate) trait ItemCalls: Send + Sync + 'static {
    /// The heartbeat call, owned by the item's lease.
    type Lease: Renew;

    /// The acknowledgement, with the Worker-ID.
    fn ack(&self) -> impl Future<Output = tether_client::Result<()>> + Send;
    /// A graceful stop (or its confirmation), or a forced one; the item's state afterwards.
    fn stop(&self, force: bool) -> impl Future<Output = tether_client::Result<WorkState>> + Send;
    /// A forced stop, refused while the session has a turn open ([`tether_client::Error::turn_left_open`]).
    fn stop_unless_turn_open(
        &self,
    ) -> impl Future<Output = tether_client::Result<WorkState>> + Send;
    /// A merge patch of the item's metadata.
    fn record(
        &self,
        patch: &MetadataPatch,
    ) -> impl Future<Output = tether_client::Result<()>> + Send;
    fn lease(&self) -> Self::Lease;
}

/// An item's calls over HTTP: the ack with the environment key, the rest with the item's session
/// token. Each is given [`ITEM_CALL_TIMEOUT`]; once one of them went without an answer, the rest go on
/// fresh connections.
pub(crate) struct HttpItem {
    /// Carries the environment key.
    environment_client: Client,
    /// Carries the item's session token (the environment key when the item has none).
    client: Client,
    environment_id: String,
    work_id: String,
    worker_id: String,
    /// A call of this item got no answer (a timeout, a connection lost). The pooled connections may
    /// be dead without a word (a NAT or a failover forgot them): a retry on one of them would hang
    /// as long again.
    unanswered: AtomicBool,
    /// The claim a forced stop carries, where it may ([`crate::chain`]).
    next: Option<Arc<NextClaim>>,
}

/// How long one call of an item other than its heartbeat (the ack, the exit's record, the stop) is
/// given before it is tried again (on a fresh connection): the server answers these at once, or
/// within a couple of seconds with a 503 when its database is away. The client's 30 s would keep a
/// finished item waiting that long on a connection lost on the way, each time.
pub(crate) const ITEM_CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl HttpItem {
    /// The calls of `item`, and its session token (handed on to PROGRAM).
    fn new(shared: &Shared, item: &WorkItem) -> (HttpItem, Option<String>) {
        let (client, token) = match item.decode_secret() {
            Ok(Some(secret)) => (
                shared.client.with_token(secret.sessions_token.clone()),
                Some(secret.sessions_token),
            ),
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    _ => "no secret".to_owned(),
                };
                shared.report.warn(
                    "the item carries no usable session token; its calls use the environment key",
                    &[("work_id", &item.id), ("error", &why)],
                );
                (shared.client.clone(), None)
            }
        };
        let calls = HttpItem {
            environment_client: shared.client.with_timeout(ITEM_CALL_TIMEOUT),
            client: client.with_timeout(ITEM_CALL_TIMEOUT),
            environment_id: shared.environment_id.clone(),
            work_id: item.id.clone(),
            worker_id: shared.worker_id.clone(),
            unanswered: AtomicBool::new(false),
            next: None,
        };
        (calls, token)
    }

    /// `client`, or the same on fresh connections once a call of this item went unanswered.
    fn over(&self, client: &Client) -> Client {
        let connection = match self.unanswered.load(Ordering::Relaxed) {
            true => Connection::Fresh,
            false => Connection::Pooled,
        };
        connection.of(client)
    }

    /// The item's forced stop sent with the claim of the next ([`crate::chain`]), where it may
    /// go so: its answer, or `None` when the stop is to go on its own (it may not, or the server
    /// did not make it).
    async fn stop_with_next_claim(
        &self,
        unless_turn_open: bool,
    ) -> Option<tether_client::Result<WorkState>> {
        let next = self.next.as_ref().filter(|n| n.carries_the_stop())?;
        let client = self.over(&self.environment_client);
        match next
            .stop_then_claim(&client, &self.work_id, unless_turn_open)
            .await
        {
            StopCarried::Answered(answer) => Some(self.heard(answer)),
            StopCarried::Left => None,
        }
    }

    /// Notes whether `result` came with the server's answer.
    fn heard<T>(&self, result: tether_client::Result<T>) -> tether_client::Result<T> {
        if !crate::error::answered(&result) {
            self.unanswered.store(true, Ordering::Relaxed);
        }
        result
    }
}

impl ItemCalls for HttpItem {
    type Lease = ItemLease;

    async fn ack(&self) -> tether_client::Result<()> {
        let answer = self
            .over(&self.environment_client)
            .ack_work(&self.environment_id, &self.work_id, Some(&self.worker_id))
            .await;
        self.heard(answer).map(drop)
    }

    async fn stop(&self, force: bool) -> tether_client::Result<WorkState> {
        if force {
            if let Some(answer) = self.stop_with_next_claim(false).await {
                return answer;
            }
        }
        let answer = self
            .over(&self.client)
            .stop_work(&self.environment_id, &self.work_id, force)
            .await;
        self.heard(answer).map(|item| item.state)
    }

    async fn stop_unless_turn_open(&self) -> tether_client::Result<WorkState> {
        if let Some(answer) = self.stop_with_next_claim(true).await {
            return answer;
        }
        let answer = self
            .over(&self.client)
            .stop_work_unless_turn_open(&self.environment_id, &self.work_id)
            .await;
        self.heard(answer).map(|item| item.state)
    }

    async fn record(&self, patch: &MetadataPatch) -> tether_client::Result<()> {
        let answer = self
            .over(&self.client)
            .update_work_metadata(&self.environment_id, &self.work_id, patch)
            .await;
        self.heard(answer).map(drop)
    }

    fn lease(&self) -> ItemLease {
        ItemLease {
            client: self.client.clone(),
            environment_id: self.environment_id.clone(),
            work_id: self.work_id.clone(),
        }
    }
}

struct Item<'a, C> {
    shared: &'a Shared,
    work_id: String,
    calls: C,
    /// The item's session token, for PROGRAM.
    token: Option<String>,
    phase: watch::Receiver<Phase>,
    /// Whether no program of this item is being terminated: the calls made alongside a termination
    /// start their shutdown bound only once the program has ended.
    program_gone: watch::Sender<bool>,
    /// The bound the calls that end the item share once the drain time is up
    /// ([`SHUTDOWN_EXCHANGE_LIMIT`]), and the one after a second signal ([`FORCED_EXCHANGE_LIMIT`]);
    /// set by the first call that needs it.
    shutdown_until: Mutex<Option<tokio::time::Instant>>,
    forced_until: Mutex<Option<tokio::time::Instant>>,
}

impl<'a, C: ItemCalls> Item<'a, C> {
    fn new(shared: &'a Shared, item: &WorkItem, calls: C, token: Option<String>) -> Item<'a, C> {
        Item {
            shared,
            work_id: item.id.clone(),
            calls,
            token,
            phase: shared.phase.clone(),
            program_gone: watch::channel(true).0,
            shutdown_until: Mutex::new(None),
            forced_until: Mutex::new(None),
        }
    }

    fn info(&self, message: &str, fields: &[(&str, &str)]) {
        let mut all = vec![("work_id", self.work_id.as_str())];
        all.extend_from_slice(fields);
        self.shared.report.info(message, &all);
    }

    fn warn(&self, message: &str, fields: &[(&str, &str)]) {
        let mut all = vec![("work_id", self.work_id.as_str())];
        all.extend_from_slice(fields);
        self.shared.report.warn(message, &all);
    }

    async fn run(mut self, item: WorkItem, taken: Taken) -> Outcome {
        self.info(
            "claimed",
            &[("type", &item.data.kind), ("id", &item.data.id)],
        );
        let acked = tokio::time::Instant::now();
        if matches!(taken, Taken::Polled) && !self.ack().await {
            return Outcome::Skipped;
        }
        if item.data.kind != "session" {
            // D-12: not ours to understand; nothing else will run it either.
            self.warn(
                "unknown work type: stopping it without running anything",
                &[("type", &item.data.kind)],
            );
            self.stop(true, &Tries::Few(5)).await;
            return Outcome::Skipped;
        }
        // Before anything slow: the provisional lease of the ack is short.
        let (renewer, worker_id, ttl) = (
            self.calls.lease(),
            self.shared.worker_id.clone(),
            self.shared.desired_ttl,
        );
        let mut lease = match taken {
            Taken::Polled => Heartbeat::start(renewer, worker_id, ttl, acked),
            Taken::Claimed { sent, first } => {
                Heartbeat::start_claimed(renewer, worker_id, ttl, sent, first)
            }
        };
        let report = self.shared.report.clone();
        let work_id = self.work_id.clone();
        lease.on_trouble(move |trouble| match trouble {
            Some(why) => report.warn(
                "heartbeat failed; trying again until the lease's deadline",
                &[("work_id", &work_id), ("error", why)],
            ),
            None => report.info("heartbeats get through again", &[("work_id", &work_id)]),
        });
        // The program starts only under a lease whose deadline the worker knows: after the first
        // accepted heartbeat (one round trip).
        let established = lease.established().await;
        if *self.phase.borrow() >= Phase::Terminating {
            return self.shut_down_before_start().await;
        }
        if let Some(outcome) = self.ended_before_start(established).await {
            return outcome;
        }
        // The turn PROGRAM last ran again for, found open at its end (`stop_unless_turn_open`).
        let mut ran_again_for = None;
        loop {
            let mut running = match self.start_program(&mut lease, || self.spawn(&item)).await {
                Ok(running) => running,
                Err(outcome) => return outcome,
            };
            self.shared.report.started(&self.work_id);
            self.info(
                "program started",
                &[
                    // The group's, not PROGRAM's own pid: a guard or bwrap leads it, and the group
                    // is what reaches PROGRAM and all it started (`kill -- -<group>`).
                    ("process_group", &running.pid.to_string()),
                    ("session_id", &item.data.id),
                ],
            );
            let ending = tokio::select! {
                exit = running.wait() => Ending::Exited(exit),
                event = lease.event() => match event {
                    Lease::StopRequested => Ending::StopRequested,
                    Lease::Lost(why) => Ending::Lost(why),
                    Lease::Held | Lease::Pending => unreachable!("event() waits for a change"),
                },
                _ = reached(&mut self.phase, Phase::Terminating) => Ending::Shutdown,
            };
            return match ending {
                Ending::Exited(exit) => {
                    match exit.reason.filter(|_| !exit.success()) {
                        Some(reason) => self.info(
                            "program exited",
                            &[("status", &exit.describe()), ("reason", reason)],
                        ),
                        None => self.info("program exited", &[("status", &exit.describe())]),
                    }
                    // The program is gone: nothing is at risk in trying for as long as its lease may
                    // still be alive, so that its run is not lost to a server that is away meanwhile.
                    let tries = Tries::WhileLeased(lease.deadline());
                    self.record_exit(exit, &tries).await;
                    if exit.success() && *self.phase.borrow() < Phase::Terminating {
                        match self.stop_unless_turn_open(&tries, &mut ran_again_for).await {
                            AfterExit::Ended => return outcome_of(exit),
                            AfterExit::RunAgain => continue,
                            AfterExit::Stop => {}
                        }
                    }
                    self.stop(true, &tries).await;
                    outcome_of(exit)
                }
                Ending::Lost(why) => self.abandon(&mut running, &why).await,
                Ending::StopRequested => {
                    self.info(
                        "stop requested: sending SIGTERM to the program",
                        &[("grace", &seconds(self.shared.grace))],
                    );
                    // The server asked: the stop that ends it is a confirmation.
                    self.wind_down(&mut running, &mut lease, std::future::ready(true))
                        .await
                }
                Ending::Shutdown if *self.phase.borrow() == Phase::Forced => {
                    let exit = running.kill().await;
                    self.warn(
                        "forced shutdown: program killed",
                        &[("status", &exit.describe())],
                    );
                    self.record_exit(exit, &Tries::Few(1)).await;
                    self.stop(true, &Tries::Few(1)).await;
                    Outcome::Failed
                }
                Ending::Shutdown => {
                    self.info(
                        "drain time is up: sending SIGTERM to the program",
                        &[("grace", &seconds(self.shared.grace))],
                    );
                    // Asked, so that the server shows the item winding down rather than active; asked
                    // while the program is being terminated, not before, so that a server that does
                    // not answer delays neither the SIGTERM nor the SIGKILL after the grace.
                    self.wind_down(&mut running, &mut lease, self.stop(false, &Tries::Few(1)))
                        .await
                }
            };
        }
    }

    /// What a change of the lease means before the program has started: nothing while it is held;
    /// otherwise the item's end, without its program.
    async fn ended_before_start(&self, lease: Lease) -> Option<Outcome> {
        match lease {
            Lease::Held => None,
            Lease::Pending => unreachable!("only a first answer or a change is looked at"),
            Lease::Lost(why) => {
                self.warn("lease lost before the program started", &[("reason", &why)]);
                Some(Outcome::Lost)
            }
            Lease::StopRequested => {
                self.info("stop requested before the program started", &[]);
                self.stop(false, &Tries::Few(5)).await;
                Some(Outcome::Skipped)
            }
        }
    }

    async fn shut_down_before_start(&self) -> Outcome {
        self.warn("the worker is shutting down: stopping the item unrun", &[]);
        self.stop(true, &Tries::Few(1)).await;
        Outcome::Skipped
    }

    /// Starts the program with `spawn`. A shortage that passes (of processes, open files or memory)
    /// is waited out, the lease kept, for up to [`SPAWN_PATIENCE`]; after that the item is left for
    /// its lease to expire, and the server hands it out again, here or to another worker. Stopping
    /// it would end a session for a moment's want of this machine's. So is a PROGRAM that cannot run
    /// (removed, replaced, made non-executable since the item was taken: a deploy replacing it).
    /// Any other failure is the item's: recorded in its metadata, and the item stopped.
    ///
    /// The dead man's switch comes with the program: armed just before each try (so that the
    /// kernel ends a worker that cannot act by the lease's deadline, and the program with it),
    /// disarmed when the try fails, before any call to the server, and otherwise held by the
    /// program, which disarms it once it is killed ([`Running::wait`]).
    async fn start_program(
        &self,
        lease: &mut Heartbeat,
        mut spawn: impl FnMut() -> std::io::Result<Running>,
    ) -> Result<Running, Outcome> {
        let first_try = tokio::time::Instant::now();
        let mut backoff = Backoff::call();
        let mut phase = self.phase.clone();
        let mut told_cannot_run = false;
        loop {
            let (why, delay) = match crate::claim::cannot_run(self.shared) {
                Some(why) => {
                    if !told_cannot_run {
                        self.warn(
                            "PROGRAM cannot run: holding the item, its lease kept, until it can",
                            &[("reason", &why)],
                        );
                        told_cannot_run = true;
                    }
                    // Looked at again soon, quietly: a deploy replacing it takes moments.
                    (why, None)
                }
                None => {
                    let dead_man = self.shared.dead_mans_switch.then(|| lease.dead_man());
                    let error = match spawn() {
                        Ok(mut running) => {
                            running.arm(dead_man);
                            return Ok(running);
                        }
                        Err(error) => error,
                    };
                    drop(dead_man);
                    if crate::claim::cannot_run(self.shared).is_some() {
                        // PROGRAM went between the look and the spawn: held as above.
                        continue;
                    }
                    let why = error.to_string();
                    if !is_passing_shortage(&error) {
                        self.warn("cannot start PROGRAM", &[("error", &why)]);
                        let error = [("tether.error", Some(why.as_str()))];
                        self.record(&error, &Tries::Few(3)).await;
                        self.stop(true, &Tries::Few(5)).await;
                        return Err(Outcome::Failed);
                    }
                    (why, Some(backoff.next_delay()))
                }
            };
            if first_try.elapsed() >= SPAWN_PATIENCE {
                self.warn(
                    "cannot start PROGRAM for now: leaving the item, which the server hands out again once its lease expires",
                    &[("error", &why)],
                );
                return Err(Outcome::Skipped);
            }
            let held_for_program = delay.is_none();
            let delay = match delay {
                Some(delay) => {
                    self.warn(
                        "cannot start PROGRAM for now; trying again",
                        &[("error", &why), ("retry_in", &seconds(delay))],
                    );
                    delay
                }
                None => PROGRAM_LOOKED_AT_AGAIN,
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                event = lease.event() => {
                    if let Some(outcome) = self.ended_before_start(event).await {
                        return Err(outcome);
                    }
                }
                () = reached(&mut phase, Phase::Terminating) => {
                    if !held_for_program {
                        return Err(self.shut_down_before_start().await);
                    }
                    // Not stopped, which would end the session's turn for a deploy's moment: the
                    // server hands the item out again once its lease expires, as after the wait.
                    self.warn(
                        "the worker is shutting down: leaving the item, whose PROGRAM cannot run, for its lease to expire",
                        &[("reason", &why)],
                    );
                    return Err(Outcome::Skipped);
                }
            }
        }
    }

    /// Acknowledges with the Worker-ID and the environment key; false when the item is not ours to run.
    /// Given up once the drain time is up (or the shutdown is forced): a server that keeps the answer
    /// (or keeps promising amnesty) must not hold the worker's shutdown, and an item given up before
    /// its program started is the server's to hand out again.
    async fn ack(&self) -> bool {
        let mut phase = self.phase.clone();
        let result = tokio::select! {
            result = retry(3, || self.calls.ack()) => result,
            _ = reached(&mut phase, Phase::Terminating) => {
                self.warn(
                    "the worker is shutting down: acknowledgement given up; the server will hand the item out again",
                    &[],
                );
                return false;
            }
        };
        match result {
            Ok(_) => true,
            Err(e) if e.status() == Some(409) => {
                self.warn(
                    "not acknowledged: another worker holds it, or it was stopped",
                    &[("error", &crate::error::described(&e))],
                );
                false
            }
            Err(e) if e.status().is_none() || e.is_retryable() => {
                self.warn(
                    "could not acknowledge; the server will hand it out again",
                    &[("error", &crate::error::described(&e))],
                );
                false
            }
            Err(e) => {
                self.warn(
                    "the server refused the acknowledgement: stopping the item",
                    &[("error", &crate::error::described(&e))],
                );
                self.stop(true, &Tries::Few(1)).await;
                false
            }
        }
    }

    fn spawn(&self, item: &WorkItem) -> std::io::Result<Running> {
        let shared = self.shared;
        // Under `--sandbox-network api` the program's only way out is this item's proxy, and its
        // `TETHER_API_URL` names the forwarder inside the sandbox (plain HTTP: the worker speaks TLS).
        let proxy = match &shared.api_proxy {
            Some(api) => Some(ApiProxy::start(
                api.sockets.join(format!("{}.sock", self.work_id)),
                api.upstream.clone(),
            )?),
            None => None,
        };
        let api_url = match &shared.api_proxy {
            Some(api) => Sandbox::inside_api_url(api.upstream.prefix()),
            None => shared.client.api_base_url().to_owned(),
        };
        let mut env = vec![
            ("TETHER_API_URL", api_url),
            ("TETHER_WORK_ID", self.work_id.clone()),
            ("TETHER_ENVIRONMENT_ID", item.environment_id.clone()),
            ("TETHER_SESSION_ID", item.data.id.clone()),
            ("TETHER_WORKER_ID", shared.worker_id.clone()),
        ];
        if let Some(token) = &self.token {
            env.push(("TETHER_SESSION_TOKEN", token.clone()));
        }
        if let (Some(ca), None) = (&shared.ca_cert, &proxy) {
            env.push(("TETHER_CA_CERT", ca.display().to_string()));
        }
        let cwd = match &shared.workdirs {
            Some(dirs) => {
                let dir = dirs.prepare(&self.work_id)?;
                env.push(("TETHER_WORKDIR", dir.to_string_lossy().into_owned()));
                Some(dir)
            }
            None => None,
        };
        let confined = match &shared.sandbox {
            Some(sandbox) => Some(Confined {
                sandbox,
                groups: sandbox.caps().item_groups(&self.work_id)?,
                proxy,
            }),
            None => None,
        };
        let mut stdin = serde_json::to_vec(item).unwrap_or_default();
        stdin.push(b'\n');
        let read_only: Vec<&std::path::Path> = shared.ca_cert.iter().map(|p| p.as_path()).collect();
        Running::spawn(
            &shared.program,
            &self.work_id,
            &env,
            stdin,
            &shared.output,
            cwd.as_deref(),
            confined,
            &read_only,
        )
    }

    /// SIGTERM to the program's group, then SIGKILL after the grace period; a lost lease or a forced
    /// shutdown cut the grace short.
    async fn terminate(&self, running: &mut Running, lease: &mut Heartbeat) -> Terminated {
        running.signal(Signal::SIGTERM);
        let grace = self.shared.grace;
        let mut phase = self.phase.clone();
        tokio::select! {
            exit = running.wait() => Terminated::Exited(exit),
            _ = tokio::time::sleep(grace) => {
                self.warn("still running after the grace period: SIGKILL", &[]);
                Terminated::Exited(running.kill().await)
            }
            why = lease.lost() => Terminated::Lost(why),
            _ = reached(&mut phase, Phase::Forced) => {
                self.warn("forced shutdown: SIGKILL", &[]);
                Terminated::Exited(running.kill().await)
            }
        }
    }

    /// Terminates the program and ends the item: its exit recorded, then a stop that confirms the
    /// request `stop_requested` made (forced when it made none, or the worker is being forced to
    /// quit). The request runs alongside the termination. The dead man's switch is disarmed as the
    /// program is killed, whatever the request does: a server that does not answer it must not let
    /// the lease's deadline pass with the switch armed, which would end the whole worker (and every
    /// other item's program).
    async fn wind_down(
        &self,
        running: &mut Running,
        lease: &mut Heartbeat,
        stop_requested: impl Future<Output = bool>,
    ) -> Outcome {
        self.program_gone.send_replace(false);
        let (stop_requested, terminated) = tokio::join!(stop_requested, async {
            let terminated = self.terminate(running, lease).await;
            // Reaped here, not after the request's answer: a lost lease kills the program at once.
            let reaped = self.reaped(terminated, running).await;
            self.program_gone.send_replace(true);
            if let Ok(exit) = &reaped {
                self.info("program ended", &[("status", &exit.describe())]);
            }
            reaped
        });
        match terminated {
            Err(lost) => lost,
            Ok(exit) => {
                let phase = *self.phase.borrow();
                let tries = if phase == Phase::Forced {
                    Tries::Few(1)
                } else {
                    Tries::WhileLeased(lease.deadline())
                };
                self.record_exit(exit, &tries).await;
                let forced = !stop_requested || phase == Phase::Forced;
                self.stop(forced, &tries).await;
                outcome_of(exit)
            }
        }
    }

    /// The program's exit after a termination, or (the lease was lost meanwhile) the outcome of
    /// abandoning it: either way the program is reaped when this returns.
    async fn reaped(&self, terminated: Terminated, running: &mut Running) -> Result<Exit, Outcome> {
        match terminated {
            Terminated::Exited(exit) => Ok(exit),
            Terminated::Lost(why) => Err(self.abandon(running, &why).await),
        }
    }

    /// The lease is gone: the item may already be running elsewhere, so the program must not go on for
    /// a moment longer, and the item is not ours to stop or annotate.
    async fn abandon(&self, running: &mut Running, why: &str) -> Outcome {
        let exit = running.kill().await;
        self.warn(
            "lease lost: program killed, item left to the server",
            &[("reason", why), ("status", &exit.describe())],
        );
        Outcome::Lost
    }

    async fn record_exit(&self, exit: Exit, tries: &Tries) {
        self.shared.note_exit(exit);
        let code = exit.shell_code().to_string();
        let signal = exit.signal_name();
        // A cap's reason only when the program failed: a cap hit along the way that the program got
        // over did not end it.
        let reason = exit.reason.filter(|_| !exit.success());
        self.record(
            &[
                (work::EXIT_CODE_KEY, Some(code.as_str())),
                (work::EXIT_SIGNAL_KEY, signal.as_deref()),
                (work::EXIT_REASON_KEY, reason),
            ],
            tries,
        )
        .await;
    }

    /// Merges `entries` (and who ran it) into the item's metadata; `None` deletes a key left by an
    /// earlier run.
    async fn record(&self, entries: &[(&str, Option<&str>)], tries: &Tries) {
        let mut patch = MetadataPatch::new();
        patch.insert(
            "tether.worker_id".to_owned(),
            Some(self.shared.worker_id.clone()),
        );
        for (k, v) in entries {
            patch.insert((*k).to_owned(), v.map(str::to_owned));
        }
        let recording = "recording the outcome in the item's metadata";
        let failed = match self
            .ending_call(recording, tries, || self.calls.record(&patch))
            .await
        {
            Some(Ok(_)) => return,
            Some(Err(e))
                if self.told_item_gone(
                    &e,
                    tries,
                    "the outcome was recorded",
                    "item already ended; its outcome is not recorded",
                ) =>
            {
                return
            }
            Some(Err(e)) => crate::error::described(&e),
            None => "no answer".to_owned(),
        };
        self.warn(
            "could not record the outcome in the item's metadata",
            &[("error", &failed)],
        );
    }

    /// Stops the item: `force` from any live state, otherwise a graceful request (active → stopping) or
    /// its confirmation (stopping → stopped). True when the server took it or the item had already
    /// ended.
    async fn stop(&self, force: bool, tries: &Tries) -> bool {
        let answer = self
            .ending_call("stopping the item", tries, || self.calls.stop(force))
            .await;
        self.stopped_by(answer, tries)
    }

    /// Ends the item after PROGRAM ended well, unless the session has a turn open: input that came
    /// while PROGRAM was ending, which nothing has read, and which the item's end would make a
    /// failed turn (§12.4). Then PROGRAM runs again for it, on the same item and lease, once per
    /// turn (`ran_again_for`, the server's count of turns): a PROGRAM that ends without ending its
    /// turn (posting answers, but never `session.status_idle`) would otherwise answer the same
    /// input for ever; run again once, it answers it twice, and its item is ended as any other.
    /// A turn that came while the run again was ending is another, and is run for too.
    async fn stop_unless_turn_open(
        &self,
        tries: &Tries,
        ran_again_for: &mut Option<u64>,
    ) -> AfterExit {
        let answer = self
            .ending_call("stopping the item", tries, || {
                self.calls.stop_unless_turn_open()
            })
            .await;
        let open = match &answer {
            Some(Err(e)) => e.turn_left_open(),
            _ => None,
        };
        match open {
            None => {
                self.stopped_by(answer, tries);
                AfterExit::Ended
            }
            Some(turn) if *ran_again_for == Some(turn) => {
                self.warn(
                    "PROGRAM ended again with the same turn open: ending the item (the turn ends \
                     in an error; PROGRAM runs again once for a turn it did not end)",
                    &[("detail", &format!("turn {turn} of the session"))],
                );
                AfterExit::Stop
            }
            Some(turn) => {
                self.info(
                    "input came while PROGRAM was ending: running it again for the open turn",
                    &[("detail", &format!("turn {turn} of the session"))],
                );
                *ran_again_for = Some(turn);
                AfterExit::RunAgain
            }
        }
    }

    /// Says how a call that ends the item went; true when the server took it or the item had
    /// already ended.
    fn stopped_by(&self, answer: Option<tether_client::Result<WorkState>>, tries: &Tries) -> bool {
        match answer {
            Some(Ok(state)) => {
                let message = if state.is_live() {
                    "stop requested"
                } else {
                    "item stopped"
                };
                self.info(message, &[("state", state.as_str())]);
                true
            }
            Some(Err(e))
                if self.told_item_gone(&e, tries, "the item was stopped", "item already ended") =>
            {
                true
            }
            Some(Err(e)) => {
                self.warn(
                    "could not stop the item; its lease will expire on the server",
                    &[("error", &crate::error::described(&e))],
                );
                false
            }
            None => {
                self.warn(
                    "the server did not answer the stop; its lease will expire",
                    &[],
                );
                false
            }
        }
    }

    /// Tells, and says true, when a call that ends the item was refused because the item is no
    /// longer this worker's: its lease ran out (a warning: the item will be served again; `before`
    /// says what it ran out before), or it ended (409: stopped meanwhile, its session deleted, say;
    /// 401: its token died with it or with its re-delivery), said as `ended`: nothing is lost that
    /// anyone could read.
    fn told_item_gone(
        &self,
        error: &tether_client::Error,
        tries: &Tries,
        before: &str,
        ended: &str,
    ) -> bool {
        let detail = error.to_string();
        if lease_ran_out(error, tries) {
            self.warn(
                &format!(
                    "the lease ran out before {before}: unless it was stopped meanwhile, the item \
                     goes back to the queue and will be served again"
                ),
                &[("detail", &detail)],
            );
            true
        } else if error.status() == Some(409) {
            self.info(ended, &[("detail", &detail)]);
            true
        } else if error.status() == Some(401) {
            // A session token ends with its item, its re-delivery, or the key it was issued to.
            self.info(
                &format!(
                    "{ended}: its session token no longer holds (the item was stopped on the \
                     server or handed to another worker, or the worker's key was revoked)"
                ),
                &[("detail", &detail)],
            );
            true
        } else {
            false
        }
    }

    /// Runs `call`, one of the calls that end an item (`what` it does), as `tries` says; `None` when
    /// it was given up unanswered. While the lease lasts, its first failure is said at once, and
    /// then whether a later try got through: a server that is away shows in the log, not only as
    /// an item that ends late.
    async fn ending_call<T, Fut>(
        &self,
        what: &str,
        tries: &Tries,
        mut call: impl FnMut() -> Fut,
    ) -> Option<tether_client::Result<T>>
    where
        Fut: Future<Output = tether_client::Result<T>>,
    {
        let failed_tries = AtomicU32::new(0);
        // A few tries end in the caller's own word.
        let tell = matches!(tries, Tries::WhileLeased(_));
        let mut call = || {
            let answer = call();
            let failed_tries = &failed_tries;
            async move {
                let answer = answer.await;
                if tell {
                    self.tell_ending_call(what, &answer, failed_tries);
                }
                answer
            }
        };
        let call = async {
            match tries {
                Tries::Few(attempts) => Some(retry(*attempts, &mut call).await),
                Tries::WhileLeased(deadline) => tokio::select! {
                    biased;
                    () = deadline.clone().passed_by(PAST_THE_DEADLINE) => None,
                    // Heartbeats that get through move the deadline on: a call that the server
                    // keeps refusing with an error worth another try (a proxy's 5xx on this path
                    // alone) would otherwise be tried for as long as they do, its slot held.
                    () = tokio::time::sleep(ENDING_PATIENCE) => None,
                    done = retry(u32::MAX, &mut call) => Some(done),
                },
            }
        };
        self.within_shutdown_limit(call).await.flatten()
    }

    /// Says the first failure of a call that ends an item, and then the try that got through.
    fn tell_ending_call<T>(
        &self,
        what: &str,
        answer: &tether_client::Result<T>,
        failed_tries: &AtomicU32,
    ) {
        match answer {
            // An answer that is final (a 409, a 401) is the caller's to tell: nothing is tried again.
            Err(e) if !crate::backoff::worth_another_try(e) => {}
            Err(e) => {
                if failed_tries.fetch_add(1, Ordering::Relaxed) == 0 {
                    self.warn(
                        &format!("{what} failed; trying again while the lease lasts"),
                        &[("error", &crate::error::described(e))],
                    );
                }
            }
            Ok(_) => {
                let failed = failed_tries.load(Ordering::Relaxed);
                if failed > 0 {
                    self.info(
                        &format!("{what} got through"),
                        &[("detail", &format!("after {failed} failed tries"))],
                    );
                }
            }
        }
    }
}

/// How long the calls that end an item (recording its program's exit, stopping it) go on when they
/// fail in a way worth another try.
enum Tries {
    /// This many tries: before any program ran, or when the worker is being forced to quit.
    Few(u32),
    /// The program has run and is gone: tries with backoff (see [`retry`]) until the server answers,
    /// for as long as the item's lease may still be alive: until [`PAST_THE_DEADLINE`] after the
    /// lease's deadline as the worker knows it (which moves on while heartbeats get through). Given
    /// up earlier, a server that was away for a while would let the lease expire after its return
    /// and hand the item, whose program has already run, out again.
    WhileLeased(Deadline),
}

/// Whether the server refused a call of the item's because the item's lease ran out: it says so
/// (401 `lease_lapsed`, or 409 `not_held` when it ran out while the call waited its turn), or the
/// token is dead (401) past the lease's deadline as this worker knows it, once the server has
/// settled the lease and no longer knows the token. The item goes back to the queue and is served
/// again, its program's run unrecorded, unless it was stopped meanwhile.
fn lease_ran_out(error: &tether_client::Error, tries: &Tries) -> bool {
    let past_the_deadline = matches!(tries, Tries::WhileLeased(deadline) if deadline.has_passed());
    matches!(error.code(), Some("lease_lapsed" | "not_held"))
        || (error.status() == Some(401) && past_the_deadline)
}

/// How long past its lease's deadline an item whose program has ended is still tried. A server that
/// was down starts by extending every lease due within its amnesty window (SPEC §3.1: 30 s by default)
/// to that window's end, so a lease whose deadline passed during the outage may be alive again when
/// the server is back. Nothing is at risk in trying: the program is gone, and the calls carry the
/// item's session token, which dies when the item is handed to another worker or stopped (a 401,
/// taken as an item already ended) or when its lease runs out (a 401 `lease_lapsed`, said as a
/// warning: the item will be served again).
const PAST_THE_DEADLINE: Duration = Duration::from_secs(30);

/// The longest one call that ends an item whose program has ended is tried, however its lease moves
/// on: longer than the outages amnesty covers, short enough that a call refused for good does not
/// hold a slot of `--concurrency` for long.
const ENDING_PATIENCE: Duration = Duration::from_secs(300);

/// How long a program that cannot be started for want of processes, open files or memory is tried
/// again before its item is left to the server (see `Item::start_program`).
const SPAWN_PATIENCE: Duration = Duration::from_secs(60);
/// How often a PROGRAM that cannot run is looked at again while an item waits for it.
const PROGRAM_LOOKED_AT_AGAIN: Duration = Duration::from_secs(1);

/// Whether a failure to start a program is a shortage of this machine's that passes: the process
/// limit (EAGAIN from fork), the open-file limits of the worker or the system, memory.
fn is_passing_shortage(error: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        error.raw_os_error().map(Errno::from_raw),
        // ETXTBSY: PROGRAM is being written in place (a deploy copying over it).
        Some(Errno::EAGAIN | Errno::EMFILE | Errno::ENFILE | Errno::ENOMEM | Errno::ETXTBSY)
    )
}

/// How long the calls that end an item (the stop request, the exit's record, the stop) may go on
/// together once the worker's drain time is up, counted from the end of the item's program (or from
/// the first such call, when no program is being terminated): a worker told to quit does not wait on
/// a server that does not answer, and the item's lease expires on the server without it.
const SHUTDOWN_EXCHANGE_LIMIT: Duration = Duration::from_secs(10);

/// How long what remains of those calls may go on after a second signal (one try each): long enough
/// for a server that answers to hear of the forced stop, and no longer.
const FORCED_EXCHANGE_LIMIT: Duration = Duration::from_secs(1);

impl<C: ItemCalls> Item<'_, C> {
    /// Runs a call that ends an item: to its end while the worker runs or drains (see [`Tries`]);
    /// once the drain time is up, within the item's [`SHUTDOWN_EXCHANGE_LIMIT`], and after a second
    /// signal within [`FORCED_EXCHANGE_LIMIT`] of it. `None` when it was given up; a call whose
    /// bound has passed is not made.
    async fn within_shutdown_limit<T>(&self, call: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = self.shutdown_limit() => None,
            done = call => Some(done),
        }
    }

    /// Returns once the calls that end this item have had their time.
    async fn shutdown_limit(&self) {
        let mut terminating = self.phase.clone();
        let mut forced = self.phase.clone();
        let mut program_gone = self.program_gone.subscribe();
        let shutdown = async {
            reached(&mut terminating, Phase::Terminating).await;
            // The calls made alongside a termination wait for it: it has a bound of its own.
            let _ = program_gone.wait_for(|gone| *gone).await;
            let until = bound(&self.shutdown_until, SHUTDOWN_EXCHANGE_LIMIT);
            tokio::time::sleep_until(until).await;
        };
        let forced = async {
            reached(&mut forced, Phase::Forced).await;
            tokio::time::sleep_until(bound(&self.forced_until, FORCED_EXCHANGE_LIMIT)).await;
        };
        tokio::select! {
            () = shutdown => {}
            () = forced => {}
        }
    }
}

/// The moment in `slot`, set to `limit` from now by the first to ask.
fn bound(slot: &Mutex<Option<tokio::time::Instant>>, limit: Duration) -> tokio::time::Instant {
    *slot
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(|| tokio::time::Instant::now() + limit)
}

fn outcome_of(exit: Exit) -> Outcome {
    if exit.success() {
        Outcome::Done
    } else {
        Outcome::Failed
    }
}

fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    //! The supervisor on tokio's paused clock: the server's answers are scripted, PROGRAM is a real
    //! child process. Paused time runs ahead whenever the runtime waits (on a child too), so a test
    //! that needs the program to be running when the next answer comes waits for it in real time
    //! inside that answer (`Beat::after_ready`), which holds the paused clock still.

    use std::collections::VecDeque;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use serde_json::json;
    use tether_client::{Heartbeat as Beat, HeartbeatOptions};

    use super::*;
    use crate::heartbeat::tests::refusal as refused;
    use crate::program::{Output, Program};
    use crate::status::Reporter;
    use crate::LogFormat;

    fn deadline_at(
        at: tokio::time::Instant,
    ) -> (Deadline, tokio::sync::watch::Sender<tokio::time::Instant>) {
        let (sender, receiver) = tokio::sync::watch::channel(at);
        (Deadline::for_tests(receiver), sender)
    }

    /// A refusal because the lease ran out is told apart from one because the item ended: the
    /// first is warned of (the item will run again), the second is not.
    #[tokio::test(start_paused = true)]
    async fn a_refusal_for_a_lease_that_ran_out_is_told_apart() {
        let refusal = crate::heartbeat::tests::refusal_with_code;
        let (passed, _keep) = deadline_at(tokio::time::Instant::now());
        let (ahead, _keep_too) = deadline_at(tokio::time::Instant::now() + Duration::from_secs(60));
        let (passed, ahead) = (Tries::WhileLeased(passed), Tries::WhileLeased(ahead));
        let few = Tries::Few(1);
        for tries in [&passed, &ahead, &few] {
            assert!(lease_ran_out(&refusal(401, Some("lease_lapsed")), tries));
            assert!(lease_ran_out(&refusal(409, Some("not_held")), tries));
            assert!(!lease_ran_out(&refusal(409, Some("invalid_state")), tries));
        }
        // A dead token past the deadline: the lease ran out and was settled since.
        assert!(lease_ran_out(&refusal(401, None), &passed));
        assert!(!lease_ran_out(&refusal(401, None), &ahead));
        assert!(!lease_ran_out(&refusal(401, None), &few));
    }

    fn beat(state: &str) -> tether_client::Result<Beat> {
        Ok(serde_json::from_value(json!({
            "type": "work_heartbeat",
            "last_heartbeat": "2026-07-01T08:15:06.120394Z",
            "lease_extended": true,
            "state": state,
            "ttl_seconds": 60,
        }))
        .unwrap())
    }

    /// A scripted heartbeat answer.
    enum Answer {
        /// Answered at once.
        Now(tether_client::Result<Beat>),
        /// Answered once the file exists (the program is running and ready), waiting for it in real
        /// time: the paused clock stands still meanwhile.
        AfterReady(PathBuf, tether_client::Result<Beat>),
    }

    /// The server's side of one item: scripted answers, and a log of the calls made.
    #[derive(Default)]
    struct Script {
        acks: Mutex<VecDeque<tether_client::Result<()>>>,
        /// Once these run out, every heartbeat is answered "active" at once.
        beats: Mutex<VecDeque<Answer>>,
        /// A server that takes stops in and never answers them.
        stops_unanswered: bool,
        /// A server that goes away for this long when the program's exit is first recorded: every
        /// call fails meanwhile (heartbeats, records and stops alike) with a plain 503.
        outage_on_exit: Option<Duration>,
        /// When that outage began.
        outage_from: Mutex<Option<tokio::time::Instant>>,
        /// Every record of an exit is refused with an error worth another try, while heartbeats and
        /// stops get through.
        records_refused: bool,
        /// Stops sent with `unless_turn_open` refused in turn, each naming the open turn; the rest
        /// are taken.
        turns_open: Mutex<VecDeque<u64>>,
        calls: Mutex<Vec<String>>,
    }

    impl Script {
        /// Renews the first heartbeat at once and answers the second with `then` once the program has
        /// made the file `ready`.
        fn renewed_then_after_ready(
            ready: &Path,
            then: tether_client::Result<Beat>,
        ) -> Arc<Script> {
            let script = Arc::new(Script::default());
            {
                let mut beats = script.beats.lock().unwrap();
                beats.push_back(Answer::Now(beat("active")));
                beats.push_back(Answer::AfterReady(ready.to_owned(), then));
            }
            script
        }

        fn log(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }

        /// Whether the server is away at this moment.
        fn down(&self) -> bool {
            match (*self.outage_from.lock().unwrap(), self.outage_on_exit) {
                (Some(from), Some(length)) => from.elapsed() < length,
                _ => false,
            }
        }

        /// A call that fails while the server is away: logged as `call (unavailable)`.
        fn unavailable(&self, call: &str) -> Option<tether_client::Error> {
            if !self.down() {
                return None;
            }
            self.log(format!("{call} (unavailable)"));
            Some(refused(503))
        }

        /// The calls other than heartbeats, in order.
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[derive(Clone)]
    struct Scripted(Arc<Script>);

    impl ItemCalls for Scripted {
        type Lease = Scripted;

        async fn ack(&self) -> tether_client::Result<()> {
            self.0.log("ack".into());
            let answer = self.0.acks.lock().unwrap().pop_front();
            answer.unwrap_or(Ok(()))
        }

        async fn stop(&self, force: bool) -> tether_client::Result<WorkState> {
            if let Some(e) = self.0.unavailable(&format!("stop force={force}")) {
                return Err(e);
            }
            self.0.log(format!("stop force={force}"));
            if self.0.stops_unanswered {
                std::future::pending::<()>().await;
            }
            Ok(if force {
                WorkState::Stopped
            } else {
                WorkState::Stopping
            })
        }

        async fn stop_unless_turn_open(&self) -> tether_client::Result<WorkState> {
            let call = "stop force=true unless_turn_open";
            if let Some(e) = self.0.unavailable(call) {
                return Err(e);
            }
            self.0.log(call.into());
            match self.0.turns_open.lock().unwrap().pop_front() {
                Some(turn) => Err(tether_client::ApiError {
                    details: Some(serde_json::json!({ "turn": turn })),
                    ..crate::heartbeat::tests::refusal_with_code(409, Some("turn_open"))
                        .api()
                        .expect("an API error")
                        .clone()
                }
                .into()),
                None => Ok(WorkState::Stopped),
            }
        }

        async fn record(&self, patch: &MetadataPatch) -> tether_client::Result<()> {
            let entries: Vec<String> = patch
                .iter()
                .filter(|(key, _)| key.as_str() != "tether.worker_id")
                .map(|(key, value)| format!("{key}={}", value.as_deref().unwrap_or("-")))
                .collect();
            if self.0.outage_on_exit.is_some() {
                self.0
                    .outage_from
                    .lock()
                    .unwrap()
                    .get_or_insert_with(tokio::time::Instant::now);
            }
            let call = format!("record {}", entries.join(" "));
            if let Some(e) = self.0.unavailable(&call) {
                return Err(e);
            }
            if self.0.records_refused {
                self.0.log(format!("{call} (refused)"));
                return Err(refused(502));
            }
            self.0.log(call);
            Ok(())
        }

        fn lease(&self) -> Scripted {
            self.clone()
        }
    }

    impl Renew for Scripted {
        fn renew(
            &self,
            _: HeartbeatOptions,
            _: crate::heartbeat::Connection,
        ) -> impl Future<Output = tether_client::Result<Beat>> + Send {
            let answer = if self.0.down() {
                Some(Answer::Now(Err(refused(503))))
            } else {
                self.0.beats.lock().unwrap().pop_front()
            };
            async move {
                match answer {
                    None => beat("active"),
                    Some(Answer::Now(answer)) => answer,
                    Some(Answer::AfterReady(file, answer)) => {
                        wait_for_file(&file);
                        answer
                    }
                }
            }
        }
    }

    /// Yields until `done()`, for at most 20 s of real time: the runtime stays busy meanwhile, so the
    /// paused clock stands still.
    async fn yield_until(what: &str, mut done: impl FnMut() -> bool) {
        let started = std::time::Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(20), "{what}");
            tokio::task::yield_now().await;
        }
    }

    /// A program that runs `on_term` on SIGTERM and writes its pid into `ready` once its trap is set.
    /// Its `sleep` keeps none of its output pipes: the worker reads them to their end as soon as the
    /// program is gone, with no wait that would move the paused clock.
    fn program_noting_its_pid(on_term: &str, ready: &Path) -> String {
        format!(
            "trap '{on_term}' TERM; echo $$ > {ready}.new; mv {ready}.new {ready}; sleep 60 >/dev/null 2>&1 & wait",
            ready = ready.display()
        )
    }

    /// The pid that [`program_noting_its_pid`] wrote, once it has.
    async fn noted_pid(ready: &Path) -> nix::unistd::Pid {
        yield_until("no program", || ready.exists()).await;
        let pid = std::fs::read_to_string(ready)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        nix::unistd::Pid::from_raw(pid)
    }

    /// Blocks (in real time, at most 20 s) until `file` exists.
    fn wait_for_file(file: &Path) {
        let started = std::time::Instant::now();
        while !file.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the program never became ready"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What one test runs: a worker's shared state around `script` (a `sh -c` program), and its phase.
    fn worker(script: &str) -> (Shared, watch::Sender<Phase>) {
        let (phase_tx, phase) = watch::channel(Phase::Running);
        let report = Reporter::new(LogFormat::Json, 1);
        let program = Program::resolve(&["sh".into(), "-c".into(), script.into()]).unwrap();
        let shared = Shared {
            // Never called: the item's calls are scripted.
            client: Client::new("http://127.0.0.1:9", "tth_env_unused").unwrap(),
            environment_id: "env_1".into(),
            ca_cert: None,
            worker_id: "worker-1".into(),
            program,
            output: Output::Log(report.clone()),
            desired_ttl: None,
            grace: Duration::from_secs(5),
            report,
            phase,
            workdirs: None,
            max_idle: None,
            run_one: false,
            exits: Mutex::new(Vec::new()),
            took_any: Default::default(),
            asking_for_lost_claim: Default::default(),
            stops_with_claims: Default::default(),
            sandbox: None,
            api_proxy: None,
            // It would follow this test's paused clock with a real kernel timer, and SIGKILL the
            // test process once the clocks drift apart.
            dead_mans_switch: false,
        };
        (shared, phase_tx)
    }

    fn session_item() -> WorkItem {
        serde_json::from_value(json!({
            "id": "work_1",
            "object": "work",
            "environment_id": "env_1",
            "data": {"type": "session", "id": "sess_1"},
            "state": "queued",
            "created_at": "2026-07-01T08:15:00Z",
        }))
        .unwrap()
    }

    async fn run(shared: &Shared, script: &Arc<Script>) -> Outcome {
        let item = session_item();
        Item::new(shared, &item, Scripted(Arc::clone(script)), None)
            .run(item, Taken::Polled)
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_ack_runs_nothing_and_a_malformed_one_stops_the_item() {
        let dir = tempfile::tempdir().unwrap();
        let ran = dir.path().join("ran");
        let (shared, _phase) = worker(&format!("touch {}", ran.display()));

        // 409: another worker holds it; not ours to stop.
        let script = Arc::new(Script::default());
        script.acks.lock().unwrap().push_back(Err(refused(409)));
        assert_eq!(run(&shared, &script).await, Outcome::Skipped);
        assert_eq!(script.calls(), ["ack"]);

        // 503 three times: retried, then left for the server to hand out again.
        let script = Arc::new(Script::default());
        for _ in 0..3 {
            script.acks.lock().unwrap().push_back(Err(refused(503)));
        }
        assert_eq!(run(&shared, &script).await, Outcome::Skipped);
        assert_eq!(script.calls(), ["ack", "ack", "ack"]);

        // A refusal that no retry cures: the item is stopped so that it does not come back.
        let script = Arc::new(Script::default());
        script.acks.lock().unwrap().push_back(Err(refused(400)));
        assert_eq!(run(&shared, &script).await, Outcome::Skipped);
        assert_eq!(script.calls(), ["ack", "stop force=true"]);

        assert!(!ran.exists(), "no program ran");
    }

    #[tokio::test(start_paused = true)]
    async fn a_program_that_exits_is_recorded_and_its_item_stopped() {
        let (shared, _phase) = worker("exit 3");
        let script = Arc::new(Script::default());
        assert_eq!(run(&shared, &script).await, Outcome::Failed);
        assert_eq!(
            script.calls(),
            [
                "ack",
                "record tether.exit_code=3 tether.exit_reason=- tether.signal=-",
                "stop force=true"
            ]
        );

        // A program that ended well: its item is ended unless a turn is open.
        let (shared, _phase) = worker("exit 0");
        let script = Arc::new(Script::default());
        assert_eq!(run(&shared, &script).await, Outcome::Done);
        assert_eq!(
            script.calls().last().unwrap(),
            "stop force=true unless_turn_open"
        );
    }

    /// Input that came while PROGRAM was ending leaves the session's turn open: PROGRAM runs again
    /// for it on the same item, rather than the item's end failing a turn nothing read; once per
    /// turn, so that a PROGRAM that never ends its turns does not run for ever.
    #[tokio::test(start_paused = true)]
    async fn a_turn_that_came_while_the_program_was_ending_runs_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let (shared, _phase) = worker(&format!("echo run >> {}", runs.display()));
        let record = "record tether.exit_code=0 tether.exit_reason=- tether.signal=-";
        let ended = "stop force=true unless_turn_open";
        // (turns found open at each end, calls, runs)
        let cases: [(&[u64], &[&str], usize); 3] = [
            // One turn came while it ended: run again, then ended.
            (&[2], &["ack", record, ended, record, ended], 2),
            // Another came while the second run ended: run for that one too.
            (
                &[2, 3],
                &["ack", record, ended, record, ended, record, ended],
                3,
            ),
            // The same turn open after the run for it: the program does not end its turns; the
            // item is ended regardless.
            (
                &[2, 2],
                &["ack", record, ended, record, ended, "stop force=true"],
                2,
            ),
        ];
        for (turns, calls, runs_made) in cases {
            let _ = std::fs::remove_file(&runs);
            let script = Arc::new(Script::default());
            script.turns_open.lock().unwrap().extend(turns);
            assert_eq!(run(&shared, &script).await, Outcome::Done, "{turns:?}");
            assert_eq!(script.calls(), calls, "{turns:?}");
            let made = std::fs::read_to_string(&runs).unwrap().lines().count();
            assert_eq!(made, runs_made, "{turns:?}");
        }

        // A program that failed: its item is ended as ever, the turn with it.
        let (shared, _phase) = worker("exit 1");
        let script = Arc::new(Script::default());
        script.turns_open.lock().unwrap().extend([2]);
        assert_eq!(run(&shared, &script).await, Outcome::Failed);
        assert_eq!(script.calls().last().unwrap(), "stop force=true");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_request_ends_a_program_that_ignores_sigterm_with_sigkill_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        // The program ignores SIGTERM (its `sleep` inherits that), so only the SIGKILL after the grace
        // period ends it.
        let (shared, _phase) = worker(&format!(
            "trap '' TERM; touch {}; sleep 60",
            ready.display()
        ));
        let script = Script::renewed_then_after_ready(&ready, beat("stopping"));
        let started = tokio::time::Instant::now();
        assert_eq!(run(&shared, &script).await, Outcome::Failed);
        assert!(
            started.elapsed() >= shared.grace,
            "SIGKILL came only after the grace period"
        );
        assert_eq!(
            script.calls(),
            [
                "ack",
                "record tether.exit_code=137 tether.exit_reason=- tether.signal=SIGKILL",
                // The server asked for the stop: the worker confirms it.
                "stop force=false"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_kills_the_program_and_leaves_the_item_alone() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let (shared, _phase) = worker(&format!("touch {}; sleep 60", ready.display()));
        let script = Script::renewed_then_after_ready(&ready, Err(refused(409)));
        let started = tokio::time::Instant::now();
        assert_eq!(run(&shared, &script).await, Outcome::Lost);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the program was killed, not waited for"
        );
        // Neither stopped nor annotated: the item may already run elsewhere.
        assert_eq!(script.calls(), ["ack"]);
    }

    /// Also shows that the shutdown's bound on the calls that end the item counts from the program's
    /// end: the termination takes the whole grace period, and the calls after it are still made.
    #[tokio::test(start_paused = true)]
    async fn the_end_of_the_drain_time_asks_for_a_stop_then_terminates_the_program() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let (shared, phase) = worker(&format!(
            "trap '' TERM; touch {}; sleep 60",
            ready.display()
        ));
        let script = Arc::new(Script::default());
        let item = session_item();
        let supervisor = Item::new(&shared, &item, Scripted(Arc::clone(&script)), None);
        let drain = async {
            // The program runs; then the drain time ends.
            yield_until("no program", || ready.exists()).await;
            phase.send_replace(Phase::Terminating);
        };
        let (outcome, ()) = tokio::join!(supervisor.run(item.clone(), Taken::Polled), drain);
        assert_eq!(outcome, Outcome::Failed);
        assert_eq!(
            script.calls(),
            [
                "ack",
                // Asked first, so that the server shows the item winding down.
                "stop force=false",
                // It ignored SIGTERM: SIGKILL after the grace period.
                "record tether.exit_code=137 tether.exit_reason=- tether.signal=SIGKILL",
                "stop force=false"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_does_not_answer_delays_neither_the_sigterm_nor_the_end_of_a_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let termed = dir.path().join("termed");
        let (shared, phase) = worker(&program_noting_its_pid(
            &format!("touch {}; exit 0", termed.display()),
            &ready,
        ));
        let script = Arc::new(Script {
            stops_unanswered: true,
            ..Script::default()
        });
        let item = session_item();
        let supervisor = Item::new(&shared, &item, Scripted(Arc::clone(&script)), None);
        let drain = async {
            let program = noted_pid(&ready).await;
            phase.send_replace(Phase::Terminating);
            let terminated_at = tokio::time::Instant::now();
            // The program gets its SIGTERM while the stop request is still unanswered, or never.
            // Then until the worker has reaped it, lest the clock run on to the SIGKILL meanwhile.
            yield_until("no SIGTERM while the stop request went unanswered", || {
                termed.exists() && nix::sys::signal::kill(program, None).is_err()
            })
            .await;
            terminated_at
        };
        let (outcome, terminated_at) =
            tokio::join!(supervisor.run(item.clone(), Taken::Polled), drain);
        assert_eq!(outcome, Outcome::Done);
        // The stop request, unanswered, used up the time the end of the item had: nothing more is
        // asked of a server that does not answer.
        assert_eq!(script.calls(), ["ack", "stop force=false"]);
        // The calls that end the item shared one bound, counted from the program's end. That end
        // came within the grace period of the SIGTERM: the paused clock may run on to a timer while
        // the program dies, the more so on a loaded machine, so its exact instant is not known here.
        let elapsed = terminated_at.elapsed();
        assert!(
            elapsed >= SHUTDOWN_EXCHANGE_LIMIT && elapsed <= SHUTDOWN_EXCHANGE_LIMIT + shared.grace,
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_signal_ends_the_wait_on_a_server_that_does_not_answer() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let (shared, phase) = worker(&program_noting_its_pid("exit 0", &ready));
        let script = Arc::new(Script {
            stops_unanswered: true,
            ..Script::default()
        });
        let item = session_item();
        let supervisor = Item::new(&shared, &item, Scripted(Arc::clone(&script)), None);
        let signals = async {
            let program = noted_pid(&ready).await;
            phase.send_replace(Phase::Terminating);
            // The program is gone at once (waited for in real time, the clock held still); the stop
            // request goes unanswered for a while.
            yield_until("the program outlived its SIGTERM", || {
                nix::sys::signal::kill(program, None).is_err()
            })
            .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            phase.send_replace(Phase::Forced);
            tokio::time::Instant::now()
        };
        let (outcome, forced_at) =
            tokio::join!(supervisor.run(item.clone(), Taken::Polled), signals);
        assert_eq!(outcome, Outcome::Done);
        assert_eq!(forced_at.elapsed(), FORCED_EXCHANGE_LIMIT);
    }

    /// A record of the exit that the server keeps refusing while heartbeats get through is given up
    /// after [`ENDING_PATIENCE`], although the lease, renewed all along, never lapses; the stop then
    /// ends the item.
    #[tokio::test(start_paused = true)]
    async fn an_ending_call_refused_for_good_is_given_up_though_the_lease_lives_on() {
        let (shared, _phase) = worker("exit 0");
        let script = Arc::new(Script {
            records_refused: true,
            ..Script::default()
        });
        short_leases(&script, 10);
        // Busy until the first refusal, so that the paused clock stands still while the real program
        // starts and exits (left idle, it would run on from heartbeat to heartbeat meanwhile); from
        // there on, only the calls' own timers move it.
        let first_refusal = async {
            yield_until("the exit was never recorded", || {
                script.calls().iter().any(|c| c.ends_with("(refused)"))
            })
            .await;
            tokio::time::Instant::now()
        };
        let started = tokio::time::Instant::now();
        let (outcome, refused_at) = tokio::join!(
            tokio::time::timeout(ENDING_PATIENCE * 12, run(&shared, &script)),
            first_refusal
        );
        let outcome = outcome.expect("the refused record is given up");
        assert_eq!(outcome, Outcome::Done);
        assert!(started.elapsed() >= ENDING_PATIENCE);
        let tried = refused_at.elapsed();
        assert!(
            tried >= ENDING_PATIENCE && tried < ENDING_PATIENCE + Duration::from_secs(30),
            "{tried:?}"
        );
        assert_eq!(
            script.calls().last().map(String::as_str),
            Some("stop force=true unless_turn_open")
        );
    }

    /// A program that exits while the server is away, which comes back after more than the lease:
    /// the exit is recorded and the item stopped once it is back.
    #[tokio::test(start_paused = true)]
    async fn an_exit_during_a_server_outage_is_recorded_once_the_server_is_back() {
        const OUTAGE: Duration = Duration::from_secs(12);
        let (shared, _phase) = worker("exit 0");
        let script = Arc::new(Script {
            outage_on_exit: Some(OUTAGE),
            ..Script::default()
        });
        short_leases(&script, 10);
        assert_eq!(run(&shared, &script).await, Outcome::Done);
        let calls = script.calls();
        let answered: Vec<&String> = calls
            .iter()
            .filter(|c| !c.ends_with("(unavailable)"))
            .collect();
        assert_eq!(
            answered,
            [
                "ack",
                "record tether.exit_code=0 tether.exit_reason=- tether.signal=-",
                "stop force=true unless_turn_open"
            ],
            "{calls:?}"
        );
        assert!(calls.len() > 3, "the outage was waited out: {calls:?}");
        let outage_from = script.outage_from.lock().unwrap().unwrap();
        assert!(outage_from.elapsed() >= OUTAGE);

        // A server that stays away: given up after the lease's deadline and the window a restarted
        // server's amnesty could still give it, not before, nor ever after.
        let (shared, _phase) = worker("exit 0");
        let script = Arc::new(Script {
            outage_on_exit: Some(Duration::from_secs(3600)),
            ..Script::default()
        });
        short_leases(&script, 10);
        assert_eq!(run(&shared, &script).await, Outcome::Done);
        let calls = script.calls();
        assert!(
            calls[1..].iter().all(|c| c.ends_with("(unavailable)")),
            "{calls:?}"
        );
        // Its bound passed, the stop is not even tried.
        assert!(!calls.iter().any(|c| c.starts_with("stop")), "{calls:?}");
        let given_up = script.outage_from.lock().unwrap().unwrap().elapsed();
        assert!(given_up >= PAST_THE_DEADLINE, "{given_up:?}");
        // The deadline is at most one lease (less its margin) after the exit.
        assert!(
            given_up <= PAST_THE_DEADLINE + Duration::from_secs(10),
            "{given_up:?}"
        );
    }

    /// Every heartbeat of `script` is renewed at once for `ttl` seconds (until an outage).
    fn short_leases(script: &Script, ttl: u32) {
        let mut beats = script.beats.lock().unwrap();
        for _ in 0..10_000 {
            let mut renewed = beat("active").unwrap();
            renewed.ttl_seconds = ttl;
            beats.push_back(Answer::Now(Ok(renewed)));
        }
    }

    /// A held lease on `script`, and the item's supervisor.
    async fn held_lease(script: &Arc<Script>) -> Heartbeat {
        let mut lease = Heartbeat::start(
            Scripted(Arc::clone(script)),
            "worker-1".into(),
            None,
            tokio::time::Instant::now(),
        );
        assert_eq!(lease.established().await, Lease::Held);
        lease
    }

    fn shortage() -> std::io::Error {
        std::io::Error::from_raw_os_error(nix::errno::Errno::EAGAIN as i32)
    }

    #[test]
    fn shortages_that_pass_are_told_from_other_failures() {
        use nix::errno::Errno;
        let os = |e: Errno| std::io::Error::from_raw_os_error(e as i32);
        for passing in [Errno::EAGAIN, Errno::EMFILE, Errno::ENFILE, Errno::ENOMEM] {
            assert!(is_passing_shortage(&os(passing)), "{passing}");
        }
        for lasting in [Errno::ENOENT, Errno::EACCES, Errno::E2BIG, Errno::ENOEXEC] {
            assert!(!is_passing_shortage(&os(lasting)), "{lasting}");
        }
        assert!(!is_passing_shortage(&std::io::Error::other("nul byte")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_shortage_is_waited_out_and_a_lasting_one_leaves_the_item_to_the_server() {
        let (shared, _phase) = worker("exit 0");
        let item = session_item();

        // Out of processes twice, then started: nothing is said to the server meanwhile.
        let script = Arc::new(Script::default());
        let supervisor = Item::new(&shared, &item, Scripted(Arc::clone(&script)), None);
        let mut lease = held_lease(&script).await;
        let started = tokio::time::Instant::now();
        let mut tries = 0;
        let running = supervisor
            .start_program(&mut lease, || {
                tries += 1;
                if tries <= 2 {
                    Err(shortage())
                } else {
                    supervisor.spawn(&item)
                }
            })
            .await;
        // The call backoff's first two waits.
        assert_eq!(started.elapsed(), Duration::from_millis(500 + 1_000));
        let mut running = running.unwrap_or_else(|_| panic!("started on the third try"));
        assert!(running.wait().await.success());
        assert_eq!(tries, 3);
        assert_eq!(script.calls(), Vec::<String>::new());

        // A shortage that lasts: the item is neither stopped nor annotated, but left to its lease.
        let script = Arc::new(Script::default());
        let supervisor = Item::new(&shared, &item, Scripted(Arc::clone(&script)), None);
        let mut lease = held_lease(&script).await;
        let started = tokio::time::Instant::now();
        let outcome = supervisor
            .start_program(&mut lease, || Err(shortage()))
            .await
            .err();
        assert_eq!(outcome, Some(Outcome::Skipped));
        assert!(started.elapsed() >= SPAWN_PATIENCE);
        assert!(started.elapsed() < SPAWN_PATIENCE + Duration::from_secs(10));
        assert_eq!(script.calls(), Vec::<String>::new());

        // Any other failure is the item's: recorded, and the item stopped.
        let script = Arc::new(Script::default());
        let supervisor = Item::new(&shared, &item, Scripted(Arc::clone(&script)), None);
        let mut lease = held_lease(&script).await;
        let outcome = supervisor
            .start_program(&mut lease, || {
                Err(std::io::Error::from(std::io::ErrorKind::NotFound))
            })
            .await
            .err();
        assert_eq!(outcome, Some(Outcome::Failed));
        assert_eq!(
            script.calls(),
            ["record tether.error=entity not found", "stop force=true"]
        );
    }

    /// In real time, with the dead man's switch armed (a kernel timer): the program ends at the
    /// end of the drain time while the server answers neither heartbeats nor stops, and the lease's
    /// deadline passes while the stop is still asked for. The switch must be off by then, or the
    /// kernel ends this whole test process with SIGKILL.
    #[tokio::test]
    async fn the_switch_is_disarmed_with_the_program_not_after_the_unanswered_stop() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let (mut shared, phase) = worker(&format!(
            "trap 'exit 0' TERM; touch {}; sleep 60 & wait",
            ready.display()
        ));
        shared.dead_mans_switch = true;
        let script = Arc::new(Script {
            stops_unanswered: true,
            ..Script::default()
        });
        {
            let mut beats = script.beats.lock().unwrap();
            let mut renewed = beat("active").unwrap();
            renewed.ttl_seconds = 4;
            beats.push_back(Answer::Now(Ok(renewed)));
            for _ in 0..1_000 {
                beats.push_back(Answer::Now(Err(refused(500))));
            }
        }
        let item = session_item();
        let supervisor = Item::new(&shared, &item, Scripted(Arc::clone(&script)), None);
        let drain = async {
            while !ready.exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            phase.send_replace(Phase::Terminating);
        };
        let (outcome, ()) = tokio::join!(supervisor.run(item.clone(), Taken::Polled), drain);
        assert_eq!(outcome, Outcome::Done);
    }

    /// In real time, with the dead man's switch armed: the lease is lost while a process that left
    /// the program's group (`setsid`) still holds its output open. The program is killed at once, and
    /// the wait for its output (a second per reader) runs past the lease's deadline. The switch must be
    /// off by then: it guards a program that is already killed, and would end the whole worker, every
    /// other item's program with it (here, this test process).
    #[tokio::test]
    async fn the_switch_is_disarmed_when_a_lost_lease_kills_the_program_not_after_its_output() {
        let (mut shared, _phase) = worker("setsid sleep 5 & sleep 60");
        shared.dead_mans_switch = true;
        let script = Arc::new(Script::default());
        {
            let mut beats = script.beats.lock().unwrap();
            let mut renewed = beat("active").unwrap();
            renewed.ttl_seconds = 2;
            beats.push_back(Answer::Now(Ok(renewed)));
            for _ in 0..1_000 {
                beats.push_back(Answer::Now(Err(refused(500))));
            }
        }
        let item = session_item();
        let supervisor = Item::new(&shared, &item, Scripted(Arc::clone(&script)), None);
        let outcome = supervisor.run(item.clone(), Taken::Polled).await;
        assert_eq!(outcome, Outcome::Lost);
        // Past the time the switch would have fired.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    /// A server that keeps promising amnesty to the acknowledgement (its database away) must not hold
    /// the shutdown: once the drain time is up, the acknowledgement is given up and the item left to
    /// the server, without its program.
    #[tokio::test(start_paused = true)]
    async fn an_acknowledgement_the_server_keeps_refusing_is_given_up_when_the_drain_ends() {
        let (shared, phase) = worker("exit 0");
        let script = Arc::new(Script::default());
        {
            let mut acks = script.acks.lock().unwrap();
            for _ in 0..10_000 {
                acks.push_back(Err(tether_client::Error::Api(Box::new(
                    crate::heartbeat::tests::outage(30_000),
                ))));
            }
        }
        let item = session_item();
        let supervisor = Item::new(&shared, &item, Scripted(Arc::clone(&script)), None);
        let shutdown = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            phase.send_replace(Phase::Draining);
            tokio::time::sleep(Duration::from_secs(5)).await;
            phase.send_replace(Phase::Terminating);
        };
        let (outcome, ()) = tokio::join!(supervisor.run(item.clone(), Taken::Polled), shutdown);
        assert_eq!(outcome, Outcome::Skipped);
        let calls = script.calls();
        assert!(
            calls.len() > 1,
            "the acknowledgement was tried again meanwhile"
        );
        let others: Vec<_> = calls.iter().filter(|c| *c != "ack").collect();
        assert!(others.is_empty(), "only acks, no {others:?}");
    }
}

#[cfg(test)]
mod connection_tests {
    //! `HttpItem` against a real loopback server that can forget the connections it holds, on the
    //! wall clock (no paused time: the calls cross real sockets).

    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Answers every request with a stopped work item, after 50 ms, until [`Forgetful::forget`]:
    /// from then on, what comes on the connections it already holds is read and never answered, as
    /// when a NAT forgot them; new connections are answered.
    struct Forgetful {
        url: String,
        era: Arc<AtomicUsize>,
    }

    impl Forgetful {
        async fn start() -> Forgetful {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("address"));
            let era = Arc::new(AtomicUsize::new(0));
            let eras = era.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let born = eras.load(Ordering::SeqCst);
                    tokio::spawn(serve(stream, born, eras.clone()));
                }
            });
            Forgetful { url, era }
        }

        fn forget(&self) {
            self.era.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn serve(mut stream: TcpStream, born: usize, era: Arc<AtomicUsize>) {
        let body = serde_json::json!({
            "id": "work_1", "type": "work", "environment_id": "env_1",
            "data": {"type": "session", "id": "sess_1"}, "state": "stopped",
            "created_at": "2026-07-01T08:15:01Z", "metadata": {}, "secret": null
        })
        .to_string();
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
            // One request per answer: its head, then a body of its Content-Length.
            let Some(head_end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&pending[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap_or(0));
            if pending.len() < head_end + 4 + length {
                continue;
            }
            pending.drain(..head_end + 4 + length);
            if era.load(Ordering::SeqCst) != born {
                continue;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// Two calls at once leave two connections in the pool, and the server forgets both. The next
    /// call goes on one of them and gets no answer; the one after must not take the other.
    #[tokio::test]
    async fn after_an_unanswered_call_the_items_calls_go_on_fresh_connections() {
        let server = Forgetful::start().await;
        let client = Client::builder(server.url.clone())
            .token("tth_ses_test")
            .build()
            .expect("client")
            .with_timeout(Duration::from_millis(500));
        let calls = HttpItem {
            environment_client: client.clone(),
            client,
            environment_id: "env_1".into(),
            work_id: "work_1".into(),
            worker_id: "w1".into(),
            unanswered: AtomicBool::new(false),
            next: None,
        };
        let (first, second) = tokio::join!(calls.stop(true), calls.stop(true));
        assert_eq!(
            (first.unwrap(), second.unwrap()),
            (WorkState::Stopped, WorkState::Stopped)
        );
        server.forget();
        let lost = calls.stop(true).await.expect_err("a forgotten connection");
        assert_eq!(lost.status(), None, "{lost}");
        let state = calls
            .stop(true)
            .await
            .expect("an answer on a fresh connection");
        assert_eq!(state, WorkState::Stopped);
    }
}
