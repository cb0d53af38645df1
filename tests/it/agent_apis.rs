//! Anthropic's Messages API and OpenAI's Responses API end to end: a loopback upstream speaking
//! each wire format → `tally proxy` → the spend log → the `tally ship` binary → the Lago
//! emulator, and OpenAI-format chat to an `anthropic/` deployment likewise. And a client that hangs up mid-stream is billed for what the upstream generated.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};
use tally::lago_emulator::EmulatorConfig;
use tally::proxy::ProxyConfig;
use tally::spend::{SpendRecord, Status};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::support::{sigterm_when_handled, spawn_lago_emulator, tally_bin, wait_until};

const MASTER: &str = "sk-agent-apis-0123456789abcdef";
const LAGO_KEY: &str = "lago-agents-key";

fn sse(event: &str, data: Value) -> Result<Bytes, Infallible> {
    Ok(Bytes::from(format!("event: {event}\ndata: {data}\n\n")))
}

/// Anthropic's Messages API, streamed. For the user `cust-hangup`, the rest of the stream after
/// `message_start` waits until the test says the client is gone; for `cust-overloaded*`, Anthropic
/// gives up mid-stream with an `error` event, after a `message_start` that already had usage.
async fn messages(State(gate): State<Arc<Notify>>, body: String) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap();
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let hold = body["metadata"]["user_id"] == "cust-hangup";
    let start = json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
        "role": "assistant", "content": [], "model": model, "stop_reason": null,
        "stop_sequence": null, "usage": {"input_tokens": 50, "output_tokens": 1,
        "cache_read_input_tokens": 10000, "cache_creation_input_tokens": 2000}}});
    let first = futures::stream::iter([sse("message_start", start)]);
    let overloaded = body["metadata"]["user_id"]
        .as_str()
        .is_some_and(|u| u.starts_with("cust-overloaded"));
    let rest = futures::stream::once(async move {
        if overloaded {
            return futures::stream::iter(vec![sse(
                "error",
                json!({"type": "error",
                       "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            )]);
        }
        if hold {
            gate.notified().await;
        }
        futures::stream::iter(vec![
            sse(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "text_delta", "text": "Hi"}}),
            ),
            sse(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                       "usage": {"output_tokens": 100}}),
            ),
            sse("message_stop", json!({"type": "message_stop"})),
        ])
    });
    use futures::StreamExt;
    let events = first.chain(rest.flatten());
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

