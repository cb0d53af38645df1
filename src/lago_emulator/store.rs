//! The emulator's event table: stored events in arrival order plus the indexes Lago's two
//! stores use — Postgres rejects a second (external_subscription_id, transaction_id), ClickHouse
//! accepts everything and keeps one row per (transaction_id, timestamp, external_subscription_id,
//! code).
//!
//! Records are compact (strings boxed, `properties` kept as JSON text) and the indexes are hash
//! tables of positions into the record vector, so a million events cost no copied keys.

use std::hash::{BuildHasher, Hash, Hasher};

use hashbrown::{DefaultHashBuilder as RandomState, HashTable};
use serde::{Deserialize, Serialize};
use serde_json::Map;
use uuid::Uuid;

use super::validate::ParsedEvent;

/// Which Lago event store to imitate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// The self-hosted default: a duplicate (external_subscription_id, transaction_id) is
    /// answered 422 `value_already_exist`.
    #[default]
    Postgres,
    /// The high-volume store: always 200, later rows with the same
    /// (transaction_id, timestamp, external_subscription_id, code) replace earlier ones.
    Clickhouse,
}

/// One event as Lago keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub lago_id: String,
    pub transaction_id: String,
    pub external_subscription_id: Option<String>,
    pub code: String,
    /// Unix milliseconds: Lago keeps the timestamp with millisecond precision.
    pub timestamp_millis: i64,
    pub properties: Map<String, serde_json::Value>,
    pub precise_total_amount_cents: Option<String>,
    /// When the emulator stored it (Lago's `created_at`), Unix milliseconds.
    pub received_at_millis: i64,
}

#[derive(Debug)]
pub(crate) struct Record {
    pub lago_id: Uuid,
    pub event: ParsedEvent,
    pub received_at_millis: i64,
}

impl Record {
    fn to_stored(&self) -> StoredEvent {
        let e = &self.event;
        StoredEvent {
            lago_id: self.lago_id.to_string(),
            transaction_id: e.transaction_id.to_string(),
            external_subscription_id: e.external_subscription_id.as_deref().map(str::to_string),
            code: e.code.to_string(),
            timestamp_millis: e.timestamp_millis,
            // The text was produced by serde_json from an object, so it parses back.
            properties: serde_json::from_str(&e.properties_json).unwrap_or_default(),
            precise_total_amount_cents: e.precise_total_amount_cents.as_deref().map(str::to_string),
            received_at_millis: self.received_at_millis,
        }
    }
}

/// What happened to a request's events.
pub(crate) enum Commit {
    /// All stored; `duplicates` counts ClickHouse rows that replaced an earlier one.
    Stored { duplicates: usize },
    /// Nothing stored: the indexes (in request order) that are duplicates.
    Rejected { duplicate_indexes: Vec<usize> },
}

pub(crate) struct Store {
    kind: StoreKind,
    records: Vec<Record>,
    /// Postgres: (external_subscription_id, transaction_id); ClickHouse: the dedupe key.
    unique: HashTable<Slot>,
    /// The first record of each transaction_id, for `GET /events/{transaction_id}`.
    by_transaction: HashTable<Slot>,
    hasher: RandomState,
}

/// An index entry: a record's position, and the hash of its key, kept so that a table growing
/// to a million entries does not hash every stored key again (it did: 12 % of the emulator's
/// time in a delivery benchmark).
#[derive(Clone, Copy)]
struct Slot {
    hash: u64,
    position: usize,
}

impl Slot {
    fn hash(&self) -> u64 {
        self.hash
    }
}

impl Store {
    pub fn new(kind: StoreKind) -> Self {
        Self {
            kind,
            records: Vec::new(),
            unique: HashTable::new(),
            by_transaction: HashTable::new(),
            hasher: RandomState::default(),
        }
    }

