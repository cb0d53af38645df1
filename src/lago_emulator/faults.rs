//! Faults a test can queue: server errors, rate limiting, slow answers, dropped connections,
//! and refusing connections for a while. Queued faults are served in order, one per Lago API
//! request, each for its `count` requests; then the emulator answers normally again. A body
//! limit (a proxy's `client_max_body_size` in front of Lago) is a setting instead: it holds for
//! every request until it is lifted.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A fault to inject. JSON form (for `POST /_emulator/faults`): internally tagged by `kind`,
/// durations in milliseconds, e.g. `{"kind":"server_error","status":503,"count":2}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer the next `count` requests with `status` (5xx expected) and a JSON error body.
    ServerError { status: u16, count: usize },
    /// Answer the next `count` requests 429 with `X-RateLimit-Limit`, `X-RateLimit-Remaining: 0`,
    /// `X-RateLimit-Reset: reset_secs` and, if `retry_after`, `Retry-After: reset_secs`.
    RateLimit {
        count: usize,
        reset_secs: u64,
        #[serde(default)]
        retry_after: bool,
    },
    /// Wait `duration` before handling each of the next `count` requests (then answer normally).
    Delay {
        #[serde(rename = "duration_ms", with = "millis")]
        duration: Duration,
        count: usize,
    },
    /// Close the TCP connection of the next `count` requests without any HTTP answer; nothing
    /// is stored.
    ResetConnection { count: usize },
    /// Handle (and store) the next `count` requests, then close the connection instead of
    /// answering: Lago acknowledged, but the client never heard it.
    DropResponse { count: usize },
    /// Stop listening now (connections refused, open ones closed) and listen again on the same
    /// port after `duration`. Not queued: it takes effect at once.
    RefuseConnections {
        #[serde(rename = "duration_ms", with = "millis")]
        duration: Duration,
    },
    /// From now on, answer 413 (as nginx does, with its HTML body) to every Lago API request whose
    /// body is longer than `max_bytes`, storing nothing; `null` lifts the limit. Not queued: it
    /// takes effect at once and is not cleared by clearing the queue (a reset clears it).
    BodyLimit { max_bytes: Option<usize> },
}

/// What the request gate should do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    ServerError(u16),
    RateLimit { reset_secs: u64, retry_after: bool },
    Delay(Duration),
    Reset,
    DropResponse,
}

#[derive(Default)]
pub(crate) struct FaultQueue {
    /// Lets the hot path skip the lock when nothing is queued (the usual case).
    armed: AtomicBool,
    queue: Mutex<VecDeque<(Action, usize)>>,
}

impl FaultQueue {
    /// Queues a per-request fault; `RefuseConnections` is the caller's to handle.
    pub fn push(&self, fault: &Fault) {
        let (action, count) = match *fault {
            Fault::ServerError { status, count } => (Action::ServerError(status), count),
            Fault::RateLimit {
                count,
                reset_secs,
                retry_after,
            } => (
                Action::RateLimit {
                    reset_secs,
                    retry_after,
                },
                count,
            ),
            Fault::Delay { duration, count } => (Action::Delay(duration), count),
            Fault::ResetConnection { count } => (Action::Reset, count),
            Fault::DropResponse { count } => (Action::DropResponse, count),
            Fault::RefuseConnections { .. } | Fault::BodyLimit { .. } => return,
        };
        if count == 0 {
            return;
        }
        let mut queue = self.lock();
        queue.push_back((action, count));
        self.armed.store(true, Ordering::Release);
    }

    pub fn clear(&self) {
        let mut queue = self.lock();
        queue.clear();
        self.armed.store(false, Ordering::Release);
    }

    /// Takes one request's worth of the oldest queued fault.
    pub fn next(&self) -> Option<Action> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        let mut queue = self.lock();
        let (action, remaining) = queue.front_mut()?;
        let action = *action;
        *remaining -= 1;
        if *remaining == 0 {
            queue.pop_front();
        }
        if queue.is_empty() {
            self.armed.store(false, Ordering::Release);
        }
        Some(action)
    }

    /// Requests still to be served a fault.
    pub fn pending(&self) -> usize {
        self.lock().iter().map(|(_, n)| n).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Action, usize)>> {
        // A panic while holding this lock cannot leave the queue inconsistent.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_served_in_order_then_stop() {
        let q = FaultQueue::default();
        q.push(&Fault::ServerError {
            status: 503,
            count: 2,
        });
        q.push(&Fault::ResetConnection { count: 1 });
        q.push(&Fault::Delay {
            duration: Duration::from_millis(5),
            count: 0,
        });
        assert_eq!(q.pending(), 3);
        assert_eq!(q.next(), Some(Action::ServerError(503)));
        assert_eq!(q.next(), Some(Action::ServerError(503)));
        assert_eq!(q.next(), Some(Action::Reset));
        assert_eq!(q.next(), None);
    }

    #[test]
    fn json_form_is_tagged_by_kind() {
        let f: Fault = serde_json::from_str(r#"{"kind":"body_limit","max_bytes":1024}"#).unwrap();
        assert_eq!(
            f,
            Fault::BodyLimit {
                max_bytes: Some(1024)
            }
        );
        let f: Fault =
            serde_json::from_str(r#"{"kind":"delay","duration_ms":250,"count":3}"#).unwrap();
        assert_eq!(
            f,
            Fault::Delay {
                duration: Duration::from_millis(250),
                count: 3
            }
        );
        let f: Fault =
            serde_json::from_str(r#"{"kind":"rate_limit","count":1,"reset_secs":2}"#).unwrap();
        assert_eq!(
            f,
            Fault::RateLimit {
                count: 1,
                reset_secs: 2,
                retry_after: false
            }
        );
    }
}
