//! Providers and the router end to end: a real proxy in front of recording upstreams on
//! loopback, each of which keeps the path, query, headers and body of every request it gets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use tally::proxy::ProxyConfig;
use tally::spend::{SpendRecord, Status};
use tokio_util::sync::CancellationToken;

use super::{MASTER, WAIT, chat, closed_port};
use crate::support::wait_until;

/// One request as an upstream received it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Value,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// What a recorder answers.
#[derive(Clone, Copy)]
enum Answer {
    /// A normal answer, with usage 7 / 15 and `model` set to the recorder's label.
    Ok,
    /// This status with this body.
    Status(u16, &'static str),
}

#[derive(Clone)]
struct RecorderState {
    label: &'static str,
    answer: Answer,
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    async fn start(label: &'static str, answer: Answer) -> Self {
        let state = RecorderState {
            label,
            answer,
            seen: Arc::default(),
        };
        let seen = state.seen.clone();
        let app = Router::new().fallback(record).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, seen }
    }

    /// `http://127.0.0.1:<port>` (no path).
    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn record(State(state): State<RecorderState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let stream = body["stream"] == json!(true);
    let embeddings = parts.uri.path().ends_with("/embeddings");
    state.seen.lock().unwrap().push(Seen {
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
    });
    let label = state.label;
    match state.answer {
        Answer::Status(code, text) => (
            StatusCode::from_u16(code).unwrap(),
            [(header::CONTENT_TYPE, "application/json")],
            text,
        )
            .into_response(),
        Answer::Ok if embeddings => axum::Json(json!({
            "object": "list", "model": label,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3}
        }))
        .into_response(),
        Answer::Ok if stream => {
            let chunk = |delta: Value, usage: Value| {
                let c = json!({"id": "c", "object": "chat.completion.chunk", "model": label,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": null}],
                               "usage": usage});
                Ok::<_, std::convert::Infallible>(Bytes::from(format!("data: {c}\n\n")))
            };
            let events = vec![
                chunk(json!({"content": "Paris"}), Value::Null),
                chunk(
                    json!({}),
                    json!({"prompt_tokens": 7, "completion_tokens": 15, "total_tokens": 22}),
                ),
                Ok(Bytes::from_static(b"data: [DONE]\n\n")),
            ];
            (
                [(header::CONTENT_TYPE, "text/event-stream")],
                axum::body::Body::from_stream(futures::stream::iter(events)),
            )
                .into_response()
        }
        Answer::Ok => axum::Json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": label,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 15, "total_tokens": 22}
        }))
        .into_response(),
    }
}

