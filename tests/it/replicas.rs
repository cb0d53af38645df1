//! Many proxies, one key store (docs/scaling.md), end to end with the real binary: two `tally
//! proxy` replicas on one PostgreSQL, each with its own spend log and its own `tally ship`, one
//! `tally lago-emulator`. A key made on one replica works on the other at once; LiteLLM keys
//! imported from a table created as LiteLLM's schema declares it work on both, billed to their team
//! and user; PostgreSQL restarted under load loses no request; a key deleted on one replica is
//! refused by the other within the revalidation bound; Lago holds every call exactly once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tally::lago_emulator::EmulatorConfig;
use tokio_util::sync::CancellationToken;

use crate::pg_support::{LITELLM_TABLE, Pg};
use crate::reliability::support::{EVENT_CODE, PATIENCE, tail};
use crate::support::{Later, tally_bin, wait_until};

const MASTER: &str = "sk-replicas-master-0123456789abcdef";
const LITELLM_KEY: &str = "sk-litellm-customer-key-0001";
const DB_ENV: &str = "TALLY_E2E_KEYS_DATABASE_URL";

/// One replica: its directory, config, proxy and shipper.
struct Side {
    dir: PathBuf,
    proxy: Option<Child>,
    ship: Option<Child>,
    base: String,
}

