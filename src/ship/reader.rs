//! The reader: tailer chunks → parsed records (or rejected lines) → one outbox transaction per
//! chunk, together with the chunk's file positions.
//!
//! [`line_to_item`] is the one place a spend-log line becomes an [`IngestItem`]; `tally replay`
//! uses it (with [`Outbox::ingest`]) for files read any other way, so both paths dedupe alike.

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::ship::outbox::{IngestItem, IngestReport, Outbox, SharedOutbox, Source};
use crate::ship::resolve::{EventSpec, prepare_line};
use crate::ship::sender::{SenderError, WorkSignal, with_outbox};
use crate::ship::tail::{Chunk, LineContent, RawLine, TailError, TailNotice, Tailer};
use crate::spend::SpendRecord;

#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error(transparent)]
    Tail(#[from] TailError),
    #[error(transparent)]
    Outbox(#[from] SenderError),
}

/// One line (without its `\n`) read from `source`, as the outbox records it.
pub fn line_to_item(source: Source, line: &[u8], spec: &EventSpec) -> IngestItem {
    match SpendRecord::parse_line(line) {
        Ok(record) => IngestItem::Record {
            prepared: prepare_line(&record, line, spec),
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
        reason: format!(
            "line is {len} bytes long, over the limit of {max_line_bytes} bytes (TALLY_MAX_LINE_BYTES); it was skipped"
        ),
        head: Vec::new(),
    }
}

fn source_of(path: &Path, offset: u64) -> Source {
    Source {
        file: path.to_string_lossy().into_owned(),
        offset,
    }
}

/// Turns the tailer's lines into ingest items.
pub fn chunk_items(lines: &[RawLine], spec: &EventSpec, max_line_bytes: usize) -> Vec<IngestItem> {
    lines
        .iter()
        .map(|l| {
            let source = source_of(&l.path, l.offset);
            match &l.content {
                LineContent::Complete(bytes) => line_to_item(source, bytes, spec),
                LineContent::TooLong { len } => too_long_item(source, *len, max_line_bytes),
            }
        })
        .collect()
}

/// Records one chunk (lines + positions) in one transaction.
pub async fn ingest_chunk(
    outbox: &SharedOutbox,
    chunk: Chunk,
    spec: Arc<EventSpec>,
    max_line_bytes: usize,
) -> Result<IngestReport, SenderError> {
    with_outbox(outbox, move |ob: &mut Outbox| {
        // Parse inside the blocking task: it is CPU work.
        let items = chunk_items(&chunk.lines, &spec, max_line_bytes);
        ob.ingest(&items, &chunk.positions)
    })
    .await
}

/// Reads until `shutdown`, recording every chunk and waking the sender.
///
/// Three stages overlap: the tailer reads chunk *n + 2* while chunk *n + 1* is parsed (on a
/// blocking thread) and chunk *n* is committed. The channels between them hold one chunk each, so
/// memory stays bounded whatever the backlog, and order is kept, so positions are committed in
/// the order they were reached.
pub async fn run_reader(
    mut tailer: Tailer,
    outbox: SharedOutbox,
    spec: Arc<EventSpec>,
    max_line_bytes: usize,
    signal: Arc<WorkSignal>,
    shutdown: CancellationToken,
) -> Result<IngestReport, ReaderError> {
    type Parsed = tokio::task::JoinHandle<(Vec<IngestItem>, Vec<crate::ship::tail::FilePosition>)>;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Parsed>(1);
    let committer = tokio::spawn(async move {
        let mut totals = IngestReport::default();
        while let Some(parsed) = rx.recv().await {
            let (items, positions) = parsed.await.map_err(|e| SenderError::Task(e.to_string()))?;
            let report = with_outbox(&outbox, move |ob: &mut Outbox| {
                ob.ingest(&items, &positions)
            })
            .await?;
            log_report(&report);
            totals.add(&report);
            signal.added(report.pending as usize);
        }
        Ok::<_, SenderError>(totals)
    });
    let mut read_result = Ok(());
    loop {
        let chunk = match tailer.next_chunk(&shutdown).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                read_result = Err(e);
                break;
            }
        };
        for notice in &chunk.notices {
            log_notice(notice);
        }
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
        if tx.send(parsed).await.is_err() {
            // The committer stopped (an outbox error): its result says why.
            break;
        }
    }
    // Everything read is committed before returning: no chunk is lost on shutdown.
    drop(tx);
    let totals = committer
        .await
        .map_err(|e| SenderError::Task(e.to_string()))??;
    read_result?;
    Ok(totals)
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

fn log_notice(notice: &TailNotice) {
    match notice {
        TailNotice::Rotated { old, new } => {
            tracing::info!(old = %old.display(), new = %new.display(), "spend log rotated")
        }
        TailNotice::Truncated { path, size, offset } => tracing::warn!(
            path = %path.display(), size, offset,
            "spend log truncated below the read position (copytruncate?); reading it from the start"
        ),
        TailNotice::Replaced { path } => {
            tracing::info!(path = %path.display(), "spend log replaced by a new file")
        }
        TailNotice::Deleted { path } => {
            tracing::warn!(path = %path.display(), "spend log deleted while open")
        }
    }
}
