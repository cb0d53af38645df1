//! The proxy's Prometheus metrics and its part of systemd's supervision: what each relayed
//! request is counted as, and the `/metrics` route.
//!
//! A request is counted once its response body has been sent (or dropped because the client
//! went away), so a stream's latency runs to its last chunk. The handler names the model and key
//! with [`tag`] as soon as it knows them (a task spawned for the call takes them along with
//! [`carry`]); a request refused earlier (no key, no model) is counted with `none` for both.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use http_body_util::BodyExt;

use super::AppState;
use super::error::ProxyError;
use super::keys::KeyRecord;
use crate::metrics::proxy::{ProxyMetrics, RequestOutcome, UpstreamErrorKind};

/// Who and what a request was for, as far as the handler got.
#[derive(Debug, Default, Clone)]
struct Tags {
    model: Option<String>,
    team_id: Option<String>,
    key_alias: Option<String>,
}

tokio::task_local! {
    static TAGS: Arc<Mutex<Tags>>;
}

/// Names the model and key of the request being handled (a no-op outside [`track`]).
pub fn tag(model: &str, key: Option<&KeyRecord>) {
    let _ = TAGS.try_with(|tags| {
        if let Ok(mut tags) = tags.lock() {
            tags.model = Some(model.to_owned());
            tags.team_id = key.and_then(|k| k.team_id.clone());
            tags.key_alias = key.and_then(|k| k.key_alias.clone());
        }
    });
}

/// `call` with the tags of the request being handled, for a task spawned to handle it (the
/// task-local scope does not cross `spawn` by itself).
pub fn carry<F: Future>(call: F) -> impl Future<Output = F::Output> {
    let tags = TAGS.try_with(Arc::clone).ok();
    async move {
        match tags {
            Some(tags) => TAGS.scope(tags, call).await,
            None => call.await,
        }
    }
}

/// Runs a relay handler's `call`: counts the request in flight, then records it when its
/// response body is done. Called by the handlers themselves rather than as axum middleware,
/// which boxed the call and cloned the route's service per request (a sixth of its
/// allocations).
pub async fn track(state: &AppState, call: impl Future<Output = Response>) -> Response {
    let started = Instant::now();
    let in_flight = state.metrics().in_flight();
    let tags = Arc::new(Mutex::new(Tags::default()));
    let response = TAGS.scope(tags.clone(), call).await;
    let tags = tags.lock().map(|t| t.clone()).unwrap_or_default();
    let done = Done {
        metrics: state.metrics().clone(),
        status: response.status().as_u16(),
        tags,
        started,
        _in_flight: in_flight,
    };
    // The closure owns `done`; the body (and so `done`) is dropped once hyper has sent the last
    // byte or the client has gone. Size hints pass through, so Content-Length is kept.
    response.map(|body| {
        Body::new(body.map_frame(move |frame| {
            let _ = &done;
            frame
        }))
    })
}

/// Records one request when dropped.
struct Done {
    metrics: ProxyMetrics,
    status: u16,
    tags: Tags,
    started: Instant,
    _in_flight: crate::metrics::proxy::InFlight,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.metrics.record_request(&RequestOutcome {
            model: self.tags.model.as_deref(),
            status: self.status,
            team_id: self.tags.team_id.as_deref(),
            key_alias: self.tags.key_alias.as_deref(),
            duration: self.started.elapsed(),
        });
    }
}

/// How an upstream failure is counted (`None`: not an upstream failure).
pub fn upstream_error_kind(error: &ProxyError) -> Option<UpstreamErrorKind> {
    match error {
        ProxyError::UpstreamUnreachable { .. } => Some(UpstreamErrorKind::Connect),
        ProxyError::UpstreamTimeout { .. } => Some(UpstreamErrorKind::Timeout),
        ProxyError::Upstream { status, .. } if status.is_server_error() => {
            Some(UpstreamErrorKind::ServerError)
        }
        ProxyError::Upstream { .. } => Some(UpstreamErrorKind::ClientError),
        _ => None,
    }
}

/// `GET /metrics`: Prometheus metrics, for the master key only (unauthenticated routes are
/// limited to liveness). Scrape with `authorization: {credentials_file: ...}` in Prometheus.
pub async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ProxyError> {
    state.auth().require_master(&headers).await?;
    Ok(state.exposition().respond(&headers))
}
