//! The replay loop: every decoded line goes through the shipper's own [`prepare_line`] (customer,
//! event and line fingerprint; [`prepare`] for converted LiteLLM rows) and, unless it is a dry run, into the outbox with [`Outbox::ingest`] — the same
//! dedupe by `transaction_id` as the live log, so nothing is billed twice.
//!
//! A dry run computes the same outcome against a read-only outbox (or none) and writes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cli::ReplayFormat;
use crate::ship::CHUNK_LINES;
use crate::ship::outbox::{
    IngestItem, IngestReport, Outbox, OutboxError, REJECTED_HEAD_BYTES, Source,
};
use crate::ship::resolve::{Disposition, EventSpec, prepare, prepare_line};
use crate::ship::tail::{LineContent, RawLine};

use super::input::InputError;
use super::reader::{Decoded, ReplayReader};
use super::summary::{ReplaySummary, Totals};
use super::window::TimeWindow;

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// Where the replay goes.
pub enum Target {
    /// Dry run: compare against this outbox (if there is one), write nothing.
    DryRun(Option<Outbox>),
    /// Record into this outbox.
    Write(Outbox),
}

impl Target {
    fn outbox(&self) -> Option<&Outbox> {
        match self {
            Target::DryRun(o) => o.as_ref(),
            Target::Write(o) => Some(o),
        }
    }
}

pub struct FeedOptions {
    pub format: ReplayFormat,
    pub window: TimeWindow,
    pub max_line_bytes: usize,
    pub spec: EventSpec,
    /// Keep the ids of new events (for `--ship`, which waits for them).
    pub keep_new_ids: bool,
}

/// What a replay did.
pub struct FeedOutcome {
    pub summary: ReplaySummary,
    /// New events (pending or held) this replay recorded, when asked for.
    pub new_ids: Vec<String>,
    /// Stopped early by a signal; what was recorded up to then stays recorded.
    pub interrupted: bool,
}

/// Runs the replay to the end of the last file (or until `cancel`). Blocking: call it from
/// `spawn_blocking`.
pub fn feed(
    files: Vec<PathBuf>,
    options: &FeedOptions,
    mut target: Target,
    cancel: &CancellationToken,
) -> Result<FeedOutcome, FeedError> {
    let dry_run = matches!(target, Target::DryRun(_));
    let mut summary = ReplaySummary {
        dry_run,
        files: files.iter().map(|p| p.display().to_string()).collect(),
        ..ReplaySummary::default()
    };
    let mut reader = ReplayReader::new(
        files,
        options.format,
        options.window,
        options.max_line_bytes,
    );
    let mut totals = Totals::default();
    let mut new_ids = Vec::new();
    // New ids of this run not yet in the outbox (all of them in a dry run), with their content
    // fingerprint: a file replayed together with its rotated copy dedupes within the run too.
    let mut unrecorded: HashMap<String, i64> = HashMap::new();
    let mut batch: Vec<IngestItem> = Vec::with_capacity(CHUNK_LINES);
    let mut written = IngestReport::default();
    let mut sources = SourceNames::default();
    let mut interrupted = false;

    while let Some(item) = reader.next_item()? {
        match item {
            Decoded::OutsideWindow => summary.outside_window += 1,
            Decoded::Blank => summary.blank_lines += 1,
            Decoded::Incomplete { source, reason } => {
                summary.reject(&source.path, source.offset, reason);
            }
            Decoded::Rejected { source, reason } => {
                summary.reject(&source.path, source.offset, reason.clone());
                if !dry_run {
                    batch.push(IngestItem::Rejected {
                        source: sources.source(&source),
                        reason,
                        head: head(&source),
                    });
                }
            }
            Decoded::Record { source, record } => {
                let prepared = match (options.format, &source.content) {
                    // The live log's own fingerprint (of the line's bytes): a copy of a line
                    // `tally ship` already read is recognised as the same line.
                    (ReplayFormat::Tally, LineContent::Complete(bytes)) => {
                        prepare_line(&record, bytes, &options.spec)
                    }
                    // A converted LiteLLM row: fingerprint of the record it becomes.
                    _ => prepare(&record, &options.spec),
                };
                let known = match unrecorded.get(&prepared.transaction_id) {
                    Some(hash) => Some(*hash),
                    None => match target.outbox() {
                        Some(ob) => ob.lookup(&prepared.transaction_id)?.map(|(_, h)| h),
                        None => None,
                    },
                };
                match known {
                    Some(hash) if hash == prepared.content_hash => summary.already_billed += 1,
                    Some(_) => summary.reject(
                        &source.path,
                        source.offset,
                        crate::ship::outbox::conflict_reason(&prepared.transaction_id, None),
                    ),
                    None => {
                        unrecorded.insert(prepared.transaction_id.clone(), prepared.content_hash);
                        match &prepared.disposition {
                            Disposition::Pending {
                                external_subscription_id,
                                ..
                            } => {
                                summary.new_events += 1;
                                totals.add(external_subscription_id, &record);
                                if options.keep_new_ids {
                                    new_ids.push(prepared.transaction_id.clone());
                                }
                            }
                            Disposition::Held { .. } => {
                                summary.held += 1;
                                if options.keep_new_ids {
                                    new_ids.push(prepared.transaction_id.clone());
                                }
                            }
                            Disposition::NotBillable { .. } => summary.not_billable += 1,
                        }
                    }
                }
                if !dry_run {
                    batch.push(IngestItem::Record {
                        prepared,
                        source: sources.source(&source),
                    });
                }
            }
        }
        if batch.len() >= CHUNK_LINES {
            if let Target::Write(ob) = &mut target {
                written.add(&ob.ingest(&batch, &[])?);
            }
            batch.clear();
            // Recorded now: the outbox answers for them from here on.
            unrecorded.clear();
        }
        if cancel.is_cancelled() {
            interrupted = true;
            break;
        }
    }
    if let Target::Write(ob) = &mut target
        && !batch.is_empty()
    {
        written.add(&ob.ingest(&batch, &[])?);
    }
    summary.lines_read = reader.lines_read;
    summary.customers = totals.into_vec();
    if !dry_run {
        // What the outbox actually did is the truth (another process may have recorded the
        // same lines meanwhile, e.g. `tally ship` reading the same file).
        summary.new_events = written.pending;
        summary.held = written.held;
        summary.not_billable = written.not_billable;
        summary.already_billed = written.already_seen;
    }
    Ok(FeedOutcome {
        summary,
        new_ids,
        interrupted,
    })
}

/// The first bytes of a rejected line, as the outbox keeps them.
fn head(line: &RawLine) -> Vec<u8> {
    match &line.content {
        LineContent::Complete(b) => b[..b.len().min(REJECTED_HEAD_BYTES)].to_vec(),
        LineContent::TooLong { .. } => Vec::new(),
    }
}

/// Sources are recorded with absolute paths, so `./a.jsonl` and `a.jsonl` are the same file to
/// the outbox's rejected-line dedupe (file, offset).
#[derive(Default)]
struct SourceNames {
    last: Option<(Arc<Path>, String)>,
}

impl SourceNames {
    fn source(&mut self, line: &RawLine) -> Source {
        let name = match &self.last {
            Some((path, name)) if Arc::ptr_eq(path, &line.path) => name.clone(),
            _ => {
                let name = std::fs::canonicalize(&line.path)
                    .unwrap_or_else(|_| line.path.to_path_buf())
                    .to_string_lossy()
                    .into_owned();
                self.last = Some((line.path.clone(), name.clone()));
                name
            }
        };
        Source {
            file: name,
            offset: line.offset,
        }
    }
}
