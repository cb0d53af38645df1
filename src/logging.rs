//! Logs go to stderr through `tracing` (journald picks them up under systemd); data a script
//! might read goes to stdout. Levels come from `RUST_LOG`, defaulting to `info`.
//!
//! The `notify` crate stays at `info` unless `RUST_LOG` names it: it traces every inotify event,
//! so with `RUST_LOG=trace` and stderr written to a file in the spend log's directory, each log
//! line would be an event that writes the next one — a loop that spins a core.
//!
//! `--log-format json` (or `TALLY_LOG_FORMAT=json`) writes one JSON object per line with the
//! event's fields at the top level, for log shippers. Colours only when stderr is a terminal, so
//! the journal holds no escape codes.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

/// The format of the log lines on stderr (`--log-format`, `TALLY_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How often an error is repeated while the condition behind it lasts.
pub const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// Rate limit for an error logged while a condition lasts (a full disk, a refused key): the first
/// time, then at most once every [`REPEAT_EVERY`]. [`Repeated::reset`] when the condition clears,
/// so the next one is logged at once.
#[derive(Debug, Default)]
pub struct Repeated {
    last: Option<Instant>,
}

impl Repeated {
    /// Whether to log now (and if so, counts this as logged).
    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .last
            .is_none_or(|t| now.duration_since(t) >= REPEAT_EVERY);
        if due {
            self.last = Some(now);
        }
        due
    }

    /// Whether anything was logged since the last reset.
    pub fn logged(&self) -> bool {
        self.last.is_some()
    }

    pub fn reset(&mut self) {
        self.last = None;
    }
}

/// Installs the global subscriber. Safe to call twice (the second call is a no-op), which tests
/// that start several services in one process rely on.
pub fn init(format: LogFormat) {
    let filter = filter(std::env::var("RUST_LOG").ok().as_deref());
    let ansi = std::io::stderr().is_terminal();
    let _ = build(format, filter, BoxMakeWriter::new(std::io::stderr), ansi).try_init();
}

/// The level filter for a `RUST_LOG` value (`None`, or one that does not parse: `info`).
fn filter(rust_log: Option<&str>) -> EnvFilter {
    let spec = rust_log.unwrap_or("info");
    let filter = EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new("info"));
    if spec.contains("notify") {
        return filter;
    }
    match "notify=info".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// The subscriber `init` installs, writing to `writer`.
fn build(
    format: LogFormat,
    filter: EnvFilter,
    writer: BoxMakeWriter,
    ansi: bool,
) -> Box<dyn Subscriber + Send + Sync> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// Captures what the subscriber writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(format: LogFormat, filter: &str, emit: impl FnOnce()) -> String {
        let out = Capture::default();
        let writer = {
            let out = out.clone();
            BoxMakeWriter::new(move || out.clone())
        };
        let subscriber = build(format, super::filter(Some(filter)), writer, false);
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_format_writes_one_object_per_line_with_flat_fields() {
        let out = capture(LogFormat::Json, "info", || {
            tracing::info!(model = "gpt-4o", status = 200u16, "request done");
            tracing::warn!(pending = 3u64, "lago is slow");
            tracing::debug!("filtered out at info");
        });
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["message"], "request done");
        assert_eq!(lines[0]["model"], "gpt-4o");
        assert_eq!(lines[0]["status"], 200);
        assert!(lines[0]["timestamp"].is_string());
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["pending"], 3);
    }

    #[test]
    fn text_format_has_no_escape_codes_off_a_terminal_and_honours_the_filter() {
        let out = capture(LogFormat::Text, "warn,tally=debug", || {
            tracing::debug!(target: "tally::ship", batch = 7u64, "sent");
            tracing::info!(target: "hyper", "noise");
        });
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("DEBUG") && out.contains("batch=7") && out.contains("sent"));
        assert!(!out.contains('\u{1b}'), "escape codes in {out:?}");
    }

    #[test]
    fn notify_stays_at_info_unless_rust_log_names_it() {
        let emit = || {
            tracing::trace!(target: "notify::inotify", "inotify event");
            tracing::trace!(target: "tally::ship", "tally trace");
        };
        let out = capture(LogFormat::Text, "trace", emit);
        assert!(out.contains("tally trace"), "{out}");
        assert!(!out.contains("inotify event"), "{out}");
        let out = capture(LogFormat::Text, "trace,notify=trace", emit);
        assert!(out.contains("inotify event"), "{out}");
    }
}
