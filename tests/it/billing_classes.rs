//! Cached, cache-write and reasoning tokens end to end: a fake upstream reports them (OpenAI
//! chat usage, streamed and whole, and Anthropic's shape) → `tally proxy` prices each class and
//! writes them to the spend log → the `tally ship` binary with `TALLY_PRECISE_AMOUNT=true` and a
//! markup → the Lago emulator, which must hold the breakdown and the exact amount.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};
use tally::lago_emulator::EmulatorConfig;
use tally::proxy::ProxyConfig;
use tally::spend::SpendRecord;
use tokio_util::sync::CancellationToken;

use crate::support::{sigterm_when_handled, spawn_lago_emulator, tally_bin, wait_until};

const MASTER: &str = "sk-billing-classes-0123456789abcdef";
const LAGO_KEY: &str = "lago-classes-key";

/// OpenAI chat usage with 1,920 cached prompt tokens and 192 reasoning tokens.
fn openai_usage() -> Value {
    json!({"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
           "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
           "completion_tokens_details": {"reasoning_tokens": 192}})
}

/// Anthropic's usage: `input_tokens` without the 10,000 cache reads and 2,000 cache writes.
fn anthropic_usage() -> Value {
    json!({"input_tokens": 50, "output_tokens": 100,
           "cache_read_input_tokens": 10000, "cache_creation_input_tokens": 2000})
}

