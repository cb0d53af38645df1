//! Virtual keys: minted by `/key/generate`, stored in SQLite (`keys.db` in the state dir) as
//! SHA-256 only, and cached in memory so authenticating a request costs a hash, not a query.
//!
//! The cache is loaded at start-up and updated by every generate/delete this process does; a
//! key missing from it is looked up in SQLite once (so a key minted by another proxy sharing the
//! state dir works). Expiry is checked on every use. Deleting a key in another process is seen
//! only after a restart: run one proxy per state dir, or restart after deleting elsewhere.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::spend_writer::DIR_MODE;

/// Random characters after `sk-`: 32 × 6 bits = 192 bits of entropy.
const KEY_RANDOM_CHARS: usize = 32;
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

pub type KeyHash = [u8; 32];

/// SHA-256 of a key, the only form in which keys are stored or logged.
pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time equality of two key hashes.
pub fn hashes_equal(a: &KeyHash, b: &KeyHash) -> bool {
    a.ct_eq(b).into()
}

/// A fresh key: `sk-` + 32 URL-safe characters from the OS-seeded CSPRNG.
pub fn new_key() -> String {
    let mut bytes = [0u8; KEY_RANDOM_CHARS];
    rand::fill(&mut bytes);
    // 256 is a multiple of 64, so `b % 64` picks every character with equal probability.
    let random: String = bytes
        .iter()
        .map(|b| URL_SAFE[usize::from(*b) % 64] as char)
        .collect();
    format!("sk-{random}")
}

/// LiteLLM's display form of a key: `sk-...` and its last four characters.
pub fn key_name(key: &str) -> String {
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("sk-...{tail}")
}

/// A stored key, without the key itself.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub hash: KeyHash,
    pub key_name: String,
    pub key_alias: Option<String>,
    pub user_id: Option<String>,
    pub team_id: Option<String>,
    /// Model names the key may use; empty means all.
    pub models: Vec<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub expires: Option<DateTime<Utc>>,
}

