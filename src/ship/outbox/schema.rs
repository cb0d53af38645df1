//! The versioned schema of `shipper.db`, migrated forward with `PRAGMA user_version`.
//!
//! Each entry of [`MIGRATIONS`] moves the schema from version *i* to *i + 1*. The pending ones run
//! in one transaction with the `user_version` bump, so a crash mid-migration leaves the old version
//! intact and the migrations simply run again, and a reader never sees a schema half way. A
//! database from a newer tally (a higher version than this build knows) is refused rather than
//! guessed at.
//!
//! Since v6 the outbox is two tables (see `docs/delivery.md`, "The outbox"):
//! - `events`, the ledger: one row per transaction_id ever recorded, written once at ingest and
//!   keyed by the id itself (`WITHOUT ROWID`: the id is stored once, which is what keeps ten
//!   million acked ids under a gigabyte). `state`: 0 queued, 1 held, 2 dead, 3 acked, 4 not
//!   billable, 5 dropped, 6 lago-error (acked, then reported by Lago's `events.errors` webhook).
//! - `pending`, the delivery queue: the Lago event of every queued row, in ingest order, as its
//!   fields (since v7; `ship::event` writes the JSON when it is claimed). A queued event (state
//!   0) is *pending* while its `pending` row (`queue_seq`) exists and *acked* once the sender has
//!   deleted that row on Lago's word. The ack is that delete, in queue order (a run of acked
//!   places at a time): it never seeks the ledger, whose order is the ids' (random for uuid4).
//!
//! The view `event_states` spells the effective state out for a person at `sqlite3`.

use rusqlite::{Connection, TransactionBehavior};

use super::OutboxError;

/// The view `event_states` (v6; made again over v7's queue).
macro_rules! event_states_view {
    () => {
        r#"
    CREATE VIEW event_states AS
        SELECT e.transaction_id,
               CASE e.state
                   WHEN 0 THEN CASE WHEN p.seq IS NULL THEN 'acked' ELSE 'pending' END
                   WHEN 1 THEN 'held' WHEN 2 THEN 'dead' WHEN 3 THEN 'acked'
                   WHEN 4 THEN 'not_billable' WHEN 5 THEN 'dropped' WHEN 6 THEN 'lago_error'
               END AS state,
               t.subscription_id, t.code AS lago_code, e.lago_time_ms,
               coalesce(p.attempts, e.attempts) AS attempts, coalesce(p.reason, e.reason) AS reason,
               s.path AS source_file, e.source_offset, e.created_ms,
               coalesce(e.updated_ms, e.created_ms) AS updated_ms
        FROM events e
        LEFT JOIN pending p ON p.seq = e.queue_seq
        LEFT JOIN targets t ON t.id = e.target_id
        LEFT JOIN sources s ON s.id = e.source_id;
    "#
    };
}

