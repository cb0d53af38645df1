//! What `tally queue` prints. The structs are the JSON interface (`--output-format json`): their
//! field names are stable; the `to_text` methods render the same data for people.

use std::fmt::Write as _;
use std::path::Path;

use chrono::DateTime;
use serde::Serialize;

use crate::cli::QueueState;
use crate::commands::output::{self, age, first_bytes, printable};
use crate::ship::outbox::{ItemDetail, ItemSummary, RejectedDetail, State, Stats};

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
        QueueState::LagoError => "lago_error",
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
    /// Acked, then reported by Lago's `events.errors` webhook (stored, not billed).
    pub lago_error: u64,
    /// external_subscription_ids Lago does not know: their events are never billed.
    pub unknown_subscriptions: Vec<String>,
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
            lago_error: stats.lago_error,
            unknown_subscriptions: stats.unknown_subscriptions.clone(),
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
                let _ = write!(s, "; last Lago error ({}): {}", e.at, printable(&e.message));
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
            ("lago error", self.lago_error),
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
                let _ = writeln!(s, "Last Lago error ({}): {}", e.at, printable(&e.message));
            }
            None => s.push_str("No Lago error recorded.\n"),
        }
        if !self.files.is_empty() {
            let mut t = output::table(&["spend-log file", "position", "size", "lag"], &[1, 2, 3]);
            for f in &self.files {
                let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
                let path = if f.finished {
                    format!("{} (finished)", printable(&f.path))
                } else {
                    printable(&f.path)
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
        if !self.unknown_subscriptions.is_empty() {
            let ids: Vec<String> = self
                .unknown_subscriptions
                .iter()
                .take(20)
                .map(|i| printable(i))
                .collect();
            let _ = writeln!(
                s,
                "Unknown subscriptions (Lago stores their events but never bills them; create them in Lago): {} {}",
                self.unknown_subscriptions.len(),
                ids.join(", ")
            );
        }
        if self.lago_error > 0 {
            s.push_str("Lago reported events it cannot bill (events.errors): `tally queue list --state lago-error`; docs/operations.md says how to fix each reason in Lago.\n");
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
                (Some(f), Some(o)) => format!("{}:{o}", printable(f)),
                (Some(f), None) => printable(f),
                _ => "-".to_owned(),
            };
            let mut reason = printable(i.reason.as_deref().unwrap_or_default());
            if let Some(head) = &i.first_bytes {
                let _ = write!(reason, "\nline: {}", first_bytes(head.as_bytes(), 80));
            }
            t.add_row(vec![
                printable(&i.id),
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
    /// The transaction_id, or `rejected:<n>` for a rejected line (the id `list` prints).
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
    /// The record's customer ids, as retry re-resolves them (null once acked).
    pub customer_ids: Option<serde_json::Value>,
    /// The spend record (kept while held; a pending or dead event holds its content in
    /// `lago_event`).
    pub record: Option<serde_json::Value>,
    /// The Lago event exactly as it is sent.
    pub lago_event: Option<serde_json::Value>,
    /// For a rejected line: its first bytes, as kept.
    pub line: Option<String>,
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
            customer_ids: json_or_text(d.customer_ids),
            record: json_or_text(d.record),
            lago_event: json_or_text(d.event),
            line: None,
        }
    }

    /// A rejected line (`rejected:<n>`): where it was, why, and its first bytes.
    pub fn rejected(d: RejectedDetail) -> Self {
        let (state, reason) = match d.dropped_reason {
            Some(dropped) => ("dropped", format!("{} (dropped: {dropped})", d.reason)),
            None => ("rejected", d.reason),
        };
        Self {
            transaction_id: d.id,
            state: state.to_owned(),
            external_subscription_id: None,
            reason: Some(reason),
            attempts: 0,
            file: Some(d.source_file),
            offset: Some(d.source_offset),
            created_at: time(d.created_ms),
            updated_at: time(d.created_ms),
            leased_until: None,
            customer_ids: None,
            record: None,
            lago_event: None,
            line: Some(d.head),
        }
    }

    /// Every piece of record text goes through [`printable`]: ids and reasons come from the
    /// spend log (a client's `user`), and the JSON escapes of serde leave C1 controls and
    /// direction overrides as they are.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "transaction_id  {}", printable(&self.transaction_id));
        let _ = writeln!(s, "state           {}", self.state);
        if let Some(c) = &self.external_subscription_id {
            let _ = writeln!(s, "customer        {}", printable(c));
        }
        let _ = writeln!(s, "attempts        {}", self.attempts);
        let _ = writeln!(
            s,
            "last error      {}",
            printable(self.reason.as_deref().unwrap_or("none"))
        );
        if let (Some(f), Some(o)) = (&self.file, self.offset) {
            let _ = writeln!(s, "read from       {}:{o}", printable(f));
        }
        let _ = writeln!(s, "recorded        {}", self.created_at);
        let _ = writeln!(s, "updated         {}", self.updated_at);
        if let Some(l) = &self.leased_until {
            let _ = writeln!(s, "being sent      (lease until {l})");
        }
        if let Some(ids) = &self.customer_ids {
            let _ = writeln!(s, "customer ids    {}", printable(&ids.to_string()));
        }
        if let Some(line) = &self.line {
            let _ = writeln!(s, "line            {}", first_bytes(line.as_bytes(), 400));
        }
        for (title, v) in [("record", &self.record), ("Lago event", &self.lago_event)] {
            if let Some(v) = v {
                let pretty = serde_json::to_string_pretty(v).unwrap_or_default();
                // Line by line: the pretty-printing's own newlines stay.
                let _ = writeln!(s, "{title}:");
                for l in pretty.lines() {
                    let _ = writeln!(s, "{}", printable(l));
                }
            }
        }
        if self.state == "acked" {
            s.push_str(
                "(Lago has it; the outbox keeps only its id, so it is never billed again.)\n",
            );
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
            State::LagoError => format!(
                "Lago has it but reported it as not billable ({}); fix it in Lago",
                d.reason.as_deref().unwrap_or("events.errors")
            ),
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
        let _ = writeln!(s, "  {}: {}", printable(&i.id), printable(&i.detail));
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
            "Dropped {} of {} item(s): never billed, reason recorded ({}).\n",
            self.dropped,
            self.dropped + self.not_dropped,
            printable(&format!("{:?}", self.reason))
        );
        s.push_str(&outcome_lines(&self.items));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::outbox::LagoErrorNote;
    use crate::ship::tail::{FileId, FilePosition};

    fn detail(state: State) -> ItemDetail {
        ItemDetail {
            transaction_id: "tx".into(),
            state,
            record: None,
            customer_ids: None,
            event: None,
            external_subscription_id: Some("cust".into()),
            reason: Some("why".into()),
            attempts: 2,
            source_file: None,
            source_offset: None,
            created_ms: 0,
            updated_ms: 0,
            leased_until_ms: None,
        }
    }

    #[test]
    fn max_age_is_exceeded_only_when_strictly_older() {
        let stats = Stats {
            pending: 1,
            oldest_pending_ms: Some(1_000),
            last_lago_error: Some(LagoErrorNote {
                message: "HTTP 503".into(),
                at_ms: 0,
            }),
            ..Stats::default()
        };
        let db = Path::new("/s/shipper.db");
        let at = |now, max| StatsView::new(db, &stats, now, max);
        assert!(!at(11_000, Some(10)).too_old);
        assert!(at(12_000, Some(10)).too_old);
        assert!(!at(12_000, None).too_old);
        let v = at(12_000, Some(10));
        assert_eq!(v.oldest_pending_age_secs, Some(11));
        let why = v.age_verdict();
        assert!(why.contains("11s old") && why.contains("HTTP 503"), "{why}");
        assert!(v.to_text().contains("ATTENTION"));
        let json = serde_json::to_value(&v).unwrap();
        for key in ["pending", "held", "dead", "acked", "rejected"] {
            assert!(json[key].is_u64(), "{key}");
        }
        assert_eq!(json["last_lago_error"]["at"], "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn file_lag_is_known_only_for_the_file_still_at_its_path() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spend.jsonl");
        std::fs::write(&path, b"0123456789").unwrap();
        let m = std::fs::metadata(&path).unwrap();
        let mut p = FilePosition {
            id: FileId {
                dev: m.dev(),
                ino: m.ino(),
                fingerprint: 1,
            },
            path: path.clone(),
            offset: 4,
            finished: false,
        };
        let v = file_view(&p);
        assert_eq!((v.size, v.lag_bytes), (Some(10), Some(6)));
        p.id.ino += 1; // rotated away: another file is at the path now
        let v = file_view(&p);
        assert_eq!((v.size, v.lag_bytes), (None, None));
        p.finished = true;
        assert_eq!(file_view(&p).lag_bytes, Some(0));
    }

    #[test]
    fn outcomes_explain_themselves() {
        let o = item_outcome("tx", Verdict::Requeued, Some(detail(State::Pending)));
        assert!(o.detail.contains("charged to cust"), "{}", o.detail);
        let o = item_outcome("tx", Verdict::StillHeld, Some(detail(State::Held)));
        assert_eq!(o.detail, "still held: why");
        let o = item_outcome("tx", Verdict::Skipped, Some(detail(State::Acked)));
        assert!(o.detail.contains("already acked"));
        let o = item_outcome("tx", Verdict::NotDropped, None);
        assert_eq!(o.detail, "not in the outbox");
        assert_eq!(o.state, None);
        let o = item_outcome("rejected:9", Verdict::NotDropped, None);
        assert!(o.detail.contains("rejected line"));
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["outcome"], "not_dropped");
    }
}
