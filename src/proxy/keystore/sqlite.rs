//! Keys in SQLite: `keys.db` in the state dir, owner-only, WAL. One machine's store; calls run
//! on the blocking pool so a slow disk never stalls the async workers.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension, params};

use super::{Backend, KeyStoreError, ListFilter, Page, StoreResult};
use crate::proxy::keys::{KeyHash, KeyRecord};
use crate::proxy::spend_writer::DIR_MODE;

/// Versioned schema: `PRAGMA user_version` is the number of steps applied.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS keys (
        token      TEXT PRIMARY KEY,   -- SHA-256 hex of the key; the key itself is never stored
        key_name   TEXT NOT NULL,
        key_alias  TEXT,
        user_id    TEXT,
        team_id    TEXT,
        models     TEXT NOT NULL,      -- JSON array
        metadata   TEXT NOT NULL,      -- JSON object
        created_at TEXT NOT NULL,
        expires_at TEXT
    );",
    "ALTER TABLE keys ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;",
];

const COLUMNS: &str = "token, key_name, key_alias, user_id, team_id, models, metadata, created_at, expires_at, blocked";

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    describe: Arc<str>,
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) `<state_dir>/keys.db`.
    pub fn open(state_dir: &Path) -> StoreResult<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(state_dir)
            .map_err(|source| KeyStoreError::StateDir {
                path: state_dir.display().to_string(),
                source,
            })?;
        crate::proxy::files::refuse_world_writable(state_dir)?;
        let path = state_dir.join("keys.db");
        let sql = |source| KeyStoreError::Sqlite {
            path: path.display().to_string(),
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
        crate::proxy::files::tighten(&db, &path, 0o600);
        drop(db);
        let mut conn = Connection::open(&path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        migrate(&mut conn).map_err(sql)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            describe: format!("sqlite:{}", path.display()).into(),
        })
    }

    fn error(&self, source: rusqlite::Error) -> KeyStoreError {
        KeyStoreError::Sqlite {
            path: self.describe.to_string(),
            source,
        }
    }

    /// Runs `f` on the connection on the blocking pool.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> BoxFuture<'_, StoreResult<T>> {
        let conn = self.conn.clone();
        Box::pin(async move {
            let joined = tokio::task::spawn_blocking(move || {
                let mut guard = conn.lock().map_err(|_| None)?;
                f(&mut guard).map_err(Some)
            })
            .await
            .map_err(|e| KeyStoreError::Database {
                store: self.describe.to_string(),
                message: format!("key store task failed: {e}"),
            })?;
            joined.map_err(|e| match e {
                Some(e) => self.error(e),
                None => KeyStoreError::Poisoned,
            })
        })
    }
}

/// Applies the migrations not yet applied, in one transaction (SQLite's write lock keeps two
/// processes from racing).
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    // A keys.db from before versioning has the table but user_version 0.
    let has_table: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'keys')",
        [],
        |r| r.get(0),
    )?;
    if version == 0 && has_table {
        version = 1;
    }
    for step in MIGRATIONS
        .iter()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        tx.execute_batch(step)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    tx.commit()
}

fn insert_row(conn: &Connection, r: &KeyRecord) -> rusqlite::Result<usize> {
    conn.execute(
        &format!(
            "INSERT OR IGNORE INTO keys ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        ),
        params![
            r.token(),
            r.key_name,
            r.key_alias,
            r.user_id,
            r.team_id,
            serde_json::Value::from(r.models.clone()).to_string(),
            serde_json::Value::Object(r.metadata.clone()).to_string(),
            crate::spend::fmt_millis(&r.created_at),
            r.expires.as_ref().map(crate::spend::fmt_millis),
            r.blocked,
        ],
    )
}

fn get_row(conn: &Connection, hash: &KeyHash) -> rusqlite::Result<Option<KeyRecord>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM keys WHERE token = ?1"),
        [hex::encode(hash)],
        row_to_record,
    )
    .optional()
}

impl Backend for SqliteStore {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn get(&self, hash: KeyHash) -> BoxFuture<'_, StoreResult<Option<KeyRecord>>> {
        self.run(move |conn| get_row(conn, &hash))
    }

    fn get_many(&self, hashes: Vec<KeyHash>) -> BoxFuture<'_, StoreResult<Vec<KeyRecord>>> {
        self.run(move |conn| {
            let mut found = Vec::with_capacity(hashes.len());
            for hash in &hashes {
                if let Some(r) = get_row(conn, hash)? {
                    found.push(r);
                }
            }
            Ok(found)
        })
    }

    fn insert(&self, record: KeyRecord) -> BoxFuture<'_, StoreResult<()>> {
        let fut = self.run(move |conn| insert_row(conn, &record));
        Box::pin(async move {
            match fut.await? {
                0 => Err(KeyStoreError::Exists),
                _ => Ok(()),
            }
        })
    }

    fn update(&self, record: KeyRecord) -> BoxFuture<'_, StoreResult<bool>> {
        self.run(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("DELETE FROM keys WHERE token = ?1", [record.token()])?;
            if n > 0 {
                insert_row(&tx, &record)?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
    }

    fn replace(&self, old: KeyHash, new: KeyRecord) -> BoxFuture<'_, StoreResult<bool>> {
        self.run(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("DELETE FROM keys WHERE token = ?1", [hex::encode(old)])?;
            if n > 0 && insert_row(&tx, &new)? == 0 {
                // The new token is taken: keep the old key.
                return Ok(false);
            }
            tx.commit()?;
            Ok(n > 0)
        })
    }

    fn delete(&self, hashes: Vec<KeyHash>) -> BoxFuture<'_, StoreResult<Vec<KeyHash>>> {
        self.run(move |conn| {
            let tx = conn.transaction()?;
            let mut deleted = Vec::new();
            for hash in hashes {
                if tx.execute("DELETE FROM keys WHERE token = ?1", [hex::encode(hash)])? > 0 {
                    deleted.push(hash);
                }
            }
            tx.commit()?;
            Ok(deleted)
        })
    }

    fn list(
        &self,
        filter: ListFilter,
        offset: u64,
        limit: u64,
    ) -> BoxFuture<'_, StoreResult<Page>> {
        self.run(move |conn| {
            let cond = "(?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR team_id = ?2) AND (?3 IS NULL OR key_alias = ?3)";
            let args = params![filter.user_id, filter.team_id, filter.key_alias];
            let total: i64 = conn.query_row(
                &format!("SELECT COUNT(*) FROM keys WHERE {cond}"),
                args,
                |r| r.get(0),
            )?;
            let mut stmt = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM keys WHERE {cond} ORDER BY created_at DESC, token LIMIT ?4 OFFSET ?5"
            ))?;
            let keys = stmt
                .query_map(
                    params![
                        filter.user_id,
                        filter.team_id,
                        filter.key_alias,
                        i64::try_from(limit).unwrap_or(i64::MAX),
                        i64::try_from(offset).unwrap_or(i64::MAX)
                    ],
                    row_to_record,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Page {
                keys,
                total: u64::try_from(total).unwrap_or(0),
            })
        })
    }

    fn ping(&self) -> BoxFuture<'_, StoreResult<()>> {
        self.run(|conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(|_| ())
        })
    }
}

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
        blocked: row.get(9)?,
    })
}

fn conversion_error(
    idx: usize,
    e: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
}
