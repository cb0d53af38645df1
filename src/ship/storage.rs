//! Waiting out storage trouble: when the outbox cannot be written because the state directory is
//! full, read-only or failing, the shipper stops advancing, says why, retries with a capped
//! backoff and carries on in the same process once the disk is fixed (docs/reliability.md).
//!
//! - [`trouble`] tells storage trouble (SQLite `FULL`, `READONLY*`, `IOERR*`, `CANTOPEN`, which
//!   is how SQLite reports the OS's `ENOSPC`, `EROFS`, `EDQUOT`, `EIO`; the same errors from the OS
//!   when creating the state directory) from everything else (corruption, a newer schema, a bug),
//!   which still stops the shipper with an error.
//! - [`with_outbox_waiting`] runs one outbox operation until it succeeds or `stop` fires. The
//!   operation is retried whole: an outbox transaction either commits or leaves nothing behind, so
//!   a retry cannot skip or double anything.
//! - After a failure, if the directory takes a write again but the operation still fails, the
//!   connection is reopened (a connection can keep failing after a read-only → read-write
//!   remount, e.g. with `SQLITE_READONLY_DBMOVED` or a stale `-shm` mapping).
//! - [`StorageGate`] is what the operator sees: one error line naming the outbox and the reason
//!   (repeated at most once a minute while it lasts), an info line when it clears, the systemd
//!   `STATUS=`, and the `tally_ship_storage_blocked` gauge.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::ErrorCode;
use tokio_util::sync::CancellationToken;

use crate::logging::Repeated;
use crate::metrics::ShipMetrics;
use crate::service;
use crate::ship::outbox::OutboxTaskError;
use crate::ship::outbox::{Outbox, OutboxError, SharedOutbox};

/// First wait after a failed write.
pub const MIN_WAIT: Duration = Duration::from_millis(100);
/// Longest wait between two tries.
pub const MAX_WAIT: Duration = Duration::from_secs(5);
/// Bytes written by the probe that tells whether the directory takes writes again: more than
/// nothing, because a full filesystem may still create an empty file.
const PROBE_BYTES: usize = 4096;

/// Why the outbox cannot be written, in SQLite's and the OS's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trouble {
    pub reason: String,
}

/// OS errors that mean the disk, not tally, is the problem.
pub fn is_storage_errno(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOSPC | libc::EROFS | libc::EDQUOT | libc::EIO | libc::EFBIG
    )
}

fn sqlite_code(e: &rusqlite::Error) -> Option<ErrorCode> {
    match e {
        rusqlite::Error::SqliteFailure(err, _) => Some(err.code),
        _ => None,
    }
}

fn is_storage_code(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::DiskFull
            | ErrorCode::ReadOnly
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
    )
}

/// Whether `e` is storage trouble (wait and retry) rather than a fault that must stop the shipper.
/// The SQLite result code decides (`os_errno` may be left over from an earlier call, so it only
/// adds the OS's words to the reason); `os_errno` is what SQLite saw from the OS (0 if nothing).
pub fn trouble(e: &OutboxTaskError, os_errno: i32) -> Option<Trouble> {
    let storage = match e {
        OutboxTaskError::Outbox(OutboxError::Db(db))
        | OutboxTaskError::Outbox(OutboxError::Open { source: db, .. }) => {
            sqlite_code(db).is_some_and(is_storage_code)
        }
        OutboxTaskError::Outbox(
            OutboxError::CreateDir { source, .. } | OutboxError::Lock { source, .. },
        ) => source.raw_os_error().is_some_and(is_storage_errno),
        OutboxTaskError::Outbox(
            OutboxError::NewerSchema { .. }
            | OutboxError::OlderSchema { .. }
            | OutboxError::UnsafeDir { .. },
        )
        | OutboxTaskError::Task(_) => false,
    };
    if !storage {
        return None;
    }
    let mut reason = e.to_string();
    if os_errno != 0 {
        reason.push_str(&format!(
            " ({})",
            std::io::Error::from_raw_os_error(os_errno)
        ));
    }
    Some(Trouble { reason })
}