/// A proxy started from YAML with an explicit environment (no process variables).
struct Proxy {
    base: String,
    spend_log: PathBuf,
    http: reqwest::Client,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Proxy {
    async fn start(model_list_and_settings: &str, env: &[(&str, &str)]) -> Self {
        let yaml = format!("general_settings: {{master_key: {MASTER}}}\n{model_list_and_settings}");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let dir = tempfile::tempdir().unwrap();
        let spend_log = dir.path().join("spend.jsonl");
        let config = ProxyConfig::load_from_str(&yaml, "routing.yaml", &lookup)
            .unwrap()
            .with_spend_log(&spend_log)
            .with_state_dir(dir.path().join("state"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn(tally::proxy::serve(config, listener, shutdown.clone()));
        let http = reqwest::Client::new();
        let health = format!("{base}/health/liveliness");
        wait_until("proxy answers", WAIT, async || {
            http.get(&health).send().await.is_ok().then_some(())
        })
        .await;
        Self {
            base,
            spend_log,
            http,
            shutdown,
            _dir: dir,
        }
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(MASTER)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs a chat call and returns its status and body.
    async fn chat(&self, model: &str) -> (u16, Value) {
        let r = self.post("/chat/completions", &chat(model)).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    fn records(&self) -> Vec<SpendRecord> {
        let text = std::fs::read(&self.spend_log).unwrap_or_default();
        text.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| SpendRecord::parse_line(l).unwrap())
            .collect()
    }

    async fn wait_records(&self, n: usize) -> Vec<SpendRecord> {
        wait_until(format!("{n} spend records"), WAIT, async || {
            let r = self.records();
            (r.len() >= n).then_some(r)
        })
        .await
    }

    /// `tally_proxy_upstream_errors_total` for a model and kind (0 when absent).
    async fn upstream_errors(&self, model: &str, kind: &str) -> u64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(MASTER)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with("tally_proxy_upstream_errors_total{"))
            .filter(|l| l.contains(&format!("model=\"{model}\"")))
            .filter(|l| l.contains(&format!("kind=\"{kind}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test]
async fn each_provider_gets_its_url_auth_header_and_model() {
    let up = Recorder::start("up", Answer::Ok).await;
    let base = up.base();
    let origin = up.origin();
    // Every OpenAI-wire provider, keys taken from each provider's own variable.
    let providers = [
        ("openai", "OPENAI_API_KEY"),
        ("groq", "GROQ_API_KEY"),
        ("deepseek", "DEEPSEEK_API_KEY"),
        ("mistral", "MISTRAL_API_KEY"),
        ("together_ai", "TOGETHERAI_API_KEY"),
        ("openrouter", "OPENROUTER_API_KEY"),
        ("xai", "XAI_API_KEY"),
        ("fireworks_ai", "FIREWORKS_AI_API_KEY"),
        ("perplexity", "PERPLEXITYAI_API_KEY"),
        ("cerebras", "CEREBRAS_API_KEY"),
        ("gemini", "GEMINI_API_KEY"),
        ("hosted_vllm", "HOSTED_VLLM_API_KEY"),
        ("lm_studio", "LM_STUDIO_API_KEY"),
    ];
    let mut yaml = String::from("model_list:\n");
    let mut env = Vec::new();
    for (p, var) in providers {
        yaml.push_str(&format!(
            "  - model_name: m-{p}\n    litellm_params: {{model: {p}/model-of-{p}, api_base: \"{base}\"}}\n"
        ));
        env.push((var, format!("key-{p}")));
    }
    // Ollama: the documented base without /v1, no key; a bare name means openai/.
    yaml.push_str(&format!(
        "  - model_name: m-ollama\n    litellm_params: {{model: ollama_chat/llama3.1, api_base: \"{origin}\"}}\n"
    ));
    yaml.push_str(&format!(
        "  - model_name: m-bare\n    litellm_params: {{model: gpt-4o-mini, api_base: \"{base}\", api_key: direct-key}}\n"
    ));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let proxy = Proxy::start(&yaml, &env_refs).await;

    for (p, _) in providers {
        let (status, body) = proxy.chat(&format!("m-{p}")).await;
        assert_eq!(status, 200, "{p}: {body}");
        let seen = up.seen().pop().unwrap();
        assert_eq!(seen.path, "/v1/chat/completions", "{p}");
        assert_eq!(seen.query, None, "{p}");
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer key-{p}").as_str()),
            "{p}"
        );
        assert_eq!(seen.body["model"], json!(format!("model-of-{p}")), "{p}");
        assert_eq!(
            seen.body["messages"],
            chat("x")["messages"],
            "{p}: the rest as sent"
        );
    }
    let (status, _) = proxy.chat("m-ollama").await;
    assert_eq!(status, 200);
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.body["model"], "llama3.1");
    let (status, _) = proxy.chat("m-bare").await;
    assert_eq!(status, 200);
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.header("authorization"), Some("Bearer direct-key"));
    assert_eq!(seen.body["model"], "gpt-4o-mini");

    let records = proxy.wait_records(providers.len() + 2).await;
    assert!(records.iter().all(|r| r.status == Status::Success));
}

#[tokio::test]
async fn azure_gets_its_deployment_url_api_version_and_api_key_header() {
    let up = Recorder::start("azure-up", Answer::Ok).await;
    let origin = up.origin();
    let yaml = format!(
        r#"model_list:
  - model_name: gpt-4o
    litellm_params: {{model: azure/prod-gpt4o, api_base: "{origin}/", api_key: az-key, api_version: "2024-10-21"}}
    model_info: {{base_model: azure/gpt-4o}}
  - model_name: from-env
    litellm_params: {{model: azure/env-dep}}
  - model_name: ad-token
    litellm_params: {{model: azure/tok-dep, api_base: "{origin}", azure_ad_token: eyJ-entra}}
  - model_name: embed
    litellm_params: {{model: azure/emb-dep, api_base: "{origin}", api_key: az-key, api_version: "2024-10-21"}}
"#
    );
    let proxy = Proxy::start(
        &yaml,
        &[
            ("AZURE_API_BASE", origin.as_str()),
            ("AZURE_API_KEY", "env-az-key"),
            ("AZURE_API_VERSION", "2024-06-01"),
        ],
    )
    .await;

    let (status, body) = proxy.chat("gpt-4o").await;
    assert_eq!(status, 200, "{body}");
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.path, "/openai/deployments/prod-gpt4o/chat/completions");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(seen.header("api-key"), Some("az-key"));
    assert_eq!(
        seen.header("authorization"),
        None,
        "the key goes in api-key only"
    );
    assert_eq!(seen.body["model"], "prod-gpt4o");

    let (status, _) = proxy.chat("from-env").await;
    assert_eq!(status, 200);
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.path, "/openai/deployments/env-dep/chat/completions");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-06-01"));
    assert_eq!(seen.header("api-key"), Some("env-az-key"));

    let (status, _) = proxy.chat("ad-token").await;
    assert_eq!(status, 200);
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.header("authorization"), Some("Bearer eyJ-entra"));
    assert_eq!(seen.header("api-key"), None);

    let r = proxy
        .post("/embeddings", &json!({"model": "embed", "input": "hello"}))
        .await;
    assert_eq!(r.status(), 200);
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.path, "/openai/deployments/emb-dep/embeddings");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));

    let records = proxy.wait_records(4).await;
    // Priced as its base model (gpt-4o: 7 × 2.5e-6 + 15 × 1e-5), the deployment in upstream_model.
    assert_eq!(records[0].response_cost, Some(0.0001675));
    assert_eq!(records[0].model, "gpt-4o");
    // No base_model: unpriced rather than guessed from an arbitrary deployment name.
    assert_eq!(records[1].response_cost, None);
}

