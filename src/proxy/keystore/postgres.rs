//! Keys in PostgreSQL (`general_settings.database_url` / `DATABASE_URL`): one store every replica
//! shares. A deadpool pool of tokio-postgres connections, TLS through rustls; a connection the
//! server dropped (restart, failover) is discarded and replaced on next use.
//!
//! tally's tables are its own (`tally_keys`, `tally_schema_migrations`), so it can share a
//! database with LiteLLM's. Migrations run at start under a transaction-scoped advisory lock, so
//! replicas starting together apply each step exactly once.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::future::BoxFuture;
use tokio_postgres::config::SslMode;

use super::{Backend, KeyStoreError, ListFilter, Page, QUERY_TIMEOUT, StoreResult};
use crate::proxy::keys::{KeyHash, KeyRecord};

/// Connections per replica: the request path never queries, so few are needed (misses,
/// revalidation, the key routes).
const POOL_SIZE: usize = 8;
/// `pg_advisory_xact_lock` id for migrations ("tally" in ASCII).
const MIGRATION_LOCK: i64 = 0x74_61_6c_6c_79;

/// Versioned schema: step N is applied once and recorded as version N.
const MIGRATIONS: &[&str] = &["CREATE TABLE IF NOT EXISTS tally_keys (
        token      TEXT PRIMARY KEY,
        key_name   TEXT NOT NULL,
        key_alias  TEXT,
        user_id    TEXT,
        team_id    TEXT,
        models     TEXT NOT NULL,
        metadata   TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        expires_at TIMESTAMPTZ,
        blocked    BOOLEAN NOT NULL DEFAULT FALSE,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS tally_keys_created_at ON tally_keys (created_at DESC, token);"];

const COLUMNS: &str = "token, key_name, key_alias, user_id, team_id, models, metadata, created_at, expires_at, blocked";

pub struct PgStore {
    pool: Pool,
    describe: String,
}

/// How the server's certificate is checked, from libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TlsCheck {
    /// `disable`, `allow`, `prefer` (default), `require`: encrypted when the server offers or
    /// requires it, certificate not checked (libpq's meaning of these modes).
    Unverified,
    /// `verify-ca`, `verify-full`: the certificate chain and host name are checked against the
    /// platform's roots (verify-ca is held to verify-full's stricter standard).
    Verified,
}

/// Parses a `postgres://` URL into tokio-postgres's config, mapping libpq `sslmode` values it
/// does not know (`verify-ca`, `verify-full`, `allow`) onto what it does.
pub fn parse_url(url: &str) -> StoreResult<(tokio_postgres::Config, TlsCheck)> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut check = TlsCheck::Unverified;
    let mut mode = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", value)) => {
                mode = Some(match value {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" | "verify-full" => {
                        check = TlsCheck::Verified;
                        SslMode::Require
                    }
                    other => {
                        return Err(KeyStoreError::BadUrl(format!(
                            "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                        )));
                    }
                });
            }
            _ => kept.push(pair),
        }
    }
    let rebuilt = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    // The parse error can quote the URL; never echo it (it may hold the password).
    let mut config = tokio_postgres::Config::from_str(&rebuilt)
        .map_err(|e| KeyStoreError::BadUrl(redact_error(&e.to_string(), url)))?;
    if let Some(mode) = mode {
        config.ssl_mode(mode);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_application_name().is_none() {
        config.application_name("tally");
    }
    Ok((config, check))
}

/// An error with its causes (`…: error performing TLS handshake: invalid peer certificate: …`),
/// so the operator sees the reason, not only the outermost layer.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

fn redact_error(message: &str, url: &str) -> String {
    message.replace(url, "<database_url>")
}

/// `postgresql://host:port/db`, without user or password.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_default();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{host}:{port}/{}",
        config.get_dbname().unwrap_or_default()
    )
}

