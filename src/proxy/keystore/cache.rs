//! The cache in front of the key store. A request's key is checked against memory only; the
//! database is asked on a miss (so a key made on another replica works at once), and a
//! background task re-reads every cached key each `revalidate` interval, so a key deleted,
//! blocked or changed elsewhere is refused here within that bound.
//!
//! If the database stops answering, cached keys keep working for `outage_grace`; after that, and
//! for any key not cached, the answer is 503 (the proxy cannot tell a valid key from a revoked
//! one). The pool reconnects by itself; the next successful revalidation ends the outage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Backend, KeyStoreError, ListFilter, Page, StoreResult};
use crate::proxy::keys::{KeyHash, KeyRecord, NewKey, hashes_equal, new_key};

/// Keys re-read per revalidation query.
const REVALIDATE_CHUNK: usize = 5_000;

/// Bounds of the cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheSettings {
    /// Every cached key is re-read this often: the bound on how long a key deleted or blocked
    /// elsewhere still works here.
    pub revalidate: Duration,
    /// How long cached keys keep working while the database does not answer.
    pub outage_grace: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            revalidate: Duration::from_secs(4),
            outage_grace: Duration::from_secs(300),
        }
    }
}

/// The key store and its cache; cheap to clone.
#[derive(Clone)]
pub struct KeyStore {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    cache: RwLock<HashMap<KeyHash, Arc<KeyRecord>>>,
    settings: CacheSettings,
    /// Set once the database has not answered for longer than `outage_grace`: cached keys are
    /// refused too. Read on every request, so a flag, not a clock.
    stale: AtomicBool,
    /// The last revalidation (or start-up) the database answered.
    last_ok: Mutex<Instant>,
    /// The database's last answer failed (readiness reports it).
    reachable: AtomicBool,
}

