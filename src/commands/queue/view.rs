//! What `tally queue` prints. The structs are the JSON interface (`--output-format json`): their
//! field names are stable; the `to_text` methods render the same data for people.

use std::fmt::Write as _;
use std::path::Path;

use chrono::DateTime;
use serde::Serialize;

use crate::cli::QueueState;
use crate::commands::output::{self, age, first_bytes};
use crate::ship::outbox::{ItemDetail, ItemSummary, State, Stats};

/// RFC 3339 UTC with milliseconds, from milliseconds since the epoch.
pub fn time(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| crate::spend::fmt_millis(&t))
        .unwrap_or_else(|| ms.to_string())
}

pub fn state_name(s: QueueState) -> &'static str {
    match s {
        QueueState::Pending => "pending",
        QueueState::Held => "held",
        QueueState::Dead => "dead",
        QueueState::Rejected => "rejected",
        QueueState::Acked => "acked",
        QueueState::Dropped => "dropped",
        QueueState::NotBillable => "not_billable",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LagoErrorView {
    pub message: String,
    pub at: String,
}

/// One spend-log file the shipper follows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileView {
    pub path: String,
    /// Bytes read and committed.
    pub position: u64,
    /// Current size, when the file at `path` is still the one read (null once rotated away).
    pub size: Option<u64>,
    /// `size - position`: bytes not yet read (0 for a finished file; null when unknown).
    pub lag_bytes: Option<u64>,
    /// Rotated away and read to its end.
    pub finished: bool,
}

/// `tally queue stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsView {
    pub outbox: String,
    pub pending: u64,
    /// Of `pending`, being sent right now.
    pub in_flight: u64,
    pub held: u64,
    pub dead: u64,
    pub acked: u64,
    /// Rejected lines (malformed, too long, conflicting duplicates).
    pub rejected: u64,
    pub not_billable: u64,
    pub dropped: u64,
    pub oldest_pending_age_secs: Option<u64>,
    pub last_lago_error: Option<LagoErrorView>,
    pub files: Vec<FileView>,
    /// `--max-age`, when given.
    pub max_age_secs: Option<u64>,
    /// The oldest pending event is older than `--max-age` (the command then exits 3).
    pub too_old: bool,
}

impl StatsView {
    pub fn new(db: &Path, stats: &Stats, now_ms: i64, max_age: Option<u64>) -> Self {
        let oldest = stats.oldest_pending_age(now_ms).map(|d| d.as_secs());
        Self {
            outbox: db.display().to_string(),
            pending: stats.pending,
            in_flight: stats.in_flight,
            held: stats.held,
            dead: stats.dead,
            acked: stats.acked,
            rejected: stats.rejected,
            not_billable: stats.not_billable,
            dropped: stats.dropped,
            oldest_pending_age_secs: oldest,
            last_lago_error: stats.last_lago_error.as_ref().map(|e| LagoErrorView {
                message: e.message.clone(),
                at: time(e.at_ms),
            }),
            files: stats
                .positions
                .iter()
                .map(|p| file_view(&p.position))
                .collect(),
            max_age_secs: max_age,
            too_old: matches!((oldest, max_age), (Some(o), Some(m)) if o > m),
        }
    }

    /// Why `--max-age` failed, for stderr.
    pub fn age_verdict(&self) -> String {
        let mut s = format!(
            "the oldest pending event is {} old, over --max-age {}s",
            age(self.oldest_pending_age_secs.unwrap_or_default()),
            self.max_age_secs.unwrap_or_default()
        );
        match &self.last_lago_error {
            Some(e) => {
                let _ = write!(s, "; last Lago error ({}): {}", e.at, e.message);
            }
            None => s.push_str("; no Lago error recorded: is `tally ship` running?"),
        }
        s
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let mut t = output::table(&["state", "count"], &[1]);
        let pending = if self.in_flight > 0 {
            format!("{} ({} in flight)", self.pending, self.in_flight)
        } else {
            self.pending.to_string()
        };
        t.add_row(vec!["pending".to_owned(), pending]);
        for (name, n) in [
            ("held", self.held),
            ("dead", self.dead),
            ("acked", self.acked),
            ("rejected lines", self.rejected),
            ("not billable", self.not_billable),
            ("dropped", self.dropped),
        ] {
            t.add_row(vec![name.to_owned(), n.to_string()]);
        }
        let _ = writeln!(s, "Outbox {}\n{t}", self.outbox);
        match self.oldest_pending_age_secs {
            Some(a) => {
                let _ = writeln!(s, "Oldest pending event: {} old", age(a));
            }
            None => s.push_str("Nothing pending.\n"),
        }
        match &self.last_lago_error {
            Some(e) => {
                let _ = writeln!(s, "Last Lago error ({}): {}", e.at, e.message);
            }
            None => s.push_str("No Lago error recorded.\n"),
        }
        if !self.files.is_empty() {
            let mut t = output::table(&["spend-log file", "position", "size", "lag"], &[1, 2, 3]);
            for f in &self.files {
                let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
                let path = if f.finished {
                    format!("{} (finished)", f.path)
                } else {
                    f.path.clone()
                };
                t.add_row(vec![
                    path,
                    f.position.to_string(),
                    opt(f.size),
                    opt(f.lag_bytes),
                ]);
            }
            let _ = writeln!(s, "{t}");
        }
        if self.too_old {
            let _ = writeln!(s, "ATTENTION: {}", self.age_verdict());
        }
        if self.held > 0 {
            s.push_str("Held events have no customer id: fix LAGO_API_CHARGE_BY, then `tally queue retry --state held`.\n");
        }
        if self.dead > 0 {
            s.push_str(
                "Dead events were refused by Lago: `tally queue list --state dead` says why.\n",
            );
        }
        s
    }
}

