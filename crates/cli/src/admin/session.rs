//! `tether session …`.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand, ValueEnum};
use tether_client::{
    event_type, AgentRef, Client, CreateSession, Event, ListEvents, ListSessions, NewEvent, Order,
    Session, UpdateSession,
};

use super::events::{self, Ending, Renderer, BEFORE_FIRST_EVENT};
use super::output::{self, Table};
use super::{env_var, key_value, Ctx, MetadataPatchArgs, PageArgs};

#[derive(Subcommand, Debug)]
pub enum SessionCommand {
    /// Create a session (on a self-hosted environment this queues work for a worker).
    Create(CreateArgs),
    /// List sessions.
    List(ListArgs),
    /// Show one session.
    Get {
        /// The session (sess_…).
        id: String,
    },
    /// Change a session's title or metadata.
    Update(UpdateArgs),
    /// Archive a session (its running work is stopped).
    Archive {
        /// The session (sess_…).
        id: String,
    },
    /// Delete a session and its events (its running work is stopped).
    Delete {
        /// The session (sess_…).
        id: String,
    },
    /// Send a user message: on an idle session it starts a turn, which a worker serves.
    Send(SendArgs),
    /// Follow a session's events as they happen, one line each (times in UTC), until the session is
    /// deleted or terminated, or Ctrl-C. With --json, one JSON object per line.
    Watch(WatchArgs),
    /// List a session's events (oldest first unless --order desc).
    Events(EventsArgs),
    /// Interrupt the running turn (sends user.interrupt; the agent stops what it is doing).
    Cancel {
        /// The session (sess_…).
        id: String,
    },
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// The session (sess_…).
    id: String,
    /// The message; `-` reads it from standard input.
    text: String,
    /// Then show the turn's events as they happen, and return when the turn ends.
    #[arg(long)]
    wait: bool,
    /// With --wait, give up after this long (30, 30s, 500ms, 2m) and exit with an error; the
    /// message stays sent.
    #[arg(long, requires = "wait", value_parser = crate::worker::parse_duration)]
    timeout: Option<Duration>,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The session (sess_…).
    id: String,
    /// Show the whole log first instead of only what happens from now on.
    #[arg(long)]
    from_start: bool,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// The session (sess_…).
    id: String,
    /// asc (oldest first, the default) or desc (newest first).
    #[arg(long, value_enum)]
    order: Option<OrderArg>,
    #[command(flatten)]
    page: PageArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OrderArg {
    Asc,
    Desc,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The agent (agent_…).
    #[arg(long)]
    agent: String,
    /// Pin this version of the agent instead of its current one.
    #[arg(long)]
    agent_version: Option<u32>,
    /// The environment (env_…).
    #[arg(long = "env", visible_alias = "environment")]
    environment: String,
    /// Title.
    #[arg(long)]
    title: Option<String>,
    /// Metadata entry KEY=VALUE (repeatable; copied into the session's work items).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    /// Environment variable KEY=VALUE for the commands the agent runs (repeatable; KEY of letters,
    /// digits and `_`, not starting with a digit). Stored in the session's
    /// `environment_variables`, where the agent's program reads it; the worker does not add it to
    /// the program's own environment.
    #[arg(long = "env-var", value_name = "KEY=VALUE", value_parser = env_var)]
    env_vars: Vec<(String, String)>,
    /// A first user message, so that the first turn starts at once.
    #[arg(long)]
    message: Option<String>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only sessions on this environment.
    #[arg(long = "env", visible_alias = "environment")]
    environment: Option<String>,
    /// Only sessions of this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Only sessions in this status (repeatable, or several separated by commas).
    #[arg(long = "status", value_name = "STATUS", value_delimiter = ',',
          value_parser = tether_core::session::SessionStatus::ALL.map(|s| s.as_str()))]
    statuses: Vec<String>,
    /// Include archived sessions.
    #[arg(long)]
    include_archived: bool,
    #[command(flatten)]
    page: PageArgs,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// The session (sess_…).
    id: String,
    /// New title.
    #[arg(long)]
    title: Option<String>,
    #[command(flatten)]
    metadata: MetadataPatchArgs,
}

impl UpdateArgs {
    /// See [`super::nothing_to_update`].
    pub fn nothing_to_update(&self) -> Option<String> {
        let changes = self.title.is_some() || self.metadata.patch().is_some();
        super::nothing_to_update(changes, "--title, --metadata or --unset-metadata")
    }
}