impl KeyStore {
    pub fn new(backend: Arc<dyn Backend>, settings: CacheSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                cache: RwLock::new(HashMap::new()),
                settings,
                stale: AtomicBool::new(false),
                last_ok: Mutex::new(Instant::now()),
                reachable: AtomicBool::new(true),
            }),
        }
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
    }

    pub fn settings(&self) -> CacheSettings {
        self.inner.settings
    }

    /// The record for a key hash: from memory when cached, else from the database (then
    /// cached). Expiry and blocking are the caller's business, so `/key/info` can show them.
    pub async fn find(&self, hash: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>> {
        if let Some(found) = self.cached(hash)? {
            return Ok(Some(found));
        }
        let record = self.observe(self.inner.backend.get(*hash).await)?;
        Ok(record.map(|r| self.remember(r)))
    }

    /// A cache hit, or `None` for a miss; refuses while the cache is too old to trust.
    fn cached(&self, hash: &KeyHash) -> StoreResult<Option<Arc<KeyRecord>>> {
        let cache = self
            .inner
            .cache
            .read()
            .map_err(|_| KeyStoreError::Poisoned)?;
        let Some(found) = cache.get(hash) else {
            return Ok(None);
        };
        if self.inner.stale.load(Ordering::Relaxed) {
            return Err(self.outage());
        }
        // The map compares hashes, not keys; this keeps the final equality constant-time.
        Ok(hashes_equal(&found.hash, hash).then(|| found.clone()))
    }

    fn outage(&self) -> KeyStoreError {
        KeyStoreError::Unavailable {
            store: self.inner.backend.describe().to_owned(),
            message: format!(
                "no answer for longer than the outage grace ({}s, tally_settings.key_outage_grace_secs); keys cannot be checked until it is back",
                self.inner.settings.outage_grace.as_secs()
            ),
        }
    }

    fn remember(&self, record: KeyRecord) -> Arc<KeyRecord> {
        let record = Arc::new(record);
        if let Ok(mut cache) = self.inner.cache.write() {
            cache.insert(record.hash, record.clone());
        }
        record
    }

    fn forget(&self, hashes: &[KeyHash]) {
        if let Ok(mut cache) = self.inner.cache.write() {
            for h in hashes {
                cache.remove(h);
            }
        }
    }

    /// Notes whether the database answered.
    fn observe<T>(&self, result: StoreResult<T>) -> StoreResult<T> {
        match &result {
            Ok(_) => self.inner.reachable.store(true, Ordering::Relaxed),
            Err(e) if e.is_unavailable() => self.inner.reachable.store(false, Ordering::Relaxed),
            Err(_) => {}
        }
        result
    }

    /// Stores a new key (random, or the caller's); returns the key and its record.
    pub async fn generate(&self, mut new: NewKey) -> StoreResult<(String, Arc<KeyRecord>)> {
        let key = new.key.take().unwrap_or_else(new_key);
        let record = KeyRecord::new(&key, new);
        self.insert(record.clone()).await?;
        Ok((key, self.remember(record)))
    }

    /// Stores a record as is (import); [`KeyStoreError::Exists`] when the token is taken.
    pub async fn insert(&self, record: KeyRecord) -> StoreResult<()> {
        self.observe(self.inner.backend.insert(record).await)
    }

    /// Replaces a key's record; false when it does not exist.
    pub async fn update(&self, record: KeyRecord) -> StoreResult<bool> {
        let hash = record.hash;
        let updated = self.observe(self.inner.backend.update(record.clone()).await)?;
        if updated {
            self.remember(record);
        } else {
            self.forget(&[hash]);
        }
        Ok(updated)
    }

    /// Swaps a key for a new one with the same settings; false when `old` does not exist.
    pub async fn replace(&self, old: KeyHash, new: KeyRecord) -> StoreResult<bool> {
        let replaced = self.observe(self.inner.backend.replace(old, new.clone()).await)?;
        self.forget(&[old]);
        if replaced {
            self.remember(new);
        }
        Ok(replaced)
    }

    /// Deletes keys; returns the hashes that existed.
    pub async fn delete(&self, hashes: &[KeyHash]) -> StoreResult<Vec<KeyHash>> {
        let deleted = self.observe(self.inner.backend.delete(hashes.to_vec()).await)?;
        self.forget(hashes);
        Ok(deleted)
    }

    pub async fn list(&self, filter: ListFilter, offset: u64, limit: u64) -> StoreResult<Page> {
        self.observe(self.inner.backend.list(filter, offset, limit).await)
    }

    /// Asks the database (readiness); false when it does not answer.
    pub async fn ping(&self) -> bool {
        self.observe(self.inner.backend.ping().await).is_ok()
    }

    /// False once cached keys are no longer trusted (the watchdog's view: a database outage
    /// within the grace is not a reason to restart the proxy and lose the cache).
    pub fn is_usable(&self) -> bool {
        !self.inner.stale.load(Ordering::Relaxed)
    }

    /// Whether the database answered last time it was asked.
    pub fn is_reachable(&self) -> bool {
        self.inner.reachable.load(Ordering::Relaxed)
    }

    /// Re-reads every cached key once: drops the ones gone, takes the new version of the rest.
    pub async fn revalidate(&self) -> StoreResult<()> {
        let hashes: Vec<KeyHash> = match self.inner.cache.read() {
            Ok(cache) => cache.keys().copied().collect(),
            Err(_) => return Err(KeyStoreError::Poisoned),
        };
        let result = if hashes.is_empty() {
            self.inner.backend.ping().await.map(|()| Vec::new())
        } else {
            // Bounded queries however many keys are cached.
            let mut fresh = Vec::with_capacity(hashes.len());
            let mut result = Ok(());
            for chunk in hashes.chunks(REVALIDATE_CHUNK) {
                match self.inner.backend.get_many(chunk.to_vec()).await {
                    Ok(records) => fresh.extend(records),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            result.map(|()| fresh)
        };
        match self.observe(result) {
            Ok(fresh) => {
                let mut fresh: HashMap<KeyHash, KeyRecord> =
                    fresh.into_iter().map(|r| (r.hash, r)).collect();
                if let Ok(mut cache) = self.inner.cache.write() {
                    for hash in hashes {
                        match fresh.remove(&hash) {
                            // Only entries still cached: one this replica deleted while the
                            // query ran must not come back.
                            Some(r) => {
                                if let Some(slot) = cache.get_mut(&hash)
                                    && **slot != r
                                {
                                    *slot = Arc::new(r);
                                }
                            }
                            None => {
                                cache.remove(&hash);
                            }
                        }
                    }
                }
                if let Ok(mut last) = self.inner.last_ok.lock() {
                    *last = Instant::now();
                }
                if self.inner.stale.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        store = self.inner.backend.describe(),
                        "key store is back; cached keys trusted again"
                    );
                }
                Ok(())
            }
            Err(e) => {
                let since = self
                    .inner
                    .last_ok
                    .lock()
                    .map(|t| t.elapsed())
                    .unwrap_or_default();
                if since > self.inner.settings.outage_grace
                    && !self.inner.stale.swap(true, Ordering::Relaxed)
                {
                    tracing::error!(error = %e, "key store unreachable past the outage grace: refusing cached keys until it answers");
                }
                Err(e)
            }
        }
    }

    /// Revalidates every `revalidate` interval until `stop`.
    pub fn spawn_revalidation(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(store.inner.settings.revalidate);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = store.revalidate().await {
                    tracing::warn!(error = %e, "key revalidation failed; cached keys still served within the outage grace");
                }
            }
        })
    }
}