fn file_view(p: &crate::ship::tail::FilePosition) -> FileView {
    use std::os::unix::fs::MetadataExt;
    // Only a file that is still the one read has a meaningful size.
    let size = std::fs::metadata(&p.path)
        .ok()
        .filter(|m| m.dev() == p.id.dev && m.ino() == p.id.ino)
        .map(|m| m.len());
    let lag_bytes = match (size, p.finished) {
        (_, true) => Some(0),
        (Some(size), false) => Some(size.saturating_sub(p.offset)),
        (None, false) => None,
    };
    FileView {
        path: p.path.display().to_string(),
        position: p.offset,
        size,
        lag_bytes,
        finished: p.finished,
    }
}

/// One row of `tally queue list`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemView {
    /// The transaction_id, or `rejected:<n>` for a rejected line (use it with `drop`).
    pub id: String,
    pub state: String,
    pub reason: Option<String>,
    pub attempts: u64,
    pub file: Option<String>,
    pub offset: Option<u64>,
    /// For a rejected line: its first bytes.
    pub first_bytes: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl ItemView {
    pub fn new(item: ItemSummary, head: Option<String>) -> Self {
        Self {
            id: item.id,
            state: item.state,
            reason: item.reason,
            attempts: item.attempts,
            file: item.source_file,
            offset: item.source_offset,
            first_bytes: head,
            created_at: time(item.created_ms),
            updated_at: time(item.updated_ms),
        }
    }
}

/// `tally queue list`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListView {
    pub states: Vec<&'static str>,
    pub limit: usize,
    pub items: Vec<ItemView>,
}

impl ListView {
    pub fn to_text(&self) -> String {
        if self.items.is_empty() {
            return format!("No {} items.\n", self.states.join(", "));
        }
        let mut t = output::table(&["id", "state", "attempts", "where", "reason"], &[2]);
        for i in &self.items {
            let place = match (&i.file, i.offset) {
                (Some(f), Some(o)) => format!("{f}:{o}"),
                (Some(f), None) => f.clone(),
                _ => "-".to_owned(),
            };
            let mut reason = i.reason.clone().unwrap_or_default();
            if let Some(head) = &i.first_bytes {
                let _ = write!(reason, "\nline: {}", first_bytes(head.as_bytes(), 80));
            }
            t.add_row(vec![
                i.id.clone(),
                i.state.clone(),
                i.attempts.to_string(),
                place,
                reason,
            ]);
        }
        let mut s = format!("{t}\n");
        if self.items.len() >= self.limit {
            let _ = writeln!(s, "(first {} shown; --limit N for more)", self.limit);
        }
        s
    }
}

/// `tally queue show`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShowView {
    pub transaction_id: String,
    pub state: String,
    pub external_subscription_id: Option<String>,
    pub reason: Option<String>,
    pub attempts: u64,
    pub file: Option<String>,
    pub offset: Option<u64>,
    pub created_at: String,
    pub updated_at: String,
    /// Set while a sender is sending it.
    pub leased_until: Option<String>,
    /// The spend record (null once acked: the outbox keeps only the id of acked events).
    pub record: Option<serde_json::Value>,
    /// The Lago event exactly as it is sent.
    pub lago_event: Option<serde_json::Value>,
}

fn json_or_text(s: Option<String>) -> Option<serde_json::Value> {
    s.map(|s| serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s)))
}

