//! What the operator commands (`tally queue stats|list|show|retry|drop`) read from and do to the
//! outbox. Each is one short transaction, safe while `tally ship` runs in another process.

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use super::pending::{self, EVENT_COLUMN_COUNT, EVENT_COLUMNS, Enqueue, ID_COLUMNS, Queued};
use super::{BOUND_ID, EFFECTIVE_STATE, Outbox, OutboxError, State, dequeue, now_ms, target_id};
use crate::ship::event::EventBody;
use crate::ship::resolve::{CustomerIds, Disposition, EventSpec, disposition, re_resolve};
use crate::ship::tail::{FileId, FilePosition};
use crate::spend::SpendRecord;

/// The last error Lago (or the way to it) gave, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LagoErrorNote {
    pub message: String,
    pub at_ms: i64,
}

/// A file position with the time it was committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PositionNote {
    pub position: FilePosition,
    pub updated_ms: i64,
}

/// Counts by state and what an operator checks first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub pending: u64,
    /// Of `pending`, how many the running sender last had in flight (0 when no sender runs).
    pub in_flight: u64,
    pub held: u64,
    pub dead: u64,
    pub acked: u64,
    pub not_billable: u64,
    pub dropped: u64,
    /// Acked, then reported by Lago's `events.errors` webhook: stored by Lago, not billed.
    pub lago_error: u64,
    /// external_subscription_ids Lago does not know (`GET /subscriptions/{id}` answered 404),
    /// as last checked by the shipper or `tally audit`: their events are stored, never billed.
    pub unknown_subscriptions: Vec<String>,
    /// Rejected lines (malformed, too long, conflicting duplicates), not counting dropped ones.
    pub rejected: u64,
    /// When the oldest pending event was recorded (ms since the epoch).
    pub oldest_pending_ms: Option<i64>,
    pub last_lago_error: Option<LagoErrorNote>,
    pub positions: Vec<PositionNote>,
}

impl Stats {
    /// Age of the oldest pending event at `now_ms`.
    pub fn oldest_pending_age(&self, now_ms: i64) -> Option<std::time::Duration> {
        self.oldest_pending_ms
            .map(|t| std::time::Duration::from_millis(now_ms.saturating_sub(t).max(0) as u64))
    }
}

/// Queue depth for the gauges: [`Outbox::depth`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Depth {
    pub pending: u64,
    /// Of `pending`, how many the running sender last had in flight (0 when no sender runs).
    pub in_flight: u64,
    pub held: u64,
    pub dead: u64,
    pub rejected: u64,
    pub oldest_pending_ms: Option<i64>,
}

/// What to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFilter {
    /// Events in one state (oldest first).
    State(State),
    /// Rejected lines (oldest first).
    Rejected,
}

/// One line of `tally queue list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ItemSummary {
    /// The transaction_id, or `rejected:<n>` for a rejected line.
    pub id: String,
    /// `pending`, `held`, …, or `rejected`.
    pub state: String,
    pub reason: Option<String>,
    pub attempts: u64,
    pub source_file: Option<String>,
    pub source_offset: Option<u64>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// Everything known about one event (`tally queue show`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ItemDetail {
    pub transaction_id: String,
    pub state: State,
    /// The spend record, kept while held (a pending or dead event holds its content).
    pub record: Option<String>,
    /// The record's customer ids (absent once acked: acked rows are slimmed).
    pub customer_ids: Option<String>,
    /// The Lago event as it is (or was) sent.
    pub event: Option<String>,
    pub external_subscription_id: Option<String>,
    pub reason: Option<String>,
    pub attempts: u64,
    pub source_file: Option<String>,
    pub source_offset: Option<u64>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Not tracked per event since schema v4 (the one sender keeps what it has in flight in
    /// memory, see `lock.rs`): always `None`, kept for the output format.
    pub leased_until_ms: Option<i64>,
}

/// Everything known about one rejected line (`tally queue show rejected:<n>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedDetail {
    /// `rejected:<n>`, as `list` shows it.
    pub id: String,
    pub reason: String,
    /// The line's first bytes (lossy UTF-8), as kept.
    pub head: String,
    /// Set for a conflicting duplicate.
    pub transaction_id: Option<String>,
    pub source_file: String,
    pub source_offset: u64,
    pub created_ms: i64,
    /// Why it was dropped, once `tally queue drop` removed it.
    pub dropped_reason: Option<String>,
}

