//! `/chat/completions` and `/embeddings`: authenticate, resolve the model, forward (or mock),
//! and append the spend record before the response finishes.
//!
//! The client's body is parsed once, the `model` substituted (and `stream_options.include_usage`
//! forced on for streams), and serialised once for the upstream. The upstream's answer is
//! returned byte for byte; only `usage` and `model` are read out of it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::AppState;
use super::Route;
use super::auth::Caller;
use super::end_user;
use super::error::ProxyError;
use super::json_body::Kind;
use super::limits;
use super::mock;
use super::observe;
use super::request::read_json_body;
use super::stream::{self, StreamOutcome};
use super::tokens;
use super::upstream::{Endpoint, UpstreamClient, Usage};
use crate::metrics::proxy::UpstreamErrorKind;
use crate::spend::{SCHEMA_VERSION, SpendRecord};

/// LiteLLM's response headers (parsed once, not per response).
const CALL_ID: HeaderName = HeaderName::from_static("x-litellm-call-id");
const RESPONSE_COST: HeaderName = HeaderName::from_static("x-litellm-response-cost");

/// Chunks buffered between the upstream reader and a slow client.
const STREAM_BUFFER: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallType {
    Chat,
    Embedding,
}

impl CallType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat_completion",
            Self::Embedding => "embedding",
        }
    }
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    detached(state, headers, body, CallType::Chat).await
}

pub async fn embeddings(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    detached(state, headers, body, CallType::Embedding).await
}

/// Runs the call in the connection's own task, tracked so shutdown waits for it. If the client
/// hangs up, hyper drops the handler's future; the call is then moved onto a task of its own and
/// goes on, so an answer the upstream already produced (and billed) is still recorded. Spawning
/// only on hang-up spares every other request a task and the wake-up that hands its result back.
/// The request is counted for Prometheus around all of it ([`observe::track`]).
async fn detached(
    state: AppState,
    headers: HeaderMap,
    body: Body,
    call_type: CallType,
) -> Response {
    let tracker = state.in_flight().clone();
    let tracked = state.clone();
    observe::track(&tracked, async move {
        // Made inside `track`'s scope, so `carry` takes the request's tags along.
        let call = tracker.track_future(Box::pin(observe::carry(handle(
            state, headers, body, call_type,
        ))));
        match (FinishOnHangUp { call: Some(call) }).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        }
    })
    .await
}

/// A UUIDv7 for the call: its start millisecond, then 74 random bits from the thread's CSPRNG
/// (seeded once from the OS). `Uuid::now_v7` asked the kernel (`getrandom(2)`) on every call: a
/// system call per request on the hot path.
fn transaction_id(start_time: &DateTime<Utc>) -> Uuid {
    let millis = u64::try_from(start_time.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &rand::random()).into_uuid()
}

/// A call that, if dropped before it finished, finishes on a task of its own.
struct FinishOnHangUp<F: Future + Send + Unpin + 'static>
where
    F::Output: Send + 'static,
{
    call: Option<F>,
}

impl<F: Future + Send + Unpin + 'static> Future for FinishOnHangUp<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(call) = self.call.as_mut() else {
            return Poll::Pending;
        };
        let output = std::task::ready!(Pin::new(call).poll(cx));
        self.call = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + Unpin + 'static> Drop for FinishOnHangUp<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(call) = self.call.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(call);
        }
    }
}

/// One call in flight: everything its spend record needs besides the usage.
struct Call {
    state: AppState,
    route: std::sync::Arc<Route>,
    call_type: CallType,
    transaction_id: Uuid,
    start_time: DateTime<Utc>,
    started: Instant,
    caller: Caller,
    end_user_id: Option<String>,
    stream: bool,
}

