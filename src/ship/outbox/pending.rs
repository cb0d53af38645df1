//! A row of `pending`, the delivery queue: a queued event as its fields (schema v7), written by
//! ingest, retry and audit, read back as the event's JSON by the claim, the dead letter and
//! `tally queue show`.
//!
//! Token counts are `u64` and SQLite's integers `i64`: they are stored bit for bit (`as i64`)
//! and read back the same way, so no count can fail an ingest (a count past `i64::MAX` reads as
//! negative at `sqlite3`, and as itself here).

use rusqlite::types::ValueRef;
use rusqlite::{CachedStatement, Connection, Row, ToSql};

use crate::ship::event::{EventBody, LagoEvent, Properties};
use crate::ship::resolve::CustomerIds;

/// The columns [`event_json`] reads, in its order, from `pending AS p` joined with its target as
/// `qt` (`LEFT JOIN targets AS qt ON qt.id = p.target_id`).
pub(crate) const EVENT_COLUMNS: &str = "p.event, qt.subscription_id, qt.code, p.time_ms,
     p.amount_cents, p.model, p.response_cost, p.input_tokens, p.output_tokens, p.total_tokens,
     p.cache_read_tokens, p.cache_creation_tokens, p.reasoning_tokens";

/// How many columns [`EVENT_COLUMNS`] is.
pub(crate) const EVENT_COLUMN_COUNT: usize = 13;

/// The columns of the customer ids, as [`customer_ids`] reads them.
pub(crate) const ID_COLUMNS: &str = "p.end_user_id, p.user_id, p.team_id";

/// A queued event, as [`Enqueue`] writes it.
pub(crate) struct Queued<'a> {
    pub transaction_id: &'a str,
    /// `targets.id`: its customer and code.
    pub target_id: i64,
    pub body: &'a EventBody,
    pub ids: &'a CustomerIds,
    /// Send attempts so far (kept across a requeue).
    pub attempts: i64,
    pub reason: Option<&'a str>,
}

/// The queue's insert, prepared once for all the rows a transaction queues.
pub(crate) struct Enqueue<'conn> {
    conn: &'conn Connection,
    one: CachedStatement<'conn>,
}

impl<'conn> Enqueue<'conn> {
    pub(crate) fn new(conn: &'conn Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            conn,
            one: conn.prepare_cached(&insert_sql(1))?,
        })
    }

    /// Queues `q` at place `seq` (the next place when `None`); returns its place.
    pub(crate) fn push(&mut self, seq: Option<i64>, q: &Queued<'_>) -> rusqlite::Result<i64> {
        bind_row(&mut self.one, 0, seq, q)?;
        self.one.raw_execute()?;
        Ok(self.conn.last_insert_rowid())
    }
}

/// Rows one insert statement queues during an ingest. A statement per row paid SQLite's
/// per-statement work for every event, AUTOINCREMENT's read and write of `sqlite_sequence`
/// included (docs/benchmarks.md).
const ROWS_PER_INSERT: usize = 64;

/// The ingest's queue insert: rows at the places given, written [`ROWS_PER_INSERT`] to a
/// statement. What is held back is written by [`EnqueueRows::flush`], which the ingest calls
/// before it reads the queue and before it commits.
pub(crate) struct EnqueueRows<'conn, 'a> {
    one: Enqueue<'conn>,
    many: CachedStatement<'conn>,
    rows: Vec<(i64, Queued<'a>)>,
}

impl<'conn, 'a> EnqueueRows<'conn, 'a> {
    pub(crate) fn new(conn: &'conn Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            one: Enqueue::new(conn)?,
            many: conn.prepare_cached(&insert_sql(ROWS_PER_INSERT))?,
            rows: Vec::with_capacity(ROWS_PER_INSERT),
        })
    }

    /// Queues `q` at place `seq`, now or with the next rows.
    pub(crate) fn push(&mut self, seq: i64, q: Queued<'a>) -> rusqlite::Result<()> {
        self.rows.push((seq, q));
        if self.rows.len() == ROWS_PER_INSERT {
            for (row, (seq, q)) in self.rows.iter().enumerate() {
                bind_row(&mut self.many, row, Some(*seq), q)?;
            }
            self.many.raw_execute()?;
            self.rows.clear();
        }
        Ok(())
    }

    /// Writes the rows held back.
    pub(crate) fn flush(&mut self) -> rusqlite::Result<()> {
        for (seq, q) in self.rows.drain(..) {
            self.one.push(Some(seq), &q)?;
        }
        Ok(())
    }
}

