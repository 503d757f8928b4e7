//! What the worker tells people: log lines on stderr, written through `tracing` like the server's (the
//! same text and JSON shapes, `TETHER_LOG` for the level), and on a terminal a live status line under
//! them — what the claim loop is doing, the items running with their age, done/failed counts. On a
//! terminal or off it, everything goes to stderr without ever blocking the worker
//! ([`crate::logsink`]): the status line is drawn through it too ([`LossyTerminal`]), so a terminal
//! that stops taking output (Ctrl-S, a stopped pager) stops no heartbeat.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

use crate::LogFormat;

/// What the claim loop is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activity {
    Starting,
    Polling,
    /// Every slot is taken.
    Full,
    /// Waiting before the next poll, and why.
    Backoff(Holdup, Duration),
    Draining,
}

/// Why the claim loop waits before its next poll: the status line names it, so that a worker whose
/// server is fine is not shown as cut off from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holdup {
    /// The poll failed: no answer, or an error answer that another try may fix.
    PollFailed,
    /// PROGRAM cannot run (removed, replaced, made non-executable): nothing is claimed until it can.
    ProgramCannotRun,
    /// The server handed out an item the worker will not run.
    RefusedItem,
}

/// How an item ended, for the counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The program exited 0.
    Done,
    /// The program failed (non-zero exit, killed, could not start) or was stopped before it finished.
    Failed,
    /// The lease was lost: the item is someone else's now.
    Lost,
    /// Nothing ran (refused ack, unknown work type).
    Skipped,
}

#[derive(Debug)]
struct State {
    activity: Activity,
    concurrency: usize,
    running: BTreeMap<String, Instant>,
    done: u64,
    failed: u64,
    lost: u64,
}

struct Inner {
    format: LogFormat,
    bar: Option<ProgressBar>,
    state: Mutex<State>,
}

/// Shared by every part of the worker; cheap to clone.
#[derive(Clone)]
pub struct Reporter {
    inner: Arc<Inner>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Reporter {
    /// A status line is drawn only for text logs on a terminal; anything else gets plain lines.
    pub fn new(format: LogFormat, concurrency: usize) -> Reporter {
        let _ = crate::logsink::FORMAT.set(format);
        let live = matches!(format, LogFormat::Text) && std::io::stderr().is_terminal();
        let bar = live.then(|| {
            let target =
                ProgressDrawTarget::term_like_with_hz(Box::new(LossyTerminal::default()), 20);
            let bar = ProgressBar::with_draw_target(None, target);
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            let _ = LIVE_BAR.set(bar.clone());
            bar
        });
        let reporter = Reporter {
            inner: Arc::new(Inner {
                format,
                bar,
                state: Mutex::new(State {
                    activity: Activity::Starting,
                    concurrency,
                    running: BTreeMap::new(),
                    done: 0,
                    failed: 0,
                    lost: 0,
                }),
            }),
        };
        if reporter.inner.bar.is_some() {
            // Ages change every second even when nothing else happens.
            let weak = Arc::downgrade(&reporter.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    match weak.upgrade() {
                        Some(inner) => Reporter { inner }.redraw(),
                        None => return,
                    }
                }
            });
        }
        reporter
    }

    pub fn info(&self, message: &str, fields: &[(&str, &str)]) {
        self.log(Level::Info, message, fields);
    }

    pub fn warn(&self, message: &str, fields: &[(&str, &str)]) {
        self.log(Level::Warn, message, fields);
    }

    pub fn error(&self, message: &str, fields: &[(&str, &str)]) {
        self.log(Level::Error, message, fields);
    }

    pub fn log(&self, level: Level, message: &str, fields: &[(&str, &str)]) {
        log_event(level, message, fields);
    }

    /// One line a program wrote, attributed to its item: as it is, prefixed with the item, in text
    /// logs; a log record in JSON logs.
    pub fn program_line(&self, work_id: &str, stream: &str, line: &str) {
        match self.inner.format {
            LogFormat::Text => self.emit(&program_text_line(work_id, line)),
            LogFormat::Json => log_event(
                Level::Info,
                "output",
                &[("work_id", work_id), ("stream", stream), ("line", line)],
            ),
        }
    }

    fn emit(&self, line: &str) {
        match &self.inner.bar {
            Some(bar) if in_the_foreground() => bar.println(line),
            _ => crate::logsink::stderr().line(format!("{line}\n").as_bytes()),
        }
    }

    pub fn activity(&self, activity: Activity) {
        self.update(|s| s.activity = activity);
    }

    pub fn started(&self, work_id: &str) {
        self.update(|s| {
            s.running.insert(work_id.to_owned(), Instant::now());
        });
    }

    pub fn finished(&self, work_id: &str, outcome: Outcome) {
        self.update(|s| {
            s.running.remove(work_id);
            match outcome {
                Outcome::Done => s.done += 1,
                Outcome::Failed => s.failed += 1,
                Outcome::Lost => s.lost += 1,
                Outcome::Skipped => {}
            }
        });
    }

    /// `N done, M failed[, L lost]`, for the last words.
    pub fn totals(&self) -> String {
        let s = self.lock();
        let mut out = format!("{} done, {} failed", s.done, s.failed);
        if s.lost > 0 {
            let _ = write!(out, ", {} lost", s.lost);
        }
        out
    }

    /// Removes the status line (before the last words).
    pub fn finish(&self) {
        if let Some(bar) = &self.inner.bar {
            bar.finish_and_clear();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.lock());
        self.redraw();
    }

    fn redraw(&self) {
        if let Some(bar) = &self.inner.bar {
            let text = status_text(&self.lock(), Instant::now());
            bar.set_message(text);
        }
    }
}

