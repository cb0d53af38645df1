//! The reader: tailer chunks → parsed records (or rejected lines) → one outbox transaction per
//! chunk, together with the chunk's file positions.
//!
//! [`line_to_item`] is the one place a spend-log line becomes an [`IngestItem`]; `tally replay`
//! uses it (with [`Outbox::ingest`]) for files read any other way, so both paths dedupe alike.

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::metrics::ShipMetrics;
use crate::ship::outbox::{IngestItem, IngestReport, Outbox, SharedOutbox, Source};
use crate::ship::outbox::{OutboxTaskError, with_outbox};
use crate::ship::resolve::{EventSpec, prepare_line};
use crate::ship::signal::WorkSignal;
use crate::ship::storage::{StorageGate, with_outbox_waiting};
use crate::ship::tail::{Chunk, LineContent, RawLine, TailError, Tailer};
use crate::spend::SpendRecord;

#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error(transparent)]
    Tail(#[from] TailError),
    #[error(transparent)]
    Outbox(#[from] OutboxTaskError),
}

/// One line (without its `\n`) read from `source`, as the outbox records it.
pub fn line_to_item(source: Source, line: &[u8], spec: &EventSpec) -> IngestItem {
    match SpendRecord::parse_line(line) {
        Ok(record) => IngestItem::Record {
            prepared: prepare_line(record, line, spec),
            source,
        },
        Err(e) => IngestItem::Rejected {
            source,
            reason: e.to_string(),
            head: line[..line.len().min(crate::ship::outbox::REJECTED_HEAD_BYTES)].to_vec(),
        },
    }
}

/// A line the tailer skipped for being too long.
pub fn too_long_item(source: Source, len: u64, max_line_bytes: usize) -> IngestItem {
    IngestItem::Rejected {
        source,
        reason: too_long_reason(len, max_line_bytes),
        head: Vec::new(),
    }
}

/// Why a line over `TALLY_MAX_LINE_BYTES` is rejected (the shipper's and replay's words).
pub fn too_long_reason(len: u64, max_line_bytes: usize) -> String {
    format!(
        "line is {len} bytes long, over the limit of {max_line_bytes} bytes (TALLY_MAX_LINE_BYTES); it was skipped"
    )
}

/// The name each line's file is recorded under, made once per file rather than once per line.
#[derive(Default)]
pub struct SourceNames {
    /// Name files by their absolute path (`tally replay`, given paths relative to where it
    /// runs), so `./a.jsonl` and `a.jsonl` are one file to the rejected-line dedupe.
    canonical: bool,
    last: Option<(Arc<Path>, Arc<str>)>,
}

impl SourceNames {
    /// Names files by their absolute path.
    pub fn canonical() -> Self {
        Self {
            canonical: true,
            last: None,
        }
    }

    pub fn source(&mut self, path: &Arc<Path>, offset: u64) -> Source {
        let file = match &self.last {
            Some((p, name)) if Arc::ptr_eq(p, path) => name.clone(),
            _ => {
                let name: Arc<str> = if self.canonical {
                    std::fs::canonicalize(path)
                        .unwrap_or_else(|_| path.to_path_buf())
                        .to_string_lossy()
                        .into()
                } else {
                    path.to_string_lossy().into()
                };
                self.last = Some((path.clone(), name.clone()));
                name
            }
        };
        Source { file, offset }
    }
}

/// Turns the tailer's lines into ingest items. Empty (whitespace-only) lines have nothing to
/// bill or show and are skipped: their file position is committed with the chunk all the same,
/// and a file of newlines does not grow the outbox by a rejected row per line.
pub fn chunk_items(lines: &[RawLine], spec: &EventSpec, max_line_bytes: usize) -> Vec<IngestItem> {
    let mut names = SourceNames::default();
    // Sized up front: collected through the filter, the items (a few hundred bytes each) were
    // copied again at each doubling of the vector.
    let mut items = Vec::with_capacity(lines.len());
    items.extend(
        lines
            .iter()
            .filter(|l| !matches!(&l.content, LineContent::Complete(b) if b.iter().all(u8::is_ascii_whitespace)))
            .map(|l| {
                let source = names.source(&l.path, l.offset);
                match &l.content {
                    LineContent::Complete(bytes) => line_to_item(source, bytes, spec),
                    LineContent::TooLong { len } => too_long_item(source, *len, max_line_bytes),
                }
            }),
    );
    items
}

/// Records one chunk (lines + positions) in one transaction.
pub async fn ingest_chunk(
    outbox: &SharedOutbox,
    chunk: Chunk,
    spec: Arc<EventSpec>,
    max_line_bytes: usize,
) -> Result<IngestReport, OutboxTaskError> {
    with_outbox(outbox, move |ob: &mut Outbox| {
        // Parse inside the blocking task: it is CPU work.
        let items = chunk_items(&chunk.lines, &spec, max_line_bytes);
        ob.ingest(&items, &chunk.positions)
    })
    .await
}

/// What the reader works with besides the tailer (the sender has its own, `sender::Ctx`).
pub struct ReaderCtx {
    pub outbox: SharedOutbox,
    /// How records become events.
    pub spec: Arc<EventSpec>,
    /// Longest accepted line; longer ones are rejected.
    pub max_line_bytes: usize,
    /// Woken with the number of new pending events after each commit.
    pub signal: Arc<WorkSignal>,
    pub metrics: Option<ShipMetrics>,
    /// The storage state shared with the sender.
    pub storage: Arc<StorageGate>,
}

/// Reads until `shutdown`, recording every chunk and waking the sender.
///
/// A chunk that cannot be committed for storage trouble (disk full, read-only) is retried until it
/// can ([`with_outbox_waiting`]): the tailer, held back by the full channel, reads no further, and
/// no later chunk is committed before it, so the committed positions never pass an uncommitted
/// line. If `shutdown` comes during that wait, the chunk and everything after it are left
/// uncommitted and read again at the next start.
///
/// Chunk *n + 1* is parsed (on a blocking thread) while chunk *n* is committed; the tailer reads
/// the next chunk once the slot between them is free. At most two chunks are alive at once, so
/// memory is bounded by the chunk size whatever the backlog, and order is kept, so positions are
/// committed in the order they were reached.
///
pub async fn run_reader(
    mut tailer: Tailer,
    ctx: ReaderCtx,
    shutdown: CancellationToken,
) -> Result<IngestReport, ReaderError> {
    let ReaderCtx {
        outbox,
        spec,
        max_line_bytes,
        signal,
        metrics,
        storage,
    } = ctx;
    type Parsed = tokio::task::JoinHandle<(Vec<IngestItem>, Vec<crate::ship::tail::FilePosition>)>;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Parsed>(1);
    let stop = shutdown.clone();
    let spec_for_log = spec.clone();
    let committer = tokio::spawn(async move {
        let mut totals = IngestReport::default();
        while let Some(parsed) = rx.recv().await {
            let (items, positions) = parsed
                .await
                .map_err(|e| OutboxTaskError::Task(e.to_string()))?;
            let lines = items.len() as u64;
            let unpriced = count_unpriced(&items);
            let committed =
                with_outbox_waiting(&outbox, &storage, &stop, move |ob: &mut Outbox| {
                    ob.ingest(&items, &positions)
                })
                .await?;
            let Some(report) = committed else {
                // Stopped while the disk was in trouble: commit nothing after this chunk either.
                break;
            };
            log_report(&report);
            if let Some(m) = &metrics {
                m.record_lines_read(lines);
                m.record_lines_rejected("invalid", report.rejected);
                m.record_lines_rejected("conflict", report.conflicts);
                m.record_held(report.held);
                m.record_unpriced(unpriced);
            }
            if unpriced > 0 && spec_for_log.precise_amount.is_some() {
                tracing::warn!(
                    unpriced,
                    "billable records without a response_cost: their events carry no \
                     precise_total_amount_cents, so a dynamic charge bills them 0; price the model \
                     (litellm_params or tally_settings.price_file)"
                );
            }
            totals.add(&report);
            signal.added(report.pending as usize);
        }
        Ok::<_, OutboxTaskError>(totals)
    });
    let mut read_result = Ok(());
    // The first look happens even if shutdown came already: it commits the identity of the live
    // file at once, so a rotation right after start (or a stop right after start) cannot make a
    // first start mistake the rotated file for history and skip it.
    let mut first = true;
    loop {
        // A free slot first, then read: the next chunk is not read (and held) while two others
        // are still being parsed and committed. Reading is the cheap stage; parsing and
        // committing still overlap, and the chunks alive at once stay at two.
        let Ok(slot) = tx.reserve().await else {
            // The committer stopped (an outbox error): its result says why.
            break;
        };
        let next = if std::mem::take(&mut first) {
            tailer.poll_chunk()
        } else {
            tailer.next_chunk(&shutdown).await
        };
        let chunk = match next {
            Ok(Some(chunk)) => chunk,
            Ok(None) if !shutdown.is_cancelled() => continue,
            Ok(None) => break,
            Err(e) => {
                read_result = Err(e);
                break;
            }
        };
        // Rotation, truncation and replacement were logged by the tailer, where they happened.
        if chunk.lines.is_empty() && chunk.positions.is_empty() {
            continue;
        }
        let spec = spec.clone();
        let parsed = tokio::task::spawn_blocking(move || {
            (
                chunk_items(&chunk.lines, &spec, max_line_bytes),
                chunk.positions,
            )
        });
        slot.send(parsed);
    }
    // Everything read is committed before returning: no chunk is lost on shutdown.
    drop(tx);
    let totals = committer
        .await
        .map_err(|e| OutboxTaskError::Task(e.to_string()))??;
    read_result?;
    Ok(totals)
}

/// Records read that are billable but unpriced.
fn count_unpriced(items: &[IngestItem]) -> u64 {
    items
        .iter()
        .filter(|i| matches!(i, IngestItem::Record { prepared, .. } if prepared.unpriced))
        .count() as u64
}

fn log_report(report: &IngestReport) {
    if report.rejected > 0 || report.conflicts > 0 {
        tracing::warn!(
            rejected = report.rejected,
            conflicts = report.conflicts,
            "spend-log lines rejected; see `tally queue list --state rejected`"
        );
    }
    if report.held > 0 {
        tracing::warn!(
            held = report.held,
            "records held: no customer id for LAGO_API_CHARGE_BY; see `tally queue list --state held`"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::resolve::{ChargeBy, EventSpec};

    #[test]
    fn billable_records_without_a_cost_are_counted_as_unpriced() {
        let spec = EventSpec {
            code: "c".into(),
            charge_by: ChargeBy::default(),
            precise_amount: None,
        };
        let source = || Source {
            file: "f".into(),
            offset: 0,
        };
        let line = |cost: &str, status: &str| {
            format!(
                r#"{{"schema":1,"transaction_id":"t-{cost}-{status}","end_time":"2026-11-27T10:00:00.250Z","model":"m","input_tokens":1,"output_tokens":1,"response_cost":{cost},"end_user_id":"c","status":"{status}"}}"#
            )
        };
        let items: Vec<IngestItem> = [
            line("null", "success"),
            line("0.5", "success"),
            line("null", "failure"),
            "not a record".to_owned(),
        ]
        .iter()
        .map(|l| line_to_item(source(), l.as_bytes(), &spec))
        .collect();
        assert_eq!(count_unpriced(&items), 1);
    }

    /// Regression (docs/reliability.md): every empty line of the spend log became a rejected row.
    #[test]
    fn blank_lines_are_skipped_not_rejected() {
        let path: Arc<Path> = Arc::from(Path::new("spend.jsonl"));
        let line = |offset, bytes: &[u8]| RawLine {
            path: path.clone(),
            offset,
            content: LineContent::Complete(bytes.to_vec()),
        };
        let lines = [line(0, b""), line(1, b"  \r"), line(4, b"not json")];
        let spec = EventSpec {
            code: "c".into(),
            charge_by: Default::default(),
            precise_amount: None,
        };
        let items = chunk_items(&lines, &spec, 1024);
        assert_eq!(items.len(), 1);
        assert!(
            matches!(&items[0], IngestItem::Rejected { source, .. } if source.offset == 4),
            "{items:?}"
        );
    }
}
