//! The key store's contract, run against both stores (SQLite in a temp dir, PostgreSQL in a
//! throwaway cluster): what is stored comes back, two caches on one database see each other's
//! keys at once and each other's deletions after one revalidation, and (PostgreSQL) an outage is
//! ridden out within the grace and recovered from without a restart.

use std::sync::Arc;
use std::time::Duration;

use tally::proxy::keys::{NewKey, hash_key};
use tally::proxy::keystore::{
    Backend, CacheSettings, KeyStore, KeyStoreError, ListFilter, open_backend,
};

use crate::pg_support::Pg;

const SETTINGS: CacheSettings = CacheSettings {
    revalidate: Duration::from_secs(3600),
    outage_grace: Duration::from_secs(3600),
};

/// Two independently opened stores on one database (as two replicas have).
async fn pair(url: Option<&str>, dir: &std::path::Path) -> (KeyStore, KeyStore) {
    let a = open_backend(url, dir).await.unwrap();
    let b = open_backend(url, dir).await.unwrap();
    (KeyStore::new(a, SETTINGS), KeyStore::new(b, SETTINGS))
}

async fn contract(url: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(url, dir.path()).await;

    // Stored and read back exactly, by either replica.
    let (key, record) = a
        .generate(NewKey {
            key_alias: Some("alias".into()),
            team_id: Some("team".into()),
            user_id: Some("user".into()),
            models: vec!["gpt-4o".into()],
            metadata: serde_json::json!({"m": [1, "x"]})
                .as_object()
                .cloned()
                .unwrap(),
            expires: Some(chrono::Utc::now() + chrono::Duration::days(1)),
            ..NewKey::default()
        })
        .await
        .unwrap();
    let seen = b
        .find(&hash_key(&key))
        .await
        .unwrap()
        .expect("made on a, found on b");
    assert_eq!(*seen, *record);

    // A chosen key, and the conflict when it is taken.
    let chosen = "sk-chosen-by-the-caller-1";
    a.generate(NewKey {
        key: Some(chosen.into()),
        ..NewKey::default()
    })
    .await
    .unwrap();
    let again = b
        .generate(NewKey {
            key: Some(chosen.into()),
            ..NewKey::default()
        })
        .await;
    assert!(matches!(again, Err(KeyStoreError::Exists)), "{again:?}");

    // Blocked on a: b refuses after one revalidation (it still has the old record cached).
    let mut blocked = (*record).clone();
    blocked.blocked = true;
    assert!(a.update(blocked).await.unwrap());
    assert!(!b.find(&record.hash).await.unwrap().unwrap().blocked);
    b.revalidate().await.unwrap();
    assert!(b.find(&record.hash).await.unwrap().unwrap().blocked);

    // Listing: newest first, paginated, filtered.
    let page = a.list(ListFilter::default(), 0, 1).await.unwrap();
    assert_eq!((page.total, page.keys.len()), (2, 1));
    let team = a
        .list(
            ListFilter {
                team_id: Some("team".into()),
                ..ListFilter::default()
            },
            0,
            10,
        )
        .await
        .unwrap();
    assert_eq!(team.keys.len(), 1);
    assert_eq!(team.keys[0].hash, record.hash);

    // Regenerated on a: the old key gone, the new one with the same settings.
    let mut fresh = (*record).clone();
    fresh.hash = hash_key("sk-the-regenerated-key");
    assert!(a.replace(record.hash, fresh.clone()).await.unwrap());
    assert!(!a.replace(record.hash, fresh.clone()).await.unwrap());
    let got = b.find(&fresh.hash).await.unwrap().unwrap();
    assert_eq!(got.team_id.as_deref(), Some("team"));

    // Deleted on a: b still has it cached until it revalidates, then refuses.
    let chosen_hash = hash_key(chosen);
    assert!(b.find(&chosen_hash).await.unwrap().is_some());
    assert_eq!(a.delete(&[chosen_hash]).await.unwrap(), vec![chosen_hash]);
    assert!(a.find(&chosen_hash).await.unwrap().is_none());
    assert!(
        b.find(&chosen_hash).await.unwrap().is_some(),
        "cached until revalidated"
    );
    b.revalidate().await.unwrap();
    assert!(b.find(&chosen_hash).await.unwrap().is_none());
    assert!(a.delete(&[chosen_hash]).await.unwrap().is_empty());
    assert!(a.ping().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_keeps_the_contract() {
    contract(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_the_contract() {
    let Some(pg) = Pg::start("postgres_store_keeps_the_contract") else {
        return;
    };
    let url = pg.create_db("contract");
    contract(Some(&url)).await;
    // tally's tables and its migration record.
    assert_eq!(
        pg.psql(
            "contract",
            "SELECT string_agg(version::text, ',') FROM tally_schema_migrations"
        ),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once() {
    let Some(pg) = Pg::start("replicas_starting_together_migrate_once") else {
        return;
    };
    let url = pg.create_db("race");
    let dir = tempfile::tempdir().unwrap();
    let opens = (0..6).map(|_| {
        let url = url.clone();
        let dir = dir.path().to_owned();
        tokio::spawn(async move { open_backend(Some(&url), &dir).await.map(|_| ()) })
    });
    for open in futures::future::join_all(opens).await {
        open.unwrap().unwrap();
    }
    assert_eq!(
        pg.psql("race", "SELECT count(*) FROM tally_schema_migrations"),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_ridden_out_then_recovered_from() {
    let Some(pg) = Pg::start("a_database_outage_is_ridden_out_then_recovered_from") else {
        return;
    };
    let url = pg.create_db("outage");
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = open_backend(Some(&url), dir.path()).await.unwrap();
    let store = KeyStore::new(
        backend,
        CacheSettings {
            revalidate: Duration::from_secs(3600),
            outage_grace: Duration::from_millis(1),
        },
    );
    let (key, _) = store.generate(NewKey::default()).await.unwrap();
    let hash = hash_key(&key);

    pg.stop_server();
    // Cached: still served (the first revalidation failing starts the outage clock).
    assert!(store.find(&hash).await.unwrap().is_some());
    assert!(!store.ping().await);
    assert!(!store.is_reachable());
    // Unknown: cannot be checked, said so (503 at the edge), not "invalid key".
    let unknown = store.find(&hash_key("sk-never-seen")).await.unwrap_err();
    assert!(unknown.is_unavailable(), "{unknown}");
    // Past the grace: cached keys refused too.
    let _ = store.revalidate().await.unwrap_err();
    std::thread::sleep(Duration::from_millis(5));
    let _ = store.revalidate().await.unwrap_err();
    assert!(!store.is_usable());
    let refused = store.find(&hash).await.unwrap_err();
    assert!(
        refused.is_unavailable() && refused.to_string().contains("outage grace"),
        "{refused}"
    );

    // Back: the pool reconnects by itself; the next revalidation trusts the cache again.
    pg.start_server();
    crate::support::wait_until(
        "the store to reconnect",
        Duration::from_secs(60),
        async || store.revalidate().await.is_ok(),
    )
    .await;
    assert!(store.is_usable() && store.is_reachable());
    assert!(store.find(&hash).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_is_honoured() {
    let Some(pg) = Pg::start("sslmode_is_honoured") else {
        return;
    };
    pg.create_db("tls");
    pg.require_tls();
    let dir = tempfile::tempdir().unwrap();
    let url = |mode: &str| {
        format!(
            "postgresql://postgres@localhost:{}/tls?sslmode={mode}",
            pg.port
        )
    };
    // The server refuses plain connections: disable cannot connect; require encrypts.
    let plain = open_backend(Some(&url("disable")), dir.path()).await;
    assert!(plain.is_err(), "a plain connection was accepted");
    let store = open_backend(Some(&url("require")), dir.path())
        .await
        .unwrap();
    store.ping().await.unwrap();
    // verify-full checks the certificate: a self-signed one is refused, saying why.
    let err = open_backend(Some(&url("verify-full")), dir.path())
        .await
        .err()
        .expect("a self-signed certificate passed verify-full")
        .to_string();
    assert!(
        err.contains("TLS handshake") && err.contains("certificate"),
        "{err}"
    );
}