pub async fn run(cx: Ctx, command: SessionCommand) -> Result<()> {
    let client = &cx.client;
    match command {
        SessionCommand::Create(args) => {
            let agent = match args.agent_version {
                Some(version) => AgentRef::Version {
                    id: args.agent,
                    version,
                },
                None => AgentRef::Id(args.agent),
            };
            let mut body = CreateSession::new(agent, args.environment);
            body.title = args.title;
            body.metadata = args.metadata.into_iter().collect();
            body.environment_variables = args.env_vars.into_iter().collect();
            let body = body.with_initial_events(args.message.map(NewEvent::user_message));
            let session = client.create_session(&body).await?;
            cx.emit(&session, || show(&session));
            if let Some(env) = cloud_environment(client, &session.environment_id).await {
                eprintln!(
                    "note: environment {env} is a cloud environment, whose sessions Tether stores \
                     but runs nothing for: no work item is queued and no worker serves it (a \
                     self_hosted environment's sessions are what `tether worker` runs)"
                );
            }
        }
        SessionCommand::List(args) => {
            let page = args
                .page
                .fetch(|list| {
                    let client = client.clone();
                    let params = ListSessions {
                        list,
                        agent_id: args.agent.clone(),
                        environment_id: args.environment.clone(),
                        statuses: args.statuses.iter().map(|s| s.as_str().into()).collect(),
                        include_archived: args.include_archived,
                        ..Default::default()
                    };
                    async move { client.list_sessions(&params).await }
                })
                .await?;
            cx.emit_list(&page, "No sessions.", table);
        }
        SessionCommand::Get { id } => {
            let session = client.get_session(&id).await?;
            cx.emit(&session, || show(&session));
        }
        SessionCommand::Update(args) => {
            let body = UpdateSession {
                title: args.title,
                metadata: args.metadata.patch(),
            };
            let session = client.update_session(&args.id, &body).await?;
            cx.emit(&session, || show(&session));
        }
        SessionCommand::Archive { id } => {
            let session = client.archive_session(&id).await?;
            cx.emit(&session, || format!("Archived session {}.\n", session.id));
        }
        SessionCommand::Delete { id } => {
            let deleted = client.delete_session(&id).await?;
            cx.emit(&deleted, || format!("Deleted session {}.\n", deleted.id));
        }
        SessionCommand::Cancel { id } => {
            let cancel = client.cancel_session(&id).await?;
            cx.emit(&cancel, || {
                if cancel.is_canceling() {
                    // The server only records the interrupt; the session's program acts on it.
                    format!(
                        "Interrupting the running turn of session {}: sent user.interrupt, which \
                         the program serving the session acts on (one that does not read it runs \
                         on until it ends the turn).\n",
                        cancel.id
                    )
                } else {
                    format!(
                        "Session {} is not running a turn (status {}); nothing to interrupt.\n",
                        cancel.id, cancel.status
                    )
                }
            });
        }
        SessionCommand::Send(args) => send(&cx, args).await?,
        SessionCommand::Watch(args) => watch(&cx, args).await?,
        SessionCommand::Events(args) => {
            let order = args.order.map(|o| match o {
                OrderArg::Asc => Order::Asc,
                OrderArg::Desc => Order::Desc,
            });
            let page = args
                .page
                .fetch(|list| {
                    let client = client.clone();
                    let id = args.id.clone();
                    async move { client.list_events(&id, &ListEvents { list, order }).await }
                })
                .await?;
            let renderer = Renderer::for_stdout();
            cx.emit_list(&page, "No events.", |events| {
                events.iter().map(|e| renderer.render(e)).collect()
            });
        }
    }
    Ok(())
}