impl Side {
    fn new(root: &Path, name: &str) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = format!(
            r#"
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      mock_response: "replicated answer"
general_settings:
  master_key: {MASTER}
  database_url: os.environ/{DB_ENV}
tally_settings:
  spend_log: {log}
  state_dir: {state}
  key_revalidate_secs: 1
"#,
            log = dir.join("spend.jsonl").display(),
            state = dir.join("proxy-state").display(),
        );
        std::fs::write(dir.join("config.yaml"), yaml).unwrap();
        std::fs::write(dir.join("spend.jsonl"), b"").unwrap();
        Self {
            dir,
            proxy: None,
            ship: None,
            base: String::new(),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    fn tally(&self, db: &str, args: &[&str]) -> Command {
        let mut c = Command::new(tally_bin());
        c.args(args)
            .current_dir(&self.dir)
            .env(DB_ENV, db)
            .env_remove("DATABASE_URL")
            .env_remove("LITELLM_MASTER_KEY")
            .env_remove("TALLY_SPEND_LOG")
            .env_remove("TALLY_STATE_DIR")
            .env_remove("TALLY_CONFIG");
        c
    }

    async fn start_proxy(&mut self, db: &str) {
        let stderr = self.dir.join("proxy.stderr");
        let child = self
            .tally(
                db,
                &["proxy", "--host", "127.0.0.1", "--port", "0", "--config"],
            )
            .arg(self.config())
            .env("TALLY_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .spawn()
            .unwrap();
        self.proxy = Some(child);
        let what = Later(|| {
            format!(
                "the proxy to start; its stderr:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            )
        });
        self.base = wait_until(what, PATIENCE, async || {
            let text = std::fs::read_to_string(&stderr).unwrap_or_default();
            text.lines().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                (v["message"] == "tally proxy listening")
                    .then(|| format!("http://{}", v["address"].as_str().unwrap_or_default()))
            })
        })
        .await;
    }

    fn start_ship(&mut self, lago: &Lago) {
        let stderr = std::fs::File::create(self.dir.join("ship.stderr")).unwrap();
        let child = Command::new(tally_bin())
            .args([
                "ship",
                "--poll-interval-ms",
                "200",
                "--retry-cap-secs",
                "2",
                "--linger-ms",
                "5",
            ])
            .current_dir(&self.dir)
            .env("TALLY_STATE_DIR", self.dir.join("ship-state"))
            .env("TALLY_SPEND_LOG", self.dir.join("spend.jsonl"))
            .env("LAGO_API_BASE", &lago.base)
            .env("LAGO_API_KEY", EmulatorConfig::default().api_key)
            .env("LAGO_API_EVENT_CODE", EVENT_CODE)
            .env("LAGO_API_CHARGE_BY", "end_user_id")
            .env("RUST_LOG", "info")
            .env_remove("TALLY_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        self.ship = Some(child);
    }

    fn records(&self) -> Vec<tally::spend::SpendRecord> {
        let bytes = std::fs::read(self.dir.join("spend.jsonl")).unwrap_or_default();
        bytes
            .split(|b| *b == b'\n')
            .filter_map(|l| tally::spend::SpendRecord::parse_line(l).ok())
            .collect()
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        for child in [self.proxy.take(), self.ship.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `tally lago-emulator` as a child process on a free port.
struct Lago {
    child: Child,
    base: String,
}

impl Lago {
    fn start() -> Self {
        use std::io::BufRead;
        let mut child = Command::new(tally_bin())
            .args(["lago-emulator", "--port", "0", "--api-key"])
            .arg(EmulatorConfig::default().api_key)
            .env_remove("LAGO_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line.trim().to_owned();
        assert!(
            base.starts_with("http://127.0.0.1:"),
            "emulator printed {line:?}"
        );
        Self { child, base }
    }

    /// The transaction id of every event it stored, in arrival order.
    async fn transaction_ids(&self, http: &reqwest::Client) -> Vec<String> {
        let events: Value = http
            .get(format!("{}/_emulator/events?limit=1000000", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["transaction_id"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Lago {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One chat call with `key`; the status and the call id.
async fn chat(http: &reqwest::Client, base: &str, key: &str, user: &str) -> (u16, Option<String>) {
    let resp = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "gpt-4o", "user": user, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-litellm-call-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let _ = resp.bytes().await;
    (status, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_keys_ride_out_a_database_restart_and_bill_every_call_once() {
    let Some(pg) =
        Pg::start("two_replicas_share_keys_ride_out_a_database_restart_and_bill_every_call_once")
    else {
        return;
    };
    let db = pg.create_db("tally_keys");
    let litellm_db = pg.create_db("litellm");
    pg.psql("litellm", LITELLM_TABLE);
    let token = hex::encode(tally::proxy::keys::hash_key(LITELLM_KEY));
    pg.psql(
        "litellm",
        &format!(
            r#"INSERT INTO "LiteLLM_VerificationToken" (token, key_name, key_alias, user_id, team_id, models, metadata, spend, max_budget)
               VALUES ('{token}', 'sk-...0001', 'legacy', 'user-imported', 'team-imported', ARRAY['gpt-4o'], '{{"owner": "ops"}}', 12.5, NULL),
                      ('{expired}', 'sk-...dead', 'old', NULL, 'team-imported', ARRAY[]::text[], '{{}}', 0, NULL)"#,
            expired = hex::encode(tally::proxy::keys::hash_key("sk-expired-litellm-key")),
        ),
    );
    pg.psql(
        "litellm",
        r#"UPDATE "LiteLLM_VerificationToken" SET expires = '2001-01-01 00:00:00' WHERE key_alias = 'old'"#,
    );

    let root = tempfile::tempdir().unwrap();
    let mut a = Side::new(root.path(), "a");
    let mut b = Side::new(root.path(), "b");

    // Import LiteLLM's keys into the shared store, twice: the second run changes nothing.
    for round in 0..2 {
        let out = a
            .tally(
                &db,
                &[
                    "keys",
                    "import",
                    "--output-format",
                    "json",
                    "--litellm-database-url",
                    &litellm_db,
                    "--config",
                ],
            )
            .arg(a.config())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let imported = report["imported"].as_array().unwrap().len();
        let reasons: Vec<&str> = report["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["reason"].as_str().unwrap())
            .collect();
        if round == 0 {
            assert_eq!(imported, 1, "{report}");
            assert!(
                reasons.len() == 1 && reasons[0].contains("expired"),
                "{report}"
            );
        } else {
            assert_eq!(imported, 0, "{report}");
            assert!(reasons.iter().any(|r| r.contains("already")), "{report}");
        }
    }

    let lago = Lago::start();
    a.start_proxy(&db).await;
    b.start_proxy(&db).await;
    a.start_ship(&lago);
    b.start_ship(&lago);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut ids = Vec::new();

    // A key made on a works on b at once.
    let made: Value = http
        .post(format!("{}/key/generate", a.base))
        .bearer_auth(MASTER)
        .json(&json!({"team_id": "team-new", "user_id": "user-new", "key_alias": "fresh"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fresh = made["key"].as_str().unwrap().to_owned();
    let (status, id) = chat(&http, &b.base, &fresh, "customer-0").await;
    assert_eq!(status, 200, "a key made on a, used on b");
    ids.extend(id);

    // The imported LiteLLM key works on both.
    for side in [&a, &b] {
        let (status, id) = chat(&http, &side.base, LITELLM_KEY, "customer-1").await;
        assert_eq!(status, 200, "imported key on {}", side.base);
        ids.extend(id);
    }

    // Load on both replicas with both keys while PostgreSQL restarts: every call answered 200.
    let stop = CancellationToken::new();
    let ok = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..4usize {
        let base = if w % 2 == 0 {
            a.base.clone()
        } else {
            b.base.clone()
        };
        let key = if w < 2 {
            fresh.clone()
        } else {
            LITELLM_KEY.to_owned()
        };
        let (http, stop, ok, failed) = (http.clone(), stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                let (status, id) = chat(&http, &base, &key, &format!("customer-{}", n % 3)).await;
                match (status, id) {
                    (200, Some(id)) => ok.lock().unwrap().push(id),
                    (status, _) => failed.lock().unwrap().push(status),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.stop_server();
    // Down for several revalidation rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ready = http
        .get(format!("{}/health/readiness", b.base))
        .bearer_auth(MASTER)
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "readiness reports the database outage");
    // A key this replica never saw cannot be checked: 503, said so, not "invalid key".
    let unknown = http
        .post(format!("{}/v1/chat/completions", b.base))
        .bearer_auth("sk-never-cached-anywhere-0001")
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 503);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "key_store_unavailable", "{body}");
    pg.start_server();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let under_load = ok.lock().unwrap().clone();
    assert!(
        failed.lock().unwrap().is_empty(),
        "calls refused during the restart: {:?}",
        failed.lock().unwrap()
    );
    assert!(
        under_load.len() > 20,
        "too little load: {}",
        under_load.len()
    );
    ids.extend(under_load);

    // The pool reconnected: readiness is back, and a key deleted on a is refused by b in time.
    wait_until("b ready again", PATIENCE, async || {
        http.get(format!("{}/health/readiness", b.base))
            .bearer_auth(MASTER)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let deleted = http
        .post(format!("{}/key/delete", a.base))
        .bearer_auth(MASTER)
        .json(&json!({"keys": [fresh]}))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(
        chat(&http, &a.base, &fresh, "customer-0").await.0,
        401,
        "refused where deleted"
    );
    let mut refused_on_b = Vec::new();
    wait_until(
        "b to refuse the deleted key",
        Duration::from_secs(60),
        async || {
            let (status, id) = chat(&http, &b.base, &fresh, "customer-0").await;
            if let (200, Some(id)) = (status, id) {
                // Still within the bound: a real, billed call.
                refused_on_b.push(id);
            }
            status == 401
        },
    )
    .await;
    ids.extend(refused_on_b);

    // Billed to the imported key's team and user.
    let imported: Vec<_> = a
        .records()
        .into_iter()
        .chain(b.records())
        .filter(|r| r.key_hash.as_deref() == Some(token.as_str()))
        .collect();
    assert!(!imported.is_empty());
    assert!(
        imported
            .iter()
            .all(|r| r.team_id.as_deref() == Some("team-imported")
                && r.user_id.as_deref() == Some("user-imported"))
    );

    // Lago: every call exactly once, across both shippers.
    let last_count = std::cell::Cell::new(0);
    let what = Later(|| {
        format!(
            "Lago to hold every call: it has {} of {} events; ship a:\n{}\nship b:\n{}",
            last_count.get(),
            ids.len(),
            tail(
                &std::fs::read_to_string(a.dir.join("ship.stderr")).unwrap_or_default(),
                20
            ),
            tail(
                &std::fs::read_to_string(b.dir.join("ship.stderr")).unwrap_or_default(),
                20
            ),
        )
    });
    let stored = wait_until(what, PATIENCE, async || {
        let stored = lago.transaction_ids(&http).await;
        last_count.set(stored.len());
        (stored.len() >= ids.len()).then_some(stored)
    })
    .await;
    let mut counts = BTreeMap::new();
    for id in stored {
        *counts.entry(id).or_insert(0usize) += 1;
    }
    assert!(counts.values().all(|n| *n == 1), "billed twice");
    let mut want = ids.clone();
    want.sort();
    let got: Vec<String> = counts.into_keys().collect();
    assert_eq!(got, want, "Lago holds exactly the calls answered 200");
}