/// `INSERT INTO pending ... VALUES` with `rows` rows of placeholders, in [`bind_row`]'s order.
fn insert_sql(rows: usize) -> String {
    let row = format!("({})", ["?"; ROW_VALUES].join(", "));
    format!(
        "INSERT INTO pending (seq, transaction_id, target_id, time_ms, amount_cents, model,
             response_cost, input_tokens, output_tokens, total_tokens, cache_read_tokens,
             cache_creation_tokens, reasoning_tokens, end_user_id, user_id, team_id, attempts,
             reason)
         VALUES {}",
        vec![row; rows].join(", ")
    )
}

/// How many values [`bind_row`] binds per row.
const ROW_VALUES: usize = 18;

/// Binds `q` at place `seq` (the next place when `None`) as row `row` of `stmt`.
fn bind_row(
    stmt: &mut CachedStatement<'_>,
    row: usize,
    seq: Option<i64>,
    q: &Queued<'_>,
) -> rusqlite::Result<()> {
    let b = q.body;
    let values: [&dyn ToSql; ROW_VALUES] = [
        &seq,
        &q.transaction_id,
        &q.target_id,
        &b.time_ms,
        &b.precise_total_amount_cents,
        &b.model,
        &b.response_cost,
        &(b.input_tokens as i64),
        &(b.output_tokens as i64),
        &(b.total_tokens as i64),
        &b.cache_read_input_tokens.map(|n| n as i64),
        &b.cache_creation_input_tokens.map(|n| n as i64),
        &b.reasoning_tokens.map(|n| n as i64),
        &q.ids.end_user_id,
        &q.ids.user_id,
        &q.ids.team_id,
        &q.attempts,
        &q.reason,
    ];
    let at = row * ROW_VALUES;
    for (i, value) in values.into_iter().enumerate() {
        stmt.raw_bind_parameter(at + i + 1, value)?;
    }
    Ok(())
}

/// The event JSON of a row read with [`EVENT_COLUMNS`] from column `at` on: the stored JSON of
/// a row queued before v7, else written from its fields, read in place (no copy of its text).
/// A missing target reads as empty strings: Lago refuses that event, and the sender keeps it as
/// dead with Lago's reason, where an operator sees it.
pub(crate) fn event_json(
    r: &Row<'_>,
    at: usize,
    transaction_id: &str,
) -> rusqlite::Result<Vec<u8>> {
    if r.get_ref(at)? != ValueRef::Null {
        return r.get(at);
    }
    let text = |i: usize| -> rusqlite::Result<&str> {
        Ok(r.get_ref(at + i)?.as_str_or_null()?.unwrap_or(""))
    };
    let int = |i: usize| -> rusqlite::Result<Option<u64>> {
        Ok(r.get_ref(at + i)?.as_i64_or_null()?.map(|n| n as u64))
    };
    let (input_tokens, output_tokens) = (int(7)?.unwrap_or(0), int(8)?.unwrap_or(0));
    let event = LagoEvent {
        transaction_id,
        external_subscription_id: text(1)?,
        code: text(2)?,
        time_ms: r.get_ref(at + 3)?.as_i64_or_null()?.unwrap_or(0),
        precise_total_amount_cents: r.get_ref(at + 4)?.as_str_or_null()?,
        properties: Properties {
            model: text(5)?,
            response_cost: r.get(at + 6)?,
            input_tokens,
            output_tokens,
            total_tokens: int(9)?.unwrap_or(0),
            prompt_tokens: input_tokens,
            completion_tokens: output_tokens,
            cache_read_input_tokens: int(10)?,
            cache_creation_input_tokens: int(11)?,
            reasoning_tokens: int(12)?,
        },
    };
    Ok(event.to_json())
}

/// The customer ids of a row read with [`ID_COLUMNS`] from column `at` on.
pub(crate) fn customer_ids(r: &Row<'_>, at: usize) -> rusqlite::Result<CustomerIds> {
    Ok(CustomerIds {
        end_user_id: r.get(at)?,
        user_id: r.get(at + 1)?,
        team_id: r.get(at + 2)?,
    })
}