#[tokio::test]
async fn azure_content_filter_refusal_passes_through_unbilled_and_unretried() {
    const REFUSAL: &str = r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy.","type":null,"param":"prompt","code":"content_filter","status":400}}"#;
    let up = Recorder::start("azure-up", Answer::Status(400, REFUSAL)).await;
    let spare = Recorder::start("spare", Answer::Ok).await;
    let yaml = format!(
        r#"model_list:
  - model_name: gpt-4o
    litellm_params: {{model: azure/prod, api_base: "{}", api_key: k}}
  - model_name: spare
    litellm_params: {{model: openai/spare, api_base: "{}"}}
router_settings: {{num_retries: 3, fallbacks: [{{gpt-4o: [spare]}}]}}
"#,
        up.origin(),
        spare.base()
    );
    let proxy = Proxy::start(&yaml, &[]).await;
    let r = proxy.post("/chat/completions", &chat("gpt-4o")).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.text().await.unwrap(), REFUSAL);
    assert_eq!(up.count(), 1, "a refusal is not retried");
    assert_eq!(spare.count(), 0, "nor sent to a fallback");
    let records = proxy.wait_records(1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].status, Status::Failure);
    assert_eq!(records[0].response_cost, None);
}

#[tokio::test]
async fn unset_key_stops_start_up_naming_both() {
    let err = ProxyConfig::load_from_str(
        &format!("general_settings: {{master_key: {MASTER}}}\nmodel_list:\n  - model_name: g\n    litellm_params: {{model: groq/llama-3.1-8b-instant}}\n"),
        "c.yaml",
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("litellm_params.api_key"), "{err}");
    assert!(err.contains("GROQ_API_KEY"), "{err}");
}