/// Migration *i* takes the schema from version *i* to *i + 1*.
pub const MIGRATIONS: &[&str] = &[
    // v1
    r#"
    CREATE TABLE events (
        transaction_id  TEXT PRIMARY KEY NOT NULL,
        state           INTEGER NOT NULL,
        content_hash    INTEGER NOT NULL,
        record          BLOB,              -- canonical record JSON, only while held
        event           BLOB,              -- Lago event JSON while pending or dead
        customer_ids    TEXT,              -- the record's ids (JSON), to re-resolve; NULL once acked
        subscription_id TEXT,
        reason          TEXT,              -- why held / dead / dropped, or the last send error
        attempts        INTEGER NOT NULL DEFAULT 0,
        source_file     TEXT,
        source_offset   INTEGER,
        created_ms      INTEGER NOT NULL,
        updated_ms      INTEGER NOT NULL,
        lease_until_ms  INTEGER NOT NULL DEFAULT 0,
        lease_owner     INTEGER,
        lease_pid       INTEGER
    );
    -- What a sender claims from: pending rows, not leased (or lease expired) first.
    CREATE INDEX events_pending ON events (lease_until_ms, created_ms) WHERE state = 0;
    CREATE INDEX events_held ON events (created_ms) WHERE state = 1;
    CREATE INDEX events_dead ON events (created_ms) WHERE state = 2;

    CREATE TABLE rejected (
        id             INTEGER PRIMARY KEY,
        source_file    TEXT NOT NULL,
        source_offset  INTEGER NOT NULL,
        transaction_id TEXT,               -- set for a conflicting duplicate
        reason         TEXT NOT NULL,
        head           TEXT NOT NULL,      -- first bytes of the line, lossy UTF-8
        created_ms     INTEGER NOT NULL,
        dropped_reason TEXT,
        UNIQUE (source_file, source_offset)
    );

    CREATE TABLE positions (
        dev         INTEGER NOT NULL,
        ino         INTEGER NOT NULL,
        fingerprint INTEGER NOT NULL,
        path        TEXT NOT NULL,
        offset      INTEGER NOT NULL,
        finished    INTEGER NOT NULL,
        updated_ms  INTEGER NOT NULL,
        PRIMARY KEY (dev, ino)
    );

    CREATE TABLE meta (
        key   TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    );
    "#,
    // v2: the pending index no longer holds `lease_until_ms`. A claim rewrites the lease columns
    // of every row it takes; with them in the index, each claim also moved every claimed row's
    // index entry (a delete and an insert per event). Keyed on `created_ms` alone, a claim only
    // touches the table row, and the ack's `state` change is the one index write per event. The
    // few rows leased at any time are skipped by the claim's filter as it walks the index.
    r#"
    DROP INDEX events_pending;
    CREATE INDEX events_pending ON events (created_ms) WHERE state = 0;
    "#,
    // v3: a rejected line is one line *at one place with one content*. v1 keyed it on (file,
    // offset) alone, so after a rotation a malformed line of the new live file at the offset of
    // an earlier one was silently dropped. A re-read after a crash still dedupes (same key).
    r#"
    CREATE TABLE rejected_v2 (
        id             INTEGER PRIMARY KEY,
        source_file    TEXT NOT NULL,
        source_offset  INTEGER NOT NULL,
        line_key       INTEGER NOT NULL DEFAULT 0, -- hash of the reason and the line's first bytes
        transaction_id TEXT,
        reason         TEXT NOT NULL,
        head           TEXT NOT NULL,
        created_ms     INTEGER NOT NULL,
        dropped_reason TEXT,
        UNIQUE (source_file, source_offset, line_key)
    );
    INSERT INTO rejected_v2 (id, source_file, source_offset, transaction_id, reason, head,
                             created_ms, dropped_reason)
        SELECT id, source_file, source_offset, transaction_id, reason, head, created_ms,
               dropped_reason FROM rejected;
    DROP TABLE rejected;
    ALTER TABLE rejected_v2 RENAME TO rejected;
    "#,
    // v4: one sender per outbox, holding a lock file (`lock.rs`), claims by reading; nothing
    // writes the lease columns any more (they stay, unused: dropping them would rewrite the whole
    // table). Leases left by a v3 shipper are cleared so the rows are claimable. The version bump
    // itself matters too: a v3 tally, which would lease instead of taking the lock, refuses to
    // open this file, so an old and a new shipper can never send the same events side by side.
    r#"
    UPDATE events SET lease_until_ms = 0, lease_owner = NULL, lease_pid = NULL
        WHERE state = 0 AND (lease_until_ms <> 0 OR lease_owner IS NOT NULL);
    "#,
    // v5 (`tally audit`, docs/operations.md): what an audit compares with Lago's copy of an acked event.
    // The ack slims the row and drops the event JSON; it now keeps the event's `code` and
    // `timestamp` (as sent, e.g. "1795773600.250") first. Adding nullable columns does not
    // rewrite the table; rows acked before v5 have NULL there and are checked for presence and
    // subscription only. `audit_items` is the work list of the last `tally audit` (its result per
    // event, so an interrupted audit resumes); `subscriptions` is what Lago said about each
    // external_subscription_id (known 1/0), kept by the shipper and the audit.
    r#"
    ALTER TABLE events ADD COLUMN lago_code TEXT;
    ALTER TABLE events ADD COLUMN lago_timestamp TEXT;
    CREATE TABLE audit_items (
        seq             INTEGER PRIMARY KEY,
        transaction_id  TEXT NOT NULL,
        subscription_id TEXT,
        lago_code       TEXT,
        lago_timestamp  TEXT,
        result          TEXT,              -- NULL: not checked yet; ok / missing / different
        detail          TEXT
    );
    CREATE TABLE subscriptions (
        external_id TEXT PRIMARY KEY NOT NULL,
        known       INTEGER NOT NULL,
        checked_ms  INTEGER NOT NULL
    );
    "#,
    // v6: the ledger (`events`, written once, WITHOUT ROWID) and the delivery queue (`pending`)
    // apart; see the module doc. The v5 table is copied over: queued rows' events and send
    // errors move to `pending`, source paths to `sources`, customer and code to `targets`, Lago
    // timestamps ("1795773600.250") to integer milliseconds, and acked rows lose the columns
    // they no longer need.
    concat!(
        r#"
    CREATE TABLE sources (
        id   INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE
    );
    INSERT INTO sources (path)
        SELECT DISTINCT source_file FROM events WHERE source_file IS NOT NULL;

    -- Who an event bills and under which metric: each (external_subscription_id, code) pair
    -- once, in first-seen order (what the subscription checker reads). A ledger row names its
    -- pair by id, a byte or three instead of two strings.
    CREATE TABLE targets (
        id              INTEGER PRIMARY KEY,
        subscription_id TEXT NOT NULL,
        code            TEXT,               -- NULL for events acked before v5 kept it
        UNIQUE (subscription_id, code)
    );
    INSERT INTO targets (subscription_id, code)
        SELECT subscription_id,
               coalesce(lago_code, CASE WHEN state IN (0, 2) AND json_valid(CAST(event AS TEXT))
                   THEN json_extract(CAST(event AS TEXT), '$.code') END) AS code
        FROM events WHERE subscription_id IS NOT NULL
        GROUP BY 1, 2 ORDER BY min(rowid);

    CREATE TABLE pending (
        seq            INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: events.queue_seq
        transaction_id TEXT NOT NULL,
        event          BLOB NOT NULL,       -- the Lago event JSON, sent as it is
        customer_ids   TEXT,                -- the record's ids (JSON), to re-resolve if it dies
        attempts       INTEGER NOT NULL DEFAULT 0,
        reason         TEXT                 -- the last send error
    );
    INSERT INTO pending (transaction_id, event, customer_ids, attempts, reason)
        SELECT transaction_id, coalesce(event, X''), customer_ids, attempts, reason
        FROM events WHERE state = 0 ORDER BY created_ms, rowid;
    CREATE INDEX pending_v6_copy ON pending (transaction_id); -- for the copy below only

    CREATE TABLE events_v6 (
        transaction_id  TEXT PRIMARY KEY NOT NULL,
        state           INTEGER NOT NULL,
        content_hash    INTEGER NOT NULL,
        queue_seq       INTEGER,            -- its `pending` row while queued
        target_id       INTEGER,            -- targets.id: customer and code, as sent
        lago_time_ms    INTEGER,            -- the event's timestamp, as sent (tally audit)
        source_id       INTEGER,            -- sources.id
        source_offset   INTEGER,
        created_ms      INTEGER NOT NULL,
        updated_ms      INTEGER,            -- NULL: not changed since created_ms
        attempts        INTEGER NOT NULL DEFAULT 0,
        reason          TEXT,               -- why held / dead / dropped / lago-error
        record          BLOB,               -- canonical record JSON, only while held
        event           BLOB,               -- Lago event JSON, only while dead
        customer_ids    TEXT                -- the record's ids (JSON), only while held or dead
    ) WITHOUT ROWID;
    INSERT INTO events_v6 (transaction_id, state, content_hash, queue_seq, target_id,
                           lago_time_ms, source_id, source_offset, created_ms,
                           updated_ms, attempts, reason, record, event, customer_ids)
        SELECT e.transaction_id, e.state, e.content_hash, p.seq,
               (SELECT t.id FROM targets AS t WHERE t.subscription_id = e.subscription_id
                   AND t.code IS coalesce(e.lago_code,
                       CASE WHEN e.state IN (0, 2) AND json_valid(CAST(e.event AS TEXT))
                       THEN json_extract(CAST(e.event AS TEXT), '$.code') END)),
               CAST(round(CAST(coalesce(e.lago_timestamp,
                   CASE WHEN e.state = 0 AND json_valid(CAST(e.event AS TEXT))
                   THEN json_extract(CAST(e.event AS TEXT), '$.timestamp') END) AS REAL) * 1000)
                   AS INTEGER),
               (SELECT id FROM sources WHERE path = e.source_file), e.source_offset,
               e.created_ms, e.updated_ms,
               CASE WHEN e.state = 0 THEN 0 ELSE e.attempts END,
               CASE WHEN e.state = 0 THEN NULL ELSE e.reason END,
               CASE WHEN e.state = 1 THEN e.record END,
               CASE WHEN e.state = 2 THEN e.event END,
               CASE WHEN e.state IN (1, 2) THEN e.customer_ids END
        FROM events e LEFT JOIN pending p ON e.state = 0 AND p.transaction_id = e.transaction_id;
    DROP INDEX pending_v6_copy;
    DROP TABLE events;
    ALTER TABLE events_v6 RENAME TO events;
    CREATE INDEX events_held ON events (created_ms) WHERE state = 1;
    CREATE INDEX events_dead ON events (created_ms) WHERE state = 2;

    "#,
        event_states_view!()
    ),
    // v7: a queued event is kept as its fields, not its JSON (written when it is claimed, by
    // `ship::event`): about a fifth of the bytes, so a fifth of the pages written at ingest,
    // checkpointed and rewritten by the ack's delete. The customer ids become three columns.
    // Rows queued by an older tally keep their JSON in `event` and are sent as they are. The
    // queue's sequence carries over (an acked ledger row names its old place, which must never
    // be given out again), and the view is made again over the new table.
    concat!(
        r#"
    DROP VIEW event_states;
    CREATE TABLE pending_v7 (
        seq                   INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: events.queue_seq
        transaction_id        TEXT NOT NULL,
        target_id             INTEGER,     -- targets.id: external_subscription_id and code
        time_ms               INTEGER,     -- the event's timestamp
        amount_cents          TEXT,        -- precise_total_amount_cents, when sent
        model                 TEXT,
        response_cost         REAL,
        input_tokens          INTEGER,
        output_tokens         INTEGER,
        total_tokens          INTEGER,
        cache_read_tokens     INTEGER,
        cache_creation_tokens INTEGER,
        reasoning_tokens      INTEGER,
        end_user_id           TEXT,        -- the record's ids, to re-resolve if it dies
        user_id               TEXT,
        team_id               TEXT,
        attempts              INTEGER NOT NULL DEFAULT 0,
        reason                TEXT,        -- the last send error
        event                 BLOB         -- queued before v7: the event JSON, sent as it is
    );
    INSERT INTO pending_v7 (seq, transaction_id, end_user_id, user_id, team_id, attempts, reason,
                            event)
        SELECT seq, transaction_id,
               CASE WHEN json_valid(customer_ids) THEN customer_ids ->> '$.end_user_id' END,
               CASE WHEN json_valid(customer_ids) THEN customer_ids ->> '$.user_id' END,
               CASE WHEN json_valid(customer_ids) THEN customer_ids ->> '$.team_id' END,
               attempts, reason, event
        FROM pending ORDER BY seq;
    DELETE FROM sqlite_sequence WHERE name = 'pending_v7';
    INSERT INTO sqlite_sequence (name, seq)
        SELECT 'pending_v7', seq FROM sqlite_sequence WHERE name = 'pending';
    DROP TABLE pending;
    ALTER TABLE pending_v7 RENAME TO pending;
    "#,
        event_states_view!()
    ),
];

/// Brings the schema up to date; returns the version now in place.
pub fn migrate(conn: &mut Connection) -> Result<usize, OutboxError> {
    let known = MIGRATIONS.len();
    // IMMEDIATE: two processes opening a fresh file at once must not both migrate. All steps in
    // one transaction: a reader (`tally queue`) never sees a schema half way, which it would
    // report as "older than this tally's".
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > known {
        return Err(OutboxError::NewerSchema {
            found: version,
            known,
        });
    }
    if version < known {
        for step in &MIGRATIONS[version..] {
            tx.execute_batch(step)?;
        }
        tx.pragma_update(None, "user_version", known as i64)?;
        tx.commit()?;
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_newer() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), MIGRATIONS.len());
        assert_eq!(migrate(&mut conn).unwrap(), MIGRATIONS.len());
        conn.pragma_update(None, "user_version", 99).unwrap();
        let err = migrate(&mut conn).unwrap_err().to_string();
        assert!(err.contains("newer"), "{err}");
    }
}