    pub fn clear(&mut self) {
        *self = Self::new(self.kind);
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    fn unique_hash(&self, e: &ParsedEvent) -> u64 {
        unique_hash_with(&self.hasher, self.kind, e)
    }

    fn same_key(kind: StoreKind, a: &ParsedEvent, b: &ParsedEvent) -> bool {
        a.transaction_id == b.transaction_id
            && a.external_subscription_id == b.external_subscription_id
            && (kind == StoreKind::Postgres
                || (a.timestamp_millis == b.timestamp_millis && a.code == b.code))
    }

    fn tx_hash(&self, transaction_id: &str) -> u64 {
        self.hasher.hash_one(transaction_id)
    }

    /// Stores a request's events atomically: either all of them or (Postgres, on a duplicate
    /// already stored or repeated in the request) none.
    pub fn commit(&mut self, events: Vec<(Uuid, ParsedEvent)>, received_at_millis: i64) -> Commit {
        match self.kind {
            StoreKind::Postgres => self.commit_unique(events, received_at_millis),
            StoreKind::Clickhouse => self.commit_replacing(events, received_at_millis),
        }
    }

    /// Positions (in `events`) that Postgres would reject: already stored, or repeated earlier
    /// in the same request (the first occurrence is kept). Always empty for ClickHouse.
    pub fn duplicate_indexes(&self, events: &[&ParsedEvent]) -> Vec<usize> {
        let kind = self.kind;
        if kind == StoreKind::Clickhouse {
            return Vec::new();
        }
        let hashes: Vec<u64> = events.iter().map(|e| self.unique_hash(e)).collect();
        let mut duplicate_indexes = Vec::new();
        let mut in_request: HashTable<usize> = HashTable::new();
        for (i, event) in events.iter().enumerate() {
            let hash = hashes[i];
            let stored = self
                .unique
                .find(hash, |s| {
                    Self::same_key(kind, &self.records[s.position].event, event)
                })
                .is_some();
            let repeated = in_request
                .find(hash, |&j| Self::same_key(kind, events[j], event))
                .is_some();
            if stored || repeated {
                duplicate_indexes.push(i);
            } else {
                in_request.insert_unique(hash, i, |&j| hashes[j]);
            }
        }
        duplicate_indexes
    }

    fn commit_unique(&mut self, events: Vec<(Uuid, ParsedEvent)>, received_at: i64) -> Commit {
        let refs: Vec<&ParsedEvent> = events.iter().map(|(_, e)| e).collect();
        let duplicate_indexes = self.duplicate_indexes(&refs);
        drop(refs);
        if !duplicate_indexes.is_empty() {
            return Commit::Rejected { duplicate_indexes };
        }
        for (lago_id, event) in events {
            let hash = self.unique_hash(&event);
            let position = self.push(lago_id, event, received_at);
            self.unique
                .insert_unique(hash, Slot { hash, position }, Slot::hash);
        }
        Commit::Stored { duplicates: 0 }
    }

    fn commit_replacing(&mut self, events: Vec<(Uuid, ParsedEvent)>, received_at: i64) -> Commit {
        let kind = self.kind;
        let mut duplicates = 0;
        for (lago_id, event) in events {
            let hash = self.unique_hash(&event);
            let existing = self
                .unique
                .find(hash, |s| {
                    Self::same_key(kind, &self.records[s.position].event, &event)
                })
                .map(|s| s.position);
            match existing {
                Some(position) => {
                    // ClickHouse's ReplacingMergeTree keeps the latest row; position is kept
                    // so `events()` still reads in first-arrival order.
                    duplicates += 1;
                    self.records[position] = Record {
                        lago_id,
                        event,
                        received_at_millis: received_at,
                    };
                }
                None => {
                    let position = self.push(lago_id, event, received_at);
                    self.unique
                        .insert_unique(hash, Slot { hash, position }, Slot::hash);
                }
            }
        }
        Commit::Stored { duplicates }
    }

    fn push(&mut self, lago_id: Uuid, event: ParsedEvent, received_at: i64) -> usize {
        let position = self.records.len();
        let hash = self.tx_hash(&event.transaction_id);
        let records = &self.records;
        let known = self
            .by_transaction
            .find(hash, |s| {
                records[s.position].event.transaction_id == event.transaction_id
            })
            .is_some();
        if !known {
            self.by_transaction
                .insert_unique(hash, Slot { hash, position }, Slot::hash);
        }
        self.records.push(Record {
            lago_id,
            event,
            received_at_millis: received_at,
        });
        position
    }

    /// Forgets every stored event with one of these transaction_ids, as if Lago had lost them
    /// (to test `tally audit`). Rebuilds the indexes; returns how many records went.
    pub fn forget(&mut self, transaction_ids: &std::collections::HashSet<&str>) -> usize {
        let before = self.records.len();
        let kept: Vec<Record> = std::mem::take(&mut self.records)
            .into_iter()
            .filter(|r| !transaction_ids.contains(&*r.event.transaction_id))
            .collect();
        let forgotten = before - kept.len();
        *self = Self::new(self.kind);
        for r in kept {
            let hash = self.unique_hash(&r.event);
            let position = self.push(r.lago_id, r.event, r.received_at_millis);
            self.unique
                .insert_unique(hash, Slot { hash, position }, Slot::hash);
        }
        forgotten
    }

    /// The first event stored with this transaction_id.
    pub fn find(&self, transaction_id: &str) -> Option<&Record> {
        let hash = self.tx_hash(transaction_id);
        self.by_transaction
            .find(hash, |s| {
                &*self.records[s.position].event.transaction_id == transaction_id
            })
            .map(|s| &self.records[s.position])
    }

    pub fn snapshot(&self, offset: usize, limit: usize) -> Vec<StoredEvent> {
        self.records
            .iter()
            .skip(offset)
            .take(limit)
            .map(Record::to_stored)
            .collect()
    }
}

fn unique_hash_with(hasher: &RandomState, kind: StoreKind, e: &ParsedEvent) -> u64 {
    let mut h = hasher.build_hasher();
    e.transaction_id.hash(&mut h);
    e.external_subscription_id.hash(&mut h);
    if kind == StoreKind::Clickhouse {
        e.timestamp_millis.hash(&mut h);
        e.code.hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: usize, subscription: &str) -> ParsedEvent {
        ParsedEvent {
            transaction_id: format!("tx-{i}").into(),
            external_subscription_id: Some(subscription.into()),
            code: "llm".into(),
            timestamp_millis: i as i64,
            precise_total_amount_cents: None,
            properties_json: "{}".into(),
        }
    }

    /// The indexes keep each key's hash: after growing many times over, every stored event is
    /// still found by its id, and still refused (Postgres) or replaced (ClickHouse) when sent
    /// again.
    #[test]
    fn events_are_found_and_deduped_after_the_indexes_grew() {
        const N: usize = 20_000;
        for kind in [StoreKind::Postgres, StoreKind::Clickhouse] {
            let mut store = Store::new(kind);
            for start in (0..N).step_by(100) {
                let batch = (start..start + 100)
                    .map(|i| (Uuid::nil(), event(i, "sub")))
                    .collect();
                assert!(matches!(
                    store.commit(batch, 0),
                    Commit::Stored { duplicates: 0 }
                ));
            }
            assert_eq!(store.len(), N);
            for i in (0..N).step_by(997) {
                let found = store.find(&format!("tx-{i}")).expect("stored");
                assert_eq!(found.event.timestamp_millis, i as i64);
            }
            assert!(store.find("tx-absent").is_none());
            let again = vec![(Uuid::nil(), event(12_345, "sub"))];
            match (kind, store.commit(again, 0)) {
                (StoreKind::Postgres, Commit::Rejected { duplicate_indexes }) => {
                    assert_eq!(duplicate_indexes, vec![0]);
                }
                (StoreKind::Clickhouse, Commit::Stored { duplicates }) => {
                    assert_eq!(duplicates, 1);
                }
                (kind, _) => panic!("{kind:?}: a resent event was not deduped"),
            }
            // Another customer's event with the same id is another row in both stores.
            let other = vec![(Uuid::nil(), event(12_345, "other"))];
            assert!(matches!(
                store.commit(other, 0),
                Commit::Stored { duplicates: 0 }
            ));
            assert_eq!(store.len(), N + 1);
        }
    }
}