#[tokio::test]
async fn a_group_with_a_dead_deployment_answers_every_call_once_billed() {
    let live = Recorder::start("live", Answer::Ok).await;
    let dead = format!("http://127.0.0.1:{}/v1", closed_port().await);
    let yaml = format!(
        r#"model_list:
  - model_name: g
    litellm_params: {{model: openai/gpt-4o, api_base: "{dead}"}}
  - model_name: g
    litellm_params: {{model: openai/gpt-4o, api_base: "{}"}}
router_settings: {{num_retries: 2, cooldown_time: 0}}
"#,
        live.base()
    );
    let proxy = Proxy::start(&yaml, &[]).await;
    const CALLS: usize = 100;
    for i in 0..CALLS {
        let (status, body) = proxy.chat("g").await;
        assert_eq!(status, 200, "call {i}: {body}");
        assert_eq!(body["model"], "live");
    }
    let records = proxy.wait_records(CALLS).await;
    assert_eq!(records.len(), CALLS, "exactly one record per call");
    for r in &records {
        assert_eq!(r.status, Status::Success);
        assert_eq!(r.model, "g");
        assert_eq!(r.upstream_model.as_deref(), Some("live"));
        assert_eq!(r.response_cost, Some(0.0001675), "priced as gpt-4o");
    }
    assert_eq!(live.count(), CALLS);
    // With no cooldown the dead deployment is still chosen about half the time: each failed
    // attempt is counted, none billed.
    let failed = proxy.upstream_errors("g", "connect").await;
    assert!((20..=80).contains(&failed), "{failed} failed attempts");
}

#[tokio::test]
async fn a_failing_deployment_cools_down_and_is_skipped() {
    let live = Recorder::start("live", Answer::Ok).await;
    let dead = format!("http://127.0.0.1:{}/v1", closed_port().await);
    let yaml = format!(
        r#"model_list:
  - model_name: g
    litellm_params: {{model: openai/gpt-4o, api_base: "{dead}", weight: 1000}}
  - model_name: g
    litellm_params: {{model: openai/gpt-4o, api_base: "{}", weight: 1}}
router_settings: {{num_retries: 1, allowed_fails: 1, cooldown_time: 600}}
"#,
        live.base()
    );
    let proxy = Proxy::start(&yaml, &[]).await;
    for _ in 0..30 {
        assert_eq!(proxy.chat("g").await.0, 200);
    }
    // Chosen first almost every time by its weight, the dead deployment fails twice (more than
    // allowed_fails: 1) and is then skipped for the cooldown.
    let failed = proxy.upstream_errors("g", "connect").await;
    assert_eq!(failed, 2);
    assert_eq!(live.count(), 30);
    assert_eq!(proxy.wait_records(30).await.len(), 30);
}

#[tokio::test]
async fn a_group_that_fails_falls_back_and_bills_the_answering_deployment() {
    let broken = Recorder::start(
        "broken",
        Answer::Status(503, r#"{"error":{"message":"overloaded"}}"#),
    )
    .await;
    let long = Recorder::start(
        "short",
        Answer::Status(
            400,
            r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","code":"context_length_exceeded"}}"#,
        ),
    )
    .await;
    let backup = Recorder::start("backup", Answer::Ok).await;
    let yaml = format!(
        r#"model_list:
  - model_name: primary
    litellm_params: {{model: openai/gpt-4o, api_base: "{}"}}
  - model_name: short-context
    litellm_params: {{model: openai/gpt-4o, api_base: "{}"}}
  - model_name: backup
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{}"}}
router_settings:
  num_retries: 1
  fallbacks: [{{primary: [backup]}}]
  context_window_fallbacks: [{{short-context: [backup]}}]
"#,
        broken.base(),
        long.base(),
        backup.base()
    );
    let proxy = Proxy::start(&yaml, &[]).await;

    let (status, body) = proxy.chat("primary").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "backup");
    assert_eq!(broken.count(), 2, "the first attempt and one retry");
    assert_eq!(backup.seen()[0].body["model"], "gpt-4o-mini");

    let (status, _) = proxy.chat("short-context").await;
    assert_eq!(status, 200);
    assert_eq!(long.count(), 1, "a context-window refusal is not retried");
    assert_eq!(backup.count(), 2);

    let records = proxy.wait_records(2).await;
    assert_eq!(records.len(), 2, "one record per client call");
    assert_eq!(records[0].model, "primary");
    assert_eq!(records[0].upstream_model.as_deref(), Some("backup"));
    // Priced as the deployment that answered (gpt-4o-mini: 7 × 1.5e-7 + 15 × 6e-7).
    assert_eq!(records[0].response_cost, Some(0.00001005));
    assert_eq!(proxy.upstream_errors("primary", "server_error").await, 2);
}