/// The terminal the status line is drawn on: what indicatif draws (text and the cursor movements of
/// the ANSI escapes a terminal's own drawing would send) is gathered and handed, at each flush, as one
/// piece to the lossy standard-error writer. A drawing that does not fit its buffer is dropped whole,
/// like any line; the next one redraws the status line.
#[derive(Debug, Default)]
struct LossyTerminal {
    pending: Mutex<Vec<u8>>,
}

impl LossyTerminal {
    fn put(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
        Ok(())
    }

    fn escape(&self, n: usize, code: char) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(format!("\x1b[{n}{code}").as_bytes())
    }
}

impl TermLike for LossyTerminal {
    /// The terminal's size is asked of the kernel (an `ioctl`, which never waits for a reader).
    fn width(&self) -> u16 {
        console::Term::stderr().size().1
    }

    fn height(&self) -> u16 {
        console::Term::stderr().size().0
    }

    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        self.escape(n, 'A')
    }

    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        self.escape(n, 'B')
    }

    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        self.escape(n, 'C')
    }

    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        self.escape(n, 'D')
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.put(s.as_bytes())?;
        self.put(b"\n")
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.put(s.as_bytes())
    }

    fn clear_line(&self) -> std::io::Result<()> {
        self.put(b"\r\x1b[2K")
    }

    fn flush(&self) -> std::io::Result<()> {
        let drawn = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if !drawn.is_empty() && in_the_foreground() {
            crate::logsink::stderr().line(&drawn);
        }
        Ok(())
    }
}

/// Whether the worker has its terminal to itself: not when it was started in the background of a
/// shell (`tether worker … &`), where a status line redrawn several times a second would be drawn
/// over the prompt and over what the foreground job prints. There, log lines go out plain, and
/// the status line comes back once the worker is brought to the foreground (`fg`). Asked of the
/// kernel (an `ioctl`) at each drawing.
fn in_the_foreground() -> bool {
    match nix::unistd::tcgetpgrp(std::io::stderr()) {
        Ok(foreground) => foreground == nix::unistd::getpgrp(),
        // No terminal (any more): the writer judges what to do with the drawing.
        Err(_) => true,
    }
}

/// The live status line, when there is one: log lines are printed above it.
static LIVE_BAR: std::sync::OnceLock<ProgressBar> = std::sync::OnceLock::new();

