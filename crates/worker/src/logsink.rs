//! The worker's standard error, written from a thread of its own so that a reader that stops reading
//! (a full pipe, a stopped pager) never blocks the worker: its log records and its programs' output
//! wait in a bounded buffer of [`BUFFERED_LINES`] lines, and what does not fit is dropped and counted
//! (`tracing-appender`'s lossy non-blocking writer). The count is reported, in the log's own format,
//! with the next line the reader takes once it reads again.
//!
//! A blocking write there used to stop a runtime thread, hence the heartbeats, until the dead man's
//! switch ended the worker and every program it ran.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::LogFormat;

/// Lines that may wait for standard error. A line is at most 16 KiB of program output
/// ([`crate::program::MAX_LOG_LINE`]) with its prefix, or one log record, so the buffer holds at most
/// about 16 MiB (JSON escaping aside), and usually well under 1 MiB.
pub const BUFFERED_LINES: usize = 1024;

/// A lossy, non-blocking writer of whole lines to `destination`, and the guard whose drop flushes it.
pub(crate) struct Lossy {
    writer: NonBlocking,
    guard: Mutex<Option<WorkerGuard>>,
}

impl Lossy {
    pub(crate) fn new(
        destination: impl Write + Send + 'static,
        lines: usize,
        format: &'static OnceLock<LogFormat>,
    ) -> Lossy {
        let counter = Arc::new(OnceLock::new());
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(lines)
            .thread_name("tether-stderr")
            .finish(Counted {
                destination,
                dropped: Arc::clone(&counter),
                told: 0,
                format,
            });
        let _ = counter.set(writer.error_counter());
        Lossy {
            writer,
            guard: Mutex::new(Some(guard)),
        }
    }

    /// Hands one whole line to the writer thread, or drops it when the buffer is full; never blocks.
    pub(crate) fn line(&self, line: &[u8]) {
        let _ = self.writer.clone().write_all(line);
    }

    /// Writes out what is buffered, waiting for it at most about a second (a reader that does not
    /// read must not keep the worker from ending); later lines are dropped.
    pub(crate) fn flush(&self) {
        let Some(guard) = self.guard.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        // The guard's drop waits up to 1.1 s, then prints to stdout, which may block as well: it
        // gets a thread of its own, waited for a little longer than that.
        let (done, dropped) = std::sync::mpsc::channel();
        let _ = std::thread::Builder::new()
            .name("tether-stderr-flush".into())
            .spawn(move || {
                drop(guard);
                let _ = done.send(());
            });
        let _ = dropped.recv_timeout(Duration::from_millis(1500));
    }
}

/// The destination, with a report of the lines dropped since the last one written.
struct Counted<W> {
    destination: W,
    dropped: Arc<OnceLock<ErrorCounter>>,
    /// Dropped lines already reported.
    told: usize,
    format: &'static OnceLock<LogFormat>,
}

impl<W: Write> Counted<W> {
    fn report_drops(&mut self) -> std::io::Result<()> {
        let Some(dropped) = self.dropped.get().map(ErrorCounter::dropped_lines) else {
            return Ok(());
        };
        if dropped <= self.told {
            return Ok(());
        }
        let notice = drop_notice(
            dropped - self.told,
            self.format.get().copied().unwrap_or(LogFormat::Text),
        );
        self.told = dropped;
        self.destination.write_all(notice.as_bytes())
    }
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.report_drops()?;
        self.destination.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.report_drops()?;
        self.destination.flush()
    }
}

/// The line that says `count` lines were dropped, in the log's format.
fn drop_notice(count: usize, format: LogFormat) -> String {
    let message = format!(
        "{count} line(s) of log and program output dropped: standard error was not read fast enough (at most {BUFFERED_LINES} lines wait for it)"
    );
    let mut timestamp = String::new();
    let _ = tracing_subscriber::fmt::time::FormatTime::format_time(
        &tracing_subscriber::fmt::time::SystemTime,
        &mut tracing_subscriber::fmt::format::Writer::new(&mut timestamp),
    );
    match format {
        LogFormat::Text => format!("{timestamp}  WARN tether::worker: {message}\n"),
        LogFormat::Json => {
            let record = serde_json::json!({
                "timestamp": timestamp,
                "level": "WARN",
                "fields": {"message": message, "dropped": count},
                "target": "tether::worker",
            });
            format!("{record}\n")
        }
    }
}

/// The log's format, for the drop notices; set once the worker knows it.
pub(crate) static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The worker's standard error.
pub(crate) fn stderr() -> &'static Lossy {
    static STDERR: OnceLock<Lossy> = OnceLock::new();
    STDERR.get_or_init(|| Lossy::new(std::io::stderr(), BUFFERED_LINES, &FORMAT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    /// A destination that takes nothing until it is opened, then keeps what it is given.
    struct Gate {
        open: mpsc::Receiver<()>,
        opened: bool,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if !self.opened {
                let _ = self.open.recv();
                self.opened = true;
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reader_that_does_not_read_blocks_no_writer_and_the_drops_are_counted() {
        static JSON: OnceLock<LogFormat> = OnceLock::new();
        let _ = JSON.set(LogFormat::Json);
        let (open, gate) = mpsc::channel();
        let written = Arc::new(Mutex::new(Vec::new()));
        let sink = Lossy::new(
            Gate {
                open: gate,
                opened: false,
                written: Arc::clone(&written),
            },
            100,
            &JSON,
        );
        let started = Instant::now();
        const LINES: usize = 40_000;
        for n in 0..LINES {
            sink.line(format!("line {n}\n").as_bytes());
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "writing waited for the reader"
        );
        open.send(()).unwrap();
        sink.line(b"after\n");
        sink.flush();
        let written = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        let kept = lines.iter().filter(|l| l.starts_with("line ")).count();
        let notices: Vec<serde_json::Value> = lines
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let dropped: u64 = notices
            .iter()
            .map(|n| n["fields"]["dropped"].as_u64().unwrap())
            .sum();
        assert!(kept <= 100 + 1, "the buffer is bounded: {kept} kept");
        let after = u64::from(lines.contains(&"after"));
        assert_eq!(kept as u64 + after + dropped, LINES as u64 + 1, "{written}");
        assert!(dropped > 0);
        assert_eq!(notices[0]["level"], "WARN");
    }
}