#[tokio::test]
async fn weights_9_to_1_split_calls_9_to_1() {
    let heavy = Recorder::start("heavy", Answer::Ok).await;
    let light = Recorder::start("light", Answer::Ok).await;
    let yaml = format!(
        r#"model_list:
  - model_name: g
    litellm_params: {{model: openai/a, api_base: "{}", weight: 9}}
  - model_name: g
    litellm_params: {{model: openai/b, api_base: "{}", weight: 1}}
"#,
        heavy.base(),
        light.base()
    );
    let proxy = Proxy::start(&yaml, &[]).await;
    const CALLS: usize = 1000;
    let statuses: Vec<u16> = futures::stream::iter(0..CALLS)
        .map(|_| async { proxy.chat("g").await.0 })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200));
    // Binomial(1000, 0.9): sd ≈ 9.5; ±5 sd.
    let h = heavy.count();
    assert!((853..=947).contains(&h), "heavy got {h} of {CALLS}");
    assert_eq!(h + light.count(), CALLS);
    assert_eq!(light.seen()[0].body["model"], "b");
}

#[tokio::test]
async fn a_stream_is_retried_before_its_first_byte() {
    let live = Recorder::start("live", Answer::Ok).await;
    let dead = format!("http://127.0.0.1:{}/v1", closed_port().await);
    let yaml = format!(
        r#"model_list:
  - model_name: g
    litellm_params: {{model: openai/gpt-4o, api_base: "{dead}", weight: 1000}}
  - model_name: g
    litellm_params: {{model: openai/gpt-4o, api_base: "{}", weight: 1}}
router_settings: {{num_retries: 1, cooldown_time: 0}}
"#,
        live.base()
    );
    let proxy = Proxy::start(&yaml, &[]).await;
    let mut request = chat("g");
    request["stream"] = json!(true);
    let r = proxy.post("/chat/completions", &request).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("Paris"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let records = proxy.wait_records(1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].status, Status::Success);
    assert_eq!(records[0].upstream_model.as_deref(), Some("live"));
    assert!(records[0].stream);
}

#[tokio::test]
async fn wildcards_route_any_model_name() {
    let up = Recorder::start("up", Answer::Ok).await;
    let other = Recorder::start("other", Answer::Ok).await;
    let yaml = format!(
        r#"model_list:
  - model_name: "openai/*"
    litellm_params: {{model: "openai/*", api_base: "{}"}}
  - model_name: "*"
    litellm_params: {{model: "openai/*", api_base: "{}"}}
"#,
        up.base(),
        other.base()
    );
    let proxy = Proxy::start(&yaml, &[]).await;
    let (status, body) = proxy.chat("openai/gpt-4o-mini").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(up.seen()[0].body["model"], "gpt-4o-mini");
    let (status, _) = proxy.chat("my-local-model").await;
    assert_eq!(status, 200);
    assert_eq!(other.seen()[0].body["model"], "my-local-model");
    let records = proxy.wait_records(2).await;
    assert_eq!(records[0].model, "openai/gpt-4o-mini");
    assert_eq!(
        records[0].response_cost,
        Some(0.00001005),
        "priced as gpt-4o-mini"
    );
    assert_eq!(records[1].model, "my-local-model");
    assert_eq!(records[1].response_cost, None);
}