/// Whether SQLite said the disk is full or failing (`FULL`, `IOERR*`): storage trouble whatever
/// the path; `READONLY` and `CANTOPEN` can also mean a wrong path or missing permission.
pub fn is_full_or_failing(e: &OutboxError) -> bool {
    match e {
        OutboxError::Db(db) | OutboxError::Open { source: db, .. } => sqlite_code(db)
            .is_some_and(|c| matches!(c, ErrorCode::DiskFull | ErrorCode::SystemIoFailure)),
        OutboxError::CreateDir { source, .. } | OutboxError::Lock { source, .. } => {
            source.raw_os_error().is_some_and(is_storage_errno)
        }
        OutboxError::NewerSchema { .. }
        | OutboxError::OlderSchema { .. }
        | OutboxError::UnsafeDir { .. } => false,
    }
}

/// Writes and removes a small file beside the outbox: `Ok` if the directory takes writes.
pub fn probe_writable(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let probe = dir.join(".tally-write-probe");
    let result = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(&[0u8; PROBE_BYTES])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    result
}

/// Blocked or not, since when, and when it was last said: one lock, so the gauge and the log
/// never disagree with the state when a failed write and a successful one race.
#[derive(Debug, Default)]
struct GateState {
    blocked: bool,
    since: Option<Instant>,
    logged: Repeated,
}

/// Storage state shared by the reader and the sender of one shipper, and what it shows.
#[derive(Debug)]
pub struct StorageGate {
    db_path: PathBuf,
    state: Mutex<GateState>,
    metrics: Option<ShipMetrics>,
    /// The systemd status to restore when the trouble clears.
    status: Mutex<Option<String>>,
    reopened: AtomicU64,
}

impl StorageGate {
    pub fn new(db_path: PathBuf, metrics: Option<ShipMetrics>) -> Self {
        if let Some(m) = &metrics {
            m.set_storage_blocked(false);
        }
        Self {
            db_path,
            state: Mutex::new(GateState::default()),
            metrics,
            status: Mutex::new(None),
            reopened: AtomicU64::new(0),
        }
    }