pub fn tls(check: TlsCheck) -> StoreResult<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| KeyStoreError::BadUrl(format!("TLS set-up: {e}")))?;
    let config = match check {
        TlsCheck::Verified => builder
            .with_platform_verifier()
            .map_err(|e| KeyStoreError::BadUrl(format!("TLS set-up: {e}")))?
            .with_no_client_auth(),
        TlsCheck::Unverified => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(provider)))
            .with_no_client_auth(),
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// libpq's `sslmode=require`: encrypt, but accept any certificate (signatures still checked, so
/// the handshake is sound; only the identity is not).
#[derive(Debug)]
struct NoCertificateCheck(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl PgStore {
    /// Builds the pool, connects once and applies the migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let (config, check) = parse_url(url)?;
        let describe = describe(&config);
        let manager = Manager::from_config(
            config,
            tls(check)?,
            ManagerConfig {
                // Fast: a connection whose socket closed is dropped, a live one reused without
                // a round trip.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(QUERY_TIMEOUT))
            .create_timeout(Some(QUERY_TIMEOUT))
            .recycle_timeout(Some(QUERY_TIMEOUT))
            .build()
            .map_err(|e| KeyStoreError::BadUrl(e.to_string()))?;
        let store = Self { pool, describe };
        store.migrate().await?;
        Ok(store)
    }

    /// Exposed for the import command, which reads LiteLLM's table on another URL.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn unavailable(&self, message: impl std::fmt::Display) -> KeyStoreError {
        KeyStoreError::Unavailable {
            store: self.describe.clone(),
            message: message.to_string(),
        }
    }

    fn db_error(&self, e: tokio_postgres::Error) -> KeyStoreError {
        // A closed connection or an I/O failure is the database being away; a SQL error is not.
        if e.is_closed() || e.as_db_error().is_none() {
            self.unavailable(chain(&e))
        } else {
            KeyStoreError::Database {
                store: self.describe.clone(),
                message: e.to_string(),
            }
        }
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| self.unavailable(chain(&e)))
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.db_error(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| self.db_error(e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS tally_schema_migrations (
                version    INTEGER PRIMARY KEY,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(|e| self.db_error(e))?;
        let row = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM tally_schema_migrations",
                &[],
            )
            .await
            .map_err(|e| self.db_error(e))?;
        let applied: i32 = row.get(0);
        for (i, step) in MIGRATIONS.iter().enumerate() {
            let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
            if version <= applied {
                continue;
            }
            tx.batch_execute(step).await.map_err(|e| self.db_error(e))?;
            tx.execute(
                "INSERT INTO tally_schema_migrations (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(|e| self.db_error(e))?;
        }
        tx.commit().await.map_err(|e| self.db_error(e))
    }

    /// Runs `f` with a pooled client under [`QUERY_TIMEOUT`].
    async fn with<T>(
        &self,
        f: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, tokio_postgres::Error>,
    ) -> StoreResult<T> {
        let work = async {
            let mut client = self.client().await?;
            f(&mut client).await.map_err(|e| self.db_error(e))
        };
        tokio::time::timeout(QUERY_TIMEOUT, work)
            .await
            .map_err(|_| self.unavailable(format!("no answer within {QUERY_TIMEOUT:?}")))?
    }
}

type Params<'a> = [&'a (dyn tokio_postgres::types::ToSql + Sync); 10];

struct Row {
    token: String,
    models: String,
    metadata: String,
}

fn row_values(r: &KeyRecord) -> Row {
    Row {
        token: r.token(),
        models: serde_json::Value::from(r.models.clone()).to_string(),
        metadata: serde_json::Value::Object(r.metadata.clone()).to_string(),
    }
}

fn params<'a>(r: &'a KeyRecord, v: &'a Row) -> Params<'a> {
    [
        &v.token,
        &r.key_name,
        &r.key_alias,
        &r.user_id,
        &r.team_id,
        &v.models,
        &v.metadata,
        &r.created_at,
        &r.expires,
        &r.blocked,
    ]
}

const INSERT: &str = "INSERT INTO tally_keys (token, key_name, key_alias, user_id, team_id, models, metadata, created_at, expires_at, blocked)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (token) DO NOTHING";

fn to_record(row: &tokio_postgres::Row) -> Result<KeyRecord, String> {
    let token: String = row.get(0);
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&token, &mut hash).map_err(|e| format!("token {token:?}: {e}"))?;
    let models: String = row.get(5);
    let metadata: String = row.get(6);
    Ok(KeyRecord {
        hash,
        key_name: row.get(1),
        key_alias: row.get(2),
        user_id: row.get(3),
        team_id: row.get(4),
        models: serde_json::from_str(&models).map_err(|e| format!("models of {token}: {e}"))?,
        metadata: serde_json::from_str(&metadata)
            .map_err(|e| format!("metadata of {token}: {e}"))?,
        created_at: row.get::<_, DateTime<Utc>>(7),
        expires: row.get::<_, Option<DateTime<Utc>>>(8),
        blocked: row.get(9),
    })
}

impl PgStore {
    fn records(&self, rows: Vec<tokio_postgres::Row>) -> StoreResult<Vec<KeyRecord>> {
        rows.iter()
            .map(|r| {
                to_record(r).map_err(|message| KeyStoreError::Database {
                    store: self.describe.clone(),
                    message,
                })
            })
            .collect()
    }
}

impl Backend for PgStore {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn get(&self, hash: KeyHash) -> BoxFuture<'_, StoreResult<Option<KeyRecord>>> {
        Box::pin(async move {
            let token = hex::encode(hash);
            let rows = self
                .with(async |c| {
                    c.query(
                        &format!("SELECT {COLUMNS} FROM tally_keys WHERE token = $1"),
                        &[&token],
                    )
                    .await
                })
                .await?;
            Ok(self.records(rows)?.pop())
        })
    }

    fn get_many(&self, hashes: Vec<KeyHash>) -> BoxFuture<'_, StoreResult<Vec<KeyRecord>>> {
        Box::pin(async move {
            let tokens: Vec<String> = hashes.iter().map(hex::encode).collect();
            let rows = self
                .with(async |c| {
                    c.query(
                        &format!("SELECT {COLUMNS} FROM tally_keys WHERE token = ANY($1)"),
                        &[&tokens],
                    )
                    .await
                })
                .await?;
            self.records(rows)
        })
    }

    fn insert(&self, record: KeyRecord) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async move {
            let v = row_values(&record);
            let n = self
                .with(async |c| c.execute(INSERT, &params(&record, &v)).await)
                .await?;
            if n == 0 {
                Err(KeyStoreError::Exists)
            } else {
                Ok(())
            }
        })
    }

    fn update(&self, record: KeyRecord) -> BoxFuture<'_, StoreResult<bool>> {
        Box::pin(async move {
            let v = row_values(&record);
            let n = self
                .with(async |c| {
                    c.execute(
                        "UPDATE tally_keys SET key_name = $2, key_alias = $3, user_id = $4, team_id = $5,
                         models = $6, metadata = $7, created_at = $8, expires_at = $9, blocked = $10,
                         updated_at = now() WHERE token = $1",
                        &params(&record, &v),
                    )
                    .await
                })
                .await?;
            Ok(n > 0)
        })
    }

    fn replace(&self, old: KeyHash, new: KeyRecord) -> BoxFuture<'_, StoreResult<bool>> {
        Box::pin(async move {
            let v = row_values(&new);
            let old = hex::encode(old);
            self.with(async |c| {
                let tx = c.transaction().await?;
                let n = tx
                    .execute("DELETE FROM tally_keys WHERE token = $1", &[&old])
                    .await?;
                if n == 0 || tx.execute(INSERT, &params(&new, &v)).await? == 0 {
                    return Ok(false);
                }
                tx.commit().await?;
                Ok(true)
            })
            .await
        })
    }

    fn delete(&self, hashes: Vec<KeyHash>) -> BoxFuture<'_, StoreResult<Vec<KeyHash>>> {
        Box::pin(async move {
            let tokens: Vec<String> = hashes.iter().map(hex::encode).collect();
            let rows = self
                .with(async |c| {
                    c.query(
                        "DELETE FROM tally_keys WHERE token = ANY($1) RETURNING token",
                        &[&tokens],
                    )
                    .await
                })
                .await?;
            let gone: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            Ok(hashes
                .into_iter()
                .filter(|h| gone.contains(&hex::encode(h)))
                .collect())
        })
    }

    fn list(
        &self,
        filter: ListFilter,
        offset: u64,
        limit: u64,
    ) -> BoxFuture<'_, StoreResult<Page>> {
        Box::pin(async move {
            let cond = "($1::text IS NULL OR user_id = $1) AND ($2::text IS NULL OR team_id = $2) AND ($3::text IS NULL OR key_alias = $3)";
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let offset = i64::try_from(offset).unwrap_or(i64::MAX);
            let (total, rows) = self
                .with(async |c| {
                    let total: i64 = c
                        .query_one(
                            &format!("SELECT COUNT(*) FROM tally_keys WHERE {cond}"),
                            &[&filter.user_id, &filter.team_id, &filter.key_alias],
                        )
                        .await?
                        .get(0);
                    let rows = c
                        .query(
                            &format!(
                                "SELECT {COLUMNS} FROM tally_keys WHERE {cond} ORDER BY created_at DESC, token LIMIT $4 OFFSET $5"
                            ),
                            &[
                                &filter.user_id,
                                &filter.team_id,
                                &filter.key_alias,
                                &limit,
                                &offset,
                            ],
                        )
                        .await?;
                    Ok((total, rows))
                })
                .await?;
            Ok(Page {
                keys: self.records(rows)?,
                total: u64::try_from(total).unwrap_or(0),
            })
        })
    }

    fn ping(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async move {
            self.with(async |c| c.simple_query("SELECT 1").await.map(|_| ()))
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_ssl_modes_map_onto_checks() {
        let (c, check) = parse_url("postgresql://u:p@db:6543/keys?sslmode=verify-full").unwrap();
        assert_eq!(check, TlsCheck::Verified);
        assert_eq!(c.get_ssl_mode(), SslMode::Require);
        assert_eq!(describe(&c), "postgresql://db:6543/keys");
        let (c, check) = parse_url("postgres://u@db/keys?sslmode=require").unwrap();
        assert_eq!(
            (check, c.get_ssl_mode()),
            (TlsCheck::Unverified, SslMode::Require)
        );
        let (c, _) = parse_url("postgres://u@db/keys?sslmode=disable").unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Disable);
        let e = parse_url("postgres://u:secretpw@db/keys?sslmode=bogus")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("sslmode=bogus") && !e.contains("secretpw"),
            "{e}"
        );
    }
}
