//! A tiny scripted Lago for the sender's tests: stores batches atomically, answers duplicates and
//! events whose model is `"refuse-me"` with per-index 422s like the real server, and plays
//! scripted answers first (401, 429, 5xx, 400, slow answers). The full emulator lives in
//! `tally::lago_emulator`; this stub exists to pin down the sender's reaction to each answer.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A scripted answer, played once, before the normal behaviour.
#[derive(Debug, Clone)]
pub enum Scripted {
    Status {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Answer normally, after a delay.
    Slow(Duration),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub at: Instant,
    pub auth: Option<String>,
    pub transaction_ids: Vec<String>,
}

#[derive(Default)]
pub struct StubState {
    pub script: VecDeque<Scripted>,
    pub requests: Vec<Request>,
    /// transaction_id → event, in order stored.
    pub stored: Vec<Value>,
    pub seen: HashMap<String, usize>,
    pub batch_max: usize,
}

#[derive(Clone)]
pub struct Stub {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<StubState>>,
    stop: CancellationToken,
}

impl Stub {
    pub async fn start() -> Self {
        Self::start_with_max(100).await
    }

    pub async fn start_with_max(batch_max: usize) -> Self {
        let state = Arc::new(Mutex::new(StubState {
            batch_max,
            ..Default::default()
        }));
        let app = Router::new()
            .route("/api/v1/events/batch", post(batch))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
                .unwrap();
        });
        Self { addr, state, stop }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn push(&self, s: Scripted) {
        self.state.lock().unwrap().script.push_back(s);
    }

    pub fn push_status(&self, status: u16, body: &str, headers: Vec<(&'static str, String)>) {
        self.push(Scripted::Status {
            status,
            headers,
            body: body.to_owned(),
        });
    }

    pub fn stored_ids(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .stored
            .iter()
            .map(|e| e["transaction_id"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn batch(
    State(state): State<Arc<Mutex<StubState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let events: Vec<Value> = v["events"].as_array().cloned().unwrap_or_default();
    let ids: Vec<String> = events
        .iter()
        .map(|e| e["transaction_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let scripted = {
        let mut s = state.lock().unwrap();
        s.requests.push(Request {
            at: Instant::now(),
            auth: headers
                .get("authorization")
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned),
            transaction_ids: ids.clone(),
        });
        s.script.pop_front()
    };
    match scripted {
        Some(Scripted::Status {
            status,
            headers,
            body,
        }) => {
            let mut resp = (StatusCode::from_u16(status).unwrap(), body).into_response();
            for (k, v) in headers {
                resp.headers_mut().insert(k, v.parse().unwrap());
            }
            return resp;
        }
        Some(Scripted::Slow(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    let mut s = state.lock().unwrap();
    if events.len() > s.batch_max {
        return unprocessable(json!({"events": ["too_many_events"]}));
    }
    let mut errors = serde_json::Map::new();
    let mut in_batch = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        let id = &ids[i];
        if s.seen.contains_key(id) || in_batch.contains_key(id) {
            errors.insert(
                i.to_string(),
                json!({"transaction_id": ["value_already_exist"]}),
            );
        } else if e["properties"]["model"] == "refuse-me" {
            errors.insert(i.to_string(), json!({"code": ["does_not_exist"]}));
        } else if e["properties"]["model"] == "refuse-plain" {
            errors.insert(i.to_string(), json!("expression_evaluation_failed: boom"));
        }
        in_batch.insert(id.clone(), i);
    }
    if !errors.is_empty() {
        return unprocessable(Value::Object(errors));
    }
    for (i, e) in events.iter().enumerate() {
        let n = s.stored.len();
        s.seen.insert(ids[i].clone(), n);
        s.stored.push(e.clone());
    }
    (StatusCode::OK, axum::Json(json!({"events": events}))).into_response()
}

fn unprocessable(details: Value) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        axum::Json(json!({
            "status": 422,
            "error": "Unprocessable Entity",
            "code": "validation_errors",
            "error_details": details,
        })),
    )
        .into_response()
}