impl Call {
    fn record(
        &self,
        usage: Usage,
        estimated: bool,
        status: &str,
        upstream_model: Option<String>,
    ) -> SpendRecord {
        let billable = status == "success";
        let key = self.caller.key();
        SpendRecord {
            schema: SCHEMA_VERSION,
            transaction_id: self.id_text(),
            start_time: Some(self.start_time),
            end_time: Utc::now(),
            call_type: self.call_type.as_str().to_owned(),
            model: self.route.deployment.model_name.clone(),
            upstream_model: Some(
                limits::bounded_upstream_model(upstream_model)
                    .unwrap_or_else(|| self.route.deployment.upstream_model.clone()),
            ),
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            total_tokens: Some(
                usage
                    .total_tokens
                    .unwrap_or(usage.prompt_tokens + usage.completion_tokens),
            ),
            usage_estimated: estimated,
            response_cost: if billable {
                self.route
                    .price
                    .map(|p| p.cost(usage.prompt_tokens, usage.completion_tokens))
            } else {
                None
            },
            end_user_id: self.end_user_id.clone(),
            user_id: key.and_then(|k| k.user_id.clone()),
            team_id: key.and_then(|k| k.team_id.clone()),
            key_alias: key.and_then(|k| k.key_alias.clone()),
            key_hash: key.map(|k| k.token()),
            stream: self.stream,
            status: status.to_owned(),
            duration_ms: Some(self.started.elapsed().as_millis() as u64),
        }
    }

    /// Appends the record; a failure to write refuses the request (it could not be billed).
    async fn write(&self, record: &SpendRecord) -> Result<(), ProxyError> {
        let written = self.state.spend().append(record).await;
        let metrics = self.state.metrics();
        metrics.record_spend_record(written.is_ok());
        if written.is_ok() && record.status == "success" {
            metrics.record_usage(
                &record.model,
                record.input_tokens,
                record.output_tokens,
                record.response_cost,
            );
        }
        written.map_err(|e| {
            tracing::error!(error = %e, transaction_id = %record.transaction_id, "spend record not written");
            ProxyError::SpendLogUnavailable
        })
    }

    /// Logs an upstream failure (never billed) and passes the error on.
    async fn fail(&self, error: ProxyError) -> ProxyError {
        if let Some(kind) = observe::upstream_error_kind(&error) {
            let model = &self.route.deployment.model_name;
            self.state.metrics().record_upstream_error(model, kind);
        }
        let record = self.record(Usage::default(), false, "failure", None);
        if let Err(e) = self.state.spend().append(&record).await {
            tracing::warn!(error = %e, "failure record not written");
        }
        error
    }

    fn endpoint(&self) -> &Endpoint {
        match self.call_type {
            CallType::Chat => &self.route.chat,
            CallType::Embedding => &self.route.embeddings,
        }
    }

    /// The transaction id in its usual hyphenated form, without `Display`'s formatting machinery
    /// (it is written twice per request).
    fn id_text(&self) -> String {
        let mut buffer = Uuid::encode_buffer();
        self.transaction_id
            .hyphenated()
            .encode_lower(&mut buffer)
            .to_owned()
    }

    fn headers(&self, response: &mut Response, cost: Option<f64>) {
        let h = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&self.id_text()) {
            h.insert(CALL_ID, v);
        }
        if let Some(cost) = cost
            && let Ok(v) = HeaderValue::from_str(&cost.to_string())
        {
            h.insert(RESPONSE_COST, v);
        }
    }
}

