//! The outbox: `shipper.db`, a SQLite file in the state directory holding every record read, its
//! Lago event and its delivery state, the rejected lines, and the tailer's file positions.
//!
//! Why it is shaped this way (full reasoning in `docs/delivery.md`):
//! - **Lines and positions commit together** ([`Outbox::ingest`]): after a crash the tailer
//!   resumes at the last committed position, so at most the uncommitted lines are read again, and
//!   the primary key on `transaction_id` turns that re-read into "already seen".
//! - **An event leaves `pending` only on Lago's word**: acked (200, or 422 `value_already_exist`)
//!   or dead (any other 422 reason / 400). Transient failures only bump `attempts`.
//! - **Several processes share the file** (`tally ship`, `tally replay`, `tally queue`): WAL lets
//!   readers run beside the writer, `busy_timeout` makes writers queue instead of failing, every
//!   write transaction is short and `IMMEDIATE` (no deadlock on lock upgrade).
//! - **One sender per outbox** ([`SenderLock`], a `flock` the kernel drops when the process
//!   dies): the holder claims pending events by *reading* them ([`Outbox::claim`]) and keeps what
//!   it has in flight in memory, so the ack is the only write per event. A second shipper on the
//!   same state directory waits for the lock instead of sending the same events. After a crash
//!   (kill -9) the events that were in flight are still pending and the next holder sends them
//!   again: one resend of identical bytes, which Lago answers with `value_already_exist`
//!   (Postgres store) or dedupes on id + timestamp (ClickHouse store).
//! - **Durability**: WAL with `synchronous=NORMAL`. A commit survives a process crash (it is in
//!   the WAL, in the OS page cache); only a power loss or kernel crash can lose the last few
//!   commits, and because lines and positions roll back *together*, the shipper then re-reads
//!   those lines and at worst resends events Lago already has — absorbed as duplicates. Paying an
//!   fsync per commit would buy nothing the idempotency key does not already give.

mod ingest;
mod lago_checks;
mod ledger;
mod lock;
mod pending;
mod queue;
mod readonly;
mod schema;
mod task;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// Looked up per event: foldhash (seeded per process, as std's SipHash is) is several times
// cheaper on short strings (SipHash was 3 % of a replay's CPU).
use hashbrown::{HashMap, HashSet};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

pub use ingest::{Committed, ConflictAt, IngestWindow, NewLineIds};
pub use lago_checks::{AckedOrigin, AuditItem, AuditProgress, AuditScope, LagoErrorMarks, Rebuilt};
pub use lock::{SenderLock, sender_running};
pub use queue::{
    Depth, ItemDetail, ItemSummary, LagoErrorNote, ListFilter, REJECTED_PREFIX, RejectedDetail,
    RetryReport, Stats,
};
pub use schema::MIGRATIONS;
pub use task::{OutboxTaskError, with_outbox};

use crate::ship::resolve::PreparedRecord;
use crate::ship::tail::{FileId, FilePosition};
use pending::{EVENT_COLUMN_COUNT, EVENT_COLUMNS, ID_COLUMNS};

/// The queue place of the queued row with id `?1` (none once it left the queue).
macro_rules! queue_place_of_id {
    () => {
        "(SELECT queue_seq FROM events WHERE transaction_id = ?1 AND state = 0)"
    };
}

/// A queued row's effective state code, for queries over `events AS e`: a queued row (0) is
/// acked once the sender has deleted its `pending` row (see `schema.rs`).
pub(crate) const EFFECTIVE_STATE: &str = "CASE WHEN e.state = 0 AND NOT EXISTS
     (SELECT 1 FROM pending WHERE pending.seq = e.queue_seq) THEN 3 ELSE e.state END";

/// `?1` bound to a transaction_id, for a lookup by id in a query that LEFT JOINs the ledger to
/// other tables. Written plainly (`= ?1`), SQLite prepares such a statement again every time a
/// new id is bound (about 6 µs a lookup, 4 times the query: `tally replay --ship` spent most of
/// its time there); as an explicit text value it is prepared once, and still uses the key.
pub(crate) const BOUND_ID: &str = "CAST(?1 AS TEXT)";

