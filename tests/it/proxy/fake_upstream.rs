//! A fake OpenAI-compatible upstream on port 0. What it does depends on the `model` it receives,
//! so one server covers every case:
//!
//! - `echo` — a normal answer with usage 7 prompt / 15 completion (streamed or not);
//! - `no-usage` — the same answer without any usage;
//! - `fail-429` — a 429 with an OpenAI error body;
//! - `slow` — answers after 30 s (for timeouts);
//! - `gated` — waits until the test opens the gate (after one chunk, when streaming).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::Notify;

pub const ANSWER: &str = "Paris is the capital of France.";

#[derive(Clone, Default)]
pub struct Seen {
    /// Every request body received, in order.
    pub bodies: Arc<Mutex<Vec<Value>>>,
    /// Authorization headers received.
    pub auth: Arc<Mutex<Vec<Option<String>>>>,
    /// Opened by the test to let `gated` streams finish.
    pub gate: Arc<Notify>,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub seen: Seen,
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let seen = Seen::default();
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, seen }
    }

    pub fn api_base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.seen.bodies.lock().unwrap().clone()
    }
}

fn record(seen: &Seen, headers: &HeaderMap, body: &Value) {
    seen.bodies.lock().unwrap().push(body.clone());
    seen.auth.lock().unwrap().push(
        headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned()),
    );
}

fn chunk(delta: Value, finish: Value) -> Bytes {
    let c = json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
                   "model": "gpt-4o-2024-08-06",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    Bytes::from(format!("data: {c}\n\n"))
}

fn usage_chunk() -> Bytes {
    let c = json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
                   "model": "gpt-4o-2024-08-06", "choices": [],
                   "usage": {"prompt_tokens": 7, "completion_tokens": 15, "total_tokens": 22}});
    Bytes::from(format!("data: {c}\n\n"))
}

async fn chat(State(seen): State<Seen>, headers: HeaderMap, body: String) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap();
    record(&seen, &headers, &body);
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    match model.as_str() {
        "fail-429" => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
            )
                .into_response();
        }
        "slow" => tokio::time::sleep(Duration::from_secs(30)).await,
        _ => {}
    }
    let with_usage = model != "no-usage";
    if !stream {
        if model == "gated" {
            seen.gate.notified().await;
        }
        let mut answer = json!({
            "id": "chatcmpl-up", "object": "chat.completion", "created": 1,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                         "finish_reason": "stop"}],
        });
        if with_usage {
            answer["usage"] =
                json!({"prompt_tokens": 7, "completion_tokens": 15, "total_tokens": 22});
        }
        return (
            [(header::CONTENT_TYPE, "application/json")],
            answer.to_string(),
        )
            .into_response();
    }
    let gate = seen.gate.clone();
    let gated = model == "gated";
    let events = async_stream::stream! {
        yield Ok::<_, Infallible>(chunk(json!({"role": "assistant", "content": ""}), Value::Null));
        if gated {
            gate.notified().await;
        }
        for word in ANSWER.split_inclusive(' ') {
            yield Ok(chunk(json!({"content": word}), Value::Null));
        }
        yield Ok(chunk(json!({}), json!("stop")));
        if include_usage && with_usage {
            yield Ok(usage_chunk());
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

async fn embeddings(State(seen): State<Seen>, headers: HeaderMap, body: String) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap();
    record(&seen, &headers, &body);
    let answer = json!({"object": "list", "model": "text-embedding-3-small",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
        "usage": {"prompt_tokens": 5, "total_tokens": 5}});
    (
        [(header::CONTENT_TYPE, "application/json")],
        answer.to_string(),
    )
        .into_response()
}
