//! Request and event counters, kept in atomics so the hot path takes no lock for them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A snapshot of what the emulator has seen since start (or the last reset). Only Lago API
/// requests (`/api/v1/...`) count, not `/_emulator/...` control requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Lago API requests received, answered or not.
    pub requests: u64,
    /// Answers sent, by HTTP status code.
    pub by_status: BTreeMap<u16, u64>,
    /// `POST /api/v1/events` requests.
    pub single_requests: u64,
    /// `POST /api/v1/events/batch` requests.
    pub batch_requests: u64,
    /// `GET /api/v1/events/{transaction_id}` requests.
    pub get_requests: u64,
    /// Events stored (ClickHouse replacements not counted again).
    pub events_stored: u64,
    /// Duplicates: Postgres events answered `value_already_exist`, ClickHouse rows replaced.
    pub duplicates: u64,
    /// Requests that were served an injected fault (any kind).
    pub faults_served: u64,
    /// Connections closed without an answer (`reset_connection` and `drop_response`).
    pub connections_dropped: u64,
}

const STATUS_SLOTS: usize = 600;

pub(crate) struct AtomicCounters {
    pub requests: AtomicU64,
    pub single_requests: AtomicU64,
    pub batch_requests: AtomicU64,
    pub get_requests: AtomicU64,
    pub events_stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub faults_served: AtomicU64,
    pub connections_dropped: AtomicU64,
    by_status: Box<[AtomicU64]>,
}

impl Default for AtomicCounters {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            single_requests: AtomicU64::new(0),
            batch_requests: AtomicU64::new(0),
            get_requests: AtomicU64::new(0),
            events_stored: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            faults_served: AtomicU64::new(0),
            connections_dropped: AtomicU64::new(0),
            by_status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl AtomicCounters {
    pub fn status(&self, status: u16) {
        if let Some(slot) = self.by_status.get(usize::from(status)) {
            bump(slot, 1);
        }
    }

    pub fn snapshot(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            requests: get(&self.requests),
            by_status: self
                .by_status
                .iter()
                .enumerate()
                .filter_map(|(code, n)| {
                    let n = get(n);
                    (n > 0).then(|| (u16::try_from(code).unwrap_or(u16::MAX), n))
                })
                .collect(),
            single_requests: get(&self.single_requests),
            batch_requests: get(&self.batch_requests),
            get_requests: get(&self.get_requests),
            events_stored: get(&self.events_stored),
            duplicates: get(&self.duplicates),
            faults_served: get(&self.faults_served),
            connections_dropped: get(&self.connections_dropped),
        }
    }

    pub fn reset(&self) {
        for c in [
            &self.requests,
            &self.single_requests,
            &self.batch_requests,
            &self.get_requests,
            &self.events_stored,
            &self.duplicates,
            &self.faults_served,
            &self.connections_dropped,
        ]
        .into_iter()
        .chain(self.by_status.iter())
        {
            c.store(0, Ordering::Relaxed);
        }
    }
}
