//! The outbox from async code: each operation on a blocking thread, behind the shared lock.

use crate::ship::outbox::{Outbox, OutboxError, SharedOutbox};

/// An outbox operation run off the async threads failed: the outbox said no, or the blocking
/// task itself failed (panicked, or the outbox lock was poisoned by an earlier panic).
#[derive(Debug, thiserror::Error)]
pub enum OutboxTaskError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("outbox task failed: {0}")]
    Task(String),
}

/// Runs a blocking outbox operation off the async threads.
pub async fn with_outbox<T: Send + 'static>(
    outbox: &SharedOutbox,
    f: impl FnOnce(&mut Outbox) -> Result<T, OutboxError> + Send + 'static,
) -> Result<T, OutboxTaskError> {
    let outbox = outbox.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = outbox
            .lock()
            .map_err(|_| OutboxTaskError::Task("outbox lock poisoned".into()))?;
        f(&mut guard).map_err(OutboxTaskError::from)
    })
    .await
    .map_err(|e| OutboxTaskError::Task(e.to_string()))?
}
