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

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tether_client::{Client, MetadataPatch, WorkItem};
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::backoff::retry;
use crate::heartbeat::{Heartbeat, ItemLease, Lease};
use crate::program::{Confined, Exit, Running};
use crate::proxy::ApiProxy;
use crate::sandbox::Sandbox;
use crate::status::Outcome;
use crate::{reached, Phase, Shared};

/// Serves `item`, holding `slot` (one unit of `--concurrency`) until it is done.
pub async fn serve(shared: Arc<Shared>, item: WorkItem, slot: OwnedSemaphorePermit) {
    let work_id = item.id.clone();
    let outcome = Item::new(&shared, &item).run(item.clone()).await;
    if let Some(dirs) = &shared.workdirs {
        if let Err(e) = dirs.finish(&work_id) {
            shared.report.warn(
                "cannot remove the item's working directory",
                &[("work_id", &work_id), ("error", &e.to_string())],
            );
        }
    }
    shared.report.finished(&work_id, outcome);
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

struct Item<'a> {
    shared: &'a Shared,
    work_id: String,
    /// Carries the item's session token: every call about the item after the ack uses it.
    client: Client,
    token: Option<String>,
    phase: watch::Receiver<Phase>,
}

impl<'a> Item<'a> {
    fn new(shared: &'a Shared, item: &WorkItem) -> Item<'a> {
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
        Item {
            shared,
            work_id: item.id.clone(),
            client,
            token,
            phase: shared.phase.clone(),
        }
    }

    fn env(&self) -> &str {
        &self.shared.environment_id
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

    async fn run(mut self, item: WorkItem) -> Outcome {
        self.info(
            "claimed",
            &[("type", &item.data.kind), ("id", &item.data.id)],
        );
        let acked = tokio::time::Instant::now();
        if !self.ack().await {
            return Outcome::Skipped;
        }
        if item.data.kind != "session" {
            // D-12: not ours to understand; nothing else will run it either.
            self.warn(
                "unknown work type: stopping it without running anything",
                &[("type", &item.data.kind)],
            );
            self.stop(true, 5).await;
            return Outcome::Skipped;
        }
        // Before anything slow: the provisional lease of the ack is short.
        let renewer = ItemLease {
            client: self.client.clone(),
            environment_id: self.env().to_owned(),
            work_id: self.work_id.clone(),
        };
        let mut lease = Heartbeat::start(
            renewer,
            self.shared.worker_id.clone(),
            self.shared.desired_ttl,
            acked,
        );
        // The program starts only under a lease whose deadline the worker knows: after the first
        // accepted heartbeat (one round trip).
        let established = lease.established().await;
        if *self.phase.borrow() >= Phase::Terminating {
            self.warn("the worker is shutting down: stopping the item unrun", &[]);
            self.stop(true, 1).await;
            return Outcome::Skipped;
        }
        match established {
            Lease::Held => {}
            Lease::Pending => unreachable!("established() waits for the first answer"),
            Lease::Lost(why) => {
                self.warn("lease lost before the program started", &[("reason", &why)]);
                return Outcome::Lost;
            }
            Lease::StopRequested => {
                self.info("stop requested before the program started", &[]);
                self.stop(false, 5).await;
                return Outcome::Skipped;
            }
        }
        // Armed before the program exists, disarmed once it is reaped: if the worker cannot act by then
        // (stopped, starved), the kernel ends it, and the program with it.
        let dead_man = lease.dead_man();
        let mut running = match self.spawn(&item) {
            Ok(running) => running,
            Err(e) => {
                let why = e.to_string();
                self.warn("cannot start PROGRAM", &[("error", &why)]);
                self.record(&[("tether.error", Some(why.as_str()))], 3)
                    .await;
                self.stop(true, 5).await;
                return Outcome::Failed;
            }
        };
        self.shared.report.started(&self.work_id);
        self.info(
            "program started",
            &[
                ("pid", &running.pid.to_string()),
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
        match ending {
            Ending::Exited(exit) => {
                drop(dead_man);
                match exit.reason.filter(|_| !exit.success()) {
                    Some(reason) => self.info(
                        "program exited",
                        &[("status", &exit.describe()), ("reason", reason)],
                    ),
                    None => self.info("program exited", &[("status", &exit.describe())]),
                }
                self.record_exit(exit, 3).await;
                self.stop(true, 5).await;
                outcome_of(exit)
            }
            Ending::Lost(why) => {
                let outcome = self.abandon(&mut running, &why).await;
                drop(dead_man);
                outcome
            }
            Ending::StopRequested => {
                self.info(
                    "stop requested: sending SIGTERM to the program",
                    &[("grace", &seconds(self.shared.grace))],
                );
                let terminated = self.terminate(&mut running, &mut lease).await;
                let terminated = self.reaped(terminated, &mut running).await;
                drop(dead_man);
                match terminated {
                    Err(lost) => lost,
                    Ok(exit) => {
                        self.info("program ended", &[("status", &exit.describe())]);
                        let phase = *self.phase.borrow();
                        self.record_exit(exit, attempts(phase)).await;
                        self.stop(phase == Phase::Forced, attempts(phase)).await;
                        outcome_of(exit)
                    }
                }
            }
            Ending::Shutdown if *self.phase.borrow() == Phase::Forced => {
                let exit = running.kill().await;
                drop(dead_man);
                self.warn(
                    "forced shutdown: program killed",
                    &[("status", &exit.describe())],
                );
                self.record_exit(exit, 1).await;
                self.stop(true, 1).await;
                Outcome::Failed
            }
            Ending::Shutdown => {
                self.info(
                    "drain time is up: sending SIGTERM to the program",
                    &[("grace", &seconds(self.shared.grace))],
                );
                // Ask first, so that the server shows the item winding down rather than active; the
                // lease deadline still holds while the request is under way.
                let requested = tokio::select! {
                    requested = self.stop(false, 1) => requested,
                    why = lease.lost() => {
                        let outcome = self.abandon(&mut running, &why).await;
                        drop(dead_man);
                        return outcome;
                    }
                };
                let terminated = self.terminate(&mut running, &mut lease).await;
                let terminated = self.reaped(terminated, &mut running).await;
                drop(dead_man);
                match terminated {
                    Err(lost) => lost,
                    Ok(exit) => {
                        self.info("program ended", &[("status", &exit.describe())]);
                        let phase = *self.phase.borrow();
                        self.record_exit(exit, attempts(phase)).await;
                        let forced = !requested || phase == Phase::Forced;
                        self.stop(forced, attempts(phase)).await;
                        outcome_of(exit)
                    }
                }
            }
        }
    }

    /// Acknowledges with the Worker-ID and the environment key; false when the item is not ours to run.
    async fn ack(&self) -> bool {
        let shared = self.shared;
        let result = retry(3, || {
            shared
                .client
                .ack_work(self.env(), &self.work_id, Some(&shared.worker_id))
        })
        .await;
        match result {
            Ok(_) => true,
            Err(e) if e.status() == Some(409) => {
                self.warn(
                    "not acknowledged: another worker holds it, or it was stopped",
                    &[("error", &e.to_string())],
                );
                false
            }
            Err(e) if e.status().is_none() || e.is_retryable() => {
                self.warn(
                    "could not acknowledge; the server will hand it out again",
                    &[("error", &e.to_string())],
                );
                false
            }
            Err(e) => {
                self.warn(
                    "the server refused the acknowledgement: stopping the item",
                    &[("error", &e.to_string())],
                );
                self.stop(true, 1).await;
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

    async fn record_exit(&self, exit: Exit, attempts: u32) {
        self.shared.note_exit(exit);
        let code = exit.shell_code().to_string();
        let signal = exit.signal_name();
        // A cap's reason only when the program failed: a cap hit along the way that the program got
        // over did not end it.
        let reason = exit.reason.filter(|_| !exit.success());
        self.record(
            &[
                ("tether.exit_code", Some(code.as_str())),
                ("tether.signal", signal.as_deref()),
                ("tether.exit_reason", reason),
            ],
            attempts,
        )
        .await;
    }

    /// Merges `entries` (and who ran it) into the item's metadata; `None` deletes a key left by an
    /// earlier run.
    async fn record(&self, entries: &[(&str, Option<&str>)], attempts: u32) {
        let mut patch = MetadataPatch::new();
        patch.insert(
            "tether.worker_id".to_owned(),
            Some(self.shared.worker_id.clone()),
        );
        for (k, v) in entries {
            patch.insert((*k).to_owned(), v.map(str::to_owned));
        }
        let call = retry(attempts, || {
            self.client
                .update_work_metadata(self.env(), &self.work_id, &patch)
        });
        let failed = match tokio::time::timeout(time_limit(attempts), call).await {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_owned(),
        };
        self.warn(
            "could not record the outcome in the item's metadata",
            &[("error", &failed)],
        );
    }

    /// Stops the item: `force` from any live state, otherwise a graceful request (active → stopping) or
    /// its confirmation (stopping → stopped). True when the server took it or the item had already
    /// ended.
    async fn stop(&self, force: bool, attempts: u32) -> bool {
        let call = retry(attempts, || {
            self.client.stop_work(self.env(), &self.work_id, force)
        });
        match tokio::time::timeout(time_limit(attempts), call).await {
            Ok(Ok(item)) => {
                let message = if item.state.is_live() {
                    "stop requested"
                } else {
                    "item stopped"
                };
                self.info(message, &[("state", item.state.as_str())]);
                true
            }
            Ok(Err(e)) if matches!(e.status(), Some(409 | 401)) => {
                // 409: already stopped; 401: the token died with the item (or its re-delivery).
                self.info("item already ended", &[("detail", &e.to_string())]);
                true
            }
            Ok(Err(e)) => {
                self.warn(
                    "could not stop the item; its lease will expire on the server",
                    &[("error", &e.to_string())],
                );
                false
            }
            Err(_) => {
                self.warn(
                    "the server did not answer the stop; its lease will expire",
                    &[],
                );
                false
            }
        }
    }
}

/// How long a call of `attempts` tries may take in all: a single try is what a shutdown (forced, or
/// out of drain time) can afford, and it does not wait on a server that does not answer.
fn time_limit(attempts: u32) -> Duration {
    if attempts <= 1 {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(120)
    }
}

/// Tries of the calls that end an item: one when the worker is being forced to quit.
fn attempts(phase: Phase) -> u32 {
    if phase == Phase::Forced {
        1
    } else {
        5
    }
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
