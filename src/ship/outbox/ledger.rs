//! The ledger rows of queued events, inserted [`ROWS_PER_INSERT`] to a statement by an ingest.
//!
//! One statement per row paid SQLite's per-statement work for every event, and each statement
//! opened a new cursor that searched the ledger from its root. Within one statement the cursor
//! stays where the last row went: UUIDv7 ids, which only grow, are each appended after a single
//! comparison with the last cell (docs/benchmarks.md).
//!
//! Which rows a statement inserted is read from SQLite's count of changes: when it is every row,
//! all are new (the usual case). Otherwise each row's ledger entry is read back. A row is new if
//! its `queue_seq` is the place this ingest gave it: a place is given out once (the queue is
//! `AUTOINCREMENT` and the ingest numbers from its highest), so an id recorded before, or earlier
//! in this ingest, holds another place or none.

use rusqlite::{CachedStatement, Connection, OptionalExtension, ToSql};

use super::State;
use super::ingest::Found;

/// Rows one statement inserts.
const ROWS_PER_INSERT: usize = 64;

/// The values of a queued event's ledger row, in the statement's order.
const ROW_VALUES: usize = 8;

/// A queued event's ledger row: its state is pending, with no reason, record or ids.
pub(super) struct QueuedRow<'a> {
    /// The item's index in the ingest, where its [`Found`] is written.
    pub item: usize,
    pub transaction_id: &'a str,
    pub content_hash: i64,
    /// Its place in the queue, given by this ingest.
    pub seq: i64,
    pub target_id: i64,
    pub time_ms: i64,
    pub source_id: i64,
    pub source_offset: i64,
    pub created_ms: i64,
}

/// The ingest's inserts of queued events' ledger rows. A row is held back until
/// [`ROWS_PER_INSERT`] are; [`QueuedRows::flush`] writes the rest. The ingest flushes before any
/// other ledger write, so the rows still go in the order the ingest gives them (of two lines
/// with one id, the first is the one recorded).
pub(super) struct QueuedRows<'conn, 'a> {
    many: CachedStatement<'conn>,
    one: CachedStatement<'conn>,
    place: CachedStatement<'conn>,
    rows: Vec<QueuedRow<'a>>,
}

impl<'conn, 'a> QueuedRows<'conn, 'a> {
    pub(super) fn new(conn: &'conn Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            many: conn.prepare_cached(&insert_sql(ROWS_PER_INSERT))?,
            one: conn.prepare_cached(&insert_sql(1))?,
            place: conn.prepare_cached("SELECT queue_seq FROM events WHERE transaction_id = ?1")?,
            rows: Vec::with_capacity(ROWS_PER_INSERT),
        })
    }

    /// Inserts `row`, now or with the next rows; its finding goes to `found[row.item]`.
    pub(super) fn push(&mut self, row: QueuedRow<'a>, found: &mut [Found]) -> rusqlite::Result<()> {
        self.rows.push(row);
        if self.rows.len() == ROWS_PER_INSERT {
            for (i, row) in self.rows.iter().enumerate() {
                bind(&mut self.many, i, row)?;
            }
            let inserted = self.many.raw_execute()?;
            self.settle(inserted, found)?;
        }
        Ok(())
    }

    /// Inserts the rows held back.
    pub(super) fn flush(&mut self, found: &mut [Found]) -> rusqlite::Result<()> {
        for row in &self.rows {
            bind(&mut self.one, 0, row)?;
            found[row.item] = if self.one.raw_execute()? == 1 {
                Found::New
            } else {
                Found::Recorded
            };
        }
        self.rows.clear();
        Ok(())
    }

    /// Notes what became of the rows one statement wrote, `inserted` of them new.
    fn settle(&mut self, inserted: usize, found: &mut [Found]) -> rusqlite::Result<()> {
        for row in self.rows.drain(..) {
            let new = inserted == ROWS_PER_INSERT || {
                let place: Option<Option<i64>> = self
                    .place
                    .query_row([row.transaction_id], |r| r.get(0))
                    .optional()?;
                place.flatten() == Some(row.seq)
            };
            found[row.item] = if new { Found::New } else { Found::Recorded };
        }
        Ok(())
    }
}

/// `INSERT INTO events` of `rows` queued events' rows, their constant columns in the statement.
///
/// `OR IGNORE` rather than `ON CONFLICT (transaction_id) DO NOTHING`: the same for a recorded id,
/// and no other constraint can fail (every value bound is a string or an integer, never NULL).
/// With only ignored conflicts the statement can never stop half way, so SQLite keeps no
/// statement journal for it: a copy of every ledger page the statement touches, made before it
/// changes it, which for random ids was a page per row.
fn insert_sql(rows: usize) -> String {
    let row = format!("(?, {}, ?, ?, ?, ?, ?, ?, ?)", State::Pending.code());
    format!(
        "INSERT OR IGNORE INTO events (transaction_id, state, content_hash, queue_seq, target_id,
             lago_time_ms, source_id, source_offset, created_ms)
         VALUES {}",
        vec![row; rows].join(", ")
    )
}

/// Binds `row` as row `at` of `stmt`.
fn bind(stmt: &mut CachedStatement<'_>, at: usize, row: &QueuedRow<'_>) -> rusqlite::Result<()> {
    let values: [&dyn ToSql; ROW_VALUES] = [
        &row.transaction_id,
        &row.content_hash,
        &row.seq,
        &row.target_id,
        &row.time_ms,
        &row.source_id,
        &row.source_offset,
        &row.created_ms,
    ];
    for (i, value) in values.into_iter().enumerate() {
        stmt.raw_bind_parameter(at * ROW_VALUES + i + 1, value)?;
    }
    Ok(())
}