async fn chat(body: String) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap();
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let usage = if model.starts_with("claude") {
        anthropic_usage()
    } else {
        openai_usage()
    };
    if body["stream"].as_bool().unwrap_or(false) {
        let content = json!({"id": "c", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]});
        let usage = json!({"id": "c", "object": "chat.completion.chunk", "model": model,
            "choices": [], "usage": usage});
        let events = futures::stream::iter([
            Ok::<_, Infallible>(Bytes::from(format!("data: {content}\n\n"))),
            Ok(Bytes::from(format!("data: {usage}\n\n"))),
            Ok(Bytes::from_static(b"data: [DONE]\n\n")),
        ]);
        return (
            [(header::CONTENT_TYPE, "text/event-stream")],
            Body::from_stream(events),
        )
            .into_response();
    }
    let answer = json!({"id": "c", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                     "finish_reason": "stop"}],
        "usage": usage});
    (
        [(header::CONTENT_TYPE, "application/json")],
        answer.to_string(),
    )
        .into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_classes_and_the_exact_amount_reach_lago() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = format!("http://{}/v1", upstream.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(
            upstream,
            Router::new().route("/v1/chat/completions", post(chat)),
        )
        .await
        .unwrap()
    });
    let yaml = format!(
        r#"
model_list:
  - model_name: gpt-4o                # built-in prices: cache reads at 1.25e-6
    litellm_params: {{model: openai/gpt-4o, api_base: "{up}"}}
  - model_name: sonnet                # built-in claude-sonnet-4-5: reads 3e-7, writes 3.75e-6
    litellm_params: {{model: openai/claude-sonnet-4-5, api_base: "{up}"}}
  - model_name: cheap-cache           # a deployment's own cache-read price over the table's
    litellm_params: {{model: openai/gpt-4o, api_base: "{up}", cache_read_input_token_cost: "1e-7"}}
general_settings:
  master_key: {MASTER}
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let spend_log = dir.path().join("spend.jsonl");
    let config = ProxyConfig::from_yaml_str(&yaml, "classes.yaml")
        .unwrap()
        .with_spend_log(&spend_log)
        .with_state_dir(dir.path().join("proxy-state"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let proxy = tokio::spawn(tally::proxy::serve(config, listener, stop.clone()));

    let http = reqwest::Client::new();
    let call = |model: &str, user: &str, stream: bool| {
        let body = json!({"model": model, "user": user, "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]});
        http.post(format!("{base}/chat/completions"))
            .bearer_auth(MASTER)
            .json(&body)
            .send()
    };
    wait_until("the proxy answers", Duration::from_secs(60), async || {
        http.get(format!("{base}/health/liveliness"))
            .send()
            .await
            .is_ok()
    })
    .await;
    for (model, user, stream) in [
        ("gpt-4o", "cust-openai", true),
        ("sonnet", "cust-anthropic", false),
        ("cheap-cache", "cust-override", false),
    ] {
        let response = call(model, user, stream).await.unwrap();
        assert_eq!(response.status(), 200, "{model}");
        let _ = response.bytes().await.unwrap();
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), proxy)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // The spend log: every class, and the cost LiteLLM would put on each call.
    let text = std::fs::read_to_string(&spend_log).unwrap();
    let records: Vec<SpendRecord> = text
        .lines()
        .map(|l| SpendRecord::parse_line(l.as_bytes()).unwrap())
        .collect();
    let by_user = |u: &str| {
        records
            .iter()
            .find(|r| r.end_user_id.as_deref() == Some(u))
            .unwrap()
            .clone()
    };
    let openai = by_user("cust-openai");
    assert_eq!(
        (
            openai.input_tokens,
            openai.cache_read_input_tokens,
            openai.reasoning_tokens
        ),
        (2006, 1920, 192)
    );
    // 86 × 2.5e-6 + 1920 × 1.25e-6 + 300 × 1e-5
    assert_eq!(openai.response_cost, Some(0.005615));
    let anthropic = by_user("cust-anthropic");
    assert_eq!(
        (
            anthropic.input_tokens,
            anthropic.cache_read_input_tokens,
            anthropic.cache_creation_input_tokens,
            anthropic.total_tokens
        ),
        (12_050, 10_000, 2_000, Some(12_150))
    );
    // 50 × 3e-6 + 10000 × 3e-7 + 2000 × 3.75e-6 + 100 × 1.5e-5
    assert_eq!(anthropic.response_cost, Some(0.01215));
    // 86 × 2.5e-6 + 1920 × 1e-7 + 300 × 1e-5
    assert_eq!(by_user("cust-override").response_cost, Some(0.003407));

    // The shipper, as operators run it, with the exact amount and a 1.5 markup.
    let emu = spawn_lago_emulator(EmulatorConfig {
        api_key: LAGO_KEY.into(),
        ..Default::default()
    })
    .await;
    let mut ship = std::process::Command::new(tally_bin())
        .arg("ship")
        .env("LAGO_API_BASE", emu.base_url())
        .env("LAGO_API_KEY", LAGO_KEY)
        .env("LAGO_API_EVENT_CODE", "llm_usage")
        .env("TALLY_SPEND_LOG", &spend_log)
        .env("TALLY_STATE_DIR", dir.path().join("ship-state"))
        .env("TALLY_PRECISE_AMOUNT", "true")
        .env("TALLY_COST_MARKUP", "1.5")
        .env("TALLY_LINGER_MS", "5")
        .env("TALLY_POLL_INTERVAL_MS", "100")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "Lago holds the three events",
        Duration::from_secs(60),
        async || emu.event_count() >= 3,
    )
    .await;
    sigterm_when_handled(&ship);
    assert!(ship.wait().unwrap().success());

    let events = emu.events();
    assert_eq!(events.len(), 3);
    let at_lago = |user: &str| {
        events
            .iter()
            .find(|e| e.external_subscription_id.as_deref() == Some(user))
            .unwrap()
            .clone()
    };
    let e = at_lago("cust-openai");
    assert_eq!(e.properties["input_tokens"], 2006);
    assert_eq!(e.properties["cache_read_input_tokens"], 1920);
    assert_eq!(e.properties["cache_creation_input_tokens"], 0);
    assert_eq!(e.properties["reasoning_tokens"], 192);
    // 0.005615 USD × 100 × 1.5, exact.
    assert_eq!(e.precise_total_amount_cents.as_deref(), Some("0.84225"));
    let e = at_lago("cust-anthropic");
    assert_eq!(e.properties["cache_read_input_tokens"], 10_000);
    assert_eq!(e.properties["cache_creation_input_tokens"], 2_000);
    assert_eq!(e.properties["prompt_tokens"], 12_050);
    assert_eq!(e.precise_total_amount_cents.as_deref(), Some("1.8225"));
    assert_eq!(
        at_lago("cust-override")
            .precise_total_amount_cents
            .as_deref(),
        Some("0.51105")
    );
}
