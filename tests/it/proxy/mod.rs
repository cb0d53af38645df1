//! `tally proxy` end to end: a real proxy (`tally::proxy::serve` on port 0) in front of a fake
//! upstream (also on port 0), spoken to over HTTP; the spend log is read back line by line.

mod endpoints;
mod fake_upstream;
mod hostile_input;
mod key_api;
mod owned_files;
mod routing;
mod slow_clients;
mod streaming;
mod upstream_conns;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use tally::proxy::ProxyConfig;
use tally::spend::SpendRecord;
use tokio_util::sync::CancellationToken;

use crate::support::wait_until;
use fake_upstream::FakeUpstream;

pub const MASTER: &str = "sk-test-master-0123456789abcdef";
pub const UPSTREAM_KEY: &str = "upstream-secret-key";
/// How long the proxy tests wait for an eventual condition: generous, only ever waited out on failure.
pub const WAIT: Duration = Duration::from_secs(30);

/// A running proxy with its fake upstream and its own state directory.
pub struct Proxy {
    pub base: String,
    pub spend_log: PathBuf,
    pub upstream: FakeUpstream,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// A port nothing listens on: bound, then released.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

impl Proxy {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A proxy whose `tally_settings` has these entries besides (or instead of) the default
    /// `max_body_bytes: 65536`.
    pub async fn start_with(settings: &[(&str, &str)]) -> Self {
        let mut tally_settings = std::collections::BTreeMap::from([("max_body_bytes", "65536")]);
        tally_settings.extend(settings.iter().copied());
        let tally_settings: String = tally_settings
            .iter()
            .map(|(k, v)| format!("  {k}: {v}\n"))
            .collect();
        let upstream = FakeUpstream::start().await;
        let up = upstream.api_base();
        let down = format!("http://127.0.0.1:{}/v1", closed_port().await);
        let yaml = format!(
            r#"
model_list:
  - model_name: gpt-4o            # priced by the built-in table (gpt-4o list price)
    litellm_params: {{model: openai/echo, api_base: "{up}", api_key: os.environ/TALLY_IT_UPSTREAM_KEY}}
  - model_name: no-usage
    litellm_params: {{model: openai/no-usage, api_base: "{up}"}}
  - model_name: rate-limited
    litellm_params: {{model: openai/fail-429, api_base: "{up}"}}
  - model_name: slow
    litellm_params: {{model: openai/slow, api_base: "{up}", timeout: 0.5}}
  - model_name: gated
    litellm_params: {{model: openai/gated, api_base: "{up}", input_cost_per_token: 0.000001, output_cost_per_token: 0.000002}}
  - model_name: down
    litellm_params: {{model: openai/echo, api_base: "{down}"}}
  - model_name: my-local
    litellm_params: {{model: openai/local-llama, api_base: "{up}"}}
  - model_name: embed
    litellm_params: {{model: openai/text-embedding-3-small, api_base: "{up}"}}
  - model_name: mock
    litellm_params: {{model: openai/mock-model, mock_response: "Hello mock world", input_cost_per_token: 0.000001, output_cost_per_token: 0.000002}}
litellm_settings:
  callbacks: ["lago"]
general_settings:
  master_key: {MASTER}
tally_settings:
{tally_settings}"#
        );
        // SAFETY: every test sets the same value; nothing reads it concurrently with a change.
        unsafe { std::env::set_var("TALLY_IT_UPSTREAM_KEY", UPSTREAM_KEY) };
        let dir = tempfile::tempdir().unwrap();
        let spend_log = dir.path().join("logs/spend.jsonl");
        let config = ProxyConfig::from_yaml_str(&yaml, "it-config.yaml")
            .unwrap()
            .with_spend_log(&spend_log)
            .with_state_dir(dir.path().join("state"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tally::proxy::serve(config, listener, shutdown.clone()));
        let proxy = Self {
            base,
            spend_log,
            upstream,
            http: reqwest::Client::new(),
            shutdown,
            task: Some(task),
            _dir: dir,
        };
        proxy.wait_ready().await;
        proxy
    }

    async fn wait_ready(&self) {
        let url = format!("{}/health/liveliness", self.base);
        // Its own client, keeping no connection: a test of the connection limit counts them.
        let probe = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        wait_until("proxy answers", WAIT, async || {
            probe.get(&url).send().await.is_ok().then_some(())
        })
        .await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON with `Authorization: Bearer <key>`.
    pub async fn post(&self, path: &str, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Mints a key with the master key; returns the whole response.
    pub async fn generate_key(&self, request: Value) -> Value {
        let response = self.post("/key/generate", MASTER, &request).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Every record in the spend log so far, each parsed with the contract's own parser.
    pub fn records(&self) -> Vec<SpendRecord> {
        let text = std::fs::read(&self.spend_log).unwrap_or_default();
        assert!(
            text.is_empty() || text.ends_with(b"\n"),
            "last line is not terminated"
        );
        text.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| SpendRecord::parse_line(l).unwrap())
            .collect()
    }

    pub fn raw_log(&self) -> String {
        String::from_utf8(std::fs::read(&self.spend_log).unwrap_or_default()).unwrap()
    }

    /// Waits until the spend log holds `n` records.
    pub async fn wait_records(&self, n: usize) -> Vec<SpendRecord> {
        wait_until(format!("{n} spend records"), WAIT, async || {
            let r = self.records();
            (r.len() >= n).then_some(r)
        })
        .await
    }

    /// Cancels the proxy and waits until `serve` returns (spend log flushed).
    pub async fn stop(mut self) -> Vec<SpendRecord> {
        self.shutdown.cancel();
        let task = self.task.take().expect("stopped twice");
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("serve did not return after shutdown")
            .unwrap()
            .unwrap();
        self.records()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The OpenAI error object of a response, checking its shape.
pub async fn error_of(response: reqwest::Response) -> Value {
    let body: Value = response.json().await.unwrap();
    let error = body["error"].clone();
    assert!(error["message"].is_string(), "{body}");
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("code").is_some(), "{body}");
    error
}

pub fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
}