impl ShowView {
    pub fn new(d: ItemDetail) -> Self {
        Self {
            transaction_id: d.transaction_id,
            state: d.state.name().to_owned(),
            external_subscription_id: d.external_subscription_id,
            reason: d.reason,
            attempts: d.attempts,
            file: d.source_file,
            offset: d.source_offset,
            created_at: time(d.created_ms),
            updated_at: time(d.updated_ms),
            leased_until: d.leased_until_ms.map(time),
            record: json_or_text(d.record),
            lago_event: json_or_text(d.event),
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "transaction_id  {}", self.transaction_id);
        let _ = writeln!(s, "state           {}", self.state);
        if let Some(c) = &self.external_subscription_id {
            let _ = writeln!(s, "customer        {c}");
        }
        let _ = writeln!(s, "attempts        {}", self.attempts);
        let _ = writeln!(
            s,
            "last error      {}",
            self.reason.as_deref().unwrap_or("none")
        );
        if let (Some(f), Some(o)) = (&self.file, self.offset) {
            let _ = writeln!(s, "read from       {f}:{o}");
        }
        let _ = writeln!(s, "recorded        {}", self.created_at);
        let _ = writeln!(s, "updated         {}", self.updated_at);
        if let Some(l) = &self.leased_until {
            let _ = writeln!(s, "being sent      (lease until {l})");
        }
        for (title, v) in [("record", &self.record), ("Lago event", &self.lago_event)] {
            match v {
                Some(v) => {
                    let pretty = serde_json::to_string_pretty(v).unwrap_or_default();
                    let _ = writeln!(s, "{title}:\n{pretty}");
                }
                None if self.state == "acked" => {
                    let _ = writeln!(s, "{title}: (not kept once Lago has acknowledged it)");
                }
                None => {
                    let _ = writeln!(s, "{title}: none");
                }
            }
        }
        s
    }
}

/// What happened to one id in `retry` or `drop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Requeued,
    StillHeld,
    Skipped,
    Dropped,
    NotDropped,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemOutcome {
    pub id: String,
    pub outcome: Verdict,
    /// The state now (null when the id is not in the outbox).
    pub state: Option<String>,
    pub external_subscription_id: Option<String>,
    pub detail: String,
}

/// Explains, per id, what `retry` / `drop` did, from the item as it is now.
pub fn item_outcome(id: &str, verdict: Verdict, detail: Option<ItemDetail>) -> ItemOutcome {
    let state = detail.as_ref().map(|d| d.state);
    let explain = match (verdict, &detail) {
        (Verdict::Requeued, Some(d)) => format!(
            "requeued, charged to {}; `tally ship` delivers it",
            d.external_subscription_id.as_deref().unwrap_or("?")
        ),
        (Verdict::StillHeld, Some(d)) => format!(
            "still held: {}",
            d.reason.as_deref().unwrap_or("no customer id")
        ),
        (Verdict::Dropped, _) => "dropped: recorded with the reason, never billed".to_owned(),
        (_, None) if id.starts_with("rejected:") => {
            "no such rejected line, or it was already dropped".to_owned()
        }
        (_, None) => "not in the outbox".to_owned(),
        (_, Some(d)) => match d.state {
            State::Acked => "already acked: Lago has it".to_owned(),
            State::Dropped => format!(
                "already dropped ({})",
                d.reason.as_deref().unwrap_or("no reason kept")
            ),
            State::NotBillable => "not billable (its status is not success)".to_owned(),
            State::Pending => "pending: it is being delivered, nothing to retry".to_owned(),
            State::Held | State::Dead => format!("is {}", d.state.name()),
        },
    };
    ItemOutcome {
        id: id.to_owned(),
        outcome: verdict,
        state: state.map(|s| s.name().to_owned()),
        external_subscription_id: detail.and_then(|d| d.external_subscription_id),
        detail: explain,
    }
}

fn outcome_lines(items: &[ItemOutcome]) -> String {
    const SHOWN: usize = 50;
    let mut s = String::new();
    for i in items.iter().take(SHOWN) {
        let _ = writeln!(s, "  {}: {}", i.id, i.detail);
    }
    if items.len() > SHOWN {
        let _ = writeln!(
            s,
            "  … and {} more (--output-format json lists all)",
            items.len() - SHOWN
        );
    }
    s
}

/// `tally queue retry`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryView {
    pub charge_by: String,
    pub requeued: u64,
    pub still_held: u64,
    pub skipped: u64,
    pub items: Vec<ItemOutcome>,
}

impl RetryView {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "Retried with LAGO_API_CHARGE_BY={}: {} requeued, {} still held, {} skipped.\n",
            self.charge_by, self.requeued, self.still_held, self.skipped
        );
        if self.items.is_empty() {
            s.push_str("Nothing to retry: no held or dead events matched.\n");
        }
        s.push_str(&outcome_lines(&self.items));
        s
    }
}

/// `tally queue drop`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DropView {
    pub reason: String,
    pub dropped: u64,
    pub not_dropped: u64,
    pub items: Vec<ItemOutcome>,
}

impl DropView {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "Dropped {} of {} item(s): never billed, reason recorded ({:?}).\n",
            self.dropped,
            self.dropped + self.not_dropped,
            self.reason
        );
        s.push_str(&outcome_lines(&self.items));
        s
    }
}
