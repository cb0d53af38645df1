//! `/_emulator/...`: the HTTP form of [`super::EmulatorHandle`] for out-of-process users
//! (scripts, Python tests). No authentication; outside Lago's namespace; not counted.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::faults::Fault;
use super::{Emulator, server};

pub(crate) fn routes(app: Arc<Emulator>) -> Router {
    Router::new()
        .route("/_emulator/health", get(|| async { "ok" }))
        .route("/_emulator/events", get(events))
        .route("/_emulator/counters", get(counters))
        .route(
            "/_emulator/faults",
            post(add_faults).get(pending_faults).delete(clear_faults),
        )
        .route("/_emulator/reset", post(reset))
        .route("/_emulator/forget", post(forget))
        .with_state(app)
}

#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

async fn events(State(app): State<Arc<Emulator>>, Query(page): Query<Page>) -> Response {
    let events = app
        .store()
        .snapshot(page.offset, page.limit.unwrap_or(usize::MAX));
    Json(events).into_response()
}

async fn counters(State(app): State<Arc<Emulator>>) -> Response {
    Json(app.counters.snapshot()).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Fault),
    Many(Vec<Fault>),
}

async fn add_faults(State(app): State<Arc<Emulator>>, Json(faults): Json<OneOrMany>) -> Response {
    let faults = match faults {
        OneOrMany::One(f) => vec![f],
        OneOrMany::Many(fs) => fs,
    };
    let mut refuse = None;
    for fault in faults {
        match fault {
            // Stopping here would cut this very request off: answer first (closing this
            // connection), then stop listening.
            Fault::RefuseConnections { duration } => refuse = Some(duration),
            other => app.inject(other),
        }
    }
    let mut response = Json(json!({"pending_requests": app.faults.pending()})).into_response();
    if let Some(duration) = refuse {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        let app2 = Arc::clone(&app);
        app.net.spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            app2.net.stop_listening();
            server::resume_after(app2, duration).await;
        });
    }
    response
}

async fn pending_faults(State(app): State<Arc<Emulator>>) -> Response {
    Json(json!({"pending_requests": app.faults.pending()})).into_response()
}

async fn clear_faults(State(app): State<Arc<Emulator>>) -> StatusCode {
    app.faults.clear();
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct Forget {
    transaction_ids: Vec<String>,
}

/// `POST /_emulator/forget {"transaction_ids": [...]}`: Lago loses these events.
async fn forget(State(app): State<Arc<Emulator>>, Json(body): Json<Forget>) -> Response {
    let ids: Vec<&str> = body.transaction_ids.iter().map(String::as_str).collect();
    Json(json!({"forgotten": app.forget(&ids)})).into_response()
}

async fn reset(State(app): State<Arc<Emulator>>) -> StatusCode {
    app.reset();
    StatusCode::NO_CONTENT
}
