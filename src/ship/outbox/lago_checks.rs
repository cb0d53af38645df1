//! What tally learns from Lago after the ack (`tally audit`, docs/operations.md): which external_subscription_ids Lago
//! does not know, which acked events Lago reported in `events.errors` (state lago-error), and
//! the work list of `tally audit` (`audit_items`, so an interrupted audit resumes).

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use super::pending::{Enqueue, Queued};
use super::{BOUND_ID, EFFECTIVE_STATE, Outbox, OutboxError, dequeue, now_ms, target_id};
use crate::ship::event::EventBody;
use crate::ship::resolve::CustomerIds;

/// What [`Outbox::mark_lago_error`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LagoErrorMarks {
    /// Moved to lago-error now.
    pub marked: Vec<String>,
    /// Known but left as they are: already lago-error (a repeated report), or in a state that
    /// is not Lago's to settle (dropped, dead, ...).
    pub unchanged: Vec<String>,
    /// Not in the outbox: ids Lago named that tally never sent (another sender, or pruned).
    pub unknown: Vec<String>,
}

/// One event to audit, as kept when the audit started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditItem {
    pub seq: i64,
    pub transaction_id: String,
    pub subscription_id: Option<String>,
    /// The event's code when it was acked (NULL for rows acked before schema v5).
    pub code: Option<String>,
    /// The event's timestamp as sent (`"1795773600.250"`), NULL before schema v5.
    pub timestamp: Option<String>,
}

/// Which acked events an audit covers; kept in `meta` so a resume covers the same ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AuditScope {
    /// Acked at or after this time (ms since the epoch), by when the event was recorded.
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// At most this many, picked at random.
    pub sample: Option<u64>,
}

/// How far the audit in `audit_items` has got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditProgress {
    pub total: u64,
    pub done: u64,
}

impl Outbox {
    /// The external_subscription_ids last found unknown to Lago, sorted.
    pub fn unknown_subscriptions(&self) -> Result<Vec<String>, OutboxError> {
        let mut stmt = self
            .conn()
            .prepare_cached("SELECT external_id FROM subscriptions WHERE known = 0 ORDER BY 1")?;
        let ids = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(ids)
    }