/// File name of the outbox in `TALLY_STATE_DIR`.
pub const DB_FILE: &str = "shipper.db";

/// At most this many bytes of a rejected line are kept, to show the operator what it was.
pub const REJECTED_HEAD_BYTES: usize = 200;

/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Delivery state of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting to be sent (or being sent by the outbox's one sender).
    Pending,
    /// No customer id for the charge-by setting; waits for `tally queue retry`.
    Held,
    /// Lago refused it for a reason other than a duplicate; waits for an operator.
    Dead,
    /// Lago has it.
    Acked,
    /// A `status` other than success: never billed, remembered so a re-read is recognised.
    NotBillable,
    /// Removed by an operator (`tally queue drop`), never billed; the reason is kept.
    Dropped,
    /// Lago took it (acked) but reported it in an `events.errors` webhook: stored, not billed.
    /// The reason is Lago's category (`invalid_code`, ...). Fixed in Lago, not by resending.
    LagoError,
}

impl State {
    pub fn code(self) -> i64 {
        match self {
            State::Pending => 0,
            State::Held => 1,
            State::Dead => 2,
            State::Acked => 3,
            State::NotBillable => 4,
            State::Dropped => 5,
            State::LagoError => 6,
        }
    }

    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => State::Pending,
            1 => State::Held,
            2 => State::Dead,
            3 => State::Acked,
            4 => State::NotBillable,
            5 => State::Dropped,
            6 => State::LagoError,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Held => "held",
            State::Dead => "dead",
            State::Acked => "acked",
            State::NotBillable => "not_billable",
            State::Dropped => "dropped",
            State::LagoError => "lago_error",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot create the state directory {path}: {source}; check TALLY_STATE_DIR")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the outbox {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "shipper.db has schema version {found}, newer than this tally knows ({known}); run the newer tally, or move the file away to start afresh"
    )]
    NewerSchema { found: usize, known: usize },
    /// Read-only commands do not migrate: the shipper does, once, when it starts.
    #[error(
        "{path} has schema version {found}, older than this tally's ({known}); start `tally ship` \
         once (with this tally) to migrate it, then run this again"
    )]
    OlderSchema {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error(
        "cannot lock {path} (the one-sender-per-outbox lock): {source}; check TALLY_STATE_DIR is writable"
    )]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Refused rather than used: anyone could replace `shipper.db` (what was billed, what is
    /// pending) or plant a symlink where tally writes.
    #[error(
        "the state directory {path} is writable by every user (mode {mode:o}): another user could \
         replace shipper.db and with it what is billed; run `chmod o-w {path}` (tally creates it \
         0750) or set TALLY_STATE_DIR to a directory only tally's user can write"
    )]
    UnsafeDir { path: PathBuf, mode: u32 },
    #[error("outbox database error: {0}")]
    Db(#[from] rusqlite::Error),
}

/// Where a line came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Shared by the lines of one file: a chunk of lines names it once.
    pub file: Arc<str>,
    pub offset: u64,
}

/// One line to record, from the tailer or from any other reader (`tally replay`).
// Nearly every item is a record: boxing it would cost an allocation per line to save space only
// on the rare rejected line.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum IngestItem {
    Record {
        prepared: PreparedRecord,
        source: Source,
    },
    /// A line that could not be read as a record.
    Rejected {
        source: Source,
        reason: String,
        /// The line's first bytes (cut to [`REJECTED_HEAD_BYTES`] when stored).
        head: Vec<u8>,
    },
}

/// What one [`Outbox::ingest`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IngestReport {
    pub pending: u64,
    pub held: u64,
    pub not_billable: u64,
    /// Same transaction_id, same content: a harmless re-read.
    pub already_seen: u64,
    /// Same transaction_id, different content: kept as a rejected line.
    pub conflicts: u64,
    /// Malformed lines kept as rejected (a line already rejected at the same place is not counted).
    pub rejected: u64,
}

impl IngestReport {
    pub fn add(&mut self, other: &IngestReport) {
        self.pending += other.pending;
        self.held += other.held;
        self.not_billable += other.not_billable;
        self.already_seen += other.already_seen;
        self.conflicts += other.conflicts;
        self.rejected += other.rejected;
    }
}

