//! `tether-shell-agent`: a small agent for `tether worker`. It serves one work item's session: each
//! `user.message` is run as a shell command (`sh -c TEXT`) in the working directory, and the command
//! and its output go back to the session as events. It executes whatever the session's user sends
//! (see README.md).
//!
//! One turn, as events: `agent.tool_use {name: "shell", input: {command}}`, then `agent.tool_result`
//! naming it, a short `agent.message`, and `session.status_idle {stop_reason: end_turn}`. After a turn it
//! waits for more input and exits once it has been idle for `--max-idle`; the worker then stops the item.

mod command;

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use tether_client::{
    event_type, Client, Event, ListEvents, ListParams, NewEvent, Order, SessionStatus, API_PREFIX,
};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use command::{Ending, Limits, Outcome};

macro_rules! log {
    ($($arg:tt)*) => { eprintln!("tether-shell-agent: {}", format_args!($($arg)*)) };
}

/// Runs each user message of a Tether session as a shell command and posts the output back.
///
/// Started by `tether worker … -- tether-shell-agent`, which sets the TETHER_* variables. It runs
/// whatever the session's user sends, in the current directory, as the user it runs as.
#[derive(Parser, Debug)]
#[command(name = "tether-shell-agent", version)]
struct Args {
    /// The API base URL, including the API prefix (e.g. http://127.0.0.1:4780/api/v1/cloud).
    #[arg(long, env = "TETHER_API_URL")]
    api_url: String,
    /// A PEM file of certificate authorities to trust besides the system's (set by `tether worker
    /// --ca-cert`).
    #[arg(long, env = "TETHER_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// The session to serve (sess_…).
    #[arg(long, env = "TETHER_SESSION_ID")]
    session_id: String,
    /// The work item's session token (tth_ses_…); prefer the variable, which `ps` does not show.
    #[arg(long, env = "TETHER_SESSION_TOKEN", hide_env_values = true)]
    session_token: String,
    /// Exit after this long without input once the last turn has ended (e.g. 60, 90s, 5m; 0 = never).
    #[arg(long, env = "TETHER_AGENT_MAX_IDLE", default_value = "60s", value_parser = parse_duration)]
    max_idle: Duration,
    /// Kill a command still running after this long (0 = no limit).
    #[arg(long, env = "TETHER_AGENT_COMMAND_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    command_timeout: Duration,
    /// Send at most this many bytes of a command's output; the rest is cut off with a note.
    #[arg(long, env = "TETHER_AGENT_MAX_OUTPUT", default_value_t = 64 * 1024)]
    max_output: usize,
}

/// `90`, `90s`, `1.5m`, `500ms`, `2h`; a bare number is seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (like 60, 90s, 5m, 500ms)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    // `tether worker` writes the work item's JSON to standard input; everything needed is in the
    // environment, so it is read and dropped, which keeps the worker from blocking on a full pipe.
    if !std::io::stdin().is_terminal() {
        std::thread::spawn(|| std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink()));
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Input that matters to the agent, read from the session's event stream.
#[derive(Debug)]
enum Input {
    Message(Message),
    Interrupt,
    /// Nothing more will come: the session is gone, or the token no longer works.
    End {
        reason: String,
        failure: bool,
    },
}

#[derive(Clone, Debug)]
struct Message {
    id: String,
    text: Option<String>,
}

impl Message {
    fn of(event: &Event) -> Message {
        Message {
            id: event.id.clone(),
            text: event.text(),
        }
    }
}

/// What is left of the current turn when the agent starts: a previous process of this agent may have
/// served this session and stopped part-way (its lease was lost, it crashed).
#[derive(Debug, Default)]
struct Backlog {
    /// Messages not yet taken up, oldest first.
    messages: VecDeque<Message>,
    /// A turn started and has not ended.
    turn_open: bool,
    /// A command an earlier process started and never reported on.
    unfinished_tool_use: Option<String>,
}

