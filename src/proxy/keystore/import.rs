//! Bringing LiteLLM's keys along: rows of its `"LiteLLM_VerificationToken"` table (read from its
//! PostgreSQL, or from a JSON-lines export) become tally key records. LiteLLM's `token` is the
//! SHA-256 hex of the key, which is what tally stores, so the `sk-` keys customers hold keep
//! working unchanged. Idempotent: a token already in tally's store is skipped, not overwritten.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use super::{KeyStore, KeyStoreError};
use crate::proxy::keys::{KeyRecord, hash_key, to_millis};
use crate::proxy::limits;

/// One LiteLLM row, the columns tally keeps.
#[derive(Debug, Clone, Default)]
pub struct LitellmRow {
    pub token: String,
    pub key_name: Option<String>,
    pub key_alias: Option<String>,
    pub user_id: Option<String>,
    pub team_id: Option<String>,
    pub models: Vec<String>,
    pub expires: Option<DateTime<Utc>>,
    pub blocked: Option<bool>,
    pub metadata: Map<String, Value>,
}

/// What an import did, key by key (tokens are hashes, safe to print).
#[derive(Debug, Default, serde::Serialize)]
pub struct ImportReport {
    pub imported: Vec<String>,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, serde::Serialize)]
pub struct Skipped {
    /// The token, or `line N` for an export line that did not parse.
    pub token: String,
    pub reason: String,
}

/// The query over LiteLLM's table: arrays, JSON and times as text/millis, so any of its
/// schema versions reads the same.
pub const LITELLM_QUERY: &str = r#"SELECT token, key_name, key_alias, user_id, team_id,
    COALESCE(to_json(models)::text, '[]'),
    (extract(epoch FROM expires) * 1000)::bigint,
    blocked,
    COALESCE(metadata::text, '{}')
    FROM "LiteLLM_VerificationToken" ORDER BY token"#;

/// Reads every row of LiteLLM's table at `url` (same URL forms and `sslmode` as
/// `database_url`).
pub async fn read_litellm_table(
    url: &str,
) -> Result<Vec<Result<LitellmRow, Skipped>>, KeyStoreError> {
    let (config, check) = super::postgres::parse_url(url)?;
    let unavailable = |e: tokio_postgres::Error| KeyStoreError::Unavailable {
        store: "LiteLLM database".into(),
        message: super::postgres::chain(&e),
    };
    let (client, connection) = config
        .connect(super::postgres::tls(check)?)
        .await
        .map_err(unavailable)?;
    let driver = tokio::spawn(connection);
    let rows = client
        .query(LITELLM_QUERY, &[])
        .await
        .map_err(|e| KeyStoreError::Database {
            store: "LiteLLM database".into(),
            message: format!("reading \"LiteLLM_VerificationToken\": {e}"),
        })?;
    drop(client);
    let _ = driver.await;
    Ok(rows
        .iter()
        .map(|r| {
            let token: String = r.get(0);
            let parsed = (|| {
                let models: String = r.get(5);
                let metadata: String = r.get(8);
                Ok::<_, String>(LitellmRow {
                    token: token.clone(),
                    key_name: r.get(1),
                    key_alias: r.get(2),
                    user_id: r.get(3),
                    team_id: r.get(4),
                    models: serde_json::from_str::<Option<Vec<String>>>(&models)
                        .map_err(|e| format!("models: {e}"))?
                        .unwrap_or_default(),
                    expires: r
                        .get::<_, Option<i64>>(6)
                        .and_then(DateTime::from_timestamp_millis),
                    blocked: r.get(7),
                    metadata: serde_json::from_str(&metadata)
                        .map_err(|e| format!("metadata: {e}"))?,
                })
            })();
            parsed.map_err(|reason| Skipped { token, reason })
        })
        .collect())
}

/// Parses a JSON-lines export of the table (one row object per line, as `SELECT row_to_json(t)`
/// or LiteLLM's `/key/list?return_full_object=true` entries write them).
pub fn parse_export(text: &str) -> Vec<Result<LitellmRow, Skipped>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            parse_export_line(line).map_err(|reason| Skipped {
                token: format!("line {}", i + 1),
                reason,
            })
        })
        .collect()
}

fn parse_export_line(line: &str) -> Result<LitellmRow, String> {
    let Value::Object(mut row) =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?
    else {
        return Err("not a JSON object".into());
    };
    let mut text = |name: &str| match row.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("`{name}` is {other}, not a string")),
    };
    let token = text("token")?.ok_or("no `token`")?;
    let key_name = text("key_name")?;
    let key_alias = text("key_alias")?;
    let user_id = text("user_id")?;
    let team_id = text("team_id")?;
    let expires = text("expires")?.map(|s| parse_time(&s)).transpose()?;
    let models = match row.remove("models") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v).map_err(|e| format!("`models`: {e}"))?,
    };
    let blocked = match row.remove("blocked") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(b),
        Some(other) => return Err(format!("`blocked` is {other}, not true/false")),
    };
    let metadata = match row.remove("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        // psql exports of a JSONB column can carry it as a string.
        Some(Value::String(s)) => {
            serde_json::from_str(&s).map_err(|e| format!("`metadata`: {e}"))?
        }
        Some(other) => return Err(format!("`metadata` is {other}, not an object")),
    };
    Ok(LitellmRow {
        token,
        key_name,
        key_alias,
        user_id,
        team_id,
        models,
        expires,
        blocked,
        metadata,
    })
}

