//! The services as systemd runs them: the real `tally` binary with `NOTIFY_SOCKET` pointing at a
//! datagram socket the test binds, and `WATCHDOG_USEC` set. Checks readiness, watchdog pings and
//! the stop notice, and scrapes both metrics endpoints after real traffic.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::UnixDatagram;

use crate::support::{Later, SpendLine, tally_bin, wait_until};

/// Long enough for a loaded 2-core machine; tests only wait as long as a condition takes.
const PATIENCE: Duration = Duration::from_secs(60);
/// 200 ms: pings every 100 ms, so a test sees them quickly.
const WATCHDOG_USEC: &str = "200000";
const MASTER_KEY: &str = "sk-0123456789abcdef0123456789abcdef0123456789abcdef";

/// The service manager's side of sd_notify: a datagram socket, read continuously (as systemd
/// does, so a sender never waits on a full queue), and every line received, in order.
struct NotifySocket {
    path: std::path::PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let reader = tokio::spawn({
            let seen = seen.clone();
            async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = socket.recv(&mut buf).await {
                    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                    seen.lock()
                        .unwrap()
                        .extend(message.lines().map(str::to_owned));
                }
            }
        });
        Self { path, seen, reader }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until a line starting with `prefix` has arrived; returns it. (A failed wait drops
    /// the test's [`Service`], which kills the child.)
    async fn wait_line(&self, prefix: &str) -> String {
        let what = Later(|| format!("{prefix}; received: {:?}", self.seen()));
        wait_until(what, PATIENCE, async || {
            self.seen().into_iter().find(|l| l.starts_with(prefix))
        })
        .await
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A `tally` child process, killed if the test fails before stopping it.
struct Service {
    child: Child,
}

impl Service {
    fn start(args: &[&str], dir: &Path, notify: &NotifySocket, env: &[(&str, String)]) -> Self {
        let mut command = Command::new(tally_bin());
        command
            .args(args)
            .current_dir(dir)
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", WATCHDOG_USEC)
            .env_remove("WATCHDOG_PID")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for var in [
            "TALLY_SPEND_LOG",
            "TALLY_STATE_DIR",
            "TALLY_METRICS_ADDR",
            "TALLY_PORT",
            "TALLY_HOST",
            "LAGO_API_BASE",
            "LAGO_API_KEY",
            "LAGO_API_EVENT_CODE",
            "LAGO_API_CHARGE_BY",
            "LITELLM_MASTER_KEY",
        ] {
            command.env_remove(var);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        Self {
            child: command.spawn().unwrap(),
        }
    }

    /// SIGTERM, as `systemctl stop` sends; waits for the exit.
    async fn stop(mut self, notify: &NotifySocket) -> ExitStatus {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        notify.wait_line("STOPPING=1").await;
        wait_until("the exit after SIGTERM", PATIENCE, async || {
            self.child.try_wait().unwrap()
        })
        .await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sample (`name{labels sorted}`) → value, from a text exposition.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let key = match series.split_once('{') {
            None => series.to_owned(),
            Some((name, labels)) => {
                // Label values here never contain `,` or `"`.
                let mut pairs: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                pairs.sort_unstable();
                format!("{name}{{{}}}", pairs.join(","))
            }
        };
        samples.insert(key, value.parse::<f64>().unwrap());
    }
    samples
}

async fn scrape(url: &str, bearer: Option<&str>) -> (u16, BTreeMap<String, f64>) {
    let mut request = reqwest::Client::new()
        .get(url)
        .timeout(PATIENCE)
        .header("accept", "application/openmetrics-text; version=1.0.0");
    if let Some(key) = bearer {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    if status != 200 {
        return (status, BTreeMap::new());
    }
    assert!(body.ends_with("# EOF\n"), "not OpenMetrics: {body}");
    (status, parse_exposition(&body))
}

/// Scrapes until `key` has `want` (counters of a request are recorded once its response is
/// fully sent, which can be a moment after the client has read it).
async fn scrape_until(
    url: &str,
    bearer: Option<&str>,
    key: &str,
    want: f64,
) -> BTreeMap<String, f64> {
    scrape_until_all(url, bearer, &[(key, want)]).await
}

/// Scrapes until every `(key, value)` holds in the same scrape.
async fn scrape_until_all(
    url: &str,
    bearer: Option<&str>,
    wanted: &[(&str, f64)],
) -> BTreeMap<String, f64> {
    let last = std::cell::RefCell::new(BTreeMap::new());
    let what = Later(|| format!("all of {wanted:?}; last scrape: {:#?}", last.borrow()));
    wait_until(what, PATIENCE, async || {
        let (status, samples) = scrape(url, bearer).await;
        assert_eq!(status, 200);
        if wanted.iter().all(|(k, v)| samples.get(*k) == Some(v)) {
            return Some(samples);
        }
        *last.borrow_mut() = samples;
        None
    })
    .await
}

fn get(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no series {key} in {samples:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_is_ready_pings_the_watchdog_and_counts_requests() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "model_list:\n  - model_name: gpt-4o\n    litellm_params:\n      model: openai/gpt-4o\n      \
         mock_response: \"Hello from the mock\"\ngeneral_settings:\n  master_key: os.environ/LITELLM_MASTER_KEY\n",
    )
    .unwrap();
    let notify = NotifySocket::bind(dir.path());
    let dir_s = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    let proxy = Service::start(
        &[
            "proxy",
            "--config",
            config.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        dir.path(),
        &notify,
        &[
            ("LITELLM_MASTER_KEY", MASTER_KEY.to_owned()),
            ("TALLY_SPEND_LOG", dir_s("spend.jsonl")),
            ("TALLY_STATE_DIR", dir_s("state")),
        ],
    );

    // STATUS names the bound address and comes before READY; then the watchdog pings.
    let status = notify.wait_line("STATUS=listening on ").await;
    let addr = status.trim_start_matches("STATUS=listening on ").to_owned();
    notify.wait_line("READY=1").await;
    notify.wait_line("WATCHDOG=1").await;
    let seen = notify.seen();
    let position = |line: &str| seen.iter().position(|l| l == line).unwrap();
    assert!(position("READY=1") < position("WATCHDOG=1"), "{seen:?}");
    let base = format!("http://{addr}");

    let http = reqwest::Client::new();
    let key: Value = http
        .post(format!("{base}/key/generate"))
        .bearer_auth(MASTER_KEY)
        .json(&json!({"key_alias": "ci-key", "team_id": "team-a", "user_id": "alice"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = key["key"].as_str().unwrap().to_owned();

    let sent = 3;
    let (mut input, mut output, mut cost) = (0.0, 0.0, 0.0);
    for i in 0..sent {
        let response = http
            .post(format!("{base}/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "gpt-4o", "user": "customer-1",
                          "messages": [{"role": "user", "content": format!("hello {i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        cost += response
            .headers()
            .get("x-litellm-response-cost")
            .map_or(0.0, |v| v.to_str().unwrap().parse::<f64>().unwrap());
        let body: Value = response.json().await.unwrap();
        input += body["usage"]["prompt_tokens"].as_f64().unwrap();
        output += body["usage"]["completion_tokens"].as_f64().unwrap();
    }
    let refused = http
        .post(format!("{base}/chat/completions"))
        .bearer_auth("sk-not-a-key")
        .json(&json!({"model": "gpt-4o", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // /metrics is for the master key only.
    let metrics_url = format!("{base}/metrics");
    assert_eq!(scrape(&metrics_url, None).await.0, 401);
    assert_eq!(scrape(&metrics_url, Some(&key)).await.0, 403);
    let ok = r#"tally_proxy_requests_total{key_alias="ci-key",model="gpt-4o",status="200",team="team-a"}"#;
    scrape_until(&metrics_url, Some(MASTER_KEY), ok, f64::from(sent)).await;
    let m = scrape_until(
        &metrics_url,
        Some(MASTER_KEY),
        r#"tally_proxy_requests_total{key_alias="none",model="none",status="401",team="none"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        get(
            &m,
            r#"tally_proxy_request_duration_seconds_count{model="gpt-4o"}"#
        ),
        f64::from(sent)
    );
    assert_eq!(
        get(
            &m,
            r#"tally_proxy_tokens_total{direction="input",model="gpt-4o"}"#
        ),
        input
    );
    assert_eq!(
        get(
            &m,
            r#"tally_proxy_tokens_total{direction="output",model="gpt-4o"}"#
        ),
        output
    );
    assert_eq!(
        get(&m, r#"tally_proxy_spend_records_total{outcome="written"}"#),
        f64::from(sent)
    );
    // gpt-4o is in the built-in price table.
    assert!(cost > 0.0, "no x-litellm-response-cost");
    let counted = get(&m, r#"tally_proxy_cost_usd_total{model="gpt-4o"}"#);
    assert!((counted - cost).abs() < 1e-9, "cost {counted} != {cost}");
    assert_eq!(get(&m, "tally_proxy_requests_in_flight"), 0.0);

    let exit = proxy.stop(&notify).await;
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipper_is_ready_pings_the_watchdog_and_counts_deliveries() {
    let lago = tally::lago_emulator::spawn(
        tally::lago_emulator::EmulatorConfig::default(),
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spend_log = dir.path().join("spend.jsonl");
    let records = 7;
    let mut lines = String::new();
    for i in 0..records {
        let line = SpendLine::new(format!("0193a0c0-0000-7000-8000-{i:012}"))
            .end_user(format!("customer-{}", i % 2))
            .to_line();
        lines.push_str(&line);
    }
    lines.push_str("this is not a spend record\n");
    std::fs::write(&spend_log, lines).unwrap();

    let notify = NotifySocket::bind(dir.path());
    let ship = Service::start(
        &["ship"],
        dir.path(),
        &notify,
        &[
            ("TALLY_SPEND_LOG", spend_log.to_string_lossy().into_owned()),
            (
                "TALLY_STATE_DIR",
                dir.path().join("state").to_string_lossy().into_owned(),
            ),
            ("TALLY_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("LAGO_API_BASE", lago.base_url()),
            ("LAGO_API_KEY", "lago-emulator-key".to_owned()),
            ("LAGO_API_EVENT_CODE", "llm_usage".to_owned()),
        ],
    );

    let status = notify.wait_line("STATUS=").await;
    let addr = status
        .rsplit_once("metrics on ")
        .map(|(_, a)| a.to_owned())
        .unwrap_or_else(|| panic!("no metrics address in {status}"));
    notify.wait_line("READY=1").await;
    notify.wait_line("WATCHDOG=1").await;

    let url = format!("http://{addr}/metrics");
    let acked = r#"tally_ship_events_total{outcome="acked"}"#;
    let m = scrape_until(&url, None, acked, f64::from(records)).await;
    assert_eq!(lago.event_count(), records as usize);
    assert_eq!(
        get(&m, "tally_ship_lines_read_total"),
        f64::from(records + 1)
    );
    assert_eq!(
        get(&m, r#"tally_ship_lines_rejected_total{reason="invalid"}"#),
        1.0
    );
    let accepted = get(&m, r#"tally_ship_lago_requests_total{outcome="accepted"}"#);
    assert!(accepted >= 1.0);
    assert_eq!(
        get(&m, "tally_ship_lago_request_duration_seconds_count"),
        accepted,
        "every request was accepted: {m:#?}"
    );
    assert_eq!(get(&m, "tally_ship_lago_unauthorized"), 0.0);
    // The queue gauges are refreshed periodically: wait for the state after delivery (nothing
    // pending, the malformed line kept as rejected).
    let m = scrape_until_all(
        &url,
        None,
        &[
            (r#"tally_ship_queue_events{state="pending"}"#, 0.0),
            (r#"tally_ship_queue_events{state="rejected"}"#, 1.0),
        ],
    )
    .await;
    assert_eq!(get(&m, r#"tally_ship_queue_events{state="dead"}"#), 0.0);
    assert_eq!(get(&m, "tally_ship_oldest_pending_age_seconds"), 0.0);

    let exit = ship.stop(&notify).await;
    assert!(exit.success(), "{exit:?}");
    lago.shutdown().await;
}