/// Where the worker's `tracing` output goes: above the status line on a terminal, else to stderr.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

/// One formatted record; written out whole when the formatter drops it.
pub struct LogLine(Vec<u8>);

impl std::io::Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        match LIVE_BAR.get() {
            Some(bar) if !bar.is_finished() && in_the_foreground() => {
                bar.println(String::from_utf8_lossy(&self.0).trim_end())
            }
            _ => crate::logsink::stderr().line(&self.0),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine(Vec::with_capacity(256))
    }
}

/// A worker log record through `tracing`. Field names must be known when the program is compiled, so
/// the worker's fields are listed here; a field not listed is kept in `detail`.
fn log_event(level: Level, message: &str, fields: &[(&str, &str)]) {
    const KNOWN: &[&str] = &[
        "work_id",
        "environment_id",
        "worker_id",
        "session_id",
        "server",
        "program",
        "concurrency",
        "error",
        "retry_in",
        "type",
        "id",
        "reason",
        "process_group",
        "status",
        "grace",
        "state",
        "active",
        "stopping",
        "stopped",
        "stream",
        "line",
        "max_idle",
        "detail",
    ];
    let get = |name: &str| fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let mut detail: Vec<String> = fields
        .iter()
        .filter(|(k, _)| !KNOWN.contains(k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    debug_assert!(detail.is_empty(), "unlisted log fields: {detail:?}");
    if let Some(d) = get("detail") {
        detail.insert(0, d.to_owned());
    }
    let detail = (!detail.is_empty()).then(|| detail.join(" "));
    macro_rules! event {
        ($level:expr) => {
            tracing::event!(
                target: "tether::worker",
                $level,
                work_id = get("work_id"),
                environment_id = get("environment_id"),
                worker_id = get("worker_id"),
                session_id = get("session_id"),
                server = get("server"),
                program = get("program"),
                concurrency = get("concurrency"),
                error = get("error"),
                retry_in = get("retry_in"),
                work_type = get("type"),
                data_id = get("id"),
                reason = get("reason"),
                process_group = get("process_group"),
                status = get("status"),
                grace = get("grace"),
                state = get("state"),
                active = get("active"),
                stopping = get("stopping"),
                stopped = get("stopped"),
                stream = get("stream"),
                line = get("line"),
                max_idle = get("max_idle"),
                detail = detail.as_deref(),
                "{message}"
            )
        };
    }
    match level {
        Level::Info => event!(tracing::Level::INFO),
        Level::Warn => event!(tracing::Level::WARN),
        Level::Error => event!(tracing::Level::ERROR),
    }
}

/// The status line, e.g. `polling · 2/4 running: …e1194 12s, …0a3b 3s · 5 done · 1 failed`.
fn status_text(s: &State, now: Instant) -> String {
    let mut out = match &s.activity {
        Activity::Starting => "starting".to_owned(),
        Activity::Polling => "polling".to_owned(),
        Activity::Full => "all slots busy".to_owned(),
        Activity::Backoff(holdup, d) => {
            let why = match holdup {
                Holdup::PollFailed => "poll failed",
                Holdup::ProgramCannotRun => "PROGRAM cannot run",
                Holdup::RefusedItem => "refused an item",
            };
            format!("{why}, retrying in {}s", d.as_secs())
        }
        Activity::Draining => "draining (no new work)".to_owned(),
    };
    let _ = write!(out, " · {}/{} running", s.running.len(), s.concurrency);
    const SHOWN: usize = 3;
    if !s.running.is_empty() {
        let mut items: Vec<(&String, &Instant)> = s.running.iter().collect();
        // Longest-running first: those are the ones people ask about.
        items.sort_by_key(|(_, started)| **started);
        let listed: Vec<String> = items
            .iter()
            .take(SHOWN)
            .map(|(id, started)| {
                format!(
                    "{} {}",
                    short_id(id),
                    age(now.saturating_duration_since(**started))
                )
            })
            .collect();
        let _ = write!(out, ": {}", listed.join(", "));
        if items.len() > SHOWN {
            let _ = write!(out, " (+{} more)", items.len() - SHOWN);
        }
    }
    let _ = write!(out, " · {} done · {} failed", s.done, s.failed);
    if s.lost > 0 {
        let _ = write!(out, " · {} lost", s.lost);
    }
    out
}

/// The tail of an id: the part that tells items apart (the head is the prefix and a timestamp).
fn short_id(id: &str) -> String {
    let tail: String = id
        .chars()
        .rev()
        .take(6)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("…{tail}")
}

fn age(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// A line of a program's output as the text log shows it, its control characters other than tabs
/// escaped ([`tether_client::text::printable`]): the output carries what others wrote (a session's
/// messages, a command's output).
fn program_text_line(work_id: &str, line: &str) -> String {
    format!(
        "[{work_id}] {}",
        tether_client::text::printable(line, &['\t'])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_programs_escape_sequences_and_carriage_returns_reach_the_text_log_escaped() {
        let forged = "hello\u{1b}[2J\u{1b}]0;TITLE\u{7} cr\rFAKE INFO tether::worker: forged\tend";
        assert_eq!(
            program_text_line("work_1", forged),
            "[work_1] hello\\u{1b}[2J\\u{1b}]0;TITLE\\u{7} cr\\rFAKE INFO tether::worker: forged\tend"
        );
        assert_eq!(program_text_line("work_1", "plain é"), "[work_1] plain é");
    }

    #[test]
    fn the_terminal_gathers_a_drawing_until_it_is_flushed() {
        let terminal = LossyTerminal::default();
        terminal.clear_line().unwrap();
        terminal.move_cursor_up(2).unwrap();
        terminal.move_cursor_down(0).unwrap();
        terminal.write_line("log line").unwrap();
        terminal.write_str("⠁ polling").unwrap();
        assert_eq!(
            String::from_utf8(terminal.pending.lock().unwrap().clone()).unwrap(),
            "\r\x1b[2K\x1b[2Alog line\n⠁ polling"
        );
        terminal.flush().unwrap();
        assert!(terminal.pending.lock().unwrap().is_empty());
    }

    #[test]
    fn the_status_line_lists_the_oldest_items_and_the_counts() {
        let now = Instant::now();
        let mut running = BTreeMap::new();
        for (id, secs) in [
            ("work_aaaaaa111111", 5),
            ("work_bbbbbb222222", 75),
            ("work_cccccc333333", 1),
            ("work_dddddd444444", 3),
        ] {
            running.insert(id.to_owned(), now - Duration::from_secs(secs));
        }
        let state = State {
            activity: Activity::Full,
            concurrency: 4,
            running,
            done: 7,
            failed: 1,
            lost: 0,
        };
        assert_eq!(
            status_text(&state, now),
            "all slots busy · 4/4 running: …222222 1m15s, …111111 5s, …444444 3s (+1 more) · 7 done · 1 failed"
        );
        let idle = State {
            activity: Activity::Polling,
            concurrency: 1,
            running: BTreeMap::new(),
            done: 0,
            failed: 0,
            lost: 2,
        };
        assert_eq!(
            status_text(&idle, now),
            "polling · 0/1 running · 0 done · 0 failed · 2 lost"
        );
    }

    /// A worker waiting for its PROGRAM to come back is not waiting for the server.
    #[test]
    fn the_status_line_says_why_the_worker_waits() {
        let waiting = |holdup| State {
            activity: Activity::Backoff(holdup, Duration::from_secs(4)),
            concurrency: 1,
            running: BTreeMap::new(),
            done: 0,
            failed: 0,
            lost: 0,
        };
        let now = Instant::now();
        assert_eq!(
            status_text(&waiting(Holdup::ProgramCannotRun), now),
            "PROGRAM cannot run, retrying in 4s · 0/1 running · 0 done · 0 failed"
        );
        assert_eq!(
            status_text(&waiting(Holdup::PollFailed), now),
            "poll failed, retrying in 4s · 0/1 running · 0 done · 0 failed"
        );
    }
}
