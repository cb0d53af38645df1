//! Read-only access to `shipper.db`, for what must not write: `tally replay --dry-run` (which
//! must not even create the file) and the reading `tally queue` subcommands.
//!
//! (Added for the operator commands, `tally queue` and `tally replay --dry-run`.)

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{BUSY_TIMEOUT, DB_FILE, MIGRATIONS, Outbox, OutboxError, State};

impl Outbox {
    /// Opens the outbox in `state_dir` without writing to it, or `Ok(None)` when there is none
    /// yet (nothing was ever recorded there). A schema from a newer tally is refused.
    pub fn open_read_only_in(state_dir: &Path) -> Result<Option<Self>, OutboxError> {
        Self::open_read_only(&state_dir.join(DB_FILE))
    }

    /// [`Outbox::open_read_only_in`] for the outbox file at `path`.
    pub fn open_read_only(path: &Path) -> Result<Option<Self>, OutboxError> {
        let path = path.to_owned();
        if !path.is_file() {
            return Ok(None);
        }
        let open_err = |source| OutboxError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(open_err)?;
        let known = MIGRATIONS.len();
        match usize::try_from(version) {
            // Created but never migrated: holds nothing.
            Ok(0) => return Ok(None),
            Ok(v) if v == known => {}
            Ok(v) if v < known => {
                // Reading an older schema with this build's queries could misreport; the
                // shipper migrates it on its next start.
                return Err(OutboxError::OlderSchema {
                    path: path.clone(),
                    found: v,
                    known,
                });
            }
            _ => {
                return Err(OutboxError::NewerSchema {
                    found: usize::try_from(version).unwrap_or(usize::MAX),
                    known,
                });
            }
        }
        Ok(Some(Self {
            conn,
            path,
            sources: Default::default(),
            targets: Default::default(),
        }))
    }

    /// A second, read-only connection to this outbox. The sender claims on it, so a claim reads
    /// beside the reader's ingest (WAL) instead of waiting for the writer's connection.
    pub fn reader(&self) -> Result<Self, OutboxError> {
        Self::open_read_only(&self.path)?.ok_or_else(|| OutboxError::Open {
            path: self.path.clone(),
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some("the file is gone".into()),
            ),
        })
    }

    /// State and content fingerprint of one transaction_id, if recorded: what `ingest` compares
    /// to tell a harmless re-read (same fingerprint) from a conflicting duplicate.
    pub fn lookup(&self, transaction_id: &str) -> Result<Option<(State, i64)>, OutboxError> {
        let row: Option<(i64, i64)> = self
            .conn
            .prepare_cached(&format!(
                "SELECT {}, e.content_hash FROM events AS e WHERE e.transaction_id = ?1",
                super::EFFECTIVE_STATE
            ))?
            .query_row([transaction_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(row.and_then(|(state, hash)| State::from_code(state).map(|s| (s, hash))))
    }
}

impl Outbox {
    /// The kept first bytes of a rejected line (`rejected:<n>` in `list`), if it exists.
    pub fn rejected_head(&self, id: &str) -> Result<Option<String>, OutboxError> {
        let Some(n) = id
            .strip_prefix(super::queue::REJECTED_PREFIX)
            .and_then(|n| n.parse::<i64>().ok())
        else {
            return Ok(None);
        };
        Ok(self
            .conn
            .prepare_cached("SELECT head FROM rejected WHERE id = ?1")?
            .query_row([n], |r| r.get(0))
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::outbox::{IngestItem, Source};
    use crate::ship::resolve::{EventSpec, prepare};
    use crate::spend::SpendRecord;

    #[test]
    fn absent_outbox_is_none_and_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Outbox::open_read_only_in(dir.path()).unwrap().is_none());
        assert!(!dir.path().join(DB_FILE).exists());
    }

    #[test]
    fn reads_what_the_writer_committed_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let record = SpendRecord::parse_line(
            br#"{"schema":1,"transaction_id":"tx-1","end_time":"2026-11-27T10:00:00.250Z","model":"m","input_tokens":1,"output_tokens":2,"end_user_id":"c","status":"success"}"#,
        )
        .unwrap();
        let spec = EventSpec {
            code: "llm".into(),
            charge_by: Default::default(),
            precise_amount: None,
        };
        let prepared = prepare(&record, &spec);
        let hash = prepared.content_hash;
        {
            let mut w = Outbox::open_in(dir.path()).unwrap();
            let item = IngestItem::Record {
                prepared,
                source: Source {
                    file: "f".into(),
                    offset: 0,
                },
            };
            w.ingest(&[item], &[]).unwrap();
        }
        let before = std::fs::read(dir.path().join(DB_FILE)).unwrap();
        let r = Outbox::open_read_only_in(dir.path()).unwrap().unwrap();
        assert_eq!(r.lookup("tx-1").unwrap(), Some((State::Pending, hash)));
        assert_eq!(r.lookup("tx-2").unwrap(), None);
        assert_eq!(r.stats().unwrap().pending, 1);
        drop(r);
        assert_eq!(std::fs::read(dir.path().join(DB_FILE)).unwrap(), before);
    }
}
