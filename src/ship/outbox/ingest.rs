//! The ingest: lines into the outbox, committed in one transaction with the file positions
//! reached ([`Outbox::ingest`]).
//!
//! An [`IngestWindow`] is that transaction held open while lines are added batch by batch
//! ([`IngestWindow::add`]), then committed ([`IngestWindow::commit`]). A batch's queue rows are
//! written as it is added, in file order, so its parsed lines can be freed at once; of its ledger
//! rows only the id and a few integers are kept, and they are written at commit, in id order.
//! With random (uuid4) ids that is what decides the cost: each commit writes every ledger page
//! it touched, and a window of many batches touches each page once where a batch at a time
//! touched one per line (docs/benchmarks.md). `tally replay` uses windows of many batches; the
//! live reader commits each chunk on its own, so a line is in the queue as soon as it is read.
//!
//! A queue row is written before the ledger says whether its id is new, and deleted again at
//! commit when it was not. Nothing reads it in between: the window holds the connection and the
//! write transaction, and a rolled-back window leaves nothing.

use std::sync::Arc;

use hashbrown::HashMap;
use rusqlite::{CachedStatement, Transaction, TransactionBehavior, params};

use super::ledger::{QueuedRow, QueuedRows};
use super::pending::{EnqueueRows, Queued};
use super::{
    EFFECTIVE_STATE, IngestItem, IngestReport, NewTarget, Outbox, OutboxError, Recorded, State,
    conflict_reason, head_text, now_ms, rejected_line_key, target_id,
};
use crate::ship::resolve::Disposition;
use crate::ship::tail::FilePosition;

/// What the ledger pass found for one line.
#[derive(Debug, Clone, Copy)]
pub(super) enum Found {
    /// Recorded now.
    New,
    /// Recorded before (in an earlier ingest, or earlier in this one).
    Recorded,
}

/// A record's ledger row, kept from [`IngestWindow::add`] to the commit: 72 bytes and its id's
/// text in the window's [`Ids`].
struct Entry {
    id: IdAt,
    /// The line's place in the window, in file order (what its outcome is noted under).
    place: u32,
    content_hash: i64,
    source_id: i64,
    source_offset: i64,
    row: Row,
}

/// Where an id's text is in [`Ids`].
#[derive(Debug, Clone, Copy)]
struct IdAt {
    start: u32,
    len: u32,
}

/// The text of a window's ids, one after the other: one buffer rather than an allocation each.
#[derive(Debug, Default)]
struct Ids(String);

impl Ids {
    fn push(&mut self, id: &str) -> IdAt {
        let start = self.0.len() as u32;
        self.0.push_str(id);
        IdAt {
            start,
            len: id.len() as u32,
        }
    }

    fn get(&self, at: IdAt) -> &str {
        &self.0[at.start as usize..(at.start + at.len) as usize]
    }
}

/// What kind of ledger row an [`Entry`] is.
enum Row {
    /// A billable event, its queue row written at `seq` already.
    Queued {
        seq: i64,
        target_id: i64,
        time_ms: i64,
    },
    /// Waiting for a customer id: kept with its record and ids to resolve again later. Rare, so
    /// boxed.
    Held(Box<HeldRow>),
    /// Never billed, only remembered.
    NotBillable,
}

/// A line that is not a record, kept as a rejected line.
struct Malformed {
    place: u32,
    file: Arc<str>,
    offset: u64,
    reason: String,
    head: String,
}

impl Malformed {
    fn write(&self, reject: &mut CachedStatement<'_>, now: i64) -> rusqlite::Result<u64> {
        let (file, offset) = (&*self.file, self.offset);
        write_rejected(reject, file, offset, None, &self.reason, &self.head, now)
    }
}

/// Writes a rejected line's row with `reject` ([`REJECT_SQL`]): 1, or 0 when that line was kept
/// before at the same place.
fn write_rejected(
    reject: &mut CachedStatement<'_>,
    file: &str,
    offset: u64,
    transaction_id: Option<&str>,
    reason: &str,
    head: &str,
    now: i64,
) -> rusqlite::Result<u64> {
    let key = rejected_line_key(reason, head.as_bytes());
    let written = reject.execute(params![
        file,
        offset as i64,
        transaction_id,
        reason,
        head,
        now,
        key
    ])?;
    Ok(written as u64)
}

struct HeldRow {
    reason: String,
    record: Option<Vec<u8>>,
    customer_ids: String,
}

/// What a committed window did.
#[derive(Debug, Default)]
pub struct Committed {
    pub report: IngestReport,
    /// What became of each line added, in the order added.
    pub outcomes: Vec<Recorded>,
    /// The conflicting duplicates, in file order.
    pub conflicts: Vec<ConflictAt>,
    /// The new lines' ids, if the window kept them.
    pub new_ids: NewLineIds,
}