async fn handle(
    state: AppState,
    headers: HeaderMap,
    body: Body,
    call_type: CallType,
) -> Result<Response, ProxyError> {
    let started = Instant::now();
    let start_time = Utc::now();
    let caller = state.auth().authenticate(&headers).await?;
    let body = read_json_body(&headers, body, state.max_body_bytes()).await?;

    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m,
        _ => {
            return Err(ProxyError::bad_param(
                "model",
                format!(
                    "the request has no `model`; available models: {}",
                    state.model_names().join(", ")
                ),
            ));
        }
    };
    observe::tag(&model, caller.key());
    let Some(route) = state.route(&model).cloned() else {
        return Err(ProxyError::BadRequest {
            message: format!(
                "model {model:?} is not served by this proxy; available models: {}",
                state.model_names().join(", ")
            ),
            param: Some("model".into()),
            code: "model_not_found",
        });
    };
    if let Some(key) = caller.key()
        && !key.allows_model(&model)
    {
        return Err(ProxyError::Forbidden {
            message: format!(
                "key {} may not use model {model:?}; it may use: {}",
                key.key_name,
                key.models.join(", ")
            ),
            param: Some("model"),
        });
    }
    let end_user_id = end_user::of_request(body.get("user"), &headers)?;
    if let Some(key) = caller.key() {
        limits::require_billable_key(key)?;
        end_user::check_guard(key, end_user_id.as_deref())?;
    }
    let stream = call_type == CallType::Chat
        && match body.get("stream") {
            Some(Value::Bool(b)) => b,
            Some(Value::Null) | None => false,
            Some(_) => {
                return Err(ProxyError::bad_param(
                    "stream",
                    "`stream` must be a boolean",
                ));
            }
        };
    if call_type == CallType::Chat && body.kind("messages") != Some(Kind::Array) {
        return Err(ProxyError::bad_param(
            "messages",
            "`messages` must be an array of chat messages",
        ));
    }
    if call_type == CallType::Embedding && matches!(body.kind("input"), None | Some(Kind::Null)) {
        return Err(ProxyError::bad_param("input", "`input` is required"));
    }

    let call = Call {
        state,
        route,
        call_type,
        transaction_id: transaction_id(&start_time),
        start_time,
        started,
        caller,
        end_user_id,
        stream,
    };
    let stream_options = body.get("stream_options");
    let client_wants_usage = stream && wants_usage(stream_options.as_ref());
    if call.route.deployment.mock_response.is_some() {
        return mock_answer(call, &body.to_map(), client_wants_usage).await;
    }

    // Only `model` (and, for streams, `stream_options`) change; the rest goes as the client sent it.
    let upstream_model = serde_json::to_vec(&call.route.deployment.upstream_model)
        .map_err(|e| ProxyError::Internal(format!("encoding the upstream model: {e}")))?;
    let payload = if stream {
        let options = serde_json::to_vec(&include_usage(stream_options))
            .map_err(|e| ProxyError::Internal(format!("encoding stream_options: {e}")))?;
        body.with_members(&[("model", &upstream_model), ("stream_options", &options)])
    } else {
        body.with_members(&[("model", &upstream_model)])
    };
    // Estimated only if the upstream reports no usage.
    let prompt = PromptEstimate {
        body: body.bytes().clone(),
        call_type,
    };
    drop(body);

    let model_name = call.route.deployment.model_name.clone();
    let response = match call
        .state
        .upstream()
        .post_json(call.endpoint(), &model_name, payload)
        .await
    {
        Ok(r) => r,
        Err(e) => return Err(call.fail(e).await),
    };

    if stream {
        let source = response.into_stream();
        return Ok(start_stream(call, source, client_wants_usage, move || {
            prompt.tokens()
        }));
    }

    let (content_type, bytes) =
        match UpstreamClient::read_body(response, call.endpoint(), &model_name).await {
            Ok(r) => r,
            Err(e) => return Err(call.fail(e).await),
        };
    let (usage, estimated, upstream_model) = usage_of(&bytes, call_type, || prompt.tokens());
    let record = call.record(usage, estimated, "success", upstream_model);
    call.write(&record).await?;
    let mut response = (StatusCode::OK, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    call.headers(&mut response, record.response_cost);
    Ok(response)
}

/// `stream_options.include_usage` as the client sent it.
fn wants_usage(stream_options: Option<&Value>) -> bool {
    stream_options
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The client's `stream_options` (an object, or a new one) with `include_usage` on.
fn include_usage(stream_options: Option<Value>) -> Value {
    let mut options = match stream_options {
        Some(Value::Object(o)) => o,
        _ => Map::new(),
    };
    options.insert("include_usage".into(), Value::Bool(true));
    Value::Object(options)
}

/// The prompt's estimated tokens, worked out from the client's body only when needed.
struct PromptEstimate {
    body: Bytes,
    call_type: CallType,
}

impl PromptEstimate {
    fn tokens(&self) -> u64 {
        let body = match serde_json::from_slice(&self.body) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        match self.call_type {
            CallType::Chat => tokens::estimate_messages(&body),
            CallType::Embedding => tokens::estimate_embedding_input(&body),
        }
    }
}

/// What a whole answer is read for when it reports its usage; the rest is skipped unread.
#[derive(Deserialize)]
struct ResponseUsage {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<Usage>,
}

/// An answer without usage, read further for the completion estimate.
#[derive(Deserialize)]
struct ResponseMeta {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    choices: Vec<ResponseChoice>,
}

#[derive(Deserialize)]
struct ResponseChoice {
    #[serde(default)]
    message: Option<ResponseMessage>,
}

#[derive(Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<String>,
}