impl KeyRecord {
    /// The hash as lowercase hex: LiteLLM's `token`, and the spend log's `key_hash`.
    pub fn token(&self) -> String {
        // Per request (the spend record's key_hash): a table lookup per digit, where
        // `hex::encode` collects chars one by one.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(64);
        for b in self.hash {
            hex.push(char::from(DIGITS[usize::from(b >> 4)]));
            hex.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        hex
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// What `/key/generate` asks for (already validated).
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub key_alias: Option<String>,
    pub user_id: Option<String>,
    pub team_id: Option<String>,
    pub models: Vec<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub expires: Option<DateTime<Utc>>,
}

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
}

/// The SQLite key store with its in-memory cache.
#[derive(Clone)]
pub struct KeyStore {
    conn: Arc<Mutex<Connection>>,
    cache: Arc<RwLock<HashMap<KeyHash, Arc<KeyRecord>>>>,
    path: Arc<str>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    token      TEXT PRIMARY KEY,   -- SHA-256 hex of the key; the key itself is never stored
    key_name   TEXT NOT NULL,
    key_alias  TEXT,
    user_id    TEXT,
    team_id    TEXT,
    models     TEXT NOT NULL,      -- JSON array
    metadata   TEXT NOT NULL,      -- JSON object
    created_at TEXT NOT NULL,
    expires_at TEXT
);";

impl KeyStore {
    /// Opens (creating if needed) `<state_dir>/keys.db` and loads every key into the cache.
    pub fn open(state_dir: &Path) -> Result<Self, KeyStoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(state_dir)
            .map_err(|source| KeyStoreError::StateDir {
                path: state_dir.display().to_string(),
                source,
            })?;
        super::files::refuse_world_writable(state_dir)?;
        let path = state_dir.join("keys.db");
        let path_text: Arc<str> = path.display().to_string().into();
        let sql = |source| KeyStoreError::Sqlite {
            path: path_text.to_string(),
            source,
        };
        // Create the database owner-only before SQLite does (its -wal/-shm files inherit the mode).
        let db = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| KeyStoreError::StateDir {
                path: path.display().to_string(),
                source,
            })?;
        super::files::tighten(&db, &path, 0o600);
        drop(db);
        let conn = Connection::open(&path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        let mut cache = HashMap::new();
        {
            let mut stmt = conn.prepare(SELECT_KEYS).map_err(sql)?;
            let rows = stmt.query_map([], row_to_record).map_err(sql)?;
            for row in rows {
                let record = row.map_err(sql)?;
                cache.insert(record.hash, Arc::new(record));
            }
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            cache: Arc::new(RwLock::new(cache)),
            path: path_text,
        })
    }

    fn sql_error(&self, source: rusqlite::Error) -> KeyStoreError {
        KeyStoreError::Sqlite {
            path: self.path.to_string(),
            source,
        }
    }

    /// Mints and stores a key; returns the key (shown once, to the caller) and its record.
    pub fn generate(&self, new: NewKey) -> Result<(String, Arc<KeyRecord>), KeyStoreError> {
        let key = new_key();
        let record = KeyRecord {
            hash: hash_key(&key),
            key_name: key_name(&key),
            key_alias: new.key_alias,
            user_id: new.user_id,
            team_id: new.team_id,
            models: new.models,
            metadata: new.metadata,
            created_at: to_millis(Utc::now()),
            expires: new.expires.map(to_millis),
        };
        let conn = self.conn.lock().map_err(|_| KeyStoreError::Poisoned)?;
        conn.execute(
            "INSERT INTO keys (token, key_name, key_alias, user_id, team_id, models, metadata, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                record.token(),
                record.key_name,
                record.key_alias,
                record.user_id,
                record.team_id,
                serde_json::Value::from(record.models.clone()).to_string(),
                serde_json::Value::Object(record.metadata.clone()).to_string(),
                crate::spend::fmt_millis(&record.created_at),
                record.expires.as_ref().map(crate::spend::fmt_millis),
            ],
        )
        .map_err(|e| self.sql_error(e))?;
        drop(conn);
        let record = Arc::new(record);
        self.cache
            .write()
            .map_err(|_| KeyStoreError::Poisoned)?
            .insert(record.hash, record.clone());
        Ok((key, record))
    }

    /// The record for a key hash, from the cache or (once) from SQLite. Expiry is the caller's
    /// business, so `/key/info` can still show an expired key.
    pub fn find(&self, hash: &KeyHash) -> Result<Option<Arc<KeyRecord>>, KeyStoreError> {
        if let Some(found) = self
            .cache
            .read()
            .map_err(|_| KeyStoreError::Poisoned)?
            .get(hash)
        {
            // The map lookup compares hashes, not keys; this check keeps the final equality
            // decision constant-time anyway.
            return Ok(hashes_equal(&found.hash, hash).then(|| found.clone()));
        }
        let conn = self.conn.lock().map_err(|_| KeyStoreError::Poisoned)?;
        let record = conn
            .query_row(
                &format!("{SELECT_KEYS} WHERE token = ?1"),
                [hex::encode(hash)],
                row_to_record,
            )
            .optional()
            .map_err(|e| self.sql_error(e))?;
        drop(conn);
        Ok(match record {
            Some(record) => {
                let record = Arc::new(record);
                self.cache
                    .write()
                    .map_err(|_| KeyStoreError::Poisoned)?
                    .insert(record.hash, record.clone());
                Some(record)
            }
            None => None,
        })
    }

    /// Deletes keys by hash; returns the hashes that existed.
    pub fn delete(&self, hashes: &[KeyHash]) -> Result<Vec<KeyHash>, KeyStoreError> {
        let mut conn = self.conn.lock().map_err(|_| KeyStoreError::Poisoned)?;
        let tx = conn.transaction().map_err(|e| self.sql_error(e))?;
        let mut deleted = Vec::new();
        for hash in hashes {
            let n = tx
                .execute("DELETE FROM keys WHERE token = ?1", [hex::encode(hash)])
                .map_err(|e| self.sql_error(e))?;
            if n > 0 {
                deleted.push(*hash);
            }
        }
        tx.commit().map_err(|e| self.sql_error(e))?;
        drop(conn);
        let mut cache = self.cache.write().map_err(|_| KeyStoreError::Poisoned)?;
        for hash in hashes {
            cache.remove(hash);
        }
        Ok(deleted)
    }

    /// True when the database answers a query (for `/health/readiness`).
    pub fn is_open(&self) -> bool {
        self.conn
            .lock()
            .ok()
            .and_then(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).ok())
            == Some(1)
    }
}