/// The ids of the lines a window recorded as new, in the order added, when the window was asked
/// for them ([`IngestWindow::keep_new_ids`]): the window's own buffer of ids, not a copy of each.
#[derive(Debug, Default)]
pub struct NewLineIds {
    ids: Ids,
    /// Each new line's place and where its id is, by place.
    at: Vec<(u32, IdAt)>,
}

impl NewLineIds {
    /// Each new line's place in [`Committed::outcomes`] and its transaction_id.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &str)> {
        self.at
            .iter()
            .map(|(place, at)| (*place as usize, self.ids.get(*at)))
    }
}

/// A line whose transaction_id was recorded before with other content.
#[derive(Debug)]
pub struct ConflictAt {
    /// Its place in [`Committed::outcomes`].
    pub place: usize,
    pub transaction_id: Box<str>,
    pub source_offset: u64,
}

/// One write transaction of the outbox taking lines batch by batch; see the module doc.
pub struct IngestWindow<'o> {
    tx: Transaction<'o>,
    /// The outbox's caches of committed ids, extended only once the window commits (an id
    /// given in a rolled-back window may be given again).
    sources: &'o mut HashMap<String, i64>,
    targets: &'o mut HashMap<String, HashMap<String, i64>>,
    new_sources: Vec<(String, i64)>,
    new_targets: Vec<NewTarget>,
    now: i64,
    /// The last queue place given out.
    seq: i64,
    entries: Vec<Entry>,
    ids: Ids,
    /// Whether the commit hands the new lines' ids back ([`Committed::new_ids`]).
    keep_new_ids: bool,
    /// The malformed lines, written at commit with the conflicts, in file order.
    malformed: Vec<Malformed>,
    /// Entries whose id sorts after the one before: all of them when ids only grow (UUIDv7).
    ascending: usize,
    outcomes: Vec<Recorded>,
    report: IngestReport,
}

impl Outbox {
    /// Records lines and the file positions reached, in ONE transaction: either both are
    /// committed or neither is, so a crash re-reads exactly the uncommitted lines. Re-recording a
    /// line is harmless (same transaction_id and content → `already_seen`).
    ///
    /// A billable record is one ledger row and one `pending` row; the ledger row is not written
    /// again when Lago acks it (the ack deletes the `pending` row).
    pub fn ingest(
        &mut self,
        items: &[IngestItem],
        positions: &[FilePosition],
    ) -> Result<IngestReport, OutboxError> {
        let mut window = self.window()?;
        window.add(items)?;
        Ok(window.commit(positions)?.report)
    }

    /// Opens an ingest window: the outbox's write transaction, until it is committed (or
    /// dropped, which rolls it back).
    pub fn window(&mut self) -> Result<IngestWindow<'_>, OutboxError> {
        let Outbox {
            conn,
            sources,
            targets,
            ..
        } = self;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Queue places are numbered here, inside the write lock, so the ledger row is written
        // once with its place: the next after the highest ever given out.
        let seq = tx
            .prepare_cached(
                "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'pending'), 0)",
            )?
            .query_row([], |r| r.get(0))?;
        Ok(IngestWindow {
            tx,
            sources,
            targets,
            new_sources: Vec::new(),
            new_targets: Vec::new(),
            now: now_ms(),
            seq,
            entries: Vec::new(),
            ids: Ids::default(),
            keep_new_ids: false,
            malformed: Vec::new(),
            ascending: 0,
            outcomes: Vec::new(),
            report: IngestReport::default(),
        })
    }
}

