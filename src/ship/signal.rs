//! The work signal: how the reader (and replay, webhooks) tell the sender that new pending events
//! exist, so it sends at once instead of waiting for its idle re-check.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// How the reader tells the sender that new pending events exist.
#[derive(Debug, Default)]
pub struct WorkSignal {
    /// Woken on every [`WorkSignal::added`].
    pub(crate) notify: Notify,
    /// Pending events added since the sender last looked (it resets this to 0).
    pub(crate) added: AtomicUsize,
}

impl WorkSignal {
    /// `n` new pending events were committed.
    pub fn added(&self, n: usize) {
        if n > 0 {
            self.added.fetch_add(n, Ordering::Relaxed);
            self.notify.notify_one();
        }
    }
}