/// OpenAI's Responses API, whole; for a `user` ending in `-failed`, a response that failed after
/// spending tokens (whole, or streamed as `response.failed`).
async fn responses(body: String) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap();
    if body["user"]
        .as_str()
        .is_some_and(|u| u.ends_with("-failed"))
    {
        let failed = json!({"id": "resp_2", "object": "response", "status": "failed",
            "model": body["model"], "output": [],
            "error": {"code": "server_error", "message": "The model failed to generate"},
            "usage": {"input_tokens": 40, "output_tokens": 9, "total_tokens": 49}});
        if body["stream"] == true {
            let events = [
                sse(
                    "response.created",
                    json!({"type": "response.created",
                    "response": {"id": "resp_2", "status": "in_progress", "model": body["model"]}}),
                ),
                sse(
                    "response.failed",
                    json!({"type": "response.failed", "response": failed}),
                ),
            ];
            return (
                [(header::CONTENT_TYPE, "text/event-stream")],
                Body::from_stream(futures::stream::iter(events)),
            )
                .into_response();
        }
        return (
            [(header::CONTENT_TYPE, "application/json")],
            failed.to_string(),
        )
            .into_response();
    }
    let answer = json!({"id": "resp_1", "object": "response", "status": "completed",
        "model": body["model"], "output": [{"type": "message", "role": "assistant",
        "content": [{"type": "output_text", "text": "Hi", "annotations": []}]}],
        "usage": {"input_tokens": 2006, "input_tokens_details": {"cached_tokens": 1920},
                  "output_tokens": 300, "output_tokens_details": {"reasoning_tokens": 192},
                  "total_tokens": 2306}});
    (
        [(header::CONTENT_TYPE, "application/json")],
        answer.to_string(),
    )
        .into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_and_responses_calls_reach_lago_and_a_hang_up_is_billed_in_full() {
    let gate = Arc::new(Notify::new());
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = format!("http://{}", upstream.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/responses", post(responses))
        .with_state(gate.clone());
    tokio::spawn(async move { axum::serve(upstream, app).await.unwrap() });
    let yaml = format!(
        r#"
model_list:
  - model_name: sonnet                # built-in claude-sonnet-4-5: reads 3e-7, writes 3.75e-6
    litellm_params: {{model: anthropic/claude-sonnet-4-5, api_base: "{up}", api_key: sk-ant-up}}
  - model_name: gpt-4o                # built-in prices: cache reads at 1.25e-6
    litellm_params: {{model: openai/gpt-4o, api_base: "{up}/v1", api_key: sk-up}}
general_settings:
  master_key: {MASTER}
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let spend_log = dir.path().join("spend.jsonl");
    let config = ProxyConfig::from_yaml_str(&yaml, "agents.yaml")
        .unwrap()
        .with_spend_log(&spend_log)
        .with_state_dir(dir.path().join("proxy-state"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let proxy = tokio::spawn(tally::proxy::serve(config, listener, stop.clone()));
    let http = reqwest::Client::new();
    wait_until("the proxy answers", Duration::from_secs(60), async || {
        http.get(format!("{base}/health/liveliness"))
            .send()
            .await
            .is_ok()
    })
    .await;

    let message = |user: &str| {
        http.post(format!("{base}/v1/messages?beta=true"))
            .header("x-api-key", MASTER)
            .json(&json!({"model": "sonnet", "max_tokens": 64, "stream": true,
                          "metadata": {"user_id": user},
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let streamed = message("cust-messages").await.unwrap();
    assert_eq!(streamed.status(), 200);
    let text = String::from_utf8(streamed.bytes().await.unwrap().to_vec()).unwrap();
    assert!(
        text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
        "{text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    // Overloaded mid-stream: the client gets Anthropic's error event as it was sent, and the
    // call is recorded as failed, not billed for the usage its message_start announced.
    let overloaded = message("cust-overloaded").await.unwrap();
    assert_eq!(overloaded.status(), 200);
    let text = String::from_utf8(overloaded.bytes().await.unwrap().to_vec()).unwrap();
    let (_, last) = text
        .rsplit_once("event: error\ndata: ")
        .expect("the error event");
    let last: Value = serde_json::from_str(last.trim_end()).unwrap();
    assert_eq!(last["error"]["type"], "overloaded_error", "{text}");
    assert!(
        text.ends_with("\n\n") && !text.contains("message_stop"),
        "{text}"
    );
    let response = http
        .post(format!("{base}/v1/responses"))
        .bearer_auth(MASTER)
        .json(&json!({"model": "gpt-4o", "input": "hi", "user": "cust-responses"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await.unwrap();
    // A response that failed after spending tokens, whole and streamed: the client gets it as
    // the upstream sent it, and the call is recorded as failed, not billed.
    for stream in [false, true] {
        let user = if stream {
            "cust-stream-failed"
        } else {
            "cust-failed"
        };
        let failed = http
            .post(format!("{base}/v1/responses"))
            .bearer_auth(MASTER)
            .json(&json!({"model": "gpt-4o", "input": "hi", "user": user, "stream": stream}))
            .send()
            .await
            .unwrap();
        assert_eq!(failed.status(), 200);
        let text = String::from_utf8(failed.bytes().await.unwrap().to_vec()).unwrap();
        assert!(text.contains("The model failed to generate"), "{text}");
    }
    // OpenAI-format chat to the anthropic/ deployment, translated, streamed.
    let chat = |user: &str| {
        http.post(format!("{base}/chat/completions"))
            .bearer_auth(MASTER)
            .json(&json!({"model": "sonnet", "user": user, "stream": true,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let chat_reply = chat("cust-chat").await.unwrap();
    assert_eq!(chat_reply.status(), 200);
    let text = String::from_utf8(chat_reply.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.contains("\"content\":\"Hi\""), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // The same overload through the translation: the client gets it as an OpenAI error chunk,
    // without [DONE], and the call is recorded as failed.
    let chat_reply = chat("cust-overloaded-chat").await.unwrap();
    assert_eq!(chat_reply.status(), 200);
    let text = String::from_utf8(chat_reply.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.contains("\"overloaded_error\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");

    // A client that reads the first event and hangs up: the upstream goes on generating, and
    // the call is billed with the upstream's final usage.
    let mut hangup = message("cust-hangup").await.unwrap();
    assert_eq!(hangup.status(), 200);
    let first = hangup.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("message_start"));
    drop(hangup);
    gate.notify_one();
    wait_until(
        "the hung-up call is recorded",
        Duration::from_secs(60),
        async || {
            std::fs::read_to_string(&spend_log)
                .unwrap_or_default()
                .contains("cust-hangup")
        },
    )
    .await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), proxy)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let text = std::fs::read_to_string(&spend_log).unwrap();
    let records: Vec<SpendRecord> = text
        .lines()
        .map(|l| SpendRecord::parse_line(l.as_bytes()).unwrap())
        .collect();
    assert_eq!(records.len(), 8, "{text}");
    let by_user = |u: &str| {
        records
            .iter()
            .find(|r| r.end_user_id.as_deref() == Some(u))
            .unwrap()
            .clone()
    };
    for user in ["cust-messages", "cust-hangup", "cust-chat"] {
        let r = by_user(user);
        let expected = if user == "cust-chat" {
            "chat_completion"
        } else {
            "anthropic_messages"
        };
        assert_eq!(r.call_type, expected);
        assert_eq!(r.status, Status::Success);
        assert!(r.stream && !r.usage_estimated);
        assert_eq!(
            (
                r.input_tokens,
                r.output_tokens,
                r.cache_read_input_tokens,
                r.cache_creation_input_tokens
            ),
            (12_050, 100, 10_000, 2_000),
            "{user}"
        );
        // 50 × 3e-6 + 10000 × 3e-7 + 2000 × 3.75e-6 + 100 × 1.5e-5
        assert_eq!(r.response_cost, Some(0.01215), "{user}");
    }
    for user in [
        "cust-overloaded",
        "cust-overloaded-chat",
        "cust-failed",
        "cust-stream-failed",
    ] {
        assert_eq!(by_user(user).status, Status::Failure, "{user}");
    }
    let r = by_user("cust-responses");
    assert_eq!(r.call_type, "responses");
    assert_eq!(
        (
            r.input_tokens,
            r.output_tokens,
            r.cache_read_input_tokens,
            r.reasoning_tokens
        ),
        (2006, 300, 1920, 192)
    );
    // 86 × 2.5e-6 + 1920 × 1.25e-6 + 300 × 1e-5
    assert_eq!(r.response_cost, Some(0.005615));

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
        .env("TALLY_LINGER_MS", "5")
        .env("TALLY_POLL_INTERVAL_MS", "100")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "Lago holds the four events",
        Duration::from_secs(60),
        async || emu.event_count() >= 4,
    )
    .await;
    sigterm_when_handled(&ship);
    assert!(ship.wait().unwrap().success());
    let events = emu.events();
    assert_eq!(
        events.len(),
        4,
        "the overloaded calls and the failed responses are not billed"
    );
    let at_lago = |user: &str| {
        events
            .iter()
            .find(|e| e.external_subscription_id.as_deref() == Some(user))
            .unwrap()
            .clone()
    };
    let e = at_lago("cust-messages");
    assert_eq!(e.properties["cache_read_input_tokens"], 10_000);
    assert_eq!(e.properties["cache_creation_input_tokens"], 2_000);
    assert_eq!(e.precise_total_amount_cents.as_deref(), Some("1.215"));
    let e = at_lago("cust-chat");
    assert_eq!(e.properties["cache_read_input_tokens"], 10_000);
    assert_eq!(e.precise_total_amount_cents.as_deref(), Some("1.215"));
    let e = at_lago("cust-responses");
    assert_eq!(e.properties["input_tokens"], 2006);
    assert_eq!(e.properties["reasoning_tokens"], 192);
    assert_eq!(e.precise_total_amount_cents.as_deref(), Some("0.5615"));
}