/// RFC 3339, or Prisma's `TIMESTAMP(3)` without a zone (UTC).
fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
                .map(|n| n.and_utc())
        })
        .map_err(|_| format!("`expires` {s:?} is not a time"))
}

/// The tally record for a LiteLLM row, or why it cannot be imported.
pub fn to_record(row: LitellmRow, now: DateTime<Utc>) -> Result<KeyRecord, String> {
    let mut hash = [0u8; 32];
    let token = row.token.trim();
    if token.len() == 64 && hex::decode_to_slice(token.to_ascii_lowercase(), &mut hash).is_ok() {
    } else if token.starts_with("sk-") {
        // Very old LiteLLM versions stored the key itself.
        hash = hash_key(token);
    } else {
        return Err("`token` is neither a SHA-256 hex digest nor an sk- key".into());
    }
    if let Some(expires) = row.expires
        && expires <= now
    {
        return Err(format!("expired at {}", crate::spend::fmt_millis(&expires)));
    }
    for (field, value) in [
        ("key_alias", &row.key_alias),
        ("user_id", &row.user_id),
        ("team_id", &row.team_id),
    ] {
        if let Some(v) = value {
            limits::require_id(field, v).map_err(|e| e.to_string())?;
        }
    }
    limits::require_models(&row.models).map_err(|e| e.to_string())?;
    limits::require_metadata(&row.metadata).map_err(|e| e.to_string())?;
    crate::proxy::end_user::validate_guard(&row.metadata).map_err(|e| e.to_string())?;
    let key_name = row
        .key_name
        .filter(|n| n.len() <= 64)
        .unwrap_or_else(|| "sk-...(imported)".into());
    Ok(KeyRecord {
        hash,
        key_name,
        key_alias: row.key_alias,
        user_id: row.user_id,
        team_id: row.team_id,
        models: row.models,
        metadata: row.metadata,
        created_at: to_millis(now),
        expires: row.expires.map(to_millis),
        blocked: row.blocked.unwrap_or(false),
    })
}

/// Imports rows into `store`; a row whose token is already there is skipped (idempotent).
pub async fn import(
    store: &KeyStore,
    rows: Vec<Result<LitellmRow, Skipped>>,
) -> Result<ImportReport, KeyStoreError> {
    let now = Utc::now();
    let mut report = ImportReport::default();
    for row in rows {
        let row = match row {
            Ok(row) => row,
            Err(skipped) => {
                report.skipped.push(skipped);
                continue;
            }
        };
        let token = row.token.clone();
        let record = match to_record(row, now) {
            Ok(r) => r,
            Err(reason) => {
                report.skipped.push(Skipped { token, reason });
                continue;
            }
        };
        let token = record.token();
        match store.insert(record).await {
            Ok(()) => report.imported.push(token),
            Err(KeyStoreError::Exists) => report.skipped.push(Skipped {
                token,
                reason: "already in tally's key store".into(),
            }),
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_lines_become_records_or_say_why_not() {
        let key = "sk-litellm-existing-0123456789";
        let token = hex::encode(hash_key(key));
        let text = format!(
            "{{\"token\":\"{token}\",\"key_alias\":\"a\",\"team_id\":\"t\",\"user_id\":\"u\",\"models\":[\"gpt-4o\"],\"expires\":\"2999-01-01T00:00:00\",\"blocked\":null,\"metadata\":\"{{\\\"x\\\":1}}\",\"spend\":3.5}}\n\
             not json\n\
             {{\"token\":\"abc\"}}\n\
             {{\"token\":\"{token}\",\"expires\":\"2001-01-01T00:00:00Z\"}}\n"
        );
        let rows = parse_export(&text);
        assert_eq!(rows.len(), 4);
        let now = Utc::now();
        let first = to_record(rows[0].as_ref().unwrap().clone(), now).unwrap();
        assert_eq!(first.hash, hash_key(key));
        assert_eq!(first.team_id.as_deref(), Some("t"));
        assert_eq!(first.models, vec!["gpt-4o".to_owned()]);
        assert_eq!(first.metadata["x"], 1);
        assert!(!first.blocked);
        assert!(rows[1].as_ref().unwrap_err().reason.contains("not JSON"));
        let e = to_record(rows[2].as_ref().unwrap().clone(), now).unwrap_err();
        assert!(e.contains("neither"), "{e}");
        let e = to_record(rows[3].as_ref().unwrap().clone(), now).unwrap_err();
        assert!(e.contains("expired"), "{e}");
    }
}