async fn send(cx: &Ctx, args: SendArgs) -> Result<()> {
    let text = if args.text == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the message from standard input")?;
        // `echo cmd | tether session send S -` should send `cmd`, not `cmd` and a line break.
        if text.ends_with('\n') {
            text.pop();
        }
        text
    } else {
        args.text
    };
    if text.trim().is_empty() {
        bail!("the message is empty");
    }
    if args.wait {
        // No worker would ever end the turn: say so rather than wait for ever.
        let session = cx.client.get_session(&args.id).await?;
        if let Some(env) = cloud_environment(&cx.client, &session.environment_id).await {
            bail!(
                "session {} is in cloud environment {env}, where Tether runs nothing: its turn \
                 would never end. Send without --wait to store the message",
                output::printable(&args.id, &[])
            );
        }
    }
    let stored = cx
        .client
        .send_events(&args.id, &[NewEvent::user_message(text)])
        .await?;
    let sent = stored
        .into_iter()
        .next()
        .context("the server answered without the stored event")?;
    if !args.wait {
        cx.emit(&sent, || {
            format!("Sent {} to session {}.\n", sent.id, args.id)
        });
        return Ok(());
    }
    let printer = Printer::new(cx.json);
    if !printer.print(&sent) {
        return Ok(());
    }
    let mut outcome = TurnOutcome::default();
    // Resuming after the message itself shows exactly this turn, however quickly a worker answered.
    let following = events::follow(&cx.client, &args.id, sent.id.clone(), |event| {
        outcome.note(event);
        printer.print(event) && event.kind != event_type::SESSION_STATUS_IDLE
    });
    let deadline = async {
        match args.timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    let hinted = AtomicBool::new(false);
    let ending = tokio::select! {
        ending = following => ending?,
        _ = tokio::signal::ctrl_c() => return Ok(()),
        () = hint_when_nobody_serves(&cx.client, &args.id, &hinted) => {
            unreachable!("it never returns")
        }
        () = deadline => {
            // A timeout shorter than the hint's delay would otherwise end without saying why.
            // Bounded: a server that does not answer must not hold the timeout up.
            let look = tokio::time::timeout(UNSERVED_LOOK_WITHIN, nobody_serves(&cx.client, &args.id));
            let why = match hinted.load(Ordering::Relaxed) {
                true => None,
                false => look.await.ok().and_then(|looked| looked.ok().flatten()),
            };
            let why = why.map_or_else(String::new, |env| {
                format!(", and has not started: {}", unserved(&env))
            });
            bail!(
                "the turn did not end within {:?}{why} (the message stays sent; `tether session \
                 watch {}` follows the session)",
                args.timeout.unwrap_or_default(),
                args.id
            )
        }
    };
    match ending {
        Ending::Done => match outcome.failure() {
            None => Ok(()),
            Some(why) => bail!("the turn failed: {why}"),
        },
        Ending::Deleted => bail!("the session was deleted before the turn ended"),
        Ending::Terminated => bail!("the session was terminated before the turn ended"),
    }
}

/// How a turn `send --wait` follows ended: the stop reason of its `session.status_idle`, and the
/// last `session.error` before it.
#[derive(Debug, Default)]
struct TurnOutcome {
    stop_reason: Option<String>,
    last_error: Option<String>,
}

impl TurnOutcome {
    fn note(&mut self, event: &Event) {
        let field = |path: &[&str]| {
            let mut value = event.fields.get(path[0])?;
            for key in &path[1..] {
                value = value.get(key)?;
            }
            value.as_str().map(str::to_owned)
        };
        match event.kind.as_str() {
            event_type::SESSION_ERROR => {
                self.last_error = Some(
                    match (field(&["error", "type"]), field(&["error", "message"])) {
                        (Some(kind), Some(message)) => format!("{kind}: {message}"),
                        (kind, message) => {
                            message.or(kind).unwrap_or_else(|| "an error".to_owned())
                        }
                    },
                );
            }
            event_type::SESSION_STATUS_IDLE => {
                self.stop_reason = field(&["stop_reason", "type"]);
            }
            _ => {}
        }
    }

    /// Why the turn failed, when it did: a turn that ended (`end_turn`) or waits for the user
    /// (`requires_action`) succeeded; any other stop reason (`error`, `retries_exhausted`, …) did not.
    fn failure(&self) -> Option<String> {
        let reason = self.stop_reason.as_deref()?;
        if matches!(reason, "end_turn" | "requires_action") {
            return None;
        }
        // Shown escaped by `main`, with every error message.
        Some(match &self.last_error {
            Some(error) => format!("{reason} ({error})"),
            None => reason.to_owned(),
        })
    }
}

/// How long a turn may wait for a worker before `send --wait` looks for one.
const QUEUED_HINT_AFTER: Duration = Duration::from_secs(5);
/// How long a `send --wait` that timed out looks for why the turn has not started.
const UNSERVED_LOOK_WITHIN: Duration = Duration::from_secs(2);
/// How often it looks again, until it has said something.
const QUEUED_HINT_EVERY: Duration = Duration::from_secs(30);

/// While `send --wait` waits: says once, on standard error, when the session's environment has
/// queued work, nothing running, and no worker that polled in the last 5 minutes (the workers
/// listing's window), so that the wait is not silent when it would be endless. Never returns.
async fn hint_when_nobody_serves(client: &Client, session_id: &str, hinted: &AtomicBool) {
    tokio::time::sleep(QUEUED_HINT_AFTER).await;
    loop {
        // A failed look is no reason to disturb the wait: the next one may work.
        if let Ok(Some(env)) = nobody_serves(client, session_id).await {
            eprintln!(
                "(the turn has not started: {}. Still waiting; Ctrl-C to stop.)",
                unserved(&env)
            );
            hinted.store(true, Ordering::Relaxed);
            break;
        }
        tokio::time::sleep(QUEUED_HINT_EVERY).await;
    }
    std::future::pending().await
}