    /// Remembers what Lago said about one external_subscription_id.
    pub fn set_subscription_known(
        &mut self,
        external_id: &str,
        known: bool,
    ) -> Result<(), OutboxError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO subscriptions (external_id, known, checked_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (external_id) DO UPDATE SET known = excluded.known,
                     checked_ms = excluded.checked_ms",
            )?
            .execute(params![external_id, known, now_ms()])?;
        Ok(())
    }

    /// Lago reported these events in an `events.errors` webhook under `category`
    /// (`invalid_code`, ...): acked (or still pending: the webhook may beat the ack's commit)
    /// rows move to lago-error with the category as reason. Other states are left alone (a
    /// dropped or dead event is not Lago's to settle; a lago-error one was reported before).
    pub fn mark_lago_error(
        &mut self,
        ids: &[&str],
        category: &str,
    ) -> Result<LagoErrorMarks, OutboxError> {
        let now = now_ms();
        let mut marks = LagoErrorMarks::default();
        let tx = self
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut update = tx.prepare_cached(
                "UPDATE events SET state = 6, reason = ?2, updated_ms = ?3, queue_seq = NULL,
                     event = NULL, record = NULL, customer_ids = NULL
                 WHERE transaction_id = ?1 AND state IN (0, 3)",
            )?;
            let mut exists = tx.prepare_cached("SELECT 1 FROM events WHERE transaction_id = ?1")?;
            for id in ids {
                dequeue(&tx, id)?;
                let n = update.execute(params![id, category, now])?;
                if n == 1 {
                    marks.marked.push((*id).to_owned());
                } else if exists.query_row([id], |_| Ok(())).optional()?.is_some() {
                    marks.unchanged.push((*id).to_owned());
                } else {
                    marks.unknown.push((*id).to_owned());
                }
            }
        }
        tx.commit()?;
        Ok(marks)
    }

    /// The scope of the audit still in `audit_items` that has not finished, if any.
    pub fn unfinished_audit(&self) -> Result<Option<AuditScope>, OutboxError> {
        let scope: Option<String> = self
            .conn()
            .query_row(
                "SELECT value FROM meta WHERE key = 'audit_scope'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(scope.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Starts a fresh audit of the acked events in `scope`: the work list is written once, so a
    /// resumed audit checks exactly the events the first run picked.
    pub fn start_audit(&mut self, scope: &AuditScope) -> Result<u64, OutboxError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM audit_items", [])?;
        let order = if scope.sample.is_some() {
            "random()"
        } else {
            "e.created_ms, e.transaction_id"
        };
        // The timestamp as it was sent ("1795773600.250"), from its milliseconds.
        let sql = format!(
            "INSERT INTO audit_items (transaction_id, subscription_id, lago_code, lago_timestamp)
             SELECT e.transaction_id, t.subscription_id, t.code,
                    CASE WHEN e.lago_time_ms IS NULL THEN NULL
                         WHEN e.lago_time_ms < 0 THEN printf('-%d.%03d',
                             (-e.lago_time_ms) / 1000, (-e.lago_time_ms) % 1000)
                         ELSE printf('%d.%03d', e.lago_time_ms / 1000, e.lago_time_ms % 1000)
                    END
             FROM events AS e LEFT JOIN targets AS t ON t.id = e.target_id
             WHERE e.state IN (0, 3) AND {EFFECTIVE_STATE} = 3
               AND e.created_ms >= ?1 AND e.created_ms < ?2
             ORDER BY {order} LIMIT ?3"
        );
        let n = tx.execute(
            &sql,
            params![
                scope.since_ms.unwrap_or(i64::MIN),
                scope.until_ms.unwrap_or(i64::MAX),
                scope.sample.map_or(-1, |n| n.min(i64::MAX as u64) as i64)
            ],
        )?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('audit_scope', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [serde_json::to_string(scope).unwrap_or_default()],
        )?;
        tx.commit()?;
        Ok(n as u64)
    }

    pub fn audit_progress(&self) -> Result<AuditProgress, OutboxError> {
        let (total, done): (i64, i64) =
            self.conn()
                .query_row("SELECT count(*), count(result) FROM audit_items", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
        Ok(AuditProgress {
            total: total as u64,
            done: done as u64,
        })
    }

    /// Up to `max` events not checked yet, in work-list order.
    pub fn audit_next(&self, max: usize) -> Result<Vec<AuditItem>, OutboxError> {
        let mut stmt = self.conn().prepare_cached(
            "SELECT seq, transaction_id, subscription_id, lago_code, lago_timestamp
             FROM audit_items WHERE result IS NULL ORDER BY seq LIMIT ?1",
        )?;
        let items = stmt
            .query_map([max.min(i64::MAX as usize) as i64], |r| {
                Ok(AuditItem {
                    seq: r.get(0)?,
                    transaction_id: r.get(1)?,
                    subscription_id: r.get(2)?,
                    code: r.get(3)?,
                    timestamp: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(items)
    }

    /// Records what Lago said about checked events: `(seq, result, detail)`.
    pub fn audit_record(
        &mut self,
        results: &[(i64, &str, Option<&str>)],
    ) -> Result<(), OutboxError> {
        let tx = self
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx
                .prepare_cached("UPDATE audit_items SET result = ?2, detail = ?3 WHERE seq = ?1")?;
            for (seq, result, detail) in results {
                stmt.execute(params![seq, result, detail])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every checked event whose result is not `ok`: `(transaction_id, result, detail)`.
    pub fn audit_findings(&self) -> Result<Vec<(String, String, Option<String>)>, OutboxError> {
        let mut stmt = self.conn().prepare_cached(
            "SELECT transaction_id, result, detail FROM audit_items
             WHERE result IS NOT NULL AND result <> 'ok' ORDER BY seq",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Events per external_subscription_id among the audited ones.
    pub fn audit_subscriptions(&self) -> Result<Vec<(String, u64)>, OutboxError> {
        let mut stmt = self.conn().prepare_cached(
            "SELECT subscription_id, count(*) FROM audit_items
             WHERE subscription_id IS NOT NULL GROUP BY subscription_id ORDER BY 1",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The audit is over: a next `tally audit` starts afresh (the findings stay for inspection).
    pub fn finish_audit(&mut self) -> Result<(), OutboxError> {
        self.conn()
            .execute("DELETE FROM meta WHERE key = 'audit_scope'", [])?;
        Ok(())
    }

    /// Where an acked event came from and what it was sent as, to rebuild it for `--fix`.
    pub fn acked_origin(&self, transaction_id: &str) -> Result<Option<AckedOrigin>, OutboxError> {
        Ok(self
            .conn()
            .prepare_cached(&format!(
                "SELECT s.path, e.source_offset, e.content_hash, t.subscription_id, t.code
                 FROM events AS e LEFT JOIN sources AS s ON s.id = e.source_id
                 LEFT JOIN targets AS t ON t.id = e.target_id
                 WHERE e.transaction_id = {BOUND_ID} AND e.state IN (0, 3)
                   AND {EFFECTIVE_STATE} = 3"
            ))?
            .query_row([transaction_id], |r| {
                Ok(AckedOrigin {
                    source_file: r.get(0)?,
                    source_offset: r.get::<_, Option<i64>>(1)?.map(|o| o.max(0) as u64),
                    content_hash: r.get(2)?,
                    subscription_id: r.get(3)?,
                    code: r.get(4)?,
                })
            })
            .optional()?)
    }

    /// `--fix`: acked events Lago does not have go back to pending, rebuilt from their
    /// spend-log lines, so the shipper sends them again. Only rows still acked; returns those
    /// requeued.
    pub fn requeue_acked(&mut self, events: &[Rebuilt]) -> Result<Vec<String>, OutboxError> {
        let now = now_ms();
        let mut done = Vec::new();
        let tx = self
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut acked = tx.prepare_cached(&format!(
                "SELECT 1 FROM events AS e
                 WHERE e.transaction_id = {BOUND_ID} AND e.state IN (0, 3)
                   AND {EFFECTIVE_STATE} = 3"
            ))?;
            let mut enqueue = Enqueue::new(&tx)?;
            let mut set = tx.prepare_cached(
                "UPDATE events SET state = 0, queue_seq = ?2, updated_ms = ?3
                 WHERE transaction_id = ?1",
            )?;
            for e in events {
                let id = e.transaction_id.as_str();
                if acked.query_row([id], |_| Ok(())).optional()?.is_none() {
                    continue;
                }
                let target = target_id(&tx, &e.external_subscription_id, &e.code, &mut Vec::new())?;
                let seq = enqueue.push(
                    None,
                    &Queued {
                        transaction_id: id,
                        target_id: target,
                        body: &e.body,
                        ids: &e.customer_ids,
                        attempts: 0,
                        reason: Some("requeued by tally audit --fix: Lago did not have it"),
                    },
                )?;
                set.execute(params![id, seq, now])?;
                done.push(id.to_owned());
            }
        }
        tx.commit()?;
        Ok(done)
    }
}

/// An acked event rebuilt from its spend-log line, for [`Outbox::requeue_acked`].
#[derive(Debug, Clone, PartialEq)]
pub struct Rebuilt {
    pub transaction_id: String,
    pub external_subscription_id: String,
    pub code: String,
    pub body: EventBody,
    pub customer_ids: CustomerIds,
}

/// See [`Outbox::acked_origin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedOrigin {
    pub source_file: Option<String>,
    pub source_offset: Option<u64>,
    pub content_hash: i64,
    pub subscription_id: Option<String>,
    pub code: Option<String>,
}