#[tokio::test]
async fn azure_wildcard_fallback_alias_and_content_policy_fallback() {
    const REFUSAL: &str =
        r#"{"error":{"message":"filtered","code":"content_filter","status":400}}"#;
    let azure = Recorder::start("azure", Answer::Ok).await;
    let down = format!("http://127.0.0.1:{}/v1", closed_port().await);
    let strict = Recorder::start("strict", Answer::Status(400, REFUSAL)).await;
    // As in LiteLLM's "Setting Fallbacks for Wildcard Models", plus an alias and a content
    // policy fallback.
    let yaml = format!(
        r#"model_list:
  - model_name: "gpt-4o"
    litellm_params: {{model: "openai/gpt-4o", api_base: "{down}"}}
  - model_name: "azure/*"
    litellm_params: {{model: "azure/*", api_key: os.environ/AZURE_API_KEY, api_base: os.environ/AZURE_API_BASE}}
  - model_name: strict
    litellm_params: {{model: openai/strict, api_base: "{}"}}
litellm_settings:
  num_retries: 0
  fallbacks: [{{"gpt-4o": ["azure/gpt-4o"]}}]
  content_policy_fallbacks: [{{"strict": ["azure/gpt-4o-mini"]}}]
router_settings:
  model_group_alias: {{"gpt-4": "gpt-4o"}}
"#,
        strict.base()
    );
    let origin = azure.origin();
    let proxy = Proxy::start(
        &yaml,
        &[("AZURE_API_KEY", "az"), ("AZURE_API_BASE", origin.as_str())],
    )
    .await;
    for model in ["gpt-4o", "gpt-4"] {
        let (status, body) = proxy.chat(model).await;
        assert_eq!(status, 200, "{model}: {body}");
        let seen = azure.seen().pop().unwrap();
        assert_eq!(seen.path, "/openai/deployments/gpt-4o/chat/completions");
        assert_eq!(seen.header("api-key"), Some("az"));
        assert_eq!(seen.body["model"], "gpt-4o");
    }
    let (status, _) = proxy.chat("strict").await;
    assert_eq!(status, 200);
    assert_eq!(
        azure.seen().pop().unwrap().path,
        "/openai/deployments/gpt-4o-mini/chat/completions"
    );
    assert_eq!(strict.count(), 1);
    let records = proxy.wait_records(3).await;
    assert_eq!(
        records.iter().map(|r| r.model.as_str()).collect::<Vec<_>>(),
        ["gpt-4o", "gpt-4", "strict"]
    );
    assert!(records.iter().all(|r| r.status == Status::Success));
    assert_eq!(
        records[0].response_cost,
        Some(0.0001675),
        "priced as gpt-4o"
    );
}

/// The `tally` binary reads a provider's key from its own environment, as LiteLLM does; without
/// it (and without `api_key`), it refuses to start and names both.
#[tokio::test]
async fn the_binary_takes_the_key_from_the_providers_variable() {
    let up = Recorder::start("up", Answer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: fast\n    litellm_params:\n      model: groq/llama-3.1-8b-instant\n      api_base: {}\ngeneral_settings:\n  master_key: {MASTER}\n",
            up.base()
        ),
    )
    .unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(crate::support::tally_bin())
        .args(["proxy", "--host", "127.0.0.1", "--port", "0", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("GROQ_API_KEY", "gsk-from-the-environment")
        .env("TALLY_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env_remove("LITELLM_MASTER_KEY")
        .env_remove("TALLY_SPEND_LOG")
        .env_remove("TALLY_STATE_DIR")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let base = wait_until("the proxy to listen", WAIT, async || {
        let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        text.lines().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            let address = v["address"].as_str()?;
            (v["message"] == "tally proxy listening").then(|| format!("http://{address}"))
        })
    })
    .await;
    let r = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(MASTER)
        .json(&chat("fast"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200);
    let seen = up.seen().pop().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer gsk-from-the-environment")
    );
    assert_eq!(seen.body["model"], "llama-3.1-8b-instant");
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        !log.contains("gsk-from-the-environment"),
        "the key is never logged"
    );

    // No api_base either: LiteLLM's Groq endpoint would be called, and it needs a key.
    std::fs::write(
        &config,
        format!("model_list:\n  - model_name: fast\n    litellm_params: {{model: groq/llama-3.1-8b-instant}}\ngeneral_settings:\n  master_key: {MASTER}\n"),
    )
    .unwrap();
    let out = std::process::Command::new(crate::support::tally_bin())
        .args(["proxy", "--port", "0", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env_remove("GROQ_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("litellm_params.api_key") && stderr.contains("GROQ_API_KEY"),
        "{stderr}"
    );
}