/// What `retry` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetryReport {
    /// Back to pending, with a freshly built event.
    pub requeued: Vec<String>,
    /// Still no customer id with the given charge-by: stay held, reason updated.
    pub still_held: Vec<String>,
    /// Not found, or not held / dead (nothing to retry).
    pub skipped: Vec<String>,
}

/// Prefix of rejected-line ids in `list` output and in `drop`.
pub const REJECTED_PREFIX: &str = "rejected:";

impl Outbox {
    /// What the queue gauges need, cheaply enough to ask every few seconds whatever the outbox
    /// size: the counts come from the queue and the partial indexes of held and dead rows.
    pub fn depth(&self) -> Result<Depth, OutboxError> {
        let conn = self.conn();
        let count = |sql: &str| -> Result<u64, OutboxError> {
            Ok(conn
                .prepare_cached(sql)?
                .query_row([], |r| r.get::<_, i64>(0))? as u64)
        };
        let pending = count("SELECT count(*) FROM pending")?;
        let held = count("SELECT count(*) FROM events WHERE state = 1")?;
        let dead = count("SELECT count(*) FROM events WHERE state = 2")?;
        let rejected = count("SELECT count(*) FROM rejected WHERE dropped_reason IS NULL")?;
        // The queue's head is its oldest row (numbered in ingest order, retries at the end).
        let oldest_pending_ms: Option<i64> = conn
            .prepare_cached(
                "SELECT min(e.created_ms) FROM (SELECT transaction_id FROM pending
                     ORDER BY seq LIMIT 64) AS p JOIN events AS e
                     ON e.transaction_id = p.transaction_id",
            )?
            .query_row([], |r| r.get(0))?;
        // What the sender last noted as in flight counts only while a sender holds the lock.
        let in_flight = if super::sender_running(self.path()) {
            conn.prepare_cached("SELECT value FROM meta WHERE key = 'sender_in_flight'")?
                .query_row([], |r| r.get::<_, String>(0))
                .optional()?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        } else {
            0
        };
        Ok(Depth {
            pending,
            in_flight: in_flight.min(pending),
            held,
            dead,
            rejected,
            oldest_pending_ms,
        })
    }

    /// Everything `tally queue stats` shows. Counts acked and the other settled states with one
    /// pass over the table (they have no index); for the periodic gauges use [`Outbox::depth`].
    pub fn stats(&self) -> Result<Stats, OutboxError> {
        let conn = self.conn();
        let mut stats = Stats::default();
        // One scan with a counter per state: `GROUP BY state` sorted the whole table first, a
        // sorter as large as the cache (RSS grew with the outbox) and the slowest way to count.
        let counts: [i64; 7] = conn.query_row(
            "SELECT count(*) FILTER (WHERE state = 0), count(*) FILTER (WHERE state = 1),
                    count(*) FILTER (WHERE state = 2), count(*) FILTER (WHERE state = 3),
                    count(*) FILTER (WHERE state = 4), count(*) FILTER (WHERE state = 5),
                    count(*) FILTER (WHERE state = 6)
             FROM events",
            [],
            |r| {
                Ok([
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ])
            },
        )?;
        let [queued, held, dead, acked, not_billable, dropped, lago_error] =
            counts.map(|n| n as u64);
        // A queued row is pending while it is in the queue, acked once it left it.
        let pending = self.pending_count()?.min(queued);
        let acked = acked + (queued - pending);
        stats.lago_error = lago_error;
        stats.unknown_subscriptions = self.unknown_subscriptions()?;
        stats.pending = pending;
        stats.held = held;
        stats.dead = dead;
        stats.acked = acked;
        stats.not_billable = not_billable;
        stats.dropped = dropped;
        let depth = self.depth()?;
        stats.in_flight = depth.in_flight.min(stats.pending);
        stats.oldest_pending_ms = depth.oldest_pending_ms;
        stats.rejected = depth.rejected;
        let message: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'last_lago_error'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let at: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'last_lago_error_ms'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        stats.last_lago_error = message.map(|message| LagoErrorNote {
            message,
            at_ms: at.and_then(|a| a.parse().ok()).unwrap_or_default(),
        });
        let mut stmt = conn.prepare_cached(
            "SELECT dev, ino, fingerprint, path, offset, finished, updated_ms FROM positions
             ORDER BY updated_ms",
        )?;
        stats.positions = stmt
            .query_map([], |r| {
                Ok(PositionNote {
                    position: FilePosition {
                        id: FileId {
                            dev: r.get::<_, i64>(0)? as u64,
                            ino: r.get::<_, i64>(1)? as u64,
                            fingerprint: r.get::<_, i64>(2)? as u64,
                        },
                        path: r.get::<_, String>(3)?.into(),
                        offset: r.get::<_, i64>(4)? as u64,
                        finished: r.get(5)?,
                    },
                    updated_ms: r.get(6)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(stats)
    }

    /// Up to `limit` items matching `filter`, oldest first.
    pub fn list(&self, filter: ListFilter, limit: usize) -> Result<Vec<ItemSummary>, OutboxError> {
        let conn = self.conn();
        let limit = limit.min(i64::MAX as usize) as i64;
        let items = match filter {
            ListFilter::Rejected => {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, reason, source_file, source_offset, created_ms FROM rejected
                     WHERE dropped_reason IS NULL ORDER BY id LIMIT ?1",
                )?;
                stmt.query_map([limit], |r| {
                    Ok(ItemSummary {
                        id: format!("{REJECTED_PREFIX}{}", r.get::<_, i64>(0)?),
                        state: "rejected".into(),
                        reason: r.get(1)?,
                        attempts: 0,
                        source_file: r.get(2)?,
                        source_offset: r.get::<_, Option<i64>>(3)?.map(|o| o as u64),
                        created_ms: r.get(4)?,
                        updated_ms: r.get(4)?,
                    })
                })?
                .collect::<Result<_, _>>()?
            }
            ListFilter::State(state) => {
                const COLUMNS: &str = "e.transaction_id, e.reason, e.attempts, s.path,
                    e.source_offset, e.created_ms, coalesce(e.updated_ms, e.created_ms)";
                let sql = match state {
                    // The queue in its order, with its attempts and last error.
                    State::Pending => "SELECT p.transaction_id, p.reason, p.attempts, s.path,
                             e.source_offset, e.created_ms, coalesce(e.updated_ms, e.created_ms)
                         FROM pending AS p JOIN events AS e ON e.transaction_id = p.transaction_id
                         LEFT JOIN sources AS s ON s.id = e.source_id
                         ORDER BY p.seq LIMIT ?1"
                        .to_owned(),
                    State::Acked => format!(
                        "SELECT {COLUMNS} FROM events AS e
                         LEFT JOIN sources AS s ON s.id = e.source_id
                         WHERE e.state IN (0, 3) AND {EFFECTIVE_STATE} = 3
                         ORDER BY e.created_ms LIMIT ?1"
                    ),
                    // `state = <literal>` lets SQLite use the partial index of that state.
                    other => format!(
                        "SELECT {COLUMNS} FROM events AS e
                         LEFT JOIN sources AS s ON s.id = e.source_id
                         WHERE e.state = {} ORDER BY e.created_ms LIMIT ?1",
                        other.code()
                    ),
                };
                let mut stmt = conn.prepare_cached(&sql)?;
                stmt.query_map([limit], |r| {
                    Ok(ItemSummary {
                        id: r.get(0)?,
                        state: state.name().into(),
                        reason: r.get(1)?,
                        attempts: r.get::<_, i64>(2)? as u64,
                        source_file: r.get(3)?,
                        source_offset: r.get::<_, Option<i64>>(4)?.map(|o| o as u64),
                        created_ms: r.get(5)?,
                        updated_ms: r.get(6)?,
                    })
                })?
                .collect::<Result<_, _>>()?
            }
        };
        Ok(items)
    }

    /// Everything about one transaction_id, or `None` when it was never recorded.
    pub fn show(&self, transaction_id: &str) -> Result<Option<ItemDetail>, OutboxError> {
        let mut stmt = self.conn().prepare_cached(&format!(
            "SELECT {EFFECTIVE_STATE}, e.record, e.event, t.subscription_id,
                 coalesce(p.reason, e.reason), coalesce(p.attempts, e.attempts), s.path,
                 e.source_offset, e.created_ms, coalesce(e.updated_ms, e.created_ms),
                 e.customer_ids, p.seq, {EVENT_COLUMNS}, {ID_COLUMNS}
             FROM events AS e
             LEFT JOIN pending AS p ON p.seq = e.queue_seq
             LEFT JOIN targets AS qt ON qt.id = p.target_id
             LEFT JOIN targets AS t ON t.id = e.target_id
             LEFT JOIN sources AS s ON s.id = e.source_id
             WHERE e.transaction_id = {BOUND_ID}"
        ))?;
        let text = |b: Option<Vec<u8>>| b.map(|b| String::from_utf8_lossy(&b).into_owned());
        Ok(stmt
            .query_row([transaction_id], |r| {
                // A queued row's event and ids are in its `pending` row, the others' in the ledger.
                let queued = r.get::<_, Option<i64>>(11)?.is_some();
                let (event, customer_ids) = if queued {
                    (
                        Some(pending::event_json(r, 12, transaction_id)?),
                        Some(pending::customer_ids(r, 12 + EVENT_COLUMN_COUNT)?.to_json()),
                    )
                } else {
                    (r.get(2)?, r.get(10)?)
                };
                Ok(ItemDetail {
                    transaction_id: transaction_id.to_owned(),
                    state: State::from_code(r.get(0)?).unwrap_or(State::Pending),
                    record: text(r.get(1)?),
                    event: text(event),
                    external_subscription_id: r.get(3)?,
                    reason: r.get(4)?,
                    attempts: r.get::<_, i64>(5)? as u64,
                    source_file: r.get(6)?,
                    source_offset: r.get::<_, Option<i64>>(7)?.map(|o| o as u64),
                    created_ms: r.get(8)?,
                    updated_ms: r.get(9)?,
                    leased_until_ms: None,
                    customer_ids,
                })
            })
            .optional()?)
    }

    /// Everything about one rejected line, by the `rejected:<n>` id `list` prints; `None` when
    /// there is no such line (or `id` is not of that form).
    pub fn show_rejected(&self, id: &str) -> Result<Option<RejectedDetail>, OutboxError> {
        let Some(n) = id
            .strip_prefix(REJECTED_PREFIX)
            .and_then(|n| n.parse::<i64>().ok())
        else {
            return Ok(None);
        };
        let mut stmt = self.conn().prepare_cached(
            "SELECT reason, head, transaction_id, source_file, source_offset, created_ms,
                 dropped_reason
             FROM rejected WHERE id = ?1",
        )?;
        Ok(stmt
            .query_row([n], |r| {
                Ok(RejectedDetail {
                    id: format!("{REJECTED_PREFIX}{n}"),
                    reason: r.get(0)?,
                    head: r.get(1)?,
                    transaction_id: r.get(2)?,
                    source_file: r.get(3)?,
                    source_offset: r.get::<_, i64>(4)?.max(0) as u64,
                    created_ms: r.get(5)?,
                    dropped_reason: r.get(6)?,
                })
            })
            .optional()?)
    }

    /// Re-resolves held or dead events with `spec` (e.g. another charge-by) and puts those that
    /// now have a customer back to pending, with a freshly built event. `ids` empty means every
    /// event in `state` (held or dead; both when `state` is `None`).
    pub fn retry(
        &mut self,
        ids: &[String],
        state: Option<State>,
        spec: &EventSpec,
    ) -> Result<RetryReport, OutboxError> {
        let now = now_ms();
        let mut report = RetryReport::default();
        let tx = self
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            type Row = (
                String,
                i64,
                Option<Vec<u8>>,
                Option<Vec<u8>>,
                Option<String>,
                i64,
            );
            let row = |r: &rusqlite::Row<'_>| Row::try_from(r);
            let candidates: Vec<Row> = if ids.is_empty() {
                let states: Vec<i64> = match state {
                    Some(s) => vec![s.code()],
                    None => vec![State::Held.code(), State::Dead.code()],
                };
                let mut out = Vec::new();
                for code in states {
                    let sql = format!(
                        "SELECT transaction_id, state, record, event, customer_ids, attempts
                         FROM events WHERE state = {code}"
                    );
                    let mut stmt = tx.prepare(&sql)?;
                    let rows = stmt.query_map([], row)?;
                    for row in rows {
                        out.push(row?);
                    }
                }
                out
            } else {
                let mut stmt = tx.prepare_cached(
                    "SELECT transaction_id, state, record, event, customer_ids, attempts
                     FROM events WHERE transaction_id = ?1",
                )?;
                let mut out = Vec::new();
                for id in ids {
                    match stmt.query_row([id], row).optional()? {
                        Some(row) => out.push(row),
                        None => report.skipped.push(id.clone()),
                    }
                }
                out
            };
            let mut enqueue = Enqueue::new(&tx)?;
            let mut requeue = tx.prepare_cached(
                "UPDATE events SET state = 0, queue_seq = ?2, target_id = ?3, lago_time_ms = ?4,
                     reason = NULL, record = NULL, event = NULL, customer_ids = NULL,
                     updated_ms = ?5
                 WHERE transaction_id = ?1",
            )?;
            let mut hold = tx.prepare_cached(
                "UPDATE events SET state = 1, target_id = NULL, reason = ?2, updated_ms = ?3
                 WHERE transaction_id = ?1",
            )?;
            for (id, code, record, event, customer_ids, attempts) in candidates {
                // A held row has its record and ids; a dead one its event and ids.
                let ids: CustomerIds = customer_ids
                    .and_then(|c| serde_json::from_str(&c).ok())
                    .unwrap_or_default();
                let from_record = record
                    .and_then(|r| serde_json::from_slice::<SpendRecord>(&r).ok())
                    .map(|r| (disposition(&r, spec), CustomerIds::of(&r)));
                let outcome = match State::from_code(code) {
                    Some(State::Held) if from_record.is_some() => from_record,
                    Some(State::Held | State::Dead) => event
                        .as_deref()
                        .and_then(EventBody::from_json)
                        .map(|body| (re_resolve(body, &ids, spec), ids)),
                    _ => None,
                };
                let Some((outcome, ids)) = outcome else {
                    report.skipped.push(id);
                    continue;
                };
                match outcome {
                    Disposition::Pending {
                        external_subscription_id,
                        code,
                        body,
                    } => {
                        // Not cached: the ingest's cache learns it from the table when needed.
                        let target =
                            target_id(&tx, &external_subscription_id, &code, &mut Vec::new())?;
                        let seq = enqueue.push(
                            None,
                            &Queued {
                                transaction_id: &id,
                                target_id: target,
                                body: &body,
                                ids: &ids,
                                attempts,
                                reason: None,
                            },
                        )?;
                        requeue.execute(params![id, seq, target, body.time_ms, now])?;
                        report.requeued.push(id);
                    }
                    Disposition::Held { reason } => {
                        hold.execute(params![id, reason, now])?;
                        report.still_held.push(id);
                    }
                    Disposition::NotBillable { .. } => report.skipped.push(id),
                }
            }
        }
        tx.commit()?;
        Ok(report)
    }

    /// Removes events (pending, held or dead) or rejected lines (`rejected:<n>`) without billing
    /// them. The row stays, in state dropped, with the reason: nothing disappears silently, and a
    /// dropped transaction_id read again is still recognised. Returns the ids dropped.
    pub fn drop_items(&mut self, ids: &[String], reason: &str) -> Result<Vec<String>, OutboxError> {
        let now = now_ms();
        let mut dropped = Vec::new();
        let tx = self
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut event = tx.prepare_cached(
                "UPDATE events SET state = 5, event = NULL, record = NULL, customer_ids = NULL,
                     reason = ?2, updated_ms = ?3, queue_seq = NULL
                 WHERE transaction_id = ?1 AND (state IN (1, 2) OR (state = 0 AND ?4))",
            )?;
            let mut rejected = tx.prepare_cached(
                "UPDATE rejected SET dropped_reason = ?2 WHERE id = ?1 AND dropped_reason IS NULL",
            )?;
            let reason = format!("dropped by operator: {reason}");
            for id in ids {
                let n = match id
                    .strip_prefix(REJECTED_PREFIX)
                    .and_then(|n| n.parse::<i64>().ok())
                {
                    Some(n) => rejected.execute(params![n, reason])?,
                    None => {
                        // A queued row is dropped only while it is still in the queue.
                        let dequeued = dequeue(&tx, id)?.is_some();
                        event.execute(params![id, reason, now, dequeued])?
                    }
                };
                if n == 1 {
                    dropped.push(id.clone());
                }
            }
        }
        tx.commit()?;
        Ok(dropped)
    }
}