/// `env` (printable), when it is a cloud environment: stored, never run (SPEC §0). `None` also
/// when it cannot be read: the note it serves is no reason to fail.
async fn cloud_environment(client: &Client, env: &str) -> Option<String> {
    let environment = client.get_environment(env).await.ok()?;
    // Only one that says so: another platform's environment without a `type` is not refused.
    (environment.kind() == Some("cloud")).then(|| output::printable(env, &[]))
}

/// Why a turn in environment `env` has not started, when [`nobody_serves`] says so.
fn unserved(env: &str) -> String {
    format!(
        "its work item is queued and no worker has polled environment {env} in the last 5 \
         minutes; start one with `tether worker --environment {env}`",
        env = output::printable(env, &[])
    )
}

/// The session's environment, when it has queued items, none starting, active or stopping (so the
/// session's own item, if any, is queued: no program holds it), and no worker seen polling.
async fn nobody_serves(client: &Client, session_id: &str) -> tether_client::Result<Option<String>> {
    let session = client.get_session(session_id).await?;
    let env = session.environment_id;
    let stats = client.work_stats(&env).await?;
    let running = ["starting", "active", "stopping"]
        .iter()
        .any(|state| stats.states.get(*state).copied().unwrap_or(0) > 0);
    if stats.depth + stats.pending == 0 || running {
        return Ok(None);
    }
    let workers = client.list_workers(&env).await?;
    Ok(workers.is_empty().then_some(env))
}

async fn watch(cx: &Ctx, args: WatchArgs) -> Result<()> {
    let session = cx.client.get_session(&args.id).await?;
    // An explicit starting point (rather than "whatever is new when the stream opens") means that
    // events written while the stream connects, or while it reconnects, are never lost.
    let after = if args.from_start {
        BEFORE_FIRST_EVENT.to_owned()
    } else {
        events::newest_event(&cx.client, &session.id).await?
    };
    // On standard error, so that it never mixes with the events; it also tells a script that
    // everything from here on will be shown.
    eprintln!(
        "Watching session {} (status {}); times are UTC; Ctrl-C to stop.",
        output::printable(&session.id, &[]),
        session.status
    );
    let printer = Printer::new(cx.json);
    let following = events::follow(&cx.client, &session.id, after, |event| printer.print(event));
    let ending = tokio::select! {
        ending = following => ending?,
        _ = tokio::signal::ctrl_c() => return Ok(()),
    };
    match ending {
        Ending::Deleted => eprintln!("(session {} was deleted)", session.id),
        Ending::Terminated => eprintln!("(session {} is terminated)", session.id),
        Ending::Done => {}
    }
    Ok(())
}

/// Prints events as they arrive: readable lines, or one JSON object per line with --json.
struct Printer {
    json: bool,
    renderer: Renderer,
}

impl Printer {
    fn new(json: bool) -> Printer {
        Printer {
            json,
            renderer: Renderer::for_stdout(),
        }
    }

    /// Whether printing worked; a closed pipe (`… | head`) ends the command quietly.
    fn print(&self, event: &Event) -> bool {
        let text = if self.json {
            let mut line = serde_json::to_string(event).expect("events always serialize");
            line.push('\n');
            line
        } else {
            self.renderer.render(event)
        };
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_ok()
    }
}

fn show(session: &Session) -> String {
    output::fields(&[
        ("id", session.id.clone()),
        ("status", session.status.to_string()),
        ("title", output::or_dash(session.title.as_deref())),
        (
            "agent",
            format!("{} (version {})", session.agent_id, session.agent.version),
        ),
        ("environment", session.environment_id.clone()),
        ("metadata", output::map(&session.metadata)),
        ("env vars", output::map(&session.environment_variables)),
        ("created", output::time(Some(&session.created_at))),
        ("updated", output::time(Some(&session.updated_at))),
        ("archived", output::time(session.archived_at.as_deref())),
    ])
}

fn table(sessions: &[Session]) -> String {
    let mut t = Table::new(&["ID", "STATUS", "AGENT", "ENVIRONMENT", "TITLE", "CREATED"]);
    for s in sessions {
        t.row(vec![
            s.id.clone(),
            s.status.to_string(),
            s.agent_id.clone(),
            s.environment_id.clone(),
            output::or_dash(s.title.as_deref()),
            output::time(Some(&s.created_at)),
        ]);
    }
    t.render()
}