impl Backlog {
    /// Reads the events since the last turn ended (oldest first).
    fn from_events(events: &[Event]) -> Backlog {
        let mut backlog = Backlog::default();
        for event in events {
            match event.kind.as_str() {
                event_type::USER_MESSAGE => {
                    backlog.turn_open = true;
                    backlog.messages.push_back(Message::of(event));
                }
                event_type::SESSION_STATUS_RUNNING => backlog.turn_open = true,
                event_type::USER_INTERRUPT => backlog.messages.clear(),
                // A command was already run for the oldest message: never run it twice.
                event_type::AGENT_TOOL_USE => {
                    backlog.messages.pop_front();
                    backlog.unfinished_tool_use = Some(event.id.clone());
                }
                event_type::AGENT_TOOL_RESULT => {
                    let answered = event.fields.get("tool_use_id").and_then(|v| v.as_str());
                    if answered == backlog.unfinished_tool_use.as_deref() {
                        backlog.unfinished_tool_use = None;
                    }
                }
                _ => {}
            }
        }
        backlog
    }
}

/// SIGTERM (the worker shutting down) or SIGINT (Ctrl-C when run by hand).
struct Shutdown {
    term: Signal,
    int: Signal,
}

impl Shutdown {
    fn new() -> Result<Shutdown> {
        Ok(Shutdown {
            term: signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// How serving one turn ended.
enum TurnEnd {
    Ended,
    Over { reason: String, failure: bool },
    Shutdown,
}

struct Agent {
    client: Client,
    session_id: String,
    cwd: PathBuf,
    /// The session's `environment_variables`, given to every command.
    env: BTreeMap<String, String>,
    limits: Limits,
}

async fn run(args: Args) -> Result<()> {
    let mut builder = Client::builder(args.api_url.clone())
        .prefix("")
        .token(args.session_token.clone());
    if let Some(path) = &args.ca_cert {
        builder = builder.ca_cert_file(path);
    }
    let client = builder
        .build()
        .context("invalid TETHER_API_URL or TETHER_CA_CERT")?;
    if !client.api_base_url().ends_with(API_PREFIX) {
        log!(
            "note: TETHER_API_URL {} does not end in {API_PREFIX}; using it as given",
            args.api_url
        );
    }
    let session = client
        .get_session(&args.session_id)
        .await
        .with_context(|| format!("cannot read session {}", args.session_id))?;
    if session.status == SessionStatus::Terminated {
        log!("session {} is terminated; nothing to do", session.id);
        return Ok(());
    }
    let agent = Agent {
        client,
        session_id: session.id.clone(),
        cwd: std::env::current_dir().context("no usable working directory")?,
        env: session.environment_variables.clone(),
        limits: Limits {
            timeout: (!args.command_timeout.is_zero()).then_some(args.command_timeout),
            max_output: args.max_output,
        },
    };
    let mut shutdown = Shutdown::new()?;
    let (backlog, newest) = agent.backlog().await?;
    log!(
        "serving session {} in {} ({} message(s) waiting)",
        agent.session_id,
        agent.cwd.display(),
        backlog.messages.len()
    );
    let (tx, rx) = mpsc::unbounded_channel();
    // The stream resumes after the newest event already read, so nothing falls between the two.
    tokio::spawn(feed(
        agent.client.clone(),
        agent.session_id.clone(),
        newest,
        tx,
    ));
    agent.serve(backlog, rx, args.max_idle, &mut shutdown).await
}

impl Agent {
    /// The events since the last turn ended, and the id of the newest event (the stream's starting
    /// point; a position before every event when the log is empty).
    async fn backlog(&self) -> Result<(Backlog, String)> {
        let mut newest = None;
        let mut since_last_turn = Vec::new();
        let mut cursor = None;
        'pages: loop {
            let params = ListEvents {
                list: ListParams {
                    limit: Some(100),
                    page: cursor.take(),
                    ..Default::default()
                },
                order: Some(Order::Desc),
            };
            let page = self
                .client
                .list_events(&self.session_id, &params)
                .await
                .context("cannot list the session's events")?;
            for event in page.data {
                newest.get_or_insert_with(|| event.id.clone());
                if event.kind == event_type::SESSION_STATUS_IDLE {
                    break 'pages;
                }
                since_last_turn.push(event);
            }
            match page.next_page.filter(|_| page.has_more) {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        since_last_turn.reverse();
        let newest = newest.unwrap_or_else(|| "evt_00000000000000000000000000000000".to_owned());
        Ok((Backlog::from_events(&since_last_turn), newest))
    }

    async fn serve(
        &self,
        backlog: Backlog,
        mut rx: mpsc::UnboundedReceiver<Input>,
        max_idle: Duration,
        shutdown: &mut Shutdown,
    ) -> Result<()> {
        if let Some(tool_use_id) = &backlog.unfinished_tool_use {
            self.post(vec![tool_result(
                tool_use_id,
                "The agent process running this command stopped before it reported; the command \
                 was not run again.",
                true,
            )])
            .await?;
        }
        let mut queue = backlog.messages;
        let mut turn_open = backlog.turn_open;
        let mut idle_since = Instant::now();
        let mut looked_again = false;
        loop {
            if turn_open || !queue.is_empty() {
                match self.turn(&mut queue, &mut rx, shutdown).await? {
                    TurnEnd::Ended => {}
                    TurnEnd::Over { reason, failure } => return over(reason, failure),
                    TurnEnd::Shutdown => return Ok(()),
                }
                turn_open = false;
                idle_since = Instant::now();
                looked_again = false;
                continue;
            }
            let deadline = idle_since + max_idle;
            let idle_over = async move {
                if max_idle.is_zero() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep_until(deadline).await;
            };
            let input = tokio::select! {
                input = rx.recv() => input,
                () = idle_over => {
                    // A message may have started a turn a moment ago, its event still on the way;
                    // leaving now would leave that turn to fail. Look once more before going.
                    if !looked_again && self.turn_started().await {
                        looked_again = true;
                        idle_since = Instant::now();
                        continue;
                    }
                    log!("idle for {} s; exiting", max_idle.as_secs_f64());
                    return Ok(());
                }
                () = shutdown.recv() => {
                    log!("asked to stop; exiting");
                    return Ok(());
                }
            };
            match input {
                Some(Input::Message(message)) => {
                    queue.push_back(message);
                    turn_open = true;
                }
                // Nothing is running.
                Some(Input::Interrupt) => {}
                Some(Input::End { reason, failure }) => return over(reason, failure),
                None => bail!("the event stream reader stopped"),
            }
        }
    }

    /// Whether the session is in a turn (a message arrived that the stream has not delivered yet).
    async fn turn_started(&self) -> bool {
        matches!(
            self.client.get_session(&self.session_id).await,
            Ok(s) if matches!(s.status, SessionStatus::Running | SessionStatus::Rescheduling)
        )
    }

    /// Serves the queued messages and ends the turn with `session.status_idle`.
    async fn turn(
        &self,
        queue: &mut VecDeque<Message>,
        rx: &mut mpsc::UnboundedReceiver<Input>,
        shutdown: &mut Shutdown,
    ) -> Result<TurnEnd> {
        if queue.is_empty() {
            self.post(vec![NewEvent::status_idle("end_turn")]).await?;
            return Ok(TurnEnd::Ended);
        }
        while let Some(message) = queue.pop_front() {
            let mut events = Vec::new();
            let command = message.text.clone().unwrap_or_default();
            if command.trim().is_empty() {
                events.push(NewEvent::agent_message(
                    "Nothing to run: the message has no text.",
                ));
            } else {
                log!("running {:?} (message {})", command, message.id);
                let stored = self
                    .post(vec![NewEvent::new(
                        event_type::AGENT_TOOL_USE,
                        json!({"name": "shell", "input": {"command": command}}),
                    )])
                    .await?;
                let tool_use_id = stored
                    .into_iter()
                    .next()
                    .context("the server answered without the stored tool call")?
                    .id;

                // While the command runs, input keeps arriving: an interrupt stops it, a message
                // waits its turn, the end of the session or a shutdown stops everything.
                let mut stop_reason = None;
                let mut later = Vec::new();
                let outcome = {
                    let stop = async {
                        loop {
                            tokio::select! {
                                input = rx.recv() => match input {
                                    Some(Input::Message(m)) => later.push(m),
                                    Some(Input::Interrupt) => {
                                        stop_reason = Some(TurnStop::Interrupt);
                                        return;
                                    }
                                    Some(Input::End { reason, failure }) => {
                                        stop_reason = Some(TurnStop::Over { reason, failure });
                                        return;
                                    }
                                    None => std::future::pending::<()>().await,
                                },
                                () = shutdown.recv() => {
                                    stop_reason = Some(TurnStop::Shutdown);
                                    return;
                                }
                            }
                        }
                    };
                    command::run(&command, &self.cwd, &self.env, self.limits, stop).await
                };
                queue.extend(later);
                log!("{}", outcome.summary());
                match stop_reason {
                    None => events.extend(report(&tool_use_id, &outcome)),
                    Some(TurnStop::Interrupt) => {
                        // The user asked to stop the turn: the messages after it are dropped too.
                        queue.clear();
                        events.extend(report(&tool_use_id, &outcome));
                    }
                    Some(TurnStop::Over { reason, failure }) => {
                        return Ok(TurnEnd::Over { reason, failure })
                    }
                    Some(TurnStop::Shutdown) => {
                        log!("asked to stop; the command was killed");
                        events.extend(report(&tool_use_id, &outcome));
                        events.push(NewEvent::agent_message(
                            "The agent is shutting down; send the message again to run more.",
                        ));
                        events.push(NewEvent::status_idle("error"));
                        self.post(events).await?;
                        return Ok(TurnEnd::Shutdown);
                    }
                }
            }
            if queue.is_empty() {
                // The result and the end of the turn in one request: a watcher never sees one
                // without the other.
                events.push(NewEvent::status_idle("end_turn"));
            }
            self.post(events).await?;
        }
        Ok(TurnEnd::Ended)
    }

    /// Posts events, retrying while the server is unreachable or overloaded.
    async fn post(&self, events: Vec<NewEvent>) -> Result<Vec<Event>> {
        const ATTEMPTS: u32 = 6;
        let mut pause = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            match self.client.send_events(&self.session_id, &events).await {
                Ok(stored) => return Ok(stored),
                Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                    log!("posting events failed ({e}); retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e).context("cannot post events to the session"),
            }
        }
    }
}

enum TurnStop {
    Interrupt,
    Over { reason: String, failure: bool },
    Shutdown,
}

fn over(reason: String, failure: bool) -> Result<()> {
    if failure {
        bail!(reason);
    }
    log!("{reason}; exiting");
    Ok(())
}

fn tool_result(tool_use_id: &str, text: &str, is_error: bool) -> NewEvent {
    NewEvent::new(
        event_type::AGENT_TOOL_RESULT,
        json!({
            "tool_use_id": tool_use_id,
            "content": [{"type": "text", "text": text}],
            "is_error": is_error,
        }),
    )
}

/// The result of a command and a sentence about it.
fn report(tool_use_id: &str, outcome: &Outcome) -> [NewEvent; 2] {
    let output = match &outcome.ending {
        Ending::FailedToStart(e) => format!("could not start `sh`: {e}"),
        _ => outcome.output.clone(),
    };
    [
        tool_result(tool_use_id, &output, outcome.is_error()),
        NewEvent::agent_message(outcome.summary()),
    ]
}

/// Follows the session's event stream from after `after` and hands on the input that matters. A
/// dropped connection is resumed with `Last-Event-ID`, so nothing is lost or seen twice.
async fn feed(
    client: Client,
    session_id: String,
    mut after: String,
    tx: mpsc::UnboundedSender<Input>,
) {
    const FIRST_PAUSE: Duration = Duration::from_millis(500);
    const LONGEST_PAUSE: Duration = Duration::from_secs(10);
    let mut pause = FIRST_PAUSE;
    let end = |reason: &str, failure: bool| Input::End {
        reason: reason.to_owned(),
        failure,
    };
    loop {
        match client.stream_events(&session_id, Some(&after)).await {
            Ok(mut stream) => {
                pause = FIRST_PAUSE;
                while let Some(item) = stream.next().await {
                    let event = match item.and_then(|sse| sse.into_event()) {
                        Ok(event) => event,
                        Err(tether_client::Error::Stream(e)) => {
                            log!("skipping an event that cannot be read: {e}");
                            continue;
                        }
                        Err(e) => {
                            log!("the event stream broke ({e}); resuming");
                            break;
                        }
                    };
                    let input = match event.kind.as_str() {
                        event_type::SESSION_DELETED => end("the session was deleted", false),
                        event_type::SESSION_STATUS_TERMINATED => {
                            end("the session was terminated", false)
                        }
                        event_type::USER_MESSAGE => Input::Message(Message::of(&event)),
                        event_type::USER_INTERRUPT => Input::Interrupt,
                        _ => {
                            after = event.id;
                            continue;
                        }
                    };
                    after = event.id;
                    let last = matches!(input, Input::End { .. });
                    if tx.send(input).is_err() || last {
                        return;
                    }
                }
                // The server ends a stream by itself only after a deletion or termination, which
                // the stream reports; otherwise it went away (a restart, a store failure).
                match client.get_session(&session_id).await {
                    Err(e) if e.is_not_found() => {
                        let _ = tx.send(end("the session was deleted", false));
                        return;
                    }
                    Ok(s) if s.status == SessionStatus::Terminated => {
                        let _ = tx.send(end("the session was terminated", false));
                        return;
                    }
                    _ => {}
                }
            }
            Err(e) if e.is_not_found() => {
                let _ = tx.send(end("the session was deleted", false));
                return;
            }
            Err(e) if e.is_retryable() => log!("cannot reach the server ({e}); retrying"),
            // The token dies when its item stops or goes to another worker: someone else serves
            // the session now, or no one should.
            Err(e) if e.status() == Some(401) => {
                let _ = tx.send(end(
                    "the work item's token is no longer accepted (the item was stopped or handed to another worker)",
                    false,
                ));
                return;
            }
            Err(e) => {
                let _ = tx.send(end(
                    &format!("cannot follow the session's events: {e}"),
                    true,
                ));
                return;
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, kind: &str, fields: serde_json::Value) -> Event {
        let mut value = fields;
        value["id"] = json!(id);
        value["type"] = json!(kind);
        serde_json::from_value(value).unwrap()
    }

    fn message(id: &str, text: &str) -> Event {
        event(
            id,
            "user.message",
            json!({"content": [{"type": "text", "text": text}]}),
        )
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn a_fresh_turn_waits_to_be_served() {
        let b = Backlog::from_events(&[
            message("evt_1", "ls"),
            event("evt_2", "session.status_running", json!({})),
        ]);
        assert_eq!(b.messages.len(), 1);
        assert_eq!(b.messages[0].text.as_deref(), Some("ls"));
        assert!(b.turn_open);
        assert_eq!(b.unfinished_tool_use, None);
    }

    #[test]
    fn a_command_an_earlier_process_started_is_not_run_again() {
        let b = Backlog::from_events(&[
            message("evt_1", "make deploy"),
            event("evt_2", "session.status_running", json!({})),
            event(
                "evt_3",
                "agent.tool_use",
                json!({"name": "shell", "input": {"command": "make deploy"}}),
            ),
        ]);
        assert!(b.messages.is_empty());
        assert!(b.turn_open);
        assert_eq!(b.unfinished_tool_use.as_deref(), Some("evt_3"));

        let answered = Backlog::from_events(&[
            message("evt_1", "ls"),
            event(
                "evt_3",
                "agent.tool_use",
                json!({"name": "shell", "input": {}}),
            ),
            event(
                "evt_4",
                "agent.tool_result",
                json!({"tool_use_id": "evt_3", "content": []}),
            ),
        ]);
        assert_eq!(answered.unfinished_tool_use, None);
        assert!(answered.turn_open);
    }

    #[test]
    fn an_interrupt_drops_what_waits() {
        let b = Backlog::from_events(&[
            message("evt_1", "ls"),
            event("evt_2", "user.interrupt", json!({})),
        ]);
        assert!(b.messages.is_empty());
        assert!(b.turn_open);
    }
}
