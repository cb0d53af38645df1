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
    IngestItem, IngestReport, Outbox, OutboxError, REJECTED_HEAD_BYTES, Recorded, Source,
    conflict_reason,
};
use crate::ship::resolve::{Disposition, EventSpec, PreparedRecord, prepare, prepare_line};
use crate::ship::tail::{LineContent, RawLine};
use crate::spend::SpendRecord;

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
    let mut counts = Counts {
        totals: Totals::default(),
        new_ids: Vec::new(),
        keep_new_ids: options.keep_new_ids,
    };
    // Dry run: new ids of this run not yet in the outbox, with their content fingerprint, so a
    // file replayed together with its rotated copy dedupes within the run too.
    let mut unrecorded: HashMap<String, i64> = HashMap::new();
    let mut batch = Batch::default();
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
                    batch.items.push(IngestItem::Rejected {
                        source: sources.source(&source),
                        reason,
                        head: head(&source),
                    });
                    batch.places.push(None);
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
                match &target {
                    Target::DryRun(outbox) => {
                        let known = match unrecorded.get(&prepared.transaction_id) {
                            Some(hash) => Some(*hash),
                            None => match outbox {
                                Some(ob) => ob.lookup(&prepared.transaction_id)?.map(|(_, h)| h),
                                None => None,
                            },
                        };
                        match known {
                            Some(hash) if hash == prepared.content_hash => {
                                summary.already_billed += 1
                            }
                            Some(_) => summary.reject(
                                &source.path,
                                source.offset,
                                conflict_reason(&prepared.transaction_id, None),
                            ),
                            None => {
                                unrecorded
                                    .insert(prepared.transaction_id.clone(), prepared.content_hash);
                                counts.first_seen(&mut summary, &prepared, &record);
                            }
                        }
                    }
                    Target::Write(_) => {
                        let place = (record, source.path.clone(), source.offset);
                        batch.items.push(IngestItem::Record {
                            prepared,
                            source: sources.source(&source),
                        });
                        batch.places.push(Some(place));
                    }
                }
            }
        }
        if batch.items.len() >= CHUNK_LINES
            && let Target::Write(ob) = &mut target
        {
            batch.record(ob, &mut counts, &mut summary, &mut written)?;
        }
        if cancel.is_cancelled() {
            interrupted = true;
            break;
        }
    }
    if let Target::Write(ob) = &mut target
        && !batch.items.is_empty()
    {
        batch.record(ob, &mut counts, &mut summary, &mut written)?;
    }
    let Counts {
        totals, new_ids, ..
    } = counts;
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

/// A batched line's record and where it was read (`None` for a rejected line).
type Place = Option<(Box<SpendRecord>, Arc<Path>, u64)>;

/// What the summary counts of new events: per customer, and their ids for `--ship`.
struct Counts {
    totals: Totals,
    new_ids: Vec<String>,
    keep_new_ids: bool,
}

impl Counts {
    /// A record seen for the first time.
    fn first_seen(
        &mut self,
        summary: &mut ReplaySummary,
        prepared: &PreparedRecord,
        record: &SpendRecord,
    ) {
        match &prepared.disposition {
            Disposition::Pending {
                external_subscription_id,
                ..
            } => {
                summary.new_events += 1;
                self.totals.add(external_subscription_id, record);
                if self.keep_new_ids {
                    self.new_ids.push(prepared.transaction_id.clone());
                }
            }
            Disposition::Held { .. } => {
                summary.held += 1;
                if self.keep_new_ids {
                    self.new_ids.push(prepared.transaction_id.clone());
                }
            }
            Disposition::NotBillable { .. } => summary.not_billable += 1,
        }
    }
}

/// Lines on their way into the outbox, with what the summary needs of each once the outbox
/// says whether it was new.
#[derive(Default)]
struct Batch {
    items: Vec<IngestItem>,
    places: Vec<Place>,
    outcomes: Vec<Recorded>,
}

impl Batch {
    /// Records the batch in one transaction and counts what the outbox found new (the outbox is
    /// the judge: another process may have recorded the same lines meanwhile).
    fn record(
        &mut self,
        ob: &mut Outbox,
        counts: &mut Counts,
        summary: &mut ReplaySummary,
        written: &mut IngestReport,
    ) -> Result<(), OutboxError> {
        self.outcomes.clear();
        written.add(&ob.ingest_noting(&self.items, &[], Some(&mut self.outcomes))?);
        let lines = self.items.iter().zip(&self.places).zip(&self.outcomes);
        for ((item, place), outcome) in lines {
            let (IngestItem::Record { prepared, .. }, Some((record, path, offset))) = (item, place)
            else {
                continue;
            };
            match outcome {
                Recorded::New => counts.first_seen(summary, prepared, record),
                Recorded::Conflict => summary.reject(
                    path,
                    *offset,
                    conflict_reason(&prepared.transaction_id, None),
                ),
                Recorded::AlreadySeen | Recorded::Rejected => {}
            }
        }
        self.items.clear();
        self.places.clear();
        Ok(())
    }
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
