//! One sender per outbox: an exclusive `flock` on `shipper.db-sender.lock`, beside the outbox.
//!
//! The sender that holds it is the only one that sends this outbox's pending events, so it can
//! claim them by reading (no lease written per event) and keep what it has in flight in memory.
//! The kernel drops the lock when the holder's file is closed, including when the process is
//! killed (SIGKILL), so nothing is ever left locked by a dead process; whatever it had in flight
//! is still `pending` in the outbox and the next holder sends it again (Lago answers the resend
//! as a duplicate). A second `tally ship` on the same state directory waits for the lock instead
//! of sending the same events at the same time.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::OutboxError;

/// Suffix of the lock file, appended to the outbox's file name.
pub const LOCK_SUFFIX: &str = "-sender.lock";

/// Proof that this process is the outbox's one sender, for as long as it lives.
#[derive(Debug)]
pub struct SenderLock {
    // Closing the file releases the lock.
    _file: File,
}

impl SenderLock {
    /// Takes the sender lock of the outbox at `db_path`, or `Ok(None)` if another sender (in
    /// this process or another) holds it.
    pub fn try_acquire(db_path: &Path) -> Result<Option<Self>, OutboxError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = lock_path(db_path);
        // flock needs no write access: an existing lock file is opened read-only, so a sender
        // can start (and wait out the trouble) on a read-only state directory.
        let file = std::fs::File::open(&path)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o600)
                    .open(&path),
                _ => Err(e),
            })
            .map_err(|source| OutboxError::Lock {
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock on a descriptor this function owns; it only changes the lock state.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(Self { _file: file }));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        Err(OutboxError::Lock { path, source: err })
    }
}

/// Whether some sender holds the lock of the outbox at `db_path` right now (for `tally queue
/// stats`). Probes with a shared lock, released at once.
pub fn sender_running(db_path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(lock_path(db_path)) else {
        return false;
    };
    // SAFETY: as above, on a descriptor owned here.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

fn lock_path(db_path: &Path) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(LOCK_SUFFIX);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("shipper.db");
        assert!(!sender_running(&db));
        let first = SenderLock::try_acquire(&db)
            .unwrap()
            .expect("free at first");
        assert!(sender_running(&db));
        // A second open file description conflicts, even in the same process.
        assert!(SenderLock::try_acquire(&db).unwrap().is_none());
        drop(first);
        assert!(!sender_running(&db));
        assert!(SenderLock::try_acquire(&db).unwrap().is_some());
    }
}