/// Usage from a whole answer, or an estimate (flagged) when the upstream reported none.
fn usage_of(
    bytes: &[u8],
    call_type: CallType,
    prompt_estimate: impl FnOnce() -> u64,
) -> (Usage, bool, Option<String>) {
    // As text: serde_json then skips checking each string's UTF-8 (JSON that is not UTF-8 does
    // not parse either way).
    let text = std::str::from_utf8(bytes).ok();
    if let Some(Ok(ResponseUsage {
        model,
        usage: Some(usage),
    })) = text.map(serde_json::from_str)
    {
        return (usage, false, model);
    }
    let meta: Option<ResponseMeta> = text.and_then(|t| serde_json::from_str(t).ok());
    let upstream_model = meta.as_ref().and_then(|m| m.model.clone());
    match meta {
        Some(ResponseMeta {
            usage: Some(usage), ..
        }) => (usage, false, upstream_model),
        other => {
            let completion = match call_type {
                CallType::Embedding => 0,
                CallType::Chat => other
                    .map(|m| {
                        m.choices
                            .iter()
                            .filter_map(|c| c.message.as_ref()?.content.as_deref())
                            .map(tokens::estimate_text)
                            .sum()
                    })
                    .unwrap_or(0),
            };
            (
                Usage::new(prompt_estimate(), completion),
                true,
                upstream_model,
            )
        }
    }
}

/// Starts relaying a stream on a tracked task and returns the streaming response.
fn start_stream<S, E>(
    call: Call,
    source: S,
    client_wants_usage: bool,
    prompt_estimate: impl FnOnce() -> u64 + Send + 'static,
) -> Response
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(STREAM_BUFFER);
    let mut response = Response::new(Body::from_stream(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
    })));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    call.headers(&mut response, None);
    let tracker = call.state.in_flight().clone();
    tracker.spawn(async move {
        stream::relay(Box::pin(source), tx, client_wants_usage, async |outcome: StreamOutcome| {
            let (usage, estimated) = match outcome.usage {
                Some(u) => (u, false),
                None => (Usage::new(prompt_estimate(), outcome.estimated_completion_tokens), true),
            };
            let status = if outcome.upstream_error.is_some() { "failure" } else { "success" };
            if let Some(reason) = &outcome.upstream_error {
                call.state.metrics().record_upstream_error(
                    &call.route.deployment.model_name,
                    UpstreamErrorKind::InvalidResponse,
                );
                tracing::warn!(transaction_id = %call.transaction_id, reason, "upstream stream broke off; not billed");
            }
            let record = call.record(usage, estimated, status, outcome.upstream_model);
            call.write(&record).await.is_ok()
        })
        .await;
    });
    response
}

/// Answers a mock deployment locally, plain or streamed, with deterministic usage.
async fn mock_answer(
    call: Call,
    body: &Map<String, Value>,
    client_wants_usage: bool,
) -> Result<Response, ProxyError> {
    let d = &call.route.deployment;
    let text = d.mock_response.clone().unwrap_or_default();
    let created = call.start_time.timestamp();
    let id = call.transaction_id.simple().to_string();
    let (usage, bytes) = match call.call_type {
        CallType::Chat => {
            let usage = mock::chat_usage(body, &text);
            if call.stream {
                let events = mock::chat_stream(&id, &d.upstream_model, &text, usage, created);
                let source = futures::stream::iter(
                    events.into_iter().map(Ok::<_, std::convert::Infallible>),
                );
                return Ok(start_stream(call, source, client_wants_usage, move || {
                    usage.prompt_tokens
                }));
            }
            (
                usage,
                mock::chat_completion(&id, &d.upstream_model, &text, usage, created),
            )
        }
        CallType::Embedding => {
            let usage = Usage::new(tokens::estimate_embedding_input(body), 0);
            (usage, mock::embeddings(&d.upstream_model, body, usage))
        }
    };
    let record = call.record(usage, false, "success", None);
    call.write(&record).await?;
    let mut response = (StatusCode::OK, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    call.headers(&mut response, record.response_cost);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids_are_v7_at_the_start_millisecond_and_unique() {
        let start: DateTime<Utc> = "2026-11-27T10:00:00.250Z".parse().unwrap();
        let ids: std::collections::HashSet<Uuid> =
            (0..1000).map(|_| transaction_id(&start)).collect();
        assert_eq!(
            ids.len(),
            1000,
            "the random bits differ within one millisecond"
        );
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
            assert_eq!((secs, nanos), (start.timestamp() as u64, 250_000_000));
        }
    }
}
