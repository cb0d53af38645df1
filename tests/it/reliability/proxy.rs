//! Proxy crashes (docs/reliability.md): the real `tally proxy` (mock model) is SIGKILLed under
//! concurrent load, several times, and restarted on the same spend log, with a torn last line left
//! behind once (what a writer stopped mid-record leaves). Every request the client got a 200 for
//! has its record (by `x-litellm-call-id`); a shipper following the log all along keeps going,
//! bills every record exactly once and files the torn fragment as a rejected line.

use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::reliability::support::{PATIENCE, Rig, figure, full_variant, tail};
use crate::support::{Later, SplitMix, wait_until};

pub const MASTER: &str = "sk-reliability-master-0123456789abcdef";

/// Writes the proxy's config (mock model, small rotation size) into the rig's directory.
pub fn proxy_config(rig: &Rig, rotate_bytes: u64) -> std::path::PathBuf {
    let path = rig.path("config.yaml");
    let yaml = format!(
        r#"
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      mock_response: "The quick brown fox jumps over the lazy dog. Secret prompt words stay out."
general_settings:
  master_key: {MASTER}
tally_settings:
  spend_log: {log}
  state_dir: {state}
  spend_log_max_bytes: {rotate_bytes}
  max_body_bytes: 65536
"#,
        log = rig.log().display(),
        state = rig.path("proxy-state").display(),
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A running `tally proxy` child and its address.
pub struct ProxyChild {
    pub child: Option<Child>,
    pub base: String,
}

impl ProxyChild {
    /// Starts the proxy on a free port; its JSON log lines go to `stderr_file`.
    pub async fn start(
        rig: &Rig,
        config: &std::path::Path,
        stderr_file: &std::path::Path,
        rust_log: &str,
    ) -> Self {
        let before = std::fs::read_to_string(stderr_file)
            .unwrap_or_default()
            .len();
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr_file)
            .unwrap();
        let child = std::process::Command::new(crate::support::tally_bin())
            .args(["proxy", "--config"])
            .arg(config)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .current_dir(rig.dir.path())
            .env("TALLY_LOG_FORMAT", "json")
            .env("RUST_LOG", rust_log)
            .env_remove("LITELLM_MASTER_KEY")
            .env_remove("TALLY_SPEND_LOG")
            .env_remove("TALLY_STATE_DIR")
            .env_remove("TALLY_CONFIG")
            .env_remove("TALLY_PORT")
            .env_remove("TALLY_HOST")
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        let mut proxy = Self {
            child: Some(child),
            base: String::new(),
        };
        let what = Later(|| {
            format!(
                "the proxy to start; its stderr:\n{}",
                std::fs::read_to_string(stderr_file).unwrap_or_default()
            )
        });
        proxy.base = wait_until(what, PATIENCE, async || {
            let text = std::fs::read_to_string(stderr_file).unwrap_or_default();
            let fresh = text.get(before..).unwrap_or_default();
            fresh.lines().find_map(|line| {
                let v = serde_json::from_str::<serde_json::Value>(line).ok()?;
                let a = v["address"].as_str()?;
                (v["message"] == "tally proxy listening").then(|| format!("http://{a}"))
            })
        })
        .await;
        proxy
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        crate::support::sigterm_when_handled(&c);
        c.wait().ok()
    }
}

impl Drop for ProxyChild {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every parsable record's transaction id in the live log and its rotated siblings.
fn logged_ids(rig: &Rig) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(rig.dir.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("spend.jsonl") {
            continue;
        }
        let bytes = std::fs::read(entry.path()).unwrap();
        for line in bytes.split(|b| *b == b'\n') {
            if let Ok(r) = tally::spend::SpendRecord::parse_line(line) {
                ids.insert(r.transaction_id);
            }
        }
    }
    ids
}

/// Sends chat completions from `workers` tasks until `stop`; returns the call ids answered 200.
fn load(
    base: &str,
    workers: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<String>> {
    let base = base.to_owned();
    tokio::spawn(async move {
        let ok = Arc::new(Mutex::new(Vec::new()));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (http, base, stop, ok) = (http.clone(), base.clone(), stop.clone(), ok.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.is_cancelled() {
                    n += 1;
                    let sent = http
                        .post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(MASTER)
                        .json(&json!({
                            "model": "gpt-4o",
                            "user": format!("customer-{}", (w as u64 + n) % 5),
                            "messages": [{"role": "user", "content": "hello under load"}]
                        }))
                        .send()
                        .await;
                    let Ok(resp) = sent else { break };
                    if resp.status() != 200 {
                        continue;
                    }
                    let id = resp
                        .headers()
                        .get("x-litellm-call-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    // The 200 counts once the whole body arrived.
                    if resp.bytes().await.is_ok()
                        && let Some(id) = id
                    {
                        ok.lock().unwrap().push(id);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        ok.lock().unwrap().clone()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_sigkilled_under_load_loses_no_acknowledged_record_and_a_torn_line_stops_nothing() {
    let rig = Rig::new().await;
    let rounds = if full_variant() { 20 } else { 4 };
    let config = proxy_config(&rig, 64 << 10);
    let proxy_stderr = rig.path("proxy.stderr");
    // The shipper follows the log from the start, across every rotation and restart.
    std::fs::write(rig.log(), b"").unwrap();
    let mut ship = rig.spawn_ship(&[]);
    let mut rng = SplitMix(0x7077);
    let mut acknowledged = Vec::new();
    let mut torn = String::new();
    for round in 0..rounds {
        let mut proxy =
            ProxyChild::start(&rig, &config, &proxy_stderr, "warn,tally::proxy=info").await;
        let stop = CancellationToken::new();
        let clients = load(&proxy.base, 8, stop.clone());
        tokio::time::sleep(Duration::from_millis(300 + rng.below(900))).await;
        proxy.kill9();
        stop.cancel();
        acknowledged.extend(clients.await.unwrap());
        if round == 1 {
            // What a writer stopped mid-record leaves: a last line without its newline.
            torn = format!("{{\"schema\":1,\"transaction_id\":\"torn-{round}\",\"model\":\"gp");
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(rig.log())
                .unwrap();
            f.write_all(torn.as_bytes()).unwrap();
        }
    }
    // A last proxy appends after everything, then stops cleanly.
    let mut proxy = ProxyChild::start(&rig, &config, &proxy_stderr, "warn,tally::proxy=info").await;
    let stop = CancellationToken::new();
    let clients = load(&proxy.base, 2, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    acknowledged.extend(clients.await.unwrap());
    assert!(proxy.terminate().unwrap().success());

    assert!(
        acknowledged.len() > 50,
        "too little load: {}",
        acknowledged.len()
    );
    let logged = logged_ids(&rig);
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|id| !logged.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "answered 200 but not in the spend log: {missing:?}"
    );

    // The shipper bills every record in the logs exactly once and files the torn fragment.
    let all: Vec<String> = logged.iter().cloned().collect();
    rig.wait_stored(all.len(), "every logged record").await;
    assert!(
        ship.exited().is_none(),
        "the shipper stopped:\n{}",
        tail(&rig.stderr_text(), 20)
    );
    let what = Later(|| {
        format!(
            "the torn fragment as a rejected line; rejected: {:?}",
            rig.rejected()
        )
    });
    wait_until(what, PATIENCE, async || {
        rig.rejected().iter().any(|(_, head)| head == &torn)
    })
    .await;
    assert!(ship.terminate().unwrap().success());
    rig.assert_exactly_once(&all);
    figure(
        "proxy_crash",
        format!(
            "{rounds} SIGKILLs under 8 concurrent clients; {} answers 200, all logged; {} records \
             billed once (records whose client saw no answer are billed too); {} rejected line(s), \
             the torn fragment among them",
            acknowledged.len(),
            all.len(),
            rig.rejected().len()
        ),
    );
}