const SELECT_KEYS: &str = "SELECT token, key_name, key_alias, user_id, team_id, models, metadata, created_at, expires_at FROM keys";

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let token: String = row.get(0)?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&token, &mut hash).map_err(|e| conversion_error(0, e))?;
    let models: String = row.get(5)?;
    let metadata: String = row.get(6)?;
    let created_at: String = row.get(7)?;
    let expires_at: Option<String> = row.get(8)?;
    let parse_time = |idx: usize, s: &str| {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| conversion_error(idx, e))
    };
    Ok(KeyRecord {
        hash,
        key_name: row.get(1)?,
        key_alias: row.get(2)?,
        user_id: row.get(3)?,
        team_id: row.get(4)?,
        models: serde_json::from_str(&models).map_err(|e| conversion_error(5, e))?,
        metadata: serde_json::from_str(&metadata).map_err(|e| conversion_error(6, e))?,
        created_at: parse_time(7, &created_at)?,
        expires: expires_at.map(|s| parse_time(8, &s)).transpose()?,
    })
}

fn conversion_error(
    idx: usize,
    e: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
}

/// Times are stored with millisecond precision; truncating up front keeps the cached record
/// identical to the one read back from SQLite.
fn to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// Parses LiteLLM's `duration`: a number and a unit, `s`, `m`, `h`, `d` or `w` (e.g. "30s", "7d").
pub fn parse_duration(text: &str) -> Option<chrono::Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: i64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    chrono::Duration::try_seconds(n.checked_mul(seconds)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_look_like_litellm_keys() {
        let key = new_key();
        assert!(key.starts_with("sk-"));
        assert_eq!(key.len(), 3 + KEY_RANDOM_CHARS);
        assert!(key[3..].bytes().all(|b| URL_SAFE.contains(&b)));
        assert_ne!(key, new_key());
        assert_eq!(key_name("sk-abcdefgh1234"), "sk-...1234");
    }

    #[test]
    fn the_token_is_the_lowercase_hex_of_the_hash() {
        let record = |hash| KeyRecord {
            hash,
            key_name: String::new(),
            key_alias: None,
            user_id: None,
            team_id: None,
            models: Vec::new(),
            metadata: serde_json::Map::new(),
            created_at: Utc::now(),
            expires: None,
        };
        assert_eq!(record([0xa5; 32]).token(), "a5".repeat(32));
        for key in ["sk-1234", &new_key()] {
            let hash = hash_key(key);
            assert_eq!(record(hash).token(), hex::encode(hash));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(chrono::Duration::seconds(30)));
        assert_eq!(parse_duration("10m"), Some(chrono::Duration::minutes(10)));
        assert_eq!(parse_duration("2h"), Some(chrono::Duration::hours(2)));
        assert_eq!(parse_duration("7d"), Some(chrono::Duration::days(7)));
        for bad in ["", "7", "d", "7y", "-1d", "1.5h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn stores_only_hashes_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path()).unwrap();
        let (key, record) = store
            .generate(NewKey {
                team_id: Some("t".into()),
                models: vec!["gpt-4o".into()],
                ..NewKey::default()
            })
            .unwrap();
        let db = std::fs::read(dir.path().join("keys.db")).unwrap();
        let wal = std::fs::read(dir.path().join("keys.db-wal")).unwrap_or_default();
        let needle = key.as_bytes();
        for bytes in [&db, &wal] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "raw key on disk"
            );
        }
        drop(store);
        let store = KeyStore::open(dir.path()).unwrap();
        let found = store.find(&hash_key(&key)).unwrap().unwrap();
        assert_eq!(*found, *record);
        assert!(found.allows_model("gpt-4o") && !found.allows_model("other"));
        assert_eq!(store.delete(&[record.hash]).unwrap(), vec![record.hash]);
        assert!(store.find(&hash_key(&key)).unwrap().is_none());
        assert!(store.is_open());
    }
}