    /// The systemd status line of normal operation (restored when a trouble clears).
    pub fn set_normal_status(&self, status: String) {
        if let Ok(mut s) = self.status.lock() {
            *s = Some(status);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_blocked(&self) -> bool {
        self.lock().blocked
    }

    /// How many times the connection was reopened to recover.
    pub fn reopened(&self) -> u64 {
        self.reopened.load(Ordering::Relaxed)
    }

    /// A write failed for `trouble`: say so (at most once a minute) and mark the shipper blocked.
    pub fn block(&self, trouble: &Trouble, retry_in: Duration) {
        let mut state = self.lock();
        if !std::mem::replace(&mut state.blocked, true)
            && let Some(m) = &self.metrics
        {
            m.set_storage_blocked(true);
        }
        let now = Instant::now();
        let since = *state.since.get_or_insert(now);
        if state.logged.due() {
            let path = self.db_path.display();
            tracing::error!(
                outbox = %path,
                reason = %trouble.reason,
                blocked_for = ?now.duration_since(since),
                ?retry_in,
                "cannot write the outbox {path}: {}; the shipper has stopped advancing and retries \
                 until it can (nothing is lost). Free space in, or make writable, the state directory",
                trouble.reason
            );
            service::notify_status(&format!(
                "waiting: cannot write the outbox {path}: {}",
                trouble.reason
            ));
        }
    }

    /// A write succeeded: if the shipper was blocked, say it resumes.
    pub fn clear(&self) {
        let since = {
            let mut state = self.lock();
            if !std::mem::take(&mut state.blocked) {
                return;
            }
            if let Some(m) = &self.metrics {
                m.set_storage_blocked(false);
            }
            state.logged.reset();
            state.since.take()
        };
        tracing::info!(
            outbox = %self.db_path.display(),
            blocked_for = ?since.map(|t| t.elapsed()),
            "the outbox {} can be written again; the shipper resumes",
            self.db_path.display()
        );
        if let Ok(s) = self.status.lock()
            && let Some(s) = s.as_deref()
        {
            service::notify_status(s);
        }
    }
}

/// The OS error behind SQLite's last failure on this connection (0 if none).
fn system_errno(outbox: &Outbox) -> i32 {
    // SAFETY: the handle is valid while `outbox` is borrowed, and sqlite3_system_errno only reads
    // the connection's last error; the caller holds the outbox lock, so no other call interleaves.
    unsafe { rusqlite::ffi::sqlite3_system_errno(outbox.conn().handle()) }
}

/// The value and whether it ends the gate's storage trouble (see [`attempt`]); or the error and
/// the OS errno behind it.
type Attempt<T> = Result<(T, bool), (OutboxTaskError, i32)>;

/// One try of `f` under the outbox lock. On storage trouble, if the directory takes a write, the
/// connection (not the disk) is what fails: reopen it and try once more.
///
/// A success ends the gate's trouble only if it wrote something (a read-only disk still serves
/// reads and transactions that change nothing) and the directory takes a new file too: on a full
/// disk some commits still fit in space SQLite already holds (a reused WAL), and clearing on those
/// would flap the gauge and the log between blocked and resumed. Unblocked, nothing is probed.
fn attempt<T>(
    outbox: &SharedOutbox,
    gate: &StorageGate,
    f: &(impl Fn(&mut Outbox) -> Result<T, OutboxError> + ?Sized),
) -> Attempt<T> {
    let mut guard = outbox
        .lock()
        .map_err(|_| (OutboxTaskError::Task("outbox lock poisoned".into()), 0))?;
    let before = guard.conn().total_changes();
    let first = match f(&mut guard) {
        Ok(v) => {
            let wrote = guard.conn().total_changes() != before;
            let clears =
                wrote && gate.is_blocked() && probe_writable(state_dir(guard.path())).is_ok();
            return Ok((v, clears));
        }
        Err(e) => (OutboxTaskError::from(e), system_errno(&guard)),
    };
    if trouble(&first.0, first.1).is_none() {
        return Err(first);
    }
    let path = guard.path().to_owned();
    let dir = state_dir(&path);
    // Only a file that is there is reopened: a missing one (the state disk not mounted yet) must
    // not be replaced by a fresh, empty outbox.
    if !path.is_file() {
        return Err(first);
    }
    if let Err(e) = probe_writable(dir) {
        // SQLite does not always keep the OS's words (SQLITE_FULL has none): the probe's are the
        // same disk's.
        let errno = match first.1 {
            0 => e.raw_os_error().unwrap_or(0),
            n => n,
        };
        return Err((first.0, errno));
    }
    match Outbox::open(&path) {
        Ok(fresh) => {
            *guard = fresh;
            gate.reopened.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                outbox = %path.display(),
                "the disk takes writes again but the outbox connection did not; reopened it"
            );
        }
        Err(e) => {
            tracing::debug!(outbox = %path.display(), error = %e, "cannot reopen the outbox yet");
            return Err(first);
        }
    }
    match f(&mut guard) {
        Ok(v) => Ok((v, true)),
        Err(e) => {
            let errno = system_errno(&guard);
            Err((OutboxTaskError::from(e), errno))
        }
    }
}

/// The directory holding the outbox at `path`.
fn state_dir(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Runs `f` on the outbox (off the async threads) until it succeeds, waiting out storage trouble
/// with a capped backoff. Returns `Ok(None)` if `stop` fires while waiting (nothing was done), and
/// an error at once for anything that is not storage trouble.
pub async fn with_outbox_waiting<T, F>(
    outbox: &SharedOutbox,
    gate: &Arc<StorageGate>,
    stop: &CancellationToken,
    f: F,
) -> Result<Option<T>, OutboxTaskError>
where
    T: Send + 'static,
    F: Fn(&mut Outbox) -> Result<T, OutboxError> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let mut wait = MIN_WAIT;
    loop {
        let (ob, g, f2) = (outbox.clone(), gate.clone(), f.clone());
        let result = tokio::task::spawn_blocking(move || attempt(&ob, &g, &*f2))
            .await
            .map_err(|e| OutboxTaskError::Task(e.to_string()))?;
        let (error, errno) = match result {
            Ok((v, clears)) => {
                if clears {
                    gate.clear();
                }
                return Ok(Some(v));
            }
            Err(e) => e,
        };
        let Some(trouble) = trouble(&error, errno) else {
            return Err(error);
        };
        gate.block(&trouble, wait);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return Ok(None),
        }
        wait = (wait * 2).min(MAX_WAIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::ffi;

    fn db_error(code: i32) -> OutboxTaskError {
        OutboxTaskError::Outbox(OutboxError::Db(rusqlite::Error::SqliteFailure(
            ffi::Error::new(code),
            None,
        )))
    }

    #[test]
    fn full_read_only_and_io_errors_are_storage_trouble() {
        for code in [
            ffi::SQLITE_FULL,
            ffi::SQLITE_READONLY,
            ffi::SQLITE_READONLY_DBMOVED,
            ffi::SQLITE_IOERR_WRITE,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_CANTOPEN,
        ] {
            assert!(trouble(&db_error(code), 0).is_some(), "code {code}");
        }
        let t = trouble(&db_error(ffi::SQLITE_IOERR_WRITE), libc::EROFS).unwrap();
        assert!(t.reason.contains("Read-only file system"), "{}", t.reason);
    }

    #[test]
    fn corruption_schema_and_bugs_are_not() {
        for code in [
            ffi::SQLITE_CORRUPT,
            ffi::SQLITE_NOTADB,
            ffi::SQLITE_CONSTRAINT,
            ffi::SQLITE_MISUSE,
            ffi::SQLITE_BUSY,
        ] {
            assert!(trouble(&db_error(code), 0).is_none(), "code {code}");
        }
        let newer = OutboxTaskError::Outbox(OutboxError::NewerSchema { found: 9, known: 3 });
        assert!(trouble(&newer, 0).is_none());
        assert!(trouble(&OutboxTaskError::Task("poisoned".into()), 0).is_none());
    }

    #[tokio::test]
    async fn a_failed_write_is_retried_until_it_succeeds_and_the_gate_clears() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open_in(dir.path()).unwrap().shared();
        let gate = Arc::new(StorageGate::new(dir.path().join("shipper.db"), None));
        let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = tries.clone();
        let got = with_outbox_waiting(&outbox, &gate, &CancellationToken::new(), move |ob| {
            if t.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(OutboxError::Db(rusqlite::Error::SqliteFailure(
                    ffi::Error::new(ffi::SQLITE_FULL),
                    None,
                )))
            } else {
                // A write: only a write clears the gate.
                ob.set_last_lago_error(Some("x"))?;
                Ok(7)
            }
        })
        .await
        .unwrap();
        assert_eq!(got, Some(7));
        // Each failure with a writable directory reopens once and tries again at once.
        assert_eq!(tries.load(Ordering::SeqCst), 3);
        assert_eq!(gate.reopened(), 1);
        assert!(!gate.is_blocked());
    }

