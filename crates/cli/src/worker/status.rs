//! What the worker tells people: log lines (text or JSON) on stderr, and on a terminal a live status line
//! under them — what the claim loop is doing, the items running with their age, done/failed counts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use tether_core::{Clock, SystemClock};

use crate::serve::LogFormat;

/// What the claim loop is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activity {
    Starting,
    Polling,
    /// Every slot is taken.
    Full,
    /// Waiting after a failed poll.
    Backoff(Duration),
    Draining,
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

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

impl Reporter {
    /// A status line is drawn only for text logs on a terminal; anything else gets plain lines.
    pub fn new(format: LogFormat, concurrency: usize) -> Reporter {
        let live = matches!(format, LogFormat::Text) && std::io::stderr().is_terminal();
        let bar = live.then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
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
        let now = SystemClock.now().to_rfc3339();
        let line = match self.inner.format {
            LogFormat::Text => text_line(&now, level, message, fields),
            LogFormat::Json => json_line(&now, level, message, fields),
        };
        self.emit(&line);
    }

    /// One line a program wrote, attributed to its item.
    pub fn program_line(&self, work_id: &str, stream: &str, line: &str) {
        let text = match self.inner.format {
            LogFormat::Text => format!("[{work_id}] {line}"),
            LogFormat::Json => json_line(
                &SystemClock.now().to_rfc3339(),
                Level::Info,
                "output",
                &[("work_id", work_id), ("stream", stream), ("line", line)],
            ),
        };
        self.emit(&text);
    }

    fn emit(&self, line: &str) {
        match &self.inner.bar {
            Some(bar) => bar.println(line),
            None => {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{line}");
            }
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

/// The status line, e.g. `polling · 2/4 running: …e1194 12s, …0a3b 3s · 5 done · 1 failed`.
fn status_text(s: &State, now: Instant) -> String {
    let mut out = match &s.activity {
        Activity::Starting => "starting".to_owned(),
        Activity::Polling => "polling".to_owned(),
        Activity::Full => "all slots busy".to_owned(),
        Activity::Backoff(d) => format!("server unreachable, retrying in {}s", d.as_secs()),
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

fn text_line(now: &str, level: Level, message: &str, fields: &[(&str, &str)]) -> String {
    let mut out = format!("{now} {:<5} {message}", level.as_str().to_uppercase());
    for (k, v) in fields {
        if v.is_empty() || v.contains(char::is_whitespace) || v.contains('"') {
            let _ = write!(out, " {k}={v:?}");
        } else {
            let _ = write!(out, " {k}={v}");
        }
    }
    out
}

fn json_line(now: &str, level: Level, message: &str, fields: &[(&str, &str)]) -> String {
    let mut map = Map::new();
    map.insert("ts".into(), json!(now));
    map.insert("level".into(), json!(level.as_str()));
    map.insert("msg".into(), json!(message));
    for (k, v) in fields {
        map.insert((*k).to_owned(), json!(v));
    }
    Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn log_lines_quote_what_needs_it() {
        assert_eq!(
            text_line(
                "T",
                Level::Warn,
                "lease lost",
                &[("work_id", "work_1"), ("reason", "no heartbeat")]
            ),
            "T WARN  lease lost work_id=work_1 reason=\"no heartbeat\""
        );
        let v: Value =
            serde_json::from_str(&json_line("T", Level::Info, "claimed", &[("work_id", "w")]))
                .unwrap();
        assert_eq!(
            v,
            json!({"ts": "T", "level": "info", "msg": "claimed", "work_id": "w"})
        );
    }
}
