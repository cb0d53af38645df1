//! Where virtual keys live: one interface ([`Backend`]), two stores — SQLite (`keys.db` in the
//! state dir, one machine) and PostgreSQL (`general_settings.database_url`, shared by every
//! replica) — and the in-memory cache in front of either ([`KeyStore`]), so authenticating a
//! request costs a hash and a map lookup, never a query.

mod cache;
pub mod import;
pub mod postgres;
pub mod sqlite;

use std::time::Duration;

use futures::future::BoxFuture;

use super::keys::{KeyHash, KeyRecord};

pub use cache::{CacheSettings, KeyStore};

/// Why the key store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error(
        "cannot create {path}: {source}; set tally_settings.state_dir / TALLY_STATE_DIR to a writable directory"
    )]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("key store {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error(transparent)]
    WorldWritable(#[from] super::files::WorldWritable),
    #[error("key store lock poisoned by an earlier panic")]
    Poisoned,
    /// The database did not answer (down, unreachable, timed out). Maps to 503.
    #[error("key store {store} is unavailable: {message}")]
    Unavailable { store: String, message: String },
    /// The database answered with an error that is not about reaching it.
    #[error("key store {store}: {message}")]
    Database { store: String, message: String },
    #[error(
        "general_settings.database_url is not a usable PostgreSQL URL: {0}; write e.g. postgresql://user:password@host:5432/db?sslmode=verify-full"
    )]
    BadUrl(String),
    #[error("a key with this token already exists")]
    Exists,
}

impl KeyStoreError {
    /// True when the store could not be reached (the caller answers 503, not 500).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// One page of keys, newest first, and how many keys match in all.
#[derive(Debug, Clone)]
pub struct Page {
    pub keys: Vec<KeyRecord>,
    pub total: u64,
}

/// Filters of `/key/list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub user_id: Option<String>,
    pub team_id: Option<String>,
    pub key_alias: Option<String>,
}

pub type StoreResult<T> = Result<T, KeyStoreError>;

/// A key store: every method is one short query (or transaction) on the database.
pub trait Backend: Send + Sync + 'static {
    /// `sqlite:/path/keys.db` or `postgresql://host:port/db` (no credentials), for messages.
    fn describe(&self) -> &str;
    fn get(&self, hash: KeyHash) -> BoxFuture<'_, StoreResult<Option<KeyRecord>>>;
    /// The records of those of `hashes` that exist.
    fn get_many(&self, hashes: Vec<KeyHash>) -> BoxFuture<'_, StoreResult<Vec<KeyRecord>>>;
    /// Stores a new key; [`KeyStoreError::Exists`] when its token is taken.
    fn insert(&self, record: KeyRecord) -> BoxFuture<'_, StoreResult<()>>;
    /// Replaces the record with the same token; false when there is none.
    fn update(&self, record: KeyRecord) -> BoxFuture<'_, StoreResult<bool>>;
    /// Swaps `old` for `new` atomically (`/key/regenerate`); false when `old` does not exist.
    fn replace(&self, old: KeyHash, new: KeyRecord) -> BoxFuture<'_, StoreResult<bool>>;
    /// Deletes keys; returns the hashes that existed.
    fn delete(&self, hashes: Vec<KeyHash>) -> BoxFuture<'_, StoreResult<Vec<KeyHash>>>;
    /// A page of keys (offset, limit), newest first.
    fn list(&self, filter: ListFilter, offset: u64, limit: u64)
    -> BoxFuture<'_, StoreResult<Page>>;
    /// Answers when the database does.
    fn ping(&self) -> BoxFuture<'_, StoreResult<()>>;
}

/// How long one database call may take before it counts as the database being unavailable.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// True when `url` names PostgreSQL (LiteLLM's `DATABASE_URL` schemes).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Opens the store the configuration names: PostgreSQL when `database_url` is set, SQLite in
/// `state_dir` otherwise.
pub async fn open_backend(
    database_url: Option<&str>,
    state_dir: &std::path::Path,
) -> StoreResult<std::sync::Arc<dyn Backend>> {
    match database_url {
        Some(url) => Ok(std::sync::Arc::new(postgres::PgStore::connect(url).await?)),
        None => {
            let dir = state_dir.to_owned();
            let store = tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(&dir))
                .await
                .map_err(|e| KeyStoreError::Database {
                    store: "sqlite".into(),
                    message: format!("opening task failed: {e}"),
                })??;
            Ok(std::sync::Arc::new(store))
        }
    }
}