    #[tokio::test]
    async fn a_commit_that_fits_on_a_still_full_disk_does_not_clear_the_gate() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open_in(dir.path()).unwrap().shared();
        let gate = Arc::new(StorageGate::new(dir.path().join("shipper.db"), None));
        gate.block(
            &Trouble {
                reason: "database or disk is full".into(),
            },
            MIN_WAIT,
        );
        // The directory takes no new file (as on a full disk; a directory in the probe's place
        // makes creating it fail even for root), while the outbox's own commit succeeds, as one
        // fitting in a reused WAL does.
        let probe = dir.path().join(".tally-write-probe");
        std::fs::create_dir(&probe).unwrap();
        let write = |ob: &mut Outbox| ob.set_last_lago_error(Some("x"));
        let stop = CancellationToken::new();
        with_outbox_waiting(&outbox, &gate, &stop, write)
            .await
            .unwrap();
        assert!(
            gate.is_blocked(),
            "cleared while the disk takes no new file"
        );
        std::fs::remove_dir(&probe).unwrap();
        with_outbox_waiting(&outbox, &gate, &stop, write)
            .await
            .unwrap();
        assert!(
            !gate.is_blocked(),
            "still blocked once the disk takes files"
        );
    }

    #[tokio::test]
    async fn stop_ends_the_wait_and_other_errors_end_it_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open_in(dir.path()).unwrap().shared();
        let gate = Arc::new(StorageGate::new(dir.path().join("shipper.db"), None));
        let stop = CancellationToken::new();
        let s = stop.clone();
        let got: Option<()> = with_outbox_waiting(&outbox, &gate, &stop, move |_ob| {
            s.cancel();
            Err(OutboxError::Db(rusqlite::Error::SqliteFailure(
                ffi::Error::new(ffi::SQLITE_READONLY),
                None,
            )))
        })
        .await
        .unwrap();
        assert_eq!(got, None);
        assert!(gate.is_blocked());
        let err = with_outbox_waiting(&outbox, &gate, &stop, |_ob| -> Result<(), _> {
            Err(OutboxError::NewerSchema { found: 9, known: 3 })
        })
        .await;
        assert!(matches!(
            err,
            Err(OutboxTaskError::Outbox(OutboxError::NewerSchema { .. }))
        ));
    }
}