/// What [`Outbox::ingest_noting`] did with one item, in the items' order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new transaction_id, recorded in its state.
    New,
    /// Recorded before with the same content.
    AlreadySeen,
    /// Recorded before with other content: kept as a rejected line.
    Conflict,
    /// A malformed line, kept as rejected (or already kept at the same place).
    Rejected,
}

/// A pending event a sender has claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedEvent {
    /// Its place in the queue (`pending.seq`), which the ack deletes; see [`Outbox::ack`].
    pub seq: i64,
    pub transaction_id: String,
    pub event: Vec<u8>,
}

/// Where the last claim stopped, in queue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClaimCursor {
    pub seq: i64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An open `shipper.db`. Synchronous: call it from `spawn_blocking` (see [`SharedOutbox`]).
pub struct Outbox {
    conn: Connection,
    path: PathBuf,
    /// `sources` rows already committed, by path: each ingested line names its file by id.
    sources: HashMap<String, i64>,
    /// `targets` rows already committed, by code then subscription id.
    targets: HashMap<String, HashMap<String, i64>>,
}

/// The outbox shared by the tasks of one process. One connection, one writer at a time.
pub type SharedOutbox = Arc<Mutex<Outbox>>;

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("path", &self.path).finish()
    }
}

/// Switches `conn` to WAL. On a fresh file another process opening it at the same moment (the
/// shipper and `tally queue`, two shippers) holds a lock that this switch does not wait for:
/// SQLite answers BUSY at once, without calling the busy handler. So it is retried here, for as
/// long as the busy timeout; a shipper that failed its start on such a race exited.
fn set_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// A pre-existing state directory that every user may write to (`chmod 777`, or `/tmp` itself)
/// is refused (docs/operations.md, "Files and permissions"). Sticky or not: the sticky bit
/// stops others deleting tally's files, not planting theirs before tally creates them.
fn check_state_dir(state_dir: &Path) -> Result<(), OutboxError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state_dir)
        .map_err(|source| OutboxError::CreateDir {
            path: state_dir.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o002 != 0 {
        return Err(OutboxError::UnsafeDir {
            path: state_dir.to_owned(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// `shipper.db` and its `-wal` / `-shm` are owner-only: a file left readable by an older tally
/// or a restore is tightened when opened for writing. A file tally does not own (or cannot
/// change) is left as it is; SQLite then says whether it can be used.
fn tighten(db: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let path = PathBuf::from(name);
        if let Ok(meta) = std::fs::symlink_metadata(&path)
            && meta.is_file()
            && meta.permissions().mode() & 0o077 != 0
        {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
    }
}

impl Outbox {
    /// Opens (creating if needed) `shipper.db` in `state_dir`. A state directory writable by
    /// every user is refused ([`OutboxError::UnsafeDir`]).
    pub fn open_in(state_dir: &Path) -> Result<Self, OutboxError> {
        use std::os::unix::fs::DirBuilderExt;
        // The outbox holds usage per customer: nothing for other users (the group may read,
        // for operators running `tally queue`).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(state_dir)
            .map_err(|source| OutboxError::CreateDir {
                path: state_dir.to_owned(),
                source,
            })?;
        check_state_dir(state_dir)?;
        Self::open(&state_dir.join(DB_FILE))
    }

    /// Opens (creating if needed) the outbox at `path` and migrates its schema.
    pub fn open(path: &Path) -> Result<Self, OutboxError> {
        let open_err = |source| OutboxError::Open {
            path: path.to_owned(),
            source,
        };
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            // Created owner-only before SQLite does: its -wal and -shm files take the database
            // file's mode. A failure here is left for SQLite to report.
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path);
        }
        tighten(path);
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // WAL: readers (tally queue) never block the writer; NORMAL: see the module doc.
        set_wal(&conn).map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        // Bounded page cache (8 MiB) keeps RSS flat whatever the outbox size.
        conn.pragma_update(None, "cache_size", -8192)
            .map_err(open_err)?;
        // Checkpoint every ~128 MiB of WAL instead of 4 MiB: a page written by many commits
        // between two checkpoints is copied into the database once. The ledger's pages are hit
        // at random by uuid4 ids, so that is most of them (a uuid4 replay: about 0.8x the time
        // of 32 MiB). The file is kept at that size once grown (cutting it back after each
        // checkpoint gave back a third of the gain: the file system extends it again), and cut
        // back to it when a long read held a checkpoint back and it grew beyond.
        conn.pragma_update(None, "wal_autocheckpoint", 32768)
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_size_limit", 128 << 20)
            .map_err(open_err)?;
        conn.set_prepared_statement_cache_capacity(64);
        schema::migrate(&mut conn)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
            sources: HashMap::new(),
            targets: HashMap::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes this outbox's one-sender lock, or `Ok(None)` while another sender holds it.
    pub fn try_lock_sender(&self) -> Result<Option<SenderLock>, OutboxError> {
        SenderLock::try_acquire(&self.path)
    }

    /// Wraps the outbox for sharing between the tasks of one process.
    pub fn shared(self) -> SharedOutbox {
        Arc::new(Mutex::new(self))
    }

    /// The file positions committed so far (what the tailer resumes from).
    pub fn positions(&self) -> Result<Vec<FilePosition>, OutboxError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT dev, ino, fingerprint, path, offset, finished FROM positions ORDER BY updated_ms",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(FilePosition {
                id: FileId {
                    dev: r.get::<_, i64>(0)? as u64,
                    ino: r.get::<_, i64>(1)? as u64,
                    fingerprint: r.get::<_, i64>(2)? as u64,
                },
                path: PathBuf::from(r.get::<_, String>(3)?),
                offset: r.get::<_, i64>(4)? as u64,
                finished: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Up to `max` pending events after `after` (from the oldest when `None`), in queue order,
    /// leaving out those in `in_flight` (by transaction_id). A read: only the holder of the
    /// [`SenderLock`] sends, so nothing needs to be written to keep another sender off them.
    ///
    /// Rows that become pending behind the cursor (an operator's `tally queue retry`, an audit's
    /// requeue) are found when the caller starts again from `None`, which the sender does
    /// whenever a claim comes back short.
    pub fn claim(
        &self,
        max: usize,
        after: Option<ClaimCursor>,
        in_flight: &HashSet<String>,
        _lock: &SenderLock,
    ) -> Result<(Vec<ClaimedEvent>, Option<ClaimCursor>), OutboxError> {
        let after = after.map_or(i64::MIN, |c| c.seq);
        // The queue in order, from the cursor, read only as far as needed (no LIMIT: with the
        // join, a bound LIMIT made SQLite prepare the statement again on every claim). The rows
        // in flight are skipped here rather than in SQL (at most batches in flight × batch size
        // of them, and only after a restart from the oldest).
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT p.seq, p.transaction_id, {EVENT_COLUMNS}
             FROM pending AS p LEFT JOIN targets AS qt ON qt.id = p.target_id
             WHERE p.seq > ?1 ORDER BY p.seq"
        ))?;
        let mut rows = stmt.query([after])?;
        let mut claimed = Vec::with_capacity(max.min(1024));
        let mut last = None;
        while claimed.len() < max
            && let Some(r) = rows.next()?
        {
            let seq: i64 = r.get(0)?;
            last = Some(ClaimCursor { seq });
            let transaction_id: String = r.get(1)?;
            if in_flight.contains(&transaction_id) {
                continue;
            }
            claimed.push(ClaimedEvent {
                seq,
                event: pending::event_json(r, 2, &transaction_id)?,
                transaction_id,
            });
        }
        Ok((claimed, last))
    }

    /// Lago has these `(seq, transaction_id)`: their queue rows are deleted, in one transaction,
    /// which is what makes them acked (the ledger row is not touched). A row already gone from
    /// the queue (dropped, dead or requeued meanwhile) is settled by id: Lago's word wins over
    /// any state.
    ///
    /// `in_flight` is what the sender has in flight once these are done, noted in `meta` in the
    /// same commit for `tally queue stats` (one row per commit, not per event).
    pub fn ack(
        &mut self,
        events: &[(i64, &str)],
        in_flight: Option<u64>,
    ) -> Result<(), OutboxError> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let found = acked_places(&tx, events)?;
            // Each run of queue places holding only acked rows goes in one delete: a statement
            // per row cost 2 µs of the shipper's CPU per event (docs/benchmarks.md).
            let mut delete =
                tx.prepare_cached("DELETE FROM pending WHERE seq BETWEEN ?1 AND ?2")?;
            for (first, last) in found.runs {
                delete.execute(params![first, last])?;
            }
            // Only an event that needed retries has its ledger row written, to keep the count.
            let mut keep_attempts = tx.prepare_cached(
                "UPDATE events SET attempts = ?2, updated_ms = ?3 WHERE transaction_id = ?1",
            )?;
            for (id, n) in found.retried {
                keep_attempts.execute(params![id, n, now])?;
            }
            for id in found.gone {
                acked_by_id(&tx, id, now)?;
            }
            if let Some(n) = in_flight {
                tx.prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ('sender_in_flight', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )?
                .execute([n.to_string()])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Lago has these: they become acked, whatever state a row was in (it may have been dropped
    /// or retried meanwhile): Lago's word wins.
    pub fn mark_acked(&mut self, ids: &[&str]) -> Result<(), OutboxError> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for id in ids {
            acked_by_id(&tx, id, now)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Lago refused these for good: dead, with Lago's words, until an operator acts. The event
    /// leaves the queue for the ledger row, where `tally queue` shows it and `retry` finds it.
    pub fn mark_dead(&mut self, dead: &[(&str, &str)]) -> Result<(), OutboxError> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut take = tx.prepare_cached(&format!(
                "SELECT p.seq, {EVENT_COLUMNS}, {ID_COLUMNS}, p.attempts
                 FROM pending AS p LEFT JOIN targets AS qt ON qt.id = p.target_id
                 WHERE p.seq = {}",
                queue_place_of_id!()
            ))?;
            let mut delete = tx.prepare_cached("DELETE FROM pending WHERE seq = ?1")?;
            let mut bury = tx.prepare_cached(
                "UPDATE events SET state = 2, reason = ?2, updated_ms = ?3, event = ?4,
                     customer_ids = ?5, attempts = ?6 + 1, queue_seq = NULL
                 WHERE transaction_id = ?1",
            )?;
            for (id, reason) in dead {
                let row = take
                    .query_row([id], |r| {
                        let ids = pending::customer_ids(r, 1 + EVENT_COLUMN_COUNT)?;
                        Ok((
                            r.get::<_, i64>(0)?,
                            pending::event_json(r, 1, id)?,
                            ids,
                            r.get::<_, i64>(4 + EVENT_COLUMN_COUNT)?,
                        ))
                    })
                    .optional()?;
                if let Some((seq, event, ids, attempts)) = row {
                    delete.execute([seq])?;
                    bury.execute(params![id, reason, now, event, ids.to_json(), attempts])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A send attempt failed for a transient reason: count it and keep the error; still pending.
    pub fn record_failure(&mut self, ids: &[&str], error: &str) -> Result<(), OutboxError> {
        self.for_each_id(
            ids,
            concat!(
                "UPDATE pending SET attempts = attempts + 1, reason = ?2 WHERE seq = ",
                queue_place_of_id!()
            ),
            |stmt, id| stmt.execute(params![id, error]),
        )
    }

    /// Remembers (or, with `None`, clears) the last error Lago gave, for `tally queue stats`.
    pub fn set_last_lago_error(&mut self, error: Option<&str>) -> Result<(), OutboxError> {
        match error {
            Some(e) => {
                let mut stmt = self.conn.prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ('last_lago_error', ?1), ('last_lago_error_ms', ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )?;
                stmt.execute(params![e, now_ms().to_string()])?;
            }
            None => {
                self.conn.execute(
                    "DELETE FROM meta WHERE key IN ('last_lago_error', 'last_lago_error_ms')",
                    [],
                )?;
            }
        }
        Ok(())
    }

    /// Forgets acked ids acked more than `older_than` ago (`TALLY_ACKED_RETENTION_DAYS`; an id
    /// acked from the queue counts from when it was recorded, seconds before). A log older than
    /// the retention replayed later could then bill again: the default keeps them forever.
    pub fn prune_acked(&mut self, older_than: Duration) -> Result<usize, OutboxError> {
        let cutoff = now_ms() - older_than.as_millis() as i64;
        Ok(self.conn.execute(
            &format!(
                "DELETE FROM events WHERE transaction_id IN (
                     SELECT e.transaction_id FROM events AS e
                     WHERE e.state IN (0, 3) AND {EFFECTIVE_STATE} = 3
                       AND coalesce(e.updated_ms, e.created_ms) < ?1)"
            ),
            [cutoff],
        )?)
    }

    /// Number of pending events (in flight or not).
    pub fn pending_count(&self) -> Result<u64, OutboxError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM pending", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// State of one transaction_id, if recorded.
    pub fn state_of(&self, transaction_id: &str) -> Result<Option<State>, OutboxError> {
        let code: Option<i64> = self
            .conn
            .prepare_cached(&format!(
                "SELECT {EFFECTIVE_STATE} FROM events AS e WHERE e.transaction_id = ?1"
            ))?
            .query_row([transaction_id], |r| r.get(0))
            .optional()?;
        Ok(code.and_then(State::from_code))
    }

    /// Runs one statement per id in one IMMEDIATE transaction.
    fn for_each_id(
        &mut self,
        ids: &[&str],
        sql: &str,
        mut run: impl FnMut(&mut rusqlite::CachedStatement<'_>, &str) -> rusqlite::Result<usize>,
    ) -> Result<(), OutboxError> {
        if ids.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(sql)?;
            for id in ids {
                run(&mut stmt, id)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// The `sources` id of `path`, inserting it (within the caller's transaction) when new.
pub(super) fn source_id(
    tx: &Connection,
    path: &str,
    new: &mut Vec<(String, i64)>,
) -> rusqlite::Result<i64> {
    if let Some((_, id)) = new.iter().find(|(p, _)| p == path) {
        return Ok(*id);
    }
    tx.prepare_cached("INSERT INTO sources (path) VALUES (?1) ON CONFLICT (path) DO NOTHING")?
        .execute([path])?;
    let id = tx
        .prepare_cached("SELECT id FROM sources WHERE path = ?1")?
        .query_row([path], |r| r.get(0))?;
    new.push((path.to_owned(), id));
    Ok(id)
}

/// A `targets` row made in an ingest not yet committed: (subscription id, code, id).
pub(super) type NewTarget = (String, String, i64);

/// The `targets` id of (`subscription`, `code`), inserting it (within the caller's
/// transaction) when new.
pub(crate) fn target_id(
    tx: &Connection,
    subscription: &str,
    code: &str,
    new: &mut Vec<NewTarget>,
) -> rusqlite::Result<i64> {
    if let Some((.., id)) = new.iter().find(|(s, c, _)| s == subscription && c == code) {
        return Ok(*id);
    }
    tx.prepare_cached(
        "INSERT INTO targets (subscription_id, code) VALUES (?1, ?2)
         ON CONFLICT (subscription_id, code) DO NOTHING",
    )?
    .execute([subscription, code])?;
    let id = tx
        .prepare_cached("SELECT id FROM targets WHERE subscription_id = ?1 AND code = ?2")?
        .query_row([subscription, code], |r| r.get(0))?;
    new.push((subscription.to_owned(), code.to_owned(), id));
    Ok(id)
}

/// Takes the queued row with id `id` out of the queue; its send attempts when it was there.
pub(crate) fn dequeue(tx: &Connection, id: &str) -> rusqlite::Result<Option<i64>> {
    tx.prepare_cached(concat!(
        "DELETE FROM pending WHERE seq = ",
        queue_place_of_id!(),
        " RETURNING attempts"
    ))?
    .query_row([id], |r| r.get(0))
    .optional()
}

/// Where the acked `(seq, transaction_id)`s are in the queue.
struct AckedPlaces<'a> {
    /// Runs of queue places, first to last, that hold acked rows and nothing else.
    runs: Vec<(i64, i64)>,
    /// Acked rows found in the queue that had been tried before, with their attempts.
    retried: Vec<(&'a str, i64)>,
    /// Acked events no longer at their place (dropped, dead or requeued meanwhile).
    gone: Vec<&'a str>,
}

/// One ordered scan of the queue between the lowest and the highest acked place. A row there that
/// was not acked (still in flight in another batch) ends a run, so the deletes never reach it.
fn acked_places<'a>(
    tx: &Connection,
    events: &[(i64, &'a str)],
) -> rusqlite::Result<AckedPlaces<'a>> {
    let mut ours = events.to_vec();
    ours.sort_unstable_by_key(|(seq, _)| *seq);
    ours.dedup();
    let mut found = AckedPlaces {
        runs: Vec::new(),
        retried: Vec::new(),
        gone: Vec::new(),
    };
    let (Some(&(low, _)), Some(&(high, _))) = (ours.first(), ours.last()) else {
        return Ok(found);
    };
    let mut scan = tx.prepare_cached(
        "SELECT seq, transaction_id, attempts FROM pending WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq",
    )?;
    let mut rows = scan.query(params![low, high])?;
    let mut next = ours.iter().peekable();
    let mut run: Option<(i64, i64)> = None;
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        while let Some((_, id)) = next.next_if(|(s, _)| *s < seq) {
            found.gone.push(id);
        }
        let acked = match next.peek() {
            Some((s, id)) if *s == seq => {
                let same = matches!(row.get_ref(1)?, ValueRef::Text(t) if t == id.as_bytes());
                if !same {
                    // The place holds another id: this one is gone, the row stays.
                    found.gone.push(id);
                }
                next.next();
                same.then_some(*id)
            }
            _ => None,
        };
        match acked {
            Some(id) => {
                let attempts: i64 = row.get(2)?;
                if attempts > 0 {
                    found.retried.push((id, attempts));
                }
                run = Some(run.map_or((seq, seq), |(first, _)| (first, seq)));
            }
            None => found.runs.extend(run.take()),
        }
    }
    found.runs.extend(run);
    found.gone.extend(next.map(|(_, id)| *id));
    Ok(found)
}

/// Lago has `id`: out of the queue if it is queued, acked (slimmed) if it was held, dead or
/// dropped. An acked or lago-error row stays as it is.
fn acked_by_id(tx: &Connection, id: &str, now: i64) -> rusqlite::Result<()> {
    let attempts = dequeue(tx, id)?;
    if let Some(n) = attempts.filter(|n| *n > 0) {
        tx.prepare_cached(
            "UPDATE events SET attempts = ?2, updated_ms = ?3 WHERE transaction_id = ?1",
        )?
        .execute(params![id, n, now])?;
    }
    tx.prepare_cached(
        "UPDATE events SET state = 3, record = NULL, event = NULL, customer_ids = NULL,
             reason = NULL, queue_seq = NULL, updated_ms = ?2
         WHERE transaction_id = ?1 AND state NOT IN (0, 3, 6)",
    )?
    .execute(params![id, now])?;
    Ok(())
}

/// The first bytes of a line, as text for an operator (lossy UTF-8).
pub fn head_text(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(REJECTED_HEAD_BYTES)];
    String::from_utf8_lossy(cut).into_owned()
}

/// What tells two rejected lines at the same file path and offset apart: after a rotation the
/// new live file reuses the path, so (path, offset) alone would merge a new malformed line into
/// an old one. The same line read again after a crash has the same key and is not counted twice.
pub(super) fn rejected_line_key(reason: &str, head: &[u8]) -> i64 {
    let mut bytes = Vec::with_capacity(reason.len() + 1 + head.len());
    bytes.extend_from_slice(reason.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(head);
    crate::ship::resolve::content_hash(&bytes)
}

/// Why a line is rejected as a conflicting duplicate: its `transaction_id` was recorded with
/// other content (in state `old_state`, when known). `tally replay --dry-run` says it in the same
/// words as the outbox.
pub fn conflict_reason(transaction_id: &str, old_state: Option<&str>) -> String {
    let now = old_state.map(|s| format!(" (now {s})")).unwrap_or_default();
    format!(
        "conflicting duplicate: transaction_id {transaction_id} was already recorded with different content{now}; this line is not billed"
    )
}

#[cfg(test)]
mod tests;