impl IngestWindow<'_> {
    /// Lines added so far.
    pub fn lines(&self) -> usize {
        self.outcomes.len()
    }

    /// Makes room for `lines` more lines at once: a long window then does not copy what it
    /// holds each time it doubles.
    pub fn reserve(&mut self, lines: usize) {
        self.entries.reserve_exact(lines);
        self.outcomes.reserve_exact(lines);
        // As many ids' text as UUIDs take (36 bytes): it grows from there if they are longer.
        self.ids.0.reserve_exact(lines * 36);
    }

    /// Asks the commit for the new lines' ids ([`Committed::new_ids`]), for a caller that waits
    /// for their delivery (`tally replay --ship`).
    pub fn keep_new_ids(&mut self) {
        self.keep_new_ids = true;
    }

    /// Whether the ids added so far came (nearly) in order, as UUIDv7 ids do: the ledger then
    /// takes them as appends, and a longer window would gain nothing.
    pub fn in_id_order(&self) -> bool {
        self.ascending >= self.entries.len() - self.entries.len() / 16
    }

    /// Adds lines: their queue rows and rejected rows are written now, their ledger rows at
    /// commit.
    pub fn add(&mut self, items: &[IngestItem]) -> Result<(), OutboxError> {
        let tx = &self.tx;
        let mut enqueue = EnqueueRows::new(tx)?;
        let mut last_source: Option<(Arc<str>, i64)> = None;
        self.entries.reserve(items.len());
        for item in items {
            let place = self.outcomes.len() as u32;
            let (prepared, source) = match item {
                IngestItem::Record { prepared, source } => (prepared, source),
                IngestItem::Rejected {
                    source,
                    reason,
                    head,
                } => {
                    self.outcomes.push(Recorded::Rejected);
                    self.malformed.push(Malformed {
                        place,
                        file: source.file.clone(),
                        offset: source.offset,
                        reason: reason.clone(),
                        head: head_text(head),
                    });
                    continue;
                }
            };
            // Noted as new until the commit says otherwise.
            self.outcomes.push(Recorded::New);
            // A chunk's lines share their file's name: look it up once.
            let source_id = match &last_source {
                Some((file, id)) if Arc::ptr_eq(file, &source.file) => *id,
                _ => {
                    let id = match self.sources.get(&*source.file) {
                        Some(id) => *id,
                        None => super::source_id(tx, &source.file, &mut self.new_sources)?,
                    };
                    last_source = Some((source.file.clone(), id));
                    id
                }
            };
            let row = match &prepared.disposition {
                Disposition::Pending {
                    external_subscription_id,
                    code,
                    body,
                } => {
                    let target = match self
                        .targets
                        .get(code)
                        .and_then(|subs| subs.get(external_subscription_id))
                    {
                        Some(id) => *id,
                        None => {
                            target_id(tx, external_subscription_id, code, &mut self.new_targets)?
                        }
                    };
                    self.seq += 1;
                    enqueue.push(
                        self.seq,
                        Queued {
                            transaction_id: &prepared.transaction_id,
                            target_id: target,
                            body,
                            ids: &prepared.customer_ids,
                            attempts: 0,
                            reason: None,
                        },
                    )?;
                    Row::Queued {
                        seq: self.seq,
                        target_id: target,
                        time_ms: body.time_ms,
                    }
                }
                Disposition::Held { reason } => Row::Held(Box::new(HeldRow {
                    reason: reason.clone(),
                    record: prepared.record_json.clone(),
                    customer_ids: prepared.customer_ids.to_json(),
                })),
                Disposition::NotBillable { .. } => Row::NotBillable,
            };
            if self
                .entries
                .last()
                .is_none_or(|last| self.ids.get(last.id) < prepared.transaction_id.as_str())
            {
                self.ascending += 1;
            }
            self.entries.push(Entry {
                id: self.ids.push(&prepared.transaction_id),
                content_hash: prepared.content_hash,
                place,
                source_id,
                source_offset: source.offset as i64,
                row,
            });
        }
        enqueue.flush()?;
        Ok(())
    }

    /// Writes the ledger rows in id order, takes back the queue rows of the ids recorded before,
    /// records the file positions reached, and commits.
    pub fn commit(self, positions: &[FilePosition]) -> Result<Committed, OutboxError> {
        let IngestWindow {
            tx,
            sources,
            targets,
            new_sources,
            new_targets,
            now,
            mut entries,
            ids,
            keep_new_ids,
            malformed,
            mut outcomes,
            mut report,
            ..
        } = self;
        // Id order: consecutive inserts land on neighbouring pages, where uuid4 ids in file order
        // would each seek a random one. Of two lines with one id the first in the file is the
        // one recorded.
        entries.sort_unstable_by(|a, b| (ids.get(a.id), a.place).cmp(&(ids.get(b.id), b.place)));
        let mut found = vec![Found::New; entries.len()];
        let mut conflicts = Vec::new();
        {
            // The common row, a queued event's, many to a statement (`ledger.rs`).
            let mut queued_rows = QueuedRows::new(&tx)?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (transaction_id, state, content_hash, source_id, source_offset,
                     created_ms, reason, record, customer_ids)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (transaction_id) DO NOTHING",
            )?;
            for (i, e) in entries.iter().enumerate() {
                let (state, reason, record, customer_ids) = match &e.row {
                    Row::Queued {
                        seq,
                        target_id,
                        time_ms,
                    } => {
                        queued_rows.push(
                            QueuedRow {
                                item: i,
                                transaction_id: ids.get(e.id),
                                content_hash: e.content_hash,
                                seq: *seq,
                                target_id: *target_id,
                                time_ms: *time_ms,
                                source_id: e.source_id,
                                source_offset: e.source_offset,
                                created_ms: now,
                            },
                            &mut found,
                        )?;
                        continue;
                    }
                    Row::Held(h) => (
                        State::Held,
                        Some(h.reason.as_str()),
                        h.record.as_deref(),
                        Some(h.customer_ids.as_str()),
                    ),
                    Row::NotBillable => (State::NotBillable, None, None, None),
                };
                // The queued rows before it first: the ledger takes rows in id order, and of
                // two lines with one id the first in the file is recorded.
                queued_rows.flush(&mut found)?;
                let inserted = insert.execute(params![
                    ids.get(e.id),
                    state.code(),
                    e.content_hash,
                    e.source_id,
                    e.source_offset,
                    now,
                    reason,
                    record,
                    customer_ids,
                ])?;
                if inserted != 1 {
                    found[i] = Found::Recorded;
                }
            }
            queued_rows.flush(&mut found)?;

            // The lines whose id was recorded before, in file order: their queue rows taken back,
            // each compared with what is recorded. The rejected lines (those and the malformed
            // ones) are written in file order, as `tally queue list` shows them.
            let mut again: Vec<&Entry> = entries
                .iter()
                .zip(&found)
                .filter(|(_, f)| matches!(f, Found::Recorded))
                .map(|(e, _)| e)
                .collect();
            again.sort_unstable_by_key(|e| e.place);
            let mut unqueue = tx.prepare_cached("DELETE FROM pending WHERE seq = ?1")?;
            let mut existing = tx.prepare_cached(&format!(
                "SELECT e.content_hash, {EFFECTIVE_STATE} FROM events AS e
                 WHERE e.transaction_id = ?1"
            ))?;
            let mut reject = tx.prepare_cached(REJECT_SQL)?;
            let mut malformed = malformed.iter().peekable();
            for e in again {
                while let Some(m) = malformed.next_if(|m| m.place < e.place) {
                    report.rejected += m.write(&mut reject, now)?;
                }
                if let Row::Queued { seq, .. } = e.row {
                    unqueue.execute([seq])?;
                }
                let id = ids.get(e.id);
                let (hash, old_state): (i64, i64) =
                    existing.query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let place = e.place as usize;
                if hash == e.content_hash {
                    report.already_seen += 1;
                    outcomes[place] = Recorded::AlreadySeen;
                    continue;
                }
                outcomes[place] = Recorded::Conflict;
                conflicts.push(ConflictAt {
                    place,
                    transaction_id: id.into(),
                    source_offset: e.source_offset as u64,
                });
                let old_state = State::from_code(old_state).map_or("unknown", State::name);
                // Its file by the id this window gave it: rare, so looked up backwards.
                let file = new_sources
                    .iter()
                    .map(|(path, id)| (path, id))
                    .chain(sources.iter())
                    .find(|(_, id)| **id == e.source_id)
                    .map_or("", |(path, _)| path.as_str());
                report.conflicts += write_rejected(
                    &mut reject,
                    file,
                    e.source_offset as u64,
                    Some(id),
                    &conflict_reason(id, Some(old_state)),
                    id,
                    now,
                )?;
            }
            for m in malformed {
                report.rejected += m.write(&mut reject, now)?;
            }
            for (e, f) in entries.iter().zip(&found) {
                if matches!(f, Found::New) {
                    match e.row {
                        Row::Queued { .. } => report.pending += 1,
                        Row::Held(_) => report.held += 1,
                        Row::NotBillable => report.not_billable += 1,
                    }
                }
            }

            let mut position = tx.prepare_cached(
                "INSERT INTO positions (dev, ino, fingerprint, path, offset, finished, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (dev, ino) DO UPDATE SET fingerprint = excluded.fingerprint,
                     path = excluded.path, offset = excluded.offset,
                     finished = excluded.finished, updated_ms = excluded.updated_ms",
            )?;
            for p in positions {
                position.execute(params![
                    p.id.dev as i64,
                    p.id.ino as i64,
                    p.id.fingerprint as i64,
                    p.path.to_string_lossy(),
                    p.offset as i64,
                    p.finished,
                    now
                ])?;
            }
        }
        tx.commit()?;
        let new_ids = if keep_new_ids {
            let mut at: Vec<(u32, IdAt)> = entries
                .iter()
                .zip(&found)
                .filter(|(_, f)| matches!(f, Found::New))
                .map(|(e, _)| (e.place, e.id))
                .collect();
            at.sort_unstable_by_key(|(place, _)| *place);
            NewLineIds { ids, at }
        } else {
            NewLineIds::default()
        };
        // Only ids that are committed are remembered (a rolled-back one may be given again).
        sources.extend(new_sources);
        for (subscription, code, id) in new_targets {
            targets.entry(code).or_default().insert(subscription, id);
        }
        Ok(Committed {
            report,
            outcomes,
            conflicts,
            new_ids,
        })
    }
}

/// A rejected line's row; the same line rejected again at the same place is not written twice.
const REJECT_SQL: &str = "INSERT INTO rejected (source_file, source_offset, transaction_id, reason,
         head, created_ms, line_key)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
     ON CONFLICT (source_file, source_offset, line_key) DO NOTHING";
